//! Packet parsing and in-place rewriting.
pub mod checksum;
pub mod rewrite;
