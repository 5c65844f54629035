//! clustergate's dataplane library: the pure per-packet core.
//!
//! Bytes and a `now` go in; a [`pipeline::Verdict`] and rewritten bytes come out.
//! Nothing in this crate's library reads a clock, makes a syscall, spawns a
//! thread or allocates per packet: the same code runs in unit tests, fuzzers,
//! criterion benches, offline pcap replay and the AF_XDP workers.
//!
//! Modules, in the order a packet meets them:
//! - [`packet`]: parsing (etherparse) and in-place rewrites with incremental
//!   checksums (RFC 1624), plus the reject frames (TCP RST, ICMP unreachable).
//! - [`flow`]: the 5-tuple and the flow hash (ABI).
//! - [`table`]: the immutable service table (frontends, backends, Maglev
//!   rings) and its lookups. Control builds tables (the `clustergate-builder`
//!   crate: Maglev rings, specs, the snapshot writer); the dataplane only
//!   looks them up.
//! - [`conntrack`]: the shared connection and affinity tables.
//! - [`snat`]: the gateway's side of the return paths: SNAT ports, their
//!   split between workers, and the source address of a flow.
//! - [`policy`]: NetworkPolicy as compiled by control, one lookup per new flow.
//! - [`pipeline`]: `process(now, frame) -> Verdict`, per-core counters.
//! - [`io`]: the gateway's I/O layer (AF_XDP, the XDP steering program,
//!   netlink next hops). The only module that makes syscalls.
//! - [`testkit`]: frame fixtures built with etherparse, shared by tests and benches.

// The unit tests of `io::steer` need tables built the way control builds
// them; they compile the builder's sources into this crate (`test_builder`)
// and name this crate as the builder does.
#[cfg(test)]
extern crate self as clustergate_dataplane;

pub mod cli;
pub mod conntrack;
pub mod delta;
pub mod flow;
pub mod io;
pub mod packet;
pub mod pipeline;
pub mod policy;
pub mod prefetch;
pub mod snapshot;
pub mod snat;
pub mod table;
#[cfg(test)]
mod test_builder;
pub mod testkit;
pub mod time;
pub mod verdict;
