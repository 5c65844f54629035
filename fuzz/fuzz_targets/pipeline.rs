//! Fuzz `Worker::process` and `process_batch` over sequences of frames in
//! both directions, against a table (see `clustergate_fuzz::pipeline`).
//!
//! With `CLUSTERGATE_FUZZ_SEEDS=DIR` it writes every target's seed inputs
//! under `DIR` instead, and exits (see `clustergate_fuzz::seeds`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: {
        if let Some(dir) = std::env::var_os("CLUSTERGATE_FUZZ_SEEDS") {
            let n = clustergate_fuzz::seeds::write_all(std::path::Path::new(&dir));
            eprintln!("{n} seed inputs written under {}", dir.to_string_lossy());
            std::process::exit(0);
        }
    },
    |data: &[u8]| clustergate_fuzz::pipeline::run(data)
);
