//! The userspace data plane: the same split without XDP, UDP sessions, and its limits.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use ambassador_tests::{
    local::{free_port, HttpBackend, LocalDaemon},
    topology::{share, split_config, udp_echo, Topology, VIP4},
};

#[test]
fn userspace_data_plane_splits_90_10_and_every_client_sticks() {
    let mut t = Topology::new(200);
    t.start_nginx(1);
    t.write_config(&split_config(9, 1));
    t.start_daemon_with(&["--dataplane", "userspace"]);
    assert_eq!(t.status()["dataplane"], "userspace");
    let vip: SocketAddr = format!("{VIP4}:80").parse().unwrap();
    let first = t.request_all(&t.clients4, vip);
    let second = t.request_all(&t.clients4, vip);
    let mut seen = std::collections::HashMap::new();
    for (c, r) in first.iter().chain(&second) {
        let body = r
            .as_ref()
            .unwrap_or_else(|e| panic!("{c}: {e}\n{}", t.daemon_log()));
        let backend = body.split(' ').next().unwrap().to_string();
        assert_eq!(
            seen.entry(*c).or_insert(backend.clone()),
            &backend,
            "{c} flipped"
        );
    }
    let web = share(&first, "web");
    assert!((0.85..=0.95).contains(&web), "web got {:.1}%", web * 100.0);
}

#[test]
fn udp_sessions_keep_a_client_on_its_backend_and_expire_when_idle() {
    let t = Topology::new(50);
    udp_echo(&t.web, "10.200.2.2:5353", "web");
    udp_echo(&t.exp, "10.200.3.2:5353", "experiment");
    t.write_config(&format!(
        "services:
  - name: dns
    listen: {VIP4}:53/udp
    limits: {{ udp_session_timeout: 1s }}
    split:
      key: src-ip
      backends:
        - {{ name: web,        address: 10.200.2.2:5353, weight: 1 }}
        - {{ name: experiment, address: 10.200.3.2:5353, weight: 1 }}
"
    ));
    t.start_daemon_with(&["--dataplane", "userspace"]);
    let _in = t.client.enter();
    let ask = |s: &UdpSocket| {
        s.send_to(b"q", format!("{VIP4}:53")).unwrap();
        let mut buf = [0u8; 100];
        let n = s.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    let mut names = std::collections::HashSet::new();
    for c in &t.clients4[..50] {
        let s = UdpSocket::bind(SocketAddr::new(*c, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let a = ask(&s);
        let b = ask(&s);
        assert_eq!(a, b, "client {c}: two datagrams, two sessions");
        names.insert(a.split(' ').next().unwrap().to_string());
    }
    assert_eq!(
        names.len(),
        2,
        "1:1 weights over 50 clients should reach both backends"
    );
    // After the session timeout, the client's next datagram opens a new session (new port).
    let s = UdpSocket::bind(SocketAddr::new(t.clients4[0], 0)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let before = ask(&s);
    std::thread::sleep(Duration::from_millis(2000));
    let after = ask(&s);
    assert_eq!(
        before.split(' ').next(),
        after.split(' ').next(),
        "same backend"
    );
    assert_ne!(before, after, "idle session was not expired");
}

fn plain(port: u16, backend: SocketAddr, limits: &str) -> String {
    format!(
        "services:
  - name: plain
    listen: 127.0.0.1:{port}/tcp
    limits: {{ {limits} }}
    split: {{ backends: [ {{ name: b, address: '{backend}' }} ] }}
"
    )
}

fn request(s: &mut TcpStream) -> std::io::Result<String> {
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf)?;
    if n == 0 {
        return Err(std::io::Error::other("closed"));
    }
    Ok(String::from_utf8_lossy(&buf[..n]).to_string())
}

fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf), Ok(0) | Err(_))
        && {
            // A timeout error also lands here; tell it apart from a close.
            s.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
            !matches!(s.read(&mut buf), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut)
        }
}

#[test]
fn idle_connections_are_closed_after_idle_timeout() {
    let backend = HttpBackend::start("b");
    let port = free_port();
    let _d = LocalDaemon::start(&plain(port, backend.addr, "idle_timeout: 1s"));
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert!(request(&mut s).unwrap().contains("200 OK"));
    let t0 = Instant::now();
    assert!(
        closed_within(&mut s, Duration::from_secs(4)),
        "idle connection kept open"
    );
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "closed too early: {waited:?}"
    );
}

#[test]
fn connections_over_max_connections_are_refused_and_others_unaffected() {
    let backend = HttpBackend::start("b");
    let port = free_port();
    let d = LocalDaemon::start(&plain(port, backend.addr, "max_connections: 2"));
    let mut a = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut b = TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert!(request(&mut a).is_ok() && request(&mut b).is_ok());
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert!(
        closed_within(&mut c, Duration::from_secs(2)),
        "third connection was served"
    );
    assert!(request(&mut a).is_ok(), "an admitted connection suffered");
    drop(a);
    std::thread::sleep(Duration::from_millis(200));
    let mut e = TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert!(request(&mut e).is_ok(), "a freed slot was not reusable");
    // status reports the refusal (the daemon publishes its counters every second).
    ambassador_tests::topology::wait_for(Duration::from_secs(5), "refusal counted", || {
        d.status()["userspace"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p[0] == "refused_over_limit" && p[1].as_u64() >= Some(1))
    });
}

#[test]
fn sigterm_drains_open_connections_and_refuses_new_ones() {
    let backend = HttpBackend::start("b");
    let port = free_port();
    let mut d = LocalDaemon::start(&plain(port, backend.addr, "drain_timeout: 10s"));
    let mut open = TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert!(request(&mut open).is_ok());
    d.signal("TERM");
    d.wait_log("draining");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "still accepting while draining"
    );
    assert!(
        request(&mut open).is_ok(),
        "the open connection was cut by the drain"
    );
    assert!(
        !d.wait_exit(Duration::from_millis(500)),
        "exited with a connection still open"
    );
    drop(open);
    assert!(
        d.wait_exit(Duration::from_secs(5)),
        "did not exit once drained"
    );
    assert!(d.log().contains("stopped"), "{}", d.log());
}

#[test]
fn the_backend_is_chosen_by_the_real_client_address() {
    // Two loopback clients, 127.0.0.2 and 127.0.0.3, with one backend each in a 1:1 split: the
    // one the shared selection predicts is the one that answers, on every connection.
    let (b1, b2) = (HttpBackend::start("one"), HttpBackend::start("two"));
    let port = free_port();
    let yaml = format!(
        "services:
  - name: s
    listen: 127.0.0.1:{port}/tcp
    split:
      backends:
        - {{ name: one, address: '{}' }}
        - {{ name: two, address: '{}' }}
",
        b1.addr, b2.addr
    );
    let _d = LocalDaemon::start(&yaml);
    let cfg = ambassador::config::Config::parse(std::path::Path::new("t"), &yaml).unwrap();
    let plan = ambassador::dataplane::Plan::build(&cfg);
    for i in 2..40u8 {
        let src = IpAddr::from([127, 0, 0, i]);
        let want = plan.services[0].pick(SocketAddr::new(src, 1)).unwrap().id();
        for _ in 0..2 {
            let sock =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            sock.bind(&SocketAddr::new(src, 0).into()).unwrap();
            sock.connect(&SocketAddr::from(([127, 0, 0, 1], port)).into())
                .unwrap();
            let mut s: TcpStream = sock.into();
            let body = request(&mut s).unwrap();
            assert!(
                body.contains(&format!("\r\n\r\n{want} ")),
                "client {src}: {body}"
            );
        }
    }
}

#[test]
fn a_half_written_or_vanished_config_is_rejected_and_the_running_one_keeps_serving() {
    let a = HttpBackend::start("alpha");
    let b = HttpBackend::start("bravo");
    let port = free_port();
    let d = LocalDaemon::start(&plain(port, a.addr, ""));
    let get = || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let r = request(&mut s).unwrap();
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        r.split("\r\n\r\n").nth(1).unwrap_or_default().to_string()
    };
    assert!(get().starts_with("alpha"), "serving alpha");
    let good_b = plain(port, b.addr, "");
    // Half-written: the file is cut mid-way (a writer that died, or a non-atomic copy).
    std::fs::write(d.config_path(), &good_b[..good_b.len() / 2]).unwrap();
    d.signal("HUP");
    d.wait_log("config rejected");
    for _ in 0..20 {
        assert!(get().starts_with("alpha"), "still serving alpha");
    }
    assert!(d.status()["last_error"].is_string());
    // Vanished: the file is removed (an unreadable config is the same case).
    std::fs::remove_file(d.config_path()).unwrap();
    d.signal("HUP");
    d.wait_log("cannot read the config");
    for _ in 0..20 {
        assert!(get().starts_with("alpha"), "still serving alpha");
    }
    // Restored and changed: applied.
    std::fs::write(d.config_path(), &good_b).unwrap();
    d.signal("HUP");
    d.wait_log("config applied");
    ambassador_tests::topology::wait_for(Duration::from_secs(5), "the new backend", || {
        get().starts_with("bravo")
    });
}

#[test]
fn failed_connects_eject_a_backend_passively_until_its_window_passes() {
    let mut t = Topology::new(100);
    t.start_nginx(1);
    // experiment's address answers, but nothing listens on port 81: connects are refused.
    let cfg = split_config(1, 1)
        .replacen("10.200.3.2:80", "10.200.3.2:81", 1)
        .replacen(
            "    listen: 10.200.0.100:80/tcp\n",
            "    listen: 10.200.0.100:80/tcp\n    health: { check: none, passive_fails: 2, passive_window: 3s }\n",
            1,
        );
    t.write_config(&cfg);
    t.start_daemon_with(&["--dataplane", "userspace"]);
    let vip: SocketAddr = format!("{VIP4}:80").parse().unwrap();
    // Requests until the failed connects have taken experiment out.
    let mut failed = 0;
    {
        let _in = t.client.enter();
        let deadline = Instant::now() + Duration::from_secs(5);
        for c in t.clients4.iter().cycle() {
            assert!(
                Instant::now() < deadline,
                "not ejected:\n{}",
                t.daemon_log()
            );
            if ambassador_tests::topology::http_get(*c, vip).is_err() {
                failed += 1;
            }
            if failed >= 2 && t.status()["services"][0]["backends"][1]["health"] == "unhealthy" {
                break;
            }
        }
    }
    let st = t.status();
    let exp = &st["services"][0]["backends"][1];
    assert_eq!(exp["name"], "experiment");
    assert_eq!(exp["health"], "unhealthy", "{st:#}");
    assert!(
        exp["health_reason"]
            .as_str()
            .unwrap()
            .contains("2 failed connects within 3s (passive)"),
        "{st:#}"
    );
    let again = t.request_all(&t.clients4, vip);
    assert!(
        again.iter().all(|(_, r)| r.is_ok()),
        "a request failed while ejected"
    );
    // After the window it is tried again (and fails again).
    ambassador_tests::topology::wait_for(Duration::from_secs(6), "the ejection to end", || {
        t.status()["services"][0]["backends"][1]["health"] == "healthy"
    });
}
