//! Encoding delta snapshots (control's side): a change to some frontends,
//! published as only those frontends' blocks (`docs/shm-abi.md`, "Delta
//! files").
//!
//! Owns: [`encode_delta`]. The format (header layout, removed-key records,
//! checksums) is `clustergate_dataplane::delta`'s, which also reads it; this
//! only puts the parts together.
#![forbid(unsafe_code)]

use clustergate_dataplane::delta::{
    header_bytes, removed_record, seal_delta, DELTA_HEADER_LEN, REMOVED_RECORD_LEN,
};
use clustergate_dataplane::table::Delta;

use crate::snapshot::encode;

/// Serializes a delta: header, removed keys, then the changed frontends as
/// an embedded snapshot ([`encode`]), both checksums filled in.
#[must_use]
pub fn encode_delta(delta: &Delta) -> Vec<u8> {
    let embedded = encode(&delta.changed);
    let removed_len = delta.removed.len() * REMOVED_RECORD_LEN;
    let file_len = DELTA_HEADER_LEN + removed_len + embedded.len();
    let mut out = Vec::with_capacity(file_len);
    out.extend_from_slice(&header_bytes(
        delta.generation,
        delta.base,
        delta.removed.len() as u64,
        file_len as u64,
    ));
    for k in &delta.removed {
        out.extend_from_slice(&removed_record(k));
    }
    out.extend_from_slice(&embedded);
    seal_delta(&mut out);
    out
}
