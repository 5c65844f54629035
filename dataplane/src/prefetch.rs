//! A software prefetch hint, the one place the packet core asks the CPU to
//! start loading a cache line before it is needed (batch lookups).
//!
//! Must never: dereference the address. A prefetch of any address, even one
//! that is not mapped, is only a hint and never faults (Intel SDM Vol. 2,
//! PREFETCHh: "does not cause a fault"), so a stale or wrong address costs
//! nothing but a wasted hint.

/// Asks the CPU to bring the cache line holding `addr` into L1.
#[inline(always)]
pub fn prefetch(addr: usize) {
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)] // reason: the intrinsic is marked unsafe; see SAFETY
    // SAFETY: PREFETCHT0 reads nothing architecturally and never faults, whatever
    // the address; the pointer is never dereferenced by Rust code, so no
    // validity or provenance requirement applies.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(addr as *const i8);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}
