//! The connect-time ambassador: a process in the configured cgroup (v2) dials the service
//! address and is connected straight to a backend (no proxy hop: the backend sees the
//! process's own socket), `getpeername` still says what it dialed, and processes outside the
//! cgroup are served by the userspace data plane with the same backends.

use std::{
    collections::HashSet,
    io::{Read as _, Write as _},
    net::SocketAddr,
    path::PathBuf,
    process::Command,
};

use ambassador_tests::{
    local::{free_port, HttpBackend, LocalDaemon},
    netns::sh,
    require_root,
};

/// A cgroup v2 directory for this test: under an existing cgroup2 mount, or a fresh mount
/// (these machines mount only v1 hierarchies), removed on drop.
struct Cgroup {
    dir: PathBuf,
    mount: Option<PathBuf>,
}

impl Cgroup {
    fn new() -> Cgroup {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
        let existing = mounts
            .lines()
            .find(|l| l.split_whitespace().nth(2) == Some("cgroup2"))
            .map(|l| PathBuf::from(l.split_whitespace().nth(1).unwrap()));
        let (root, mount) = match existing {
            Some(r) => (r, None),
            None => {
                let m = std::env::temp_dir().join(format!("amb-cg2-{}", std::process::id()));
                std::fs::create_dir_all(&m).unwrap();
                let out = Command::new("mount")
                    .args(["-t", "cgroup2", "none"])
                    .arg(&m)
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "cannot mount cgroup2 (the kernel needs CONFIG_CGROUPS with cgroup v2): {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                (m.clone(), Some(m))
            }
        };
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = root.join(format!(
            "amb-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Cgroup { dir, mount }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
        if let Some(m) = &self.mount {
            sh(&format!("umount {} ; rmdir {}", m.display(), m.display()));
        }
    }
}

/// Dial `service` 40 times from a process in the cgroup, then once from outside, and check
/// both paths.
fn check_family(cg: &Cgroup, service: &str, a: &HttpBackend, b: &HttpBackend) {
    let out = Command::new(env!("CARGO_BIN_EXE_cgroup-dial"))
        .arg(&cg.dir)
        .arg(service)
        .arg("40")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let seen = |b: &HttpBackend| -> Vec<String> {
        b.seen
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.peer.to_string())
            .collect()
    };
    let peers: HashSet<String> = seen(a).into_iter().chain(seen(b)).collect();
    let mut names = HashSet::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        // peer=ADDR local=ADDR body=NAME CLIENT
        assert_eq!(
            f[0],
            format!("peer={service}"),
            "getpeername shows the dialed address: {line}"
        );
        let local = f[1].trim_start_matches("local=");
        assert!(
            peers.contains(local),
            "no proxy hop: a backend accepted the dialer's own socket {local}: {line}"
        );
        names.insert(f[2].trim_start_matches("body=").to_string());
    }
    assert_eq!(text.lines().count(), 40, "{text}");
    assert_eq!(
        names.len(),
        2,
        "connections spread over both backends: {names:?}"
    );

    // Outside the cgroup: the userspace data plane answers on the service address.
    let mut s = std::net::TcpStream::connect(service).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap();
    let r = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(r.contains("alpha") || r.contains("bravo"), "{r}");
    let peers: HashSet<String> = seen(a).into_iter().chain(seen(b)).collect();
    assert!(
        !peers.contains(&s.local_addr().unwrap().to_string()),
        "outside the cgroup the userspace data plane proxies (the backend sees its socket)"
    );
}

#[test]
fn processes_in_the_cgroup_connect_straight_to_a_backend_and_see_the_dialed_address() {
    require_root();
    let cg = Cgroup::new();
    let (a4, b4) = (HttpBackend::start("alpha"), HttpBackend::start("bravo"));
    let v6: SocketAddr = "[::1]:0".parse().unwrap();
    let (a6, b6) = (
        HttpBackend::start_on(v6, "alpha"),
        HttpBackend::start_on(v6, "bravo"),
    );
    let service4 = format!("127.0.0.1:{}", free_port());
    let service6 = format!("[::1]:{}", free_port());
    let d = LocalDaemon::start(&format!(
        "services:
  - name: mysql
    listen: {service4}/tcp
    cgroup: {cg}
    split: {{ key: src-ip-port, backends: [ {{ name: a, address: '{}' }}, {{ name: b, address: '{}' }} ] }}
  - name: mysql6
    listen: '{service6}/tcp'
    cgroup: {cg}
    split: {{ key: src-ip-port, backends: [ {{ name: a, address: '{}' }}, {{ name: b, address: '{}' }} ] }}
",
        a4.addr,
        b4.addr,
        a6.addr,
        b6.addr,
        cg = cg.dir.display(),
    ));
    d.wait_log("connect-time ambassador attached");
    check_family(&cg, &service4, &a4, &b4);
    check_family(&cg, &service6, &a6, &b6);
}

/// A UDP backend answering `NAME PEER`.
fn udp_echo(
    bind: &str,
    name: &'static str,
) -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let s = std::net::UdpSocket::bind(bind).unwrap();
    let addr = s.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((_, peer)) = s.recv_from(&mut buf) {
            seen2.lock().unwrap().push(peer.to_string());
            let _ = s.send_to(format!("{name} {peer}").as_bytes(), peer);
        }
    });
    (addr, seen)
}

#[test]
fn udp_datagrams_from_the_cgroup_go_straight_to_a_backend_and_replies_read_as_from_the_service() {
    require_root();
    for (bind, service) in [
        ("127.0.0.1:0", format!("127.0.0.1:{}", free_port())),
        ("[::1]:0", format!("[::1]:{}", free_port())),
    ] {
        let cg = Cgroup::new();
        let (a, seen_a) = udp_echo(bind, "alpha");
        let (b, seen_b) = udp_echo(bind, "bravo");
        let d = LocalDaemon::start(&format!(
            "services:
  - name: dns
    listen: '{service}/udp'
    cgroup: {}
    split: {{ backends: [ {{ name: a, address: '{a}' }}, {{ name: b, address: '{b}' }} ] }}
",
            cg.dir.display()
        ));
        d.wait_log("connect-time ambassador attached");
        let out = Command::new(env!("CARGO_BIN_EXE_cgroup-dial"))
            .arg(&cg.dir)
            .arg(&service)
            .arg("5")
            .arg("udp")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        assert_eq!(text.lines().count(), 5, "{text}");
        let seen: Vec<String> = seen_a
            .lock()
            .unwrap()
            .iter()
            .chain(seen_b.lock().unwrap().iter())
            .cloned()
            .collect();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(
                f[0],
                format!("peer={service}"),
                "recvfrom shows the service: {line}"
            );
            let local = f[1].trim_start_matches("local=");
            assert!(
                seen.iter().any(|p| p == local),
                "no proxy hop: the backend got the datagram from the dialer's socket: {line}"
            );
        }
    }
}
