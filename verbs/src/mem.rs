//! Protection domains, memory regions, memory windows and registered buffers.

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::Arc;

use rdma_mummy_sys as sys;

use crate::error::{Result, check, last};

/// Access rights (`ibv_access_flags`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access(pub u32);

impl Access {
    /// The local HCA may write (needed for RDMA READ targets and receives).
    pub const LOCAL_WRITE: Access = Access(1);
    /// Remote RDMA WRITE.
    pub const REMOTE_WRITE: Access = Access(2);
    /// Remote RDMA READ.
    pub const REMOTE_READ: Access = Access(4);
    /// Memory windows may be bound over the region.
    pub const MW_BIND: Access = Access(16);
    /// On-demand paging: no long-term pin.
    pub const ON_DEMAND: Access = Access(64);
}

impl std::ops::BitOr for Access {
    type Output = Access;
    fn bitor(self, o: Access) -> Access {
        Access(self.0 | o.0)
    }
}

/// A protection domain on one device.
#[derive(Debug)]
pub struct Pd {
    pub(crate) ptr: NonNull<sys::ibv_pd>,
}

// SAFETY: libibverbs objects may be used from any thread.
unsafe impl Send for Pd {}
// SAFETY: as above; the PD is only read after allocation.
unsafe impl Sync for Pd {}

impl Pd {
    /// Allocate a PD on `ctx`.
    ///
    /// # Safety
    /// `ctx` must be an open device context that outlives the PD (rdma_cm's contexts live
    /// for the whole process).
    pub unsafe fn alloc(ctx: *mut sys::ibv_context) -> Result<Arc<Pd>> {
        // SAFETY: per the contract.
        let p = unsafe { sys::ibv_alloc_pd(ctx) };
        NonNull::new(p).map(|ptr| Arc::new(Pd { ptr })).ok_or_else(|| last("ibv_alloc_pd"))
    }

    /// The device context.
    pub fn context(&self) -> *mut sys::ibv_context {
        // SAFETY: a live PD.
        unsafe { (*self.ptr.as_ptr()).context }
    }

    /// Register `len` bytes at `addr`.
    ///
    /// # Safety
    /// The memory must stay mapped until the returned region is dropped, and nothing may
    /// rely on Rust's aliasing rules for it while remote access is granted.
    pub unsafe fn register(self: &Arc<Self>, addr: *mut u8, len: usize, access: Access) -> Result<Mr> {
        // SAFETY: per the contract.
        let p = unsafe { sys::ibv_reg_mr(self.ptr.as_ptr(), addr.cast(), len, access.0 as i32) };
        NonNull::new(p).map(|ptr| Mr { ptr, _pd: self.clone() }).ok_or_else(|| last("ibv_reg_mr"))
    }

    /// Allocate a type-2 memory window (bound later by a work request on one QP).
    pub fn alloc_mw(self: &Arc<Self>) -> Result<Mw> {
        // SAFETY: a live PD.
        let p = unsafe { sys::ibv_alloc_mw(self.ptr.as_ptr(), sys::ibv_mw_type::IBV_MW_TYPE_2) };
        let ptr = NonNull::new(p).ok_or_else(|| last("ibv_alloc_mw"))?;
        // SAFETY: just allocated.
        let rkey = unsafe { (*p).rkey };
        Ok(Mw { ptr, rkey, _pd: self.clone() })
    }
}

impl Drop for Pd {
    fn drop(&mut self) {
        // SAFETY: every MR/MW holds an Arc to the PD, so none is left.
        unsafe { sys::ibv_dealloc_pd(self.ptr.as_ptr()) };
    }
}

/// A registered memory region.
#[derive(Debug)]
pub struct Mr {
    ptr: NonNull<sys::ibv_mr>,
    _pd: Arc<Pd>,
}

// SAFETY: see Pd.
unsafe impl Send for Mr {}
// SAFETY: see Pd.
unsafe impl Sync for Mr {}

impl Mr {
    /// Local key.
    pub fn lkey(&self) -> u32 {
        // SAFETY: a live MR.
        unsafe { (*self.ptr.as_ptr()).lkey }
    }
    /// Remote key of the whole region.
    pub fn rkey(&self) -> u32 {
        // SAFETY: a live MR.
        unsafe { (*self.ptr.as_ptr()).rkey }
    }
    /// Start address.
    pub fn addr(&self) -> u64 {
        // SAFETY: a live MR.
        unsafe { (*self.ptr.as_ptr()).addr as u64 }
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        // SAFETY: a live MR.
        unsafe { (*self.ptr.as_ptr()).length }
    }
    /// True for an empty region.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub(crate) fn raw(&self) -> *mut sys::ibv_mr {
        self.ptr.as_ptr()
    }
}

impl Mr {
    /// Deregister, checking the result. On failure the region stays registered — the device
    /// may still access its memory — so it is leaked on purpose (with its PD) rather than
    /// dropped, and the caller must keep that memory out of reuse.
    pub fn deregister(self) -> Result<()> {
        let me = std::mem::ManuallyDrop::new(self);
        // SAFETY: registered by us and never deregistered before (Drop is suppressed).
        let rc = unsafe { sys::ibv_dereg_mr(me.ptr.as_ptr()) };
        if rc == 0 {
            // SAFETY: `me` is never dropped, so moving the PD reference out of it happens once.
            drop(unsafe { std::ptr::read(&me._pd) });
        }
        check(rc, "ibv_dereg_mr")
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: registered by us; rxe removes the key before it returns (new accesses fail).
        unsafe { sys::ibv_dereg_mr(self.ptr.as_ptr()) };
    }
}

/// A type-2 memory window.
#[derive(Debug)]
pub struct Mw {
    ptr: NonNull<sys::ibv_mw>,
    /// The rkey of the next (or current) binding: its low 8 bits change with each bind.
    pub(crate) rkey: u32,
    _pd: Arc<Pd>,
}

// SAFETY: see Pd.
unsafe impl Send for Mw {}
// SAFETY: see Pd.
unsafe impl Sync for Mw {}

impl Mw {
    /// The rkey of the current binding.
    pub fn rkey(&self) -> u32 {
        self.rkey
    }
    pub(crate) fn raw(&self) -> *mut sys::ibv_mw {
        self.ptr.as_ptr()
    }
}

impl Mw {
    /// Deallocate, checking the result (deallocation also invalidates a binding). On failure
    /// the window is leaked on purpose, with its PD, as for [`Mr::deregister`].
    pub fn dealloc(self) -> Result<()> {
        let me = std::mem::ManuallyDrop::new(self);
        // SAFETY: allocated by us and never deallocated before (Drop is suppressed).
        let rc = unsafe { sys::ibv_dealloc_mw(me.ptr.as_ptr()) };
        if rc == 0 {
            // SAFETY: `me` is never dropped, so moving the PD reference out of it happens once.
            drop(unsafe { std::ptr::read(&me._pd) });
        }
        check(rc, "ibv_dealloc_mw")
    }
}

impl Drop for Mw {
    fn drop(&mut self) {
        // SAFETY: allocated by us; deallocation also invalidates a binding.
        unsafe { sys::ibv_dealloc_mw(self.ptr.as_ptr()) };
    }
}

/// A page-aligned heap buffer registered for local access (and RDMA READ targets).
#[derive(Debug)]
pub struct RegBuf {
    mr: Option<Mr>,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer is plain memory owned by this value.
unsafe impl Send for RegBuf {}
// SAFETY: shared access goes through raw pointers whose users coordinate by work request.
unsafe impl Sync for RegBuf {}

impl RegBuf {
    /// Allocate and register `len` bytes (zeroed).
    pub fn new(pd: &Arc<Pd>, len: usize) -> Result<RegBuf> {
        let layout = Layout::from_size_align(len.max(1), 4096).expect("valid layout");
        // SAFETY: non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(p).expect("out of memory");
        // SAFETY: the buffer lives as long as this value, which drops the MR first.
        let mr = unsafe { pd.register(p, len, Access::LOCAL_WRITE) };
        match mr {
            Ok(mr) => Ok(RegBuf { mr: Some(mr), ptr, len }),
            Err(e) => {
                // SAFETY: allocated above with this layout.
                unsafe { std::alloc::dealloc(p, layout) };
                Err(e)
            }
        }
    }

    /// Base address.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }
    /// Local key.
    pub fn lkey(&self) -> u32 {
        self.mr.as_ref().expect("registered").lkey()
    }
    /// Bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Raw pointer to byte `off`.
    pub fn ptr(&self, off: usize) -> *mut u8 {
        assert!(off <= self.len);
        // SAFETY: in bounds.
        unsafe { self.ptr.as_ptr().add(off) }
    }
}

impl Drop for RegBuf {
    fn drop(&mut self) {
        drop(self.mr.take());
        let layout = Layout::from_size_align(self.len.max(1), 4096).expect("valid layout");
        // SAFETY: allocated in `new` with this layout; the MR is gone.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
    }
}
