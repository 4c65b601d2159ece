//! Link flags for the BPF object only (the host build of this crate is a plain library).
fn main() {
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("bpf") {
        // Packet headers sit at 2-byte offsets (14-byte Ethernet header): without this, every
        // 4- or 16-byte field read is split into byte loads, shifts and ors. x86-64, arm64 and
        // the other 64-bit JITs handle misaligned packet access natively, and the verifier
        // allows it on them (it stays strict about the stack, which LLVM keeps aligned).
        println!("cargo:rustc-link-arg-bins=--cpu-features=+allows-misaligned-mem-access");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
