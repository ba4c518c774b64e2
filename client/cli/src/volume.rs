//! `rdaxctl volume ...`: block volumes, exported by rdaxd's NBD server as `NAMESPACE/NAME`.

use rdax_client::{Client, ObjectStat};
use serde_json::{Value, json};

use crate::output::{emit, human};
use crate::{Failure, ObjPath};

/// `rdaxctl volume ...`.
#[derive(clap::Subcommand, Debug)]
pub(crate) enum VolumeCmd {
    /// Create a volume: a fixed-size object (a multiple of 4 KiB), allocated in full unless
    /// --sparse, so that a filesystem on it can never find the pool full mid-write.
    Create {
        /// NAMESPACE/NAME (also its NBD export name).
        #[arg(value_parser = crate::parse_obj)]
        volume: ObjPath,
        /// Size, e.g. 4G.
        #[arg(long, value_parser = rdaxd::config::parse_size)]
        size: u64,
        /// Allocate blocks on first write instead (TRIM gives them back either way).
        #[arg(long)]
        sparse: bool,
    },
    /// List the volumes of a namespace, with their NBD clients.
    Ls {
        /// Namespace.
        namespace: String,
    },
    /// Change a volume's size (a multiple of 4 KiB). Its NBD export re-leases it at the new
    /// size; connected clients see the new size when they reconnect.
    Resize {
        /// NAMESPACE/NAME.
        #[arg(value_parser = crate::parse_obj)]
        volume: ObjPath,
        /// New size, e.g. 8G.
        #[arg(value_parser = rdaxd::config::parse_size)]
        size: u64,
    },
    /// Delete a volume. Refused while NBD clients have it open, unless --force.
    Rm {
        /// NAMESPACE/NAME.
        #[arg(value_parser = crate::parse_obj)]
        volume: ObjPath,
        /// Disconnect its NBD clients first (each request in flight is answered).
        #[arg(long)]
        force: bool,
    },
}

fn vol_json(s: &ObjectStat) -> Value {
    json!({
        "namespace": s.namespace, "name": s.name, "size": s.size, "allocated_bytes": s.allocated_bytes,
        "extents": s.extents, "nbd_clients": s.nbd_clients, "export": format!("{}/{}", s.namespace, s.name),
    })
}

fn not_a_volume(s: &ObjectStat) -> Failure {
    Failure::invalid(anyhow::anyhow!(
        "{}/{} is an object, not a volume (volumes are made with `rdaxctl volume create`)",
        s.namespace,
        s.name
    ))
}

pub(crate) async fn run(client: &Client, cmd: &VolumeCmd, json: bool) -> Result<(), Failure> {
    let obj = |o: &ObjPath| client.object(&o.ns, &o.name).map_err(Failure::from);
    match cmd {
        VolumeCmd::Create { volume, size, sparse } => {
            let s = obj(volume)?.create_volume(*size, *sparse).await?;
            emit(json, &vol_json(&s), || {
                format!(
                    "created volume {}/{} ({}, {})",
                    s.namespace,
                    s.name,
                    human(s.size),
                    if *sparse { "sparse" } else { "allocated" }
                )
            });
        }
        VolumeCmd::Ls { namespace } => {
            let all: Vec<ObjectStat> = client.list_all(namespace).await?.into_iter().filter(|s| s.volume).collect();
            let v: Vec<Value> = all.iter().map(vol_json).collect();
            emit(json, &v, || {
                all.iter()
                    .map(|s| {
                        format!(
                            "{:>10}  {:>10}  {:>3} nbd  {}/{}",
                            human(s.size),
                            human(s.allocated_bytes),
                            s.nbd_clients,
                            s.namespace,
                            s.name
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        VolumeCmd::Resize { volume, size } => {
            let o = obj(volume)?;
            let st = o.stat().await?;
            if !st.volume {
                return Err(not_a_volume(&st));
            }
            let s = o.resize(*size).await?;
            emit(json, &vol_json(&s), || format!("volume {}/{} is now {}", s.namespace, s.name, human(s.size)));
        }
        VolumeCmd::Rm { volume, force } => {
            let o = obj(volume)?;
            let st = o.stat().await?;
            if !st.volume {
                return Err(not_a_volume(&st));
            }
            if *force {
                o.delete_force().await?
            } else {
                o.delete().await?
            }
            let name = format!("{}/{}", volume.ns, volume.name);
            let v = json!({"deleted": name, "disconnected": if *force { st.nbd_clients } else { 0 }});
            emit(json, &v, || format!("deleted volume {name}"));
        }
    }
    Ok(())
}
