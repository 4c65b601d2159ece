//! The eBPF object: the kernel fast path as two thin entry points, XDP (`xdp.rs`, for NICs)
//! and TC (`tc.rs`, for container veths), over one decision path (`path.rs`) built from
//! `parse`, `flow`, `select`, `nat`, `route`, `icmp` and the straight-line `fast` path, with
//! the program kind abstracted in `ctx.rs` and the maps in `maps.rs`; the connect-time
//! ambassador (`broker.rs`); and the benchmark's floors (`bench.rs`).
//! On the host this binary is an empty stub so the workspace builds and lints as a whole; the
//! real object is built for `bpfel-unknown-none` by `ambassador/build.rs`.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
// The BPF target has no compare-and-swap, so core offers no `fetch_add`; the intrinsic lowers
// to BPF's atomic add (the eBPF object is built with nightly).
#![cfg_attr(
    target_arch = "bpf",
    feature(core_intrinsics),
    allow(internal_features)
)]

#[cfg(target_arch = "bpf")]
mod bench;
#[cfg(target_arch = "bpf")]
mod broker;
#[cfg(target_arch = "bpf")]
mod ctx;
#[cfg(target_arch = "bpf")]
mod fast;
#[cfg(target_arch = "bpf")]
mod flow;
#[cfg(target_arch = "bpf")]
mod icmp;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod nat;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod path;
#[cfg(target_arch = "bpf")]
mod route;
#[cfg(target_arch = "bpf")]
mod select;
#[cfg(target_arch = "bpf")]
mod tc;
#[cfg(target_arch = "bpf")]
mod xdp;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier proves no panic path is reachable; this only satisfies the linker.
    unsafe { core::hint::unreachable_unchecked() }
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
