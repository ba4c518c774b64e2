//! `rdaxd check-config`'s report: the resolved configuration as a reader wants it, one line
//! per concern, with the config keys' own names. Secrets are never shown, only whether they
//! are set (credentials by principal name, as in a listing).

use std::fmt::Write as _;
use std::time::Duration;

use super::{Config, RdmaListen};

/// `1 GiB`, `64 MiB`, `4096 B`: the largest binary unit that divides exactly, else bytes.
fn size(b: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if b >= 1 << shift && b.is_multiple_of(1 << shift) {
            return format!("{} {unit}", b >> shift);
        }
    }
    format!("{b} B")
}

/// `250 ms`, `30 s`, `10 min`.
fn dur(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 || !ms.is_multiple_of(1000) {
        format!("{ms} ms")
    } else if ms.is_multiple_of(60_000) {
        format!("{} min", ms / 60_000)
    } else {
        format!("{} s", ms / 1000)
    }
}

/// A URL without its userinfo (`user:password@`), which could hold a secret.
fn without_userinfo(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) if scheme.is_empty() => rest[at + 1..].to_string(),
        Some(at) => format!("{scheme}://{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

/// A busy-poll window: `50 us`, or `off`.
fn poll(d: Duration) -> String {
    if d.is_zero() { "off".into() } else { format!("{} us", d.as_micros()) }
}

fn on_off(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

impl Config {
    /// What `check-config` prints for a valid configuration.
    pub fn report(&self) -> String {
        let mut r = String::new();
        let mut line = |key: &str, text: String| {
            let _ = writeln!(r, "{key:<10} {text}");
        };
        let create = if self.create_pool {
            format!(", created with {} if missing", size(self.pool_size))
        } else {
            String::new()
        };
        line("pool", format!("{}{create}", self.pool_path.display()));
        let tls = match &self.tls {
            Some(t) => {
                let mtls = t.client_ca.as_ref().map(|ca| format!(", client certificates from {}", ca.display()));
                format!("TLS (certificate {}{})", t.cert.display(), mtls.unwrap_or_default())
            }
            None if self.insecure_plaintext => "plaintext (insecure_plaintext)".into(),
            None => "plaintext".into(),
        };
        line("grpc", format!("{} {tls}, idle timeout {}", self.listen, dur(self.grpc_idle_timeout)));
        let auth = if self.principals.is_empty() {
            "no credentials: TCP clients have no access (the admin socket still works)".to_string()
        } else {
            let names: Vec<&str> = self.principals.names().iter().map(|n| &**n).collect();
            format!("{} principal(s): {}", names.len(), names.join(", "))
        };
        line("auth", auth);
        let admin = match (&self.admin_socket, &self.admin_group_name) {
            (None, _) => "off".to_string(),
            (Some(p), Some(g)) => format!("{} (group {g})", p.display()),
            (Some(p), None) => format!("{} (root and rdaxd's user only)", p.display()),
        };
        line("admin", admin);
        line(
            "dataplane",
            format!(
                "{} TLS {}, op timeout {}, idle timeout {}, busy poll {}",
                self.data_listen,
                on_off(self.data_tls),
                dur(self.data_op_timeout),
                dur(self.data_idle_timeout),
                poll(self.data_busy_poll)
            ),
        );
        let keys = format!("{:?}", self.rdma_keys).to_lowercase();
        let rdma = match self.rdma_listen {
            RdmaListen::Off => "off".to_string(),
            RdmaListen::At(a) if self.rdma_explicit => format!("{a}, keys {keys}"),
            RdmaListen::At(a) => format!("auto ({a} where a device serves it), keys {keys}"),
        };
        line("rdma", rdma);
        let nbd = match &self.nbd {
            None => "off".to_string(),
            Some(n) => format!(
                "{} TLS {}, exclusive leases for writers {}, principal {}, idle timeout {}, busy poll {}",
                n.listen,
                on_off(n.tls),
                on_off(n.exclusive),
                n.principal.as_deref().unwrap_or("from the client certificate"),
                dur(n.idle_timeout),
                poll(n.busy_poll)
            ),
        };
        line("nbd", nbd);
        line("metrics", self.metrics_listen.map_or("off".into(), |a| a.to_string()));
        let cluster = match &self.cluster {
            None => "off".to_string(),
            Some(c) => format!(
                "node {} under {} on {}, {} replica(s), {} placement groups",
                c.node_id,
                c.prefix,
                c.etcd.iter().map(|u| without_userinfo(u)).collect::<Vec<_>>().join(","),
                c.replicas,
                c.pgs
            ),
        };
        line("cluster", cluster);
        line("session", format!("TTL {}", dur(self.session_ttl)));
        line("lease", format!("TTL {}, break timeout {}", dur(self.lease_ttl), dur(self.lease_break_timeout)));
        let l = &self.limits;
        line(
            "limits",
            format!(
                "sessions {} ({} per principal), connections gRPC {} data {} ({} per source), leases {} \
                 ({} per session, {} per principal)",
                l.max_sessions,
                l.max_sessions_per_principal,
                l.max_grpc_connections,
                l.max_data_connections,
                l.max_connections_per_source,
                l.leases.total,
                l.leases.per_session,
                l.leases.per_principal
            ),
        );
        line("log", format!("{} ({})", self.log_level, format!("{:?}", self.log_format).to_lowercase()));
        line("shutdown", format!("within {}", dur(self.shutdown_timeout)));
        line("ports", self.ports_file.as_ref().map_or("not written".into(), |p| p.display().to_string()));
        for w in &self.warnings {
            line("warning", w.clone());
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_read_as_a_person_writes_them() {
        assert_eq!(size(1 << 30), "1 GiB");
        assert_eq!(size(64 << 20), "64 MiB");
        assert_eq!(size(4096), "4 KiB");
        assert_eq!(size(1000), "1000 B");
        assert_eq!(size((1 << 30) + 4096), "1048580 KiB");
        assert_eq!(dur(Duration::from_millis(250)), "250 ms");
        assert_eq!(dur(Duration::from_secs(30)), "30 s");
        assert_eq!(dur(Duration::from_secs(600)), "10 min");
        assert_eq!(dur(Duration::ZERO), "0 ms");
    }

    #[test]
    fn urls_lose_their_userinfo() {
        assert_eq!(without_userinfo("https://u:s3cret@etcd1:2379/x"), "https://etcd1:2379/x");
        assert_eq!(without_userinfo("u:s3cret@etcd1:2379"), "etcd1:2379");
        assert_eq!(without_userinfo("http://etcd1:2379/a@b"), "http://etcd1:2379/a@b");
        assert_eq!(without_userinfo("http://[::1]:2379"), "http://[::1]:2379");
    }
}
