//! The XDP program's reading of a frame, in userspace: the same parse and the same service
//! lookup, so `ambassador simulate --pcap` says what XDP does with captured packets. The packet
//! fuzzer (tests/tests/fuzz_packets.rs) runs both on every input and checks they agree; the
//! cargo-fuzz target `packet` checks this parser on arbitrary bytes.
//!
//! What the kernel reads (ambassador-ebpf/src/xdp.rs `parse` and `l4_packet`): Ethernet, one
//! optional 802.1Q tag, IPv4 with any IHL, IPv6 without extension headers. Fragments and
//! other ethertypes pass; anything malformed passes untouched. New flows only: a packet of a
//! flow the kernel already tracks keeps the backend it got, which (the table being the same)
//! is the one predicted here; replies and ICMP errors need that flow state.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::Serialize;

use super::{Plan, ServicePlan};
use crate::config::BackendConfig;

const ETH_HLEN: usize = 14;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;
const IPV6_FRAGMENT: u8 = 44;

/// The IP header fields the data plane uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Ip {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    /// Offsets of the IP and transport headers in the frame.
    pub l3: usize,
    pub l4: usize,
    /// The IP datagram's length by its header (total length; IPv6: payload + 40).
    pub len: usize,
}

/// A frame as the kernel parses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Parsed {
    /// TCP or UDP with whole ports: a candidate for a service.
    Flow {
        #[serde(flatten)]
        ip: Ip,
        sport: u16,
        dport: u16,
    },
    /// ICMP (v4) or ICMPv6: only errors about tracked flows are translated.
    Icmp {
        #[serde(flatten)]
        ip: Ip,
    },
    /// IP, another protocol (or ICMP of the other family, or an IPv6 extension header).
    OtherProto {
        #[serde(flatten)]
        ip: Ip,
    },
    /// Not IPv4 or IPv6 (ARP, a second VLAN tag, ...).
    NotIp,
    /// An IPv4 fragment (MF or offset) or an IPv6 fragment header.
    Fragment,
    /// Cut short or inconsistent: passed untouched, counted as unparsed.
    Malformed { why: &'static str },
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Parse a frame exactly as the XDP program does.
pub fn parse(frame: &[u8]) -> Parsed {
    let bad = |why| Parsed::Malformed { why };
    let mut l3 = ETH_HLEN;
    let Some(mut ethertype) = be16(frame, 12) else {
        return bad("shorter than an Ethernet header");
    };
    if ethertype == ETH_P_8021Q {
        let Some(inner) = be16(frame, 16) else {
            return bad("802.1Q tag cut short");
        };
        ethertype = inner;
        l3 += 4;
    }
    let ip = match ethertype {
        ETH_P_IP => {
            let Some(h) = frame.get(l3..l3 + 20) else {
                return bad("IPv4 header cut short");
            };
            let ihl = ((h[0] & 0x0f) as usize) * 4;
            if h[0] >> 4 != 4 || ihl < 20 {
                return bad("IPv4 version or IHL invalid");
            }
            let tot_len = u16::from_be_bytes([h[2], h[3]]) as usize;
            // MF set or a non-zero offset; the kernel checks this before the lengths.
            if u16::from_be_bytes([h[6], h[7]]) & 0x3fff != 0 {
                return Parsed::Fragment;
            }
            if tot_len < ihl || l3 + tot_len > frame.len() {
                return bad("IPv4 total length beyond the frame or below the header");
            }
            Ip {
                src: IpAddr::V4(Ipv4Addr::new(h[12], h[13], h[14], h[15])),
                dst: IpAddr::V4(Ipv4Addr::new(h[16], h[17], h[18], h[19])),
                proto: h[9],
                l3,
                l4: l3 + ihl,
                len: tot_len,
            }
        }
        ETH_P_IPV6 => {
            let Some(h) = frame.get(l3..l3 + 40) else {
                return bad("IPv6 header cut short");
            };
            if h[0] >> 4 != 6 {
                return bad("IPv6 version invalid");
            }
            let plen = u16::from_be_bytes([h[4], h[5]]) as usize;
            if h[6] == IPV6_FRAGMENT {
                return Parsed::Fragment;
            }
            if l3 + 40 + plen > frame.len() {
                return bad("IPv6 payload length beyond the frame");
            }
            let a = |at: usize| {
                let mut o = [0u8; 16];
                o.copy_from_slice(&h[at..at + 16]);
                IpAddr::V6(Ipv6Addr::from(o))
            };
            Ip {
                src: a(8),
                dst: a(24),
                proto: h[6],
                l3,
                l4: l3 + 40,
                len: plen + 40,
            }
        }
        _ => return Parsed::NotIp,
    };
    match ip.proto {
        TCP | UDP => {
            let min = if ip.proto == TCP { 20 } else { 8 };
            // Within the datagram by its own length, and within the frame.
            if (ip.l4 - ip.l3) + min > ip.len || ip.l4 + min > frame.len() {
                return bad("TCP or UDP header cut short");
            }
            Parsed::Flow {
                ip,
                sport: be16(frame, ip.l4).expect("checked"),
                dport: be16(frame, ip.l4 + 2).expect("checked"),
            }
        }
        ICMP if ip.src.is_ipv4() => Parsed::Icmp { ip },
        ICMPV6 if ip.src.is_ipv6() => Parsed::Icmp { ip },
        _ => Parsed::OtherProto { ip },
    }
}

/// What XDP does with a frame that opens a new flow.
#[derive(Debug, Clone)]
pub enum Verdict<'a> {
    /// Rewritten to this backend of this service, and tracked.
    Backend {
        service: &'a ServicePlan,
        backend: &'a BackendConfig,
    },
    /// A service the kernel hands to the stack (the TLS sidecar or the userspace data plane).
    ToStack { service: &'a ServicePlan },
    /// A service with no backend to take new flows (all drained, unhealthy or removed).
    NoBackend { service: &'a ServicePlan },
    /// Passed untouched (not a service, or not a packet the program reads); the reason.
    Pass(Parsed),
}

impl Verdict<'_> {
    pub fn describe(&self) -> String {
        match self {
            Verdict::Backend { service, backend } => format!(
                "service {} ({}): to backend {} ({})",
                service.name,
                service.listen,
                backend.id(),
                backend.address
            ),
            Verdict::ToStack { service } => format!(
                "service {} ({}): passed to the stack (served in userspace)",
                service.name, service.listen
            ),
            Verdict::NoBackend { service } => format!(
                "service {} ({}): no backend takes new flows: passed",
                service.name, service.listen
            ),
            Verdict::Pass(Parsed::Flow { .. }) => "not a service: passed".into(),
            Verdict::Pass(Parsed::Icmp { .. }) => {
                "ICMP: passed (errors about tracked flows are translated)".into()
            }
            Verdict::Pass(Parsed::OtherProto { ip }) => {
                format!("IP protocol {}: passed", ip.proto)
            }
            Verdict::Pass(Parsed::NotIp) => "not IPv4 or IPv6: passed".into(),
            Verdict::Pass(Parsed::Fragment) => "a fragment: passed".into(),
            Verdict::Pass(Parsed::Malformed { why }) => format!("malformed ({why}): passed"),
        }
    }
}

/// What the XDP program programmed with `plan` does with `frame` when it opens a new flow.
pub fn verdict<'a>(plan: &'a Plan, frame: &[u8]) -> Verdict<'a> {
    decide(plan, parse(frame))
}

/// What the program does with a frame already [`parse`]d.
pub fn decide(plan: &Plan, p: Parsed) -> Verdict<'_> {
    let Parsed::Flow { ip, sport, dport } = p else {
        return Verdict::Pass(p);
    };
    let service = plan.services.iter().find(|s| {
        s.listen.addr == SocketAddr::new(ip.dst, dport) && s.listen.proto.number() == ip.proto
    });
    let Some(service) = service else {
        return Verdict::Pass(p);
    };
    if service.userspace {
        return Verdict::ToStack { service };
    }
    match service.pick(SocketAddr::new(ip.src, sport)) {
        Some(backend) if backend.address.is_ipv4() == ip.dst.is_ipv4() => {
            Verdict::Backend { service, backend }
        }
        _ => Verdict::NoBackend { service },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use etherparse::PacketBuilder;
    use std::path::Path;

    fn plan() -> Plan {
        Plan::build(
            &Config::parse(
                Path::new("t.yaml"),
                "services:\n  - name: web\n    listen: 10.0.0.100:80/tcp\n    split:\n      backends:\n        - { name: a, address: 10.0.2.2:8080, weight: 9 }\n        - { name: b, address: 10.0.3.2:8080 }\n",
            )
            .unwrap(),
        )
    }

    fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4(src, dst, 64)
            .tcp(sport, dport, 1, 1000)
            .write(&mut out, b"hi")
            .unwrap();
        out
    }

    #[test]
    fn a_new_flow_to_a_service_gets_the_backend_the_plan_picks() {
        let plan = plan();
        let f = tcp([192, 0, 2, 7], 40000, [10, 0, 0, 100], 80);
        let want = plan.services[0]
            .pick("192.0.2.7:40000".parse().unwrap())
            .unwrap();
        match verdict(&plan, &f) {
            Verdict::Backend { backend, .. } => assert_eq!(backend, want),
            v => panic!("{v:?}"),
        }
        // Another port, another address: not the service.
        let f = tcp([192, 0, 2, 7], 40000, [10, 0, 0, 100], 81);
        assert!(matches!(
            verdict(&plan, &f),
            Verdict::Pass(Parsed::Flow { .. })
        ));
    }

    #[test]
    fn what_the_kernel_passes_is_passed_with_its_reason() {
        let plan = plan();
        let f = tcp([192, 0, 2, 7], 40000, [10, 0, 0, 100], 80);
        for cut in 0..f.len() - 2 {
            assert!(
                matches!(
                    verdict(&plan, &f[..cut]),
                    Verdict::Pass(Parsed::Malformed { .. })
                ),
                "cut at {cut}"
            );
        }
        let mut frag = f.clone();
        frag[14 + 6] |= 0x20; // MF
        assert_eq!(parse(&frag), Parsed::Fragment);
        let mut arp = f.clone();
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(parse(&arp), Parsed::NotIp);
        let mut ihl = f;
        ihl[14] = 0x44;
        assert!(matches!(parse(&ihl), Parsed::Malformed { .. }));
    }
}
