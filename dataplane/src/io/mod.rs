//! The gateway's thin I/O layer around the pure core: AF_XDP sockets and
//! rings, the XDP steering program and its maps, next-hop resolution
//! through netlink, the node's own addresses (for node ports), and the
//! rings that hand frames between workers.
//!
//! Owns: everything that makes a syscall on the packet path's behalf. It must
//! never decide what happens to a packet (that is [`crate::pipeline`]'s job),
//! and it never allocates per packet. `unsafe` is allowed only in [`xsk`],
//! where the UMEM and rings are shared with the kernel.

pub mod handoff;
pub mod nexthop;
pub mod node_addrs;
pub mod steer;
pub mod worker;
pub mod xsk;
