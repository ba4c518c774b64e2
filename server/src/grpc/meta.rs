//! Creates, resizes and deletes: applied on this node, and in a cluster ordered by the PG's
//! primary (see [`crate::cluster_view`]).
//!
//! * Not routed: applied here, as on a single node.
//! * On the PG's primary: a task that owns the change takes the object's name lock, applies
//!   it here, then has every other replica converge to the result, and only then answers. A
//!   client deadline drops the handler, never the task, so a change is never left applied on
//!   the primary alone because the client went away. If a replica fails, the client gets
//!   `UNAVAILABLE` and retries; the retry converges the replicas again.
//! * From the primary: the replica converges (a create of an existing object sets its size,
//!   a resize of a missing one creates it, a delete of a missing one succeeds).

use rdax_proto::model::{CreateObject, ObjectKey};
use tracing::Instrument;

use super::status::ApiError;
use super::{Caller, Shared};
use crate::cluster_view::{MetaChange, MetaRole};
use crate::gate::Work;
use crate::lease::LeaseError;
use crate::pool::{ObjError, ObjectStat};

/// How long a forced delete waits for a volume's NBD export to let go of its lease.
const DISCONNECT_BOUND: std::time::Duration = std::time::Duration::from_secs(10);

/// A metadata change.
#[derive(Debug, Clone)]
pub(super) enum Op {
    Create(CreateObject),
    /// To `size`; with `grow_only`, only if the object is shorter.
    Resize {
        size: u64,
        grow_only: bool,
    },
    Delete {
        force: bool,
    },
}

fn is_not_found(e: &ApiError) -> bool {
    matches!(
        e,
        ApiError::Object(ObjError::NotFound { .. }) | ApiError::Lease(LeaseError::Pool(ObjError::NotFound { .. }))
    )
}

fn is_taken(e: &ApiError) -> bool {
    matches!(e, ApiError::Object(ObjError::AlreadyExists { .. }))
}

/// What a create, resize or delete with these headers from `who` is here
/// ([`crate::cluster_view::MapView::meta_role`]). A primary's change to converge to
/// (`rdax-from-primary`) is honoured only from the principal this node's own
/// `cluster.peer_token_file` belongs to: anyone else with `write` could otherwise skip the
/// primary's ordering and leave the replicas apart.
pub(super) fn role(
    shared: &Shared,
    headers: &tonic::metadata::MetadataMap,
    who: &Caller,
) -> Result<MetaRole, ApiError> {
    let role = shared.view.meta_role(headers)?;
    if role != MetaRole::FromPrimary {
        return Ok(role);
    }
    let peer = shared
        .cfg
        .cluster
        .as_ref()
        .and_then(|c| c.peer_token.as_deref())
        .and_then(|t| shared.auth.principals().by_token(t));
    match peer {
        Some(p) if p.name == who.principal.name => Ok(role),
        _ => Err(ApiError::PermissionDenied(format!(
            "`{}` is honoured only from the cluster's members (the principal of cluster.peer_token_file)",
            crate::cluster_view::FROM_PRIMARY_HEADER
        ))),
    }
}

/// Apply `op` to `key` as `role` says. `Ok(None)` for a delete.
pub(super) async fn apply(
    shared: &Shared,
    role: MetaRole,
    key: ObjectKey,
    op: Op,
) -> Result<Option<ObjectStat>, ApiError> {
    match role {
        MetaRole::Local => here(shared, &key, op, false).await,
        MetaRole::FromPrimary => here(shared, &key, op, true).await,
        MetaRole::Primary { epoch, pg, others } => {
            let shared = shared.clone();
            let guard = shared.gate.join(Work::Request);
            let task = tokio::spawn(
                async move {
                    let _guard = guard;
                    on_primary(&shared, key, op, epoch, pg, others).await
                }
                .in_current_span(),
            );
            task.await.map_err(|_| ApiError::Internal("a primary's change failed"))?
        }
    }
}

async fn on_primary(
    shared: &Shared,
    key: ObjectKey,
    op: Op,
    epoch: u64,
    pg: u32,
    others: Vec<String>,
) -> Result<Option<ObjectStat>, ApiError> {
    let _name = shared.view.lock_name(&key).await;
    let done = here(shared, &key, op.clone(), false).await;
    // What the other replicas converge to: this node's state after the change.
    let change = match (&op, &done) {
        (_, Ok(Some(st))) => MetaChange::Exists { size: st.size, volume: st.volume },
        (Op::Delete { .. }, Ok(None)) => MetaChange::Absent,
        (_, Err(e)) if is_not_found(e) => MetaChange::Absent,
        (Op::Create(_), Err(e)) if is_taken(e) => {
            let k = key.clone();
            match shared.blocking(move |p| p.stat(&k.namespace, &k.name)).await? {
                Ok(st) => MetaChange::Exists { size: st.size, volume: st.volume },
                Err(_) => return done,
            }
        }
        // Refused here: nothing changed, nothing to pass on.
        (_, Err(_)) | (_, Ok(None)) => return done,
    };
    if others.is_empty() {
        return done;
    }
    let Some(fwd) = shared.view.forward() else {
        return Err(ApiError::Internal("a PG primary without peer connections"));
    };
    let mut sent = tokio::task::JoinSet::new();
    for n in &others {
        sent.spawn(fwd.clone().converge(n.clone(), epoch, pg, key.clone(), change));
    }
    let mut failed = Vec::new();
    while let Some(r) = sent.join_next().await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed.push(e),
            Err(_) => failed.push("a forwarding task failed".into()),
        }
    }
    if !failed.is_empty() {
        tracing::info!(object = %key, epoch, pg, failed = ?failed, "a replica did not take a primary's change");
        return Err(ApiError::Unavailable(format!(
            "{key}: the PG's primary has the change but not every replica does ({}); retry",
            failed.join("; ")
        )));
    }
    done
}

/// Apply `op` here. With `converge`, make this replica match the primary's state instead of
/// refusing what the primary already decided.
async fn here(shared: &Shared, key: &ObjectKey, op: Op, converge: bool) -> Result<Option<ObjectStat>, ApiError> {
    match op {
        Op::Create(r) => {
            let size = r.size;
            match create(shared, r).await {
                Err(e) if converge && is_taken(&e) => {
                    let k = key.clone();
                    let st = shared.blocking(move |p| p.stat(&k.namespace, &k.name)).await??;
                    if st.size == size { Ok(Some(st)) } else { resize(shared, key, size, false).await.map(Some) }
                }
                r => r.map(Some),
            }
        }
        Op::Resize { size, grow_only } => match resize(shared, key, size, grow_only).await {
            Err(e) if converge && is_not_found(&e) => {
                let k = key.clone();
                Ok(Some(shared.blocking(move |p| p.create_object(&k.namespace, &k.name, size)).await??))
            }
            r => r.map(Some),
        },
        Op::Delete { force } => match delete(shared, key, force || converge).await {
            Err(e) if converge && is_not_found(&e) => Ok(None),
            r => r.map(|()| None),
        },
    }
}

async fn create(shared: &Shared, r: CreateObject) -> Result<ObjectStat, ApiError> {
    Ok(shared
        .blocking(move |p| {
            let (ns, name) = (&r.key.namespace, &r.key.name);
            if !r.volume {
                return p.create_object(ns, name, r.size);
            }
            p.create_volume(ns, name, r.size)?;
            if !r.sparse
                && let Err(e) = p.allocate(ns, name, 0, r.size)
            {
                // All or nothing: a volume that could not be allocated is not left behind.
                let _ = p.delete(ns, name);
                return Err(e);
            }
            p.stat(ns, name)
        })
        .await??)
}

async fn resize(shared: &Shared, key: &ObjectKey, size: u64, grow_only: bool) -> Result<ObjectStat, ApiError> {
    // Shrinking takes blocks away: the leases past the new end are recalled first. A volume's
    // leases are all recalled, so that its NBD export leases the new size.
    let k = key.clone();
    let st = shared.blocking(move |p| p.stat(&k.namespace, &k.name)).await??;
    if grow_only && st.size >= size {
        return Ok(st);
    }
    let (from, why) =
        if st.volume { (0, "the volume is being resized") } else { (size, "the object is being truncated") };
    let k = key.clone();
    Ok(shared
        .leases
        .change_layout(key.clone(), from, u64::MAX, why, move |p| {
            // The pool decides again: another resize may have run since the stat.
            if grow_only { p.grow(&k.namespace, &k.name, size) } else { p.resize(&k.namespace, &k.name, size) }
        })
        .await?)
}

async fn delete(shared: &Shared, key: &ObjectKey, force: bool) -> Result<(), ApiError> {
    let clients = shared.nbd.clients(key);
    if clients > 0 && !force {
        return Err(ApiError::FailedPrecondition(format!(
            "volume `{key}` has {clients} NBD client(s) connected; disconnect them, or delete with force \
             (rdaxctl volume rm --force), which disconnects them first"
        )));
    }
    if clients > 0 {
        let n = shared.nbd.disconnect(key, DISCONNECT_BOUND).in_current_span().await;
        tracing::info!(object = %key, clients = n, "NBD clients disconnected for a forced delete");
    }
    let k = key.clone();
    shared
        .leases
        .change_layout(key.clone(), 0, u64::MAX, "the object is being deleted", move |p| {
            p.delete(&k.namespace, &k.name)
        })
        .await?;
    Ok(())
}
