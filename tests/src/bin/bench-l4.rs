//! `cargo xtask bench l4`: the userspace data plane as a plain TCP proxy beside haproxy
//! (mode tcp), and nginx direct, one run: keep-alive HTTP req/s and p99 by wrk.

use ambassador_tests::{
    bench::{nginx, raise_fd_limit, spawn, wait_port, wrk_rounds},
    local::{free_port, LocalDaemon, TempDir},
};

const SECS: u32 = 3;
const ROUNDS: usize = 5;

fn main() {
    raise_fd_limit();
    let dir = TempDir::new("bench-l4");
    let backend = free_port();
    let _nginx = nginx(&dir, backend);
    let amb_port = free_port();
    let _amb = LocalDaemon::start(&format!(
        "services:
  - name: l4
    listen: 127.0.0.1:{amb_port}/tcp
    limits: {{ max_connections: 100000 }}
    split: {{ backends: [ {{ name: nginx, address: '127.0.0.1:{backend}' }} ] }}
"
    ));
    let ha_port = free_port();
    let cfg = dir.path("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 9000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\nfrontend f\n  bind 127.0.0.1:{ha_port}\n  default_backend b\nbackend b\n  server s1 127.0.0.1:{backend}\n"
        ),
    )
    .unwrap();
    let _ha = spawn(
        &format!("haproxy -db -f {}", cfg.display()),
        &dir.path("haproxy.log"),
    );
    wait_port(ha_port, "haproxy");

    println!("plain TCP proxying of HTTP keep-alive to one nginx backend on loopback; wrk -t2 -c50 -d{SECS}s, median of {ROUNDS} rotated rounds\n");
    let peers = [
        ("direct", backend),
        ("ambassador", amb_port),
        ("haproxy", ha_port),
    ];
    let urls: Vec<String> = peers
        .iter()
        .map(|(_, p)| format!("http://127.0.0.1:{p}/"))
        .collect();
    let rows: Vec<(&str, f64, f64)> = peers
        .iter()
        .zip(wrk_rounds(&urls, ROUNDS, 2, 50, SECS))
        .map(|((n, _), (rps, p99))| (*n, rps, p99))
        .collect();
    println!("{:<12} {:>12} {:>9}", "path", "req/s", "p99 ms");
    for (name, rps, p99) in &rows {
        println!("{name:<12} {rps:>12.0} {p99:>9.2}");
    }
    println!(
        "\nambassador vs haproxy: req/s {:.2}x, p99 {:.2}x (lower is better); vs direct req/s {:.2}x",
        rows[1].1 / rows[2].1,
        rows[1].2 / rows[2].2,
        rows[1].1 / rows[0].1
    );
}
