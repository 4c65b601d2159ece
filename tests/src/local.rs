//! A daemon on loopback with the userspace data plane, in-process HTTP backends that report
//! what they received (including PROXY protocol headers), and a PKI for the TLS tests.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use crate::{ambassador_bin, topology::wait_for};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        Self::new_in(&std::env::temp_dir(), tag)
    }

    pub fn new_in(base: &Path, tag: &str) -> TempDir {
        let p = base.join(format!(
            "amb-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `ambassador run --dataplane userspace` on a config of the test's.
pub struct LocalDaemon {
    child: Option<Child>,
    pub dir: TempDir,
}

impl LocalDaemon {
    pub fn start(yaml: &str) -> LocalDaemon {
        Self::start_with(yaml, &["--dataplane", "userspace"])
    }

    pub fn start_with(yaml: &str, args: &[&str]) -> LocalDaemon {
        Self::start_env(yaml, args, &[])
    }

    /// With extra environment variables (`KUBECONFIG`, `SERVICE_BINDING_ROOT`, ...).
    pub fn start_env(yaml: &str, args: &[&str], env: &[(&str, &str)]) -> LocalDaemon {
        let dir = TempDir::new("daemon");
        std::fs::write(dir.path("ambassador.yaml"), yaml).unwrap();
        let log = std::fs::File::create(dir.path("ambassador.log")).unwrap();
        let child = Command::new(ambassador_bin())
            .arg("run")
            .arg("--config")
            .arg(dir.path("ambassador.yaml"))
            .arg("--state-dir")
            .arg(dir.path("state"))
            .arg("--pin-dir")
            .arg(format!(
                "/sys/fs/bpf/{}",
                dir.0.file_name().unwrap().to_string_lossy()
            ))
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut d = LocalDaemon {
            child: Some(child),
            dir,
        };
        let state = d.dir.path("state/state.json");
        wait_for(Duration::from_secs(20), "ambassador to serve", || {
            if let Some(Ok(Some(st))) = d.child.as_mut().map(|c| c.try_wait()) {
                panic!("ambassador exited ({st}):\n{}", d.log());
            }
            state.exists()
        });
        d
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path("ambassador.log")).unwrap_or_default()
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path("ambassador.yaml")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn signal(&self, sig: &str) {
        crate::netns::sh(&format!("kill -{sig} {}", self.pid()));
    }

    pub fn status(&self) -> serde_json::Value {
        let out = Command::new(ambassador_bin())
            .args(["status", "--json", "--state-dir"])
            .arg(self.dir.path("state"))
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    /// Wait for the log to contain `needle`.
    /// `GET /metrics` over the admin socket (as Prometheus scrapes it through a sidecar).
    pub fn metrics(&self) -> String {
        let out = Command::new("curl")
            .args(["-sf", "--unix-socket"])
            .arg(self.dir.path("state/admin.sock"))
            .arg("http://ambassador/metrics")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn wait_log(&self, needle: &str) {
        wait_for(
            Duration::from_secs(10),
            &format!("log line `{needle}`"),
            || self.log().contains(needle),
        );
    }

    /// Wait for the process to exit; returns whether it did within `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for LocalDaemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What an HTTP backend saw on one connection.
#[derive(Debug, Clone)]
pub struct Seen {
    pub peer: SocketAddr,
    /// The bytes before the HTTP request (a PROXY protocol header, if any).
    pub preamble: Vec<u8>,
}

/// An HTTP/1.1 backend on loopback answering `NAME PEER` (PEER from a PROXY header if one came).
pub struct HttpBackend {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl HttpBackend {
    pub fn start(name: &str) -> HttpBackend {
        Self::start_on("127.0.0.1:0".parse().unwrap(), name)
    }

    pub fn start_on(addr: SocketAddr, name: &str) -> HttpBackend {
        let l = TcpListener::bind(addr).unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (name, seen2) = (name.to_string(), seen.clone());
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let (name, seen) = (name.clone(), seen2.clone());
                std::thread::spawn(move || serve(s, &name, &seen));
            }
        });
        HttpBackend { addr, seen }
    }
}

fn serve(mut s: TcpStream, name: &str, seen: &Mutex<Vec<Seen>>) {
    let peer = s.peer_addr().unwrap();
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut more = |s: &mut TcpStream, buf: &mut Vec<u8>| match s.read(&mut chunk) {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    };
    // A PROXY header first, if one comes: its length is known from its own bytes (the v2
    // signature itself starts with CRLF CRLF, so it must not be mistaken for a request head).
    let preamble_len = loop {
        if let Some(n) = proxy_header_len(&buf) {
            break n;
        }
        if !more(&mut s, &mut buf) {
            return;
        }
    };
    let preamble = buf.drain(..preamble_len).collect::<Vec<u8>>();
    let client = client_from(&preamble).unwrap_or(peer.ip());
    seen.lock().unwrap().push(Seen { peer, preamble });
    loop {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            if !more(&mut s, &mut buf) {
                return;
            }
        }
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        buf.drain(..end);
        let body = format!("{name} {client}\n");
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{body}",
            body.len()
        );
        if s.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// Length of the PROXY header at the start of `buf`: Some(0) when there is none, None when
/// more bytes are needed to tell.
fn proxy_header_len(buf: &[u8]) -> Option<usize> {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] {
        if buf.len() < 16 {
            return None;
        }
        let len = 16 + u16::from_be_bytes([buf[14], buf[15]]) as usize;
        return (buf.len() >= len).then_some(len);
    }
    let n = buf.len().min(6);
    if buf[..n] == b"PROXY "[..n] {
        return buf.windows(2).position(|w| w == b"\r\n").map(|p| p + 2);
    }
    Some(0)
}

/// The client address a PROXY v1/v2 header names.
pub fn client_from(h: &[u8]) -> Option<IpAddr> {
    if let Some(rest) = h.strip_prefix(b"PROXY ") {
        let line = std::str::from_utf8(rest).ok()?;
        return line.split_whitespace().nth(1)?.parse().ok();
    }
    if h.len() >= 28 && h.starts_with(b"\r\n\r\n\0\r\nQUIT\n") {
        return match h[13] {
            0x11 => Some(IpAddr::from([h[16], h[17], h[18], h[19]])),
            0x21 if h.len() >= 52 => {
                let b: [u8; 16] = h[16..32].try_into().ok()?;
                Some(IpAddr::from(b))
            }
            _ => None,
        };
    }
    None
}

pub fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}
