//! Commands that talk to rdaxd.

use std::io::IsTerminal;
use std::sync::Arc;

use anyhow::Context;
use rdax_client::{Client, ConnectOptions, ObjectStat, Progress, SessionNotice};
use serde_json::{Value, json};

use crate::output::{emit, human};
use crate::{Cli, Cmd, Failure, ObjPath};

/// Below this, no progress bar.
const PROGRESS_MIN: u64 = 8 << 20;

pub(crate) async fn connect(cli: &Cli) -> Result<Client, Failure> {
    Ok(Client::connect(endpoint(cli), connect_options(cli)?).await?)
}

/// The token and TLS options from the command line and environment.
pub(crate) fn connect_options(cli: &Cli) -> Result<ConnectOptions, Failure> {
    let token = match (&cli.token_file, std::env::var("RDAX_TOKEN").ok().filter(|t| !t.is_empty())) {
        (Some(f), _) => Some(rdaxd::config::read_token_file(f).map_err(|e| Failure::local(e.into()))?),
        (None, t) => t,
    };
    let tls = match &cli.ca {
        Some(ca) => {
            let identity = cli.cert.as_deref().zip(cli.key.as_deref());
            Some(rdax_client::TlsOptions::from_files(ca, identity).map_err(|e| Failure::local(e.into()))?)
        }
        None if cli.cert.is_some() => {
            return Err(Failure::local(anyhow::anyhow!(
                "--cert needs --ca (the CA that signed the daemon's certificate)"
            )));
        }
        None => None,
    };
    Ok(ConnectOptions { token, tls, ..Default::default() })
}

/// `--endpoint`, else the first local admin socket that exists, else the default TCP port.
pub(crate) fn endpoint(cli: &Cli) -> String {
    if let Some(e) = &cli.endpoint {
        return e.clone();
    }
    let found = rdax_proto::paths::admin_socket_candidates().into_iter().find(|p| {
        use std::os::unix::fs::FileTypeExt;
        std::fs::metadata(p).is_ok_and(|m| m.file_type().is_socket())
    });
    match found {
        Some(p) => format!("unix:{}", p.display()),
        None => "http://127.0.0.1:7400".into(),
    }
}

pub(crate) fn stat_json(s: &ObjectStat) -> Value {
    json!({
        "id": s.id, "namespace": s.namespace, "name": s.name, "size": s.size,
        "allocated_bytes": s.allocated_bytes, "extents": s.extents, "created_unix_ns": s.created_unix_ns,
        "volume": s.volume, "nbd_clients": s.nbd_clients,
    })
}

/// A listed lease's mode by name (`read`, `read-write`), as `lease hold --rw` speaks of it.
fn lease_mode(mode: i32) -> &'static str {
    match rdax_proto::pb::LeaseMode::try_from(mode) {
        Ok(rdax_proto::pb::LeaseMode::Read) => "read",
        Ok(rdax_proto::pb::LeaseMode::ReadWrite) => "read-write",
        _ => "unknown",
    }
}

/// `ls` output: JSON stats, or size, allocated bytes and name per line.
pub(crate) fn ls_emit(json: bool, all: &[ObjectStat]) {
    let v: Vec<Value> = all.iter().map(stat_json).collect();
    emit(json, &v, || {
        all.iter()
            .map(|s| format!("{:>12}  {:>12}  {}", s.size, s.allocated_bytes, s.name))
            .collect::<Vec<_>>()
            .join("\n")
    });
}

pub(crate) fn stat_text(s: &ObjectStat) -> String {
    format!(
        "{}/{}\n  id         {}\n  size       {} ({} bytes)\n  allocated  {} in {} extents",
        s.namespace,
        s.name,
        s.id,
        human(s.size),
        s.size,
        human(s.allocated_bytes),
        s.extents
    )
}

fn progress_bar(total: Option<u64>) -> (Option<indicatif::ProgressBar>, Option<Progress>) {
    if !std::io::stderr().is_terminal() || total.is_some_and(|t| t < PROGRESS_MIN) {
        return (None, None);
    }
    let bar = match total {
        Some(t) => indicatif::ProgressBar::new(t),
        None => indicatif::ProgressBar::no_length(),
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bytes}/{total_bytes} {wide_bar} {binary_bytes_per_sec} eta {eta}")
            .expect("valid template"),
    );
    let b = bar.clone();
    (Some(bar), Some(Arc::new(move |n| b.set_position(n))))
}

pub(crate) async fn run(cli: &Cli) -> Result<(), Failure> {
    let json = cli.json;
    if let Cmd::Bench(args) = &cli.cmd {
        let client = connect(cli).await?;
        return crate::bench::run(cli, &client, args, json).await;
    }
    if let Cmd::LeaseBench(args) = &cli.cmd {
        let client = connect(cli).await?;
        return crate::bench::lease_bench(cli, &client, args, json).await;
    }
    let client = connect(cli).await?;
    let obj = |o: &ObjPath| client.object(&o.ns, &o.name).map_err(Failure::from);
    match &cli.cmd {
        Cmd::Info => {
            let i = client.info().await?;
            let v = json!({
                "path": i.path, "mode": i.mode, "persistence": i.persistence, "uuid": i.uuid,
                "format_version": i.format_version, "pool_size": i.pool_size, "block_size": i.block_size,
                "data_blocks": i.data_blocks, "max_objects": i.max_objects, "max_extents": i.max_extents,
                "replayed_transaction": i.replayed_transaction, "previous_shutdown_clean": i.previous_shutdown_clean,
                "server_version": i.server_version, "nbd_endpoint": i.nbd_endpoint,
                "rdma": i.rdma.as_ref().map(|r| json!({
                    "state": r.state, "detail": r.detail, "endpoint": r.endpoint, "keys": r.keys, "device": r.device,
                })),
            });
            let nbd =
                if i.nbd_endpoint.is_empty() { "off".to_string() } else { format!("serving on {}", i.nbd_endpoint) };
            let r = i.rdma.clone().unwrap_or_default();
            let rdma = match r.state.as_str() {
                "serving" => format!("serving on {} ({}, keys: {})", r.endpoint, r.device, r.keys),
                "" => "unknown (older rdaxd)".into(),
                st => format!("{st}: {}", r.detail),
            };
            emit(json, &v, || {
                format!(
                    "pool        {}\nuuid        {}\nmode        {} (persistence: {})\nsize        {} ({} data blocks)\ncapacity    {} objects, {} extents\nlast stop   {}\nrdaxd       {}\nrdma        {rdma}\nnbd         {nbd}",
                    i.path,
                    i.uuid,
                    i.mode,
                    i.persistence,
                    human(i.pool_size),
                    i.data_blocks,
                    i.max_objects,
                    i.max_extents,
                    if i.previous_shutdown_clean { "clean" } else { "unclean (recovered)" },
                    i.server_version
                )
            });
        }
        Cmd::Stats => {
            let s = client.stats().await?;
            let v = json!({
                "objects": s.objects, "extents": s.extents, "data_blocks": s.data_blocks, "used_blocks": s.used_blocks,
                "held_blocks": s.held_blocks, "quarantined_blocks": s.quarantined_blocks,
                "free_blocks": s.free_blocks, "free_extents": s.free_extents,
                "largest_free_blocks": s.largest_free_blocks, "free_huge_runs": s.free_huge_runs,
                "fragmentation": s.fragmentation, "sessions": s.sessions,
            });
            emit(json, &v, || {
                let mut text = format!(
                    "objects        {} ({} extents)\nused           {} of {}\nfree           {} in {} extents (largest {}), {} free 2 MiB runs\nfragmentation  {:.1} %\nsessions       {}",
                    s.objects,
                    s.extents,
                    human(s.used_blocks * 4096),
                    human(s.data_blocks * 4096),
                    human(s.free_blocks * 4096),
                    s.free_extents,
                    human(s.largest_free_blocks * 4096),
                    s.free_huge_runs,
                    s.fragmentation * 100.0,
                    s.sessions
                );
                if s.held_blocks > 0 {
                    text +=
                        &format!("\nheld           {} (freed, waiting for DMA to drain)", human(s.held_blocks * 4096));
                }
                if s.quarantined_blocks > 0 {
                    text += &format!(
                        "\nquarantined    {} (an RDMA teardown failed; reused only after a restart)",
                        human(s.quarantined_blocks * 4096)
                    );
                }
                text
            });
        }
        Cmd::Create { object, size } => {
            let s = obj(object)?.create(*size).await?;
            emit(json, &stat_json(&s), || format!("created {}/{} ({})", s.namespace, s.name, human(s.size)));
        }
        Cmd::Ls { namespace } => {
            ls_emit(json, &client.list_all(namespace).await?);
        }
        Cmd::Stat { object } => {
            let s = obj(object)?.stat().await?;
            emit(json, &stat_json(&s), || stat_text(&s));
        }
        Cmd::Rm { object } => {
            obj(object)?.delete().await?;
            emit(json, &json!({"deleted": format!("{}/{}", object.ns, object.name)}), || {
                format!("deleted {}/{}", object.ns, object.name)
            });
        }
        Cmd::Resize { object, size, grow_only } => {
            let o = obj(object)?;
            let s = if *grow_only { o.grow(*size).await? } else { o.resize(*size).await? };
            emit(json, &stat_json(&s), || format!("{}/{} is now {}", s.namespace, s.name, human(s.size)));
        }
        Cmd::Punch { object, offset, length } => {
            obj(object)?.punch_hole(*offset, *length).await?;
            let v = json!({"object": format!("{}/{}", object.ns, object.name), "offset": offset, "length": length});
            emit(json, &v, || format!("punched [{offset}, +{length}) in {}/{}", object.ns, object.name));
        }
        Cmd::Put { object, file, offset, no_persist } => {
            put(&obj(object)?, file.as_deref(), *offset, !no_persist, json).await?
        }
        Cmd::Get { object, file, offset, length } => {
            get(&obj(object)?, file.as_deref(), *offset, *length, json).await?
        }
        Cmd::Sessions => {
            let list = client.sessions().await?;
            let v: Vec<Value> = list
                .iter()
                .map(|s| {
                    json!({"session_id": s.session_id, "principal": s.principal, "client_name": s.client_name, "peer": s.peer,
                       "opened_unix_ms": s.opened_unix_ms, "idle_ms": s.idle_ms, "connected": s.connected})
                })
                .collect();
            emit(json, &v, || {
                list.iter()
                    .map(|s| {
                        format!(
                            "{}  {:<12} {:<16} {:<22} idle {:>6} ms{}",
                            s.session_id,
                            s.principal,
                            s.client_name,
                            s.peer,
                            s.idle_ms,
                            if s.connected { "" } else { "  (detached)" }
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Cmd::Evict { session_id } => {
            client.evict_session(session_id, "rdaxctl evict").await?;
            emit(json, &json!({"evicted": session_id}), || format!("evicted {session_id}"));
        }
        Cmd::HoldSession { name, secret_file, print_secret } => {
            let mut s = client.open_session(name).await?;
            if let Some(path) = secret_file {
                write_secret(path, &s.secret().expose_hex())?;
            }
            // One JSON line (not pretty-printed): what follows is one line per event too.
            let mut opened =
                json!({"event": "session_opened", "session_id": s.id(), "ttl_ms": s.ttl().as_millis() as u64});
            if *print_secret {
                opened["session_secret"] = json!(s.secret().expose_hex());
            }
            if json {
                println!("{opened}");
            } else {
                println!("session {} open (ttl {:?}); Ctrl-C to close", s.id(), s.ttl());
            }
            // Stay up across recalls of the session's leases (a program of its own may hold
            // them, e.g. a verbs client keyed by `lease hold --session`): print each notice as
            // a JSON line for it to act on, and end only with the session.
            loop {
                let n = tokio::select! {
                    _ = tokio::signal::ctrl_c() => { s.close().await?; return Ok(()); }
                    n = s.next_notice() => n,
                };
                let why = match n {
                    Some(SessionNotice::LeaseRecalled { lease_id, reason }) => {
                        println!("{}", json!({"event": "lease_recalled", "lease_id": lease_id, "reason": reason}));
                        continue;
                    }
                    Some(SessionNotice::LeaseRevoked { lease_id, reason }) => {
                        println!("{}", json!({"event": "lease_revoked", "lease_id": lease_id, "reason": reason}));
                        continue;
                    }
                    Some(SessionNotice::Ended(r)) | Some(SessionNotice::Lost(r)) => r,
                    Some(_) => continue,
                    None => "ended".into(),
                };
                return Err(Failure::from(anyhow::anyhow!("session ended: {why}")));
            }
        }
        Cmd::Lease { cmd } => lease(cli, &client, cmd, json).await?,
        Cmd::Volume { cmd } => crate::volume::run(&client, cmd, json).await?,
        Cmd::Mkpool { .. }
        | Cmd::Fsck { .. }
        | Cmd::Token { .. }
        | Cmd::Cluster { .. }
        | Cmd::Completions { .. }
        | Cmd::Bench(_)
        | Cmd::LeaseBench(_) => {
            unreachable!("handled in main")
        }
    }
    Ok(())
}

/// Write a secret to a new file that only its owner can read.
fn write_secret(path: &std::path::Path, hex: &str) -> Result<(), Failure> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {} (it must not exist yet)", path.display()))?;
    writeln!(f, "{hex}").with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

async fn put(
    o: &rdax_client::Object,
    file: Option<&std::path::Path>,
    offset: Option<u64>,
    persist: bool,
    json: bool,
) -> Result<(), Failure> {
    let stdin = file.is_none_or(|f| f.as_os_str() == "-");
    let (reader, len): (Box<dyn tokio::io::AsyncRead + Send + Unpin>, Option<u64>) = if stdin {
        (Box::new(tokio::io::stdin()), None)
    } else {
        let f = file.expect("not stdin");
        let h = tokio::fs::File::open(f).await.with_context(|| format!("open {}", f.display()))?;
        let len = h.metadata().await.with_context(|| format!("stat {}", f.display()))?.len();
        (Box::new(h), Some(len))
    };
    let start = match offset {
        Some(off) => off,
        None => {
            // Replace: the object ends up exactly as long as the input.
            let size = len.unwrap_or(0);
            match o.stat().await {
                Ok(_) => {
                    o.resize(0).await?;
                    o.resize(size).await?;
                }
                Err(e) if e.kind() == rdax_client::ErrorKind::NotFound => {
                    o.create(size).await?;
                }
                Err(e) => return Err(e.into()),
            }
            0
        }
    };
    let (bar, progress) = progress_bar(len);
    let n = o.write_from(start, reader, true, persist, progress).await?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let k = o.key();
    emit(json, &json!({"object": k.to_string(), "offset": start, "bytes": n, "persisted": persist}), || {
        format!("wrote {} to {k} at offset {start}{}", human(n), if persist { " (persisted)" } else { "" })
    });
    Ok(())
}

async fn get(
    o: &rdax_client::Object,
    file: Option<&std::path::Path>,
    offset: u64,
    length: Option<u64>,
    json: bool,
) -> Result<(), Failure> {
    let total = match length {
        Some(l) => l,
        None => o.stat().await?.size.saturating_sub(offset),
    };
    let to_stdout = file.is_none_or(|f| f.as_os_str() == "-");
    let (bar, progress) = progress_bar(Some(total));
    let n = if to_stdout {
        o.read_to(offset, length.unwrap_or(0), &mut tokio::io::stdout(), progress).await?
    } else {
        let f = file.expect("not stdout");
        let mut h = tokio::fs::File::create(f).await.with_context(|| format!("create {}", f.display()))?;
        o.read_to(offset, length.unwrap_or(0), &mut h, progress).await?
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if !to_stdout {
        let k = o.key();
        emit(json, &json!({"object": k.to_string(), "offset": offset, "bytes": n}), || {
            format!("read {} from {k}", human(n))
        });
    }
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn segment_json(object_offset: u64, len: u64, target: Option<(u64, String)>, rdma: Option<(u64, u32)>) -> Value {
    json!({"object_offset": object_offset, "length": len,
        "pool_offset": target.as_ref().map(|t| t.0), "key": target.map(|t| t.1),
        "rdma_addr": rdma.map(|r| r.0), "rkey": rdma.map(|r| r.1)})
}

fn segment_line(object_offset: u64, len: u64, target: Option<(u64, String)>, rdma: Option<(u64, u32)>) -> String {
    let mut out = match target {
        Some((p, k)) => format!("  object [{object_offset}, +{len}) -> pool {p} key {k}"),
        None => format!("  object [{object_offset}, +{len}) -> hole"),
    };
    if let Some((a, r)) = rdma {
        out += &format!(" rdma_addr {a:#x} rkey {r:#x}");
    }
    out + "\n"
}

async fn lease(cli: &Cli, client: &Client, cmd: &crate::LeaseCmd, json: bool) -> Result<(), Failure> {
    use crate::LeaseCmd;
    use rdax_client::LeaseMode;
    match cmd {
        LeaseCmd::Hold { object, offset, length, rw, session: Some(sid), .. } => {
            // For a session whose RDMA connection another program made: acquire, print, renew.
            let len = match length {
                Some(l) => *l,
                None => client.object(&object.ns, &object.name)?.stat().await?.size.saturating_sub(*offset),
            };
            let mode = if *rw { LeaseMode::ReadWrite } else { LeaseMode::Read };
            let rdma = cli.transport == crate::TransportArg::Rdma;
            let g = client.acquire_raw(sid, &object.ns, &object.name, *offset, len, mode, rdma).await?;
            let seg = |s: &rdax_client::pb::LeaseSegment| {
                let target = (!s.key.is_empty()).then(|| (s.pool_offset, hex(&s.key)));
                let r = (s.rkey != 0).then_some((s.rdma_addr, s.rkey));
                (s.object_offset, s.length, target, r)
            };
            let segs: Vec<Value> = g
                .segments
                .iter()
                .map(|s| {
                    let (a, b, c, d) = seg(s);
                    segment_json(a, b, c, d)
                })
                .collect();
            let v = json!({"session_id": sid, "lease_id": g.lease_id, "generation": g.generation, "segments": segs});
            emit(json, &v, || {
                let mut out = format!("lease {} (generation {}) for session {sid}\n", g.lease_id, g.generation);
                for s in &g.segments {
                    let (a, b, c, d) = seg(s);
                    out += &segment_line(a, b, c, d);
                }
                out + "holding (renewing); Ctrl-C to release"
            });
            let period = std::time::Duration::from_millis((g.ttl_ms / 3).max(10));
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {
                        client.release_lease(sid, g.lease_id).await?;
                        return Ok(());
                    }
                    _ = tokio::time::sleep(period) => {
                        if let Err(e) = client.renew_lease(sid, g.lease_id).await {
                            emit(json, &json!({"event": format!("renew failed: {e}")}), || format!("event: renew failed: {e}"));
                            return Err(e.into());
                        }
                    }
                }
            }
        }
        LeaseCmd::Hold { object, offset, length, rw, session: None, exclusive } => {
            let len = match length {
                Some(l) => *l,
                None => client.object(&object.ns, &object.name)?.stat().await?.size.saturating_sub(*offset),
            };
            let mut s = client.open_session_with(cli.session_options("rdaxctl lease hold")).await?;
            let mode = if *rw { LeaseMode::ReadWrite } else { LeaseMode::Read };
            let l = if *exclusive {
                s.acquire_exclusive(&object.ns, &object.name, *offset, len, mode).await?
            } else {
                s.acquire(&object.ns, &object.name, *offset, len, mode).await?
            };
            let tgt = |g: &rdax_client::LeaseSegment| g.target.map(|t| (t.0, hex(&t.1)));
            let segs: Vec<Value> =
                l.segments().iter().map(|g| segment_json(g.object_offset, g.len, tgt(g), g.rdma)).collect();
            let transport = if l.is_rdma() { "rdma" } else { "tcp" };
            let v = json!({"session_id": s.id(), "lease_id": l.id(), "generation": l.generation(),
                "transport": transport, "exclusive": exclusive, "segments": segs});
            emit(json, &v, || {
                let mut out =
                    format!("lease {} (generation {}, {transport}) for session {}\n", l.id(), l.generation(), s.id());
                for g in l.segments() {
                    out += &segment_line(g.object_offset, g.len, tgt(g), g.rdma);
                }
                out + "holding; Ctrl-C to release"
            });
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {
                    l.release().await?;
                    s.close().await?;
                }
                n = s.next_notice() => {
                    let msg = format!("{n:?}");
                    emit(json, &json!({"event": msg}), || format!("event: {msg}"));
                }
            }
        }
        LeaseCmd::List { session } => {
            let list = client.leases(session.as_deref()).await?;
            let v: Vec<Value> = list
                .iter()
                .map(|l| {
                    let o = l.object.clone().unwrap_or_default();
                    json!({"lease_id": l.lease_id, "session_id": l.session_id, "object": format!("{}/{}", o.namespace, o.name),
                        "offset": l.offset, "length": l.length, "mode": lease_mode(l.mode), "generation": l.generation,
                        "state": l.state, "pins": l.pins, "expires_in_ms": l.expires_in_ms, "exclusive": l.exclusive})
                })
                .collect();
            emit(json, &v, || {
                list.iter()
                    .map(|l| {
                        let o = l.object.clone().unwrap_or_default();
                        format!(
                            "{:>6}  {:<9} {}/{} [{}, +{}) {} gen {} pins {} expires in {} ms{}",
                            l.lease_id,
                            l.state,
                            o.namespace,
                            o.name,
                            l.offset,
                            l.length,
                            lease_mode(l.mode),
                            l.generation,
                            l.pins,
                            l.expires_in_ms,
                            if l.exclusive { " exclusive" } else { "" }
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        LeaseCmd::Revoke { lease_id, immediate } => {
            client.revoke_lease(*lease_id, *immediate).await?;
            emit(json, &json!({"revoked": lease_id}), || format!("lease {lease_id} recalled and drained"));
        }
    }
    Ok(())
}
