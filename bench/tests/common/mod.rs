//! What both compare tests share: the binaries `compare` runs.

use std::path::PathBuf;
use std::process::Command;

/// `clustergate` and `clustergate-control`, built next to this package's
/// binary (the workspace's test command builds them; a run of this package
/// alone builds them here).
pub fn bin_dir() -> PathBuf {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_clustergate-bench"));
    let dir = bench.parent().expect("binary directory").to_path_buf();
    for (pkg, bin) in [
        ("clustergate-dataplane", "clustergate"),
        ("clustergate-control", "clustergate-control"),
    ] {
        if !dir.join(bin).exists() {
            let mut cmd = Command::new(env!("CARGO"));
            cmd.args(["build", "-p", pkg, "--bin", bin]);
            if dir.ends_with("release") {
                cmd.arg("--release");
            }
            assert!(
                cmd.status().expect("cargo build").success(),
                "building {bin}"
            );
        }
    }
    dir
}
