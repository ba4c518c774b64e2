//! `rdax._native.Lease`: one-sided reads and writes through a lease, on the caller's buffer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::block;
use crate::buffer::Bytes;
use crate::errors::{invalid, non_negative};

/// A lease on a range of an object (see `rdax.Lease`). Offsets are object offsets.
#[pyclass(module = "rdax._native", frozen)]
pub(crate) struct Lease {
    inner: Arc<rdax_client::Lease>,
    path: String,
    released: AtomicBool,
}

impl Lease {
    pub(crate) fn new(inner: rdax_client::Lease, path: String) -> Self {
        Self { inner: Arc::new(inner), path, released: AtomicBool::new(false) }
    }
}

#[pymethods]
impl Lease {
    #[getter]
    fn id(&self) -> u64 {
        self.inner.id()
    }

    #[getter]
    fn generation(&self) -> u64 {
        self.inner.generation()
    }

    /// `NAMESPACE/NAME` of the object.
    #[getter]
    fn path(&self) -> &str {
        &self.path
    }

    /// "r" or "rw".
    #[getter]
    fn mode(&self) -> &'static str {
        match self.inner.mode() {
            rdax_client::LeaseMode::Read => "r",
            rdax_client::LeaseMode::ReadWrite => "rw",
        }
    }

    /// First object offset the lease covers.
    #[getter]
    fn offset(&self) -> u64 {
        self.inner.range().0
    }

    /// Bytes the lease covers.
    #[getter]
    fn length(&self) -> u64 {
        self.inner.range().1
    }

    /// Whether the lease still works (not recalled, released or revoked).
    #[getter]
    fn active(&self) -> bool {
        self.inner.is_active()
    }

    /// Whether the lease moves bytes over RDMA (else the TCP data plane).
    #[getter]
    fn rdma(&self) -> bool {
        self.inner.is_rdma()
    }

    #[pyo3(signature = (offset, data, persist=false))]
    fn write(&self, py: Python<'_>, offset: i64, data: &Bound<'_, PyAny>, persist: bool) -> PyResult<()> {
        let offset = non_negative(py, "offset", offset)?;
        let src = Bytes::new(data, false)?;
        let (l, bytes) = (&self.inner, src.as_slice());
        block(
            py,
            async move { if persist { l.write_persist(offset, bytes).await } else { l.write(offset, bytes).await } },
        )
    }

    fn read_into(&self, py: Python<'_>, offset: i64, buffer: &Bound<'_, PyAny>) -> PyResult<usize> {
        let offset = non_negative(py, "offset", offset)?;
        let mut dst = Bytes::new(buffer, true)?;
        let n = dst.len();
        let (l, bytes) = (&self.inner, dst.as_mut_slice());
        block(py, l.read_into(offset, bytes))?;
        Ok(n)
    }

    fn read<'py>(&self, py: Python<'py>, offset: i64, n: i64) -> PyResult<Bound<'py, PyBytes>> {
        let offset = non_negative(py, "offset", offset)?;
        let n = usize::try_from(non_negative(py, "n", n)?).map_err(|_| invalid(py, "n does not fit in memory"))?;
        let l = &self.inner;
        PyBytes::new_with(py, n, |buf| block(py, l.read_into(offset, buf)))
    }

    #[pyo3(signature = (offset=None, length=None))]
    fn flush(&self, py: Python<'_>, offset: Option<i64>, length: Option<i64>) -> PyResult<()> {
        let (start, len) = self.inner.range();
        let offset = offset.map(|o| non_negative(py, "offset", o)).transpose()?.unwrap_or(start);
        let length = match length {
            Some(l) => non_negative(py, "length", l)?,
            None => (start + len).saturating_sub(offset),
        };
        let l = &self.inner;
        block(py, l.flush(offset, length))
    }

    /// Return the lease (after this handle's operations in flight). Releasing again, or a
    /// lease that was already recalled or revoked, does nothing.
    fn release(&self, py: Python<'_>) -> PyResult<()> {
        if self.released.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let l = &self.inner;
        block(py, l.release_shared())
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (exc_type=None, _exc=None, _tb=None))]
    fn __exit__(
        &self,
        py: Python<'_>,
        exc_type: Option<&Bound<'_, PyAny>>,
        _exc: Option<&Bound<'_, PyAny>>,
        _tb: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        let r = self.release(py);
        // An exception already on its way out wins over a failed release.
        if exc_type.is_none_or(|t| t.is_none()) {
            r?;
        }
        Ok(false)
    }

    fn __repr__(&self) -> String {
        let (o, n) = self.inner.range();
        format!(
            "Lease(id={}, path={:?}, offset={o}, length={n}, mode={:?}, active={})",
            self.inner.id(),
            self.path,
            self.mode(),
            self.inner.is_active()
        )
    }
}
