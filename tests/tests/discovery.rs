//! The brokering ambassador's discovery with a real DNS server (Debian's dnsmasq, started by
//! the test on loopback): A records and SRV records that change mid-test, an endpoint removed
//! under an open connection, and the server going down (the last good set keeps serving).

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use ambassador_tests::{
    dnsmasq::Dnsmasq,
    local::{free_port, HttpBackend, LocalDaemon, TempDir},
    topology::{wait_for, KeepAlive},
};

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
    let end = std::time::Instant::now() + Duration::from_secs(15);
    while backends(d) != want {
        assert!(
            std::time::Instant::now() < end,
            "timed out after 15s waiting for backends {want:?}; status: {}\n{}",
            d.status(),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
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

/// A stand-in Kubernetes API server on loopback that speaks the real wire format to kube's
/// client: the EndpointSlice list, then a watch whose events the test sends.
struct ApiServer {
    port: u16,
    events: std::sync::mpsc::Sender<String>,
    /// Set: every request gets 500 (an API server in trouble).
    failing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Set: the next watch is told its resource version is too old (410, history compacted).
    expired: std::sync::Arc<std::sync::atomic::AtomicBool>,
    lists: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

fn slice(name: &str, rv: u32, port: u16, endpoints: &[(&str, bool, bool, bool)]) -> String {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|(ip, ready, serving, terminating)| {
            format!(r#"{{"addresses":["{ip}"],"conditions":{{"ready":{ready},"serving":{serving},"terminating":{terminating}}},"targetRef":{{"kind":"Pod","namespace":"db","name":"mysql-{ip}"}}}}"#)
        })
        .collect();
    format!(
        r#"{{"kind":"EndpointSlice","apiVersion":"discovery.k8s.io/v1","metadata":{{"name":"{name}","generateName":"mysql-","namespace":"db","resourceVersion":"{rv}","labels":{{"endpointslice.kubernetes.io/managed-by":"endpointslice-controller.k8s.io","kubernetes.io/service-name":"mysql"}}}},"addressType":"IPv4","endpoints":[{}],"ports":[{{"name":"mysql","protocol":"TCP","port":{port}}},{{"name":"metrics","protocol":"TCP","port":9104}}]}}"#,
        eps.join(",")
    )
}

impl ApiServer {
    fn start(list: Vec<String>) -> ApiServer {
        use std::io::{BufRead, BufReader, Write};
        use std::sync::{atomic::Ordering, Arc, Mutex};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let rx = Arc::new(Mutex::new(rx));
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let lists = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let expired = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (f, n, x) = (failing.clone(), lists.clone(), expired.clone());
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut conn) = conn else { return };
                let (rx, list, f, n, x) =
                    (rx.clone(), list.clone(), f.clone(), n.clone(), x.clone());
                std::thread::spawn(move || {
                    let mut r = BufReader::new(conn.try_clone().unwrap());
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let target = line.split(' ').nth(1).unwrap_or_default().to_string();
                        // The rest of the head.
                        loop {
                            let mut h = String::new();
                            if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                                break;
                            }
                        }
                        if f.load(Ordering::SeqCst) {
                            let body = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"etcdserver: request timed out","code":500}"#;
                            let _ = write!(conn, "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                            continue;
                        }
                        assert!(
                            target.starts_with(
                                "/apis/discovery.k8s.io/v1/namespaces/db/endpointslices?"
                            ) && target
                                .contains("labelSelector=kubernetes.io%2Fservice-name%3Dmysql"),
                            "unexpected request {target}"
                        );
                        if !target.contains("watch=") {
                            n.fetch_add(1, Ordering::SeqCst);
                            let body = format!(
                                r#"{{"kind":"EndpointSliceList","apiVersion":"discovery.k8s.io/v1","metadata":{{"resourceVersion":"100"}},"items":[{}]}}"#,
                                list.join(",")
                            );
                            let _ = write!(conn, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                            continue;
                        }
                        // The watch: one JSON event per line, chunked, until the test ends.
                        let _ = write!(conn, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n");
                        let _ = conn.flush();
                        if x.swap(false, Ordering::SeqCst) {
                            let line = r#"{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"too old resource version: 100 (104)","reason":"Expired","code":410}}"#.to_string() + "\n";
                            let _ = write!(conn, "{:x}\r\n{line}\r\n0\r\n\r\n", line.len());
                            return;
                        }
                        loop {
                            let ev =
                                match rx.lock().unwrap().recv_timeout(Duration::from_millis(200)) {
                                    Ok(ev) => ev,
                                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                                        if f.load(Ordering::SeqCst) {
                                            // Drop the watch; the client re-lists and meets the 500s.
                                            return;
                                        }
                                        continue;
                                    }
                                    Err(_) => return,
                                };
                            let line = format!("{ev}\n");
                            if write!(conn, "{:x}\r\n{line}\r\n", line.len()).is_err() {
                                return;
                            }
                            let _ = conn.flush();
                        }
                    }
                });
            }
        });
        ApiServer {
            port,
            events: tx,
            failing,
            expired,
            lists,
        }
    }

    fn send(&self, kind: &str, object: String) {
        self.events
            .send(format!(r#"{{"type":"{kind}","object":{object}}}"#))
            .unwrap();
    }

    fn kubeconfig(&self, dir: &TempDir) -> String {
        let p = dir.path("kubeconfig");
        std::fs::write(
            &p,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n  - name: test\n    cluster: {{ server: \"http://127.0.0.1:{}\" }}\nusers:\n  - name: test\n    user: {{}}\ncontexts:\n  - name: test\n    context: {{ cluster: test, user: test, namespace: db }}\ncurrent-context: test\n",
                self.port
            ),
        )
        .unwrap();
        p.display().to_string()
    }
}

#[test]
fn kubernetes_endpoint_slices_are_watched_joined_and_terminating_endpoints_drain() {
    use std::sync::atomic::Ordering;
    ambassador_tests::require_root();
    let bport = free_port();
    let a: SocketAddr = format!("127.0.0.2:{bport}").parse().unwrap();
    let b: SocketAddr = format!("127.0.0.3:{bport}").parse().unwrap();
    let c: SocketAddr = format!("127.0.0.4:{bport}").parse().unwrap();
    let _ba = HttpBackend::start_on(a, "a");
    let _bb = HttpBackend::start_on(b, "b");
    let _bc = HttpBackend::start_on(c, "c");
    let api = ApiServer::start(vec![slice(
        "mysql-abc12",
        90,
        bport,
        &[
            ("127.0.0.2", true, true, false),
            ("127.0.0.9", false, false, false),
        ],
    )]);
    let tmp = TempDir::new("kube");
    let kubeconfig = api.kubeconfig(&tmp);
    let lport = free_port();
    let listen: SocketAddr = format!("127.0.0.1:{lport}").parse().unwrap();
    // No namespace in the name: the kubeconfig context's (db).
    let d = LocalDaemon::start_env(
        &format!(
            "services:\n  - name: db\n    listen: {listen}/tcp\n    broker: {{ source: kubernetes, name: mysql, port_name: mysql }}\n    split: {{ key: src-ip-port, backends: [] }}\n"
        ),
        &["--dataplane", "userspace"],
        &[("KUBECONFIG", kubeconfig.as_str())],
    );
    // The list: the ready endpoint only.
    wait_backends(&d, &[format!("{a} w1")]);
    assert!(names_of(&d, listen, 5).iter().all(|n| n == "a"));
    let mut open = KeepAlive::open("127.0.0.1".parse().unwrap(), listen).unwrap();
    assert!(open.get().unwrap().starts_with("a "));

    // A second slice: slices are joined.
    api.send(
        "ADDED",
        slice(
            "mysql-def34",
            101,
            bport,
            &[("127.0.0.3", true, true, false)],
        ),
    );
    wait_backends(&d, &[format!("{a} w1"), format!("{b} w1")]);

    // a's pod terminates but still serves: no new flows, the open one continues.
    api.send(
        "MODIFIED",
        slice(
            "mysql-abc12",
            102,
            bport,
            &[("127.0.0.2", false, true, true)],
        ),
    );
    wait_backends(&d, &[format!("{b} w1")]);
    assert!(names_of(&d, listen, 20).iter().all(|n| n == "b"));
    assert!(
        open.get().unwrap().starts_with("a "),
        "the flow on a terminating endpoint was cut"
    );
    let st = d.status();
    assert_eq!(st["discovery"][0]["draining"][0], a.to_string(), "{st}");
    wait_for(
        Duration::from_secs(5),
        "metrics to show the draining endpoint",
        || {
            let m = d.metrics();
            m.contains(r#"ambassador_discovery_draining_endpoints{service="db",name="mysql"} 1"#)
                && m.contains(r#"ambassador_discovery_stale{service="db",name="mysql"} 0"#)
        },
    );
    let text = std::process::Command::new(ambassador_tests::ambassador_bin())
        .args(["status", "--state-dir"])
        .arg(d.dir.path("state"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains(&format!("draining {a}")), "{text}");

    // A new pod in a's slice, a's endpoint gone.
    api.send(
        "MODIFIED",
        slice(
            "mysql-abc12",
            103,
            bport,
            &[("127.0.0.4", true, true, false)],
        ),
    );
    wait_backends(&d, &[format!("{b} w1"), format!("{c} w1")]);
    assert!(d.status()["discovery"][0]["draining"].is_null());

    // Deleting b's slice leaves c.
    api.send(
        "DELETED",
        slice(
            "mysql-def34",
            104,
            bport,
            &[("127.0.0.3", true, true, false)],
        ),
    );
    wait_backends(&d, &[format!("{c} w1")]);
    assert!(names_of(&d, listen, 10).iter().all(|n| n == "c"));

    // The API server fails: the watch drops, re-lists meet 500s; the last good set serves
    // and the status says it is stale.
    let lists = api.lists.load(Ordering::SeqCst);
    api.failing.store(true, Ordering::SeqCst);
    wait_for(
        Duration::from_secs(15),
        "the failing API server to be reported",
        || d.status()["discovery"][0]["last_error"].is_string(),
    );
    let st = d.status();
    let err = st["discovery"][0]["last_error"].as_str().unwrap();
    assert!(err.contains("db/mysql"), "{st}");
    // /metrics serves a report up to a second old: wait for it to catch up.
    wait_for(
        Duration::from_secs(5),
        "metrics to show the stale set",
        || {
            let m = d.metrics();
            m.contains(r#"ambassador_discovery_stale{service="db",name="mysql"} 1"#)
                && m.contains(r#"ambassador_discovery_endpoints{service="db",name="mysql"} 1"#)
        },
    );
    assert_eq!(backends(&d), vec![format!("{c} w1")]);
    assert!(names_of(&d, listen, 5).iter().all(|n| n == "c"));
    // It recovers with its watch history compacted: the resumed watch gets 410, the client
    // lists afresh, and that list (a's slice as first listed) replaces everything.
    api.expired.store(true, Ordering::SeqCst);
    api.failing.store(false, Ordering::SeqCst);
    wait_backends(&d, &[format!("{a} w1")]);
    assert!(api.lists.load(Ordering::SeqCst) > lists);
    wait_for(Duration::from_secs(10), "the error to clear", || {
        d.status()["discovery"][0]["last_error"].is_null()
    });
}

#[test]
fn service_binding_directories_are_read_and_a_bad_port_keeps_the_last_set() {
    ambassador_tests::require_root();
    let bport = free_port();
    let a: SocketAddr = format!("127.0.0.2:{bport}").parse().unwrap();
    let b: SocketAddr = format!("127.0.0.3:{bport}").parse().unwrap();
    let _ba = HttpBackend::start_on(a, "a");
    let _bb = HttpBackend::start_on(b, "b");
    let root = TempDir::new("bindings");
    let dir = root.path("db");
    std::fs::create_dir_all(&dir).unwrap();
    // As a platform projects it: entries behind a `..data` symlink that is swapped.
    let project = |gen: u32, files: &[(&str, String)]| {
        let data = root.path(&format!("db/..{gen}"));
        std::fs::create_dir_all(&data).unwrap();
        for (k, v) in files {
            std::fs::write(data.join(k), v).unwrap();
            let link = dir.join(k);
            if !link.exists() {
                std::os::unix::fs::symlink(format!("..data/{k}"), &link).unwrap();
            }
        }
        let tmp = dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(format!("..{gen}"), &tmp).unwrap();
        std::fs::rename(&tmp, dir.join("..data")).unwrap();
    };
    project(
        1,
        &[
            ("type", "mysql".into()),
            ("host", "127.0.0.2".into()),
            ("port", format!("{bport}\n")),
        ],
    );
    let lport = free_port();
    let listen: SocketAddr = format!("127.0.0.1:{lport}").parse().unwrap();
    let root_s = root.0.display().to_string();
    let d = LocalDaemon::start_env(
        &format!(
            "services:\n  - name: db\n    listen: {listen}/tcp\n    broker: {{ source: binding, name: db, refresh: 200ms }}\n    split: {{ key: src-ip-port, backends: [] }}\n"
        ),
        &["--dataplane", "userspace"],
        &[("SERVICE_BINDING_ROOT", root_s.as_str())],
    );
    wait_backends(&d, &[format!("{a} w1")]);
    assert!(names_of(&d, listen, 5).iter().all(|n| n == "a"));

    // The platform rebinds to two hosts.
    project(
        2,
        &[
            ("type", "mysql".into()),
            ("host", "127.0.0.2, 127.0.0.3".into()),
            ("port", format!("{bport}")),
        ],
    );
    wait_backends(&d, &[format!("{a} w1"), format!("{b} w1")]);

    // A bad port: reported with the directory and the reason; the last good set serves.
    project(
        3,
        &[
            ("type", "mysql".into()),
            ("host", "127.0.0.3".into()),
            ("port", "mysql".into()),
        ],
    );
    wait_for(
        Duration::from_secs(10),
        "the bad port to be reported",
        || d.status()["discovery"][0]["last_error"].is_string(),
    );
    let st = d.status();
    let err = st["discovery"][0]["last_error"].as_str().unwrap();
    assert!(
        err.contains("port \"mysql\" is not a port") && err.contains("db"),
        "{st}"
    );
    assert_eq!(backends(&d), vec![format!("{a} w1"), format!("{b} w1")]);
    let seen = names_of(&d, listen, 30);
    assert!(seen.iter().all(|n| n == "a" || n == "b"), "{seen:?}");
    assert!(d.log().contains("the last good set keeps serving"));
}
