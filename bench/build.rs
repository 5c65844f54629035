//! Compiles the sink's XDP program (`bpf/sink.c`) into `$OUT_DIR/sink.o`,
//! which `src/xdp_sink.rs` embeds, with the dataplane's build helper
//! (`dataplane/bpf/compile.rs`).

include!("../dataplane/bpf/compile.rs");

fn main() {
    println!("cargo:rerun-if-changed=../dataplane/bpf/compile.rs");
    println!("cargo:rerun-if-changed=../dataplane/bpf/xdp.h");
    compile_bpf("bpf/sink.c", "sink.o");
}
