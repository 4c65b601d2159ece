//! The CLI as a user meets it: `check`, `simulate`, and `run`'s one-line errors for the
//! mistakes people make first.

use std::{path::PathBuf, process::Command};

use ambassador_tests::{ambassador_bin, netns::Netns, require_root};

fn example() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/ambassador.yaml")
}

fn tmp(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("amb-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn amb(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(ambassador_bin()).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_accepts_the_shipped_example() {
    let (code, out, _) = amb(&["check", example().to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(out.contains("ok (1 services, 2 backends)"), "{out}");
}

#[test]
fn check_names_file_line_key_and_fix_and_exits_non_zero() {
    let text = std::fs::read_to_string(example())
        .unwrap()
        .replace("weight: 1 }", "wieght: 1 }");
    let bad = tmp("typo.yaml", &text);
    let (code, _, err) = amb(&["check", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    let line = err.lines().next().unwrap();
    assert!(line.contains("typo.yaml:11:"), "{err}");
    assert!(line.contains("services[0].split.backends[1]"), "{err}");
    assert!(
        line.contains("unknown field `wieght`") && line.contains("fix:"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line, no backtrace: {err}");
}

#[test]
fn simulate_predicts_the_split_and_what_a_change_moves() {
    let one_to_one = tmp(
        "even.yaml",
        &std::fs::read_to_string(example())
            .unwrap()
            .replace("weight: 9", "weight: 1"),
    );
    let (code, out, err) = amb(&[
        "simulate",
        "--config",
        example().to_str().unwrap(),
        "--clients",
        "50000",
        "--against",
        one_to_one.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let s = &v["services"][0];
    let web = s["backends"][0]["predicted"].as_f64().unwrap();
    assert!((web - 0.9).abs() < 0.01, "{out}");
    // 9:1 → 1:1 must move web's surplus (40% of clients) and nothing else.
    let moved = s["moved"].as_f64().unwrap();
    assert!((moved - 0.4).abs() < 0.015, "{out}");
}

#[test]
fn run_with_a_missing_interface_says_so_in_one_line() {
    require_root();
    let ns = Netns::new("cli");
    let out = ns
        .command(ambassador_bin().to_str().unwrap())
        .args([
            "run",
            "--config",
            example().to_str().unwrap(),
            "-i",
            "nosuch0",
            "--dataplane",
            "kernel",
        ])
        .args(["--state-dir", &format!("/tmp/amb-cli-state-{}", ns.name)])
        .args(["--pin-dir", &format!("/sys/fs/bpf/amb-cli-{}", ns.name)])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let last = err.lines().last().unwrap_or("");
    assert!(last.contains("interface nosuch0 does not exist"), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
}

#[test]
fn run_mounts_bpffs_where_there_is_none_and_says_so() {
    require_root();
    let base = format!("/tmp/amb-no-bpffs-{}", std::process::id());
    let (code, _, err) = amb(&[
        "run",
        "--config",
        example().to_str().unwrap(),
        "-i",
        "nosuch0",
        "--dataplane",
        "kernel",
        "--pin-dir",
        &format!("{base}/ambassador"),
    ]);
    let fs = Command::new("stat")
        .args(["-f", "-c", "%T", &base])
        .output()
        .unwrap();
    let fs = String::from_utf8_lossy(&fs.stdout).trim().to_string();
    // Ours to remove: the daemon mounted it for this test.
    let _ = Command::new("umount").arg(&base).status();
    let _ = std::fs::remove_dir_all(&base);
    assert_eq!(fs, "bpf_fs", "no bpf filesystem at {base}: {err}");
    assert!(
        err.contains(&format!("mounted a bpf filesystem at {base}")),
        "{err}"
    );
    // It went on to the next check.
    assert_eq!(code, 1);
    assert!(err.contains("interface nosuch0 does not exist"), "{err}");
}

#[test]
fn run_without_privileges_says_what_it_needs() {
    require_root();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(ambassador_bin())
        .args([
            "run",
            "--config",
            example().to_str().unwrap(),
            "--dataplane",
            "kernel",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("needs root"), "{err}");
}

#[test]
fn auto_falls_back_to_userspace_with_a_warning_that_says_why() {
    require_root();
    let ns = Netns::new("auto");
    let dir = std::env::temp_dir().join(format!("amb-cli-auto-{}", ns.name));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("log");
    let mut child = ns.spawn(
        &format!(
            "{} run --config {} -i nosuch0 --state-dir {} --pin-dir /sys/fs/bpf/amb-auto-{}",
            ambassador_bin().display(),
            example().display(),
            dir.join("state").display(),
            ns.name
        ),
        &log,
    );
    let state = dir.join("state/state.json");
    ambassador_tests::topology::wait_for(std::time::Duration::from_secs(10), "fallback", || {
        state.exists()
    });
    let text = std::fs::read_to_string(&log).unwrap();
    let warning = text
        .lines()
        .find(|l| l.contains("the kernel data plane is unavailable"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        warning.contains("interface nosuch0 does not exist"),
        "{warning}"
    );
    assert!(
        warning.contains("using the userspace data plane"),
        "{warning}"
    );
    let st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    assert_eq!(st["dataplane"], "userspace");
    // It serves the service address, which it made local, and gives it back on exit.
    assert!(ns.ip("addr show dev lo").contains("10.200.0.100/32"));
    ambassador_tests::netns::sh(&format!("kill -TERM {}", child.id()));
    assert!(child.wait().unwrap().success());
    assert!(!ns.ip("addr show dev lo").contains("10.200.0.100/32"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn completions_and_man_page_are_generated_from_the_cli() {
    let (code, bash, _) = amb(&["completions", "bash"]);
    assert_eq!(code, 0);
    assert!(
        bash.contains("_ambassador()") && bash.contains("set-weight"),
        "{bash}"
    );
    let (code, zsh, _) = amb(&["completions", "zsh"]);
    assert_eq!(code, 0);
    assert!(zsh.starts_with("#compdef ambassador"), "{zsh}");
    let (code, man, _) = amb(&["man"]);
    assert_eq!(code, 0);
    assert!(
        man.contains(".TH ambassador 1") && man.contains("drain"),
        "{man}"
    );
}

/// A classic pcap file (microsecond timestamps) of `frames`, written from the format itself so
/// the reader is checked against the spec, not against its own writer.
fn pcap(name: &str, linktype: u32, frames: &[Vec<u8>]) -> PathBuf {
    let mut b = Vec::new();
    b.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    b.extend_from_slice(&2u16.to_le_bytes());
    b.extend_from_slice(&4u16.to_le_bytes());
    b.extend_from_slice(&0i32.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&65535u32.to_le_bytes());
    b.extend_from_slice(&linktype.to_le_bytes());
    for (i, f) in frames.iter().enumerate() {
        b.extend_from_slice(&(1_700_000_000u32 + i as u32).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&(f.len() as u32).to_le_bytes());
        b.extend_from_slice(&(f.len() as u32).to_le_bytes());
        b.extend_from_slice(f);
    }
    let dir = std::env::temp_dir().join(format!("amb-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, b).unwrap();
    p
}

#[test]
fn simulate_reads_a_capture_and_says_where_each_packet_goes() {
    use ambassador::{config::Config, dataplane::Plan};
    use ambassador_tests::packets::Spec;

    let plan = Plan::build(&Config::load(&example()).unwrap());
    let clients: Vec<String> = (0..200)
        .map(|i| format!("10.9.{}.{}:{}", i / 250, 1 + i % 250, 40000 + i))
        .collect();
    let mut frames: Vec<Vec<u8>> = clients
        .iter()
        .map(|c| Spec::tcp(c, "10.200.0.100:80").build())
        .collect();
    frames.push(Spec::tcp("10.9.9.9:5000", "10.200.0.100:81").build());
    let full = Spec::tcp("10.9.9.9:5000", "10.200.0.100:80").build();
    frames.push(full[..30].to_vec());
    let p = pcap("capture.pcap", 1, &frames);
    let (code, out, err) = amb(&[
        "simulate",
        "--config",
        example().to_str().unwrap(),
        "--pcap",
        p.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(v.len(), 202, "{out}");
    let mut web = 0;
    for (i, c) in clients.iter().enumerate() {
        let want = plan.services[0].pick(c.parse().unwrap()).unwrap();
        assert_eq!(v[i]["packet"], i + 1);
        assert_eq!(v[i]["service"], "frontend", "{}", v[i]);
        assert_eq!(v[i]["address"], want.address.to_string(), "{}", v[i]);
        web += (v[i]["backend"] == "web") as u32;
    }
    assert!(
        (160..=195).contains(&web),
        "{web}/200 on web with a 9:1 split"
    );
    assert_eq!(v[200]["service"], serde_json::Value::Null);
    assert!(
        v[200]["verdict"]
            .as_str()
            .unwrap()
            .contains("not a service: passed"),
        "{}",
        v[200]
    );
    assert!(
        v[201]["verdict"]
            .as_str()
            .unwrap()
            .starts_with("malformed ("),
        "{}",
        v[201]
    );

    let (code, out, _) = amb(&[
        "simulate",
        "--config",
        example().to_str().unwrap(),
        "--pcap",
        p.to_str().unwrap(),
    ]);
    assert_eq!(code, 0);
    assert!(
        out.contains("202 packets: 200 to a backend as new flows, 2 passed"),
        "{out}"
    );

    // `tcpdump -i any` writes Linux cooked frames, which XDP never sees.
    let sll = pcap("any.pcap", 113, &frames[..1]);
    let (code, _, err) = amb(&[
        "simulate",
        "--config",
        example().to_str().unwrap(),
        "--pcap",
        sll.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("not `-i any`"), "{err}");
}
