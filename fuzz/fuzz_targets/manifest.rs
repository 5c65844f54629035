//! Fuzz control's manifest reader and model builder, through to the table
//! and its snapshot (see `clustergate_fuzz::manifest`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| clustergate_fuzz::manifest::run(data));
