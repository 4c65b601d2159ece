//! `cargo xtask report`: run the reliability tests (fuzzing, load, faults, security, and the
//! VM suites per kernel) and write `docs/RELIABILITY.md` from what they measured.
//!
//! Each row names a test; its result is the test's own, and its figures are the
//! `reliability: <test>: ...` lines the test printed. Nothing in the table is typed by hand.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

/// (area, test binary, test function, what passing shows).
const ROWS: &[(&str, &str, &str, &str)] = &[
    ("Packet fuzzing", "fuzz_packets", "a_million_random_and_mutated_packets_are_never_aborted_or_misrouted", "random and mutated packets (truncated headers, bad IHL, IPv6 extension chains, fragments, VLAN stacks, empty payloads) through the real XDP program by BPF_PROG_TEST_RUN: never XDP_ABORTED, rewritten packets have valid checksums and a configured backend, others are byte-identical"),
    ("Packet fixtures", "packet", "truncated_and_malformed_packets_pass_untouched", "every truncation of a valid frame, bad IHL and bad lengths pass untouched"),
    ("Packet fixtures", "packet", "fragments_pass_untouched", "IPv4 and IPv6 fragments are not rewritten"),
    ("Parser fuzzing", "fuzz_parsers", "framers_never_panic_and_never_overclaim", "RESP and memcache framers: no panic, claimed lengths within the buffer, a whole command stays whole"),
    ("Parser fuzzing", "fuzz_parsers", "strict_prefixes_of_valid_commands_are_incomplete", "every strict prefix of a valid command is Incomplete, never a wrong command"),
    ("Parser fuzzing", "fuzz_parsers", "config_loader_never_panics_on_mutated_configs", "mutated configs (ours and twemproxy's) give an error, never a panic"),
    ("Load", "load", "ten_thousand_connections_held_through_the_userspace_data_plane_and_the_tls_sidecar", "10,000 concurrent connections through the userspace data plane, then the TLS sidecar, held 60 s with an exchange every 10 s: 0 errors"),
    ("Faults", "userspace", "a_half_written_or_vanished_config_is_rejected_and_the_running_one_keeps_serving", "a half-written or vanished config is rejected; the running one keeps serving"),
    ("Faults", "netns", "broken_config_sent_by_sighup_is_rejected_and_traffic_keeps_flowing", "XDP path: a broken config on SIGHUP is rejected, traffic keeps flowing"),
    ("Faults", "operations", "kill_9_under_traffic_fails_no_request_and_the_restart_adopts_every_flow", "XDP path: the daemon is SIGKILLed under traffic and restarted with a flipped split: 0 failed requests, every open flow keeps its backend"),
    ("Faults", "operations", "a_backend_killed_under_load_moves_only_its_clients_and_the_rest_see_no_error", "XDP path: a backend SIGKILLed under load: the other backend's clients see 0 errors; only the dead backend's clients fail, briefly, then move"),
    ("Faults", "operations", "set_weight_moves_new_flows_survives_a_restart_and_bad_requests_change_nothing", "XDP path: the daemon is killed with SIGKILL and restarted; overrides and the split survive"),
    ("Faults", "operations", "keep_on_exit_leaves_xdp_serving_and_detach_refuses_while_a_daemon_runs", "XDP keeps serving after the daemon exits (keep-on-exit)"),
    ("Faults", "operations", "an_unhealthy_backend_leaves_the_table_moving_only_its_clients_and_comes_back", "a dead backend leaves the table: only its clients move"),
    ("Faults", "userspace", "failed_connects_eject_a_backend_passively_until_its_window_passes", "failed connects eject a backend passively"),
    ("Faults", "redis", "a_dead_or_silent_shard_fails_only_its_keys", "a killed or silent Redis shard fails only its keys"),
    ("Faults", "redis", "malformed_input_gets_an_error_and_a_close_while_others_keep_working", "malformed RESP gets an error reply and a close; other clients are unaffected"),
    ("Faults", "tls", "garbage_truncated_and_silent_clients_close_only_their_own_connection", "garbage, truncated and silent TLS clients close only their own connection"),
    ("Faults", "discovery", "dns_a_records_change_endpoints_open_connections_continue_and_a_dead_server_keeps_the_last_set", "DNS down or empty: the last good endpoint set keeps serving"),
    ("Faults", "gitsync", "a_full_disk_fails_the_sync_and_keeps_the_published_tree", "a full disk fails the sync and keeps the published tree"),
    ("Security", "operations", "the_admin_socket_refuses_other_users", "the admin socket (0600) refuses another user"),
    ("Security", "operations", "tcp_admin_needs_its_token_and_answers_live_ready_and_config", "the TCP admin endpoint needs its bearer token"),
    ("Security", "deploy", "manifests_are_valid_kubernetes_objects_that_match_the_daemon", "the default DaemonSet runs without privileged: true (capabilities only)"),
];

#[derive(Default)]
struct Outcome {
    ok: Option<bool>,
    figures: Vec<String>,
}

/// Run the rows' tests one at a time with their output, and collect results and figures.
fn run_tests(root: &Path) -> Result<HashMap<String, Outcome>> {
    let mut bins: Vec<&str> = ROWS.iter().map(|r| r.1).collect();
    bins.sort();
    bins.dedup();
    let mut c = Command::new("cargo");
    // Every binary runs even when one fails: the table shows each result.
    c.args(["test", "--release", "--workspace", "--no-fail-fast"]);
    for b in &bins {
        c.args(["--test", b]);
    }
    c.arg("--");
    for r in ROWS {
        c.arg(r.2);
    }
    // `--exact` applies to every filter; one thread keeps each test's output together.
    c.args(["--exact", "--nocapture", "--test-threads=1"]);
    let mut child = c
        .current_dir(root)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let mut out: HashMap<String, Outcome> = HashMap::new();
    let mut current: Option<String> = None;
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test ") {
            if let Some((name, tail)) = rest.split_once(" ... ") {
                current = Some(name.to_string());
                match tail.trim() {
                    "ok" => out.entry(name.to_string()).or_default().ok = Some(true),
                    "FAILED" => out.entry(name.to_string()).or_default().ok = Some(false),
                    _ => {}
                }
            }
        }
        let t = line.trim();
        if line.starts_with("test ") && line.contains(" ... ") {
            // Handled above; the rest of the line may be the test's own output.
        } else if let Some(cur) = &current {
            if t == "ok" || t.ends_with(" ok") && !t.contains(':') {
                out.entry(cur.clone()).or_default().ok = Some(true);
            } else if t == "FAILED" || t.ends_with(" FAILED") && !t.contains(':') {
                out.entry(cur.clone()).or_default().ok = Some(false);
            }
        }
        if let Some(pos) = line.find("reliability: ") {
            let rest = &line[pos + "reliability: ".len()..];
            if let Some((name, fig)) = rest.split_once(": ") {
                out.entry(name.to_string())
                    .or_default()
                    .figures
                    .push(fig.to_string());
            }
        }
    }
    child.wait()?;
    Ok(out)
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|")
}

pub fn report(root: &Path) -> Result<()> {
    crate::run(Command::new("cargo").args(["build", "--release", "--workspace"]))?;
    let tests = run_tests(root)?;
    let fuzz = crate::fuzz_runs(&[], crate::FUZZ_SECONDS);
    let deny = crate::deny();
    let vm = if Path::new("/dev/kvm").exists() {
        Some(crate::vm::vm_test(root, &[]))
    } else {
        None
    };
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease")?
        .trim()
        .to_string();
    let commit = String::from_utf8_lossy(
        &Command::new("git")
            .args(["rev-parse", "--short", "HEAD"])
            .current_dir(root)
            .output()?
            .stdout,
    )
    .trim()
    .to_string();
    let date = String::from_utf8_lossy(
        &Command::new("date")
            .arg("-u")
            .arg("+%Y-%m-%d")
            .output()?
            .stdout,
    )
    .trim()
    .to_string();
    let mut md = format!(
        "# Reliability\n\nRegenerated by `cargo xtask report` (it runs every test below and fills in what they \
         measured; nothing here is typed by hand). Last run: {date}, commit `{commit}`, host kernel {host}, \
         2 cores.\n\n| Area | Test | Result | What passing shows | Last figures |\n|---|---|---|---|---|\n"
    );
    let mut failed = Vec::new();
    for (area, bin, name, shows) in ROWS {
        let o = tests.get(*name);
        let result = match o.and_then(|o| o.ok) {
            Some(true) => "pass",
            Some(false) => {
                failed.push(name.to_string());
                "**FAIL**"
            }
            None => {
                failed.push(format!("{name} (did not run)"));
                "**did not run**"
            }
        };
        let figures = o
            .map(|o| o.figures.join("<br>"))
            .filter(|f| !f.is_empty())
            .unwrap_or_else(|| "—".into());
        md.push_str(&format!(
            "| {area} | `{bin}::{name}` | {result} | {} | {} |\n",
            cell(shows),
            cell(&figures)
        ));
    }
    match fuzz {
        Ok(runs) => {
            for r in runs {
                if !r.ok {
                    failed.push(format!("fuzz {}", r.target));
                }
                md.push_str(&format!(
                    "| Parser fuzzing (libFuzzer) | `fuzz/fuzz_targets/{}.rs` | {} | `cargo fuzz` for {} s from the kept corpus: no panic, no failed property | {} inputs, corpus {} |\n",
                    r.target,
                    if r.ok { "pass" } else { "**FAIL**" },
                    crate::FUZZ_SECONDS,
                    r.execs,
                    r.corpus
                ));
            }
        }
        Err(e) => {
            failed.push(format!("fuzz: {e:#}"));
            md.push_str(&format!(
                "| Parser fuzzing (libFuzzer) | cargo fuzz | **FAIL** | — | {} |\n",
                cell(&format!("{e:#}"))
            ));
        }
    }
    md.push_str(&format!(
        "| Security | `cargo deny check licenses bans sources` | {} | every dependency has an allowed license, comes from crates.io, no wildcard versions | {} |\n",
        if deny.is_ok() { "pass" } else { "**FAIL**" },
        match &deny {
            Ok(()) => "0 errors".to_string(),
            Err(e) => {
                failed.push("cargo deny".into());
                cell(&format!("{e:#}"))
            }
        }
    ));
    match vm {
        Some(Ok(kernels)) => {
            for k in &kernels {
                for (suite, p, f, ok) in &k.suites {
                    if !ok {
                        failed.push(format!("vm {} {suite}", k.version));
                    }
                    md.push_str(&format!(
                        "| Kernels (VM) | `{suite}` on Linux {} ({}) | {} | the suite passes inside a guest running that kernel | {p} passed, {f} failed |\n",
                        k.version,
                        k.accel,
                        if *ok { "pass" } else { "**FAIL**" }
                    ));
                }
                if let Some(e) = &k.error {
                    failed.push(format!("vm {}: {e}", k.version));
                    md.push_str(&format!(
                        "| Kernels (VM) | Linux {} | **FAIL** | — | {} |\n",
                        k.version,
                        cell(e)
                    ));
                }
            }
        }
        Some(Err(e)) => {
            failed.push(format!("vm-test: {e:#}"));
            md.push_str(&format!("| Kernels (VM) | vm-test | **FAIL** | — | {} |\n", cell(&format!("{e:#}"))));
        }
        None => md.push_str("| Kernels (VM) | vm-test | **not run** | — | /dev/kvm is missing on the reporting host |\n"),
    }
    md.push_str(&format!(
        "\nThe host kernel ({host}) runs every suite in `cargo xtask test`; the VM rows are the kernels \
         `cargo xtask vm-test` boots. The kernel features the programs need, and the oldest kernel \
         known to work, are listed in `docs/ARCHITECTURE.md` (Kernel requirements).\n"
    ));
    std::fs::write(root.join("docs/RELIABILITY.md"), md)?;
    println!("wrote docs/RELIABILITY.md");
    if !failed.is_empty() {
        bail!("reliability tests failed: {}", failed.join(", "));
    }
    Ok(())
}
