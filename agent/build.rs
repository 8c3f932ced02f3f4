//! Embeds the kernel object. `cargo xtask build` builds it with nightly and passes its path in
//! `STATIC_EGRESS_EBPF_OBJ`; otherwise the object at its usual place in `target/` is used if
//! present, so `cargo build`/`cargo test` after an xtask build keep the programs. Without
//! either, an empty object is embedded and the agent says how to build it properly.

use std::env;
use std::fs;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=STATIC_EGRESS_EBPF_OBJ");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("static-egress.bpf.o");
    let manifest =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let default = manifest.join("../target/bpfel-unknown-none/release/static-egress-ebpf");
    let source = env::var_os("STATIC_EGRESS_EBPF_OBJ")
        .map(PathBuf::from)
        .unwrap_or(default);
    println!("cargo:rerun-if-changed={}", source.display());
    match fs::read(&source) {
        Ok(bytes) => fs::write(&out, bytes).expect("write the embedded eBPF object"),
        Err(_) => fs::write(&out, []).expect("write an empty eBPF object"),
    }
}
