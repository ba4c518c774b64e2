//! `rdax._native.Client`: objects, sessions and administration over gRPC.

use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use rdax_client::pb;

use crate::block;
use crate::errors::{invalid, non_negative};

/// A connection to one rdaxd (see `rdax.Client`).
#[pyclass(module = "rdax._native", frozen)]
pub(crate) struct Client {
    pub(crate) inner: rdax_client::Client,
}

/// `NAMESPACE/NAME` split at the first `/`.
pub(crate) fn split(py: Python<'_>, path: &str) -> PyResult<(String, String)> {
    match path.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() => Ok((ns.to_string(), name.to_string())),
        _ => Err(invalid(py, format!("{path:?}: expected NAMESPACE/NAME"))),
    }
}

fn seconds(py: Python<'_>, what: &str, s: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(s).map_err(|_| invalid(py, format!("{what} must be a non-negative number of seconds")))
}

impl Client {
    fn object(&self, py: Python<'_>, path: &str) -> PyResult<rdax_client::Object> {
        let (ns, name) = split(py, path)?;
        self.inner.object(&ns, &name).map_err(|e| crate::errors::to_py(py, &e))
    }
}

#[pymethods]
impl Client {
    #[new]
    #[pyo3(signature = (endpoint, token=None, ca_pem=None, cert_pem=None, key_pem=None, domain=None, connect_timeout=5.0, request_timeout=30.0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        endpoint: String,
        token: Option<String>,
        ca_pem: Option<Vec<u8>>,
        cert_pem: Option<Vec<u8>>,
        key_pem: Option<Vec<u8>>,
        domain: Option<String>,
        connect_timeout: f64,
        request_timeout: Option<f64>,
    ) -> PyResult<Self> {
        let identity = match (cert_pem, key_pem) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => return Err(invalid(py, "a client certificate needs both cert and key")),
        };
        if ca_pem.is_none() && (identity.is_some() || domain.is_some()) {
            return Err(invalid(py, "cert, key and domain need ca (the CA that signed the daemon's certificate)"));
        }
        let tls = ca_pem.map(|ca_pem| rdax_client::TlsOptions { ca_pem, identity, domain });
        let opts = rdax_client::ConnectOptions {
            token,
            tls,
            connect_timeout: seconds(py, "connect_timeout", connect_timeout)?,
            request_timeout: request_timeout.map(|s| seconds(py, "request_timeout", s)).transpose()?,
            ..Default::default()
        };
        let inner = block(py, rdax_client::Client::connect(endpoint, opts))?;
        Ok(Self { inner })
    }

    /// The pool: a dict of `PoolInfo` fields.
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let i = block(py, self.inner.info())?;
        let d = PyDict::new(py);
        d.set_item("path", i.path)?;
        d.set_item("mode", i.mode)?;
        d.set_item("persistence", i.persistence)?;
        d.set_item("uuid", i.uuid)?;
        d.set_item("format_version", i.format_version)?;
        d.set_item("pool_size", i.pool_size)?;
        d.set_item("block_size", i.block_size)?;
        d.set_item("data_blocks", i.data_blocks)?;
        d.set_item("max_objects", i.max_objects)?;
        d.set_item("max_extents", i.max_extents)?;
        d.set_item("server_version", i.server_version)?;
        d.set_item("rdma", i.rdma.map(|r| r.state).unwrap_or_default())?;
        d.set_item("nbd_endpoint", i.nbd_endpoint)?;
        Ok(d)
    }

    /// Pool usage: a dict of `PoolStats` fields.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = block(py, self.inner.stats())?;
        let d = PyDict::new(py);
        d.set_item("objects", s.objects)?;
        d.set_item("extents", s.extents)?;
        d.set_item("data_blocks", s.data_blocks)?;
        d.set_item("used_blocks", s.used_blocks)?;
        d.set_item("held_blocks", s.held_blocks)?;
        d.set_item("free_blocks", s.free_blocks)?;
        d.set_item("fragmentation", s.fragmentation)?;
        d.set_item("sessions", s.sessions)?;
        d.set_item("quarantined_blocks", s.quarantined_blocks)?;
        Ok(d)
    }

    #[pyo3(signature = (name, size=0))]
    fn create(&self, py: Python<'_>, name: &str, size: i64) -> PyResult<ObjectStat> {
        let o = self.object(py, name)?;
        let size = non_negative(py, "size", size)?;
        block(py, o.create(size)).map(ObjectStat::from)
    }

    fn stat(&self, py: Python<'_>, name: &str) -> PyResult<ObjectStat> {
        let o = self.object(py, name)?;
        block(py, o.stat()).map(ObjectStat::from)
    }

    fn resize(&self, py: Python<'_>, name: &str, size: i64) -> PyResult<ObjectStat> {
        let o = self.object(py, name)?;
        let size = non_negative(py, "size", size)?;
        block(py, o.resize(size)).map(ObjectStat::from)
    }

    fn punch(&self, py: Python<'_>, name: &str, offset: i64, length: i64) -> PyResult<()> {
        let o = self.object(py, name)?;
        let (offset, length) = (non_negative(py, "offset", offset)?, non_negative(py, "length", length)?);
        block(py, o.punch_hole(offset, length))
    }

    #[pyo3(signature = (name, force=false))]
    fn rm(&self, py: Python<'_>, name: &str, force: bool) -> PyResult<()> {
        let o = self.object(py, name)?;
        if force { block(py, o.delete_force()) } else { block(py, o.delete()) }
    }

    #[pyo3(signature = (name, offset=0, length=None))]
    fn flush(&self, py: Python<'_>, name: &str, offset: i64, length: Option<i64>) -> PyResult<()> {
        let o = self.object(py, name)?;
        let offset = non_negative(py, "offset", offset)?;
        let length = match length {
            Some(l) => non_negative(py, "length", l)?,
            None => block(py, o.stat())?.size.saturating_sub(offset),
        };
        block(py, o.flush(offset, length))
    }

    /// One page of a namespace's listing: (objects, the name to continue after or None).
    #[pyo3(signature = (namespace, after=None, limit=1000))]
    fn list_page(
        &self,
        py: Python<'_>,
        namespace: &str,
        after: Option<&str>,
        limit: u32,
    ) -> PyResult<(Vec<ObjectStat>, Option<String>)> {
        let (objects, next) = block(py, self.inner.list(namespace, after, limit))?;
        Ok((objects.into_iter().map(ObjectStat::from).collect(), next))
    }

    /// Replace the object's contents with `data` (creating it if needed), persisted.
    #[pyo3(signature = (name, data, persist=true))]
    fn put(&self, py: Python<'_>, name: &str, data: &Bound<'_, PyAny>, persist: bool) -> PyResult<u64> {
        let o = self.object(py, name)?;
        // The gRPC stream sends owned chunks: one copy, made here, with the GIL held.
        let bytes = crate::buffer::Bytes::new(data, false)?.as_slice().to_vec();
        let size = bytes.len() as u64;
        block(py, async move {
            match o.stat().await {
                Ok(_) => {
                    o.resize(0).await?;
                    o.resize(size).await?;
                }
                Err(e) if e.kind() == rdax_client::ErrorKind::NotFound => {
                    o.create(size).await?;
                }
                Err(e) => return Err(e),
            }
            if size == 0 {
                return Ok(0);
            }
            o.write(0, bytes, persist).await
        })
    }

    /// The object's bytes (all of them, or `length` from `offset`).
    #[pyo3(signature = (name, offset=0, length=None))]
    fn get<'py>(&self, py: Python<'py>, name: &str, offset: i64, length: Option<i64>) -> PyResult<Bound<'py, PyBytes>> {
        let o = self.object(py, name)?;
        let offset = non_negative(py, "offset", offset)?;
        let length = match length {
            Some(l) => non_negative(py, "length", l)?,
            None => block(py, o.stat())?.size.saturating_sub(offset),
        };
        let len = usize::try_from(length).map_err(|_| invalid(py, "length does not fit in memory"))?;
        // Streamed straight into the new bytes object: no intermediate buffer.
        PyBytes::new_with(py, len, |buf| {
            if len == 0 {
                return Ok(());
            }
            let mut w = std::io::Cursor::new(buf);
            block(py, o.read_to(offset, length, &mut w, None)).map(|_| ())
        })
    }

    #[pyo3(signature = (client_name="python", ignore_recalls=false, transport="auto"))]
    fn session(
        &self,
        py: Python<'_>,
        client_name: &str,
        ignore_recalls: bool,
        transport: &str,
    ) -> PyResult<crate::session::Session> {
        let transport = match transport {
            "auto" => rdax_client::Transport::Auto,
            "tcp" => rdax_client::Transport::Tcp,
            "rdma" => rdax_client::Transport::Rdma,
            other => return Err(invalid(py, format!("transport {other:?}: expected \"auto\", \"tcp\" or \"rdma\""))),
        };
        let opts = rdax_client::SessionOptions {
            client_name: client_name.into(),
            ignore_recalls,
            transport,
            ..Default::default()
        };
        let s = block(py, self.inner.open_session_with(opts))?;
        Ok(crate::session::Session::new(s))
    }

    #[pyo3(signature = (session_id=None))]
    fn leases(&self, py: Python<'_>, session_id: Option<&str>) -> PyResult<Vec<LeaseInfo>> {
        Ok(block(py, self.inner.leases(session_id))?.into_iter().map(LeaseInfo::from).collect())
    }

    #[pyo3(signature = (lease_id, immediate=false))]
    fn revoke_lease(&self, py: Python<'_>, lease_id: u64, immediate: bool) -> PyResult<()> {
        block(py, self.inner.revoke_lease(lease_id, immediate))
    }

    fn sessions(&self, py: Python<'_>) -> PyResult<Vec<SessionInfo>> {
        Ok(block(py, self.inner.sessions())?.into_iter().map(SessionInfo::from).collect())
    }

    #[pyo3(signature = (session_id, reason="evicted by an administrator"))]
    fn evict_session(&self, py: Python<'_>, session_id: &str, reason: &str) -> PyResult<()> {
        block(py, self.inner.evict_session(session_id, reason))
    }
}

/// An object's metadata.
#[pyclass(module = "rdax._native", frozen, get_all)]
pub(crate) struct ObjectStat {
    id: u64,
    namespace: String,
    name: String,
    size: u64,
    allocated_bytes: u64,
    extents: u64,
    created_unix_ns: u64,
    volume: bool,
}

impl From<pb::ObjectStat> for ObjectStat {
    fn from(s: pb::ObjectStat) -> Self {
        Self {
            id: s.id,
            namespace: s.namespace,
            name: s.name,
            size: s.size,
            allocated_bytes: s.allocated_bytes,
            extents: s.extents,
            created_unix_ns: s.created_unix_ns,
            volume: s.volume,
        }
    }
}

#[pymethods]
impl ObjectStat {
    /// `NAMESPACE/NAME`.
    #[getter]
    fn path(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn __repr__(&self) -> String {
        format!(
            "ObjectStat(path={:?}, size={}, allocated_bytes={}, extents={})",
            self.path(),
            self.size,
            self.allocated_bytes,
            self.extents
        )
    }
}

/// A lease as the daemon lists it (administrators).
#[pyclass(module = "rdax._native", frozen, get_all)]
pub(crate) struct LeaseInfo {
    lease_id: u64,
    session_id: String,
    path: String,
    offset: u64,
    length: u64,
    mode: &'static str,
    generation: u64,
    state: String,
    exclusive: bool,
    expires_in_ms: i64,
}

impl From<pb::LeaseInfo> for LeaseInfo {
    fn from(l: pb::LeaseInfo) -> Self {
        let path = l.object.map(|o| format!("{}/{}", o.namespace, o.name)).unwrap_or_default();
        let mode = if l.mode == pb::LeaseMode::ReadWrite as i32 { "rw" } else { "r" };
        Self {
            lease_id: l.lease_id,
            session_id: l.session_id,
            path,
            offset: l.offset,
            length: l.length,
            mode,
            generation: l.generation,
            state: l.state,
            exclusive: l.exclusive,
            expires_in_ms: l.expires_in_ms,
        }
    }
}

#[pymethods]
impl LeaseInfo {
    fn __repr__(&self) -> String {
        format!(
            "LeaseInfo(lease_id={}, path={:?}, offset={}, length={}, mode={:?}, state={:?})",
            self.lease_id, self.path, self.offset, self.length, self.mode, self.state
        )
    }
}

/// A session as the daemon lists it (administrators). No secret is in it.
#[pyclass(module = "rdax._native", frozen, get_all)]
pub(crate) struct SessionInfo {
    session_id: String,
    client_name: String,
    principal: String,
    peer: String,
    opened_unix_ms: u64,
    idle_ms: u64,
    connected: bool,
}

impl From<pb::SessionInfo> for SessionInfo {
    fn from(s: pb::SessionInfo) -> Self {
        Self {
            session_id: s.session_id,
            client_name: s.client_name,
            principal: s.principal,
            peer: s.peer,
            opened_unix_ms: s.opened_unix_ms,
            idle_ms: s.idle_ms,
            connected: s.connected,
        }
    }
}

#[pymethods]
impl SessionInfo {
    fn __repr__(&self) -> String {
        format!(
            "SessionInfo(session_id={:?}, client_name={:?}, principal={:?}, connected={})",
            self.session_id, self.client_name, self.principal, self.connected
        )
    }
}
