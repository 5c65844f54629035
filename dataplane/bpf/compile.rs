// Compiling an XDP program with clang, shared by the build scripts of the
// crates that embed one (`dataplane/build.rs`: the steering program;
// `bench/build.rs`: the sink's), which `include!` this file. Needs `clang`
// (scripts/install-deps.sh installs it); no libbpf.

use std::env;
use std::path::PathBuf;
use std::process::Command;

/// Compiles `src` (a path relative to the crate) into `$OUT_DIR/{obj}`, or
/// fails the build with a message that says what to install.
fn compile_bpf(src: &str, obj: &str) {
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-env-changed=CLANG");

    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let obj = out.join(obj);
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());

    let mut cmd = Command::new(&clang);
    cmd.args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"]);
    // <linux/types.h> includes <asm/types.h>, which lives under the host's
    // multiarch directory (e.g. /usr/include/x86_64-linux-gnu).
    if let Some(dir) = multiarch_include() {
        cmd.arg(format!("-I{dir}"));
    }
    cmd.arg("-c").arg(src).arg("-o").arg(&obj);

    let output = match cmd.output() {
        Ok(o) => o,
        Err(e) => fail(&format!(
            "cannot run `{clang}` to compile {src}: {e}\n\
             hint: scripts/install-deps.sh installs clang (or set CLANG=/path/to/clang)"
        )),
    };
    if !output.status.success() {
        fail(&format!(
            "`{cmd:?}` failed ({}):\n{}{}\n\
             hint: scripts/install-deps.sh installs clang and the kernel headers",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        ));
    }
}

/// `/usr/include/$(gcc -print-multiarch)`, if gcc answers and the directory exists.
fn multiarch_include() -> Option<String> {
    let triple = Command::new("gcc")
        .arg("-print-multiarch")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|t| !t.is_empty())
        .or_else(|| {
            // No gcc: derive the Debian triple from the target cargo builds for.
            let arch = env::var("CARGO_CFG_TARGET_ARCH").ok()?;
            let os = env::var("CARGO_CFG_TARGET_OS").ok()?;
            let envv = env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
            Some(format!("{arch}-{os}-{envv}"))
        })?;
    let dir = format!("/usr/include/{triple}");
    std::path::Path::new(&dir).is_dir().then_some(dir)
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    // Also surface the message in cargo's own error output.
    for line in msg.lines() {
        println!("cargo:warning={line}");
    }
    std::process::exit(1);
}
