//! `cargo xtask bench forward`: HTTP requests/s in the netns topology through the kernel
//! ambassador, through nftables doing the same sticky weighted split (what a user would write
//! instead), and straight to a backend, in one run; keep-alive and new connection per request.
//! Twice: on veths as container runtimes leave them (the TC program) and behind a NIC (XDP).

use ambassador_tests::topology::{split_config, Peers, Topology, VIP4};

const SECONDS: u32 = 4;
const ROUNDS: usize = 3;
const CONNECTIONS: u32 = 32;
/// A second service address, handled by nftables in the ambassador's namespace.
const NFT_VIP: &str = "10.200.0.200";

fn wrk(t: &Topology, url: &str, close: bool) -> f64 {
    let mut cmd = t.client.command("wrk");
    cmd.args([
        "-t1",
        &format!("-c{CONNECTIONS}"),
        &format!("-d{SECONDS}s"),
        "--timeout",
        "2s",
    ]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    let out = cmd.arg(url).output().expect("wrk (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "wrk failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let errors = text
        .lines()
        .find(|l| l.contains("Socket errors") || l.contains("Non-2xx"))
        .unwrap_or("");
    if !errors.is_empty() {
        eprintln!("    wrk {url}: {}", errors.trim());
    }
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Requests/sec in wrk output:\n{text}"))
}

fn main() {
    for (peers, label) in [
        (
            Peers::Containers,
            "container veths (ip link defaults: TX checksum offload on, GRO off), TC program",
        ),
        (
            Peers::BehindNic,
            "behind a NIC (far ends GRO on, TX checksum offload off), XDP program",
        ),
    ] {
        topology(peers, label);
    }
}

fn topology(peers: Peers, label: &str) {
    let mut t = Topology::with_peers(1, peers);
    t.start_nginx(1);
    t.write_config(&split_config(9, 1));
    t.lb.sh(&format!(
        "nft -f - <<'EOF'
table ip ambassador_bench {{
  chain pre {{
    type nat hook prerouting priority dstnat;
    ip daddr {NFT_VIP} tcp dport 80 dnat to jhash ip saddr mod 10 map {{ 0-8 : 10.200.2.2, 9 : 10.200.3.2 }}
  }}
}}
EOF"
    ));
    let xdp_url = format!("http://{VIP4}/");
    let nft_url = format!("http://{NFT_VIP}/");
    // The client's single address hashes to one backend either way; "direct" is that backend.
    let direct_url = "http://10.200.2.2/";

    println!(
        "\n{label}: HTTP through the topology: wrk -t1 -c{CONNECTIONS} -d{SECONDS}s, nginx backends (1 worker), median of {ROUNDS} rotated rounds"
    );
    let mut rows = Vec::new();
    for (mode, close) in [("keep-alive", false), ("new connection per request", true)] {
        let mut runs: [Vec<f64>; 3] = Default::default();
        for r in 0..ROUNDS {
            for k in 0..3 {
                let i = (k + r) % 3;
                let rps = match i {
                    0 => wrk(&t, direct_url, close),
                    // nftables measured without our program attached, so it pays nothing for it.
                    1 => wrk(&t, &nft_url, close),
                    _ => {
                        t.start_daemon();
                        t.assert_kernel_programs();
                        let v = wrk(&t, &xdp_url, close);
                        t.stop_daemon();
                        v
                    }
                };
                runs[i].push(rps);
            }
        }
        let med = |v: &mut Vec<f64>| {
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            v[v.len() / 2]
        };
        let [d, n, x] = &mut runs;
        rows.push((mode, med(d), med(n), med(x)));
    }
    println!(
        "\n{:<28} {:>12} {:>12} {:>12} {:>10} {:>10}",
        "mode", "direct", "nftables", "ambassador", "x direct", "x nft"
    );
    for (mode, direct, nft, xdp) in &rows {
        println!(
            "{mode:<28} {direct:>12.0} {nft:>12.0} {xdp:>12.0} {:>9.2}x {:>9.2}x",
            xdp / direct,
            xdp / nft
        );
    }
    println!("\ngoals: keep-alive >= 0.95x direct; new connections >= 2x nftables");
}
