//! `ambassador`: a node-level L4 ambassador whose fast path runs in XDP.
//!
//! Homes of each concern: [`config`] (the declarative file), [`select`] (the one backend
//! selection implementation), [`dataplane`] (plans; the kernel programmer; the userspace data
//! plane), [`tls`] (the TLS sidecar), [`proxy_protocol`], [`daemon`] (`ambassador run`),
//! [`status`] and [`simulate`] (CLI views), [`admin`] (the admin API, [`metrics`], runtime
//! [`overrides`]). `main.rs` only wires them.

pub mod admin;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod discovery;
pub mod gitsync;
pub mod health;
pub mod metrics;
pub mod overrides;
pub mod proxy_protocol;
pub mod select;
pub mod shard;
pub mod simulate;
pub mod status;
pub mod tls;

pub use dataplane::kernel::EBPF_OBJECT;
