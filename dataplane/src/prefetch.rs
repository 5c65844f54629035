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
    // reason: on Rust 1.95 the call still needs `unsafe`, although the
    // intrinsic is a safe `fn` and SSE is an x86_64 baseline feature: a
    // `#[target_feature(enable = "sse")]` function may be called safely only
    // from one that lists the feature too (E0133, "being enabled in the build
    // configuration does not remove the requirement"), which moves the
    // `unsafe` to our callers; `core::hint::prefetch_read` is unstable
    // (rust-lang/rust#146941). Revisit when it is stable.
    #[allow(unsafe_code)]
    // SAFETY: PREFETCHT0 reads nothing architecturally and never faults, whatever
    // the address; the pointer is never dereferenced by Rust code, so no
    // validity or provenance requirement applies.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(addr as *const i8);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}
