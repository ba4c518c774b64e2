//! CPU cache write-back primitives, chosen once at run time by CPUID.
//!
//! On a DAX mapping (device-DAX, or fs-DAX with `MAP_SYNC`) a store is durable once its
//! cache line has been written back to the memory controller (ADR domain). The preferred
//! instruction is `CLWB` (write back, keep the line cached), then `CLFLUSHOPT` (write back
//! and evict, weakly ordered), then `CLFLUSH` (write back and evict, serialising). The weakly
//! ordered ones need an `SFENCE` before the data can be called durable.
//!
//! `_mm_clwb`/`_mm_clflushopt` are not stable in Rust 1.95, so those two are inline `asm!`.

use super::Persistence;

/// Cache line size assumed by the flush loops (every x86-64 part with these instructions).
pub const CACHE_LINE: u64 = 64;

/// Pick the best cache write-back instruction this CPU has.
pub fn detect() -> Persistence {
    #[cfg(target_arch = "x86_64")]
    {
        // CPUID leaf 7 sub-leaf 0, EBX bit 24 = CLWB, bit 23 = CLFLUSHOPT.
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        if leaf7.ebx & (1 << 24) != 0 {
            return Persistence::Clwb;
        }
        if leaf7.ebx & (1 << 23) != 0 {
            return Persistence::Clflushopt;
        }
        Persistence::Clflush
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Persistence::Msync
    }
}

/// Write back every cache line overlapping `[ptr, ptr + len)` with `method`.
///
/// # Safety
/// `ptr..ptr + len` must lie inside one live mapping owned by the caller. `method` must be
/// one of the cache-line methods and supported by this CPU (as returned by [`detect`]).
pub unsafe fn flush_lines(method: Persistence, ptr: *const u8, len: usize) {
    if len == 0 {
        return;
    }
    let start = (ptr as usize) & !(CACHE_LINE as usize - 1);
    let end = ptr as usize + len;
    let mut line = start;
    while line < end {
        // SAFETY: `line` is inside (or on the cache line containing the start of) the caller's
        // mapping; cache write-back instructions do not modify memory and only need the address
        // to be mapped, which the caller guarantees.
        unsafe { flush_one(method, line as *const u8) };
        line += CACHE_LINE as usize;
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn flush_one(method: Persistence, p: *const u8) {
    match method {
        // SAFETY: CLWB writes back one mapped cache line; the caller checked CPU support.
        Persistence::Clwb => unsafe {
            std::arch::asm!("clwb [{0}]", in(reg) p, options(nostack, preserves_flags));
        },
        // SAFETY: as above for CLFLUSHOPT.
        Persistence::Clflushopt => unsafe {
            std::arch::asm!("clflushopt [{0}]", in(reg) p, options(nostack, preserves_flags));
        },
        // SAFETY: CLFLUSH is baseline x86-64 (SSE2); `p` is mapped.
        Persistence::Clflush => unsafe { std::arch::x86_64::_mm_clflush(p) },
        other => unreachable!("flush_one called with {other:?}"),
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn flush_one(_method: Persistence, _p: *const u8) {
    unreachable!("cache-line flushes are only used on x86-64")
}

/// Below this many bytes a plain copy plus write-back is as fast as streaming stores.
pub const NT_THRESHOLD: usize = 256;

/// Copy `len` bytes from `src` to `dst` so that, after an [`sfence`], they are durable:
/// whole cache lines with non-temporal (streaming) stores, partial lines at either end with
/// ordinary stores plus a write-back with `method`.
///
/// # Safety
/// `dst..dst + len` must lie inside one live mapping owned by the caller and must not overlap
/// `src..src + len`, which must be readable. `method` as for [`flush_lines`].
pub unsafe fn copy_flushed(method: Persistence, dst: *mut u8, src: *const u8, len: usize) {
    let start = dst as usize;
    let end = start + len;
    let a = (start + CACHE_LINE as usize - 1) & !(CACHE_LINE as usize - 1);
    let b = end & !(CACHE_LINE as usize - 1);
    if !cfg!(target_arch = "x86_64") || len < NT_THRESHOLD || b <= a {
        // SAFETY: the caller guarantees both ranges are valid and disjoint.
        unsafe {
            std::ptr::copy_nonoverlapping(src, dst, len);
            flush_lines(method, dst, len);
        }
        return;
    }
    let head = a - start;
    let tail = end - b;
    // SAFETY: head, body and tail partition `dst..dst + len` (and `src` alike), which the
    // caller guarantees are valid and disjoint.
    unsafe {
        std::ptr::copy_nonoverlapping(src, dst, head);
        flush_lines(method, dst, head);
        stream_lines(dst.add(head), src.add(head), b - a);
        std::ptr::copy_nonoverlapping(src.add(len - tail), dst.add(len - tail), tail);
        flush_lines(method, dst.add(len - tail), tail);
    }
}

#[cfg(target_arch = "x86_64")]
unsafe fn stream_lines(dst: *mut u8, src: *const u8, len: usize) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
    let mut i = 0;
    while i < len {
        // SAFETY: `dst + i` is 16-byte aligned (dst is cache-line aligned, i a multiple of 16)
        // and inside the caller's range; `src + i` is readable (unaligned load).
        unsafe {
            let v = _mm_loadu_si128(src.add(i).cast::<__m128i>());
            _mm_stream_si128(dst.add(i).cast::<__m128i>(), v);
        }
        i += 16;
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn stream_lines(_dst: *mut u8, _src: *const u8, _len: usize) {
    unreachable!("streaming stores are only used on x86-64")
}

/// Store fence: every earlier flush is complete (globally visible, hence in the ADR domain).
#[inline]
pub fn sfence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SFENCE has no memory operands and is baseline on x86-64.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
    #[cfg(not(target_arch = "x86_64"))]
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detect_returns_a_cache_line_method_on_x86() {
        let m = detect();
        if cfg!(target_arch = "x86_64") {
            assert!(matches!(m, Persistence::Clwb | Persistence::Clflushopt | Persistence::Clflush));
        }
    }

    #[test]
    fn copy_flushed_copies_every_byte_at_any_alignment() {
        let method = detect();
        if !cfg!(target_arch = "x86_64") {
            return;
        }
        let src: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 256) as u8).collect();
        for (dst_off, len) in [(0, 5000), (1, 4000), (13, 300), (63, 64), (5, 10), (64, 256)] {
            let mut dst = vec![0u8; 5100];
            // SAFETY: `dst_off + len <= dst.len()`, `len <= src.len()`, distinct buffers.
            unsafe { copy_flushed(method, dst.as_mut_ptr().add(dst_off), src.as_ptr(), len) };
            sfence();
            assert_eq!(&dst[dst_off..dst_off + len], &src[..len], "offset {dst_off} len {len}");
            assert!(dst[..dst_off].iter().all(|&b| b == 0));
            assert!(dst[dst_off + len..].iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn every_method_flushes_unaligned_ranges_without_faulting() {
        let buf = vec![7u8; 4096 + 3];
        for m in [Persistence::Clwb, Persistence::Clflushopt, Persistence::Clflush] {
            let supported = matches!(
                (detect(), m),
                (_, Persistence::Clflush) | (Persistence::Clwb, _) | (Persistence::Clflushopt, Persistence::Clflushopt)
            );
            if !supported || !cfg!(target_arch = "x86_64") {
                continue;
            }
            // SAFETY: the range is inside `buf`, which lives for the whole call.
            unsafe { flush_lines(m, buf.as_ptr().add(1), buf.len() - 1) };
            sfence();
            assert!(buf.iter().all(|&b| b == 7), "flushing must not change memory");
        }
    }
}
