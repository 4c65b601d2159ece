//! `ambassador status`: services, backends, weights and kernel counters of the running daemon.

use std::{fmt::Write as _, path::Path};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::{daemon::State, dataplane::kernel::Stats};

#[derive(Debug, Serialize, Deserialize)]
pub struct StatusReport {
    pub pid: u32,
    pub dataplane: String,
    pub generation: u64,
    pub config: String,
    pub interfaces: Vec<String>,
    /// Which program runs on each interface (kernel data plane only).
    pub attachments: Vec<crate::dataplane::attach::Attachment>,
    pub last_error: Option<String>,
    pub services: Vec<ServiceStatus>,
    /// Kernel counters (kernel data plane only; empty otherwise).
    pub kernel: Vec<(String, u64)>,
    /// Counters of the TLS sidecar and the userspace data plane.
    pub userspace: Vec<(String, u64)>,
    /// The sharding services' stats, in twemproxy's stats-port format.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub shards: serde_json::Value,
    /// The git syncs: the config's own repository (`--config-git`) and `gitsync:` jobs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gitsync: Vec<crate::gitsync::Status>,
    /// Brokered services' discovery: serving set, last success, and the error while stale.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub discovery: Vec<crate::discovery::DiscoveryStatus>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub listen: String,
    pub key: String,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub backends: Vec<BackendStatus>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BackendStatus {
    pub name: String,
    pub address: String,
    /// The weight in force: the config's, or one set with `set-weight`.
    pub weight: u32,
    /// Set with `drain`: takes no new flows, open ones continue.
    pub drained: bool,
    /// Flows to this backend the connection table holds open (kernel data plane only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_flows: Option<u64>,
    /// `healthy` or `unhealthy` for a service with `health`; absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
    /// The check result behind `health` when it failed at least once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_reason: Option<String>,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

pub fn report(state_dir: &Path) -> Result<StatusReport> {
    let state = State::read(state_dir)?;
    let stats = match &state.pin_dir {
        Some(dir) => Stats::read_pinned(dir)?,
        None => Stats::default(),
    };
    let open = match &state.pin_dir {
        Some(dir) => Some(crate::dataplane::kernel::open_flows_pinned(dir)?),
        None => None,
    };
    // Brokered services show the endpoints discovery found.
    let config = crate::discovery::overlay(&state.config, &state.discovery);
    let services = config
        .services
        .iter()
        .map(|s| {
            let backends: Vec<BackendStatus> = s
                .split
                .backends
                .iter()
                .map(|b| {
                    let bc = state
                        .ids
                        .backends
                        .iter()
                        .find(|(sn, bn, _)| *sn == s.name && *bn == b.id())
                        .and_then(|(_, _, id)| stats.backends.get(*id as usize))
                        .copied()
                        .unwrap_or_default();
                    let o = state.overrides.get(&s.name, &b.id());
                    let h = state
                        .health
                        .iter()
                        .find(|h| h.service == s.name && h.backend == b.id());
                    BackendStatus {
                        name: b.id(),
                        address: b.address.to_string(),
                        weight: o.and_then(|o| o.weight).unwrap_or(b.weight),
                        drained: o.is_some_and(|o| o.drained),
                        health: s.health.as_ref().map(|_| {
                            match h {
                                Some(h) if !h.healthy => "unhealthy",
                                _ => "healthy",
                            }
                            .to_string()
                        }),
                        health_reason: h.map(|h| h.reason.clone()),
                        open_flows: open
                            .as_ref()
                            .map(|m| m.get(&b.address).copied().unwrap_or(0)),
                        packets: bc.packets,
                        bytes: bc.bytes,
                        new_flows: bc.new_flows,
                    }
                })
                .collect();
            ServiceStatus {
                name: s.name.clone(),
                listen: s.listen.to_string(),
                key: serde_json::to_value(s.split.key)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default(),
                packets: backends.iter().map(|b| b.packets).sum(),
                bytes: backends.iter().map(|b| b.bytes).sum(),
                new_flows: backends.iter().map(|b| b.new_flows).sum(),
                backends,
            }
        })
        .collect();
    Ok(StatusReport {
        pid: state.pid,
        dataplane: serde_json::to_value(state.dataplane)?
            .as_str()
            .unwrap_or_default()
            .to_string(),
        generation: state.generation,
        config: state.config_path.display().to_string(),
        interfaces: state.interfaces,
        attachments: state.attachments,
        last_error: state.last_error,
        services,
        kernel: if state.pin_dir.is_some() {
            stats.global
        } else {
            Vec::new()
        },
        userspace: state.userspace,
        shards: state.shards,
        gitsync: state.gitsync,
        discovery: state.discovery,
    })
}

pub fn render(r: &StatusReport) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "ambassador pid {} · config {} (generation {}) · {}",
        r.pid,
        r.config,
        r.generation,
        if r.dataplane == "kernel" {
            crate::dataplane::attach::describe(&r.attachments)
        } else {
            "userspace data plane".to_string()
        }
    );
    if let Some(e) = &r.last_error {
        let _ = writeln!(
            o,
            "last reload REJECTED (still serving generation {}): {e}",
            r.generation
        );
    }
    for d in &r.discovery {
        if let Some(e) = &d.last_error {
            let _ = writeln!(
                o,
                "discovery {} ({}): STALE, serving the last good set of {}: {e}",
                d.service,
                d.name,
                d.backends.len()
            );
        }
        if !d.draining.is_empty() {
            let list: Vec<_> = d.draining.iter().map(|a| a.to_string()).collect();
            let _ = writeln!(
                o,
                "discovery {} ({}): draining {} (terminating: open flows continue, no new ones)",
                d.service,
                d.name,
                list.join(", ")
            );
        }
    }
    for g in &r.gitsync {
        let short = |c: &Option<String>| c.as_deref().map(|c| c[..c.len().min(12)].to_string());
        let _ = writeln!(
            o,
            "gitsync {}: published {} · {} consecutive failure(s){}{}",
            g.name,
            short(&g.published).unwrap_or_else(|| "nothing".into()),
            g.consecutive_failures,
            short(&g.rejected)
                .map(|c| format!(" · rejected {c}"))
                .unwrap_or_default(),
            g.last_error
                .as_ref()
                .map(|e| format!(" · last error: {e}"))
                .unwrap_or_default()
        );
    }
    let _ = writeln!(
        o,
        "\n{:<16} {:<24} {:<12} {:<18} {:<24} {:>8} {:>10} {:>12} {:>10} {:>7} {:>6}",
        "SERVICE",
        "LISTEN",
        "KEY",
        "BACKEND",
        "ADDRESS",
        "WEIGHT",
        "PACKETS",
        "BYTES",
        "NEW FLOWS",
        "SHARE",
        "OPEN"
    );
    for s in &r.services {
        for (i, b) in s.backends.iter().enumerate() {
            let share = if s.new_flows > 0 {
                format!("{:.1}%", 100.0 * b.new_flows as f64 / s.new_flows as f64)
            } else {
                "-".into()
            };
            let (n, l, k) = if i == 0 {
                (s.name.as_str(), s.listen.as_str(), s.key.as_str())
            } else {
                ("", "", "")
            };
            let weight = if b.drained {
                "drained".to_string()
            } else if b.health.as_deref() == Some("unhealthy") {
                "DOWN".to_string()
            } else {
                b.weight.to_string()
            };
            let open = b.open_flows.map_or("-".to_string(), |n| n.to_string());
            let _ = writeln!(
                o,
                "{n:<16} {l:<24} {k:<12} {:<18} {:<24} {weight:>8} {:>10} {:>12} {:>10} {share:>7} {open:>6}",
                b.name, b.address, b.packets, b.bytes, b.new_flows
            );
        }
        if let Some(pool) = r.shards.get(&s.name) {
            let _ = writeln!(
                o,
                "{:<16} {:<24} redis sharding ambassador:",
                s.name, s.listen
            );
            let _ = writeln!(
                o,
                "    {:<24} {:>10} {:>10} {:>8} {:>9} {:>8}",
                "SHARD", "REQUESTS", "RESPONSES", "ERRORS", "TIMEDOUT", "EJECTED"
            );
            if let Some(m) = pool.as_object() {
                for (name, v) in m.iter().filter(|(_, v)| v.is_object()) {
                    let n = |k: &str| v[k].as_u64().unwrap_or(0);
                    let _ = writeln!(
                        o,
                        "    {name:<24} {:>10} {:>10} {:>8} {:>9} {:>8}",
                        n("requests"),
                        n("responses"),
                        n("server_err") + n("server_eof"),
                        n("server_timedout"),
                        if n("server_ejected_at") > 0 {
                            "yes"
                        } else {
                            "-"
                        }
                    );
                }
            }
            continue;
        }
        if s.backends.is_empty() {
            let _ = writeln!(
                o,
                "{:<16} {:<24} {:<12} (no backends)",
                s.name, s.listen, s.key
            );
        }
    }
    if r.kernel.is_empty() {
        let _ = writeln!(
            o,
            "\n(per-backend packets, bytes and new flows are counted by XDP; this daemon runs the userspace data plane)"
        );
    } else {
        let _ = writeln!(o, "\nkernel:");
        for (k, v) in &r.kernel {
            let _ = writeln!(o, "  {k:<20} {v}");
        }
    }
    let _ = writeln!(o, "\nuserspace (TLS sidecar, userspace data plane):");
    for (k, v) in &r.userspace {
        let _ = writeln!(o, "  {k:<20} {v}");
    }
    o
}
