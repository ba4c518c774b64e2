//! `[nbd]`: the NBD server (off unless `listen` is set).

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::{Args, ConfigError};

/// `[nbd]` as written.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(default)]
pub struct NbdSection {
    /// Listen address; unset: no NBD server.
    pub listen: Option<SocketAddr>,
    /// The principal every NBD client acts as (without client certificates).
    pub principal: Option<String>,
    /// Require TLS (`NBD_OPT_STARTTLS`) with the `[tls]` certificate.
    pub tls: Option<bool>,
    /// Writable exports take exclusive leases.
    pub exclusive: Option<bool>,
    /// A connection with no request for this long is closed.
    pub idle_timeout_ms: Option<u64>,
    /// Bound on the whole handshake.
    pub handshake_timeout_ms: Option<u64>,
    /// How long a hot connection busy-polls for its next request, µs (0: never).
    pub busy_poll_us: Option<u64>,
}

/// The NBD server's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nbd {
    /// Where it listens.
    pub listen: SocketAddr,
    /// The principal its clients act as; `None` when TLS client certificates name it.
    pub principal: Option<String>,
    /// TLS required (`NBD_OPT_STARTTLS` before anything else).
    pub tls: bool,
    /// Writable exports take exclusive leases (default true).
    pub exclusive: bool,
    /// Idle timeout (default 10 minutes: a mounted filesystem may be quiet for long).
    pub idle_timeout: Duration,
    /// Handshake timeout (default 10 s).
    pub handshake_timeout: Duration,
    /// Busy-poll window of a hot connection (default 50 µs; zero: never poll).
    pub busy_poll: Duration,
}

/// `[nbd]` from flags over the file; `None` when off.
pub(super) fn resolve(
    args: &Args,
    file: &NbdSection,
    principals: &crate::auth::Principals,
    insecure_plaintext: bool,
    tls: Option<&super::TlsFiles>,
) -> Result<Option<Nbd>, ConfigError> {
    let Some(listen) = args.nbd_listen.or(file.listen) else {
        return Ok(None);
    };
    let invalid = ConfigError::Invalid;
    let want_tls = args.nbd_tls || file.tls.unwrap_or(false);
    if want_tls && tls.is_none() {
        return Err(invalid("nbd.tls (--nbd-tls) uses the [tls] certificate: set tls.cert and tls.key too".into()));
    }
    // With client certificates, each certificate's Common Name names the principal.
    let certs_name_principals = want_tls && tls.is_some_and(|t| t.client_ca.is_some());
    let principal = args.nbd_principal.clone().or(file.principal.clone());
    match &principal {
        None if !certs_name_principals => {
            return Err(invalid(
                "nbd.listen is set but nbd.principal is not: NBD has no credential of its own, so name the \
                 principal its clients act as (--nbd-principal; `admin` for the token file's principal), or \
                 require client certificates (nbd.tls with tls.client_ca)"
                    .into(),
            ));
        }
        Some(p) if principals.by_name(p).is_none() => {
            return Err(invalid(format!(
                "nbd.principal `{p}` is not a configured principal (auth.principals_file, or `admin` for \
                 auth.token_file)"
            )));
        }
        _ => {}
    }
    if !listen.ip().is_loopback() && !want_tls && !insecure_plaintext {
        return Err(invalid(format!(
            "refusing to serve NBD on {listen} without TLS: set nbd.tls (--nbd-tls, with the [tls] \
             certificate), or pass --insecure-plaintext if the network is trusted"
        )));
    }
    let idle = file.idle_timeout_ms.unwrap_or(600_000);
    let handshake = file.handshake_timeout_ms.unwrap_or(10_000);
    for (name, v) in [("nbd.idle_timeout_ms", idle), ("nbd.handshake_timeout_ms", handshake)] {
        if !(10..=86_400_000).contains(&v) {
            return Err(invalid(format!("{name} must be between 10 and 86400000, not {v}")));
        }
    }
    let busy_poll = file.busy_poll_us.unwrap_or(crate::busy_poll::DEFAULT_WINDOW.as_micros() as u64);
    if busy_poll > 1000 {
        return Err(invalid(format!("nbd.busy_poll_us must be between 0 (off) and 1000, not {busy_poll}")));
    }
    Ok(Some(Nbd {
        listen,
        principal: if certs_name_principals { None } else { principal },
        tls: want_tls,
        exclusive: file.exclusive.unwrap_or(true),
        idle_timeout: Duration::from_millis(idle),
        handshake_timeout: Duration::from_millis(handshake),
        busy_poll: Duration::from_micros(busy_poll),
    }))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn resolve_args(argv: &[&str], insecure: bool) -> Result<Option<Nbd>, ConfigError> {
        let args = Args::parse_from(std::iter::once("rdaxd").chain(argv.iter().copied()));
        resolve(&args, &NbdSection::default(), &crate::auth::Principals::single("admin", "t0ken"), insecure, None)
    }

    #[test]
    fn nbd_needs_a_known_principal_and_loopback_or_an_explicit_plaintext() {
        assert_eq!(resolve_args(&[], false).unwrap(), None, "off by default");
        let e = resolve_args(&["--nbd-listen", "127.0.0.1:10809"], false).unwrap_err().to_string();
        assert!(e.contains("nbd.principal"), "{e}");
        let e = resolve_args(&["--nbd-listen", "127.0.0.1:10809", "--nbd-principal", "bob"], false).unwrap_err();
        assert!(e.to_string().contains("not a configured principal"), "{e}");
        let n = resolve_args(&["--nbd-listen", "127.0.0.1:10809", "--nbd-principal", "admin"], false).unwrap().unwrap();
        assert!(n.exclusive && n.principal.as_deref() == Some("admin") && n.idle_timeout == Duration::from_secs(600));
        assert_eq!(n.busy_poll, Duration::from_micros(50), "busy polling is on by default");
        let wide = ["--nbd-listen", "0.0.0.0:10809", "--nbd-principal", "admin"];
        assert!(resolve_args(&wide, false).unwrap_err().to_string().contains("--insecure-plaintext"));
        assert!(resolve_args(&wide, true).unwrap().is_some());
        let e = resolve_args(&["--nbd-listen", "127.0.0.1:1", "--nbd-principal", "admin", "--nbd-tls"], false);
        assert!(e.unwrap_err().to_string().contains("tls.cert"), "TLS needs the certificate");
    }

    #[test]
    fn busy_poll_is_bounded_and_can_be_turned_off() {
        let args = Args::parse_from(["rdaxd", "--nbd-listen", "127.0.0.1:10809", "--nbd-principal", "admin"]);
        let p = crate::auth::Principals::single("admin", "t0ken");
        let with = |us| NbdSection { busy_poll_us: Some(us), ..NbdSection::default() };
        assert_eq!(resolve(&args, &with(0), &p, false, None).unwrap().unwrap().busy_poll, Duration::ZERO);
        assert_eq!(resolve(&args, &with(200), &p, false, None).unwrap().unwrap().busy_poll, Duration::from_micros(200));
        let e = resolve(&args, &with(1001), &p, false, None).unwrap_err().to_string();
        assert!(e.contains("nbd.busy_poll_us"), "{e}");
    }
}
