//! The handshake: fixed newstyle negotiation and option haggling.
//!
//! Options: `EXPORT_NAME`, `ABORT`, `LIST`, `STARTTLS`, `INFO`, `GO`, `STRUCTURED_REPLY`,
//! `LIST_META_CONTEXT` and `SET_META_CONTEXT` (`base:allocation`). Anything else gets
//! `NBD_REP_ERR_UNSUP` and haggling goes on. With `nbd.tls` the server is FORCEDTLS: until
//! the client starts TLS, every option but `STARTTLS` and `ABORT` gets `NBD_REP_ERR_TLS_REQD`
//! (and `EXPORT_NAME`, which cannot be refused in words, closes the connection); after it,
//! haggling starts over with no state kept, as the protocol requires. Bad input gets an error reply wherever the
//! protocol has one (`ERR_INVALID` for malformed data, `ERR_TOO_BIG` for an option over
//! [`MAX_OPTION`]); only what cannot be answered in step — a wrong magic, unknown client
//! flags, an option too long to skip — closes the connection. The caller bounds the whole
//! handshake in time, and [`MAX_OPTIONS`] bounds it in count.

use std::sync::Arc;

use rdax_proto::model::ObjectKey;
use tokio::io::AsyncWriteExt;
use tracing::{debug, info};

use super::export::{AttachError, Attached};
use super::io::Io;
use super::wire::{self, info, opt, rep, tflag};
use super::{MAX_PAYLOAD, NbdServer};
use crate::auth::{Principal, Rights};
use crate::dataplane::DpStream;

/// The largest option data read; larger options are refused.
pub const MAX_OPTION: u32 = 64 << 10;
/// Options this long are skipped (and refused); longer ones close the connection.
const MAX_SKIP: u32 = 1 << 20;
/// Options in one handshake.
pub const MAX_OPTIONS: usize = 256;
/// Exports listed by `NBD_OPT_LIST`.
const MAX_LIST: usize = 10_000;

/// Where TLS stands on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsState {
    /// The server offers none.
    Off,
    /// Required, and the client has not started it: only `STARTTLS` and `ABORT` are served.
    Required,
    /// On.
    On,
}

/// How haggling ended.
pub enum Outcome {
    /// Transmission on this export.
    Go(Negotiated),
    /// The client asked for TLS and was told yes: the TLS handshake comes next.
    StartTls,
    /// The client ended it, or was cut off.
    Closed,
}

/// What a successful handshake leads to.
pub struct Negotiated {
    /// The export joined.
    pub attached: Attached,
    /// Its size as announced.
    pub size: u64,
    /// The client may write.
    pub writable: bool,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// `base:allocation` was selected.
    pub meta: bool,
}

/// An export the principal may open.
struct Resolved {
    key: ObjectKey,
    size: u64,
    writable: bool,
}

impl Resolved {
    fn negotiated(&self, attached: Attached, structured: bool, meta: bool) -> Negotiated {
        Negotiated { attached, size: self.size, writable: self.writable, structured, meta }
    }
}

fn flags_for(writable: bool, structured: bool) -> u16 {
    let mut f = tflag::HAS_FLAGS | tflag::SEND_FLUSH | tflag::SEND_FUA | tflag::CAN_MULTI_CONN;
    if writable {
        f |= tflag::SEND_TRIM | tflag::SEND_WRITE_ZEROES;
    } else {
        f |= tflag::READ_ONLY;
    }
    if structured {
        f |= tflag::SEND_DF;
    }
    f
}

impl NbdServer {
    async fn resolve(&self, principal: &Principal, name: &[u8]) -> Result<Resolved, (u32, String)> {
        let unknown = |m: String| (rep::ERR_UNKNOWN, m);
        let text = std::str::from_utf8(name).map_err(|_| unknown("export names are UTF-8 `namespace/name`".into()))?;
        let (ns, n) = text
            .split_once('/')
            .ok_or_else(|| unknown(format!("no volume `{text}`: export names are `namespace/name`")))?;
        let key = ObjectKey::new(ns, n).map_err(|e| unknown(format!("no volume `{text}`: {e}")))?;
        if !principal.allows(Rights::READ, &key.namespace, &key.name) {
            return Err((rep::ERR_POLICY, format!("principal `{}` has no `read` right on `{key}`", principal.name)));
        }
        if self.deps.gate.is_closed() {
            return Err((rep::ERR_SHUTDOWN, "rdaxd is shutting down".into()));
        }
        let (pool, k) = (self.deps.pool.clone(), key.clone());
        let st = tokio::task::spawn_blocking(move || pool.stat(&k.namespace, &k.name))
            .await
            .map_err(|_| (rep::ERR_SHUTDOWN, "rdaxd is shutting down".to_string()))?
            .map_err(|e| unknown(format!("no volume `{key}`: {e}")))?;
        if !st.volume {
            return Err(unknown(format!(
                "`{key}` is an object, not a volume (create one with `rdaxctl volume create`)"
            )));
        }
        let writable = principal.allows(Rights::WRITE, &key.namespace, &key.name);
        Ok(Resolved { key, size: st.size, writable })
    }

    /// The greeting and the client's flags. `Ok(None)`: unknown client flags (closed);
    /// `Ok(Some(no_zeroes))` otherwise.
    pub(super) async fn greet<S: DpStream>(&self, io: &mut Io<S>) -> std::io::Result<Option<bool>> {
        io.out.extend_from_slice(&wire::greeting());
        io.write_out().await?;
        let mut b4 = [0u8; 4];
        io.read_exact(&mut b4).await?;
        let cflags = u32::from_be_bytes(b4);
        if cflags & !(wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES) != 0 {
            info!(flags = cflags, "NBD client sent unknown client flags; closing");
            return Ok(None);
        }
        Ok(Some(cflags & wire::FLAG_C_NO_ZEROES != 0))
    }

    /// Option haggling, until an export is chosen, TLS is started, or the client leaves.
    /// `principal` is who the client is (`None` only while TLS is still required).
    pub(super) async fn haggle<S: DpStream>(
        &self,
        io: &mut Io<S>,
        principal: Option<&Arc<Principal>>,
        tls: TlsState,
        no_zeroes: bool,
    ) -> std::io::Result<Outcome> {
        let (mut structured, mut meta) = (false, false);
        for _ in 0..MAX_OPTIONS {
            let mut h = [0u8; 16];
            io.read_exact(&mut h).await?;
            let magic = u64::from_be_bytes(h[..8].try_into().expect("8"));
            let option = u32::from_be_bytes(h[8..12].try_into().expect("4"));
            let len = u32::from_be_bytes(h[12..16].try_into().expect("4"));
            if magic != wire::IHAVEOPT {
                info!("NBD client sent an option without the IHAVEOPT magic; closing");
                return Ok(Outcome::Closed);
            }
            if len > MAX_OPTION {
                let msg = format!("option data of {len} bytes; at most {MAX_OPTION}");
                if len > MAX_SKIP {
                    reply_err(io, option, rep::ERR_TOO_BIG, &msg).await?;
                    return Ok(Outcome::Closed);
                }
                io.skip(len as usize).await?;
                reply_err(io, option, rep::ERR_TOO_BIG, &msg).await?;
                continue;
            }
            let mut data = vec![0u8; len as usize];
            io.read_exact(&mut data).await?;
            debug!(option, len, "NBD option");
            if option == opt::STARTTLS {
                match tls {
                    _ if !data.is_empty() => reply_err(io, option, rep::ERR_INVALID, "STARTTLS takes no data").await?,
                    TlsState::Off => reply_err(io, option, rep::ERR_UNSUP, "TLS is not configured (nbd.tls)").await?,
                    TlsState::On => reply_err(io, option, rep::ERR_INVALID, "TLS is already on").await?,
                    TlsState::Required => {
                        wire::opt_reply(&mut io.out, option, rep::ACK, &[]);
                        io.write_out().await?;
                        return Ok(Outcome::StartTls);
                    }
                }
                continue;
            }
            let principal = match (tls, principal) {
                (TlsState::Required, _) | (_, None) => match option {
                    opt::ABORT => {
                        wire::opt_reply(&mut io.out, option, rep::ACK, &[]);
                        let _ = io.write_out().await;
                        return Ok(Outcome::Closed);
                    }
                    // No way to say "TLS first" to this one: close.
                    opt::EXPORT_NAME => return Ok(Outcome::Closed),
                    _ => {
                        let msg = "this server requires TLS: send NBD_OPT_STARTTLS first";
                        reply_err(io, option, rep::ERR_TLS_REQD, msg).await?;
                        continue;
                    }
                },
                (_, Some(p)) => p,
            };
            match option {
                opt::ABORT => {
                    wire::opt_reply(&mut io.out, option, rep::ACK, &[]);
                    let _ = io.write_out().await;
                    let _ = io.s.shutdown().await;
                    return Ok(Outcome::Closed);
                }
                opt::EXPORT_NAME => {
                    // No way to report an error: refusing means closing.
                    let Ok(r) = self.resolve(principal, &data).await else { return Ok(Outcome::Closed) };
                    let Ok(attached) = self.attach(&r) else { return Ok(Outcome::Closed) };
                    io.out.extend_from_slice(&r.size.to_be_bytes());
                    io.out.extend_from_slice(&flags_for(r.writable, structured).to_be_bytes());
                    if !no_zeroes {
                        io.out.extend_from_slice(&[0u8; 124]);
                    }
                    io.write_out().await?;
                    return Ok(Outcome::Go(r.negotiated(attached, structured, meta)));
                }
                opt::LIST => {
                    if !data.is_empty() {
                        reply_err(io, option, rep::ERR_INVALID, "NBD_OPT_LIST takes no data").await?;
                        continue;
                    }
                    let pool = self.deps.pool.clone();
                    let all = tokio::task::spawn_blocking(move || pool.volumes(MAX_LIST)).await.unwrap_or_default();
                    for v in all.iter().filter(|v| principal.allows(Rights::READ, &v.namespace, &v.name)) {
                        let name = format!("{}/{}", v.namespace, v.name);
                        let mut d = (name.len() as u32).to_be_bytes().to_vec();
                        d.extend_from_slice(name.as_bytes());
                        wire::opt_reply(&mut io.out, option, rep::SERVER, &d);
                        io.maybe_write_out().await?;
                    }
                    wire::opt_reply(&mut io.out, option, rep::ACK, &[]);
                    io.write_out().await?;
                }
                opt::STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        reply_err(io, option, rep::ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data").await?;
                        continue;
                    }
                    structured = true;
                    wire::opt_reply(&mut io.out, option, rep::ACK, &[]);
                    io.write_out().await?;
                }
                opt::INFO | opt::GO => {
                    let Some((name, wanted)) = wire::parse_go(&data) else {
                        reply_err(io, option, rep::ERR_INVALID, "malformed NBD_OPT_INFO/GO data").await?;
                        continue;
                    };
                    if name.is_empty() {
                        reply_err(io, option, rep::ERR_UNKNOWN, "there is no default export; name a volume").await?;
                        continue;
                    }
                    let r = match self.resolve(principal, name).await {
                        Ok(r) => r,
                        Err((kind, msg)) => {
                            reply_err(io, option, kind, &msg).await?;
                            continue;
                        }
                    };
                    let attached = if option == opt::GO {
                        match self.attach(&r) {
                            Ok(a) => Some(a),
                            Err(msg) => {
                                reply_err(io, option, rep::ERR_POLICY, &msg).await?;
                                continue;
                            }
                        }
                    } else {
                        None
                    };
                    wire::opt_reply(
                        &mut io.out,
                        option,
                        rep::INFO,
                        &wire::info_export(r.size, flags_for(r.writable, structured)),
                    );
                    wire::opt_reply(&mut io.out, option, rep::INFO, &wire::info_block_size(1, 4096, MAX_PAYLOAD));
                    if wanted.contains(&info::NAME) {
                        let mut d = info::NAME.to_be_bytes().to_vec();
                        d.extend_from_slice(name);
                        wire::opt_reply(&mut io.out, option, rep::INFO, &d);
                    }
                    wire::opt_reply(&mut io.out, option, rep::ACK, &[]);
                    io.write_out().await?;
                    if let Some(attached) = attached {
                        return Ok(Outcome::Go(r.negotiated(attached, structured, meta)));
                    }
                }
                opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                    if !structured {
                        reply_err(io, option, rep::ERR_INVALID, "negotiate structured replies first").await?;
                        continue;
                    }
                    let Some((name, queries)) = wire::parse_meta(&data) else {
                        reply_err(io, option, rep::ERR_INVALID, "malformed meta-context option data").await?;
                        continue;
                    };
                    if let Err((kind, msg)) = self.resolve(principal, name).await {
                        reply_err(io, option, kind, &msg).await?;
                        continue;
                    }
                    let list = option == opt::LIST_META_CONTEXT;
                    let base = wire::BASE_ALLOCATION.as_bytes();
                    let hit =
                        (list && queries.is_empty()) || queries.iter().any(|q| *q == base || (list && *q == b"base:"));
                    if !list {
                        meta = hit;
                    }
                    if hit {
                        let mut d = wire::BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                        d.extend_from_slice(base);
                        wire::opt_reply(&mut io.out, option, rep::META_CONTEXT, &d);
                    }
                    wire::opt_reply(&mut io.out, option, rep::ACK, &[]);
                    io.write_out().await?;
                }
                _ => {
                    reply_err(io, option, rep::ERR_UNSUP, "unknown option").await?;
                }
            }
        }
        info!(max = MAX_OPTIONS, "NBD client sent too many options; closing");
        Ok(Outcome::Closed)
    }

    fn attach(&self, r: &Resolved) -> Result<Attached, String> {
        self.registry.attach(&self.deps, &r.key, r.writable).map_err(|e| match e {
            AttachError::ReadOnlyExport => format!(
                "`{}` is exported read-only now (its first client may only read); it can be opened writable once \
                 its read-only clients disconnect",
                r.key
            ),
        })
    }
}

async fn reply_err<S: DpStream>(io: &mut Io<S>, option: u32, kind: u32, msg: &str) -> std::io::Result<()> {
    debug!(option, kind, msg, "NBD option refused");
    wire::opt_reply(&mut io.out, option, kind, msg.as_bytes());
    io.write_out().await
}
