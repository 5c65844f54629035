//! Running `clustergate-control` as a daemon in a test: the process and its
//! scratch directory go away with the guard; manifests are replaced
//! atomically; generations are awaited with a bound.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use clustergate_dataplane::snapshot;

/// Kills the daemon and removes its directory when dropped.
pub struct Daemon {
    pub dir: PathBuf,
    pub child: Option<Child>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Replaces `path` with `text` in one rename, as an editor or a ConfigMap
/// update would, so the daemon never reads half a manifest.
pub fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Waits (at most 30 s) until `current` in `dir` names generation `g` or later.
pub fn wait_generation(dir: &Path, g: u64) {
    let t = Instant::now();
    while snapshot::read_current(dir).ok().flatten().unwrap_or(0) < g {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "generation {g} never came"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `clustergate-control run` on the manifest at `manifest`, publishing into
/// `shm`, polling every 5 ms, logging at `info`: add flags, then spawn.
#[allow(dead_code)] // reason: not every test crate runs the daemon on a manifest
pub fn run_on_manifest(manifest: &Path, shm: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_clustergate-control"));
    c.arg("run")
        .arg("--manifest")
        .arg(manifest)
        .arg("--shm-dir")
        .arg(shm)
        .arg("--poll-ms")
        .arg("5")
        .env("RUST_LOG", "info");
    c
}
