//! Python buffer-protocol objects (bytes, bytearray, memoryview, numpy arrays, mmap, ...)
//! seen as byte slices, without copying.
//!
//! A [`Bytes`] holds the exporter's buffer for as long as it lives (`PyBuffer` keeps the
//! export open: a bytearray cannot be resized or freed meanwhile), so the slices it hands out
//! stay valid while the GIL is released. Python code in another thread that writes to the
//! same buffer during a transfer races with it, exactly as with `socket.recv_into` or
//! `file.readinto`: the bytes transferred are then unspecified, never memory outside it.

use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;

/// A C-contiguous byte view of a buffer-protocol object.
pub(crate) struct Bytes {
    buf: PyBuffer<u8>,
}

impl Bytes {
    /// View `obj` as bytes. Any C-contiguous buffer works: one of another item type (a
    /// float64 numpy array, say) is viewed through `memoryview(obj).cast("B")`. With
    /// `writable`, a read-only buffer (bytes) is refused.
    pub(crate) fn new(obj: &Bound<'_, PyAny>, writable: bool) -> PyResult<Self> {
        let py = obj.py();
        let buf = match PyBuffer::<u8>::get(obj) {
            Ok(b) => b,
            Err(_) => {
                let view = py.import("builtins")?.getattr("memoryview")?.call1((obj,)).map_err(|_| {
                    let type_name = obj.get_type().name().map(|n| n.to_string()).unwrap_or_default();
                    pyo3::exceptions::PyTypeError::new_err(format!(
                        "expected a bytes-like object (buffer protocol), got {type_name}"
                    ))
                })?;
                let cast = view
                    .call_method1("cast", ("B",))
                    .map_err(|e| crate::errors::invalid(py, format!("cannot view the buffer as bytes: {e}")))?;
                PyBuffer::<u8>::get(&cast)?
            }
        };
        if !buf.is_c_contiguous() {
            return Err(crate::errors::invalid(py, "the buffer is not C-contiguous"));
        }
        if writable && buf.readonly() {
            return Err(crate::errors::invalid(py, "the buffer is read-only (use a bytearray, memoryview or array)"));
        }
        Ok(Self { buf })
    }

    /// Bytes in the buffer.
    pub(crate) fn len(&self) -> usize {
        self.buf.len_bytes()
    }

    /// The buffer's bytes.
    pub(crate) fn as_slice(&self) -> &[u8] {
        if self.len() == 0 {
            return &[];
        }
        // SAFETY: the buffer is C-contiguous (checked in `new`), `len_bytes` long from
        // `buf_ptr`, and stays exported (so allocated and unmoved) while `self.buf` lives,
        // which outlives the borrow of `self`.
        unsafe { std::slice::from_raw_parts(self.buf.buf_ptr() as *const u8, self.len()) }
    }

    /// The buffer's bytes, to fill.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        debug_assert!(!self.buf.readonly());
        if self.len() == 0 {
            return &mut [];
        }
        // SAFETY: as in `as_slice`; the exporter granted a writable buffer (`readonly()` is
        // false, checked in `new` for every writable view), and `&mut self` makes this the
        // only slice handed out from this view.
        unsafe { std::slice::from_raw_parts_mut(self.buf.buf_ptr() as *mut u8, self.len()) }
    }
}
