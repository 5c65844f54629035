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
//! - [`table`]: the immutable service table (frontends, backends, Maglev rings).
//! - [`maglev`]: the Maglev ring builder, used by control (the dataplane only
//!   indexes rings).
//! - [`conntrack`]: the shared connection and affinity tables.
//! - [`snat`]: the gateway's side of the return paths: SNAT ports, their
//!   split between workers, and the source address of a flow.
//! - [`policy`]: NetworkPolicy as compiled by control, one lookup per new flow.
//! - [`pipeline`]: `process(now, frame) -> Verdict`, per-core counters.
//! - [`io`]: the gateway's I/O layer (AF_XDP, the XDP steering program,
//!   netlink next hops). The only module that makes syscalls.
//! - [`testkit`]: frame fixtures built with etherparse, shared by tests and benches.

pub mod cli;
pub mod conntrack;
pub mod delta;
pub mod flow;
pub mod io;
pub mod maglev;
pub mod packet;
pub mod pipeline;
pub mod policy;
pub mod prefetch;
pub mod snapshot;
pub mod snat;
pub mod table;
pub mod testkit;
pub mod time;
pub mod verdict;
