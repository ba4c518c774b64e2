//! Configuration: flags, then `RDAX_*` environment, then the TOML file, then defaults.
//!
//! Two types: [`Args`] + [`ConfigFile`] (what the user wrote, every field optional) and
//! [`Config`] (what the daemon runs with, validated, no `Option` where a default exists).
//! Unknown file keys are warnings at startup and errors for `rdaxd check-config`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod admin;
mod cluster;
mod credentials;
mod limits;
mod nbd;
mod report;
mod tls;

pub use admin::{AdminSection, group_gid};
pub use cluster::{Cluster, ClusterSection, EtcdAccess};
pub use credentials::{Secret, read_token_file};
use credentials::{principals_of, resolve_token};
pub use limits::{Limits, LimitsSection};
pub use nbd::{Nbd, NbdSection};
pub use tls::{TlsFiles, TlsSection};

/// Default gRPC address: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7400";
/// Default data-plane address: loopback only.
pub const DEFAULT_DATA_LISTEN: &str = "127.0.0.1:7401";
/// Default metrics address: loopback only.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:7402";
/// Default RDMA (rdma_cm) port when `rdma.listen` is `auto`.
pub const DEFAULT_RDMA_PORT: u16 = 7403;
/// Default size of the embedded pool file (sparse).
pub const DEFAULT_POOL_SIZE: u64 = 1 << 30;
/// System-wide config file, read when present and no `--config` is given.
pub const SYSTEM_CONFIG: &str = "/etc/rdax/rdaxd.toml";

const KEYS_HELP: &str = "\
Every flag has an RDAX_* environment variable and a config-file key (shown in [brackets]).
Precedence: flags > environment > config file > defaults. Durations are milliseconds.
Config file: --config, else /etc/rdax/rdaxd.toml if it exists. Example: deploy/rdaxd.toml.

Config keys without a flag:
  [pool] create = true          create the pool file on first start if it does not exist
  [auth] token = \"...\"          inline bearer token (prefer token_file; RDAX_TOKEN also works)
  [limits] max_sessions_per_principal = 1024  sessions of one principal
  [limits] max_leases_per_principal = 65536   live leases over one principal's sessions
  [limits] max_connections_per_source = 256   per listener, from one address
  [limits] max_keys_per_session = 65536       keys (RDMA: memory regions) of a session's leases
  [limits] max_rdma_bytes_per_session = \"1T\"  bytes a session may have registered for RDMA
  [limits] max_alloc_bytes_per_request = \"64G\" holes one read-write Acquire may fill
  [dataplane] busy_poll_us = 50   a connection whose operations follow its replies closely polls this long before it parks (0: never)
  [nbd] exclusive = true          writable NBD exports take exclusive leases
  [nbd] idle_timeout_ms = 600000  an NBD connection with no request for this long is closed
  [nbd] handshake_timeout_ms = 10000  bound on an NBD client's whole handshake
  [nbd] busy_poll_us = 50         a connection whose requests follow its replies closely polls this long before it parks (0: never)
  [cluster] lease_ttl_ms = 10000  TTL of the etcd lease the node's registration lives under
  [cluster] prefix = \"/rdax\"      etcd key prefix (clusters sharing one etcd use their own)
  [cluster] pgs = 128             placement groups, fixed by the cluster's first PG map
  [cluster] advertise = \"host\"    what other nodes dial (default: the listen addresses)
  [cluster] peer_token_file = PATH token presented to other members: repair, a primary's forwards (required)
  [cluster] repair_mib_per_s = 64 bound on this node's repair copy rate (0: none)
  [cluster] etcd_ca = PATH        etcd over TLS (https:// URLs): PEM of the CA of etcd's certificate
  [cluster] etcd_cert, etcd_key = PATH  client certificate for etcd's --client-cert-auth
  [cluster] etcd_user = NAME, etcd_password_file = PATH  etcd authentication (auth enable)

With no configuration at all, rdaxd creates (first start) or opens
  $STATE_DIRECTORY, $XDG_STATE_HOME/rdax, /var/lib/rdax (root) or ~/.local/state/rdax
    /default.pool (1 GiB, allocated on disk), serves gRPC on 127.0.0.1:7400 (no access
  without a credential) and on the admin socket <state dir>/rdaxd.sock (0600: root and
  rdaxd's own user are admin there, plus --admin-group's members; rdaxctl uses it by default).";

/// rdaxd — serve persistent memory to remote clients by direct memory access.
#[derive(clap::Parser, Debug, Default, Clone)]
#[command(name = "rdaxd", version, about, after_long_help = KEYS_HELP)]
pub struct Args {
    /// TOML config file.
    #[arg(long, env = "RDAX_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Pool: a file, or /dev/daxX.Y [pool.path] (default: <state dir>/default.pool).
    #[arg(long, env = "RDAX_POOL")]
    pub pool: Option<PathBuf>,
    /// Size of a pool file created on first start, e.g. 64G [pool.size] (default 1G).
    #[arg(long, env = "RDAX_POOL_SIZE", value_parser = parse_size)]
    pub pool_size: Option<u64>,
    /// Directory for the default pool [state_dir].
    #[arg(long, env = "RDAX_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// gRPC listen address [grpc.listen] (default 127.0.0.1:7400; port 0 picks one).
    #[arg(long, env = "RDAX_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// File holding the bearer token; must not be world-readable [auth.token_file].
    #[arg(long, env = "RDAX_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Principals file: names, token hashes and scopes [auth.principals_file].
    #[arg(long, env = "RDAX_PRINCIPALS_FILE")]
    pub principals_file: Option<PathBuf>,
    /// PEM certificate chain: serve gRPC over TLS [tls.cert].
    #[arg(long, env = "RDAX_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert [tls.key].
    #[arg(long, env = "RDAX_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle: require client certificates signed by it (mTLS) [tls.client_ca].
    #[arg(long, env = "RDAX_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve gRPC beyond loopback without TLS (logged loudly) [grpc.insecure_plaintext].
    #[arg(long, env = "RDAX_INSECURE_PLAINTEXT")]
    pub insecure_plaintext: bool,
    /// Admin Unix socket: local root, rdaxd's user and its group are admin there without a
    /// token [admin.socket] (default <state dir>/rdaxd.sock; "off" for none).
    #[arg(long, env = "RDAX_ADMIN_SOCKET")]
    pub admin_socket: Option<String>,
    /// Members of this group (name or gid) are admin on the admin socket too; without it, only
    /// root and rdaxd's own user are, and the socket is mode 0600 [admin.group].
    #[arg(long, env = "RDAX_ADMIN_GROUP")]
    pub admin_group: Option<String>,
    /// Removed: there is no anonymous access any more (see the admin socket).
    #[arg(long, hide = true)]
    pub allow_no_token: bool,
    /// Session TTL: a session without keepalives for this long expires [session.ttl_ms] (default 10000).
    #[arg(long, env = "RDAX_SESSION_TTL_MS")]
    pub session_ttl_ms: Option<u64>,
    /// Most open sessions [limits.max_sessions] (default 1024).
    #[arg(long, env = "RDAX_MAX_SESSIONS")]
    pub max_sessions: Option<usize>,
    /// Largest gRPC message, bytes [limits.max_message_bytes] (default 4 MiB).
    #[arg(long, env = "RDAX_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Most concurrent streams per connection [limits.max_concurrent_streams] (default 256).
    #[arg(long, env = "RDAX_MAX_CONCURRENT_STREAMS")]
    pub max_concurrent_streams: Option<u32>,
    /// Most open gRPC connections; more wait in the backlog [limits.max_grpc_connections] (default 1024).
    #[arg(long, env = "RDAX_MAX_GRPC_CONNECTIONS")]
    pub max_grpc_connections: Option<usize>,
    /// Most open data-plane connections [limits.max_data_connections] (default 1024).
    #[arg(long, env = "RDAX_MAX_DATA_CONNECTIONS")]
    pub max_data_connections: Option<usize>,
    /// Most live leases of one session [limits.max_leases_per_session] (default 4096).
    #[arg(long, env = "RDAX_MAX_LEASES_PER_SESSION")]
    pub max_leases_per_session: Option<usize>,
    /// Most leases in the daemon, live or draining [limits.max_leases] (default 65536).
    #[arg(long, env = "RDAX_MAX_LEASES")]
    pub max_leases: Option<usize>,
    /// Most segments (keys) in one lease [limits.max_segments_per_lease] (default 4096).
    #[arg(long, env = "RDAX_MAX_SEGMENTS_PER_LEASE")]
    pub max_segments_per_lease: Option<usize>,
    /// A gRPC connection with no request in progress for this long is closed [grpc.idle_timeout_ms] (default 60000).
    #[arg(long, env = "RDAX_GRPC_IDLE_TIMEOUT_MS")]
    pub grpc_idle_timeout_ms: Option<u64>,
    /// A data-plane connection with no operation for this long is closed [dataplane.idle_timeout_ms] (default 120000).
    #[arg(long, env = "RDAX_DATA_IDLE_TIMEOUT_MS")]
    pub data_idle_timeout_ms: Option<u64>,
    /// TCP data-plane listen address [dataplane.listen] (default 127.0.0.1:7401; port 0 picks one).
    #[arg(long, env = "RDAX_DATA_LISTEN")]
    pub data_listen: Option<SocketAddr>,
    /// Bound on each socket wait of a data-plane operation [dataplane.op_timeout_ms] (default 10000).
    #[arg(long, env = "RDAX_DATA_OP_TIMEOUT_MS")]
    pub data_op_timeout_ms: Option<u64>,
    /// Serve the TCP data plane over TLS too, with the [tls] certificate [dataplane.tls].
    #[arg(long, env = "RDAX_DATA_TLS")]
    pub data_tls: bool,
    /// RDMA (rdma_cm) address: `auto` (the data plane's IP, port 7403), `off`, or IP:PORT [rdma.listen] (default auto).
    #[arg(long, env = "RDAX_RDMA_LISTEN")]
    pub rdma_listen: Option<String>,
    /// How per-lease RDMA keys are made: auto, window or region [rdma.keys] (default auto).
    #[arg(long, env = "RDAX_RDMA_KEYS")]
    pub rdma_keys: Option<RdmaKeys>,
    /// Prometheus metrics address, or `off` [metrics.listen] (default 127.0.0.1:7402).
    #[arg(long, env = "RDAX_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Lease TTL: a lease not renewed for this long is revoked [lease.ttl_ms] (default 30000).
    #[arg(long, env = "RDAX_LEASE_TTL_MS")]
    pub lease_ttl_ms: Option<u64>,
    /// Time a holder has to return a recalled lease [lease.break_timeout_ms] (default 5000).
    #[arg(long, env = "RDAX_LEASE_BREAK_TIMEOUT_MS")]
    pub lease_break_timeout_ms: Option<u64>,
    /// Bound on finishing in-flight work at shutdown, from the signal [shutdown.timeout_ms] (default 10000).
    #[arg(long, env = "RDAX_SHUTDOWN_TIMEOUT_MS")]
    pub shutdown_timeout_ms: Option<u64>,
    /// Log format: text or json [log.format] (default text).
    #[arg(long, env = "RDAX_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Log filter, e.g. info or rdaxd=debug [log.level] (default info).
    #[arg(long, env = "RDAX_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Serve volumes over NBD at this address [nbd.listen] (default: no NBD server).
    #[arg(long, env = "RDAX_NBD_LISTEN")]
    pub nbd_listen: Option<SocketAddr>,
    /// The principal NBD clients act as (NBD has no credential of its own) [nbd.principal].
    #[arg(long, env = "RDAX_NBD_PRINCIPAL")]
    pub nbd_principal: Option<String>,
    /// Require TLS on NBD (NBD_OPT_STARTTLS) with the [tls] certificate [nbd.tls].
    #[arg(long, env = "RDAX_NBD_TLS")]
    pub nbd_tls: bool,
    /// Join the cluster kept in this etcd (client URL; repeat or comma-separate for several)
    /// [cluster.etcd] (default: a single node, no cluster).
    #[arg(long, env = "RDAX_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// This node's id in the cluster [cluster.node_id].
    #[arg(long, env = "RDAX_NODE_ID")]
    pub node_id: Option<String>,
    /// Copies of each object in the cluster, 1-3 [cluster.replicas] (default 2).
    #[arg(long, env = "RDAX_REPLICAS")]
    pub replicas: Option<u8>,
    /// Write the bound addresses here as JSON once listening [ports_file].
    #[arg(long, env = "RDAX_PORTS_FILE")]
    pub ports_file: Option<PathBuf>,
    /// What to do (default: run the daemon).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum Command {
    /// Validate the configuration (unknown keys are errors here) and print the result. Exit
    /// status 78 when it is invalid.
    CheckConfig {
        /// Print nothing when it is valid (for `ExecReload=`).
        #[arg(long)]
        quiet: bool,
    },
}

/// How per-lease RDMA keys are made.
#[derive(clap::ValueEnum, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum RdmaKeys {
    /// Windows when the device has type-2 memory windows, else regions.
    #[default]
    Auto,
    /// A type-2 memory window bound to the client's queue pair, over a region of the lease.
    Window,
    /// A memory region per lease in the client's protection domain.
    Region,
}

/// Where the RDMA transport listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RdmaListen {
    /// Not at all.
    Off,
    /// At this address.
    At(SocketAddr),
}

/// Log output format.
#[derive(clap::ValueEnum, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// A size in a config file: bytes, or a string like "64G".
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum SizeValue {
    /// Bytes.
    Bytes(u64),
    /// With a unit.
    Text(String),
}

/// The config file, as written.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(default)]
pub struct ConfigFile {
    /// Directory for the default pool.
    pub state_dir: Option<PathBuf>,
    /// Where to write bound addresses.
    pub ports_file: Option<PathBuf>,
    /// `[pool]`.
    pub pool: PoolSection,
    /// `[grpc]`.
    pub grpc: GrpcSection,
    /// `[auth]`.
    pub auth: AuthSection,
    /// `[session]`.
    pub session: SessionSection,
    /// `[limits]`.
    pub limits: LimitsSection,
    /// `[tls]`.
    pub tls: TlsSection,
    /// `[admin]`.
    pub admin: AdminSection,
    /// `[log]`.
    pub log: LogSection,
    /// `[shutdown]`.
    pub shutdown: ShutdownSection,
    /// `[dataplane]`.
    pub dataplane: DataplaneSection,
    /// `[lease]`.
    pub lease: LeaseSection,
    /// `[metrics]`.
    pub metrics: MetricsSection,
    /// `[rdma]`.
    pub rdma: RdmaSection,
    /// `[nbd]`.
    pub nbd: NbdSection,
    /// `[cluster]`.
    pub cluster: ClusterSection,
}

/// `[rdma]`.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(default)]
pub struct RdmaSection {
    /// "auto", "off" or an address.
    pub listen: Option<String>,
    /// Key kind.
    pub keys: Option<RdmaKeys>,
}

/// `[metrics]`.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(default)]
pub struct MetricsSection {
    /// Address, or "off".
    pub listen: Option<String>,
}

/// `[dataplane]`.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(default)]
pub struct DataplaneSection {
    /// Listen address.
    pub listen: Option<SocketAddr>,
    /// Operation timeout.
    pub op_timeout_ms: Option<u64>,
    /// Idle timeout.
    pub idle_timeout_ms: Option<u64>,
    /// Serve the data plane over TLS.
    pub tls: Option<bool>,
    /// How long a hot connection busy-polls for its next operation, µs (0: never).
    pub busy_poll_us: Option<u64>,
}

/// `[lease]`.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(default)]
pub struct LeaseSection {
    /// TTL.
    pub ttl_ms: Option<u64>,
    /// Break timeout.
    pub break_timeout_ms: Option<u64>,
}

/// `[pool]`.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(default)]
pub struct PoolSection {
    /// Pool file or device.
    pub path: Option<PathBuf>,
    /// Size of a pool file created on first start.
    pub size: Option<SizeValue>,
    /// Create the pool file if missing (default true; never formats a device).
    pub create: Option<bool>,
}

/// `[grpc]`.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(default)]
pub struct GrpcSection {
    /// Listen address.
    pub listen: Option<SocketAddr>,
    /// Serve beyond loopback without TLS.
    pub insecure_plaintext: Option<bool>,
    /// Idle timeout.
    pub idle_timeout_ms: Option<u64>,
}

/// `[auth]`.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(default)]
pub struct AuthSection {
    /// Inline token.
    pub token: Option<String>,
    /// Token file.
    pub token_file: Option<PathBuf>,
    /// Principals file.
    pub principals_file: Option<PathBuf>,
    /// Removed; refused when true (there is no anonymous access any more).
    pub allow_no_token: Option<bool>,
}

/// `[session]`.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(default)]
pub struct SessionSection {
    /// TTL in milliseconds.
    pub ttl_ms: Option<u64>,
}

/// `[log]`.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(default)]
pub struct LogSection {
    /// Format.
    pub format: Option<LogFormat>,
    /// Filter.
    pub level: Option<String>,
}

/// `[shutdown]`.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(default)]
pub struct ShutdownSection {
    /// Bound in milliseconds.
    pub timeout_ms: Option<u64>,
}

/// The validated configuration the daemon runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Pool path.
    pub pool_path: PathBuf,
    /// Size for a pool file created on first start.
    pub pool_size: u64,
    /// Create the pool file when missing.
    pub create_pool: bool,
    /// gRPC address.
    pub listen: SocketAddr,
    /// Bearer token, if any (its `Debug` shows no secret).
    pub token: Option<Secret>,
    /// Session TTL.
    pub session_ttl: Duration,
    /// Caps (`[limits]`).
    pub limits: Limits,
    /// Principals file, if any.
    pub principals_file: Option<PathBuf>,
    /// TLS for gRPC, if configured.
    pub tls: Option<TlsFiles>,
    /// gRPC beyond loopback without TLS, on purpose.
    pub insecure_plaintext: bool,
    /// Every credential: the principals file's, plus the token file's as the principal
    /// `admin` with every right. Empty: TCP clients have no access at all.
    pub principals: crate::auth::Principals,
    /// The admin Unix socket, unless "off".
    pub admin_socket: Option<PathBuf>,
    /// `admin.group` as written (looked up at start: [`Config::resolve_admin_group`]).
    pub admin_group_name: Option<String>,
    /// The group whose members are admin on the socket too (`None`: only root and rdaxd's user).
    pub admin_group: Option<u32>,
    /// Something the daemon should warn about at start (a setting it had to drop).
    pub warnings: Vec<String>,
    /// gRPC idle timeout.
    pub grpc_idle_timeout: Duration,
    /// Data-plane idle timeout.
    pub data_idle_timeout: Duration,
    /// Default bytes per streamed read chunk.
    pub read_chunk_bytes: usize,
    /// Bound on graceful shutdown.
    pub shutdown_timeout: Duration,
    /// Data-plane address.
    pub data_listen: SocketAddr,
    /// Data-plane operation timeout.
    pub data_op_timeout: Duration,
    /// The TCP data plane speaks TLS (with the gRPC certificate).
    pub data_tls: bool,
    /// Busy-poll window of a hot data-plane connection (default 50 µs; zero: never poll).
    pub data_busy_poll: Duration,
    /// Prometheus metrics address (`None`: off).
    pub metrics_listen: Option<SocketAddr>,
    /// RDMA listener.
    pub rdma_listen: RdmaListen,
    /// `rdma.listen` named an address (not `auto`): failing to serve RDMA is then a warning,
    /// not the expected outcome on a host without RDMA.
    pub rdma_explicit: bool,
    /// RDMA key kind.
    pub rdma_keys: RdmaKeys,
    /// Lease TTL.
    pub lease_ttl: Duration,
    /// Lease break timeout.
    pub lease_break_timeout: Duration,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter.
    pub log_level: String,
    /// The NBD server, if on.
    pub nbd: Option<Nbd>,
    /// Cluster membership, if configured.
    pub cluster: Option<Cluster>,
    /// Where to report bound addresses.
    pub ports_file: Option<PathBuf>,
    /// Config-file keys that were not recognised.
    pub unknown_keys: Vec<String>,
}

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Reading the file failed.
    #[error("failed to read config file {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("config file {path}: {message}")]
    Parse {
        /// File.
        path: PathBuf,
        /// Parser message.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("config: {0}")]
    Invalid(String),
}

/// Why a size did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// No number in front.
    #[error("`{0}` is not a size (examples: 4096, 64M, 1G)")]
    NotASize(String),
    /// A unit other than K, M, G, T.
    #[error("unknown size unit `{0}` (use K, M, G or T)")]
    Unit(String),
    /// More than 2^64 - 1 bytes.
    #[error("`{0}` does not fit in 64 bits")]
    TooLarge(String),
}

/// Parse a size: `4096`, `64K`, `512MiB`, `1G`, `2TiB` (binary multiples).
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| SizeError::NotASize(s.to_string()))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => return Err(SizeError::Unit(other.to_string())),
    };
    n.checked_mul(1u64 << shift).ok_or_else(|| SizeError::TooLarge(s.to_string()))
}

/// Read and parse a config file, collecting unknown keys.
pub fn read_file(path: &Path) -> Result<(ConfigFile, Vec<String>), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    let mut unknown = Vec::new();
    let de = toml::Deserializer::parse(&text)
        .map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })?;
    let file: ConfigFile = serde_ignored::deserialize(de, |p| unknown.push(p.to_string()))
        .map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })?;
    Ok((file, unknown))
}

/// The directory for the embedded default pool and the admin socket.
pub use rdax_proto::paths::default_state_dir;

impl Config {
    /// Merge flags (with environment) over the file over defaults, and validate.
    pub fn resolve(args: &Args) -> Result<Self, ConfigError> {
        let (file, unknown_keys) = match &args.config {
            Some(p) => read_file(p)?,
            None if Path::new(SYSTEM_CONFIG).exists() => read_file(Path::new(SYSTEM_CONFIG))?,
            None => (ConfigFile::default(), Vec::new()),
        };
        let invalid = |m: String| ConfigError::Invalid(m);
        let state_dir = args.state_dir.clone().or(file.state_dir.clone()).unwrap_or_else(default_state_dir);
        let pool_path = args.pool.clone().or(file.pool.path.clone()).unwrap_or_else(|| state_dir.join("default.pool"));
        let pool_size = match (args.pool_size, &file.pool.size) {
            (Some(s), _) => s,
            (None, Some(SizeValue::Bytes(b))) => *b,
            (None, Some(SizeValue::Text(t))) => parse_size(t).map_err(|e| invalid(format!("pool.size: {e}")))?,
            (None, None) => DEFAULT_POOL_SIZE,
        };
        let listen = args.listen.or(file.grpc.listen).unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default"));
        let token = resolve_token(args, &file)?;
        let principals_file = args.principals_file.clone().or(file.auth.principals_file.clone());
        let principals = principals_of(principals_file.as_deref(), token.as_deref())?;
        let tls = tls::resolve(args, &file.tls)?;
        let insecure_plaintext = args.insecure_plaintext || file.grpc.insecure_plaintext.unwrap_or(false);
        if args.allow_no_token || file.auth.allow_no_token == Some(true) {
            return Err(invalid(
                "auth.allow_no_token (--allow-no-token) is gone: rdaxd no longer serves anyone without a \
                 credential. Local administrators use the admin socket (admin.socket); remote clients need \
                 a token (auth.token_file or auth.principals_file) or a client certificate"
                    .into(),
            ));
        }
        if tls.is_none() && !listen.ip().is_loopback() && !insecure_plaintext {
            return Err(invalid(format!(
                "refusing to serve gRPC on {listen} without TLS: set tls.cert and tls.key (--tls-cert, --tls-key), \
                 or pass --insecure-plaintext if the network is trusted"
            )));
        }
        let nbd = nbd::resolve(args, &file.nbd, &principals, insecure_plaintext, tls.as_ref())?;
        let cluster = cluster::resolve(args, &file.cluster, listen)?;
        let (admin_socket, admin_warning) = admin::resolve(args, &file.admin, &state_dir)?;
        let admin_group_name = admin::group_name(args, &file.admin);
        let data_tls = args.data_tls || file.dataplane.tls.unwrap_or(false);
        if data_tls && tls.is_none() {
            return Err(invalid(
                "dataplane.tls (--data-tls) uses the gRPC certificate: set tls.cert and tls.key too".into(),
            ));
        }
        let ttl_ms = args.session_ttl_ms.or(file.session.ttl_ms).unwrap_or(10_000);
        if !(100..=3_600_000).contains(&ttl_ms) {
            return Err(invalid(format!("session.ttl_ms must be between 100 and 3600000, not {ttl_ms}")));
        }
        let limits = Limits::resolve(args, &file.limits)?;
        let shutdown_ms = args.shutdown_timeout_ms.or(file.shutdown.timeout_ms).unwrap_or(10_000);
        let data_listen = args
            .data_listen
            .or(file.dataplane.listen)
            .unwrap_or_else(|| DEFAULT_DATA_LISTEN.parse().expect("valid default"));
        let metrics = args
            .metrics_listen
            .clone()
            .or(file.metrics.listen.clone())
            .unwrap_or_else(|| DEFAULT_METRICS_LISTEN.into());
        let metrics_listen = match metrics.as_str() {
            "off" => None,
            a => Some(
                a.parse::<SocketAddr>()
                    .map_err(|e| invalid(format!("metrics.listen `{a}`: {e} (an address or \"off\")")))?,
            ),
        };
        let rdma = args.rdma_listen.clone().or(file.rdma.listen.clone()).unwrap_or_else(|| "auto".into());
        let rdma_listen = match rdma.as_str() {
            "off" => RdmaListen::Off,
            "auto" => RdmaListen::At(SocketAddr::new(
                data_listen.ip(),
                if data_listen.port() == 0 { 0 } else { DEFAULT_RDMA_PORT },
            )),
            a => RdmaListen::At(
                a.parse::<SocketAddr>()
                    .map_err(|e| invalid(format!("rdma.listen `{a}`: {e} (an address, \"auto\" or \"off\")")))?,
            ),
        };
        let op_ms = args.data_op_timeout_ms.or(file.dataplane.op_timeout_ms).unwrap_or(10_000);
        let lease_ttl_ms = args.lease_ttl_ms.or(file.lease.ttl_ms).unwrap_or(30_000);
        let break_ms = args.lease_break_timeout_ms.or(file.lease.break_timeout_ms).unwrap_or(5_000);
        let grpc_idle_ms = args.grpc_idle_timeout_ms.or(file.grpc.idle_timeout_ms).unwrap_or(60_000);
        let data_idle_ms = args.data_idle_timeout_ms.or(file.dataplane.idle_timeout_ms).unwrap_or(120_000);
        for (name, v) in [
            ("dataplane.op_timeout_ms", op_ms),
            ("lease.ttl_ms", lease_ttl_ms),
            ("lease.break_timeout_ms", break_ms),
            ("grpc.idle_timeout_ms", grpc_idle_ms),
            ("dataplane.idle_timeout_ms", data_idle_ms),
        ] {
            if !(10..=3_600_000).contains(&v) {
                return Err(invalid(format!("{name} must be between 10 and 3600000, not {v}")));
            }
        }
        let data_poll_us = file.dataplane.busy_poll_us.unwrap_or(crate::busy_poll::DEFAULT_WINDOW.as_micros() as u64);
        if data_poll_us > 1000 {
            return Err(invalid(format!(
                "dataplane.busy_poll_us must be between 0 (off) and 1000, not {data_poll_us}"
            )));
        }
        let log_level = args.log_level.clone().or(file.log.level.clone()).unwrap_or_else(|| "info".into());
        // The same check the daemon's log setup makes, so that check-config catches it.
        tracing_subscriber::EnvFilter::try_new(&log_level)
            .map_err(|e| invalid(format!("log.level `{log_level}` is not a valid filter: {e}")))?;
        Ok(Self {
            pool_path,
            pool_size,
            create_pool: file.pool.create.unwrap_or(true),
            listen,
            token,
            session_ttl: Duration::from_millis(ttl_ms),
            limits,
            principals_file,
            principals,
            admin_socket,
            admin_group_name,
            admin_group: None,
            warnings: admin_warning.into_iter().collect(),
            tls,
            insecure_plaintext,
            grpc_idle_timeout: Duration::from_millis(grpc_idle_ms),
            data_idle_timeout: Duration::from_millis(data_idle_ms),
            // Leave room for the message envelope inside the message limit.
            read_chunk_bytes: (limits.max_message_bytes - 4096).min(1 << 20),
            shutdown_timeout: Duration::from_millis(shutdown_ms),
            data_listen,
            data_op_timeout: Duration::from_millis(op_ms),
            data_tls,
            data_busy_poll: Duration::from_micros(data_poll_us),
            metrics_listen,
            rdma_listen,
            rdma_explicit: !matches!(rdma.as_str(), "auto" | "off"),
            rdma_keys: args.rdma_keys.or(file.rdma.keys).unwrap_or_default(),
            lease_ttl: Duration::from_millis(lease_ttl_ms),
            lease_break_timeout: Duration::from_millis(break_ms),
            log_format: args.log_format.or(file.log.format).unwrap_or_default(),
            log_level,
            nbd,
            cluster,
            ports_file: args.ports_file.clone().or(file.ports_file.clone()),
            unknown_keys,
        })
    }

    /// Look `admin.group` up (at start, where the group must exist).
    pub fn resolve_admin_group(&mut self) -> Result<(), ConfigError> {
        self.admin_group = match &self.admin_group_name {
            Some(name) => Some(admin::group_gid(name)?),
            None => None,
        };
        Ok(())
    }

    /// Why `admin.group` could not be used on this host, if it could not (for `check-config`,
    /// which does not fail on it).
    pub fn admin_group_problem(&self) -> Option<String> {
        let name = self.admin_group_name.as_ref()?;
        admin::group_gid(name).err().map(|e| e.to_string())
    }

    /// Keepalive interval clients are told to use: a third of the TTL.
    pub fn keepalive_interval(&self) -> Duration {
        self.session_ttl / 3
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn cli_definition_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn flags_win_over_the_file_and_unknown_keys_are_collected() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("rdaxd.toml");
        std::fs::write(
            &cfg,
            "state_dir = \"/s\"\n[pool]\nsize = \"2G\"\nbogus = 1\n[grpc]\nlisten = \"127.0.0.1:9\"\n[session]\nttl_ms = 5000\n[typo]\nx = 1\n",
        )
        .unwrap();
        let args = Args::parse_from(["rdaxd", "--config", cfg.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
        let c = Config::resolve(&args).unwrap();
        assert_eq!(c.listen.port(), 0, "flag wins");
        assert_eq!(c.pool_size, 2 << 30);
        assert_eq!(c.pool_path, PathBuf::from("/s/default.pool"));
        assert_eq!(c.session_ttl, Duration::from_secs(5));
        assert_eq!(c.unknown_keys, vec!["pool.bogus".to_string(), "typo".to_string()]);
    }

    #[test]
    fn unsafe_settings_are_refused() {
        let args = Args::parse_from(["rdaxd", "--listen", "0.0.0.0:7400", "--state-dir", "/tmp/x"]);
        let e = Config::resolve(&args).unwrap_err().to_string();
        assert!(e.contains("without TLS") && e.contains("--insecure-plaintext"), "{e}");
        // Beyond loopback without a credential is harmless now (TCP callers get nothing).
        let args =
            Args::parse_from(["rdaxd", "--listen", "0.0.0.0:7400", "--insecure-plaintext", "--state-dir", "/tmp/x"]);
        let c = Config::resolve(&args).unwrap();
        assert!(c.principals.is_empty());
        assert_eq!(c.admin_socket, Some(PathBuf::from("/tmp/x/rdaxd.sock")));
        // The removed anonymous mode is refused with an explanation, flag or key.
        let args = Args::parse_from(["rdaxd", "--allow-no-token", "--state-dir", "/tmp/x"]);
        let e = Config::resolve(&args).unwrap_err().to_string();
        assert!(e.contains("allow_no_token") && e.contains("admin socket"), "{e}");
        let long = format!("/tmp/{}/rdaxd.sock", "d".repeat(120));
        let args = Args::parse_from(["rdaxd", "--admin-socket", &long, "--state-dir", "/tmp/x"]);
        let e = Config::resolve(&args).unwrap_err().to_string();
        assert!(e.contains("at most 107"), "{e}");
        // A default that would be too long is dropped with a warning, not a refusal to start.
        let deep = format!("/tmp/{}", "d".repeat(120));
        let c = Config::resolve(&Args::parse_from(["rdaxd", "--state-dir", &deep])).unwrap();
        assert_eq!(c.admin_socket, None);
        assert!(c.warnings[0].contains("without an admin socket"), "{:?}", c.warnings);
        let args = Args::parse_from(["rdaxd", "--admin-socket", "off", "--state-dir", "/tmp/x"]);
        assert_eq!(Config::resolve(&args).unwrap().admin_socket, None);
        let args = Args::parse_from(["rdaxd", "--tls-cert", "/x.pem", "--state-dir", "/tmp/x"]);
        assert!(Config::resolve(&args).unwrap_err().to_string().contains("go together"));
        let dir = tempfile::tempdir().unwrap();
        let tf = dir.path().join("token");
        std::fs::write(&tf, "0123456789abcdef0123").unwrap();
        std::fs::set_permissions(&tf, std::fs::Permissions::from_mode(0o644)).unwrap();
        let args = Args::parse_from(["rdaxd", "--token-file", tf.to_str().unwrap(), "--state-dir", "/tmp/x"]);
        assert!(Config::resolve(&args).unwrap_err().to_string().contains("world-readable"));
        std::fs::set_permissions(&tf, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = Config::resolve(&args).unwrap();
        assert_eq!(c.token.as_deref(), Some("0123456789abcdef0123"));
        // Neither a debug dump (a log line) nor what check-config prints shows the secret.
        let shown = format!("{c:#?}");
        assert!(!shown.contains("0123456789abcdef0123") && shown.contains("<redacted>"), "{shown}");
        let report = c.report();
        assert!(!report.contains("0123456789abcdef0123") && report.contains("principal(s): admin"), "{report}");
        let args = Args::parse_from(["rdaxd", "--session-ttl-ms", "5", "--state-dir", "/tmp/x"]);
        assert!(Config::resolve(&args).is_err());
        // A log filter the daemon would refuse at start is refused here already.
        let args = Args::parse_from(["rdaxd", "--log-level", "rdaxd=loud", "--state-dir", "/tmp/x"]);
        let e = Config::resolve(&args).unwrap_err().to_string();
        assert!(e.contains("log.level"), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
