//! `cargo xtask bench redis`: the sharding ambassador beside nutcracker (twemproxy) and one
//! redis-server direct, in one run, with three real shards: `redis-benchmark -t set,get -c 50`
//! at `-P 1` and `-P 16`, and MGET of 10 and 100 keys. Rounds rotate between the targets so
//! drift on this shared machine hits them alike; the median round counts.

use std::process::Command;

use ambassador_tests::{
    bench::{raise_fd_limit, redis_server, spawn, wait_port, Proc},
    local::{free_port, LocalDaemon, TempDir},
};

const ROUNDS: usize = 3;

/// (idle, total) jiffies of the whole machine, from /proc/stat.
fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let f: Vec<u64> = stat
        .lines()
        .next()
        .expect("cpu line")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    (f[3] + f[4], f.iter().take(8).sum())
}

/// (ops/s, p99 ms, share of the machine left idle) of one redis-benchmark run.
fn redis_benchmark(port: u16, args: &str) -> (f64, f64, f64) {
    let before = cpu_jiffies();
    let cmd = format!("redis-benchmark -h 127.0.0.1 -p {port} -c 50 --csv -q {args}");
    let out = Command::new("sh").arg("-c").arg(&cmd).output().unwrap();
    let after = cpu_jiffies();
    let idle = (after.0 - before.0) as f64 / (after.1 - before.1).max(1) as f64;
    let text = String::from_utf8_lossy(&out.stdout);
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
    let mut rps = 0.0;
    let mut p99: f64 = 0.0;
    let mut rows = 0;
    for line in text.lines().filter(|l| !l.starts_with("\"test\"")) {
        let f: Vec<f64> = line
            .split(',')
            .skip(1)
            .map(|v| v.trim_matches('"').parse().unwrap_or(0.0))
            .collect();
        if f.len() >= 6 {
            rps += f[0];
            p99 = p99.max(f[5]);
            rows += 1;
        }
    }
    assert!(
        rows > 0,
        "`{cmd}` printed no results:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (rps / rows as f64, p99, idle)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    raise_fd_limit();
    let dir = TempDir::new("bench-redis");
    let shard_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let _shards: Vec<Proc> = shard_ports
        .iter()
        .map(|p| redis_server(&dir, *p, ""))
        .collect();
    let nc_port = free_port();
    let mut nc = format!(
        "pool:\n  listen: 127.0.0.1:{nc_port}\n  hash: fnv1a_64\n  distribution: ketama\n  redis: true\n  auto_eject_hosts: false\n  servers:\n"
    );
    let amb_port = free_port();
    let mut amb = format!(
        "services:\n  - name: pool\n    listen: 127.0.0.1:{amb_port}/tcp\n    limits: {{ max_connections: 100000 }}\n    redis:\n      hash: fnv1a_64\n      distribution: ketama\n      shards:\n"
    );
    for (i, p) in shard_ports.iter().enumerate() {
        nc.push_str(&format!("   - 127.0.0.1:{p}:1 shard-{i}\n"));
        amb.push_str(&format!(
            "        - {{ name: shard-{i}, address: 127.0.0.1:{p} }}\n"
        ));
    }
    std::fs::write(dir.path("nutcracker.yml"), nc).unwrap();
    let _nc = spawn(
        &format!(
            "nutcracker -c {} -s {} -o {}",
            dir.path("nutcracker.yml").display(),
            free_port(),
            dir.path("nutcracker.log").display()
        ),
        &dir.path("nutcracker.out"),
    );
    wait_port(nc_port, "nutcracker");
    let _amb = LocalDaemon::start_with(
        &amb,
        &[
            "--dataplane",
            "userspace",
            "--stats-listen",
            &format!("127.0.0.1:{}", free_port()),
        ],
    );
    wait_port(amb_port, "ambassador");
    // The same ambassador with one worker per core (the default is half the cores): what
    // scaling up buys, or costs, on this machine.
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let one_port = free_port();
    let _one = LocalDaemon::start_with(
        &amb.replace(&format!(":{amb_port}/tcp"), &format!(":{one_port}/tcp")),
        &[
            "--dataplane",
            "userspace",
            "--workers",
            &cores.to_string(),
            "--stats-listen",
            &format!("127.0.0.1:{}", free_port()),
        ],
    );
    wait_port(one_port, "ambassador --workers CORES");

    let keys = |n: usize| -> String {
        (0..n)
            .map(|i| format!("key:{i:012}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    // The MGET keys exist (written through the ambassador, so they sit on their shards).
    let _ = redis_benchmark(amb_port, "-n 1000 -r 100 -t set");
    let workloads: Vec<(String, String)> = vec![
        (
            "SET+GET -P 1".into(),
            "-n 100000 -r 100000 -t set,get -P 1".into(),
        ),
        (
            "SET+GET -P 16".into(),
            "-n 400000 -r 100000 -t set,get -P 16".into(),
        ),
        // Runs of a few seconds, as the others: a one-second run is mostly noise here.
        (
            "MGET 10 keys".into(),
            format!("-n 150000 MGET {}", keys(10)),
        ),
        (
            "MGET 100 keys".into(),
            format!("-n 40000 MGET {}", keys(100)),
        ),
    ];
    let targets = [
        ("direct (1 shard)", shard_ports[0]),
        ("nutcracker", nc_port),
        ("ambassador", amb_port),
        ("ambassador per core", one_port),
    ];
    println!(
        "3 redis-server shards on loopback; redis-benchmark -c 50, median of {ROUNDS} rotated rounds; 2 cores shared by client, proxy and shards\n"
    );
    println!(
        "{:<16} {:<20} {:>12} {:>9} {:>7}",
        "workload", "target", "ops/s", "p99 ms", "idle"
    );
    let mut summary = Vec::new();
    for (name, args) in &workloads {
        let mut rps = vec![Vec::new(); targets.len()];
        let mut p99 = vec![Vec::new(); targets.len()];
        let mut idle = vec![Vec::new(); targets.len()];
        for round in 0..ROUNDS {
            for k in 0..targets.len() {
                let t = (k + round) % targets.len();
                let (r, p, i) = redis_benchmark(targets[t].1, args);
                rps[t].push(r);
                p99[t].push(p);
                idle[t].push(i);
            }
        }
        let rows: Vec<(f64, f64)> = rps
            .into_iter()
            .zip(p99)
            .map(|(r, p)| (median(r), median(p)))
            .collect();
        for (((tname, _), (r, p)), i) in targets.iter().zip(&rows).zip(idle) {
            // Idle near 0% means the machine, not the client, is the bottleneck: a proxy's
            // work then comes out of the client's and the shards' share.
            let i = median(i) * 100.0;
            println!("{name:<16} {tname:<20} {r:>12.0} {p:>9.2} {i:>6.0}%");
        }
        summary.push((name.clone(), rows));
    }
    println!(
        "\nratios: ambassador ({} worker(s) by default / one per core) vs nutcracker (ops/s, p99: lower is better) and vs direct ops/s",
        ambassador::shard::proxy::default_workers()
    );
    for (name, rows) in &summary {
        let (d, n) = (rows[0], rows[1]);
        for (label, a) in [("default", rows[2]), ("per core", rows[3])] {
            println!(
                "{name:<16} {label:<9} ops {:.2}x nutcracker, p99 {:.2}x nutcracker, ops {:.2}x direct",
                a.0 / n.0,
                if n.1 > 0.0 { a.1 / n.1 } else { f64::NAN },
                a.0 / d.0
            );
        }
    }
    let p16 = &summary[1].1;
    println!(
        "\nscaling (-P 16): default ({} worker(s)) {:.0} ops/s, one per core ({cores} cores) {:.0} ops/s: {:.2}x",
        ambassador::shard::proxy::default_workers(),
        p16[2].0,
        p16[3].0,
        p16[3].0 / p16[2].0
    );
    println!("\ngoals: -P 16 >= 1.5x nutcracker; -P 1 >= 1.0x nutcracker and >= 0.95x direct; p99 no worse than nutcracker");
}
