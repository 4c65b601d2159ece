//! `ambassador`: a node-level L4 ambassador whose fast path runs in XDP.
//!
//! Homes of each concern: [`config`] (the declarative file), [`select`] (the one backend
//! selection implementation), [`dataplane`] (plans and the kernel programmer), [`daemon`]
//! (`ambassador run`), [`status`] and [`simulate`] (CLI views). `main.rs` only wires them.

pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod select;
pub mod simulate;
pub mod status;

pub use dataplane::kernel::EBPF_OBJECT;
