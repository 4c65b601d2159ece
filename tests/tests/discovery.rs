//! The brokering ambassador's discovery with a real DNS server (Debian's dnsmasq, started by
//! the test on loopback): A records and SRV records that change mid-test, an endpoint removed
//! under an open connection, and the server going down (the last good set keeps serving).

use std::{
    net::{IpAddr, SocketAddr},
    process::{Child, Command, Stdio},
    time::Duration,
};

use ambassador_tests::{
    local::{free_port, HttpBackend, LocalDaemon, TempDir},
    topology::{wait_for, KeepAlive},
};

/// dnsmasq answering only from the test's data: hosts files in a watched directory (changes
/// apply without a restart) and SRV records from its command line.
struct Dnsmasq {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
}

impl Dnsmasq {
    fn start(port: u16, hosts: &str, srv: &[&str]) -> Dnsmasq {
        let dir = TempDir::new("dnsmasq");
        std::fs::create_dir_all(dir.path("hosts.d")).unwrap();
        let d = Dnsmasq {
            child: None,
            port,
            dir,
        };
        d.set_hosts(hosts);
        d.restart(srv)
    }

    fn restart(mut self, srv: &[&str]) -> Dnsmasq {
        self.stop();
        let mut c = Command::new("dnsmasq");
        c.args([
            "--keep-in-foreground",
            "--pid-file",
            "--user=root",
            "--conf-file=/dev/null",
            "--no-hosts",
            "--no-resolv",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--local=/internal/",
            "--local=/consul/",
            "--log-facility=-",
        ])
        .arg(format!("--port={}", self.port))
        .arg(format!("--hostsdir={}", self.dir.path("hosts.d").display()));
        for s in srv {
            c.arg(format!("--srv-host={s}"));
        }
        let log = std::fs::File::create(self.dir.path("dnsmasq.log")).unwrap();
        let child = c
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("dnsmasq (setup installs dnsmasq-base)");
        self.child = Some(child);
        let port = self.port;
        wait_for(Duration::from_secs(10), "dnsmasq to listen", || {
            std::net::UdpSocket::bind(("127.0.0.1", port)).is_err()
        });
        self
    }

    /// Replace the A records (written aside and renamed in: dnsmasq sees whole files only).
    fn set_hosts(&self, text: &str) {
        let tmp = self.dir.path("hosts.d/.hosts.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.dir.path("hosts.d/hosts")).unwrap();
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.stop();
    }
}

fn backends(d: &LocalDaemon) -> Vec<String> {
    let st = d.status();
    let mut v: Vec<String> = st["services"][0]["backends"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| {
                    format!(
                        "{} w{}",
                        b["address"].as_str().unwrap_or_default(),
                        b["weight"]
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn wait_backends(d: &LocalDaemon, want: &[String]) {
    wait_for(
        Duration::from_secs(15),
        &format!("backends {want:?}"),
        || backends(d) == want,
    );
}

fn names_of(d: &LocalDaemon, listen: SocketAddr, n: usize) -> Vec<String> {
    let src: IpAddr = "127.0.0.1".parse().unwrap();
    (0..n)
        .map(|i| {
            // A fresh connection per request (the test backend keeps connections open).
            KeepAlive::open(src, listen)
                .and_then(|mut c| c.get())
                .unwrap_or_else(|e| panic!("request {i} through the broker: {e}\n{}", d.log()))
                .split(' ')
                .next()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[test]
fn dns_a_records_change_endpoints_open_connections_continue_and_a_dead_server_keeps_the_last_set() {
    ambassador_tests::require_root();
    let bport = free_port();
    let a: SocketAddr = format!("127.0.0.2:{bport}").parse().unwrap();
    let b: SocketAddr = format!("127.0.0.3:{bport}").parse().unwrap();
    let _ba = HttpBackend::start_on(a, "a");
    let _bb = HttpBackend::start_on(b, "b");
    let dport = free_port();
    let mut dns = Dnsmasq::start(dport, "127.0.0.2 db.internal\n", &[]);
    let lport = free_port();
    let listen: SocketAddr = format!("127.0.0.1:{lport}").parse().unwrap();
    let d = LocalDaemon::start(&format!(
        "resolvers: {{ dns: 127.0.0.1:{dport} }}\nservices:\n  - name: db\n    listen: {listen}/tcp\n    broker: {{ source: dns, name: db.internal, port: {bport}, refresh: 200ms }}\n    split: {{ key: src-ip-port, backends: [] }}\n"
    ));
    wait_backends(&d, &[format!("{a} w1")]);
    assert!(names_of(&d, listen, 5).iter().all(|n| n == "a"));
    let mut open = KeepAlive::open("127.0.0.1".parse().unwrap(), listen).unwrap();
    assert!(open.get().unwrap().starts_with("a "));

    // A second endpoint appears: new connections spread over both.
    dns.set_hosts("127.0.0.2 db.internal\n127.0.0.3 db.internal\n");
    wait_backends(&d, &[format!("{a} w1"), format!("{b} w1")]);
    let seen = names_of(&d, listen, 40);
    assert!(
        seen.contains(&"a".to_string()) && seen.contains(&"b".to_string()),
        "{seen:?}"
    );

    // The first is removed: new connections all go to the other; the open one continues.
    dns.set_hosts("127.0.0.3 db.internal\n");
    wait_backends(&d, &[format!("{b} w1")]);
    assert!(names_of(&d, listen, 20).iter().all(|n| n == "b"));
    assert!(
        open.get().unwrap().starts_with("a "),
        "the open connection was cut"
    );

    // An empty answer does not empty the service.
    dns.set_hosts("127.0.0.9 other.internal\n");
    wait_for(
        Duration::from_secs(10),
        "the empty answer to be reported",
        || d.status()["discovery"][0]["last_error"].is_string(),
    );
    assert_eq!(backends(&d), vec![format!("{b} w1")]);

    // DNS down: the last good set serves, and the status says it is stale and why.
    dns.stop();
    std::thread::sleep(Duration::from_millis(1500));
    let st = d.status();
    let err = st["discovery"][0]["last_error"]
        .as_str()
        .unwrap_or_default();
    assert!(err.contains("db.internal"), "{st}");
    assert!(names_of(&d, listen, 10).iter().all(|n| n == "b"));
    assert!(d.log().contains("the last good set keeps serving"));
}

#[test]
fn srv_records_give_priority_and_weights() {
    ambassador_tests::require_root();
    let dport = free_port();
    let hosts = "127.0.0.2 db1.internal\n127.0.0.3 db2.internal\n127.0.0.4 db3.internal\n";
    let srv = [
        "_mysql._tcp.db.internal,db1.internal,3306,10,60",
        "_mysql._tcp.db.internal,db2.internal,3307,10,40",
        "_mysql._tcp.db.internal,db3.internal,3308,20,100",
    ];
    let dns = Dnsmasq::start(dport, hosts, &srv);
    // Consul's DNS naming, served by the same server (as a Consul agent on :8600 would).
    let consul_port = free_port();
    let consul = Dnsmasq::start(
        consul_port,
        "127.0.0.5 node1.node.dc1.consul\n",
        &["mysql.service.consul,node1.node.dc1.consul,3310,1,1"],
    );
    let cport = free_port();
    let c = LocalDaemon::start(&format!(
        "resolvers: {{ dns: 127.0.0.1:{consul_port} }}\nservices:\n  - name: mysql\n    listen: 127.0.0.1:{cport}/tcp\n    broker: {{ source: consul, name: mysql, refresh: 200ms }}\n    split: {{ key: src-ip-port, backends: [] }}\n"
    ));
    wait_backends(&c, &["127.0.0.5:3310 w1".to_string()]);
    drop((c, consul));
    let lport = free_port();
    let d = LocalDaemon::start(&format!(
        "resolvers: {{ dns: 127.0.0.1:{dport} }}\nservices:\n  - name: mysql\n    listen: 127.0.0.1:{lport}/tcp\n    broker: {{ source: dns-srv, name: _mysql._tcp.db.internal, refresh: 200ms }}\n    split: {{ key: src-ip-port, backends: [] }}\n"
    ));
    // The lowest priority (10) with its weights; the priority-20 record is the fallback.
    wait_backends(
        &d,
        &[
            "127.0.0.2:3306 w60".to_string(),
            "127.0.0.3:3307 w40".to_string(),
        ],
    );
    // The priority-10 targets go away (their names stop resolving): the fallback serves.
    dns.set_hosts("127.0.0.4 db3.internal\n");
    wait_backends(&d, &["127.0.0.4:3308 w100".to_string()]);
    // Records changed on the server (a restart with new SRV data) are picked up.
    let dns = dns.restart(&["_mysql._tcp.db.internal,db3.internal,3309,10,5"]);
    wait_backends(&d, &["127.0.0.4:3309 w5".to_string()]);
    drop(dns);
}
