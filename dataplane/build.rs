//! Compiles the XDP steering program (`bpf/steer.c`) into `$OUT_DIR/steer.o`,
//! which `src/io/steer.rs` embeds (`bpf/compile.rs` does the compiling).

include!("bpf/compile.rs");

fn main() {
    println!("cargo:rerun-if-changed=bpf/compile.rs");
    println!("cargo:rerun-if-changed=bpf/xdp.h");
    compile_bpf("bpf/steer.c", "steer.o");
}
