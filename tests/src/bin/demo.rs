//! `cargo xtask demo`: the book's request-splitting ambassador, end to end, in a throw-away
//! topology: 200 client addresses behind a NIC (XDP toward them), nginx `web` and
//! `experiment` in container-like namespaces (TC on their veths).

use std::{collections::HashMap, net::IpAddr, process::Command};

use ambassador_tests::{
    ambassador_bin,
    topology::{split_config, Peers, Topology, VIP4},
};

fn main() {
    println!(
        "==> building the topology: client namespace with 200 addresses, ambassador namespace"
    );
    println!("    (XDP toward the client, which stands for a host behind a NIC; TC toward web and");
    println!(
        "    experiment, whose veths are left as a container runtime leaves them), nginx in both"
    );
    let mut t = Topology::with_peers(200, Peers::Mixed);
    t.start_nginx(1);
    let cfg = split_config(9, 1);
    t.write_config(&cfg);
    println!("==> config (nginx: `ip_hash; server web weight=9; server experiment;`):\n");
    for l in cfg.lines().take(9) {
        println!("    {l}");
    }
    t.start_daemon();
    t.assert_kernel_programs();
    println!("\n==> every client requests http://{VIP4}/ twice");
    let vip = format!("{VIP4}:80").parse().unwrap();
    let rounds = [
        t.request_all(&t.clients4, vip),
        t.request_all(&t.clients4, vip),
    ];
    let mut first: HashMap<IpAddr, String> = HashMap::new();
    let (mut sticky, mut failed, mut real_addr) = (0, 0, 0);
    for (i, round) in rounds.iter().enumerate() {
        for (c, r) in round {
            let Ok(body) = r else {
                failed += 1;
                continue;
            };
            let (backend, peer) = body.split_once(' ').unwrap_or((body, ""));
            if peer.parse::<IpAddr>().ok() == Some(*c) {
                real_addr += 1;
            }
            if i == 0 {
                first.insert(*c, backend.to_string());
            } else if first.get(c).map(String::as_str) == Some(backend) {
                sticky += 1;
            }
        }
    }
    let n = t.clients4.len();
    println!("\n    {:<12} {:>8} {:>8}", "backend", "clients", "share");
    for name in ["web", "experiment"] {
        let k = first.values().filter(|b| *b == name).count();
        println!(
            "    {name:<12} {k:>8} {:>7.1}%",
            100.0 * k as f64 / n as f64
        );
    }
    println!(
        "\n    sticky: {sticky}/{n} clients got the same backend on their second request ({:.1}%)",
        100.0 * sticky as f64 / n as f64
    );
    println!(
        "    backends saw the real client address on {real_addr}/{} requests",
        2 * n
    );
    println!("    failed requests: {failed}");
    println!("\n==> ambassador status\n");
    let out = Command::new(ambassador_bin())
        .args(["status", "--state-dir"])
        .arg(t.state_dir())
        .output()
        .expect("ambassador status");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    println!("\n==> removing the namespaces, processes and pinned maps it created");
    drop(t);
    if failed > 0 || sticky != n {
        std::process::exit(1);
    }
}
