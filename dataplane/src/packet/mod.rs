//! Packet parsing and in-place rewriting.
//!
//! Owns: [`parse`] (validate and slice a frame: [`view`]'s fixed-offset
//! header views for the common frames, etherparse for the rest), [`checksum`]
//! (RFC 1071 sums and RFC 1624 incremental updates), [`rewrite`] (small named
//! in-place rewrites of addresses, ports, MACs and TTL), and [`reject`] (TCP RST
//! and ICMP port unreachable built in place, and the ICMP too-big answer), and
//! [`encap`] (IP-in-IP for direct server return).
//!
//! Must never: panic on any input or allocate.
#![forbid(unsafe_code)] // The pure core: no unsafe, ever (the I/O rings and shared memory keep theirs).

pub mod checksum;
pub mod encap;
pub mod parse;
pub mod reject;
pub mod rewrite;
pub mod view;
