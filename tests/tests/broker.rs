//! The connect-time ambassador: a process in the configured cgroup (v2) dials the service
//! address and is connected straight to a backend (no proxy hop: the backend sees the
//! process's own socket), `getpeername` still says what it dialed, and processes outside the
//! cgroup are served by the userspace data plane with the same backends.

use std::{collections::HashSet, path::PathBuf, process::Command};

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
        let dir = root.join(format!("amb-test-{}", std::process::id()));
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

#[test]
fn processes_in_the_cgroup_connect_straight_to_a_backend_and_see_the_dialed_address() {
    require_root();
    let cg = Cgroup::new();
    let a = HttpBackend::start("alpha");
    let b = HttpBackend::start("bravo");
    let port = free_port();
    let service = format!("127.0.0.1:{port}");
    let d = LocalDaemon::start(&format!(
        "services:
  - name: mysql
    listen: {service}/tcp
    cgroup: {}
    split: {{ key: src-ip-port, backends: [ {{ name: a, address: '{}' }}, {{ name: b, address: '{}' }} ] }}
",
        cg.dir.display(),
        a.addr,
        b.addr
    ));
    d.wait_log("connect-time ambassador attached");

    let out = Command::new(env!("CARGO_BIN_EXE_cgroup-dial"))
        .arg(&cg.dir)
        .arg(&service)
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
    let peers: HashSet<String> = seen(&a).into_iter().chain(seen(&b)).collect();
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
        let name = f[2].trim_start_matches("body=");
        assert!(
            peers.contains(local),
            "no proxy hop: a backend accepted the dialer's own socket {local}: {line}"
        );
        names.insert(name.to_string());
    }
    assert_eq!(text.lines().count(), 40, "{text}");
    assert_eq!(
        names.len(),
        2,
        "connections spread over both backends: {names:?}"
    );

    // Outside the cgroup: the userspace data plane answers on the service address.
    let mut s = std::net::TcpStream::connect(&service).unwrap();
    use std::io::{Read as _, Write as _};
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut r = String::new();
    let _ = s.read_to_string(&mut r);
    let body = r.split("\r\n\r\n").nth(1).unwrap_or("").trim().to_string();
    let client = body.split_whitespace().nth(1).unwrap_or("");
    assert!(
        body.starts_with("alpha") || body.starts_with("bravo"),
        "{r}"
    );
    assert_ne!(
        client,
        s.local_addr().unwrap().to_string(),
        "outside the cgroup: proxied"
    );
}
