//! The table builder's sources (`clustergate-builder`: Maglev rings and
//! tables from specs), compiled into this crate's unit tests only.
//!
//! The unit tests of `io::steer` check private parts of the steering
//! tracker against tables built as control builds them: shared blocks,
//! versions, deltas. Through a dev-dependency the builder would link a
//! second copy of this crate, whose `Table` is another type; compiled in
//! here, it builds this crate's own tables. The builder's own unit tests
//! run in its crate, not again here (`clustergate_builder_in_dataplane`,
//! set by `build.rs`). The gateway binary and the library never include
//! it.
#![allow(dead_code, reason = "the steering tests use a part of the builder")]

#[path = "../builder/src/maglev.rs"]
pub mod maglev;
#[path = "../builder/src/table.rs"]
pub mod table;
