//! The request-splitting topology of the book, in network namespaces:
//!
//! ```text
//!  client ns (c0: 10.200.1.2 + N client addresses)        web ns (w0: 10.200.2.2, nginx)
//!        │                                              ┌──── lbw 10.200.2.1
//!        └──── lbc 10.200.1.1 ── lb ns: ambassador, XDP ┤
//!                                 on lbc, lbw, lbe      └──── lbe 10.200.3.1
//!                                                             exp ns (e0: 10.200.3.2, nginx)
//! ```
//! IPv6 mirrors it on fd00:1::/64, fd00:2::/64, fd00:3::/64. The service address
//! (10.200.0.100, fd00::100) is owned by nobody: the kernel program answers for it.
//!
//! By default ([`Peers::Containers`]) the veths are left as `ip link add ... type veth` makes
//! them, as container runtimes and CNI plugins leave a pod's veth: TX checksum offload on (what
//! the far ends send is `CHECKSUM_PARTIAL`) and GRO off; the daemon's `--attach auto` puts the
//! TC program on them. [`Peers::BehindNic`] stands for hosts on a wire behind a NIC, for tests
//! and benches about XDP itself; [`Peers::Mixed`] puts the client behind a NIC (XDP on `lbc`)
//! and the backends in containers (TC on `lbw`, `lbe`).

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use crate::{
    ambassador_bin,
    netns::{sh, veth, Netns},
};

static NEXT: AtomicU32 = AtomicU32::new(0);

pub const VIP4: &str = "10.200.0.100";
pub const VIP6: &str = "fd00::100";

/// How the far ends of the ambassador's veths are set up, and so which program the daemon
/// attaches where.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peers {
    /// Veths as a container runtime leaves them; `--attach auto` (TC on every veth).
    Containers,
    /// Far ends with GRO on (they take XDP-redirected frames, as a NIC's NAPI does) and TX
    /// checksum offload off (full checksums, as from a wire); `--attach xdp`.
    BehindNic,
    /// The client behind a NIC (`--attach lbc=xdp`), the backends in containers (auto: TC).
    Mixed,
}

impl Peers {
    /// The daemon's `--attach` arguments for this topology.
    pub fn attach_args(self) -> &'static [&'static str] {
        match self {
            Peers::Containers => &[],
            Peers::BehindNic => &["--attach", "xdp"],
            Peers::Mixed => &["--attach", "lbc=xdp"],
        }
    }

    /// The program the daemon must report on each of lbc, lbw, lbe.
    pub fn programs(self) -> [&'static str; 3] {
        match self {
            Peers::Containers => ["tc", "tc", "tc"],
            Peers::BehindNic => ["xdp", "xdp", "xdp"],
            Peers::Mixed => ["xdp", "tc", "tc"],
        }
    }
}

pub struct Topology {
    pub peers: Peers,
    pub client: Netns,
    pub lb: Netns,
    pub web: Netns,
    pub exp: Netns,
    pub clients4: Vec<IpAddr>,
    pub clients6: Vec<IpAddr>,
    pub dir: PathBuf,
    pub pin_dir: PathBuf,
    nginx: Vec<Child>,
    daemon: std::sync::Mutex<Option<Child>>,
    starts: std::sync::atomic::AtomicUsize,
}

/// The book's split, in our config format.
pub fn split_config(web: u32, experiment: u32) -> String {
    format!(
        "interfaces: [lbc, lbw, lbe]
services:
  - name: frontend
    listen: {VIP4}:80/tcp
    split:
      key: src-ip
      backends:
        - {{ name: web,        address: 10.200.2.2:80, weight: {web} }}
        - {{ name: experiment, address: 10.200.3.2:80, weight: {experiment} }}
  - name: frontend6
    listen: '[{VIP6}]:80/tcp'
    split:
      key: src-ip
      backends:
        - {{ name: web,        address: '[fd00:2::2]:80', weight: {web} }}
        - {{ name: experiment, address: '[fd00:3::2]:80', weight: {experiment} }}
"
    )
}

impl Topology {
    /// Build the namespaces and links with veths as containers have them; `n` client
    /// addresses per family.
    pub fn new(n: usize) -> Topology {
        Topology::with_peers(n, Peers::Containers)
    }

    /// The same with the far ends set up as `peers` says.
    pub fn with_peers(n: usize, peers: Peers) -> Topology {
        crate::require_root();
        let (client, lb, web, exp) = (
            Netns::new("client"),
            Netns::new("lb"),
            Netns::new("web"),
            Netns::new("exp"),
        );
        veth(&client, "c0", &lb, "lbc");
        veth(&web, "w0", &lb, "lbw");
        veth(&exp, "e0", &lb, "lbe");
        lb.ip("addr add 10.200.1.1/24 dev lbc");
        lb.ip("addr add fd00:1::1/64 dev lbc nodad");
        lb.ip("addr add 10.200.2.1/24 dev lbw");
        lb.ip("addr add fd00:2::1/64 dev lbw nodad");
        lb.ip("addr add 10.200.3.1/24 dev lbe");
        lb.ip("addr add fd00:3::1/64 dev lbe nodad");
        lb.sh("sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1");
        client.ip("addr add 10.200.1.2/24 dev c0");
        client.ip("addr add fd00:1::2/64 dev c0 nodad");
        let mut clients4 = Vec::new();
        let mut clients6 = Vec::new();
        // Batch the address adds: one `ip -batch` instead of 2n processes.
        let mut batch = String::new();
        for i in 0..n {
            let a4: IpAddr = format!("10.200.1.{}", 10 + i % 240).parse().unwrap();
            let a4 = if i < 240 {
                a4
            } else {
                format!("10.200.{}.{}", 4 + i / 240, 10 + i % 240)
                    .parse()
                    .unwrap()
            };
            let a6: IpAddr = format!("fd00:1::{:x}", 0x1000 + i).parse().unwrap();
            batch.push_str(&format!(
                "addr add {a4}/32 dev c0\naddr add {a6}/128 dev c0 nodad\n"
            ));
            clients4.push(a4);
            clients6.push(a6);
        }
        let batch_file = std::env::temp_dir().join(format!("amb-batch-{}", client.name));
        std::fs::write(&batch_file, batch).unwrap();
        client.ip(&format!("-batch {}", batch_file.display()));
        let _ = std::fs::remove_file(&batch_file);
        client.ip("route add default via 10.200.1.1 dev c0");
        client.ip("-6 route add default via fd00:1::1 dev c0");
        // Client addresses outside 10.200.1.0/24 are routed back through the client link.
        lb.ip("route add 10.200.0.0/16 via 10.200.1.2 dev lbc");
        web.ip("addr add 10.200.2.2/24 dev w0");
        web.ip("addr add fd00:2::2/64 dev w0 nodad");
        web.ip("route add default via 10.200.2.1");
        web.ip("-6 route add default via fd00:2::1");
        exp.ip("addr add 10.200.3.2/24 dev e0");
        exp.ip("addr add fd00:3::2/64 dev e0 nodad");
        exp.ip("route add default via 10.200.3.1");
        exp.ip("-6 route add default via fd00:3::1");
        // Far ends behind a NIC stand in for hosts on a wire: GRO gives them the NAPI that
        // takes XDP_REDIRECTed frames, and full checksums on send (no CHECKSUM_PARTIAL, which a
        // NIC would finish but an XDP redirect between veths does not). Container far ends
        // are left as created.
        let nic: &[(&Netns, &str)] = match peers {
            Peers::Containers => &[],
            Peers::BehindNic => &[(&client, "c0"), (&web, "w0"), (&exp, "e0")],
            Peers::Mixed => &[(&client, "c0")],
        };
        for (ns, dev) in nic {
            ns.sh(&format!("ethtool -K {dev} gro on tx off >/dev/null"));
        }
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("amb-topo-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        crate::sweep_stale_pins();
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/amb-test-{}-{n}", std::process::id()));
        Topology {
            peers,
            client,
            lb,
            web,
            exp,
            clients4,
            clients6,
            dir,
            pin_dir,
            nginx: Vec::new(),
            daemon: Default::default(),
            starts: Default::default(),
        }
    }

    /// Start nginx in both backend namespaces; each answers `NAME CLIENT-ADDRESS` on port 80,
    /// `NAME-8081 CLIENT-ADDRESS` on port 8081 (a third backend for three-way splits), and
    /// serves the file `big` of its directory (see [`Topology::write_big`]) at `/big`.
    pub fn start_nginx(&mut self, workers: u32) {
        for (ns, name) in [(&self.web, "web"), (&self.exp, "experiment")] {
            let d = self.dir.join(format!("nginx-{name}"));
            std::fs::create_dir_all(&d).unwrap();
            let conf = d.join("nginx.conf");
            std::fs::write(
                &conf,
                format!(
                    "daemon off;
worker_processes {workers};
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  keepalive_requests 10000000; keepalive_timeout 300s;
  server {{
    listen 80 backlog=4096;
    listen [::]:80 backlog=4096;
    location / {{ default_type text/plain; return 200 \"{name} $remote_addr\\n\"; }}
    location = /healthz {{ if (-f {d}/down) {{ return 503; }} return 200 \"ok\\n\"; }}
    location = /big {{ alias {d}/big; default_type application/octet-stream; add_header X-Backend {name}; }}
  }}
  server {{
    listen 8081;
    listen [::]:8081;
    location / {{ default_type text/plain; return 200 \"{name}-8081 $remote_addr\n\"; }}
    location = /big {{ alias {d}/big; default_type application/octet-stream; add_header X-Backend {name}; }}
  }}
  server {{
    listen 8080 proxy_protocol;
    location / {{ default_type text/plain; return 200 \"{name} $proxy_protocol_addr\\n\"; }}
  }}
}}
",
                    d = d.display()
                ),
            )
            .unwrap();
            let child = ns.spawn(
                &format!(
                    "/usr/sbin/nginx -c {} -p {} -e {}/error.log",
                    conf.display(),
                    d.display(),
                    d.display()
                ),
                &d.join("stdout.log"),
            );
            self.nginx.push(child);
        }
        // Ready when both answer directly.
        for (ip, who) in [("10.200.2.2", "web"), ("10.200.3.2", "experiment")] {
            let addr: SocketAddr = format!("{ip}:80").parse().unwrap();
            let src: IpAddr = if who == "web" {
                "10.200.2.1"
            } else {
                "10.200.3.1"
            }
            .parse()
            .unwrap();
            wait_for(
                Duration::from_secs(10),
                &format!("nginx {who} to answer"),
                || {
                    let _in = self.lb.enter();
                    http_get(src, addr)
                        .ok()
                        .filter(|b| b.starts_with(who))
                        .is_some()
                },
            );
        }
    }

    /// Write the file a backend serves at `/big`.
    pub fn write_big(&self, backend: &str, body: &[u8]) {
        std::fs::write(self.dir.join(format!("nginx-{backend}")).join("big"), body).unwrap();
    }

    /// Make a backend's `/healthz` answer 503 (`healthy` false) or 200; `/` keeps serving.
    pub fn set_healthz(&self, backend: &str, healthy: bool) {
        let f = self.dir.join(format!("nginx-{backend}")).join("down");
        if healthy {
            let _ = std::fs::remove_file(f);
        } else {
            std::fs::write(f, "").unwrap();
        }
    }

    /// SIGKILL a backend's nginx, master and workers at once (a crash, not a shutdown: open
    /// connections are reset), and wait until none of its processes is left.
    pub fn kill_nginx(&self, backend: &str) {
        let pidfile = self.dir.join(format!("nginx-{backend}")).join("nginx.pid");
        let master: i32 = std::fs::read_to_string(&pidfile)
            .unwrap_or_else(|e| panic!("reading {}: {e}", pidfile.display()))
            .trim()
            .parse()
            .unwrap();
        let workers: Vec<i32> = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                // Field 4 of /proc/PID/stat (after the parenthesised name) is the parent.
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|st| {
                        st.rsplit_once(')')?
                            .1
                            .split_whitespace()
                            .nth(1)?
                            .parse()
                            .ok()
                    })
                    == Some(master)
            })
            .collect();
        let pids: Vec<String> = std::iter::once(master)
            .chain(workers.iter().copied())
            .map(|p| p.to_string())
            .collect();
        let _ = sh(&format!("kill -KILL {} 2>/dev/null; true", pids.join(" ")));
        wait_for(
            Duration::from_secs(5),
            &format!("nginx {backend} to die"),
            || {
                std::iter::once(master)
                    .chain(workers.iter().copied())
                    .all(|pid| {
                        std::fs::read_to_string(format!("/proc/{pid}/stat"))
                            .map(|st| st.contains(") Z "))
                            .unwrap_or(true)
                    })
            },
        );
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("ambassador.yaml")
    }

    /// Write the config atomically (as an editor or a ConfigMap would).
    pub fn write_config(&self, yaml: &str) {
        let tmp = self.dir.join(".ambassador.yaml.tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, self.config_path()).unwrap();
    }

    /// The log of the daemon's `n`th start.
    pub fn daemon_log_path(&self, n: usize) -> PathBuf {
        self.dir.join(format!("ambassador-{n}.log"))
    }

    /// The logs of every daemon started, in order.
    pub fn daemon_log(&self) -> String {
        (0..self.starts.load(Ordering::Relaxed))
            .map(|n| std::fs::read_to_string(self.daemon_log_path(n)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("--- restarted ---\n")
    }

    /// Start `ambassador run` in the lb namespace and wait until it serves.
    pub fn start_daemon(&self) {
        self.start_daemon_with(&[]);
    }

    /// Start `ambassador run ARGS...` in the lb namespace and wait until it serves (a daemon
    /// killed before is reaped first).
    pub fn start_daemon_with(&self, args: &[&str]) {
        self.start_daemon_env("", args)
    }

    /// The same with environment settings (`VAR=value ...`) for the daemon.
    pub fn start_daemon_env(&self, env: &str, args: &[&str]) {
        self.start_daemon_config(env, &self.config_path().display().to_string(), args)
    }

    /// Take the config from git: `ambassador.yaml` in `repo` (GitOps for the ambassador).
    pub fn start_daemon_from_git(&self, repo: &Path, args: &[&str]) {
        let mut all = vec!["--config-git", repo.to_str().unwrap()];
        all.extend_from_slice(args);
        self.start_daemon_config("", "ambassador.yaml", &all)
    }

    fn start_daemon_config(&self, env: &str, config: &str, args: &[&str]) {
        let cmd = format!(
            "env {env} {} run --config {} --state-dir {} --pin-dir {} {} {}",
            ambassador_bin().display(),
            config,
            self.state_dir().display(),
            self.pin_dir.display(),
            self.peers.attach_args().join(" "),
            args.join(" ")
        );
        let n = self.starts.fetch_add(1, Ordering::Relaxed);
        let mut child = self.lb.spawn(&cmd, &self.daemon_log_path(n));
        let pid = child.id();
        let state = self.state_dir().join("state.json");
        wait_for(
            Duration::from_secs(20),
            "ambassador to start serving",
            || {
                if let Ok(Some(st)) = child.try_wait() {
                    panic!("ambassador exited ({st}):\n{}", self.daemon_log());
                }
                // A killed daemon's state file stays: wait for this one's.
                std::fs::read(&state)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .is_some_and(|v| v["pid"] == pid)
            },
        );
        if let Some(mut old) = self.daemon.lock().unwrap().replace(child) {
            let _ = old.kill();
            let _ = old.wait();
        }
    }

    /// Start `ambassador run ARGS...` and return its exit status and output, for a start that
    /// must fail.
    pub fn run_daemon_expecting_failure(
        &self,
        args: &[&str],
    ) -> (std::process::ExitStatus, String) {
        let out = self
            .lb
            .command(ambassador_bin().to_str().unwrap())
            .arg("run")
            .arg("--config")
            .arg(self.config_path())
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .args(self.peers.attach_args())
            .args(args)
            .output()
            .unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn daemon_pid(&self) -> u32 {
        self.daemon
            .lock()
            .unwrap()
            .as_ref()
            .expect("daemon running")
            .id()
    }

    /// Send a signal to the daemon.
    pub fn signal(&self, sig: &str) {
        sh(&format!("kill -{sig} {}", self.daemon_pid()));
    }

    /// Wait for the daemon to exit (after a signal); its exit status.
    pub fn wait_daemon_exit(&self) -> std::process::ExitStatus {
        let mut d = self.daemon.lock().unwrap().take().expect("daemon running");
        d.wait().unwrap()
    }

    /// Make the ambassador's own interfaces finish checksums in software when they send, as a
    /// NIC's checksum engine does: a `CHECKSUM_PARTIAL` packet a container sent leaves with its
    /// checksum computed from the field the kernel program left, and the receiver verifies it.
    /// Between veths that keep the offload, nobody ever checks that field.
    pub fn finish_checksums_on_egress(&self) {
        for dev in ["lbc", "lbw", "lbe"] {
            self.lb.sh(&format!("ethtool -K {dev} tx off >/dev/null"));
        }
    }

    /// Check the daemon runs the kernel data plane with the program this topology calls for
    /// on each interface (the split is done in the kernel, not by the userspace fallback).
    pub fn assert_kernel_programs(&self) {
        let st = self.status();
        assert_eq!(st["dataplane"], "kernel", "status: {st:#}");
        let want = self.peers.programs();
        for (iface, program) in ["lbc", "lbw", "lbe"].into_iter().zip(want) {
            let got = st["attachments"]
                .as_array()
                .unwrap()
                .iter()
                .find(|a| a["interface"] == iface)
                .unwrap_or_else(|| panic!("{iface} has no program: {st:#}"));
            assert_eq!(got["program"], program, "{iface}: {st:#}");
        }
    }

    /// The program attached to each of lbc, lbw, lbe as the kernel reports it ("xdp", "tc" or
    /// "none"): XDP from `ip link`, TC from the interface's TCX programs (Linux 6.6 and
    /// later) or its clsact ingress filters (netlink, older kernels).
    pub fn attached(&self) -> [&'static str; 3] {
        ["lbc", "lbw", "lbe"].map(|dev| {
            if self.lb.ip(&format!("link show {dev}")).contains("prog/xdp") {
                return "xdp";
            }
            let tcx = {
                let _in = self.lb.enter();
                aya::programs::SchedClassifier::query_tcx(dev, aya::programs::TcAttachType::Ingress)
                    .map(|(_, progs)| {
                        progs
                            .iter()
                            .any(|p| p.name_as_str() == Some("ambassador_tc"))
                    })
                    .unwrap_or(false)
            };
            let filter = self
                .lb
                .sh(&format!(
                    "tc filter show dev {dev} ingress 2>/dev/null; true"
                ))
                .contains("ambassador_tc");
            if tcx || filter {
                "tc"
            } else {
                "none"
            }
        })
    }

    /// `ambassador status --json`.
    pub fn status(&self) -> serde_json::Value {
        let out = Command::new(ambassador_bin())
            .args(["status", "--json", "--state-dir"])
            .arg(self.state_dir())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// One HTTP request from each client address (in parallel batches); returns
    /// (client, Ok(body) | Err(reason)).
    pub fn request_all(
        &self,
        clients: &[IpAddr],
        vip: SocketAddr,
    ) -> Vec<(IpAddr, Result<String, String>)> {
        let chunks: Vec<Vec<IpAddr>> = clients
            .chunks(clients.len().div_ceil(8).max(1))
            .map(|c| c.to_vec())
            .collect();
        std::thread::scope(|s| {
            let handles: Vec<_> = chunks
                .into_iter()
                .map(|chunk| {
                    s.spawn(move || {
                        let _in = self.client.enter();
                        chunk
                            .into_iter()
                            .map(|c| (c, http_get(c, vip).map_err(|e| e.to_string())))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        })
    }
}

impl Topology {
    /// Stop the daemon (SIGTERM, then SIGKILL after 5 s) and wait for it.
    pub fn stop_daemon(&self) {
        if let Some(mut d) = self.daemon.lock().unwrap().take() {
            let _ = sh(&format!("kill -TERM {} 2>/dev/null; true", d.id()));
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = d.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = d.kill();
            let _ = d.wait();
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.stop_daemon();
        for mut n in self.nginx.drain(..) {
            let _ = n.kill();
            let _ = n.wait();
        }
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn wait_for(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

/// A TCP connection from `src` (a client address) to `dst`, with 3 s timeouts.
pub fn connect(src: IpAddr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    use std::os::fd::AsRawFd as _;
    let s = Socket::new(Domain::for_address(dst), Type::STREAM, None)?;
    // Pick the source port at connect(), knowing the destination (IP_BIND_ADDRESS_NO_PORT);
    // binding port 0 first can pick a port whose 4-tuple is still in use.
    let one: libc::c_int = 1;
    // SAFETY: setsockopt on a socket we own with a valid int option.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    s.bind(&SocketAddr::new(src, 0).into())?;
    s.connect_timeout(&dst.into(), Duration::from_secs(3))?;
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// One HTTP/1.1 request from `src` on a fresh connection; returns the body.
pub fn http_get(src: IpAddr, dst: SocketAddr) -> std::io::Result<String> {
    let mut s = connect(src, dst)?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: ambassador\r\nConnection: close\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    body(&resp)
}

/// The body of a 200 response.
pub fn body(resp: &str) -> std::io::Result<String> {
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no HTTP response: {resp:?}")))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("bad status: {head}")));
    }
    Ok(body.trim().to_string())
}

/// A keep-alive HTTP connection: many requests, one TCP flow.
pub struct KeepAlive {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl KeepAlive {
    pub fn open(src: IpAddr, dst: SocketAddr) -> std::io::Result<KeepAlive> {
        Ok(KeepAlive {
            stream: connect(src, dst)?,
            buf: Vec::new(),
        })
    }

    /// One request on the open connection; returns the body.
    pub fn get(&mut self) -> std::io::Result<String> {
        self.stream
            .write_all(b"GET / HTTP/1.1\r\nHost: ambassador\r\n\r\n")?;
        let resp = read_response(&mut self.stream, &mut self.buf)?;
        body(&String::from_utf8_lossy(&resp))
    }
}

/// Read one HTTP/1.1 response framed by Content-Length from `r`, keeping bytes past it in `buf`
/// for the next response on the connection.
pub fn read_response<R: std::io::Read>(r: &mut R, buf: &mut Vec<u8>) -> std::io::Result<Vec<u8>> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap_or(0))
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return Ok(buf.drain(..end + 4 + len).collect());
            }
        }
        let mut chunk = [0u8; 4096];
        let n = r.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::other(format!(
                "connection closed mid-response: {:?}",
                String::from_utf8_lossy(buf)
            )));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Share of `name` among successful bodies.
pub fn share(results: &[(IpAddr, Result<String, String>)], name: &str) -> f64 {
    let ok: Vec<&String> = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .collect();
    ok.iter()
        .filter(|b| b.split(' ').next() == Some(name))
        .count() as f64
        / ok.len().max(1) as f64
}

pub fn path_display(p: &Path) -> String {
    p.display().to_string()
}

/// A UDP backend in `ns` answering `NAME PEER-PORT` (the port shows which session it came on).
pub fn udp_echo(ns: &Netns, addr: &str, name: &'static str) {
    let _in = ns.enter();
    let s = std::net::UdpSocket::bind(addr).unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((_, peer)) = s.recv_from(&mut buf) {
            let _ = s.send_to(format!("{name} {}", peer.port()).as_bytes(), peer);
        }
    });
}

/// A kernel counter from `status --json` (`kernel`: `[[name, value], ...]`); 0 when absent.
pub fn kernel_stat(status: &serde_json::Value, name: &str) -> u64 {
    status["kernel"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c[0] == name)
        .and_then(|c| c[1].as_u64())
        .unwrap_or(0)
}
