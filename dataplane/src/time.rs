//! Time as the core sees it: a value handed in by the caller, never read here.
#![forbid(unsafe_code)] // The pure core: no unsafe, ever (the I/O rings and shared memory keep theirs).

/// A point on a monotonic clock, in nanoseconds from an arbitrary origin.
///
/// The gateway fills it from `CLOCK_MONOTONIC` once per batch; replay fills it
/// from pcap timestamps; tests move it by hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Now(pub u64);

impl Now {
    /// From whole seconds.
    #[must_use]
    pub const fn from_secs(s: u64) -> Self {
        Self(s.saturating_mul(1_000_000_000))
    }

    /// Whole seconds since the origin, saturated to `u32` (enough for 136 years).
    #[must_use]
    pub const fn secs32(self) -> u32 {
        let s = self.0 / 1_000_000_000;
        if s > u32::MAX as u64 {
            u32::MAX
        } else {
            s as u32
        }
    }

    /// This instant plus `s` seconds.
    #[must_use]
    pub const fn plus_secs(self, s: u64) -> Self {
        Self(self.0.saturating_add(s.saturating_mul(1_000_000_000)))
    }
}
