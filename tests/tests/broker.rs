//! The connect-time ambassador: a process in the configured cgroup (v2) dials the service
//! address and is connected straight to a backend (no proxy hop: the backend sees the
//! process's own socket), `getpeername` still says what it dialed, and processes outside the
//! cgroup are served by the userspace data plane with the same backends.

use std::{
    collections::HashSet,
    io::{Read as _, Write as _},
    net::SocketAddr,
    process::Command,
};

use ambassador_tests::{
    cgroup::Cgroup,
    local::{free_port, HttpBackend, LocalDaemon},
    netns::sh,
    require_root,
};

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
    let cg = Cgroup::create();
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
        let cg = Cgroup::create();
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

/// A MariaDB server of the test's (Debian's `mariadb-server`) on `ip:port`, its data dir a
/// copy of `template` (made once by `mariadb-install-db`).
struct Mariadb {
    child: std::process::Child,
    _dir: ambassador_tests::local::TempDir,
}

impl Mariadb {
    fn start(template: &std::path::Path, ip: &str, port: u16, id: u32) -> Mariadb {
        let dir = ambassador_tests::local::TempDir::new("mariadb");
        sh(&format!(
            "cp -a {} {}",
            template.display(),
            dir.path("data").display()
        ));
        // The app's account, on every start (the template has only root@localhost).
        let init = dir.path("init.sql");
        std::fs::write(
            &init,
            "CREATE USER IF NOT EXISTS 'app'@'%';\nGRANT ALL ON *.* TO 'app'@'%';\n",
        )
        .unwrap();
        let log = std::fs::File::create(dir.path("mariadbd.out")).unwrap();
        let child = Command::new("mariadbd")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", dir.path("data").display()))
            .arg(format!("--socket={}", dir.path("sock").display()))
            .arg(format!("--pid-file={}", dir.path("pid").display()))
            .arg(format!("--log-error={}", dir.path("error.log").display()))
            .arg(format!("--bind-address={ip}"))
            .arg(format!("--port={port}"))
            .arg(format!("--server-id={id}"))
            .arg(format!("--init-file={}", init.display()))
            .args([
                "--user=root",
                "--skip-name-resolve",
                "--skip-log-bin",
                "--innodb-buffer-pool-size=16M",
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("mariadbd (setup installs mariadb-server)");
        let m = Mariadb { child, _dir: dir };
        ambassador_tests::topology::wait_for(
            std::time::Duration::from_secs(30),
            "mariadbd to accept queries",
            || {
                Command::new("mariadb")
                    .args(["--no-defaults", "--protocol=TCP", "-uapp", "-h", ip])
                    .arg(format!("-P{port}"))
                    .args(["-e", "SELECT 1"])
                    .output()
                    .is_ok_and(|o| o.status.success())
            },
        );
        m
    }
}

impl Drop for Mariadb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `mariadb ARGS` started inside the cgroup (the shell joins it, then execs the client).
fn mariadb_in(cg: &Cgroup, args: &str) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c").arg(format!(
        "echo $$ > {}/cgroup.procs && exec mariadb --no-defaults --protocol=TCP -uapp -h127.0.0.1 -P3306 -N -B {args}",
        cg.dir.display()
    ));
    c
}

/// One query over a fresh connection from the cgroup: the answer's first line.
fn query_in(cg: &Cgroup, sql: &str) -> String {
    let out = mariadb_in(cg, &format!("-e '{sql}'")).output().unwrap();
    assert!(
        out.status.success(),
        "mariadb in the cgroup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// An open `mariadb` session in the cgroup: queries on one connection.
struct Session {
    child: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl Session {
    fn open(mut c: Command) -> Session {
        let mut child = c
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        Session { child, out }
    }

    fn ask(&mut self, sql: &str) -> String {
        use std::io::BufRead as _;
        writeln!(self.child.stdin.as_mut().unwrap(), "{sql};").unwrap();
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "the session's connection ended");
        line.trim().to_string()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Which process owns the TCP socket with local address `addr` (from `ss`).
fn socket_owner(addr: &str) -> String {
    let out = Command::new("ss")
        .args(["-tnpH", "state", "established", "src", addr])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn the_real_mariadb_client_in_the_cgroup_reaches_a_brokered_mariadb_without_a_hop() {
    require_root();
    // The service address the app dials, as in the book: nothing else may hold it.
    assert!(
        std::net::TcpListener::bind("127.0.0.1:3306").is_ok(),
        "127.0.0.1:3306 is in use (a system MariaDB?): the test dials it as the app would; stop that server"
    );
    let tmp = ambassador_tests::local::TempDir::new("mariadb-template");
    let template = tmp.path("data");
    let out = Command::new("mariadb-install-db")
        .arg("--no-defaults")
        .arg(format!("--datadir={}", template.display()))
        .args([
            "--user=root",
            "--skip-test-db",
            "--auth-root-authentication-method=normal",
        ])
        .output()
        .expect("mariadb-install-db (setup installs mariadb-server)");
    assert!(
        out.status.success(),
        "mariadb-install-db: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = free_port();
    let _one = Mariadb::start(&template, "127.0.0.2", port, 1);
    let _two = Mariadb::start(&template, "127.0.0.3", port, 2);
    let dport = free_port();
    let mut dns = ambassador_tests::dnsmasq::Dnsmasq::start(
        dport,
        "127.0.0.2 db.internal\n127.0.0.3 db.internal\n",
        &[],
    );
    let cg = Cgroup::create();
    let d = LocalDaemon::start(&format!(
        "resolvers: {{ dns: 127.0.0.1:{dport} }}
services:
  - name: mysql
    listen: 127.0.0.1:3306/tcp
    cgroup: {}
    broker: {{ source: dns, name: db.internal, port: {port}, refresh: 200ms }}
    split: {{ key: src-ip-port, backends: [] }}
",
        cg.dir.display()
    ));
    d.wait_log("connect-time ambassador attached");

    // New connections from the cgroup spread over both servers.
    let ids: HashSet<String> = (0..16)
        .map(|_| query_in(&cg, "SELECT @@server_id"))
        .collect();
    assert_eq!(ids, HashSet::from(["1".into(), "2".into()]), "{}", d.log());

    // An open session; the server sees the client's own socket (no proxy hop).
    let mut s = Session::open(mariadb_in(&cg, "--unbuffered"));
    let mine = s.ask("SELECT @@server_id");
    let host = s.ask("SELECT host FROM information_schema.processlist WHERE id = CONNECTION_ID()");
    let owner = socket_owner(&host);
    assert!(
        owner.contains("\"mariadb\"") && owner.contains(&format!("pid={}", s.child.id())),
        "the server's peer {host} is the mariadb client's own socket: {owner}"
    );

    // Outside the cgroup the userspace data plane proxies (the server sees its socket).
    let mut c = Command::new("mariadb");
    c.args([
        "--no-defaults",
        "--protocol=TCP",
        "-uapp",
        "-h127.0.0.1",
        "-P3306",
        "-N",
        "-B",
        "--unbuffered",
    ]);
    let mut outside = Session::open(c);
    let host =
        outside.ask("SELECT host FROM information_schema.processlist WHERE id = CONNECTION_ID()");
    let owner = socket_owner(&host);
    assert!(
        owner.contains("\"ambassador\"") && owner.contains(&format!("pid={}", d.pid())),
        "outside the cgroup the server's peer {host} is the daemon's socket: {owner}"
    );
    drop(outside);

    // The session's server leaves DNS: new connections go to the other, the session goes on.
    let (gone, stays) = if mine == "1" {
        ("127.0.0.2", "127.0.0.3")
    } else {
        ("127.0.0.3", "127.0.0.2")
    };
    dns.set_hosts(&format!("{stays} db.internal\n"));
    ambassador_tests::topology::wait_for(
        std::time::Duration::from_secs(15),
        "the removed endpoint to leave the service",
        || {
            let st = d.status();
            let b = st["services"][0]["backends"].to_string();
            b.contains(stays) && !b.contains(gone)
        },
    );
    let other = if mine == "1" { "2" } else { "1" };
    for _ in 0..10 {
        assert_eq!(query_in(&cg, "SELECT @@server_id"), other);
    }
    assert_eq!(
        s.ask("SELECT @@server_id"),
        mine,
        "the open session moved or was cut"
    );

    // DNS down: the last good set keeps serving new connections.
    dns.stop();
    ambassador_tests::topology::wait_for(
        std::time::Duration::from_secs(10),
        "the dead DNS server to be reported",
        || d.status()["discovery"][0]["last_error"].is_string(),
    );
    for _ in 0..5 {
        assert_eq!(query_in(&cg, "SELECT @@server_id"), other);
    }
    assert_eq!(s.ask("SELECT 40 + 2"), "42");
}
