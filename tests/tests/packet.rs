//! Katran-style packet fixtures: crafted packets through the real XDP and TC programs with
//! `BPF_PROG_TEST_RUN` (every fixture runs on both: `xdp::NAME`, `tc::NAME`); for each the
//! action, the exact output bytes (built independently with etherparse, checksums included)
//! and the counters are checked.
//!
//! The program runs in a namespace of the test's own, with routes and permanent neighbour
//! entries, so `bpf_fib_lookup` resolves and the rewritten MACs are known.

use std::{net::SocketAddr, path::Path};

use ambassador::{
    config::Config,
    dataplane::{
        kernel::{Counters2, Ids, KernelDataplane},
        Plan,
    },
};
use ambassador_tests::{
    fixture::{
        allow_fixture_egress, forwarding_netns, EXPERIMENT_MAC, GATEWAY_MAC, LB_BACKEND_MAC,
        LB_CLIENT_MAC, WEB_MAC,
    },
    netns::Netns,
    packets::{ingress_skb, l3_offset, Spec, ACK, FIN, PSH},
    require_root,
};
use aya::programs::{TestRun, TestRunOptions};
use etherparse::{Icmpv4Type, Icmpv6Type, PacketBuilder};

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;

const CONFIG: &str = "
services:
  - name: web4
    listen: 10.200.0.100:80/tcp
    split:
      key: src-ip
      backends:
        - { name: web,        address: 10.200.2.2:8080, weight: 9 }
        - { name: experiment, address: 10.200.3.2:8080, weight: 1 }
  - name: dns4
    listen: 10.200.0.100:53/udp
    split:
      key: src-ip-port
      backends:
        - { name: a, address: 10.200.2.2:5353 }
        - { name: b, address: 10.200.3.2:5353 }
  - name: web6
    listen: '[fd00::100]:80/tcp'
    split:
      key: src-ip
      backends:
        - { name: web,        address: '[fd00:2::2]:8080', weight: 9 }
        - { name: experiment, address: '[fd00:3::2]:8080', weight: 1 }
  - name: dns6
    listen: '[fd00::100]:53/udp'
    split:
      key: five-tuple
      backends:
        - { name: a, address: '[fd00:2::2]:5353' }
        - { name: b, address: '[fd00:3::2]:5353' }
";

/// Which of the two programs a fixture runs: they make the same decisions and write the same
/// bytes (the test runs build socket buffers with full checksums), so every fixture runs on
/// both.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Xdp,
    Tc,
}

struct Fixture {
    kind: Kind,
    ns: Netns,
    dp: KernelDataplane,
    plan: Plan,
    ids: Ids,
}

impl Fixture {
    fn new(kind: Kind) -> Fixture {
        Fixture::with_config(kind, CONFIG)
    }

    fn with_config(kind: Kind, yaml: &str) -> Fixture {
        Fixture::with_table(kind, yaml, ambassador_ebpf::FLOW_TABLE_SIZE, None)
    }

    /// With a connection table of `flows` entries, and a CPU flooded past `flood_limit` new
    /// flows a tick (default: the daemon's).
    fn with_table(kind: Kind, yaml: &str, flows: u32, flood_limit: Option<u32>) -> Fixture {
        require_root();
        let ns = forwarding_netns();
        let cfg = Config::parse(Path::new("packet-test.yaml"), yaml).expect("test config");
        let plan = Plan::build(&cfg);
        let mut dp =
            KernelDataplane::load_with_loader(&mut aya::EbpfLoader::new(), flows, flood_limit)
                .expect("load the kernel programs");
        let ids = dp.apply(&plan).expect("program maps");
        {
            let _in = ns.enter();
            allow_fixture_egress(&mut dp);
        }
        Fixture {
            kind,
            ns,
            dp,
            plan,
            ids,
        }
    }

    /// Run one packet; returns the action (TC's as the XDP action of the same meaning) and
    /// the packet as the program left it.
    fn run(&mut self, pkt: &[u8]) -> (u32, Vec<u8>) {
        let _in = self.ns.enter();
        let mut out = vec![0u8; pkt.len() + 256];
        match self.kind {
            Kind::Xdp => {
                let r = self
                    .dp
                    .program()
                    .test_run(TestRunOptions {
                        data_in: Some(pkt),
                        data_out: Some(&mut out),
                        ..TestRunOptions::new()
                    })
                    .expect("BPF_PROG_TEST_RUN");
                out.truncate(r.data_size_out as usize);
                assert_ne!(r.return_value, 0, "XDP_ABORTED on {pkt:02x?}");
                (r.return_value, out)
            }
            Kind::Tc => {
                let skb = ingress_skb(1);
                let r = self
                    .dp
                    .tc_program()
                    .test_run(TestRunOptions {
                        data_in: Some(pkt),
                        data_out: Some(&mut out),
                        ctx_in: Some(&skb),
                        ..TestRunOptions::new()
                    })
                    .expect("BPF_PROG_TEST_RUN");
                out.truncate(r.data_size_out as usize);
                let action = match r.return_value {
                    TC_ACT_OK => XDP_PASS,
                    TC_ACT_REDIRECT => XDP_REDIRECT,
                    other => panic!("TC action {other} on {pkt:02x?}"),
                };
                (action, out)
            }
        }
    }

    /// Reprogram the maps from CONFIG without web4's experiment backend.
    fn remove_experiment(&mut self) {
        let only_web = CONFIG.replace(
            "        - { name: experiment, address: 10.200.3.2:8080, weight: 1 }\n",
            "",
        );
        let cfg = Config::parse(Path::new("t.yaml"), &only_web).unwrap();
        self.dp.apply(&Plan::build(&cfg)).unwrap();
    }

    fn stat(&self, name: &str) -> u64 {
        self.dp.stats().unwrap().global(name)
    }

    fn backend_counters(&self, service: &str, backend: &str) -> Counters2 {
        let id = self
            .ids
            .backends
            .iter()
            .find(|(s, b, _)| s == service && b == backend)
            .map(|(_, _, id)| *id)
            .expect("backend id");
        self.dp.stats().unwrap().backends[id as usize]
    }

    fn backend_new_flows(&self, service: &str, backend: &str) -> u64 {
        self.backend_counters(service, backend).new_flows
    }

    fn backend_packets(&self, service: &str, backend: &str) -> u64 {
        self.backend_counters(service, backend).packets
    }

    /// The backend the shared selection code picks for a client of a service.
    fn pick(&self, service: &str, client: &str) -> (String, SocketAddr) {
        let b = self
            .plan
            .service(service)
            .unwrap()
            .pick(client.parse().unwrap())
            .unwrap();
        (b.id(), b.address)
    }
}

fn backend_mac(addr: SocketAddr) -> [u8; 6] {
    let s = addr.ip().to_string();
    if s.starts_with("10.200.2.") || s.starts_with("fd00:2:") {
        WEB_MAC
    } else {
        EXPERIMENT_MAC
    }
}

/// What a packet to a service must look like after the program: destination rewritten to the
/// backend, one hop less, MACs from the FIB.
fn expected_dnat(input: &Spec, backend: SocketAddr) -> Vec<u8> {
    Spec {
        dst: backend,
        ttl: input.ttl - 1,
        src_mac: LB_BACKEND_MAC,
        dst_mac: backend_mac(backend),
        ..input.clone()
    }
    .build()
}

/// A client for which the shared selection picks `want` for `service`.
fn client_for(f: &Fixture, service: &str, want: &str, v6: bool, port: u16) -> String {
    (0..5000u32)
        .map(|i| {
            if v6 {
                format!("[fd00:1::{:x}]:{port}", i + 0x100)
            } else {
                format!("198.51.{}.{}:{port}", i / 250, i % 250 + 2)
            }
        })
        .find(|c| f.pick(service, c).0 == want)
        .expect("some client picks the wanted backend")
}

fn new_ipv4_tcp_flow_is_dnatted_to_its_backend_and_counted(kind: Kind) {
    let mut f = Fixture::new(kind);
    let input = Spec::tcp("198.51.100.7:40000", "10.200.0.100:80");
    let (name, backend) = f.pick("web4", "198.51.100.7:40000");
    let (action, out) = f.run(&input.build());
    assert_eq!(action, XDP_REDIRECT);
    assert_eq!(out, expected_dnat(&input, backend), "rewritten bytes");
    assert_eq!(f.stat("new_flow"), 1);
    assert_eq!(f.stat("forwarded"), 1);
    assert_eq!(f.backend_new_flows("web4", &name), 1);
}

fn established_flow_keeps_its_backend_when_it_leaves_the_config(kind: Kind) {
    let mut f = Fixture::new(kind);
    let client = client_for(&f, "web4", "experiment", false, 41000);
    let input = Spec::tcp(&client, "10.200.0.100:80");
    let experiment: SocketAddr = "10.200.3.2:8080".parse().unwrap();
    let (_, out) = f.run(&input.build());
    assert_eq!(out, expected_dnat(&input, experiment));

    // New config: the experiment is gone.
    f.remove_experiment();

    let (action, out) = f.run(&input.build());
    assert_eq!(action, XDP_REDIRECT);
    assert_eq!(
        out,
        expected_dnat(&input, experiment),
        "established flow moved"
    );
    assert_eq!(
        f.stat("new_flow"),
        1,
        "the established flow was not re-picked"
    );

    // A new connection from the same client follows the new config.
    let mut second = input.clone();
    second.src.set_port(41001);
    let (_, out) = f.run(&second.build());
    assert_eq!(
        out,
        expected_dnat(&second, "10.200.2.2:8080".parse().unwrap())
    );
    assert_eq!(f.stat("new_flow"), 2);
}

/// Keep this thread on one CPU: the flow cache is per CPU, and `BPF_PROG_TEST_RUN` runs the
/// program on the caller's CPU.
fn pin_to_one_cpu() {
    // SAFETY: a zeroed cpu_set_t with one bit set, for this thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn established_packets_use_the_cpus_flow_cache_and_a_reopened_tuple_voids_it(kind: Kind) {
    pin_to_one_cpu();
    let mut f = Fixture::new(kind);
    let client = client_for(&f, "web4", "experiment", false, 41100);
    let syn = Spec::tcp(&client, "10.200.0.100:80");
    let data = Spec {
        tcp_flags: ACK | PSH,
        ..syn.clone()
    };
    let experiment: SocketAddr = "10.200.3.2:8080".parse().unwrap();
    let web: SocketAddr = "10.200.2.2:8080".parse().unwrap();
    f.run(&syn.build());
    for _ in 0..5 {
        let (action, out) = f.run(&data.build());
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(out, expected_dnat(&data, experiment));
    }
    // The first data packet copies the flow into the cache, the others use the copy (a
    // second copy only if the clock's tick turned meanwhile).
    let fills = f.stat("flow_cache_fill");
    assert!(
        (1..=2).contains(&fills),
        "{fills} cache fills for 5 data packets"
    );
    assert_eq!(f.backend_packets("web4", "experiment"), 6);

    // The client closes; the experiment leaves the config; the client reopens the same
    // 5-tuple, which is a new flow and goes to web...
    f.run(
        &Spec {
            tcp_flags: FIN | ACK,
            ..syn.clone()
        }
        .build(),
    );
    f.remove_experiment();
    let (_, out) = f.run(&syn.build());
    assert_eq!(out, expected_dnat(&syn, web));
    assert_eq!(f.stat("flow_replaced"), 1);
    // ...and so do its data packets: the cached copy of the old flow is void.
    let (_, out) = f.run(&data.build());
    assert_eq!(
        out,
        expected_dnat(&data, web),
        "a stale cached copy sent the reopened flow to the old backend"
    );
}

fn reply_from_backend_is_rewritten_to_the_service_address(kind: Kind) {
    let mut f = Fixture::new(kind);
    let input = Spec::tcp("198.51.100.9:40001", "10.200.0.100:80");
    let (_, backend) = f.pick("web4", "198.51.100.9:40001");
    f.run(&input.build());

    let reply = Spec {
        src_mac: backend_mac(backend),
        dst_mac: LB_BACKEND_MAC,
        ..Spec::tcp(&backend.to_string(), "198.51.100.9:40001")
    };
    let (action, out) = f.run(&reply.build());
    assert_eq!(action, XDP_REDIRECT);
    let want = Spec {
        src: "10.200.0.100:80".parse().unwrap(),
        ttl: 63,
        src_mac: LB_CLIENT_MAC,
        dst_mac: GATEWAY_MAC,
        ..reply.clone()
    };
    assert_eq!(out, want.build());
    assert_eq!(f.stat("reverse_nat"), 1);
}

/// A reply finds its flow's one entry through the backend's service address; a packet from
/// the backend that belongs to no flow (the backend talking to someone directly) is not ours.
fn one_entry_per_flow_and_a_backends_own_traffic_passes_untouched(kind: Kind) {
    let mut f = Fixture::new(kind);
    let client = "198.51.100.19:40011";
    let (_, backend) = f.pick("web4", client);
    f.run(&Spec::tcp(client, "10.200.0.100:80").build());
    assert_eq!(
        f.dp.flow_entries().unwrap(),
        1,
        "one entry for the new flow"
    );
    // Same backend port, same client address, another client port: no flow.
    let direct = Spec {
        src_mac: backend_mac(backend),
        dst_mac: LB_BACKEND_MAC,
        tcp_flags: ACK | PSH,
        ..Spec::tcp(&backend.to_string(), "198.51.100.19:40012")
    }
    .build();
    assert_eq!(f.run(&direct), (XDP_PASS, direct.clone()));
    assert_eq!(f.stat("reverse_nat"), 0);
}

/// More services on one backend address:port than `REPLY_NAT` holds: new flows to it get a
/// reverse entry too, and every flow's replies still come from the service it was sent to.
fn a_backend_behind_more_services_than_reply_nat_holds_gets_reverse_entries(kind: Kind) {
    let n = ambassador_ebpf::MAX_FRONTENDS + 1;
    let yaml: String = (0..n)
        .map(|i| {
            format!(
                "  - name: s{i}\n    listen: 10.200.0.100:{}/tcp\n    split:\n      backends:\n        - {{ name: web, address: 10.200.2.2:8080 }}\n",
                81 + i
            )
        })
        .collect();
    let mut f = Fixture::with_config(kind, &format!("services:\n{yaml}"));
    let web: SocketAddr = "10.200.2.2:8080".parse().unwrap();
    for i in 0..n {
        let client = format!("198.51.100.60:{}", 42000 + i);
        let service = format!("10.200.0.100:{}", 81 + i);
        let syn = Spec::tcp(&client, &service);
        let (action, out) = f.run(&syn.build());
        assert_eq!(action, XDP_REDIRECT, "service {i}");
        assert_eq!(out, expected_dnat(&syn, web), "service {i}");
        let reply = Spec {
            src_mac: WEB_MAC,
            dst_mac: LB_BACKEND_MAC,
            tcp_flags: ACK | PSH,
            ..Spec::tcp(&web.to_string(), &client)
        };
        let (action, out) = f.run(&reply.build());
        assert_eq!(action, XDP_REDIRECT, "reply of service {i}");
        let want = Spec {
            src: service.parse().unwrap(),
            ttl: 63,
            src_mac: LB_CLIENT_MAC,
            dst_mac: GATEWAY_MAC,
            ..reply.clone()
        };
        assert_eq!(out, want.build(), "reply of service {i}");
    }
    // The backend is shared, so every flow to it has two entries.
    assert_eq!(f.dp.flow_entries().unwrap(), 2 * n);
    assert_eq!(f.stat("reverse_nat"), n as u64);
}

/// A flood of new flows four times the connection table, with a weight change in the middle:
/// every established flow keeps its backend, also after the clock's tick turns (when each CPU
/// looks its flows up in the table again instead of using its cached copy).
fn established_flows_outlive_a_flood_of_new_flows_and_a_weight_change(kind: Kind) {
    flood_with_a_weight_change(kind, 0);
}

/// The same flood spread over many ticks of the flow clock (as a slow machine sends it): a
/// connection table churned tick after tick lost a few entries refreshed every tick, so a
/// flooded CPU sends every new flow to the flood table, not just those past its share.
fn established_flows_outlive_a_flood_spread_over_many_ticks(kind: Kind) {
    flood_with_a_weight_change(kind, 8);
}

/// 1,000 established flows; 4x the table of new flows (over at least `ticks` ticks of the flow
/// clock), with a weight change in the middle; the established flows keep sending.
///
/// The CPU is flooded past 1,024 new flows a tick, not the daemon's 2,048 (a quarter of the
/// table over two CPUs): a machine that runs test runs slowly (QEMU's TCG) sends fewer than
/// that a tick, which is no flood. The netns test floods the daemon with its own limit.
fn flood_with_a_weight_change(kind: Kind, ticks: u32) {
    pin_to_one_cpu();
    const TABLE: u32 = 16_384;
    let mut f = Fixture::with_table(kind, CONFIG, TABLE, Some(1024));
    let dst_of = |out: &[u8]| -> [u8; 4] { out[30..34].try_into().unwrap() };
    let established: Vec<Spec> = (0..1000u32)
        .map(|i| Spec {
            tcp_flags: ACK | PSH,
            ..Spec::tcp(
                &format!("198.18.{}.{}:40000", i / 250, i % 250 + 1),
                "10.200.0.100:80",
            )
        })
        .collect();
    let mut backend_of = Vec::new();
    for e in &established {
        let (action, out) = f.run(
            &Spec {
                tcp_flags: 0x02,
                ..e.clone()
            }
            .build(),
        );
        assert_eq!(action, XDP_REDIRECT);
        backend_of.push(dst_of(&out));
    }
    let stream = |f: &mut Fixture, when: &str| {
        for (i, e) in established.iter().enumerate() {
            let (action, out) = f.run(&e.build());
            assert_eq!(action, XDP_REDIRECT, "established flow {i} {when}");
            assert_eq!(
                dst_of(&out),
                backend_of[i],
                "established flow {i} moved {when}"
            );
        }
    };
    stream(&mut f, "before the flood");
    let swapped = CONFIG
        .replace("weight: 9 }", "weight: NINE }")
        .replace("weight: 1 }", "weight: 9 }")
        .replace("weight: NINE }", "weight: 1 }");
    let moved = Plan::build(&Config::parse(Path::new("t.yaml"), &swapped).unwrap());
    let flood = 4 * TABLE;
    let hz = *ambassador::dataplane::kernel::kernel_hz() as f64;
    let tick =
        std::time::Duration::from_secs_f64((1u32 << ambassador_ebpf::SEEN_SHIFT) as f64 / hz);
    let pause = tick * ticks / flood;
    for n in 0..flood {
        let src = format!(
            "100.{}.{}.{}:{}",
            64 + (n >> 16),
            (n >> 8) & 255,
            n & 255,
            1024 + n % 50_000
        );
        let (action, _) = f.run(&Spec::tcp(&src, "10.200.0.100:80").build());
        assert_eq!(action, XDP_REDIRECT, "flood flow {n}");
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
        if n == flood / 2 {
            f.dp.apply(&moved).expect("the weight change");
        }
        if n % 8192 == 0 {
            stream(&mut f, "during the flood");
        }
    }
    let diverted = f.stat("flood_diverted");
    assert!(diverted > 0, "no new flow went to the flood table");
    // Past the clock's next tick every CPU looks its flows up in the table again.
    std::thread::sleep(tick + std::time::Duration::from_millis(100));
    stream(&mut f, "after the flood");
    assert_eq!(
        f.stat("flow_repicked"),
        0,
        "an established flow lost its entry"
    );
    // The weight change did happen: new clients follow it.
    let to_experiment = (0..200u32)
        .filter(|i| {
            let syn = Spec::tcp(&format!("203.0.113.{}:1", i + 1), "10.200.0.100:80");
            dst_of(&f.run(&syn.build()).1) == [10, 200, 3, 2]
        })
        .count();
    assert!(
        to_experiment > 100,
        "the weight change did not take: {to_experiment} of 200 new clients on the experiment"
    );
}

fn ipv4_with_options_is_rewritten_and_options_kept(kind: Kind) {
    let mut f = Fixture::new(kind);
    let mut input = Spec::tcp("198.51.100.10:40002", "10.200.0.100:80");
    // NOPs and an end-of-list: IHL 7.
    input.ip_options = vec![1, 1, 1, 1, 1, 1, 1, 0];
    let (_, backend) = f.pick("web4", "198.51.100.10:40002");
    let (action, out) = f.run(&input.build());
    assert_eq!(action, XDP_REDIRECT);
    assert_eq!(out, expected_dnat(&input, backend));
}

fn ipv6_tcp_flow_is_dnatted(kind: Kind) {
    let mut f = Fixture::new(kind);
    let input = Spec::tcp("[fd00:1::7]:40003", "[fd00::100]:80");
    let (_, backend) = f.pick("web6", "[fd00:1::7]:40003");
    let (action, out) = f.run(&input.build());
    assert_eq!(action, XDP_REDIRECT);
    assert_eq!(out, expected_dnat(&input, backend));
}

fn udp_v4_and_v6_flows_are_dnatted_with_checksums(kind: Kind) {
    let mut f = Fixture::new(kind);
    for (svc, client, vip) in [
        ("dns4", "198.51.100.11:5000", "10.200.0.100:53"),
        ("dns6", "[fd00:1::11]:5000", "[fd00::100]:53"),
    ] {
        let input = Spec::udp(client, vip);
        let (_, backend) = f.pick(svc, client);
        // A new flow, then datagrams of the tracked flow, whose route is cached.
        for i in 0..3 {
            let (action, out) = f.run(&input.build());
            assert_eq!(action, XDP_REDIRECT, "{svc} datagram {i}");
            assert_eq!(out, expected_dnat(&input, backend), "{svc} datagram {i}");
        }
    }
    assert_eq!(f.stat("new_flow"), 2);
    assert_eq!(f.stat("forwarded"), 6);
}

fn udp_without_checksum_stays_without_checksum(kind: Kind) {
    let mut f = Fixture::new(kind);
    let input = Spec::udp("198.51.100.12:5001", "10.200.0.100:53");
    let (_, backend) = f.pick("dns4", "198.51.100.12:5001");
    let mut pkt = input.build();
    let csum_off = 14 + 20 + 6;
    pkt[csum_off..csum_off + 2].copy_from_slice(&[0, 0]);
    let mut want = expected_dnat(&input, backend);
    want[csum_off..csum_off + 2].copy_from_slice(&[0, 0]);
    // The first datagram and the following ones (tracked, route cached) alike.
    for i in 0..3 {
        let (action, out) = f.run(&pkt);
        assert_eq!(action, XDP_REDIRECT, "datagram {i}");
        assert_eq!(out, want, "datagram {i}");
    }
}

fn data_packets_of_an_established_tcp_flow_are_rewritten_both_ways(kind: Kind) {
    let mut f = Fixture::new(kind);
    let client = "198.51.100.50:40050";
    let syn = Spec::tcp(client, "10.200.0.100:80");
    let (name, backend) = f.pick("web4", client);
    f.run(&syn.build());
    // The client's data, the backend's replies, then the client's FIN: rewritten alike,
    // whichever path through the program each takes (a route cached or not, flags or not).
    let data = Spec {
        tcp_flags: ACK | PSH,
        ..syn.clone()
    };
    let reply = Spec {
        src_mac: backend_mac(backend),
        dst_mac: LB_BACKEND_MAC,
        tcp_flags: ACK | PSH,
        payload: b"HTTP/1.1 200 OK\r\n\r\n".to_vec(),
        ..Spec::tcp(&backend.to_string(), client)
    };
    let reply_out = Spec {
        src: "10.200.0.100:80".parse().unwrap(),
        ttl: reply.ttl - 1,
        src_mac: LB_CLIENT_MAC,
        dst_mac: GATEWAY_MAC,
        ..reply.clone()
    }
    .build();
    for i in 0..3 {
        let (action, out) = f.run(&data.build());
        assert_eq!(action, XDP_REDIRECT, "data {i}");
        assert_eq!(out, expected_dnat(&data, backend), "data {i}");
        let (action, out) = f.run(&reply.build());
        assert_eq!(action, XDP_REDIRECT, "reply {i}");
        assert_eq!(out, reply_out, "reply {i}");
    }
    let fin = Spec {
        tcp_flags: FIN | ACK,
        ..data.clone()
    };
    let (action, out) = f.run(&fin.build());
    assert_eq!(action, XDP_REDIRECT, "FIN");
    assert_eq!(out, expected_dnat(&fin, backend), "FIN");
    // A data packet whose TTL expires here is translated, and routed by the stack (which
    // answers time-exceeded).
    let dying = Spec {
        ttl: 1,
        ..data.clone()
    };
    let (action, out) = f.run(&dying.build());
    assert_eq!(action, XDP_PASS, "TTL 1");
    assert_eq!(
        out,
        Spec {
            dst: backend,
            ..dying
        }
        .build(),
        "TTL 1"
    );
    assert_eq!(f.stat("new_flow"), 1);
    assert_eq!(f.stat("reverse_nat"), 3);
    assert_eq!(f.stat("forwarded"), 8);
    assert_eq!(f.stat("nat_then_stack"), 1);
    assert_eq!(f.backend_new_flows("web4", &name), 1);
    assert_eq!(
        f.backend_packets("web4", &name),
        9,
        "SYN, 3 data, 3 replies, FIN, TTL 1"
    );
}

fn vlan_tagged_flow_is_rewritten_and_handed_to_the_stack(kind: Kind) {
    let mut f = Fixture::new(kind);
    let mut input = Spec::tcp("198.51.100.13:40004", "10.200.0.100:80");
    input.vlan = Some(42);
    let (_, backend) = f.pick("web4", "198.51.100.13:40004");
    let (action, out) = f.run(&input.build());
    assert_eq!(action, XDP_PASS);
    // Rewritten, tag kept; routing (and the hop) are the stack's.
    let want = Spec {
        dst: backend,
        ..input.clone()
    };
    assert_eq!(out, want.build());
    assert_eq!(f.stat("nat_then_stack"), 1);
}

fn expiring_ttl_is_left_to_the_stack_after_rewrite(kind: Kind) {
    let mut f = Fixture::new(kind);
    let mut input = Spec::tcp("198.51.100.14:40005", "10.200.0.100:80");
    input.ttl = 1;
    let (_, backend) = f.pick("web4", "198.51.100.14:40005");
    let (action, out) = f.run(&input.build());
    assert_eq!(action, XDP_PASS);
    assert_eq!(
        out,
        Spec {
            dst: backend,
            ..input
        }
        .build()
    );
}

fn icmp_frag_needed_for_a_tracked_flow_reaches_the_backend(kind: Kind) {
    let mut f = Fixture::new(kind);
    let client = "198.51.100.20:40010";
    let (_, backend) = f.pick("web4", client);
    f.run(&Spec::tcp(client, "10.200.0.100:80").build());

    // A router on the client side could not forward our (reverse-NATed) reply.
    let quoted = Spec::tcp("10.200.0.100:80", client).ip_bytes();
    let quote = &quoted[..20 + 8];
    let icmp = |dst: [u8; 4], ttl: u8, smac, dmac, quote: &[u8]| {
        let mut v = Vec::new();
        PacketBuilder::ethernet2(smac, dmac)
            .ipv4([192, 0, 2, 254], dst, ttl)
            .icmpv4(Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                    next_hop_mtu: 1400,
                },
            ))
            .write(&mut v, quote)
            .unwrap();
        v
    };
    let input = icmp([10, 200, 0, 100], 64, GATEWAY_MAC, LB_CLIENT_MAC, quote);
    let (action, out) = f.run(&input);
    assert_eq!(action, XDP_REDIRECT);
    let want_quote = Spec::tcp(&backend.to_string(), client).ip_bytes();
    let b = match backend.ip() {
        std::net::IpAddr::V4(a) => a.octets(),
        _ => unreachable!(),
    };
    let want = icmp(
        b,
        63,
        LB_BACKEND_MAC,
        backend_mac(backend),
        &want_quote[..28],
    );
    assert_eq!(out, want);
    assert_eq!(f.stat("icmp_translated"), 1);
}

fn icmpv6_packet_too_big_for_a_tracked_flow_reaches_the_backend(kind: Kind) {
    let mut f = Fixture::new(kind);
    let client = "[fd00:1::20]:40011";
    let (_, backend) = f.pick("web6", client);
    f.run(&Spec::tcp(client, "[fd00::100]:80").build());

    let quoted = Spec::tcp("[fd00::100]:80", client).ip_bytes();
    let icmp = |dst: [u8; 16], hop: u8, smac, dmac, quote: &[u8]| {
        let mut v = Vec::new();
        PacketBuilder::ethernet2(smac, dmac)
            .ipv6(
                "fd00:1::fe".parse::<std::net::Ipv6Addr>().unwrap().octets(),
                dst,
                hop,
            )
            .icmpv6(Icmpv6Type::PacketTooBig { mtu: 1280 })
            .write(&mut v, quote)
            .unwrap();
        v
    };
    let vip = "fd00::100".parse::<std::net::Ipv6Addr>().unwrap().octets();
    let (action, out) = f.run(&icmp(vip, 64, GATEWAY_MAC, LB_CLIENT_MAC, &quoted[..48]));
    assert_eq!(action, XDP_REDIRECT);
    let b = match backend.ip() {
        std::net::IpAddr::V6(a) => a.octets(),
        _ => unreachable!(),
    };
    let want_quote = Spec::tcp(&backend.to_string(), client).ip_bytes();
    let want = icmp(
        b,
        63,
        LB_BACKEND_MAC,
        backend_mac(backend),
        &want_quote[..48],
    );
    assert_eq!(out, want);
}

fn icmp_for_an_untracked_flow_passes_untouched(kind: Kind) {
    let mut f = Fixture::new(kind);
    let quoted = Spec::tcp("10.200.0.100:80", "198.51.100.21:40012").ip_bytes();
    let mut v = Vec::new();
    PacketBuilder::ethernet2(GATEWAY_MAC, LB_CLIENT_MAC)
        .ipv4([192, 0, 2, 254], [10, 200, 0, 100], 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
        ))
        .write(&mut v, &quoted[..28])
        .unwrap();
    assert_eq!(f.run(&v), (XDP_PASS, v.clone()));
}

fn fragments_pass_untouched(kind: Kind) {
    let mut f = Fixture::new(kind);
    let input = Spec::tcp("198.51.100.22:40013", "10.200.0.100:80");
    // IPv4: more-fragments set, then a non-zero offset.
    for (byte6, byte7) in [(0x20u8, 0u8), (0x00, 0x10)] {
        let mut pkt = input.build();
        pkt[14 + 6] = byte6;
        pkt[14 + 7] = byte7;
        fix_ipv4_checksum(&mut pkt, 14);
        assert_eq!(f.run(&pkt), (XDP_PASS, pkt.clone()));
    }
    // IPv6 with a fragment header.
    let mut pkt = Spec::tcp("[fd00:1::22]:40013", "[fd00::100]:80").build();
    let l4 = pkt.split_off(14 + 40);
    let frag = [6u8, 0, 0, 1, 0, 0, 0, 7];
    pkt[14 + 6] = 44;
    let plen = (l4.len() + 8) as u16;
    pkt[14 + 4..14 + 6].copy_from_slice(&plen.to_be_bytes());
    pkt.extend_from_slice(&frag);
    pkt.extend_from_slice(&l4);
    assert_eq!(f.run(&pkt), (XDP_PASS, pkt.clone()));
    assert!(f.stat("pass_fragment") >= 3);
    assert_eq!(f.stat("new_flow"), 0);
}

fn truncated_and_malformed_packets_pass_untouched(kind: Kind) {
    let mut f = Fixture::new(kind);
    for spec in [
        Spec::tcp("198.51.100.23:40014", "10.200.0.100:80"),
        Spec::tcp("[fd00:1::23]:40014", "[fd00::100]:80"),
        Spec::udp("198.51.100.23:40014", "10.200.0.100:53"),
    ] {
        let pkt = spec.build();
        // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header (as a NIC would);
        // for a socket buffer it also refuses an IP frame without a whole fixed IP header.
        let min = match kind {
            Kind::Xdp => 14,
            Kind::Tc => l3_offset(&spec) + if spec.src.is_ipv4() { 20 } else { 40 },
        };
        for len in min..pkt.len() {
            let cut = &pkt[..len];
            let (action, out) = f.run(cut);
            assert_eq!((action, &out[..]), (XDP_PASS, cut), "cut at {len}");
        }
    }
    // IHL below 5, and a version that does not match the ethertype.
    let good = Spec::tcp("198.51.100.24:40015", "10.200.0.100:80").build();
    for first in [0x44u8, 0x65] {
        let mut pkt = good.clone();
        pkt[14] = first;
        assert_eq!(f.run(&pkt), (XDP_PASS, pkt.clone()));
    }
    assert_eq!(f.stat("new_flow"), 0);
}

fn non_service_traffic_passes_untouched(kind: Kind) {
    let mut f = Fixture::new(kind);
    let mut icmp_echo = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([198, 51, 100, 1], [10, 200, 0, 100], 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut icmp_echo, b"ping")
        .unwrap();
    let arp = {
        let mut v = vec![0xffu8; 6];
        v.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
        v.extend_from_slice(&[0u8; 28]);
        v
    };
    for pkt in [
        Spec::tcp("198.51.100.25:40016", "10.200.0.100:81").build(),
        Spec::tcp("198.51.100.25:40016", "10.200.0.101:80").build(),
        Spec::udp("198.51.100.25:40016", "10.200.0.100:80").build(),
        Spec::tcp("[fd00:1::25]:40016", "[fd00::101]:80").build(),
        icmp_echo,
        arp,
    ] {
        assert_eq!(f.run(&pkt), (XDP_PASS, pkt.clone()));
    }
    assert_eq!(f.stat("new_flow"), 0);
}

fn service_without_backends_is_passed_to_the_stack(kind: Kind) {
    let yaml = "services:\n  - name: empty\n    listen: 10.200.0.100:80/tcp\n    split: { backends: [] }\n";
    let mut f = Fixture::with_config(kind, yaml);
    let pkt = Spec::tcp("198.51.100.26:40017", "10.200.0.100:80").build();
    assert_eq!(f.run(&pkt), (XDP_PASS, pkt.clone()));
    assert_eq!(f.stat("no_backend"), 1);
}

fn kernel_userspace_and_simulate_pick_the_same_backend_for_10000_clients(kind: Kind) {
    let mut f = Fixture::new(kind);
    let clients: Vec<SocketAddr> = ambassador::simulate::clients(10_000, false, 7).collect();
    let svc = f.plan.service("web4").unwrap().clone();
    let userspace = ambassador::dataplane::userspace::ServiceRuntime {
        plan: svc.clone(),
        limits: Default::default(),
        tls: None,
        redirect_http: None,
    };
    let mut per_backend = std::collections::HashMap::new();
    for c in &clients {
        let input = Spec::tcp(&c.to_string(), "10.200.0.100:80");
        let (action, out) = f.run(&input.build());
        assert_eq!(action, XDP_REDIRECT, "client {c}");
        let l3 = l3_offset(&input);
        let kernel_dst =
            std::net::Ipv4Addr::new(out[l3 + 16], out[l3 + 17], out[l3 + 18], out[l3 + 19]);
        let predicted = svc.pick(*c).unwrap().address;
        assert_eq!(
            std::net::IpAddr::V4(kernel_dst),
            predicted.ip(),
            "client {c}"
        );
        // The userspace data plane routes a connection from the same client the same way.
        assert_eq!(userspace.route(*c), Some(predicted), "client {c}");
        *per_backend.entry(kernel_dst).or_insert(0u32) += 1;
    }
    // And the split itself is the 9:1 the config asks for.
    let web = per_backend[&std::net::Ipv4Addr::new(10, 200, 2, 2)] as f64 / 10_000.0;
    assert!((0.88..=0.92).contains(&web), "web share {web}");
}

fn fix_ipv4_checksum(pkt: &mut [u8], l3: usize) {
    pkt[l3 + 10] = 0;
    pkt[l3 + 11] = 0;
    let ihl = ((pkt[l3] & 0xf) * 4) as usize;
    let mut s: u32 = pkt[l3..l3 + ihl]
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]) as u32)
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    pkt[l3 + 10..l3 + 12].copy_from_slice(&(!(s as u16)).to_be_bytes());
}

fn established_flow_uses_its_cached_route_and_follows_a_neighbour_change(kind: Kind) {
    let mut f = Fixture::new(kind);
    let input = Spec::tcp("198.51.100.30:40020", "10.200.0.100:80");
    let (_, backend) = f.pick("web4", "198.51.100.30:40020");
    // New flow, then the route is looked up and cached, then used from the cache.
    for _ in 0..3 {
        let (action, out) = f.run(&input.build());
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(out, expected_dnat(&input, backend));
    }
    // The backend's MAC changes (a replaced host keeping its address).
    let new_mac = [2, 0, 0, 0, 0, 0x42];
    f.ns.ip(&format!(
        "neigh replace {} lladdr {} dev be0 nud permanent",
        backend.ip(),
        ambassador_tests::fixture::mac(new_mac)
    ));
    // Within the route's second the cached MAC is still used (proof the cache is read)...
    let (_, out) = f.run(&input.build());
    assert_eq!(out, expected_dnat(&input, backend), "cached route not used");
    // ...and after it the neighbour change is followed.
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let (_, out) = f.run(&input.build());
    let want = Spec {
        dst: backend,
        ttl: input.ttl - 1,
        src_mac: LB_BACKEND_MAC,
        dst_mac: new_mac,
        ..input.clone()
    };
    assert_eq!(out, want.build(), "cached route outlived its second");
}

#[test]
fn flow_clock_counts_the_kernels_jiffies_and_stamps_flows() {
    let mut f = Fixture::new(Kind::Xdp);
    let hz = *ambassador::dataplane::kernel::kernel_hz();
    assert!(
        [100, 250, 300, 1000].contains(&hz),
        "HZ read from CLOCK_MONOTONIC_COARSE's resolution is {hz}, not a kernel HZ"
    );
    let t0 = f.dp.clock_now().expect("clock probe");
    let start = std::time::Instant::now();
    std::thread::sleep(std::time::Duration::from_millis(400));
    let t1 = f.dp.clock_now().expect("clock probe");
    let want = start.elapsed().as_secs_f64() * hz as f64;
    let got = t1.wrapping_sub(t0) as f64;
    assert!(
        (got - want).abs() <= want * 0.1 + 2.0,
        "the program's clock advanced {got} jiffies in {:?}, {want:.0} expected at HZ {hz}",
        start.elapsed()
    );
    // A new flow's entries are stamped with that clock.
    let input = Spec::tcp("198.51.100.32:40022", "10.200.0.100:80");
    f.run(&input.build());
    let now = ambassador_ebpf::seen_clock(f.dp.clock_now().expect("clock probe"));
    let stamps = f.dp.flow_stamps().expect("reading FLOWS");
    assert_eq!(stamps.len(), 1, "one entry per flow: {stamps:?}");
    for s in stamps {
        assert!(now.wrapping_sub(s) <= 1, "last_seen {s}, clock {now}");
    }
}

fn packet_over_the_egress_mtu_on_an_established_flow_goes_to_the_stack(kind: Kind) {
    let mut f = Fixture::new(kind);
    let small = Spec::tcp("198.51.100.31:40021", "10.200.0.100:80");
    let (_, backend) = f.pick("web4", "198.51.100.31:40021");
    f.run(&small.build());
    f.run(&small.build()); // caches the route for a small packet
    f.ns.ip("link set be0 mtu 1000");
    let big = Spec {
        payload: vec![0x61; 1200],
        ..small.clone()
    };
    let (action, out) = f.run(&big.build());
    // Rewritten, but routed by the stack, which answers with fragmentation-needed.
    assert_eq!(action, XDP_PASS);
    assert_eq!(
        out,
        Spec {
            dst: backend,
            ..big
        }
        .build()
    );
    // Small packets still take the fast path.
    assert_eq!(f.run(&small.build()).0, XDP_REDIRECT);
}

fn l4_header_cut_by_the_ip_length_passes_untouched(kind: Kind) {
    // Found by the packet fuzzer: the frame holds a whole UDP header, but the IP payload length
    // says 7 bytes, so the datagram is malformed and must not be rewritten.
    let mut f = Fixture::new(kind);
    for spec in [
        Spec::udp("[fd00:1::d62]:1275", "[fd00::100]:53"),
        Spec::udp("198.51.100.40:1275", "10.200.0.100:53"),
        Spec::tcp("198.51.100.40:1275", "10.200.0.100:80"),
    ] {
        let mut pkt = spec.build();
        if spec.src.is_ipv6() {
            pkt[14 + 4..14 + 6].copy_from_slice(&7u16.to_be_bytes());
        } else {
            let short = if spec.l4 == ambassador_tests::packets::L4::Tcp {
                20 + 19
            } else {
                20 + 7
            };
            pkt[14 + 2..14 + 4].copy_from_slice(&(short as u16).to_be_bytes());
            fix_ipv4_checksum(&mut pkt, 14);
        }
        assert_eq!(f.run(&pkt), (XDP_PASS, pkt.clone()), "{spec:?}");
    }
    assert_eq!(f.stat("new_flow"), 0);
}

/// Each fixture as a test of each program: `xdp::NAME` and `tc::NAME`.
macro_rules! on_both_programs {
    ($($name:ident),* $(,)?) => {
        mod xdp {
            $(#[test] fn $name() { super::$name(super::Kind::Xdp) })*
        }
        mod tc {
            $(#[test] fn $name() { super::$name(super::Kind::Tc) })*
        }
    };
}

on_both_programs!(
    new_ipv4_tcp_flow_is_dnatted_to_its_backend_and_counted,
    established_flow_keeps_its_backend_when_it_leaves_the_config,
    established_packets_use_the_cpus_flow_cache_and_a_reopened_tuple_voids_it,
    reply_from_backend_is_rewritten_to_the_service_address,
    one_entry_per_flow_and_a_backends_own_traffic_passes_untouched,
    a_backend_behind_more_services_than_reply_nat_holds_gets_reverse_entries,
    established_flows_outlive_a_flood_of_new_flows_and_a_weight_change,
    established_flows_outlive_a_flood_spread_over_many_ticks,
    ipv4_with_options_is_rewritten_and_options_kept,
    ipv6_tcp_flow_is_dnatted,
    udp_v4_and_v6_flows_are_dnatted_with_checksums,
    udp_without_checksum_stays_without_checksum,
    data_packets_of_an_established_tcp_flow_are_rewritten_both_ways,
    vlan_tagged_flow_is_rewritten_and_handed_to_the_stack,
    expiring_ttl_is_left_to_the_stack_after_rewrite,
    icmp_frag_needed_for_a_tracked_flow_reaches_the_backend,
    icmpv6_packet_too_big_for_a_tracked_flow_reaches_the_backend,
    icmp_for_an_untracked_flow_passes_untouched,
    fragments_pass_untouched,
    truncated_and_malformed_packets_pass_untouched,
    non_service_traffic_passes_untouched,
    service_without_backends_is_passed_to_the_stack,
    kernel_userspace_and_simulate_pick_the_same_backend_for_10000_clients,
    established_flow_uses_its_cached_route_and_follows_a_neighbour_change,
    packet_over_the_egress_mtu_on_an_established_flow_goes_to_the_stack,
    l4_header_cut_by_the_ip_length_passes_untouched,
);
