//! A scratch directory for snapshot tests: under /dev/shm (tmpfs, as in
//! production) when there is one, named with the process id and a counter,
//! removed on drop.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A fresh directory, removed on drop.
pub struct TestDir(PathBuf);

impl TestDir {
    /// A new, empty directory.
    ///
    /// # Panics
    /// When it cannot be created.
    #[must_use]
    pub fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let base = Path::new("/dev/shm");
        let base = if base.is_dir() {
            base.to_owned()
        } else {
            std::env::temp_dir()
        };
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!("clustergate-test-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        #[allow(clippy::expect_used)] // a test cannot go on without it
        fs::create_dir_all(&dir).expect("creating a scratch directory");
        Self(dir)
    }

    /// Its path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
