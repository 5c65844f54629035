//! Compiles the XDP steering program (`bpf/steer.c`) into `$OUT_DIR/steer.o`,
//! which `src/io/steer.rs` embeds (`bpf/compile.rs` does the compiling), and
//! sets `CLUSTERGATE_GIT_COMMIT` for `--version`: `git rev-parse --short=12
//! HEAD`, or `CLUSTERGATE_GIT_COMMIT`
//! from the environment (an image build without `.git`), else `unknown`.

include!("bpf/compile.rs");

fn main() {
    println!("cargo:rerun-if-changed=bpf/compile.rs");
    println!("cargo:rerun-if-changed=bpf/xdp.h");
    compile_bpf("bpf/steer.c", "steer.o");
    println!("cargo:rustc-env=CLUSTERGATE_GIT_COMMIT={}", git_commit());
    // The builder's sources compiled into this crate's unit tests
    // (`src/test_builder.rs`) leave their own unit tests to their crate.
    println!("cargo::rustc-cfg=clustergate_builder_in_dataplane");
}

/// The commit being built, for `--version`.
fn git_commit() -> String {
    println!("cargo:rerun-if-env-changed=CLUSTERGATE_GIT_COMMIT");
    if let Ok(c) = std::env::var("CLUSTERGATE_GIT_COMMIT") {
        if !c.trim().is_empty() {
            return c.trim().to_owned();
        }
    }
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    // Rebuild when HEAD moves (a worktree's HEAD lives in its own git dir).
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        println!("cargo:rerun-if-changed={dir}/HEAD");
        if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
            if let Some(common) = git(&["rev-parse", "--git-common-dir"]) {
                println!("cargo:rerun-if-changed={common}/{r}");
            }
        }
    }
    git(&["rev-parse", "--short=12", "HEAD"])
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}
