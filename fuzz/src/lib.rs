//! The fuzz targets' code: each target's input format and checks, and the
//! seed inputs ([`seeds`]). `docs/fuzzing.md` describes the targets.

pub mod manifest;
pub mod pipeline;
pub mod seeds;
pub mod snapshot;
