//! rdax's RDMA layer: just enough of libibverbs and librdmacm for the rdax RDMA transport,
//! with completions and connection events delivered on the tokio reactor.
//!
//! Unsafe code lives here and only here; each block says why it is sound. The libraries are
//! loaded at run time by `rdma-mummy-sys`, so a binary with RDMA starts on a host without
//! rdma-core and [`devices`] says there is no RDMA.

mod cm;
mod conn;
mod device;
mod error;
mod mem;
mod slots;

pub use cm::{CmEvent, CmId, EventChannel, event, event_str};
pub use conn::{ACK_TIMEOUT, ArmGuard, Conn, MSG_LEN, Msg, RD_ATOMIC, RECV_SLOTS, RNR_RETRY, Received, SEND_DEPTH, Wr};
pub use device::{DeviceCaps, NoRdma, devices, query};
pub use error::{Error, Result};
pub use mem::{Access, Mr, Mw, Pd, RegBuf};

/// `IBV_WC_REM_ACCESS_ERR`: the target refused an RDMA access.
pub const WC_REM_ACCESS_ERR: u32 = rdma_mummy_sys::ibv_wc_status::IBV_WC_REM_ACCESS_ERR;

/// Name of a work-completion status.
pub fn wc_status_str(status: u32) -> String {
    // SAFETY: returns a static string for any value.
    let s = unsafe { std::ffi::CStr::from_ptr(rdma_mummy_sys::ibv_wc_status_str(status)) };
    format!("{} ({status})", s.to_string_lossy())
}
