//! `cargo xtask bench connect`: connection setup through the connect-time ambassador (cgroup
//! `connect4`) against dialing the endpoint directly and against the userspace proxy, in one
//! run (issue: service broker). Goals: ≥ 0.95× direct, ≥ 3× the userspace proxy's rate.
//!
//! A backend on 127.0.0.2 greets every connection with one byte and closes, as a database
//! greets its clients. A client process (this binary, `client` mode) dials for a fixed time
//! from `THREADS` threads, each connection timed from `connect()` to the greeting; the
//! connect-time client first joins the service's cgroup. Modes are interleaved over
//! `ROUNDS` rounds and each figure is the median round.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use ambassador_tests::{cgroup::Cgroup, local::LocalDaemon};

const THREADS: usize = 2;
const ROUND: Duration = Duration::from_secs(2);
const ROUNDS: usize = 3;

/// `client CGROUP|- ADDR MILLIS`: prints `count p50_us p99_us`.
fn client(args: &[String]) {
    if args[0] != "-" {
        std::fs::write(
            format!("{}/cgroup.procs", args[0]),
            std::process::id().to_string(),
        )
        .expect("joining the cgroup");
    }
    let addr: SocketAddr = args[1].parse().unwrap();
    let dur = Duration::from_millis(args[2].parse().unwrap());
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                let end = Instant::now() + dur;
                let mut b = [0u8; 8];
                while Instant::now() < end {
                    let t0 = Instant::now();
                    let mut s = TcpStream::connect(addr).expect("connect");
                    let n = s.read(&mut b).expect("greeting");
                    assert_eq!(n, 1, "the backend greets with one byte");
                    lat.push(t0.elapsed().as_nanos() as u64);
                    // Wait for the backend's close, so TIME_WAIT stays on its side.
                    let _ = s.read(&mut b);
                }
                lat
            })
        })
        .collect();
    let mut all: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    all.sort_unstable();
    let p = |q: f64| all[((all.len() - 1) as f64 * q) as usize] / 1000;
    println!("{} {} {}", all.len(), p(0.5), p(0.99));
}

/// The greeting backend: accept, one byte, close.
fn backend(addr: SocketAddr) -> SocketAddr {
    let s = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .unwrap();
    s.set_reuse_address(true).unwrap();
    s.bind(&addr.into()).unwrap();
    s.listen(4096).unwrap();
    let l: TcpListener = s.into();
    let local = l.local_addr().unwrap();
    for _ in 0..THREADS {
        let l = l.try_clone().unwrap();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { continue };
                let _ = c.write_all(b"G");
            }
        });
    }
    local
}

#[derive(Clone, Copy)]
struct Sample {
    rate: f64,
    p50: u64,
    p99: u64,
}

fn run(cg: Option<&Cgroup>, addr: SocketAddr) -> Sample {
    let cg = cg.map_or("-".to_string(), |c| c.dir.display().to_string());
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "client",
            &cg,
            &addr.to_string(),
            &ROUND.as_millis().to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let f: Vec<u64> = text
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    Sample {
        rate: f[0] as f64 / ROUND.as_secs_f64(),
        p50: f[1],
        p99: f[2],
    }
}

fn median(mut v: Vec<Sample>) -> Sample {
    v.sort_by(|a, b| a.rate.partial_cmp(&b.rate).unwrap());
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("client") {
        return client(&args[1..]);
    }
    ambassador_tests::require_root();
    let endpoint = backend("127.0.0.2:0".parse().unwrap());
    let cg = Cgroup::create();
    let service: SocketAddr = format!("127.0.0.1:{}", ambassador_tests::local::free_port())
        .parse()
        .unwrap();
    let d = LocalDaemon::start(&format!(
        "services:\n  - name: db\n    listen: {service}/tcp\n    cgroup: {}\n    split: {{ key: src-ip-port, backends: [ {{ name: db, address: '{endpoint}' }} ] }}\n",
        cg.dir.display()
    ));
    d.wait_log("connect-time ambassador attached");
    println!(
        "connect bench: {THREADS} client threads, {ROUND:?} per mode and round, {ROUNDS} rounds (median round shown); each connection: connect() → 1-byte greeting → backend closes\n"
    );
    let (mut direct, mut cgroup, mut proxy) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        direct.push(run(None, endpoint));
        cgroup.push(run(Some(&cg), service));
        proxy.push(run(None, service));
    }
    let (direct, cgroup, proxy) = (median(direct), median(cgroup), median(proxy));
    println!(
        "{:<46} {:>12} {:>10} {:>10}",
        "mode", "conn/s", "p50 µs", "p99 µs"
    );
    for (name, s) in [
        ("direct to the endpoint", direct),
        ("connect-time ambassador (cgroup connect4)", cgroup),
        ("userspace proxy (ambassador data plane)", proxy),
    ] {
        println!("{name:<46} {:>12.0} {:>10} {:>10}", s.rate, s.p50, s.p99);
    }
    let vs_direct = cgroup.rate / direct.rate;
    let vs_proxy = cgroup.rate / proxy.rate;
    println!(
        "\nconnect-time / direct:          {vs_direct:.2}×  (goal ≥ 0.95×: {})",
        if vs_direct >= 0.95 { "met" } else { "MISSED" }
    );
    println!(
        "connect-time / userspace proxy: {vs_proxy:.2}×  (goal ≥ 3×: {})",
        if vs_proxy >= 3.0 { "met" } else { "MISSED" }
    );
    drop(d);
}
