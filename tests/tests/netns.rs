//! Real traffic through the real daemon: the book's topology in network namespaces, nginx
//! backends, the kernel programs on the ambassador's veths. By default the veths are as a
//! container runtime leaves them (TC); the NIC and mixed topologies check XDP, and XDP on the
//! client side with TC on the backends' side.

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use ambassador_tests::topology::{
    kernel_stat, share, split_config, KeepAlive, Peers, Topology, VIP4, VIP6,
};

fn vip4() -> SocketAddr {
    format!("{VIP4}:80").parse().unwrap()
}

fn vip6() -> SocketAddr {
    format!("[{VIP6}]:80").parse().unwrap()
}

fn started(n: usize, web: u32, experiment: u32) -> Topology {
    started_with(Peers::Containers, n, web, experiment)
}

fn started_with(peers: Peers, n: usize, web: u32, experiment: u32) -> Topology {
    let mut t = Topology::with_peers(n, peers);
    t.start_nginx(1);
    t.write_config(&split_config(web, experiment));
    t.start_daemon();
    t.assert_kernel_programs();
    t
}

/// One request from each client: (client, body or error).
type Round = Vec<(IpAddr, Result<String, String>)>;

/// Every client twice through the 90/10 split: all answered, each client on one backend, the
/// backend saw the client's own address, the shares within the split's bounds, and the kernel
/// counted every new flow. The first round and the status after.
fn splits_90_10_in_the_kernel(t: &Topology) -> (Round, serde_json::Value) {
    let first = t.request_all(&t.clients4, vip4());
    let second = t.request_all(&t.clients4, vip4());
    assert_sticky(&[first.clone(), second]);
    let web = share(&first, "web");
    assert!(
        (0.85..=0.95).contains(&web),
        "web got {:.1}% of clients",
        web * 100.0
    );
    let st = t.status();
    let flows: u64 = st["services"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["new_flows"].as_u64().unwrap())
        .sum();
    assert_eq!(flows, 2 * t.clients4.len() as u64, "status: {st:#}");
    (first, st)
}

#[test]
fn container_veths_as_runtimes_leave_them_split_60_30_10_in_the_kernel_and_stick() {
    let mut t = Topology::new(240);
    t.start_nginx(1);
    t.write_config(&format!(
        "interfaces: [lbc, lbw, lbe]
services:
  - name: frontend
    listen: {VIP4}:80/tcp
    split:
      key: src-ip
      backends:
        - {{ name: web,        address: 10.200.2.2:80, weight: 6 }}
        - {{ name: experiment, address: 10.200.3.2:80, weight: 3 }}
        - {{ name: canary,     address: 10.200.2.2:8081, weight: 1 }}
"
    ));
    t.start_daemon();
    t.assert_kernel_programs();
    let first = t.request_all(&t.clients4, vip4());
    let second = t.request_all(&t.clients4, vip4());
    assert_sticky(&[first.clone(), second]);
    for (name, want) in [("web", 0.6), ("experiment", 0.3), ("web-8081", 0.1)] {
        let got = share(&first, name);
        assert!(
            (got - want).abs() <= 0.06,
            "{name} got {:.1}% of 240 clients, want {:.0}% ± 6",
            got * 100.0,
            want * 100.0
        );
    }
    // Done in the kernel: the TC program counted every connection as a new flow and
    // forwarded its packets; the userspace data plane accepted none.
    let st = t.status();
    let kernel = |name: &str| kernel_stat(&st, name);
    assert_eq!(kernel("new_flow"), 480, "status: {st:#}");
    assert!(kernel("forwarded") >= 480 * 4, "status: {st:#}");
}

#[test]
fn nic_topology_splits_with_xdp_on_every_interface() {
    let t = started_with(Peers::BehindNic, 200, 9, 1);
    splits_90_10_in_the_kernel(&t);
}

#[test]
fn mixed_topology_xdp_toward_clients_and_tc_toward_container_backends() {
    let t = started_with(Peers::Mixed, 200, 9, 1);
    splits_90_10_in_the_kernel(&t);
    // IPv6 too: requests in through XDP, replies back through TC, one set of maps.
    let v6 = t.request_all(&t.clients6, vip6());
    assert_sticky(&[v6]);
}

/// Every request succeeded, each client saw one backend on every try, and the backend saw the
/// real client address (no SNAT on the way in).
fn assert_sticky(rounds: &[Vec<(IpAddr, Result<String, String>)>]) -> HashMap<IpAddr, String> {
    let mut seen: HashMap<IpAddr, String> = HashMap::new();
    for round in rounds {
        for (client, r) in round {
            let body = r
                .as_ref()
                .unwrap_or_else(|e| panic!("request from {client} failed: {e}"));
            let (backend, peer) = body.split_once(' ').expect("NAME ADDRESS");
            assert_eq!(
                peer.parse::<IpAddr>().unwrap(),
                *client,
                "backend saw another address"
            );
            let prev = seen.entry(*client).or_insert_with(|| backend.to_string());
            assert_eq!(prev, backend, "client {client} flipped between backends");
        }
    }
    seen
}

#[test]
fn http_from_200_clients_splits_90_10_and_every_client_sticks() {
    let t = started(200, 9, 1);
    let (first, st) = splits_90_10_in_the_kernel(&t);
    // The kernel counted them: 400 new flows over the two backends, split like the responses.
    let svc = &st["services"][0];
    assert_eq!(svc["name"], "frontend");
    let web = share(&first, "web");
    assert_eq!(
        svc["backends"][0]["new_flows"].as_u64().unwrap(),
        (web * 200.0).round() as u64 * 2,
        "status: {st:#}"
    );
}

#[test]
fn ipv6_service_splits_and_sticks_the_same_way() {
    let t = started(200, 9, 1);
    let first = t.request_all(&t.clients6, vip6());
    let second = t.request_all(&t.clients6, vip6());
    assert_sticky(&[first.clone(), second]);
    let web = share(&first, "web");
    assert!(
        (0.85..=0.95).contains(&web),
        "web got {:.1}% of IPv6 clients",
        web * 100.0
    );
}

#[test]
fn live_weight_change_keeps_streaming_connections_and_moves_new_clients() {
    let t = started(200, 9, 1);
    // 20 long-lived keep-alive connections, streaming requests the whole time.
    let long: Vec<IpAddr> = t.clients4[..20].to_vec();
    let stop = AtomicBool::new(false);
    let (requests, backends) = std::thread::scope(|s| {
        let streamer = s.spawn(|| {
            let _in = t.client.enter();
            let mut conns: Vec<(IpAddr, KeepAlive, String)> = long
                .iter()
                .map(|&c| {
                    let mut k = KeepAlive::open(c, vip4()).expect("open keep-alive");
                    let b = k.get().expect("first request");
                    (c, k, b)
                })
                .collect();
            let mut n = 0u64;
            let deadline = Instant::now() + Duration::from_secs(20);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                for (c, k, first) in conns.iter_mut() {
                    let b = k
                        .get()
                        .unwrap_or_else(|e| panic!("streaming connection from {c} broke: {e}"));
                    assert_eq!(&b, first, "connection from {c} changed backend");
                    n += 1;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            (
                n,
                conns
                    .into_iter()
                    .map(|(c, _, b)| (c, b))
                    .collect::<Vec<_>>(),
            )
        });
        std::thread::sleep(Duration::from_millis(500));
        // Flip the split to 1:9 by editing the file (the daemon watches it).
        t.write_config(&split_config(1, 9));
        let deadline = Instant::now() + Duration::from_secs(10);
        while t.status()["generation"] != 2 {
            assert!(
                Instant::now() < deadline,
                "reload not applied:\n{}",
                t.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(1000));
        // New connections, from every client, follow the new weights.
        let after = t.request_all(&t.clients4, vip4());
        stop.store(true, Ordering::Relaxed);
        let (n, backends) = streamer.join().unwrap();
        let exp = share(&after, "experiment");
        assert!(after.iter().all(|(_, r)| r.is_ok()), "a new request failed");
        assert!(
            (0.85..=0.95).contains(&exp),
            "experiment got {:.1}% after the flip",
            exp * 100.0
        );
        (n, backends)
    });
    assert!(requests > 200, "only {requests} requests streamed");
    // Some streams were on `web` before: they stayed there although web now has weight 1.
    assert!(backends.iter().any(|(_, b)| b.starts_with("web")));
}

/// IPv4 TCP SYNs from `n` random-looking sources to `dst`, sent from the calling thread's
/// network namespace through a raw socket (the sources are spoofed: nothing answers them).
fn syn_flood(dst: SocketAddr, n: u32, mut between: impl FnMut(u32)) {
    use ambassador_tests::packets::Spec;
    // SAFETY: plain socket call; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd we own.
    let _owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let IpAddr::V4(ip) = dst.ip() else {
        panic!("IPv4 only")
    };
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    };
    for i in 0..n {
        let src = format!(
            "100.{}.{}.{}:{}",
            64 + (i >> 16),
            (i >> 8) & 255,
            i & 255,
            1024 + i % 60_000
        );
        let frame = Spec {
            payload: Vec::new(),
            ..Spec::tcp(&src, &dst.to_string())
        }
        .build();
        let ip_packet = &frame[14..];
        // SAFETY: a valid buffer and sockaddr_in for the call.
        let rc = unsafe {
            libc::sendto(
                fd,
                ip_packet.as_ptr().cast(),
                ip_packet.len(),
                0,
                (&sin as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        assert!(rc > 0, "sendto: {}", std::io::Error::last_os_error());
        between(i);
    }
}

/// The issue's flood: 1,000 established keep-alive connections stream requests while 4x the
/// connection table's size of SYNs from random sources arrive, with a weight change in the
/// middle; then past the program clock's next tick. Every request of every established
/// connection is answered by the backend it started on.
#[test]
fn established_connections_outlive_a_syn_flood_four_times_the_table_and_a_weight_change() {
    const TABLE: u32 = 16_384;
    raise_open_files_limit();
    let mut t = Topology::new(1000);
    t.start_nginx(1);
    t.write_config(&split_config(9, 1));
    t.start_daemon_with(&["--flow-table-size", &TABLE.to_string()]);
    t.assert_kernel_programs();
    let clients = t.clients4.clone();
    let mut conns: Vec<(IpAddr, KeepAlive, String)> = {
        let _in = t.client.enter();
        clients
            .iter()
            .map(|&c| {
                let mut k = KeepAlive::open(c, vip4()).expect("open keep-alive");
                let b = k.get().expect("first request");
                (c, k, b)
            })
            .collect()
    };
    let stream = |conns: &mut Vec<(IpAddr, KeepAlive, String)>, when: &str| {
        let _in = t.client.enter();
        for (c, k, first) in conns.iter_mut() {
            let b = k
                .get()
                .unwrap_or_else(|e| panic!("connection from {c} broke {when}: {e}"));
            assert_eq!(&b, first, "connection from {c} changed backend {when}");
        }
    };
    stream(&mut conns, "before the flood");
    let flood = 4 * TABLE;
    // The connections keep streaming through the flood, every 8,192 SYNs (on a slow machine,
    // streaming by the clock would slow the SYNs below a flood).
    {
        let _in = t.client.enter();
        syn_flood(vip4(), flood, |i| {
            if i == flood / 2 {
                t.write_config(&split_config(1, 9));
            }
            if i % 8192 == 0 {
                stream(&mut conns, "during the flood");
            }
        });
    }
    wait_generation(&t, 2);
    // Past the program clock's next tick (256 jiffies, at most 2.56 s at HZ 100), when each CPU
    // looks its flows up in the table again instead of its cached copy.
    std::thread::sleep(Duration::from_millis(2700));
    stream(&mut conns, "after the flood");
    let status = t.status();
    assert!(
        kernel_stat(&status, "flood_diverted") > 0,
        "no new flow went to the flood table"
    );
    assert_eq!(
        kernel_stat(&status, "flow_repicked"),
        0,
        "an established flow lost its entry"
    );
    assert!(
        kernel_stat(&status, "new_flow") >= u64::from(flood) / 2,
        "the flood did not reach the program"
    );
    // The same counters for Prometheus (/metrics serves a report up to a second old).
    std::thread::sleep(Duration::from_millis(1100));
    let metrics = t.lb.sh(&format!(
        "curl -sf --unix-socket {} http://ambassador/metrics",
        t.state_dir().join("admin.sock").display()
    ));
    let diverted = kernel_stat(&status, "flood_diverted");
    assert!(
        metrics.contains(&format!(
            r#"ambassador_kernel_events_total{{name="flood_diverted"}} {diverted}"#
        )) && metrics.contains(r#"ambassador_kernel_events_total{name="flow_repicked"} 0"#),
        "{metrics}"
    );
    // The weight change took: new clients follow it.
    let after = t.request_all(&t.clients4[..200], vip4());
    let exp = share(&after, "experiment");
    assert!(
        exp > 0.8,
        "experiment got {:.1}% after the change",
        exp * 100.0
    );
}

/// 1,000 connections and the suite's other tests need more descriptors than a default soft
/// limit of 1,024: raise it to the hard limit (the process's own, for every test in it).
fn raise_open_files_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a stack value.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
}

fn wait_generation(t: &Topology, generation: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while t.status()["generation"] != generation {
        assert!(
            Instant::now() < deadline,
            "reload not applied:\n{}",
            t.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn broken_config_sent_by_sighup_is_rejected_and_traffic_keeps_flowing() {
    let t = started(100, 9, 1);
    let before = t.request_all(&t.clients4, vip4());
    // Written in place (not watched-path atomic), then SIGHUP: the daemon must reject it.
    std::fs::write(
        t.config_path(),
        split_config(9, 1).replace("weight: 1 }", "wieght: 1 }"),
    )
    .unwrap();
    t.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while t.status()["last_error"].is_null() {
        assert!(
            Instant::now() < deadline,
            "no rejection seen:\n{}",
            t.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let st = t.status();
    let err = st["last_error"].as_str().unwrap();
    assert!(
        err.contains("ambassador.yaml:9"),
        "error lacks file:line: {err}"
    );
    assert!(err.contains("wieght"), "error lacks the key: {err}");
    assert_eq!(st["generation"], 1, "a broken config must not be applied");
    assert!(
        t.daemon_log().contains("config rejected"),
        "not logged:\n{}",
        t.daemon_log()
    );
    let after = t.request_all(&t.clients4, vip4());
    assert_sticky(&[before, after]);
}

/// The byte at `i` of the download: a pattern no shifted or repeated chunk matches.
fn pattern(i: usize) -> u8 {
    (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3]
}

#[test]
fn a_streaming_download_through_tc_keeps_every_byte_and_its_backend_through_a_live_change() {
    // The backends' veths are as containers have them: the download's segments leave them as
    // GSO socket buffers with CHECKSUM_PARTIAL, which the TC program must forward intact; the
    // ambassador's interfaces finish the checksums (as a NIC would), so a wrong field shows.
    // Backends on another port than the service's, so the reply's port is rewritten too.
    let on_8081 = |cfg: String| {
        cfg.replace("10.200.2.2:80,", "10.200.2.2:8081,")
            .replace("10.200.3.2:80,", "10.200.3.2:8081,")
    };
    let mut t = Topology::new(20);
    t.start_nginx(1);
    t.write_config(&on_8081(split_config(1, 1)));
    t.start_daemon();
    t.assert_kernel_programs();
    t.finish_checksums_on_egress();
    const SIZE: usize = 16 << 20;
    let body: Vec<u8> = (0..SIZE).map(pattern).collect();
    t.write_big("web", &body);
    t.write_big("experiment", &body);
    let changed = AtomicBool::new(false);
    let (backend, changed_mid_download) = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let _in = t.client.enter();
            let mut conn =
                ambassador_tests::topology::connect(t.clients4[0], vip4()).expect("connect");
            conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            conn.write_all(b"GET /big HTTP/1.1\r\nHost: ambassador\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut buf = vec![0u8; 64 << 10];
            let mut head = Vec::new();
            let mut got = 0usize;
            let mut seen_change = false;
            loop {
                let n = conn.read(&mut buf).expect("the download broke");
                if n == 0 {
                    break;
                }
                let mut chunk = &buf[..n];
                if head.is_empty() || !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    head.extend_from_slice(chunk);
                    let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let rest = head.split_off(end + 4);
                    for (k, b) in rest.iter().enumerate() {
                        assert_eq!(*b, pattern(got + k), "byte {} differs", got + k);
                    }
                    got += rest.len();
                    chunk = &[];
                }
                for (k, b) in chunk.iter().enumerate() {
                    assert_eq!(*b, pattern(got + k), "byte {} differs", got + k);
                }
                got += chunk.len();
                if got < SIZE {
                    seen_change |= changed.load(Ordering::Relaxed);
                }
                // A slow reader: the download lasts about two seconds.
                std::thread::sleep(Duration::from_millis(8));
            }
            let head = String::from_utf8_lossy(&head).to_string();
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            assert_eq!(got, SIZE, "the download was cut short");
            let backend = head
                .lines()
                .find_map(|l| l.strip_prefix("X-Backend: "))
                .unwrap_or_default()
                .trim()
                .to_string();
            (backend, seen_change)
        });
        std::thread::sleep(Duration::from_millis(300));
        // Send every new client elsewhere: 1:1 becomes 1:0 and 0:1 in turn.
        t.write_config(&on_8081(
            split_config(1, 1).replace("weight: 1 }", "weight: 1000 }"),
        ));
        let deadline = Instant::now() + Duration::from_secs(10);
        while t.status()["generation"] != 2 {
            assert!(Instant::now() < deadline, "reload not applied");
            std::thread::sleep(Duration::from_millis(20));
        }
        changed.store(true, Ordering::Relaxed);
        reader.join().unwrap()
    });
    assert!(
        changed_mid_download,
        "the change was applied only after the download ended: nothing was tested"
    );
    assert!(
        backend == "web" || backend == "experiment",
        "no X-Backend header: {backend:?}"
    );
    let st = t.status();
    let kernel = |name: &str| kernel_stat(&st, name);
    // The reply path was the kernel's: it rewrote the download's packets back to the service.
    assert!(kernel("reverse_nat") > 100, "status: {st:#}");
}

#[test]
fn udp_through_tc_on_container_veths_splits_sticks_and_replies_from_the_service() {
    let t = Topology::new(50);
    t.finish_checksums_on_egress();
    ambassador_tests::topology::udp_echo(&t.web, "10.200.2.2:5353", "web");
    ambassador_tests::topology::udp_echo(&t.exp, "10.200.3.2:5353", "experiment");
    t.write_config(&format!(
        "interfaces: [lbc, lbw, lbe]
services:
  - name: dns
    listen: {VIP4}:53/udp
    split:
      key: src-ip
      backends:
        - {{ name: web,        address: 10.200.2.2:5353, weight: 1 }}
        - {{ name: experiment, address: 10.200.3.2:5353, weight: 1 }}
"
    ));
    t.start_daemon();
    t.assert_kernel_programs();
    let vip: SocketAddr = format!("{VIP4}:53").parse().unwrap();
    let mut seen: HashMap<String, usize> = HashMap::new();
    {
        let _in = t.client.enter();
        for c in &t.clients4 {
            // Connected: only datagrams from the service address are received, so every
            // answer proves the reply was rewritten back to it.
            let s = std::net::UdpSocket::bind(SocketAddr::new(*c, 0)).unwrap();
            s.connect(vip).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let port = s.local_addr().unwrap().port();
            let mut first = None;
            for i in 0..3 {
                s.send(format!("query {i}").as_bytes()).unwrap();
                let mut buf = [0u8; 256];
                let n = s
                    .recv(&mut buf)
                    .unwrap_or_else(|e| panic!("no answer to {c}'s datagram {i}: {e}"));
                let answer = String::from_utf8_lossy(&buf[..n]).to_string();
                let (name, peer_port) = answer.split_once(' ').unwrap();
                assert_eq!(
                    peer_port.parse::<u16>().unwrap(),
                    port,
                    "the backend saw another port"
                );
                match &first {
                    None => first = Some(name.to_string()),
                    Some(f) => assert_eq!(f, name, "{c} moved between backends"),
                }
            }
            *seen.entry(first.unwrap()).or_default() += 1;
        }
    }
    assert_eq!(seen.len(), 2, "one backend got every client: {seen:?}");
    let st = t.status();
    let new_flows: u64 = st["services"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["new_flows"].as_u64().unwrap())
        .sum();
    assert_eq!(new_flows, 50, "status: {st:#}");
}
