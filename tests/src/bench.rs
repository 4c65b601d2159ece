//! Helpers for the side-by-side benchmarks: peers started on loopback, wrk and openssl s_time
//! driven and parsed, resident memory read from /proc.

use std::{
    net::TcpStream,
    path::Path,
    process::{Child, Command},
    time::Duration,
};

use crate::{local::TempDir, topology::wait_for};

/// A process the benchmark started; killed on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn spawn(cmd: &str, log: &Path) -> Proc {
    Proc(crate::netns::spawn_logged(cmd, log))
}

pub fn wait_port(port: u16, what: &str) {
    wait_for(Duration::from_secs(10), what, || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
}

/// A throw-away redis-server on a loopback port (no persistence), ready when this returns;
/// `extra` adds options such as `--requirepass PW`.
pub fn redis_server(dir: &TempDir, port: u16, extra: &str) -> Proc {
    let proc = spawn(
        &format!("redis-server --port {port} --bind 127.0.0.1 --save '' --appendonly no {extra}"),
        &dir.path(&format!("redis-{port}.log")),
    );
    wait_port(port, "redis-server");
    proc
}

/// nginx on loopback answering 200 with a short body (the backend every peer forwards to).
pub fn nginx(dir: &TempDir, port: u16) -> Proc {
    let d = dir.path("nginx");
    std::fs::create_dir_all(&d).unwrap();
    let conf = d.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;
worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 20000; }}
http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  keepalive_requests 10000000; keepalive_timeout 300s;
  server {{ listen 127.0.0.1:{port} backlog=4096; location / {{ return 200 \"ok\\n\"; }} }}
}}
",
            d = d.display()
        ),
    )
    .unwrap();
    let p = spawn(
        &format!(
            "/usr/sbin/nginx -c {} -e {}/error.log",
            conf.display(),
            d.display()
        ),
        &d.join("out.log"),
    );
    wait_port(port, "nginx");
    p
}

/// (requests/s, p99 latency in ms) from `wrk --latency`.
pub fn wrk(url: &str, threads: u32, conns: u32, secs: u32) -> (f64, f64) {
    let out = Command::new("wrk")
        .args([
            &format!("-t{threads}"),
            &format!("-c{conns}"),
            &format!("-d{secs}s"),
            "--latency",
            url,
        ])
        .output()
        .expect("wrk");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("wrk {url}: {text}"));
    let p99 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .map(|v| ms(v.trim()))
        .unwrap_or(f64::NAN);
    (rps, p99)
}

fn ms(v: &str) -> f64 {
    let (num, unit): (String, String) = v.chars().partition(|c| c.is_ascii_digit() || *c == '.');
    let n: f64 = num.parse().unwrap_or(f64::NAN);
    match unit.as_str() {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        _ => f64::NAN,
    }
}

/// Handshakes per second by `openssl s_time` (`reuse`: resumed sessions).
pub fn s_time(port: u16, reuse: bool, secs: u32) -> f64 {
    let out = Command::new("openssl")
        .args([
            "s_time",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-time",
            &secs.to_string(),
        ])
        .arg(if reuse { "-reuse" } else { "-new" })
        .arg("-tls1_2")
        .output()
        .expect("openssl s_time");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    // "1234 connections in 5 real seconds, ..."
    text.lines()
        .find_map(|l| {
            let (n, rest) = l.split_once(" connections in ")?;
            let secs: f64 = rest.split_whitespace().next()?.parse().ok()?;
            rest.contains("real seconds")
                .then(|| n.trim().parse::<f64>().ok().map(|n| n / secs))?
        })
        .unwrap_or_else(|| panic!("s_time on {port}: {text}"))
}

/// Resident memory (KiB) of `pid` and its descendants.
pub fn rss_kib(pid: u32) -> u64 {
    let mut total = 0;
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{p}/status")) {
            total += s
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0);
        }
        if let Ok(c) = std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")) {
            todo.extend(c.split_whitespace().filter_map(|x| x.parse::<u32>().ok()));
        }
    }
    total
}

/// Let the benchmark and its children hold as many sockets as the hard limit allows.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a stack value.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

/// Median of each peer's (req/s, p99) over `rounds` rounds of wrk, the order rotated every round
/// so no peer always runs first (or warmest).
pub fn wrk_rounds(
    urls: &[String],
    rounds: usize,
    threads: u32,
    conns: u32,
    secs: u32,
) -> Vec<(f64, f64)> {
    let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new(); urls.len()];
    for r in 0..rounds {
        for k in 0..urls.len() {
            let i = (k + r) % urls.len();
            runs[i].push(wrk(&urls[i], threads, conns, secs));
        }
    }
    runs.into_iter()
        .map(|mut v| {
            let mid = v.len() / 2;
            v.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
            let rps = v[mid].0;
            v.sort_by(|a, b| a.1.partial_cmp(&b.1).unwrap());
            (rps, v[mid].1)
        })
        .collect()
}
