//! Builds the eBPF object (`ambassador-ebpf`, target bpfel-unknown-none, nightly toolchain)
//! into OUT_DIR, where `dataplane::kernel` embeds it.
use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let ebpf = Package {
        name: "ambassador-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../ambassador-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::Nightly).context(
        "building the eBPF program failed: it needs the nightly toolchain with rust-src and \
         bpf-linker (`cargo xtask setup` installs them)",
    )
}
