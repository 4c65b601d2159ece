//! `ambassador simulate`: what share of clients each backend would get, and with `--against`
//! how many clients a config change would move; with `--pcap`, what the XDP program does with
//! each captured packet. Uses the kernel's own selection code and [`packet`]'s reading of a
//! frame, which the packet fuzzer checks against the kernel's.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use serde::Serialize;

use anyhow::{bail, Context as _};

use crate::{
    config::Config,
    dataplane::{packet, Plan, ServicePlan},
};

#[derive(Debug, Serialize, PartialEq)]
pub struct Simulation {
    pub clients: u32,
    pub services: Vec<ServiceSimulation>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct ServiceSimulation {
    pub name: String,
    pub backends: Vec<BackendShare>,
    /// With `--against`: fraction of clients whose backend changes (None: no such service there).
    pub moved: Option<f64>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct BackendShare {
    pub name: String,
    pub weight: u32,
    /// weight / total weight
    pub expected: f64,
    /// fraction of simulated clients it gets
    pub predicted: f64,
}

/// Deterministic client addresses (splitmix64), of the service's family, random ports.
pub fn clients(n: u32, v6: bool, seed: u64) -> impl Iterator<Item = SocketAddr> {
    let mut x = seed;
    (0..n).map(move |_| {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let port = 1024 + (z >> 48) as u16 % 64_000;
        let ip = if v6 {
            IpAddr::V6(Ipv6Addr::from(((0xfd00u128) << 112) | (z as u128) << 16))
        } else {
            IpAddr::V4(Ipv4Addr::from((z as u32) | 0x0100_0000))
        };
        SocketAddr::new(ip, port)
    })
}

pub fn simulate(cfg: &Config, against: Option<&Config>, n: u32, seed: u64) -> Simulation {
    let plan = Plan::build(cfg);
    let other = against.map(Plan::build);
    let services = plan
        .services
        .iter()
        .map(|s| one(s, other.as_ref().map(|o| o.service(&s.name)), n, seed))
        .collect();
    Simulation {
        clients: n,
        services,
    }
}

fn one(
    s: &ServicePlan,
    other: Option<Option<&ServicePlan>>,
    n: u32,
    seed: u64,
) -> ServiceSimulation {
    let total: u32 = s.backends.iter().map(|b| b.weight).sum();
    let mut counts = vec![0u32; s.backends.len()];
    let mut moved = 0u32;
    let v6 = s.listen.addr.is_ipv6();
    for c in clients(n, v6, seed) {
        let Some(b) = s.pick(c) else { continue };
        let i = s
            .backends
            .iter()
            .position(|x| std::ptr::eq(x, b))
            .unwrap_or(0);
        counts[i] += 1;
        if let Some(Some(o)) = other {
            if o.pick(c).map(|x| (x.id(), x.address)) != Some((b.id(), b.address)) {
                moved += 1;
            }
        }
    }
    ServiceSimulation {
        name: s.name.clone(),
        backends: s
            .backends
            .iter()
            .zip(&counts)
            .map(|(b, &c)| BackendShare {
                name: b.id(),
                weight: b.weight,
                expected: b.weight as f64 / total.max(1) as f64,
                predicted: c as f64 / n.max(1) as f64,
            })
            .collect(),
        moved: match other {
            Some(Some(_)) => Some(moved as f64 / n.max(1) as f64),
            _ => None,
        },
    }
}

pub fn render(sim: &Simulation) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "{} simulated clients per service\n", sim.clients);
    let _ = writeln!(
        o,
        "{:<16} {:<18} {:>6} {:>9} {:>10}",
        "SERVICE", "BACKEND", "WEIGHT", "EXPECTED", "PREDICTED"
    );
    for s in &sim.services {
        for (i, b) in s.backends.iter().enumerate() {
            let n = if i == 0 { s.name.as_str() } else { "" };
            let _ = writeln!(
                o,
                "{n:<16} {:<18} {:>6} {:>8.2}% {:>9.2}%",
                b.name,
                b.weight,
                100.0 * b.expected,
                100.0 * b.predicted
            );
        }
        if let Some(m) = s.moved {
            let _ = writeln!(o, "{:<16} {:.2}% of clients change backend", "", 100.0 * m);
        }
    }
    o
}

/// What XDP does with one captured packet.
#[derive(Debug, Serialize, PartialEq)]
pub struct PacketVerdict {
    /// 1-based, as tcpdump and Wireshark number packets.
    pub packet: usize,
    pub service: Option<String>,
    pub backend: Option<String>,
    pub address: Option<SocketAddr>,
    /// What happens, in words.
    pub verdict: String,
}

/// The Ethernet frames of a pcap capture.
pub fn read_pcap(path: &std::path::Path) -> anyhow::Result<Vec<Vec<u8>>> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("opening the capture {}", path.display()))?;
    let mut r = pcap_file::pcap::PcapReader::new(file).with_context(|| {
        format!(
            "{} is not a pcap capture (a pcapng file converts with `tcpdump -r IN -w OUT.pcap`)",
            path.display()
        )
    })?;
    let link = r.header().datalink;
    if link != pcap_file::DataLink::ETHERNET {
        bail!(
            "{} captured {link:?} frames; XDP sees Ethernet: capture on the interface itself \
             (`tcpdump -i eth0 -w FILE`), not `-i any`",
            path.display()
        );
    }
    let mut frames = Vec::new();
    while let Some(p) = r.next_packet() {
        let p = p.with_context(|| {
            format!("reading packet {} of {}", frames.len() + 1, path.display())
        })?;
        frames.push(p.data.into_owned());
    }
    Ok(frames)
}

/// Each frame's fate as the first packet of a flow.
pub fn packets(cfg: &Config, frames: &[Vec<u8>]) -> Vec<PacketVerdict> {
    let plan = Plan::build(cfg);
    frames
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let parsed = packet::parse(f);
            let v = packet::decide(&plan, parsed);
            let (service, backend, address) = match &v {
                packet::Verdict::Backend { service, backend } => (
                    Some(service.name.clone()),
                    Some(backend.id()),
                    Some(backend.address),
                ),
                packet::Verdict::ToStack { service } | packet::Verdict::NoBackend { service } => {
                    (Some(service.name.clone()), None, None)
                }
                packet::Verdict::Pass(_) => (None, None, None),
            };
            let flow = match parsed {
                packet::Parsed::Flow { ip, sport, dport } => format!(
                    "{} → {} ",
                    SocketAddr::new(ip.src, sport),
                    SocketAddr::new(ip.dst, dport)
                ),
                _ => String::new(),
            };
            PacketVerdict {
                packet: i + 1,
                service,
                backend,
                address,
                verdict: format!("{flow}{}", v.describe()),
            }
        })
        .collect()
}

pub fn render_packets(v: &[PacketVerdict]) -> String {
    let mut o = String::new();
    for p in v {
        let _ = writeln!(o, "{:>6}  {}", p.packet, p.verdict);
    }
    let to_backend = v.iter().filter(|p| p.backend.is_some()).count();
    let _ = writeln!(
        o,
        "{} packets: {to_backend} to a backend as new flows, {} passed",
        v.len(),
        v.len() - to_backend
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cfg(w: u32, extra: &str) -> Config {
        Config::parse(
            Path::new("t.yaml"),
            &format!(
                "services:\n  - name: frontend\n    listen: 10.200.0.100:80/tcp\n    split:\n      backends:\n        - {{ name: web, address: 10.200.2.2:80, weight: {w} }}\n        - {{ name: experiment, address: 10.200.3.2:80, weight: 1 }}\n{extra}"
            ),
        )
        .unwrap()
    }

    #[test]
    fn ninety_ten_split_is_predicted() {
        let s = simulate(&cfg(9, ""), None, 100_000, 1);
        let b = &s.services[0].backends;
        assert!((b[0].predicted - 0.9).abs() < 0.01, "{b:?}");
        assert!((b[1].predicted - 0.1).abs() < 0.01, "{b:?}");
        assert_eq!(s.services[0].moved, None);
    }

    #[test]
    fn against_counts_moved_clients() {
        let same = simulate(&cfg(9, ""), Some(&cfg(9, "")), 50_000, 1);
        assert_eq!(same.services[0].moved, Some(0.0));
        // 9:1 → 1:1 moves web's surplus (0.9 - 0.5 = 0.4) to experiment and nothing else.
        let s = simulate(&cfg(9, ""), Some(&cfg(1, "")), 50_000, 1);
        let m = s.services[0].moved.unwrap();
        assert!((m - 0.4).abs() < 0.015, "moved {m}");
    }
}
