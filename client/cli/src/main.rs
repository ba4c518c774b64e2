//! `rdaxctl` — the rdax command-line tool.
//!
//! Online commands talk to rdaxd over gRPC through the SDK; `mkpool` and `fsck` work on a
//! pool file or device directly (offline). Every command that prints accepts `--json`.

mod bench;
mod cluster;
mod cluster_objects;
mod offline;
mod online;
mod output;
mod volume;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub(crate) use output::Failure;

const EXIT_CODES: &str = "\
Exit status:
  0  success                        5  invalid argument or range
  1  fsck found damage              6  unauthenticated or not permitted
  2  usage or local error           7  daemon unavailable or unreachable
  3  not found                      8  pool full or a limit reached
  4  already exists                 9  other server error
                                    10 refused in the current state (in use, exclusively leased)";

#[derive(Parser, Debug)]
#[command(name = "rdaxctl", version, about = "Manage rdax pools, objects and sessions", after_help = EXIT_CODES)]
pub(crate) struct Cli {
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    json: bool,
    /// rdaxd address: http://HOST:PORT, https://HOST:PORT or unix:PATH. Default: a local
    /// daemon's admin socket (<state dir>/rdaxd.sock, then /var/lib/rdax/rdaxd.sock) if one
    /// exists, else http://127.0.0.1:7400.
    #[arg(long, global = true, env = "RDAX_ENDPOINT")]
    endpoint: Option<String>,
    /// File holding the bearer token (or set RDAX_TOKEN).
    #[arg(long, global = true, env = "RDAX_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// PEM CA bundle to trust for an https:// endpoint.
    #[arg(long, global = true, env = "RDAX_CA")]
    ca: Option<PathBuf>,
    /// PEM client certificate (with --key), for a daemon that requires one.
    #[arg(long, global = true, env = "RDAX_CERT", requires = "key")]
    cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, global = true, env = "RDAX_KEY", requires = "cert")]
    key: Option<PathBuf>,
    /// Data plane for leases: auto (RDMA when both sides can), tcp, or rdma.
    #[arg(long, global = true, env = "RDAX_TRANSPORT", value_enum, default_value_t = TransportArg::Auto)]
    transport: TransportArg,
    /// Local IP for the RDMA connection (default: chosen by routing).
    #[arg(long, global = true, env = "RDAX_RDMA_SOURCE")]
    rdma_source: Option<std::net::IpAddr>,
    /// TCP data plane: microseconds an operation polls for its reply before it sleeps, while
    /// replies come that quickly (0: never poll).
    #[arg(long, global = true, env = "RDAX_BUSY_POLL_US", default_value_t = 50,
          value_parser = clap::value_parser!(u64).range(0..=1000))]
    busy_poll_us: u64,
    /// A cluster's etcd: etcd://HOST:PORT[,HOST:PORT...] (etcds:// for etcd over TLS, with
    /// --etcd-ca). For `cluster` commands, and makes `put`, `get`, `ls`, `stat` and `rm` work
    /// on the whole cluster (routed by its PG map).
    #[arg(long, global = true, env = "RDAX_CLUSTER")]
    cluster: Option<String>,
    /// PEM file of the CA that signed etcd's certificate (etcds://).
    #[arg(long, global = true, env = "RDAX_ETCD_CA")]
    etcd_ca: Option<std::path::PathBuf>,
    /// PEM certificate to present to etcd (its --client-cert-auth), with --etcd-key.
    #[arg(long, global = true, env = "RDAX_ETCD_CERT")]
    etcd_cert: Option<std::path::PathBuf>,
    /// PEM key of --etcd-cert.
    #[arg(long, global = true, env = "RDAX_ETCD_KEY")]
    etcd_key: Option<std::path::PathBuf>,
    /// etcd user (etcd's `auth enable`), with --etcd-password-file.
    #[arg(long, global = true, env = "RDAX_ETCD_USER")]
    etcd_user: Option<String>,
    /// File holding --etcd-user's password (never on the command line).
    #[arg(long, global = true, env = "RDAX_ETCD_PASSWORD_FILE")]
    etcd_password_file: Option<std::path::PathBuf>,
    /// The cluster's etcd key prefix (its daemons' cluster.prefix).
    #[arg(long, global = true, env = "RDAX_CLUSTER_PREFIX", default_value = "/rdax")]
    cluster_prefix: String,
    #[command(subcommand)]
    cmd: Cmd,
}

/// `--transport`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TransportArg {
    /// RDMA when this build and the daemon can, else TCP.
    Auto,
    /// The TCP data plane.
    Tcp,
    /// RDMA or fail.
    Rdma,
}

impl Cli {
    /// Session options for the chosen transport.
    pub(crate) fn session_options(&self, name: &str) -> rdax_client::SessionOptions {
        rdax_client::SessionOptions {
            client_name: name.into(),
            transport: match self.transport {
                TransportArg::Auto => rdax_client::Transport::Auto,
                TransportArg::Tcp => rdax_client::Transport::Tcp,
                TransportArg::Rdma => rdax_client::Transport::Rdma,
            },
            rdma_source: self.rdma_source,
            busy_poll: std::time::Duration::from_micros(self.busy_poll_us),
            ..Default::default()
        }
    }
}

/// An object as `namespace/name`.
#[derive(Debug, Clone)]
pub(crate) struct ObjPath {
    ns: String,
    name: String,
}

fn parse_obj(s: &str) -> Result<ObjPath, String> {
    let (ns, name) = s.split_once('/').ok_or_else(|| format!("`{s}`: expected NAMESPACE/NAME"))?;
    rdaxd::pool::error::validate_ns(ns).map_err(|e| e.to_string())?;
    rdaxd::pool::error::validate_name(name).map_err(|e| e.to_string())?;
    Ok(ObjPath { ns: ns.into(), name: name.into() })
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create a pool (offline): a new file of --size bytes, or a whole device-DAX device.
    Mkpool {
        /// Pool file or /dev/daxX.Y.
        path: PathBuf,
        /// Size for a new file, e.g. 1G, 512MiB (ignored for device-DAX).
        #[arg(long, value_parser = rdaxd::config::parse_size, default_value = "1G")]
        size: u64,
        /// Overwrite an existing pool file or device contents (destroys them).
        #[arg(long)]
        force: bool,
        /// Object slots (default: one per 256 KiB of pool, at least 1024).
        #[arg(long)]
        max_objects: Option<u64>,
        /// Extent slots (default: one per 8 blocks, at least 4096).
        #[arg(long)]
        max_extents: Option<u64>,
    },
    /// Check a pool (offline, read-only): exit 0 if clean, 1 if damaged.
    Fsck {
        /// Pool file or /dev/daxX.Y.
        path: PathBuf,
    },
    /// Show what the daemon serves.
    Info,
    /// Show pool usage and fragmentation.
    Stats,
    /// Create an empty (sparse) object.
    Create {
        /// NAMESPACE/NAME.
        #[arg(value_parser = parse_obj)]
        object: ObjPath,
        /// Size, e.g. 64M.
        #[arg(long, value_parser = rdaxd::config::parse_size, default_value = "0")]
        size: u64,
    },
    /// List a namespace.
    Ls {
        /// Namespace.
        namespace: String,
    },
    /// Show an object.
    Stat {
        /// NAMESPACE/NAME.
        #[arg(value_parser = parse_obj)]
        object: ObjPath,
    },
    /// Delete an object.
    Rm {
        /// NAMESPACE/NAME.
        #[arg(value_parser = parse_obj)]
        object: ObjPath,
    },
    /// Change an object's size (grow is sparse; shrink frees blocks).
    #[command(alias = "truncate")]
    Resize {
        /// NAMESPACE/NAME.
        #[arg(value_parser = parse_obj)]
        object: ObjPath,
        /// New size, e.g. 1G.
        #[arg(value_parser = rdaxd::config::parse_size)]
        size: u64,
        /// Only grow: leave an object that is at least SIZE long as it is.
        #[arg(long)]
        grow_only: bool,
    },
    /// Deallocate a range (it reads zero afterwards; the size does not change).
    Punch {
        /// NAMESPACE/NAME.
        #[arg(value_parser = parse_obj)]
        object: ObjPath,
        /// First byte.
        #[arg(value_parser = rdaxd::config::parse_size)]
        offset: u64,
        /// Bytes.
        #[arg(value_parser = rdaxd::config::parse_size)]
        length: u64,
    },
    /// Upload: make the object hold the input (created if missing), or with --offset write
    /// into it at that offset, growing it as needed.
    Put {
        /// NAMESPACE/NAME.
        #[arg(value_parser = parse_obj)]
        object: ObjPath,
        /// Input file; `-` or absent for stdin.
        file: Option<PathBuf>,
        /// Write at this offset into the existing object instead of replacing its contents.
        #[arg(long, value_parser = rdaxd::config::parse_size)]
        offset: Option<u64>,
        /// Skip making the data durable before returning.
        #[arg(long)]
        no_persist: bool,
    },
    /// Download an object (or a range) to a file or stdout.
    Get {
        /// NAMESPACE/NAME.
        #[arg(value_parser = parse_obj)]
        object: ObjPath,
        /// Output file; `-` or absent for stdout.
        file: Option<PathBuf>,
        /// First byte.
        #[arg(long, value_parser = rdaxd::config::parse_size, default_value = "0")]
        offset: u64,
        /// Bytes (default: to the end).
        #[arg(long, value_parser = rdaxd::config::parse_size)]
        length: Option<u64>,
    },
    /// List sessions.
    Sessions,
    /// End a session now.
    Evict {
        /// Session id.
        session_id: String,
    },
    /// Open a session and keep it alive until interrupted (for demos, tests, and programs that
    /// move bytes themselves). Recalls and revocations of the session's leases are printed as
    /// JSON lines (`{"event": "lease_recalled", "lease_id": …, "reason": …}`); it exits when the
    /// session ends.
    HoldSession {
        /// Label shown to administrators.
        #[arg(long, default_value = "rdaxctl")]
        name: String,
        /// Write the session's secret (its data-plane credential, 32 hex digits) to this
        /// file, created with mode 0600; it must not exist yet.
        #[arg(long)]
        secret_file: Option<std::path::PathBuf>,
        /// Print the secret in the `session_opened` line (it is a credential: not for logs).
        #[arg(long)]
        print_secret: bool,
    },
    /// Block volumes, exported over NBD as NAMESPACE/NAME: create, ls, resize, rm.
    Volume {
        #[command(subcommand)]
        cmd: volume::VolumeCmd,
    },
    /// Leases: hold one (for demos and debugging), list, revoke.
    Lease {
        #[command(subcommand)]
        cmd: LeaseCmd,
    },
    /// Measure the daemon: unary ops/s and streamed put/get throughput.
    Bench(bench::BenchArgs),
    /// Data-plane bench through one lease (RDMA or TCP, per --transport): bandwidth with
    /// --depth operations in flight, or latency with --depth 1. Prints figures.
    LeaseBench(bench::LeaseBenchArgs),
    /// The cluster (with --cluster etcd://...): `status` and `mark-lost` (etcd only; no
    /// daemon is asked), and `bench`.
    Cluster {
        #[command(subcommand)]
        cmd: cluster::ClusterCmd,
    },
    /// Credentials for a principals file (`auth.principals_file`).
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Print shell completions.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// `rdaxctl token ...`.
#[derive(Subcommand, Debug)]
pub(crate) enum TokenCmd {
    /// Make a new random token (256 bits) for principal NAME. Prints the token once, and the
    /// lines to add to the principals file, which stores only the token's SHA-256. Offline: no
    /// daemon is asked.
    Create {
        /// The principal's name.
        name: String,
        /// PREFIX:RIGHTS, e.g. `a/:write` (rights read, write or admin; write includes read,
        /// admin both; the empty prefix `:admin` covers everything). Repeatable.
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
    },
}

/// `rdaxctl lease ...`.
#[derive(Subcommand, Debug)]
pub(crate) enum LeaseCmd {
    /// Open a session, acquire a lease, print its segments and keys, and hold it (renewing)
    /// until Ctrl-C or a recall (which it honours, then exits).
    Hold {
        /// NAMESPACE/NAME.
        #[arg(value_parser = parse_obj)]
        object: ObjPath,
        /// First byte.
        #[arg(long, value_parser = rdaxd::config::parse_size, default_value = "0")]
        offset: u64,
        /// Bytes (default: to the end of the object).
        #[arg(long, value_parser = rdaxd::config::parse_size)]
        length: Option<u64>,
        /// Grant read-write access (allocates holes); default read-only.
        #[arg(long)]
        rw: bool,
        /// Acquire for this existing session instead of opening one: for a program that made
        /// the session's RDMA connection itself (its own verbs code, HELLO with the secret
        /// from `hold-session --secret-file`) and needs keys bound to its queue pair. With
        /// --transport rdma the keys are RDMA keys. The session must be this principal's.
        #[arg(long)]
        session: Option<String>,
        /// An exclusive lease: every other holder of the range is recalled first, and no other
        /// lease is granted over it while this one is held (needs the write right).
        #[arg(long, conflicts_with = "session")]
        exclusive: bool,
    },
    /// List leases (all, or one session's).
    List {
        /// Only this session's.
        #[arg(long)]
        session: Option<String>,
    },
    /// Recall a lease now (revoked if not returned by the break deadline).
    Revoke {
        /// Lease id.
        lease_id: u64,
        /// Revoke at once, without a recall.
        #[arg(long)]
        immediate: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    let result = match &cli.cmd {
        Cmd::Mkpool { path, size, force, max_objects, max_extents } => {
            offline::mkpool(path, *size, *force, *max_objects, *max_extents, json)
        }
        Cmd::Fsck { path } => offline::fsck(path, json),
        Cmd::Token { cmd: TokenCmd::Create { name, scopes } } => offline::token_create(name, scopes, json),
        Cmd::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "rdaxctl",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Cmd::Cluster { cmd } => {
            match (&cli.cluster, tokio::runtime::Builder::new_current_thread().enable_all().build()) {
                (None, _) => Err(Failure::invalid(anyhow::anyhow!(
                    "`cluster` commands need --cluster etcd://HOST:PORT (or RDAX_CLUSTER)"
                ))),
                (Some(spec), Ok(rt)) => cluster::etcd_urls(spec).and_then(|urls| match cmd {
                    cluster::ClusterCmd::Bench(args) => rt.block_on(cluster_objects::bench(&cli, urls, args)),
                    cmd => rt.block_on(cluster::run(&cli, urls, cmd, json)),
                }),
                (Some(_), Err(e)) => Err(Failure::local(anyhow::anyhow!("start the async runtime: {e}"))),
            }
        }
        cmd if cli.cluster.is_some() => match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
            _ if !cluster_objects::is_cluster_command(cmd) => Err(Failure::invalid(anyhow::anyhow!(
                "with --cluster, rdaxctl runs `cluster`, `put`, `get`, `ls`, `stat` and `rm`; for other commands \
                 name one daemon with --endpoint and leave --cluster (RDAX_CLUSTER) unset"
            ))),
            Ok(rt) => cluster::etcd_urls(cli.cluster.as_deref().unwrap_or_default())
                .and_then(|urls| rt.block_on(cluster_objects::run(&cli, urls))),
            Err(e) => Err(Failure::local(anyhow::anyhow!("start the async runtime: {e}"))),
        },
        _ => match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
            Ok(rt) => rt.block_on(online::run(&cli)),
            Err(e) => Err(Failure::local(anyhow::anyhow!("start the async runtime: {e}"))),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => f.report(json),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn object_paths() {
        let o = parse_obj("ns/a/b c").unwrap();
        assert_eq!((o.ns.as_str(), o.name.as_str()), ("ns", "a/b c"));
        assert!(parse_obj("nonamespace").is_err());
        assert!(parse_obj("bad ns/x").is_err());
        assert!(parse_obj("ns/").is_err());
    }
}
