//! Fuzz the snapshot reader, `snapshot::decode`, on arbitrary bytes and on
//! valid snapshots with bytes changed (see `clustergate_fuzz::snapshot`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| clustergate_fuzz::snapshot::run(data));
