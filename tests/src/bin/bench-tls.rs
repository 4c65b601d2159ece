//! `cargo xtask bench tls`: the TLS sidecar beside Debian's stunnel4 and hitch, same
//! certificate (ECDSA P-256), same nginx backend, same machine, one run: keep-alive HTTPS
//! req/s (wrk), full and resumed handshakes/s (`openssl s_time -new` / `-reuse`, TLS 1.2),
//! and resident memory per idle TLS connection.

use std::{net::TcpStream, time::Duration};

use ambassador_tests::{
    bench::{nginx, raise_fd_limit, rss_kib, s_time, spawn, wait_port, wrk_rounds},
    local::{free_port, LocalDaemon, TempDir},
    pki::Pki,
};

const SECS: u32 = 5;

/// (server, req/s, p99 ms, full handshakes/s, resumed handshakes/s, KiB per idle connection)
type Row = (&'static str, f64, f64, f64, f64, f64);
const IDLE: usize = 1000;

/// KiB of server memory per idle, fully handshaken TLS connection.
fn idle_memory(pki: &Pki, port: u16, pid: u32) -> f64 {
    let before = rss_kib(pid);
    let config = pki.client(None, false);
    let mut held = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        let mut tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut c =
            rustls::ClientConnection::new(config.clone(), "a.example".try_into().unwrap()).unwrap();
        while c.is_handshaking() {
            c.complete_io(&mut tcp).unwrap();
        }
        held.push((c, tcp));
    }
    std::thread::sleep(Duration::from_millis(1000));
    let after = rss_kib(pid);
    drop(held);
    after.saturating_sub(before) as f64 / IDLE as f64
}

fn main() {
    raise_fd_limit();
    let pki = Pki::new();
    let dir = TempDir::new("bench-tls");
    let backend = free_port();
    let _nginx = nginx(&dir, backend);
    let (cert, key) = (pki.path("a.crt"), pki.path("a.key"));

    let amb_port = free_port();
    let amb = LocalDaemon::start(&format!(
        "services:
  - name: tls
    listen: 127.0.0.1:{amb_port}/tcp
    tls: {{ certificates: [ {{ cert: {}, key: {} }} ] }}
    limits: {{ max_connections: 100000 }}
    split: {{ backends: [ {{ name: nginx, address: '127.0.0.1:{backend}' }} ] }}
",
        cert.display(),
        key.display()
    ));

    let st_port = free_port();
    let st_conf = dir.path("stunnel.conf");
    std::fs::write(
        &st_conf,
        format!(
            "foreground = yes\npid =\n[https]\naccept = 127.0.0.1:{st_port}\nconnect = 127.0.0.1:{backend}\ncert = {}\nkey = {}\n",
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    let stunnel = spawn(
        &format!("stunnel4 {}", st_conf.display()),
        &dir.path("stunnel.log"),
    );
    wait_port(st_port, "stunnel4");

    let hi_port = free_port();
    let pem = dir.path("hitch.pem");
    let both = [std::fs::read(&cert).unwrap(), std::fs::read(&key).unwrap()].concat();
    std::fs::write(&pem, both).unwrap();
    let hitch = spawn(
        &format!(
            "hitch --frontend=[127.0.0.1]:{hi_port} --backend=[127.0.0.1]:{backend} --workers=2 --user=nobody --group=nogroup {}",
            pem.display()
        ),
        &dir.path("hitch.log"),
    );
    wait_port(hi_port, "hitch");

    println!("TLS termination to one nginx backend on loopback; ECDSA P-256; wrk -t2 -c50 -d{SECS}s (median of 3 rotated rounds); s_time -time {SECS} (TLS 1.2); {IDLE} idle connections\n");
    let peers = [
        ("ambassador", amb_port, amb.pid()),
        ("hitch", hi_port, hitch.0.id()),
        ("stunnel4", st_port, stunnel.0.id()),
    ];
    let urls: Vec<String> = peers
        .iter()
        .map(|(_, p, _)| format!("https://127.0.0.1:{p}/"))
        .collect();
    let throughput = wrk_rounds(&urls, 3, 2, 50, SECS);
    let mut rows: Vec<Row> = Vec::new();
    for ((name, port, pid), (rps, p99)) in peers.into_iter().zip(throughput) {
        let full = s_time(port, false, SECS);
        let resumed = s_time(port, true, SECS);
        let mem = idle_memory(&pki, port, pid);
        rows.push((name, rps, p99, full, resumed, mem));
    }
    println!(
        "{:<12} {:>12} {:>9} {:>14} {:>14} {:>16}",
        "server", "HTTPS req/s", "p99 ms", "full hs/s", "resumed hs/s", "KiB/idle conn"
    );
    for (name, rps, p99, full, resumed, mem) in &rows {
        println!("{name:<12} {rps:>12.0} {p99:>9.2} {full:>14.0} {resumed:>14.0} {mem:>16.1}");
    }
    let best = |f: fn(&Row) -> f64| rows[1..].iter().map(f).fold(f64::MIN, f64::max);
    let a = rows[0];
    println!(
        "\nambassador vs the best peer: req/s {:.2}x, full handshakes {:.2}x, resumed {:.2}x; memory per idle connection {:.1} KiB (goal <= 50 KB; lowest peer {:.1} KiB)",
        a.1 / best(|r| r.1),
        a.3 / best(|r| r.3),
        a.4 / best(|r| r.4),
        a.5,
        rows[1..].iter().map(|r| r.5).fold(f64::MAX, f64::min)
    );
}
