//! Packet fuzzing through the real XDP program (`BPF_PROG_TEST_RUN`): valid packets of every
//! kind, mutated (truncated, bytes flipped, bad IHL, VLAN stacks, IPv6 extension chains,
//! fragments, empty payloads) and plain random bytes. The program must never abort; a packet
//! it rewrites must be well formed, carry valid checksums when the input did, and go to a
//! configured backend (or, for a reply, come from a service address); anything it leaves
//! untouched must be byte-identical. The userspace reading of a frame (`dataplane::packet`,
//! what `simulate --pcap` uses) must agree with the kernel on every input: what it calls
//! malformed, a fragment or not IP, the kernel leaves untouched; the backend it predicts for a
//! new flow is where the kernel sends it. `AMB_FUZZ_PACKETS` sets the count (default 1,000,000).

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use ambassador::{
    config::Config,
    dataplane::{
        kernel::KernelDataplane,
        packet::{self, Verdict},
        Plan,
    },
};
use ambassador_tests::{
    fixture::{allow_fixture_egress, forwarding_netns},
    packets::{ingress_skb, Spec, ACK, FIN, PSH, RST, SYN},
};
use aya::programs::{TestRun, TestRunOptions};
use rand::{rngs::StdRng, Rng, SeedableRng};

const CONFIG: &str = "
services:
  - name: web4
    listen: 10.200.0.100:80/tcp
    split: { backends: [ { name: web, address: 10.200.2.2:8080, weight: 9 }, { name: exp, address: 10.200.3.2:8080 } ] }
  - name: dns4
    listen: 10.200.0.100:53/udp
    split: { key: five-tuple, backends: [ { address: 10.200.2.2:5353 }, { address: 10.200.3.2:5353 } ] }
  - name: web6
    listen: '[fd00::100]:80/tcp'
    split: { backends: [ { name: web, address: '[fd00:2::2]:8080' }, { name: exp, address: '[fd00:3::2]:8080' } ] }
  - name: dns6
    listen: '[fd00::100]:53/udp'
    split: { key: src-ip-port, backends: [ { address: '[fd00:2::2]:5353' }, { address: '[fd00:3::2]:5353' } ] }
";

/// One's-complement sum of `data` (RFC 1071), folded.
fn sum(data: &[u8], mut acc: u32) -> u32 {
    for c in data.chunks(2) {
        acc += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc
}

/// What a well-formed Ethernet/IP frame carries, with its checksums checked independently of
/// the code under test. None when the frame is not one we can judge (not IP, truncated...).
struct Parsed {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    sport: u16,
    dport: u16,
    checksums_ok: bool,
}

fn parse(p: &[u8]) -> Option<Parsed> {
    let mut l3 = 14;
    let mut et = u16::from_be_bytes([*p.get(12)?, *p.get(13)?]);
    if et == 0x8100 {
        et = u16::from_be_bytes([*p.get(16)?, *p.get(17)?]);
        l3 = 18;
    }
    let (src, dst, proto, l4, l4len, mut ok, pseudo) = match et {
        0x0800 => {
            let ihl = ((*p.get(l3)? & 0xf) as usize) * 4;
            if p[l3] >> 4 != 4 || ihl < 20 || p.len() < l3 + ihl {
                return None;
            }
            let tot = u16::from_be_bytes([p[l3 + 2], p[l3 + 3]]) as usize;
            if tot < ihl || p.len() < l3 + tot {
                return None;
            }
            let hdr_ok = sum(&p[l3..l3 + ihl], 0) == 0xffff;
            let s: [u8; 4] = p[l3 + 12..l3 + 16].try_into().ok()?;
            let d: [u8; 4] = p[l3 + 16..l3 + 20].try_into().ok()?;
            let proto = p[l3 + 9];
            let l4len = tot - ihl;
            let pseudo = sum(
                &[&s[..], &d[..], &[0, proto], &(l4len as u16).to_be_bytes()].concat(),
                0,
            );
            (
                IpAddr::from(s),
                IpAddr::from(d),
                proto,
                l3 + ihl,
                l4len,
                hdr_ok,
                pseudo,
            )
        }
        0x86dd => {
            if p.len() < l3 + 40 || p[l3] >> 4 != 6 {
                return None;
            }
            let plen = u16::from_be_bytes([p[l3 + 4], p[l3 + 5]]) as usize;
            if p.len() < l3 + 40 + plen {
                return None;
            }
            let s: [u8; 16] = p[l3 + 8..l3 + 24].try_into().ok()?;
            let d: [u8; 16] = p[l3 + 24..l3 + 40].try_into().ok()?;
            let proto = p[l3 + 6];
            let pseudo = sum(
                &[
                    &s[..],
                    &d[..],
                    &(plen as u32).to_be_bytes(),
                    &[0, 0, 0, proto],
                ]
                .concat(),
                0,
            );
            (
                IpAddr::from(s),
                IpAddr::from(d),
                proto,
                l3 + 40,
                plen,
                true,
                pseudo,
            )
        }
        _ => return None,
    };
    let seg = &p[l4..l4 + l4len];
    let (sport, dport) = match proto {
        6 | 17 if seg.len() >= 8 => (
            u16::from_be_bytes([seg[0], seg[1]]),
            u16::from_be_bytes([seg[2], seg[3]]),
        ),
        _ => (0, 0),
    };
    ok &= match proto {
        6 if seg.len() >= 20 => sum(seg, pseudo) == 0xffff,
        17 if seg.len() >= 8 => {
            (dst.is_ipv4() && seg[6] == 0 && seg[7] == 0) || sum(seg, pseudo) == 0xffff
        }
        1 => sum(seg, 0) == 0xffff,
        58 => sum(seg, pseudo) == 0xffff,
        _ => false,
    };
    Some(Parsed {
        src,
        dst,
        proto,
        sport,
        dport,
        checksums_ok: ok,
    })
}

fn templates(rng: &mut StdRng) -> Vec<u8> {
    // Half the packets come from a few clients, so their flows are tracked and later packets
    // (and the backends' replies) take the established paths; the rest open new flows.
    let (client4, client6) = if rng.gen_bool(0.5) {
        let c = rng.gen_range(1..9);
        (
            format!("198.51.100.{c}:4000{}", c % 3),
            format!("[fd00:1::{c:x}]:4000{}", c % 3),
        )
    } else {
        (
            format!(
                "198.51.{}.{}:{}",
                rng.gen_range(0..4),
                rng.gen_range(1..255),
                rng.gen_range(1024..65535)
            ),
            format!(
                "[fd00:1::{:x}]:{}",
                rng.gen_range(1..4096),
                rng.gen_range(1024..65535)
            ),
        )
    };
    let mut spec = match rng.gen_range(0..9) {
        0 => Spec::tcp(&client4, "10.200.0.100:80"),
        1 => Spec::udp(&client4, "10.200.0.100:53"),
        2 => Spec::tcp(&client6, "[fd00::100]:80"),
        3 => Spec::udp(&client6, "[fd00::100]:53"),
        // Replies from backends (tracked or not).
        4 => Spec::tcp("10.200.2.2:8080", &client4),
        5 => Spec::tcp("[fd00:3::2]:8080", &client6),
        // Near misses: other ports, other addresses.
        6 => Spec::tcp(&client4, "10.200.0.100:81"),
        7 => Spec::udp(&client4, "10.200.0.101:53"),
        _ => Spec::tcp(&client6, "[fd00::101]:80"),
    };
    spec.tcp_flags = [
        SYN,
        SYN,
        ACK | PSH,
        ACK | PSH,
        ACK,
        FIN | ACK,
        RST,
        SYN | ACK,
    ][rng.gen_range(0..8)];
    if rng.gen_bool(0.1) {
        spec.vlan = Some(rng.gen_range(1..4095));
    }
    if rng.gen_bool(0.1) && spec.src.is_ipv4() {
        spec.ip_options = vec![1; 4 * rng.gen_range(1..=10)];
    }
    if rng.gen_bool(0.1) {
        spec.payload.clear();
    }
    if rng.gen_bool(0.05) {
        spec.ttl = rng.gen_range(0..3);
    }
    spec.build()
}

/// An ICMP error quoting a service flow (a tracked one sometimes).
fn icmp_error(rng: &mut StdRng) -> Vec<u8> {
    let client = format!(
        "198.51.100.{}:{}",
        rng.gen_range(1..20),
        40000 + rng.gen_range(0..20)
    );
    let quoted = Spec::tcp("10.200.0.100:80", &client).ip_bytes();
    let mut v = Vec::new();
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 9], [2, 0, 0, 0, 0, 8])
        .ipv4([192, 0, 2, 254], [10, 200, 0, 100], 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
        ))
        .write(&mut v, &quoted[..rng.gen_range(20..quoted.len())])
        .unwrap();
    v
}

fn mutate(rng: &mut StdRng, mut p: Vec<u8>) -> Vec<u8> {
    match rng.gen_range(0..12) {
        0 => p.truncate(rng.gen_range(14..p.len().max(15))),
        1 | 2 => {
            for _ in 0..rng.gen_range(1..4) {
                let i = rng.gen_range(0..p.len());
                p[i] ^= 1 << rng.gen_range(0..8);
            }
        }
        3 => {
            // Bad IHL.
            let l3 = if p[12] == 0x81 { 18 } else { 14 };
            p[l3] = (p[l3] & 0xf0) | rng.gen_range(0..16);
        }
        4 => {
            // IPv4 fragment bits.
            let l3 = if p[12] == 0x81 { 18 } else { 14 };
            if p[l3] >> 4 == 4 {
                p[l3 + 6] |= rng.gen_range(1..0x40);
            }
        }
        5 => {
            // A second (or third) VLAN tag: a stack we do not parse.
            let tag = [0x81, 0x00, 0, rng.gen()];
            p.splice(12..12, tag);
        }
        6 => {
            // IPv6 extension header chains.
            let l3 = if p[12] == 0x81 { 18 } else { 14 };
            if p[l3] >> 4 == 6 {
                let next = p[l3 + 6];
                let ext = [0u8, 43, 44, 60][rng.gen_range(0..4)];
                p[l3 + 6] = ext;
                let hdr = [next, 0, 0, 0, 0, 0, 0, 0];
                p.splice(l3 + 40..l3 + 40, hdr);
                let plen = u16::from_be_bytes([p[l3 + 4], p[l3 + 5]]) + 8;
                p[l3 + 4..l3 + 6].copy_from_slice(&plen.to_be_bytes());
            }
        }
        7 => p.extend((0..rng.gen_range(1..64)).map(|_| rng.gen::<u8>())),
        _ => {}
    }
    p
}

#[test]
fn a_million_random_and_mutated_packets_are_never_aborted_or_misrouted() {
    fuzz(Kind::Xdp);
}

#[test]
fn a_million_random_and_mutated_packets_through_tc_are_never_misrouted() {
    fuzz(Kind::Tc);
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Xdp,
    Tc,
}

/// The fuzzer on one program. TC's actions are read as the XDP actions of the same meaning
/// (`TC_ACT_OK` as `XDP_PASS`, `TC_ACT_REDIRECT` as `XDP_REDIRECT`).
fn fuzz(kind: Kind) {
    ambassador_tests::require_root();
    let n: u64 = std::env::var("AMB_FUZZ_PACKETS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let seed: u64 = std::env::var("AMB_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed);
    let ns = forwarding_netns();
    let _in = ns.enter();
    let cfg = Config::parse(Path::new("fuzz.yaml"), CONFIG).unwrap();
    let plan = Plan::build(&cfg);
    let mut dp = KernelDataplane::load().unwrap();
    dp.apply(&plan).unwrap();
    allow_fixture_egress(&mut dp);
    let skb = ingress_skb(1);
    let backends: HashSet<SocketAddr> = plan
        .services
        .iter()
        .flat_map(|s| s.backends.iter().map(|b| b.address))
        .collect();
    let services: HashSet<SocketAddr> = plan.services.iter().map(|s| s.listen.addr).collect();
    let backend_ips: HashSet<IpAddr> = backends.iter().map(|b| b.ip()).collect();

    let mut rng = StdRng::seed_from_u64(seed);
    let (mut rewritten, mut untouched, mut predicted, mut refused) = (0u64, 0u64, 0u64, 0u64);
    let mut out = vec![0u8; 2048];
    for i in 0..n {
        let input = match rng.gen_range(0..20) {
            0 => (0..rng.gen_range(14..200))
                .map(|_| rng.gen::<u8>())
                .collect(),
            1 => {
                let e = icmp_error(&mut rng);
                mutate(&mut rng, e)
            }
            2 => icmp_error(&mut rng),
            3..=9 => templates(&mut rng),
            _ => {
                let t = templates(&mut rng);
                mutate(&mut rng, t)
            }
        };
        let (action, size) = match kind {
            Kind::Xdp => {
                let r = dp
                    .program()
                    .test_run(TestRunOptions {
                        data_in: Some(&input),
                        data_out: Some(&mut out),
                        ..TestRunOptions::new()
                    })
                    .unwrap();
                (r.return_value, r.data_size_out)
            }
            Kind::Tc => {
                let r = dp.tc_program().test_run(TestRunOptions {
                    data_in: Some(&input),
                    data_out: Some(&mut out),
                    ctx_in: Some(&skb),
                    ..TestRunOptions::new()
                });
                match r {
                    Ok(r) => (
                        match r.return_value {
                            0 => 2,
                            7 => 4,
                            other => panic!("TC action {other} on packet {i}: {input:02x?}"),
                        },
                        r.data_size_out,
                    ),
                    // The test run refuses an IP frame without a whole fixed IP header.
                    Err(_) => {
                        refused += 1;
                        continue;
                    }
                }
            }
        };
        let output = &out[..size as usize];
        let ctx = || {
            format!(
                "{kind:?} packet {i} (seed {seed}), action {action}:\nin  {input:02x?}\nout {output:02x?}"
            )
        };
        assert_ne!(action, 0, "XDP_ABORTED: {}", ctx());
        // The userspace reading of the same frame.
        match packet::verdict(&plan, &input) {
            Verdict::Pass(
                p @ (packet::Parsed::Malformed { .. }
                | packet::Parsed::NotIp
                | packet::Parsed::Fragment),
            ) => {
                assert_eq!(
                    output,
                    &input[..],
                    "userspace reads {p:?} (passed untouched) but the kernel rewrote: {}",
                    ctx()
                );
            }
            Verdict::Backend { backend, .. } => {
                let after = parse(output);
                assert_eq!(
                    after.map(|a| SocketAddr::new(a.dst, a.dport)),
                    Some(backend.address),
                    "userspace predicts backend {} but the kernel did otherwise: {}",
                    backend.address,
                    ctx()
                );
                predicted += 1;
            }
            Verdict::ToStack { .. } | Verdict::NoBackend { .. } => {
                assert_eq!(
                    output,
                    &input[..],
                    "passed by userspace, rewritten by the kernel: {}",
                    ctx()
                )
            }
            Verdict::Pass(_) => {}
        }
        assert!(matches!(action, 2..=4), "unexpected action: {}", ctx());
        if output == &input[..] {
            assert_eq!(action, 2, "forwarded without a rewrite: {}", ctx());
            untouched += 1;
            continue;
        }
        rewritten += 1;
        let before = parse(&input);
        let after =
            parse(output).unwrap_or_else(|| panic!("rewrote into a malformed frame: {}", ctx()));
        if before.as_ref().is_some_and(|b| b.checksums_ok) {
            assert!(
                after.checksums_ok,
                "checksums broken by the rewrite: {}",
                ctx()
            );
        }
        match after.proto {
            6 | 17 => {
                let to_backend = backends.contains(&SocketAddr::new(after.dst, after.dport));
                let from_service = services.contains(&SocketAddr::new(after.src, after.sport));
                assert!(to_backend || from_service, "misrouted: {}", ctx());
                // A packet the kernel sent from a client to a backend: userspace saw the flow.
                if let Some(b) = &before {
                    if services.contains(&SocketAddr::new(b.dst, b.dport)) {
                        assert!(
                            matches!(packet::verdict(&plan, &input), Verdict::Backend { .. }),
                            "the kernel rewrote a new flow userspace reads as {:?}: {}",
                            packet::parse(&input),
                            ctx()
                        );
                    }
                }
            }
            1 | 58 => {
                // A translated ICMP error goes to a backend or stays addressed to the client.
                let b = before.unwrap();
                assert!(
                    backend_ips.contains(&after.dst) || after.dst == b.dst,
                    "misrouted ICMP: {}",
                    ctx()
                );
            }
            _ => panic!("rewrote a non-TCP/UDP/ICMP packet: {}", ctx()),
        }
    }
    // Every path was exercised: new flows, packets of tracked flows (which the straight-line
    // path takes when well formed), and the backends' replies.
    let stats = dp.stats().unwrap();
    let (new_flows, reverse) = (stats.global("new_flow"), stats.global("reverse_nat"));
    let tracked = stats.global("forwarded") + stats.global("nat_then_stack") - new_flows - reverse;
    assert!(
        new_flows > n / 20 && tracked > n / 20 && reverse > n / 200,
        "too few packets took one of the paths: {new_flows} new flows, {tracked} of tracked flows, {reverse} replies"
    );
    assert!(
        refused < n / 10,
        "the test run refused {refused} of {n} packets"
    );
    let name = match kind {
        Kind::Xdp => "a_million_random_and_mutated_packets_are_never_aborted_or_misrouted",
        Kind::Tc => "a_million_random_and_mutated_packets_through_tc_are_never_misrouted",
    };
    println!(
        "reliability: {name}: {kind:?}, {n} packets ({refused} refused by the test run) on kernel {}: {rewritten} rewritten (checksums valid, destination a configured backend), {untouched} passed byte-identical, 0 aborted; paths taken: {new_flows} new flows, {tracked} packets of tracked flows (ICMP errors included), {reverse} replies; the userspace parser agreed on every packet ({predicted} backends predicted exactly)",
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim()
    );
    assert!(
        rewritten > n / 10,
        "too few packets exercised the rewrite paths ({rewritten})"
    );
}
