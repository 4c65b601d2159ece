//! `cargo xtask bench control`: the control plane against its goals (issue: operations).
//!
//! 1. `set-weight` → new table live in the kernel, for a service with 1,000 backends: in
//!    process (plan rebuild + map writes) and end to end (POST to a running daemon's admin
//!    socket, answered once the kernel switched). Goal: < 10 ms.
//! 2. Flows broken by 20 such changes: 10,000 flows are opened through the program first
//!    (`BPF_PROG_TEST_RUN`), and after the changes every one must still be rewritten to its
//!    original backend. Goal: 0.
//! 3. Daemon RSS, idle and with 1,000,000 connection-table entries (after a `/status` that walks
//!    them). Goal: idle < 30 MB.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use ambassador::{
    admin::{call, Endpoint},
    config::Config,
    dataplane::{kernel::KernelDataplane, Plan},
};
use ambassador_ebpf::{Flow, FlowKey};
use ambassador_tests::{
    ambassador_bin,
    netns::{veth, Netns},
    packets::Spec,
    topology::wait_for,
};
use aya::{
    maps::{HashMap, MapData},
    programs::{TestRun, TestRunOptions, Xdp},
};

const BACKENDS: u32 = 1_000;
const CHANGES: usize = 20;
const FLOWS: u32 = 10_000;
const TABLE_ENTRIES: u32 = 1_000_000;

fn config(weights: &[u32]) -> String {
    let mut s = String::from(
        "interfaces: [bc0]\nservices:\n  - name: big\n    listen: 10.200.0.100:80/tcp\n    split:\n      key: src-ip\n      backends:\n",
    );
    for (i, w) in weights.iter().enumerate() {
        s.push_str(&format!(
            "        - {{ name: b{i}, address: 10.200.2.2:{}, weight: {w} }}\n",
            10_000 + i
        ));
    }
    s
}

fn parse(text: &str) -> Config {
    Config::parse(std::path::Path::new("bench.yaml"), text).expect("bench config")
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// The destination port a packet was rewritten to (IPv4, no options).
fn rewritten_port(dp: &mut KernelDataplane, pkt: &[u8]) -> u16 {
    let mut out = vec![0u8; pkt.len() + 64];
    let prog: &mut Xdp = dp.program();
    prog.test_run(TestRunOptions {
        data_in: Some(pkt),
        data_out: Some(&mut out),
        repeat: 1,
        ..TestRunOptions::new()
    })
    .expect("BPF_PROG_TEST_RUN");
    u16::from_be_bytes([out[14 + 20 + 2], out[14 + 20 + 3]])
}

fn client_packet(i: u32) -> Vec<u8> {
    let src = format!(
        "10.{}.{}.{}:{}",
        50 + (i >> 16) % 100,
        (i >> 8) & 255,
        i & 255,
        20_000 + i % 30_000
    );
    Spec::tcp(&src, "10.200.0.100:80").build()
}

fn in_process() -> (Vec<f64>, u32) {
    let mut weights = vec![1u32; BACKENDS as usize];
    let mut dp = KernelDataplane::load().expect("load the XDP program");
    let mut plan = Plan::build(&parse(&config(&weights)));
    dp.apply(&plan).expect("first plan");
    let pkts: Vec<Vec<u8>> = (0..FLOWS).map(client_packet).collect();
    let before: Vec<u16> = pkts.iter().map(|p| rewritten_port(&mut dp, p)).collect();
    assert!(
        before.iter().all(|&p| p >= 10_000),
        "a flow was not forwarded"
    );
    let mut times = Vec::new();
    for i in 0..CHANGES {
        // Alternate one backend between weight 1 and 50: its share moves every time.
        weights[i % 10] = if weights[i % 10] == 1 { 50 } else { 1 };
        let cfg = parse(&config(&weights));
        let t = Instant::now();
        plan = Plan::build_from(&cfg, Some(&plan));
        let built = t.elapsed();
        dp.apply(&plan).expect("apply");
        times.push(t.elapsed().as_secs_f64() * 1e3);
        if std::env::var_os("BENCH_DETAIL").is_some() {
            eprintln!(
                "change {i}: plan {:.2} ms, maps {:.2} ms",
                built.as_secs_f64() * 1e3,
                (t.elapsed() - built).as_secs_f64() * 1e3
            );
        }
    }
    let broken = pkts
        .iter()
        .zip(&before)
        .filter(|(p, b)| rewritten_port(&mut dp, p) != **b)
        .count() as u32;
    (times, broken)
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    ambassador_tests::require_root();
    println!("bench control: {BACKENDS} backends, {CHANGES} weight changes, {FLOWS} tracked flows");
    let (apply_ms, broken) = in_process();
    println!(
        "  set-weight → table live (in process: plan + maps):  median {:.2} ms, p99 {:.2} ms   (goal < 10 ms: {:.2}x of it)",
        percentile(apply_ms.clone(), 0.5),
        percentile(apply_ms.clone(), 0.99),
        percentile(apply_ms.clone(), 0.5) / 10.0
    );
    println!(
        "  tracked flows broken by {CHANGES} changes:            {broken} of {FLOWS}   (goal 0)"
    );

    // End to end, and memory: a real daemon on a veth in a namespace of its own.
    let dir = std::env::temp_dir().join(format!("amb-bench-control-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (ns, peer) = (Netns::new("bctl"), Netns::new("bctlp"));
    veth(&ns, "bc0", &peer, "bc1");
    let cfg_path = dir.join("ambassador.yaml");
    let mut weights = vec![1u32; BACKENDS as usize];
    std::fs::write(&cfg_path, config(&weights)).unwrap();
    let state = dir.join("state");
    let pin = format!("/sys/fs/bpf/amb-bench-control-{}", std::process::id());
    let mut daemon = ambassador_tests::bench::spawn(
        &format!(
            "nsenter --net=/run/netns/{} {} run --config {} --state-dir {} --pin-dir {pin} --flow-table-size {}",
            ns.name,
            ambassador_bin().display(),
            cfg_path.display(),
            state.display(),
            TABLE_ENTRIES + TABLE_ENTRIES / 8,
        ),
        &dir.join("daemon.log"),
    );
    let pid = daemon.0.id();
    wait_for(Duration::from_secs(20), "the daemon to serve", || {
        state.join("state.json").exists()
    });
    std::thread::sleep(Duration::from_secs(2));
    let idle = rss_kib(pid, "VmRSS:");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let admin = Endpoint::default_for(&state);
    let mut e2e = Vec::new();
    for i in 0..CHANGES {
        weights[i % 10] = if weights[i % 10] == 1 { 50 } else { 1 };
        let body = serde_json::json!({"service": "big", "backend": format!("b{}", i % 10), "weight": weights[i % 10]});
        let t = Instant::now();
        let (status, text) = rt
            .block_on(call(
                &admin,
                None,
                hyper::Method::POST,
                "/weight",
                Some(body),
            ))
            .expect("admin call");
        e2e.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(status, 200, "{text}");
    }
    println!(
        "  set-weight → table live (POST to the daemon, end to end): median {:.2} ms, p99 {:.2} ms",
        percentile(e2e.clone(), 0.5),
        percentile(e2e, 0.99)
    );

    // Fill the pinned connection table as a busy node would have it.
    let t = Instant::now();
    {
        let data = MapData::from_pin(format!("{pin}/FLOWS")).expect("pinned FLOWS");
        let map = aya::maps::Map::from_map_data(data).unwrap();
        let mut flows: HashMap<_, FlowKey, Flow> = HashMap::try_from(map).unwrap();
        let mut f = Flow {
            nat_addr: ambassador_ebpf::addr4([10, 200, 2, 2]),
            nat_port: 10_000u16.to_be(),
            ..Flow::default()
        };
        for i in 0..TABLE_ENTRIES {
            let k = FlowKey {
                src: ambassador_ebpf::addr4([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]),
                dst: ambassador_ebpf::addr4([10, 200, 0, 100]),
                sport: (i as u16).to_be(),
                dport: 80u16.to_be(),
                proto: 6,
                family: 4,
                _pad: 0,
            };
            f.backend = i % BACKENDS;
            flows.insert(k, f, 0).expect("insert");
        }
    }
    let fill = t.elapsed();
    let t = Instant::now();
    let (status, _) = rt
        .block_on(call(&admin, None, hyper::Method::GET, "/status", None))
        .expect("status");
    assert_eq!(status, 200);
    let walk = t.elapsed();
    let full = rss_kib(pid, "VmRSS:");
    let peak = rss_kib(pid, "VmHWM:");
    println!(
        "  daemon RSS idle:                                   {:.1} MB   (goal < 30 MB: {:.2}x of it)",
        idle as f64 / 1024.0,
        idle as f64 / 1024.0 / 30.0
    );
    println!(
        "  daemon RSS with {TABLE_ENTRIES} table entries:           {:.1} MB (peak {:.1} MB; filled in {:.1} s, /status walked them in {:.2} s)",
        full as f64 / 1024.0,
        peak as f64 / 1024.0,
        fill.as_secs_f64(),
        walk.as_secs_f64()
    );
    let _ = daemon.0.kill();
    let _ = daemon.0.wait();
    let _ = ambassador::dataplane::kernel::detach(std::path::Path::new(&pin));
    drop((ns, peer));
    if std::env::var_os("BENCH_DETAIL").is_some() {
        eprintln!(
            "{}",
            std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _: Option<SocketAddr> = None;
}
