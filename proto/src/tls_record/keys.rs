//! TLS 1.3 record protection (RFC 8446 §5.2–5.3) with the traffic secrets rustls hands over
//! after its handshake: one AEAD key, IV and sequence number per direction, sealed and opened
//! in place in the caller's buffer. rustls keeps the key schedule (a KeyUpdate asks it for
//! the next secret through [`rustls::kernel::KernelConnection`]); this is only the record
//! layer, the part kTLS does in a kernel. The AEADs are aws-lc-rs's (ring's API, AWS-LC's
//! AES-GCM, which uses AVX-512 where the CPU has it; see the workspace Cargo.toml).

use std::io;

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::ConnectionTrafficSecrets;

/// The largest plaintext one record carries.
pub const MAX_PLAIN: usize = 1 << 14;
/// The record header: type, legacy version, length.
pub const HEADER: usize = 5;
/// The AEAD tag of every suite TLS 1.3 has.
pub const TAG: usize = 16;
/// The largest ciphertext body RFC 8446 allows (2^14 + 256).
pub const MAX_BODY: usize = MAX_PLAIN + 256;
/// The largest whole record.
pub const MAX_RECORD: usize = HEADER + MAX_BODY;
/// What one full record adds to its plaintext: header, inner content type, tag.
pub const OVERHEAD: usize = HEADER + 1 + TAG;

/// TLS content types.
pub const ALERT: u8 = 21;
/// A handshake message (after the handshake: KeyUpdate or NewSessionTicket).
pub const HANDSHAKE: u8 = 22;
/// Application data, and the outer type of every protected record.
pub const APPLICATION_DATA: u8 = 23;

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS record: {what}"))
}

/// One direction's key, IV and next sequence number.
pub struct Keys {
    key: LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key or the IV.
        f.debug_struct("Keys").field("seq", &self.seq).finish_non_exhaustive()
    }
}

impl Keys {
    /// Keys from what rustls extracted, starting at sequence number `seq`.
    pub fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> io::Result<Keys> {
        let (alg, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (&aead::CHACHA20_POLY1305, key, iv),
            _ => return Err(io::Error::new(io::ErrorKind::Unsupported, "TLS record: cipher suite not supported")),
        };
        Keys::from_parts(alg, key.as_ref(), iv.as_ref(), seq)
    }

    fn from_parts(alg: &'static aead::Algorithm, key: &[u8], iv: &[u8], seq: u64) -> io::Result<Keys> {
        let key = UnboundKey::new(alg, key).map_err(|_| bad("key of the wrong length"))?;
        let iv: [u8; aead::NONCE_LEN] = iv.try_into().map_err(|_| bad("IV of the wrong length"))?;
        Ok(Keys { key: LessSafeKey::new(key), iv, seq })
    }

    /// The sequence number of the next record.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The per-record nonce: the IV XOR the sequence number, left-padded (RFC 8446 §5.3).
    fn nonce(&self) -> Nonce {
        let mut n = self.iv;
        for (b, s) in n[aead::NONCE_LEN - 8..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        Nonce::assume_unique_for_key(n)
    }

    /// Seal one record in place. `rec` is `HEADER + len + 1 + TAG` bytes with the plaintext at
    /// `rec[HEADER..HEADER + len]`; the header, inner content type and tag are written here.
    pub fn seal(&mut self, rec: &mut [u8], len: usize, content_type: u8) -> io::Result<()> {
        if len > MAX_PLAIN || rec.len() != len + OVERHEAD {
            return Err(bad("sealing a record of the wrong size"));
        }
        let body = (len + 1 + TAG) as u16;
        let [hi, lo] = body.to_be_bytes();
        let header = [APPLICATION_DATA, 3, 3, hi, lo];
        rec[..HEADER].copy_from_slice(&header);
        rec[HEADER + len] = content_type;
        let nonce = self.nonce();
        let (inner, tag) = rec[HEADER..].split_at_mut(len + 1);
        let t =
            self.key.seal_in_place_separate_tag(nonce, Aad::from(header), inner).map_err(|_| bad("sealing failed"))?;
        tag.copy_from_slice(t.as_ref());
        self.seq += 1;
        Ok(())
    }

    /// Open one whole record (`HEADER` + the body its header announces) in place. Returns its
    /// content type and plaintext length; the plaintext is at `rec[HEADER..HEADER + n]`.
    pub fn open(&mut self, rec: &mut [u8]) -> io::Result<(u8, usize)> {
        let header: [u8; HEADER] = rec[..HEADER].try_into().map_err(|_| bad("short record"))?;
        let nonce = self.nonce();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(header), &mut rec[HEADER..])
            .map_err(|_| bad("decryption failed (bad record MAC)"))?;
        self.seq += 1;
        // The inner plaintext: content, then its type, then zero padding.
        let Some(at) = plain.iter().rposition(|&b| b != 0) else {
            return Err(bad("record with no content type"));
        };
        if at > MAX_PLAIN {
            return Err(bad("plaintext over 2^14 bytes"));
        }
        Ok((plain[at], at))
    }
}

/// The body length a record header announces, checked: the outer type of a protected
/// record is always application data, and the body holds at least a type byte and a tag.
pub fn body_len(header: &[u8]) -> io::Result<usize> {
    if header[0] != APPLICATION_DATA || header[1] != 3 {
        return Err(bad("not a protected TLS 1.3 record"));
    }
    let len = u16::from_be_bytes([header[3], header[4]]) as usize;
    if !(1 + TAG..=MAX_BODY).contains(&len) {
        return Err(bad("record length out of range"));
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(alg: usize, seq: u64) -> Keys {
        let (alg, len) = match alg {
            0 => (&aead::AES_128_GCM, 16),
            1 => (&aead::AES_256_GCM, 32),
            _ => (&aead::CHACHA20_POLY1305, 32),
        };
        Keys::from_parts(alg, &[9; 32][..len], &[1; 12], seq).unwrap()
    }

    #[test]
    fn seal_then_open_round_trips_for_every_suite_and_rejects_tampering() {
        for alg in 0..3 {
            let (mut tx, mut rx) = (keys(alg, 7), keys(alg, 7));
            for len in [0usize, 1, 100, MAX_PLAIN] {
                let mut rec = vec![0u8; len + OVERHEAD];
                for (i, b) in rec[HEADER..HEADER + len].iter_mut().enumerate() {
                    *b = (i * 31 + len) as u8 | 1;
                }
                let want = rec[HEADER..HEADER + len].to_vec();
                tx.seal(&mut rec, len, APPLICATION_DATA).unwrap();
                assert_eq!(body_len(&rec[..HEADER]).unwrap(), len + 1 + TAG);
                if len > 0 {
                    assert_ne!(&rec[HEADER..HEADER + len], &want[..], "sealed in place");
                }
                let copy = rec.clone();
                assert_eq!(rx.open(&mut rec).unwrap(), (APPLICATION_DATA, len));
                assert_eq!(&rec[HEADER..HEADER + len], &want[..]);
                // The same record again is out of sequence; a flipped bit fails at the right one.
                assert!(keys(alg, rx.seq()).open(&mut copy.clone()).is_err());
                assert!(keys(alg, rx.seq() - 1).open(&mut copy.clone()).is_ok());
                let mut flipped = copy.clone();
                flipped[HEADER] ^= 1;
                assert!(keys(alg, rx.seq() - 1).open(&mut flipped).is_err());
                let mut header = copy;
                header[2] ^= 1;
                assert!(keys(alg, rx.seq() - 1).open(&mut header).is_err(), "the header is authenticated");
            }
        }
    }

    #[test]
    fn the_nonce_is_the_iv_xor_the_sequence_number() {
        let k = keys(0, 0x0102_0304_0506_0708);
        let mut want = [1u8; 12];
        for (i, s) in [1u8, 2, 3, 4, 5, 6, 7, 8].iter().enumerate() {
            want[4 + i] ^= s;
        }
        assert_eq!(k.nonce().as_ref(), &want);
    }

    #[test]
    fn padding_is_stripped_and_an_all_zero_plaintext_is_refused() {
        let (mut tx, mut rx) = (keys(0, 0), keys(0, 0));
        // A record of 3 content bytes, its type, and 4 bytes of padding: seal 7 bytes whose
        // last "type" byte is zero, then check the opener finds the real type before it.
        let mut rec = vec![0u8; 7 + OVERHEAD];
        rec[HEADER..HEADER + 4].copy_from_slice(&[5, 6, 7, HANDSHAKE]);
        tx.seal(&mut rec, 7, 0).unwrap();
        assert_eq!(rx.open(&mut rec).unwrap(), (HANDSHAKE, 3));
        let mut zero = vec![0u8; 4 + OVERHEAD];
        tx.seal(&mut zero, 4, 0).unwrap();
        assert!(rx.open(&mut zero).is_err());
    }

    #[test]
    fn headers_are_checked() {
        assert!(body_len(&[APPLICATION_DATA, 3, 3, 0, 17]).is_ok());
        assert!(body_len(&[APPLICATION_DATA, 3, 3, 0, 16]).is_err(), "no room for a type byte");
        assert!(body_len(&[HANDSHAKE, 3, 3, 0, 40]).is_err(), "plaintext handshake after the handshake");
        let over = (MAX_BODY + 1) as u16;
        assert!(body_len(&[APPLICATION_DATA, 3, 3, (over >> 8) as u8, over as u8]).is_err());
    }
}
