//! `[cluster]`: membership of a cluster kept in etcd (off unless `etcd` is set).

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::{Args, ConfigError};

/// `[cluster]` as written.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(default)]
pub struct ClusterSection {
    /// etcd client URLs (`http://host:port`); unset: a single node, no cluster.
    pub etcd: Option<Vec<String>>,
    /// This node's name in the cluster.
    pub node_id: Option<String>,
    /// Copies of each object (1-3).
    pub replicas: Option<u8>,
    /// Placement groups: fixed by the cluster's first PG map.
    pub pgs: Option<u32>,
    /// TTL of the etcd lease the node's registration lives under (whole seconds).
    pub lease_ttl_ms: Option<u64>,
    /// Key prefix in etcd (several clusters can share one etcd).
    pub prefix: Option<String>,
    /// Host or address other nodes and cluster clients reach this one at (default: the
    /// listen addresses' own).
    pub advertise: Option<String>,
    /// File holding the token this node presents to other members when it copies from them
    /// (repair): a credential every member accepts with `read` on every namespace.
    pub peer_token_file: Option<std::path::PathBuf>,
    /// Bound on the rate at which this node copies data when it repairs (MiB/s; 0: none).
    pub repair_mib_per_s: Option<u64>,
    /// PEM file of the CA that signed etcd's server certificate: etcd over TLS (`https://`
    /// URLs).
    pub etcd_ca: Option<std::path::PathBuf>,
    /// PEM certificate this node presents to etcd (etcd's `--client-cert-auth`), with
    /// `etcd_key`.
    pub etcd_cert: Option<std::path::PathBuf>,
    /// PEM private key of `etcd_cert` (not world-readable).
    pub etcd_key: Option<std::path::PathBuf>,
    /// etcd user (etcd's `auth enable`), with `etcd_password_file`.
    pub etcd_user: Option<String>,
    /// File holding `etcd_user`'s password (not world-readable).
    pub etcd_password_file: Option<std::path::PathBuf>,
}

/// How this node reaches etcd beyond its URLs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdAccess {
    /// The CA's PEM (TLS on).
    pub ca_pem: Option<Vec<u8>>,
    /// The client certificate's PEM and its key.
    pub identity: Option<(Vec<u8>, super::Secret)>,
    /// User and password.
    pub user: Option<(String, super::Secret)>,
}

/// The cluster settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// etcd client URLs.
    pub etcd: Vec<String>,
    /// This node's id.
    pub node_id: String,
    /// Replication factor.
    pub replicas: u8,
    /// Placement groups, for the first PG map.
    pub pgs: u32,
    /// etcd lease TTL.
    pub lease_ttl: Duration,
    /// Key prefix, without a trailing `/`.
    pub prefix: String,
    /// Advertised host, if not the listen addresses'.
    pub advertise: Option<String>,
    /// The token presented to other members for repair copies.
    pub peer_token: Option<super::Secret>,
    /// Repair copy rate bound, bytes per second (0: none).
    pub repair_rate: u64,
    /// TLS and authentication for etcd.
    pub etcd_access: EtcdAccess,
}

impl Cluster {
    /// The etcd key of this node's registration.
    pub fn node_key(&self) -> String {
        format!("{}/nodes/{}", self.prefix, self.node_id)
    }

    /// How often the etcd lease is renewed: a quarter of its TTL.
    pub fn keepalive_interval(&self) -> Duration {
        self.lease_ttl / 4
    }

    /// How long after the send of the last renewal etcd acknowledged the node may still act
    /// as a member: three quarters of the TTL. etcd counts the TTL from when it received that
    /// renewal, which is later, so the node fences itself at least a quarter TTL before etcd
    /// can forget it; that quarter is the time to revoke its leases.
    pub fn member_for(&self) -> Duration {
        self.lease_ttl * 3 / 4
    }

    /// `host:port` others reach `addr` at.
    pub fn advertised(&self, addr: SocketAddr) -> String {
        match &self.advertise {
            Some(h) if h.contains(':') && !h.starts_with('[') => format!("[{h}]:{}", addr.port()),
            Some(h) => format!("{h}:{}", addr.port()),
            None => addr.to_string(),
        }
    }
}

fn valid_node_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// `[cluster]` from flags over the file; `None` without etcd endpoints.
pub(super) fn resolve(args: &Args, file: &ClusterSection, listen: SocketAddr) -> Result<Option<Cluster>, ConfigError> {
    let invalid = ConfigError::Invalid;
    let etcd = if args.etcd.is_empty() { file.etcd.clone().unwrap_or_default() } else { args.etcd.clone() };
    if etcd.is_empty() {
        let set =
            args.node_id.is_some() || args.replicas.is_some() || file.node_id.is_some() || file.replicas.is_some();
        return if set {
            Err(invalid(
                "cluster.node_id and cluster.replicas need cluster.etcd (--etcd URL): the cluster lives in etcd".into(),
            ))
        } else {
            Ok(None)
        };
    }
    if !cfg!(feature = "cluster") {
        return Err(invalid(
            "cluster.etcd is set but this rdaxd was built without cluster support: build it with \
             `--features cluster` (it needs protoc: scripts/install-deps.sh installs it)"
                .into(),
        ));
    }
    let tls = file.etcd_ca.is_some();
    for u in &etcd {
        let rest = match (u.strip_prefix("http://"), u.strip_prefix("https://")) {
            (Some(_), _) if tls => {
                return Err(invalid(format!(
                    "cluster.etcd `{u}`: cluster.etcd_ca is set, so give https:// URLs (etcd over TLS)"
                )));
            }
            (Some(r), _) => r,
            (_, Some(_)) if !tls => {
                return Err(invalid(format!(
                    "cluster.etcd `{u}`: an https:// URL needs cluster.etcd_ca, the PEM of the CA that signed \
                     etcd's certificate"
                )));
            }
            (_, Some(r)) => r,
            _ => {
                return Err(invalid(format!(
                    "cluster.etcd `{u}`: give a client URL like http://127.0.0.1:2379 (https:// with cluster.etcd_ca)"
                )));
            }
        };
        let host_port = rest.trim_end_matches('/');
        if host_port.is_empty() || host_port.contains('/') || !host_port.contains(':') {
            return Err(invalid(format!("cluster.etcd `{u}`: expected http://host:port or https://host:port")));
        }
    }
    let node_id =
        args.node_id.clone().or(file.node_id.clone()).ok_or_else(|| {
            invalid("cluster.etcd is set but cluster.node_id is not (--node-id): name this node".into())
        })?;
    if !valid_node_id(&node_id) {
        return Err(invalid(format!("cluster.node_id `{node_id}`: use 1-64 characters from A-Z a-z 0-9 . _ -")));
    }
    let replicas = args.replicas.or(file.replicas).unwrap_or(2);
    if !(1..=3).contains(&replicas) {
        return Err(invalid(format!("cluster.replicas must be 1, 2 or 3, not {replicas}")));
    }
    let ttl_ms = file.lease_ttl_ms.unwrap_or(10_000);
    if !(2_000..=300_000).contains(&ttl_ms) || !ttl_ms.is_multiple_of(1000) {
        return Err(invalid(format!(
            "cluster.lease_ttl_ms must be a whole number of seconds (etcd lease TTLs are) between 2000 and \
             300000, not {ttl_ms}"
        )));
    }
    let pgs = file.pgs.unwrap_or(128);
    if !(1..=4096).contains(&pgs) {
        return Err(invalid(format!("cluster.pgs must be between 1 and 4096, not {pgs}")));
    }
    let prefix = file.prefix.clone().unwrap_or_else(|| "/rdax".into());
    let prefix = prefix.trim_end_matches('/').to_string();
    if !prefix.starts_with('/') || prefix.len() < 2 {
        return Err(invalid(format!("cluster.prefix `{prefix}`: use an absolute key prefix such as /rdax")));
    }
    let advertise = file.advertise.clone();
    if advertise.is_none() && listen.ip().is_unspecified() {
        return Err(invalid(format!(
            "gRPC listens on {listen}, which other nodes cannot dial: set cluster.advertise to this host's \
             name or address"
        )));
    }
    let Some(peer) = &file.peer_token_file else {
        return Err(invalid(
            "cluster.peer_token_file is not set: members copy objects from each other when placement changes or \
             a node is lost, and this is the credential they present (a token every member accepts with `read` \
             on every namespace)"
                .into(),
        ));
    };
    let peer_token = Some(super::Secret::new(super::read_token_file(peer)?));
    let repair_rate = file.repair_mib_per_s.unwrap_or(64).saturating_mul(1 << 20);
    let etcd_access = etcd_access(file)?;
    Ok(Some(Cluster {
        etcd,
        node_id,
        replicas,
        pgs,
        lease_ttl: Duration::from_millis(ttl_ms),
        prefix,
        advertise,
        peer_token,
        repair_rate,
        etcd_access,
    }))
}

/// A file that holds a secret: not world-readable, read whole (a trailing newline dropped).
fn read_secret(p: &std::path::Path, what: &str) -> Result<super::Secret, ConfigError> {
    let s = super::credentials::read_private(p, what)?;
    let s = s.strip_suffix('\n').unwrap_or(&s).to_string();
    if s.is_empty() {
        return Err(ConfigError::Invalid(format!("{what} {} is empty", p.display())));
    }
    Ok(super::Secret::new(s))
}

fn etcd_access(file: &ClusterSection) -> Result<EtcdAccess, ConfigError> {
    let invalid = ConfigError::Invalid;
    let read = |p: &std::path::Path| std::fs::read(p).map_err(|source| ConfigError::Read { path: p.into(), source });
    let ca_pem = file.etcd_ca.as_deref().map(read).transpose()?;
    let identity = match (&file.etcd_cert, &file.etcd_key) {
        (None, None) => None,
        (Some(c), Some(k)) if ca_pem.is_some() => Some((read(c)?, read_secret(k, "cluster.etcd_key")?)),
        (Some(_), Some(_)) => {
            return Err(invalid("cluster.etcd_cert needs cluster.etcd_ca: a client certificate is TLS".into()));
        }
        _ => return Err(invalid("cluster.etcd_cert and cluster.etcd_key go together".into())),
    };
    let user = match (&file.etcd_user, &file.etcd_password_file) {
        (None, None) => None,
        (Some(u), Some(p)) if !u.is_empty() => Some((u.clone(), read_secret(p, "cluster.etcd_password_file")?)),
        _ => return Err(invalid("cluster.etcd_user and cluster.etcd_password_file go together".into())),
    };
    Ok(EtcdAccess { ca_pem, identity, user })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(etcd: &[&str], node: Option<&str>) -> Args {
        Args { etcd: etcd.iter().map(|s| s.to_string()).collect(), node_id: node.map(Into::into), ..Default::default() }
    }

    fn lo() -> SocketAddr {
        "127.0.0.1:7400".parse().unwrap()
    }

    #[test]
    fn without_etcd_there_is_no_cluster() {
        assert_eq!(resolve(&args(&[], None), &ClusterSection::default(), lo()).unwrap(), None);
        let e = resolve(&args(&[], Some("n1")), &ClusterSection::default(), lo()).unwrap_err().to_string();
        assert!(e.contains("need cluster.etcd"), "{e}");
    }

    #[cfg(feature = "cluster")]
    #[test]
    fn settings_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let tf = dir.path().join("peer.token");
        std::fs::write(&tf, "peer-token-0123456789abcdef").unwrap();
        std::fs::set_permissions(&tf, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let e = resolve(&args(&["http://127.0.0.1:2379"], Some("n")), &ClusterSection::default(), lo()).unwrap_err();
        assert!(e.to_string().contains("peer_token_file is not set"), "{e}");
        let file = ClusterSection { peer_token_file: Some(tf.clone()), ..Default::default() };
        let c = resolve(&args(&["http://127.0.0.1:2379"], Some("n-1.a_b")), &file, lo()).unwrap().unwrap();
        assert_eq!((c.replicas, c.lease_ttl, c.prefix.as_str()), (2, Duration::from_secs(10), "/rdax"));
        assert_eq!(c.node_key(), "/rdax/nodes/n-1.a_b");
        assert!(c.member_for() < c.lease_ttl && c.keepalive_interval() < c.member_for());
        let err = |a: Args, f: &ClusterSection, l: SocketAddr| resolve(&a, f, l).unwrap_err().to_string();
        assert!(err(args(&["http://h:1"], None), &file, lo()).contains("node_id is not"));
        assert!(err(args(&["http://h:1"], Some("bad id")), &file, lo()).contains("1-64 characters"));
        assert!(err(args(&["https://h:1"], Some("n")), &file, lo()).contains("needs cluster.etcd_ca"));
        assert!(err(args(&["h:1"], Some("n")), &file, lo()).contains("client URL"));
        let r4 = Args { replicas: Some(4), ..args(&["http://h:1"], Some("n")) };
        assert!(err(r4, &file, lo()).contains("1, 2 or 3"));
        let ttl = ClusterSection { lease_ttl_ms: Some(2500), ..file.clone() };
        assert!(err(args(&["http://h:1"], Some("n")), &ttl, lo()).contains("whole number of seconds"));
        let any: SocketAddr = "0.0.0.0:7400".parse().unwrap();
        assert!(err(args(&["http://h:1"], Some("n")), &file, any).contains("cluster.advertise"));
        let adv = ClusterSection { advertise: Some("fd00::5".into()), ..file.clone() };
        assert_eq!(c.peer_token.as_deref(), Some("peer-token-0123456789abcdef"));
        let c = resolve(&args(&["http://h:1"], Some("n")), &adv, any).unwrap().unwrap();
        assert_eq!(c.advertised(any), "[fd00::5]:7400");
    }

    #[cfg(feature = "cluster")]
    #[test]
    fn etcd_tls_and_authentication_are_checked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let put = |name: &str, text: &str, mode: u32| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            p
        };
        let peer = put("peer.token", "peer-token-0123456789abcdef", 0o600);
        let (ca, cert, key) = (put("ca.pem", "CA", 0o644), put("c.pem", "CERT", 0o644), put("c.key", "KEY", 0o600));
        let pw = put("pw", "s3cret\n", 0o640);
        let base = ClusterSection { peer_token_file: Some(peer), ..Default::default() };
        let https = args(&["https://h:1"], Some("n"));
        let full = ClusterSection {
            etcd_ca: Some(ca.clone()),
            etcd_cert: Some(cert.clone()),
            etcd_key: Some(key.clone()),
            etcd_user: Some("root".into()),
            etcd_password_file: Some(pw.clone()),
            ..base.clone()
        };
        let c = resolve(&https, &full, lo()).unwrap().unwrap();
        let a = &c.etcd_access;
        assert_eq!(a.ca_pem.as_deref(), Some(&b"CA"[..]));
        assert_eq!(a.identity.as_ref().map(|(c, k)| (&c[..], &**k)), Some((&b"CERT"[..], "KEY")));
        assert_eq!(a.user.as_ref().map(|(u, p)| (u.as_str(), &**p)), Some(("root", "s3cret")), "newline dropped");
        assert!(!format!("{c:?}").contains("s3cret") && !format!("{c:?}").contains("KEY"), "secrets are redacted");
        let err = |a: &Args, f: ClusterSection| resolve(a, &f, lo()).unwrap_err().to_string();
        let http = args(&["http://h:1"], Some("n"));
        assert!(err(&http, full.clone()).contains("give https:// URLs"));
        assert!(err(&https, ClusterSection { etcd_key: None, ..full.clone() }).contains("go together"));
        assert!(err(&https, ClusterSection { etcd_password_file: None, ..full.clone() }).contains("go together"));
        let open = put("pw-open", "s3cret", 0o644);
        let e = err(&https, ClusterSection { etcd_password_file: Some(open), ..full.clone() });
        assert!(e.contains("world-readable"), "{e}");
        let e = err(&http, ClusterSection { etcd_cert: Some(cert), etcd_key: Some(key), ..base.clone() });
        assert!(e.contains("needs cluster.etcd_ca"), "{e}");
        // Authentication alone, over plain HTTP, is allowed.
        let auth = ClusterSection { etcd_user: Some("u".into()), etcd_password_file: Some(pw), ..base };
        let c = resolve(&http, &auth, lo()).unwrap().unwrap();
        assert!(c.etcd_access.ca_pem.is_none() && c.etcd_access.user.is_some());
    }

    #[cfg(not(feature = "cluster"))]
    #[test]
    fn a_build_without_the_feature_says_how_to_get_it() {
        let e = resolve(&args(&["http://127.0.0.1:2379"], Some("n1")), &ClusterSection::default(), lo()).unwrap_err();
        assert!(e.to_string().contains("--features cluster"), "{e}");
    }
}
