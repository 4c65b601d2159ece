//! The memcached sharding ambassador end to end: `ambassador run` on the same twemproxy file
//! as Debian's nutcracker, in front of real memcached shards.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::Duration,
};

use ambassador_tests::{
    bench::{spawn, wait_port, Proc},
    local::{free_port, LocalDaemon, TempDir},
};

struct Conn(TcpStream, Vec<u8>);

impl Conn {
    fn new(port: u16) -> Conn {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Conn(s, Vec::new())
    }

    /// Send, then read until the reply ends with `until` (a line such as "END\r\n").
    fn call(&mut self, req: &str, until: &str) -> String {
        self.0.write_all(req.as_bytes()).unwrap();
        self.read_until(until)
    }

    /// One reply: everything up to and including the first `until` (the rest stays buffered).
    fn read_until(&mut self, until: &str) -> String {
        let u = until.as_bytes();
        loop {
            if let Some(i) = self.1.windows(u.len()).position(|w| w == u) {
                let rest = self.1.split_off(i + u.len());
                return String::from_utf8(std::mem::replace(&mut self.1, rest)).unwrap();
            }
            let mut b = [0u8; 65536];
            let n = self.0.read(&mut b).expect("reply within 10 s");
            assert!(n > 0, "closed; got {:?}", String::from_utf8_lossy(&self.1));
            self.1.extend_from_slice(&b[..n]);
        }
    }

    fn line(&mut self, req: &str) -> String {
        self.call(req, "\r\n")
    }
}

#[test]
fn memcache_pool_shards_like_nutcracker_and_every_command_works() {
    let dir = TempDir::new("memcache");
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let _mc: Vec<Proc> = ports
        .iter()
        .map(|p| {
            let proc = spawn(
                &format!("memcached -U 0 -l 127.0.0.1 -p {p} -u root -m 64"),
                &dir.path(&format!("memcached-{p}.log")),
            );
            wait_port(*p, "memcached");
            proc
        })
        .collect();
    let nc_port = free_port();
    let mut conf = format!(
        "cache:\n  listen: 127.0.0.1:{nc_port}\n  hash: fnv1a_64\n  distribution: ketama\n  servers:\n"
    );
    for p in &ports {
        conf.push_str(&format!("   - 127.0.0.1:{p}:1\n"));
    }
    let nc_conf = dir.path("nutcracker.yml");
    std::fs::write(&nc_conf, &conf).unwrap();
    let _nc = spawn(
        &format!(
            "nutcracker -c {} -s {} -o {}",
            nc_conf.display(),
            free_port(),
            dir.path("nutcracker.log").display()
        ),
        &dir.path("nutcracker.out"),
    );
    wait_port(nc_port, "nutcracker");
    let port = free_port();
    let _d = LocalDaemon::start_with(
        &conf.replace(&format!(":{nc_port}\n"), &format!(":{port}\n")),
        &[
            "--dataplane",
            "userspace",
            "--stats-listen",
            &format!("127.0.0.1:{}", free_port()),
        ],
    );
    wait_port(port, "ambassador");

    // Golden: keys written through nutcracker are read back through ambassador, one multi-key
    // get fanned out over the shards and merged in key order.
    let mut nc = Conn::new(nc_port);
    let keys: Vec<String> = (0..200).map(|i| format!("key:{i}:x")).collect();
    for k in &keys {
        assert_eq!(
            nc.line(&format!("set {k} 7 0 {}\r\nv-{k}\r\n", k.len() + 2)),
            "STORED\r\n"
        );
    }
    let mut a = Conn::new(port);
    let got = a.call(
        &format!("get {} missing-key\r\n", keys.join(" ")),
        "END\r\n",
    );
    let mut expect = String::new();
    for k in &keys {
        expect.push_str(&format!("VALUE {k} 7 {}\r\nv-{k}\r\n", k.len() + 2));
    }
    expect.push_str("END\r\n");
    assert_eq!(got, expect);
    // The keys really are spread: each shard holds some.
    for p in &ports {
        let mut d = Conn::new(*p);
        let r = d.call(&format!("get {}\r\n", keys.join(" ")), "END\r\n");
        assert!(r.matches("VALUE").count() > 10, "shard {p}: {r}");
    }

    // Every storage and keyed command.
    assert_eq!(a.line("set n 0 0 1\r\n5\r\n"), "STORED\r\n");
    assert_eq!(a.line("add n 0 0 1\r\n6\r\n"), "NOT_STORED\r\n");
    assert_eq!(a.line("replace n 0 0 2\r\n10\r\n"), "STORED\r\n");
    assert_eq!(a.line("append n 0 0 1\r\n0\r\n"), "STORED\r\n");
    assert_eq!(a.line("prepend n 0 0 1\r\n1\r\n"), "STORED\r\n");
    assert_eq!(a.line("incr n 5\r\n"), "1105\r\n");
    assert_eq!(a.line("decr n 100\r\n"), "1005\r\n");
    assert_eq!(a.line("touch n 100\r\n"), "TOUCHED\r\n");
    let gets = a.call("gets n\r\n", "END\r\n");
    let cas: &str = gets.split_whitespace().nth(4).unwrap();
    assert_eq!(a.line(&format!("cas n 0 0 1 {cas}\r\n7\r\n")), "STORED\r\n");
    assert_eq!(a.line(&format!("cas n 0 0 1 {cas}\r\n8\r\n")), "EXISTS\r\n");
    assert_eq!(a.line("delete n\r\n"), "DELETED\r\n");
    assert_eq!(a.line("delete n\r\n"), "NOT_FOUND\r\n");
    // noreply: nothing comes back, and the next reply is still the right one.
    a.0.write_all(b"set q 0 0 1 noreply\r\nz\r\n").unwrap();
    assert_eq!(
        a.call("get q\r\n", "END\r\n"),
        "VALUE q 0 1\r\nz\r\nEND\r\n"
    );
    assert!(a.line("version\r\n").starts_with("VERSION ambassador"));
    assert_eq!(a.line("flush_all\r\n"), "ERROR\r\n");
    // Pipelined: replies in order.
    let mut p = String::new();
    for i in 0..500 {
        p.push_str(&format!(
            "set p{i} 0 0 {}\r\n{i}\r\nget p{i}\r\n",
            i.to_string().len()
        ));
    }
    a.0.write_all(p.as_bytes()).unwrap();
    for i in 0..500 {
        assert_eq!(a.read_until("STORED\r\n"), "STORED\r\n");
        let v = i.to_string();
        assert_eq!(
            a.read_until("END\r\n"),
            format!("VALUE p{i} 0 {}\r\n{v}\r\nEND\r\n", v.len())
        );
    }
    // Malformed: CLIENT_ERROR and a close; other clients unaffected.
    let mut bad = Conn::new(port);
    assert!(bad
        .line("set k 0 0 notanumber\r\n")
        .starts_with("CLIENT_ERROR"));
    let mut rest = Vec::new();
    assert_eq!(bad.0.read_to_end(&mut rest).unwrap_or(0), 0, "closed");
    assert_eq!(
        a.call("get p7\r\n", "END\r\n"),
        "VALUE p7 0 1\r\n7\r\nEND\r\n"
    );
}
