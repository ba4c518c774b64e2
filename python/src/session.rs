//! `rdax._native.Session`: a session and its notices.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyo3::prelude::*;

use crate::block;
use crate::errors::{invalid, new as exception, non_negative};

/// An open session (see `rdax.Session`).
#[pyclass(module = "rdax._native", frozen)]
pub(crate) struct Session {
    /// `None` once closed.
    inner: Mutex<Option<Arc<rdax_client::Session>>>,
    notices: Arc<tokio::sync::Mutex<rdax_client::Notices>>,
    id: String,
    ttl: Duration,
}

impl Session {
    pub(crate) fn new(mut s: rdax_client::Session) -> Self {
        let notices = Arc::new(tokio::sync::Mutex::new(s.take_notices()));
        let (id, ttl) = (s.id().to_string(), s.ttl());
        Self { inner: Mutex::new(Some(Arc::new(s))), notices, id, ttl }
    }

    fn open(&self, py: Python<'_>) -> PyResult<Arc<rdax_client::Session>> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.clone().ok_or_else(|| exception(py, "FailedPrecondition", "the session is closed".into()))
    }
}

/// A lease mode argument.
fn mode(py: Python<'_>, m: &str) -> PyResult<rdax_client::LeaseMode> {
    match m {
        "r" | "read" => Ok(rdax_client::LeaseMode::Read),
        "rw" | "read-write" => Ok(rdax_client::LeaseMode::ReadWrite),
        other => Err(invalid(py, format!("mode {other:?}: expected \"r\" or \"rw\""))),
    }
}

#[pymethods]
impl Session {
    /// The session id: a public handle (it is listed and logged), not a credential.
    #[getter]
    fn id(&self) -> &str {
        &self.id
    }

    /// The daemon's TTL for the session, in seconds.
    #[getter]
    fn ttl(&self) -> f64 {
        self.ttl.as_secs_f64()
    }

    #[pyo3(signature = (client, name, offset=0, length=None, mode="rw", exclusive=false))]
    #[allow(clippy::too_many_arguments)]
    fn acquire(
        &self,
        py: Python<'_>,
        client: &crate::client::Client,
        name: &str,
        offset: i64,
        length: Option<i64>,
        mode: &str,
        exclusive: bool,
    ) -> PyResult<crate::lease::Lease> {
        let s = self.open(py)?;
        let (ns, obj) = crate::client::split(py, name)?;
        let offset = non_negative(py, "offset", offset)?;
        let length = length.map(|l| non_negative(py, "length", l)).transpose()?;
        let m = self::mode(py, mode)?;
        let c = client.inner.clone();
        let lease = block(py, async move {
            let length = match length {
                Some(l) => l,
                None => c.object(&ns, &obj)?.stat().await?.size.saturating_sub(offset),
            };
            if exclusive {
                s.acquire_exclusive(&ns, &obj, offset, length, m).await
            } else {
                s.acquire(&ns, &obj, offset, length, m).await
            }
        })?;
        Ok(crate::lease::Lease::new(lease, name.to_string()))
    }

    /// The next notice: `(notice, False)`, `(None, False)` when `timeout` seconds passed
    /// first, or `(None, True)` once the session is over and every notice was read.
    #[pyo3(signature = (timeout=None))]
    fn next_notice(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<(Option<Notice>, bool)> {
        let bound = match timeout {
            Some(t) => Some(Duration::try_from_secs_f64(t).map_err(|_| invalid(py, "timeout must be >= 0 seconds"))?),
            None => None,
        };
        let notices = self.notices.clone();
        block(py, async move {
            let wait = async {
                let mut n = notices.lock().await;
                n.next().await
            };
            let got = match bound {
                Some(b) => match tokio::time::timeout(b, wait).await {
                    Ok(n) => n,
                    Err(_) => return Ok((None, false)),
                },
                None => wait.await,
            };
            let ended = got.is_none();
            Ok((got.map(Notice::from), ended))
        })
    }

    /// End the session now (its leases end with it). Closing again does nothing.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let taken = self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(s) = taken else { return Ok(()) };
        match Arc::try_unwrap(s) {
            Ok(s) => block(py, s.close()),
            Err(s) => {
                *self.inner.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
                Err(exception(py, "FailedPrecondition", "the session is in use by another thread".into()))
            }
        }
    }
}

/// Something the daemon told the session, or that happened to it.
#[pyclass(module = "rdax._native", frozen, get_all)]
pub(crate) struct Notice {
    /// "recalled", "revoked", "ended" or "lost".
    kind: &'static str,
    /// The lease, for "recalled" and "revoked".
    lease_id: Option<u64>,
    reason: String,
}

impl From<rdax_client::SessionNotice> for Notice {
    fn from(n: rdax_client::SessionNotice) -> Self {
        use rdax_client::SessionNotice as N;
        let (kind, lease_id, reason) = match n {
            N::LeaseRecalled { lease_id, reason } => ("recalled", Some(lease_id), reason),
            N::LeaseRevoked { lease_id, reason } => ("revoked", Some(lease_id), reason),
            N::Ended(reason) => ("ended", None, reason),
            N::Lost(reason) => ("lost", None, reason),
            other => ("other", None, format!("{other:?}")),
        };
        Self { kind, lease_id, reason }
    }
}

#[pymethods]
impl Notice {
    fn __repr__(&self) -> String {
        match self.lease_id {
            Some(id) => format!("Notice(kind={:?}, lease_id={id}, reason={:?})", self.kind, self.reason),
            None => format!("Notice(kind={:?}, reason={:?})", self.kind, self.reason),
        }
    }
}
