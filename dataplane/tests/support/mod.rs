//! What the root-only integration tests share.

/// Effective uid 0, from /proc/self/status (no libc call).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// True when `test` may run. Without root it skips with a message naming
/// what it `needs`, except under CI: CI runs as root, so a skip there would
/// hide a defect, and the test fails instead.
pub fn root_or_skip(test: &str, needs: &str) -> bool {
    if is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: needs root, and CI runs as root: a skip here would hide a failure"
    );
    eprintln!("{test}: skipped: needs root ({needs})");
    false
}
