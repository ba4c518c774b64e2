//! TLS for the TCP data plane with the record layer in our own buffers, on both ends.
//!
//! rustls makes the handshake (its unbuffered API; certificates and client verification as
//! configured), then hands over the traffic secrets and a [`KernelConnection`] for key
//! updates: the hand-over kTLS uses. From then on [`TlsConn`] seals and opens records itself
//! ([`keys`]). A payload costs one user-space copy each way: on the daemon straight between
//! the mapping and the record being sealed or just opened, in the SDK between the caller's
//! buffer and the record. A buffered rustls stream costs three (its plaintext buffer, its
//! record buffer, and a bounce buffer) plus an allocation per record.
//!
//! Only TLS 1.3 is spoken here. After the handshake the peer may send application data,
//! alerts (close_notify ends the stream; any other alert is an error) and KeyUpdate; a
//! KeyUpdate that asks for ours is answered before our next record. Our own sending key is
//! updated well before its suite's confidentiality limit.

pub mod keys;

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::kernel::KernelConnection;
use rustls::pki_types::ServerName;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets, ProtocolVersion};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use keys::{ALERT, APPLICATION_DATA, HANDSHAKE, HEADER, Keys, MAX_PLAIN, MAX_RECORD, OVERHEAD};

/// Ciphertext read from the socket per call (at most), plus room for one partial record.
const RX_CAP: usize = (256 << 10) + MAX_RECORD;
/// Sealed records are sent once this much is waiting (or on flush).
const TX_HIGH: usize = 256 << 10;
const TX_CAP: usize = TX_HIGH + MAX_RECORD;

/// KeyUpdate's handshake type.
const KEY_UPDATE: u8 = 24;
/// NewSessionTicket's handshake type.
const NEW_SESSION_TICKET: u8 = 4;

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {what}"))
}

/// A TLS 1.3 connection over TCP whose records this process seals and opens.
pub struct TlsConn {
    tcp: TcpStream,
    tx_keys: Keys,
    rx_keys: Keys,
    kernel: Kernel,
    /// Send a KeyUpdate and move to the next key at this sequence number.
    rekey_at: u64,
    /// The peer asked for our KeyUpdate.
    owe_key_update: bool,
    /// Received bytes: `rx[plain]` is opened plaintext not yet consumed, `rx[cipher..rx_end]`
    /// ciphertext not yet opened.
    rx: Vec<u8>,
    plain: std::ops::Range<usize>,
    cipher: usize,
    rx_end: usize,
    /// Plaintext rustls opened during the handshake (the peer's first bytes), served first.
    early: Vec<u8>,
    peer_closed: bool,
    /// Sealed records: `tx[tx_sent..tx_end]` is still to be written.
    tx: Vec<u8>,
    tx_sent: usize,
    tx_end: usize,
    closing: bool,
}

impl std::fmt::Debug for TlsConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConn").field("tx_seq", &self.tx_keys.seq()).finish_non_exhaustive()
    }
}

/// What rustls keeps after the hand-over: the key schedule, for key updates.
enum Kernel {
    Server(KernelConnection<ServerConnectionData>),
    Client(KernelConnection<ClientConnectionData>),
}

impl Kernel {
    fn update(&mut self, tx: bool) -> io::Result<(u64, ConnectionTrafficSecrets)> {
        match (self, tx) {
            (Kernel::Server(k), true) => k.update_tx_secret(),
            (Kernel::Server(k), false) => k.update_rx_secret(),
            (Kernel::Client(k), true) => k.update_tx_secret(),
            (Kernel::Client(k), false) => k.update_rx_secret(),
        }
        .map_err(tls_err)
    }

    /// When to move to the next sending key: half the suite's confidentiality limit, far from
    /// it and still rare (2^23 records of AES-128-GCM is 128 GiB).
    fn rekey_at(&self, seq: u64) -> u64 {
        let suite = match self {
            Kernel::Server(k) => k.negotiated_cipher_suite(),
            Kernel::Client(k) => k.negotiated_cipher_suite(),
        };
        seq.saturating_add(suite.tls13().map(|s| s.common.confidentiality_limit).unwrap_or(u64::MAX) / 2)
    }
}

/// Either end of an unbuffered rustls connection, for the one handshake loop.
trait Unbuffered: Send {
    type Data;
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn handshaking(&self) -> bool;
    fn version(&self) -> Option<ProtocolVersion>;
    fn hand_over(self) -> Result<(ExtractedSecrets, Kernel), rustls::Error>;
}

/// rustls defines these methods on each end's type separately: the same impl for both.
macro_rules! unbuffered {
    ($conn:ty, $data:ty, $kernel:path) => {
        impl Unbuffered for $conn {
            type Data = $data;
            fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data> {
                self.process_tls_records(incoming)
            }
            fn handshaking(&self) -> bool {
                self.is_handshaking()
            }
            fn version(&self) -> Option<ProtocolVersion> {
                self.protocol_version()
            }
            fn hand_over(self) -> Result<(ExtractedSecrets, Kernel), rustls::Error> {
                self.dangerous_into_kernel_connection().map(|(s, k)| (s, $kernel(k)))
            }
        }
    };
}

unbuffered!(UnbufferedServerConnection, ServerConnectionData, Kernel::Server);
unbuffered!(UnbufferedClientConnection, ClientConnectionData, Kernel::Client);

/// Make a server handshake on `tcp` (unbounded: the caller bounds it) and take over its
/// record layer. `config` must allow secret extraction; only TLS 1.3 is accepted.
pub async fn accept(config: Arc<rustls::ServerConfig>, tcp: TcpStream) -> io::Result<TlsConn> {
    handshake(UnbufferedServerConnection::new(config).map_err(tls_err)?, tcp).await
}

/// Make a client handshake with `name` on `tcp` (unbounded: the caller bounds it) and take
/// over its record layer. `config` must allow secret extraction; only TLS 1.3 is accepted.
pub async fn connect(
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    tcp: TcpStream,
) -> io::Result<TlsConn> {
    handshake(UnbufferedClientConnection::new(config, name).map_err(tls_err)?, tcp).await
}

async fn handshake<C: Unbuffered>(mut conn: C, mut tcp: TcpStream) -> io::Result<TlsConn> {
    let mut rx = vec![0u8; RX_CAP];
    let mut used = 0;
    let mut out = vec![0u8; 16 << 10];
    let mut out_len = 0;
    let mut early = Vec::new();
    enum Next {
        Again,
        Read,
        Done,
    }
    loop {
        let UnbufferedStatus { mut discard, state } = conn.process(&mut rx[..used]);
        let next = match state.map_err(tls_err)? {
            ConnectionState::EncodeTlsData(mut e) => loop {
                match e.encode(&mut out[out_len..]) {
                    Ok(n) => {
                        out_len += n;
                        break Next::Again;
                    }
                    Err(EncodeError::InsufficientSize(s)) => out.resize(out_len + s.required_size, 0),
                    Err(e) => return Err(io::Error::other(e.to_string())),
                }
            },
            ConnectionState::TransmitTlsData(t) => {
                tcp.write_all(&out[..out_len]).await?;
                out_len = 0;
                t.done();
                Next::Again
            }
            ConnectionState::ReadTraffic(mut r) => {
                while let Some(rec) = r.next_record() {
                    let rec = rec.map_err(tls_err)?;
                    discard += rec.discard;
                    early.extend_from_slice(rec.payload);
                }
                Next::Again
            }
            ConnectionState::BlockedHandshake => Next::Read,
            // A server may write after its Finished; it is done once the client's arrived.
            ConnectionState::WriteTraffic(_) => Next::Done,
            ConnectionState::PeerClosed | ConnectionState::Closed => {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed during the TLS handshake"));
            }
            _ => return Err(bad("unexpected state during the handshake (early data is not accepted)")),
        };
        rx.copy_within(discard..used, 0);
        used -= discard;
        match next {
            Next::Again => continue,
            Next::Done if !conn.handshaking() => break,
            Next::Done | Next::Read => {
                if used == rx.len() {
                    return Err(bad("handshake message too large"));
                }
                let n = tokio::io::AsyncReadExt::read(&mut tcp, &mut rx[used..]).await?;
                if n == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed during the TLS handshake"));
                }
                used += n;
            }
        }
    }
    if conn.version() != Some(ProtocolVersion::TLSv1_3) {
        return Err(bad("the data plane speaks TLS 1.3 only"));
    }
    let (secrets, kernel) = conn.hand_over().map_err(tls_err)?;
    Ok(TlsConn {
        tcp,
        tx_keys: Keys::new(secrets.tx.0, secrets.tx.1)?,
        rx_keys: Keys::new(secrets.rx.0, secrets.rx.1)?,
        rekey_at: kernel.rekey_at(secrets.tx.0),
        kernel,
        owe_key_update: false,
        rx,
        plain: 0..0,
        cipher: 0,
        rx_end: used,
        early,
        peer_closed: false,
        tx: vec![0u8; TX_CAP],
        tx_sent: 0,
        tx_end: 0,
        closing: false,
    })
}

impl TlsConn {
    /// The socket under the records (for options, not for bytes).
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Update our sending key after this many more records (tests of the KeyUpdate path).
    #[cfg(test)]
    fn rekey_after(&mut self, records: u64) {
        self.rekey_at = self.tx_keys.seq() + records;
    }

    /// Opened plaintext not yet consumed.
    fn plain(&self) -> &[u8] {
        if !self.early.is_empty() { &self.early } else { &self.rx[self.plain.clone()] }
    }

    fn consume(&mut self, n: usize) {
        if !self.early.is_empty() {
            self.early.drain(..n);
        } else {
            self.plain.start += n;
        }
    }

    /// Make plaintext available: `Ready(Ok(false))` at the peer's close_notify.
    fn poll_plain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        loop {
            if !self.plain().is_empty() {
                return Poll::Ready(Ok(true));
            }
            if self.peer_closed {
                return Poll::Ready(Ok(false));
            }
            let have = self.rx_end - self.cipher;
            if have >= HEADER {
                let body = keys::body_len(&self.rx[self.cipher..self.cipher + HEADER])?;
                if have >= HEADER + body {
                    let at = self.cipher;
                    self.cipher += HEADER + body;
                    let (typ, n) = self.rx_keys.open(&mut self.rx[at..at + HEADER + body])?;
                    self.plain = at + HEADER..at + HEADER + n;
                    if typ != APPLICATION_DATA {
                        self.plain.end = self.plain.start;
                        self.control(typ, at + HEADER, n)?;
                    }
                    continue;
                }
            }
            // Need more: keep the partial record, moved to the front when the tail is short.
            if self.cipher == self.rx_end {
                (self.cipher, self.rx_end, self.plain) = (0, 0, 0..0);
            } else if RX_CAP - self.rx_end < MAX_RECORD {
                self.rx.copy_within(self.cipher..self.rx_end, 0);
                self.rx_end -= self.cipher;
                self.cipher = 0;
                self.plain = 0..0;
            }
            let mut buf = ReadBuf::new(&mut self.rx[self.rx_end..]);
            ready!(Pin::new(&mut self.tcp).poll_read(cx, &mut buf))?;
            let n = buf.filled().len();
            if n == 0 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "TLS peer closed without close_notify",
                )));
            }
            self.rx_end += n;
        }
    }

    /// A record that is not application data: an alert or a post-handshake message.
    fn control(&mut self, typ: u8, at: usize, n: usize) -> io::Result<()> {
        let msg = &self.rx[at..at + n];
        match typ {
            ALERT if msg == [1, 0] || msg == [2, 0] => {
                self.peer_closed = true;
                Ok(())
            }
            ALERT if msg.len() == 2 => Err(bad(&format!("peer sent alert {}", msg[1]))),
            HANDSHAKE => {
                let mut rest = msg;
                while !rest.is_empty() {
                    let [t, a, b, c, tail @ ..] = rest else {
                        return Err(bad("truncated post-handshake message"));
                    };
                    let len = u32::from_be_bytes([0, *a, *b, *c]) as usize;
                    if tail.len() < len {
                        return Err(bad("a post-handshake message split across records"));
                    }
                    let (body, next) = tail.split_at(len);
                    match (*t, body) {
                        (KEY_UPDATE, [req @ (0 | 1)]) => {
                            let (seq, s) = self.kernel.update(false)?;
                            self.rx_keys = Keys::new(seq, s)?;
                            self.owe_key_update |= *req == 1;
                        }
                        (NEW_SESSION_TICKET, _) => {}
                        _ => return Err(bad("unexpected post-handshake message")),
                    }
                    rest = next;
                }
                Ok(())
            }
            _ => Err(bad("unexpected record type")),
        }
    }

    /// Room for one record of `len` plaintext bytes in the send buffer.
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<()>> {
        // A KeyUpdate may go ahead of the record: room for both.
        let need = len + OVERHEAD + 5 + OVERHEAD;
        if TX_CAP - self.tx_end < need || self.tx_end >= TX_HIGH {
            ready!(self.poll_send(cx))?;
        }
        Poll::Ready(Ok(()))
    }

    /// Write out every sealed record.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.tx_sent < self.tx_end {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.tx[self.tx_sent..self.tx_end]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.tx_sent += n;
        }
        self.tx_sent = 0;
        self.tx_end = 0;
        Poll::Ready(Ok(()))
    }

    /// Seal one record of `len` bytes that `fill` writes, after a KeyUpdate if one is due.
    /// The caller made room ([`Self::poll_room`]).
    fn push(&mut self, len: usize, content_type: u8, fill: impl FnOnce(&mut [u8])) -> io::Result<()> {
        if self.owe_key_update || self.tx_keys.seq() >= self.rekey_at {
            self.owe_key_update = false;
            self.seal_at_end(5, HANDSHAKE, |m| m.copy_from_slice(&[KEY_UPDATE, 0, 0, 1, 0]))?;
            let (seq, s) = self.kernel.update(true)?;
            self.tx_keys = Keys::new(seq, s)?;
            self.rekey_at = self.kernel.rekey_at(seq);
        }
        self.seal_at_end(len, content_type, fill)
    }

    fn seal_at_end(&mut self, len: usize, content_type: u8, fill: impl FnOnce(&mut [u8])) -> io::Result<()> {
        let at = self.tx_end;
        let rec = &mut self.tx[at..at + len + OVERHEAD];
        fill(&mut rec[HEADER..HEADER + len]);
        self.tx_keys.seal(rec, len, content_type)?;
        self.tx_end += len + OVERHEAD;
        Ok(())
    }

    /// Receive `len` plaintext bytes, handing each piece to `sink(offset, bytes)` straight from
    /// the record it was opened in.
    pub async fn recv_with(&mut self, len: usize, mut sink: impl FnMut(usize, &[u8])) -> io::Result<()> {
        let mut done = 0;
        while done < len {
            if !std::future::poll_fn(|cx| self.poll_plain(cx)).await? {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "TLS peer closed mid-payload"));
            }
            let p = self.plain();
            let n = p.len().min(len - done);
            sink(done, &p[..n]);
            self.consume(n);
            done += n;
        }
        Ok(())
    }

    /// Send `len` plaintext bytes that `fill(offset, buf)` writes straight into the records to
    /// be sealed. Records go out as the buffer fills; [`AsyncWriteExt::flush`] sends the rest.
    pub async fn send_with(&mut self, len: usize, mut fill: impl FnMut(usize, &mut [u8])) -> io::Result<()> {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(MAX_PLAIN);
            std::future::poll_fn(|cx| self.poll_room(cx, n)).await?;
            self.push(n, APPLICATION_DATA, |b| fill(done, b))?;
            done += n;
        }
        Ok(())
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 || !ready!(this.poll_plain(cx))? {
            return Poll::Ready(Ok(()));
        }
        let p = this.plain();
        let n = p.len().min(buf.remaining());
        buf.put_slice(&p[..n]);
        this.consume(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = buf.len().min(MAX_PLAIN);
        ready!(this.poll_room(cx, n))?;
        this.push(n, APPLICATION_DATA, |b| b.copy_from_slice(&buf[..n]))?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.closing {
            ready!(this.poll_room(cx, 2))?;
            // close_notify, a warning-level alert.
            this.push(2, ALERT, |b| b.copy_from_slice(&[1, 0]))?;
            this.closing = true;
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
