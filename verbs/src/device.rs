//! Which RDMA devices exist and what they can do.

use std::ffi::CStr;
use std::mem::MaybeUninit;

use rdma_mummy_sys as sys;

/// What rdax needs to know about a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCaps {
    /// Kernel name (`rxe0`, `mlx5_0`).
    pub name: String,
    /// Memory windows the device can allocate.
    pub max_mw: u32,
    /// Type-2B memory windows (bound by work request, tied to one QP).
    pub mw_type2: bool,
    /// On-demand paging for RC RDMA READ and WRITE.
    pub odp_rc: bool,
}

/// Why there is no RDMA here.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct NoRdma(pub String);

/// Every RDMA device of this host, with its capabilities.
///
/// With no rdma-core installed, no device, or (in a container) no uverbs access, this is
/// `Err` with a sentence that says which.
pub fn devices() -> Result<Vec<DeviceCaps>, NoRdma> {
    let mut n = 0;
    // SAFETY: ibv_get_device_list writes the count and returns a list we free below.
    let list = unsafe { sys::ibv_get_device_list(&mut n) };
    if list.is_null() {
        let e = std::io::Error::last_os_error();
        return Err(NoRdma(match e.raw_os_error() {
            Some(libc::ENOSYS) => "no RDMA support in this kernel or container (ibv_get_device_list: ENOSYS)".into(),
            Some(libc::EOPNOTSUPP) => "libibverbs is not installed (install rdma-core / ibverbs-providers)".into(),
            _ => format!("ibv_get_device_list failed: {e}"),
        }));
    }
    let mut out = Vec::new();
    // Devices listed but not openable, and why (EPERM/EACCES under a systemd DeviceAllow=
    // list, say): an empty result must name them rather than claim there is no device.
    let mut unopened = Vec::new();
    for i in 0..n.max(0) as usize {
        // SAFETY: the list holds n valid device pointers.
        let dev = unsafe { *list.add(i) };
        // SAFETY: a device from the list; the context is closed below.
        let ctx = unsafe { sys::ibv_open_device(dev) };
        if ctx.is_null() {
            let e = std::io::Error::last_os_error();
            // SAFETY: a device from the list; the name is a C string owned by it.
            let name =
                unsafe { std::ffi::CStr::from_ptr(sys::ibv_get_device_name(dev)) }.to_string_lossy().into_owned();
            unopened.push(format!("{name}: {e}"));
            continue;
        }
        // SAFETY: ctx is an open context.
        out.push(unsafe { query(ctx) });
        // SAFETY: opened above, nothing else refers to it.
        unsafe { sys::ibv_close_device(ctx) };
    }
    // SAFETY: the list came from ibv_get_device_list.
    unsafe { sys::ibv_free_device_list(list) };
    if out.is_empty() && !unopened.is_empty() {
        return Err(NoRdma(format!(
            "RDMA devices exist but none could be opened ({}); under systemd, allow /dev/infiniband/uverbsN and \
             /dev/infiniband/rdma_cm (DeviceAllow=) and check their permissions",
            unopened.join("; ")
        )));
    }
    if out.is_empty() {
        return Err(NoRdma("no RDMA device found (for soft-RoCE: `rdma link add rxe0 type rxe netdev ETH`)".into()));
    }
    Ok(out)
}

/// Capabilities of an open device context.
///
/// # Safety
/// `ctx` must be an open `ibv_context`.
pub unsafe fn query(ctx: *mut sys::ibv_context) -> DeviceCaps {
    // SAFETY: the caller guarantees ctx; device is set by libibverbs.
    let name = unsafe { CStr::from_ptr(sys::ibv_get_device_name((*ctx).device)) }.to_string_lossy().into_owned();
    let mut attr = MaybeUninit::<sys::ibv_device_attr_ex>::zeroed();
    // SAFETY: attr is writable and large enough; a NULL input asks for the default query.
    let rc = unsafe { sys::ibv_query_device_ex(ctx, std::ptr::null(), attr.as_mut_ptr()) };
    if rc != 0 {
        return DeviceCaps { name, max_mw: 0, mw_type2: false, odp_rc: false };
    }
    // SAFETY: zero-initialised and filled in by the query.
    let a = unsafe { attr.assume_init() };
    let type2 = sys::ibv_device_cap_flags::IBV_DEVICE_MEM_WINDOW_TYPE_2B.0;
    let rc_rw = sys::ibv_odp_transport_cap_bits::IBV_ODP_SUPPORT_READ.0
        | sys::ibv_odp_transport_cap_bits::IBV_ODP_SUPPORT_WRITE.0;
    DeviceCaps {
        name,
        max_mw: a.orig_attr.max_mw.max(0) as u32,
        mw_type2: a.orig_attr.device_cap_flags & type2 != 0,
        odp_rc: a.odp_caps.general_caps & sys::ibv_odp_general_caps::IBV_ODP_SUPPORT.0 as u64 != 0
            && a.odp_caps.per_transport_caps.rc_odp_caps & rc_rw == rc_rw,
    }
}
