//! Operating the daemon on a node: it can die or be upgraded under traffic without breaking a
//! flow, and what it pinned is checked before it is adopted and removed by `detach`.

use std::{
    net::{IpAddr, SocketAddr},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use ambassador_tests::{
    ambassador_bin,
    topology::{http_get, split_config, KeepAlive, Topology, VIP4},
};

fn vip4() -> SocketAddr {
    format!("{VIP4}:80").parse().unwrap()
}

fn started(n: usize, web: u32, experiment: u32) -> Topology {
    let mut t = Topology::new(n);
    t.start_nginx(1);
    t.write_config(&split_config(web, experiment));
    t.start_daemon();
    t
}

/// Whether the lb namespace's veths have the kernel program this topology calls for.
fn attached(t: &Topology) -> [bool; 3] {
    let want = t.peers.programs();
    let have = t.attached();
    [0, 1, 2].map(|i| have[i] == want[i])
}

/// Whether no kernel program is left on the lb namespace's veths.
fn detached(t: &Topology) -> bool {
    t.attached() == ["none"; 3]
}

fn detach(t: &Topology) -> String {
    let (ok, out, err) = cli(t, &["detach", "--pin-dir", t.pin_dir.to_str().unwrap()]);
    assert!(ok, "detach failed: {err}");
    out
}

#[test]
fn kill_9_under_traffic_fails_no_request_and_the_restart_adopts_every_flow() {
    let t = started(100, 9, 1);
    let long: Vec<IpAddr> = t.clients4[..20].to_vec();
    let churn: Vec<IpAddr> = t.clients4[20..].to_vec();
    let stop = AtomicBool::new(false);
    let new_ok = AtomicU64::new(0);
    let (streamed, kept) = std::thread::scope(|s| {
        // 20 keep-alive connections streaming requests the whole time.
        let streamer = s.spawn(|| {
            let _in = t.client.enter();
            let mut conns: Vec<(IpAddr, KeepAlive, String)> = long
                .iter()
                .map(|&c| {
                    let mut k = KeepAlive::open(c, vip4()).expect("open keep-alive");
                    let b = k.get().expect("first request");
                    (c, k, b)
                })
                .collect();
            let mut n = 0u64;
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                for (c, k, first) in conns.iter_mut() {
                    let b = k
                        .get()
                        .unwrap_or_else(|e| panic!("streaming connection from {c} broke: {e}"));
                    assert_eq!(&b, first, "connection from {c} changed backend");
                    n += 1;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let kept: Vec<String> = conns.into_iter().map(|(_, _, b)| b).collect();
            (n, kept)
        });
        // New connections the whole time, from 80 other clients in turn.
        s.spawn(|| {
            let _in = t.client.enter();
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let c = churn[i % churn.len()];
                http_get(c, vip4())
                    .unwrap_or_else(|e| panic!("new connection from {c} failed: {e}"));
                new_ok.fetch_add(1, Ordering::Relaxed);
                i += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        std::thread::sleep(Duration::from_millis(500));
        t.signal("KILL");
        let st = t.wait_daemon_exit();
        assert!(!st.success(), "the daemon was not killed: {st}");
        // No daemon now: the pinned program keeps forwarding, old and new connections alike.
        let before = new_ok.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(
            attached(&t),
            [true; 3],
            "the program left an interface with the daemon"
        );
        assert!(
            new_ok.load(Ordering::Relaxed) > before + 20,
            "new connections stalled while no daemon ran"
        );
        // The restart serves a flipped split: adopted flows must keep their backend, new
        // clients follow the new table.
        t.write_config(&split_config(1, 9));
        t.start_daemon();
        std::thread::sleep(Duration::from_millis(1000));
        let after = t.request_all(&t.clients4[20..], vip4());
        stop.store(true, Ordering::Relaxed);
        let r = streamer.join().unwrap();
        let exp = after
            .iter()
            .filter(|(_, r)| r.as_ref().is_ok_and(|b| b.starts_with("experiment")))
            .count();
        assert!(after.iter().all(|(_, r)| r.is_ok()), "a new request failed");
        // Clients already tracked keep their backend; of the rest, 90% go to experiment.
        assert!(
            exp > 40,
            "only {exp}/80 clients on experiment after the flip"
        );
        r
    });
    assert!(streamed > 200, "only {streamed} requests streamed");
    // With a 9:1 split most long connections were on web, which the new table mostly avoids:
    // they survived only because the restarted daemon kept the connection table.
    assert!(
        kept.iter().filter(|b| b.starts_with("web")).count() >= 10,
        "expected most long connections on web: {kept:?}"
    );
    let log = t.daemon_log();
    assert!(
        log.contains("adopted the connection table"),
        "the restart did not adopt the pinned flows:\n{log}"
    );
    assert!(new_ok.load(Ordering::Relaxed) > 100);
    println!(
        "reliability: kill_9_under_traffic_fails_no_request_and_the_restart_adopts_every_flow: TC path (container veths), daemon SIGKILLed and restarted with a flipped split under traffic: {} new connections and {streamed} requests on 20 keep-alive connections, 0 failed; every keep-alive kept its backend ({} of 20 on web, which the new table mostly avoids)",
        new_ok.load(Ordering::Relaxed),
        kept.iter().filter(|b| b.starts_with("web")).count()
    );
    // A graceful stop detaches and removes the pins.
    t.stop_daemon();
    assert!(detached(&t), "still attached after SIGTERM");
    assert!(!t.pin_dir.exists(), "pins left after SIGTERM");
}

#[test]
fn pinned_maps_of_another_layout_are_refused_with_the_fix_and_detach_removes_them() {
    let t = started(4, 9, 1);
    t.signal("KILL");
    t.wait_daemon_exit();
    let markers: Vec<String> = std::fs::read_dir(&t.pin_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("layout-"))
        .collect();
    assert_eq!(markers.len(), 1, "one layout marker: {markers:?}");
    assert!(
        t.pin_dir.join("prog-ambassador_xdp").exists(),
        "the XDP program is pinned"
    );

    // A table left by a binary of another layout version.
    std::fs::remove_dir(t.pin_dir.join(&markers[0])).unwrap();
    std::fs::create_dir(t.pin_dir.join("layout-0")).unwrap();
    let (st, err) = t.run_daemon_expecting_failure(&[]);
    assert!(!st.success());
    assert!(
        err.contains("layout layout-0") && err.contains("ambassador detach --pin-dir"),
        "unclear refusal: {err}"
    );
    std::fs::remove_dir(t.pin_dir.join("layout-0")).unwrap();
    std::fs::create_dir(t.pin_dir.join(&markers[0])).unwrap();

    // A connection table of another shape under the right marker: another map pinned as FLOWS.
    std::fs::remove_file(t.pin_dir.join("FLOWS")).unwrap();
    aya::maps::MapData::from_pin(t.pin_dir.join("ADDR_FILTER"))
        .unwrap()
        .pin(t.pin_dir.join("FLOWS"))
        .unwrap();
    let (st, err) = t.run_daemon_expecting_failure(&[]);
    assert!(!st.success());
    assert!(
        err.contains("FLOWS is Some(Array) with key 4 B, value 4 B")
            && err.contains("needs LruHash"),
        "unclear refusal: {err}"
    );
    // Refused starts touched nothing: the program still forwards with the killed daemon's
    // state.
    assert_eq!(attached(&t), [true; 3]);
    let r = t.request_all(&t.clients4, vip4());
    assert!(r.iter().all(|(_, r)| r.is_ok()), "{r:?}");

    let out = detach(&t);
    assert!(out.contains("link-tc"), "{out}");
    assert!(detached(&t), "detach left a program attached");
    assert!(!t.pin_dir.exists(), "detach left {}", t.pin_dir.display());
    assert!(detach(&t).contains("nothing pinned"));
    // And a fresh start works again.
    t.start_daemon();
    let r = t.request_all(&t.clients4, vip4());
    assert!(r.iter().all(|(_, r)| r.is_ok()), "{r:?}");
}

#[test]
fn keep_on_exit_leaves_xdp_serving_and_detach_refuses_while_a_daemon_runs() {
    let t = started(4, 9, 1);
    let (ok, _, err) = cli(&t, &["detach", "--pin-dir", t.pin_dir.to_str().unwrap()]);
    assert!(!ok, "detach ran under a live daemon");
    assert!(
        err.contains("a running daemon owns what is pinned"),
        "{err}"
    );
    t.stop_daemon();
    t.start_daemon_with(&["--keep-on-exit"]);
    t.stop_daemon();
    assert_eq!(attached(&t), [true; 3], "--keep-on-exit detached");
    let r = t.request_all(&t.clients4, vip4());
    assert!(r.iter().all(|(_, r)| r.is_ok()), "{r:?}");
    detach(&t);
    assert!(detached(&t));
}

/// `ambassador ARGS... --state-dir STATE` run in the lb namespace: (success, stdout, stderr).
fn cli(t: &Topology, args: &[&str]) -> (bool, String, String) {
    let out =
        t.lb.command(ambassador_bin().to_str().unwrap())
            .args(args)
            .arg("--state-dir")
            .arg(t.state_dir())
            .output()
            .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn backend<'a>(st: &'a serde_json::Value, service: &str, name: &str) -> &'a serde_json::Value {
    st["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == service)
        .and_then(|s| {
            s["backends"]
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["name"] == name)
        })
        .unwrap_or_else(|| panic!("no {service}/{name} in {st:#}"))
}

fn count(results: &[(IpAddr, Result<String, String>)], name: &str) -> usize {
    results
        .iter()
        .filter(|(_, r)| r.as_ref().is_ok_and(|b| b.starts_with(name)))
        .count()
}

#[test]
fn drain_takes_no_new_flows_keeps_open_ones_and_status_shows_them_fall_to_zero() {
    let t = started(100, 1, 1);
    let _in = t.client.enter();
    let mut conns: Vec<(KeepAlive, String)> = t.clients4[..20]
        .iter()
        .map(|&c| {
            let mut k = KeepAlive::open(c, vip4()).unwrap();
            let b = k.get().unwrap();
            (k, b)
        })
        .collect();
    let on_exp = conns
        .iter()
        .filter(|(_, b)| b.starts_with("experiment"))
        .count();
    let on_web = conns.len() - on_exp;
    assert!(
        on_exp >= 3 && on_web >= 3,
        "uneven start: {on_exp} on experiment"
    );

    let (ok, out, err) = cli(&t, &["drain", "frontend", "experiment"]);
    assert!(ok, "drain failed: {err}");
    assert!(out.contains("applied (generation 2)"), "{out}");
    // New connections, from every client (the streaming ones too, on new ports): none to
    // the drained backend.
    let after = t.request_all(&t.clients4, vip4());
    assert!(after.iter().all(|(_, r)| r.is_ok()), "a request failed");
    assert_eq!(
        count(&after, "experiment"),
        0,
        "a new flow went to the drained backend"
    );
    // Open connections on it continue.
    for (k, b) in conns.iter_mut() {
        assert_eq!(&k.get().expect("an open connection broke"), b);
    }
    std::thread::sleep(Duration::from_millis(300));
    let st = t.status();
    let exp = backend(&st, "frontend", "experiment");
    assert_eq!(exp["drained"], true, "{st:#}");
    assert_eq!(exp["open_flows"], on_exp as u64, "{st:#}");
    // Closed connections (the 100 requests above) are not counted open.
    assert_eq!(
        backend(&st, "frontend", "web")["open_flows"],
        on_web as u64,
        "{st:#}"
    );
    let (_, table, _) = cli(&t, &["status"]);
    assert!(table.contains("drained"), "{table}");

    // Close them: the drained backend's open flows fall to 0.
    conns.clear();
    ambassador_tests::topology::wait_for(Duration::from_secs(5), "open flows to fall to 0", || {
        backend(&t.status(), "frontend", "experiment")["open_flows"] == 0
    });

    let (ok, _, err) = cli(&t, &["undrain", "frontend", "experiment"]);
    assert!(ok, "undrain failed: {err}");
    let back = t.request_all(&t.clients4, vip4());
    let n = count(&back, "experiment");
    assert!(
        (30..=70).contains(&n),
        "{n}/100 on experiment after undrain"
    );
}

#[test]
fn set_weight_moves_new_flows_survives_a_restart_and_bad_requests_change_nothing() {
    let t = started(100, 1, 1);
    // Refusals name the problem and change nothing.
    for (args, want) in [
        (
            vec!["set-weight", "frontend", "nope", "3"],
            "has no backend \"nope\"; it has web, experiment (HTTP 404)",
        ),
        (
            vec!["set-weight", "nope", "web", "3"],
            "no service \"nope\"",
        ),
        (
            vec!["set-weight", "frontend", "web", "0"],
            "weight 0 is out of range: use 1 to 10000",
        ),
        (vec!["drain", "frontend", "nope"], "HTTP 404"),
    ] {
        let (ok, _, err) = cli(&t, &args);
        assert!(!ok, "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    assert_eq!(t.status()["generation"], 1);

    let (ok, _, err) = cli(&t, &["set-weight", "frontend", "experiment", "9"]);
    assert!(ok, "{err}");
    let r = t.request_all(&t.clients4, vip4());
    let n = count(&r, "experiment");
    assert!(n >= 80, "{n}/100 on experiment at weight 9:1");
    let st = t.status();
    assert_eq!(backend(&st, "frontend", "experiment")["weight"], 9);
    assert_eq!(st["generation"], 2);

    // /metrics over the admin socket, in Prometheus text.
    let sock = t.state_dir().join("admin.sock");
    let metrics = t.lb.sh(&format!(
        "curl -sf --unix-socket {} http://ambassador/metrics",
        sock.display()
    ));
    assert!(
        metrics.contains(
            r#"ambassador_backend_weight{service="frontend",backend="experiment",address="10.200.3.2:80"} 9"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            r#"ambassador_backend_new_flows_total{{service="frontend",backend="experiment",address="10.200.3.2:80"}} {n}"#
        )),
        "{metrics}"
    );
    let mode = std::fs::metadata(&sock).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(mode.permissions().mode() & 0o777, 0o600);

    // The override outlives the daemon.
    t.signal("KILL");
    t.wait_daemon_exit();
    t.start_daemon();
    let st = t.status();
    assert_eq!(
        backend(&st, "frontend", "experiment")["weight"],
        9,
        "{st:#}"
    );
    let r = t.request_all(&t.clients4, vip4());
    assert!(count(&r, "experiment") >= 80);
}

#[test]
fn tcp_admin_needs_its_token_and_answers_live_ready_and_config() {
    let t = Topology::new(4);
    t.write_config(&split_config(1, 1));
    let token = t.dir.join("token");
    std::fs::write(&token, "0123456789abcdef0123\n").unwrap();
    let admin = "127.0.0.1:9901";
    t.lb.ip("link set lo up");
    t.start_daemon_with(&[
        "--admin",
        admin,
        "--admin-token-file",
        token.to_str().unwrap(),
        "--log-format",
        "json",
    ]);
    // --log-format json: every log line is a JSON object with a message.
    let log = t.daemon_log();
    assert!(log.lines().count() >= 2, "{log}");
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(v["fields"]["message"].is_string(), "{line}");
    }
    let curl = |args: &str| {
        t.lb.sh(&format!("curl -s -o /dev/null -w '%{{http_code}}' {args}"))
    };
    assert_eq!(curl(&format!("http://{admin}/live")), "401");
    assert_eq!(
        curl(&format!(
            "-H 'Authorization: Bearer wrong' http://{admin}/ready"
        )),
        "401"
    );
    let auth = "-H 'Authorization: Bearer 0123456789abcdef0123'";
    assert_eq!(curl(&format!("{auth} http://{admin}/live")), "200");
    assert_eq!(curl(&format!("{auth} http://{admin}/ready")), "200");
    assert_eq!(curl(&format!("{auth} -X POST http://{admin}/live")), "405");
    assert_eq!(curl(&format!("{auth} http://{admin}/nope")), "404");
    assert_eq!(
        curl(&format!(
            "{auth} -X POST -d '{{\"service\":1}}' http://{admin}/drain"
        )),
        "400"
    );
    let config = t.lb.sh(&format!("curl -sf {auth} http://{admin}/config"));
    assert!(config.contains("name: experiment"), "{config}");
    // The CLI reaches it with the same token file; without it, it is refused.
    let (ok, _, err) = cli(&t, &["drain", "frontend", "web", "--admin", admin]);
    assert!(!ok && err.contains("HTTP 401"), "{err}");
    let (ok, _, err) = cli(
        &t,
        &[
            "drain",
            "frontend",
            "web",
            "--admin",
            admin,
            "--admin-token-file",
            token.to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(backend(&t.status(), "frontend", "web")["drained"], true);
    // `status` and `detach` reach the daemon the same way, with no state directory to read.
    let elsewhere = |args: &[&str]| {
        let out =
            t.lb.command(ambassador_bin().to_str().unwrap())
                .args(args)
                .args(["--admin", admin, "--admin-token-file"])
                .arg(&token)
                .args(["--state-dir", "/nonexistent/ambassador"])
                .output()
                .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = elsewhere(&["status", "--json"]);
    assert!(ok, "{err}");
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(backend(&st, "frontend", "web")["drained"], true, "{out}");
    assert_eq!(st["attachments"].as_array().map(Vec::len), Some(3), "{out}");
    let (ok, out, err) = elsewhere(&["status"]);
    assert!(ok && out.contains("TC on lbc, lbw, lbe"), "{out}{err}");
    let (ok, _, err) = elsewhere(&["detach", "--pin-dir", t.pin_dir.to_str().unwrap()]);
    assert!(!ok && err.contains("a running daemon answers at"), "{err}");
    assert!(
        t.pin_dir.exists(),
        "detach removed the pins of a running daemon"
    );
}

/// A 1:1 split with HTTP health checks (2 × 200 ms to fall), and each client's backend.
fn health_checked(n: usize) -> (Topology, std::collections::HashMap<IpAddr, String>) {
    let mut t = Topology::new(n);
    t.start_nginx(1);
    let cfg = split_config(1, 1).replacen(
        "    listen: 10.200.0.100:80/tcp\n",
        "    listen: 10.200.0.100:80/tcp\n    health: { check: http, path: /healthz, interval: 200ms, timeout: 150ms, fall: 2, rise: 2 }\n",
        1,
    );
    t.write_config(&cfg);
    t.start_daemon();
    let before: std::collections::HashMap<IpAddr, String> = t
        .request_all(&t.clients4, vip4())
        .into_iter()
        .map(|(c, r)| {
            (
                c,
                r.expect("request").split(' ').next().unwrap().to_string(),
            )
        })
        .collect();
    (t, before)
}

#[test]
fn an_unhealthy_backend_leaves_the_table_moving_only_its_clients_and_comes_back() {
    let (t, before) = health_checked(100);
    let on_exp: Vec<IpAddr> = before
        .iter()
        .filter(|(_, b)| *b == "experiment")
        .map(|(c, _)| *c)
        .collect();
    assert!(on_exp.len() >= 20, "{} on experiment", on_exp.len());
    let mut open = {
        let _in = t.client.enter();
        let mut k = KeepAlive::open(on_exp[0], vip4()).unwrap();
        assert!(k.get().unwrap().starts_with("experiment"));
        k
    };

    t.set_healthz("experiment", false);
    let health = |st: &serde_json::Value| backend(st, "frontend", "experiment")["health"].clone();
    ambassador_tests::topology::wait_for(Duration::from_secs(5), "experiment unhealthy", || {
        health(&t.status()) == "unhealthy"
    });
    let st = t.status();
    assert!(
        backend(&st, "frontend", "experiment")["health_reason"]
            .as_str()
            .unwrap()
            .contains("answered 503, expected 200"),
        "{st:#}"
    );
    let (_, table, _) = cli(&t, &["status"]);
    assert!(table.contains("DOWN"), "{table}");
    let down = t.request_all(&t.clients4, vip4());
    for (c, r) in &down {
        let b = r.as_ref().expect("request while a backend is down");
        assert!(b.starts_with("web"), "{c} sent to the unhealthy backend");
    }
    // The open connection to it continues (its flow is tracked).
    {
        let _in = t.client.enter();
        assert!(open
            .get()
            .expect("open connection broke")
            .starts_with("experiment"));
    }

    t.set_healthz("experiment", true);
    ambassador_tests::topology::wait_for(Duration::from_secs(5), "experiment healthy", || {
        health(&t.status()) == "healthy"
    });
    // The same table as before: every client is back where it was.
    let after = t.request_all(&t.clients4, vip4());
    for (c, r) in after {
        let b = r.expect("request");
        assert!(
            b.starts_with(&before[&c]),
            "{c} moved: {} then {b}",
            before[&c]
        );
    }
}

/// The dashboard's DOM after its script ran, from headless Chromium inside the lb namespace.
fn dashboard_dom(t: &Topology, url: &str) -> String {
    let profile = t.dir.join(format!("chromium-{}", rand_suffix()));
    let out =
        t.lb.command("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--virtual-time-budget=4000",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(["--dump-dom", url])
            .output()
            .expect("chromium is missing: `cargo xtask setup` installs it");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// `data-share` of a backend's row in the dashboard DOM.
fn dom_share(dom: &str, service: &str, backend: &str) -> f64 {
    let table = dom
        .split(&format!("data-service=\"{service}\""))
        .nth(1)
        .unwrap_or_else(|| panic!("no table for {service} in:\n{dom}"));
    let row = table
        .split(&format!("data-backend=\"{backend}\""))
        .nth(1)
        .unwrap_or_else(|| panic!("no row for {backend} in:\n{dom}"));
    let v = row.split("data-share=\"").nth(1).unwrap();
    v[..v.find('"').unwrap()].parse().unwrap()
}

#[test]
fn dashboard_shows_the_backends_and_their_shares_move_after_set_weight() {
    let mut t = Topology::new(100);
    t.start_nginx(1);
    t.write_config(&split_config(1, 1));
    let token = t.dir.join("token");
    std::fs::write(&token, "dashboard-token-0123456789\n").unwrap();
    t.lb.ip("link set lo up");
    let admin = "127.0.0.1:9902";
    let tok = token.to_str().unwrap();
    t.start_daemon_with(&["--admin", admin, "--admin-token-file", tok]);
    let url = format!("http://{admin}/#token=dashboard-token-0123456789");

    let r = t.request_all(&t.clients4, vip4());
    assert!(r.iter().all(|(_, r)| r.is_ok()));
    let dom = dashboard_dom(&t, &url);
    assert!(
        dom.contains("10.200.2.2:80") && dom.contains("10.200.3.2:80"),
        "{dom}"
    );
    let before = dom_share(&dom, "frontend", "experiment");
    assert!(
        (0.3..=0.7).contains(&before),
        "experiment share {before} at 1:1"
    );

    let (ok, _, err) = cli(
        &t,
        &[
            "set-weight",
            "frontend",
            "experiment",
            "9",
            "--admin",
            admin,
            "--admin-token-file",
            tok,
        ],
    );
    assert!(ok, "{err}");
    for _ in 0..2 {
        let r = t.request_all(&t.clients4, vip4());
        assert!(r.iter().all(|(_, r)| r.is_ok()));
    }
    // The admin API serves a report up to a second old: the rounds above can finish inside
    // the second the first page was drawn in. Look again until the report is newer.
    let deadline = Instant::now() + Duration::from_secs(5);
    let (dom, after) = loop {
        let dom = dashboard_dom(&t, &url);
        let after = dom_share(&dom, "frontend", "experiment");
        if after > before + 0.15 || Instant::now() > deadline {
            break (dom, after);
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(
        after > before + 0.15,
        "experiment's share did not move after set-weight: {before} then {after}"
    );
    // The weight column shows the new weight.
    let row = dom.split("data-backend=\"experiment\"").nth(1).unwrap();
    assert!(row.contains(">9</td>"), "{row}");
}

#[test]
fn the_kernel_programs_log_messages_reach_the_daemon_log_at_debug() {
    let mut t = Topology::new(4);
    t.start_nginx(1);
    t.write_config(&split_config(1, 1));
    t.start_daemon_env("RUST_LOG=info,ambassador::xdp=debug", &[]);
    // Nothing to pick from: the XDP program says so through aya-log.
    for b in ["web", "experiment"] {
        let (ok, _, err) = cli(&t, &["drain", "frontend", b]);
        assert!(ok, "{err}");
    }
    let r = {
        let _in = t.client.enter();
        http_get(t.clients4[0], vip4())
    };
    assert!(r.is_err(), "a request with every backend drained got {r:?}");
    ambassador_tests::topology::wait_for(Duration::from_secs(5), "the kernel's message", || {
        t.daemon_log()
            .contains("no backend for a new flow (all drained, unhealthy or removed?)")
    });
    let line = t
        .daemon_log()
        .lines()
        .find(|l| l.contains("no backend for a new flow"))
        .unwrap()
        .to_string();
    assert!(
        line.contains("DEBUG") && line.contains("service 0"),
        "{line}"
    );
}

#[test]
fn the_admin_socket_refuses_other_users() {
    ambassador_tests::require_root();
    let backend = ambassador_tests::local::HttpBackend::start("web");
    let port = ambassador_tests::local::free_port();
    let d = ambassador_tests::local::LocalDaemon::start(&format!(
        "services:\n  - name: web\n    listen: 127.0.0.1:{port}/tcp\n    split: {{ backends: [ {{ name: web, address: '{}' }} ] }}\n",
        backend.addr
    ));
    let sock = d.dir.path("state/admin.sock");
    let curl = |prefix: &[&str]| {
        std::process::Command::new(prefix[0])
            .args(&prefix[1..])
            .args([
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--unix-socket",
            ])
            .arg(&sock)
            .arg("http://ambassador/live")
            .output()
            .unwrap()
    };
    // The state dir is traversable by others here, so only the socket's own mode protects it.
    std::fs::set_permissions(
        d.dir.path("state"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(
        &d.dir.0,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let root = curl(&["env"]);
    assert_eq!(String::from_utf8_lossy(&root.stdout), "200");
    let nobody = curl(&[
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&nobody.stdout),
        "000",
        "another user reached the admin API"
    );
    assert!(!nobody.status.success());
    // And the refusal is the kernel's: permission denied on connect.
    let probe = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "curl",
            "-sS",
            "--unix-socket",
        ])
        .arg(&sock)
        .arg("http://ambassador/live")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&probe.stderr);
    assert!(
        err.contains("Permission denied") || err.contains("Couldn't connect"),
        "{err}"
    );
}

#[test]
fn a_backend_killed_under_load_moves_only_its_clients_and_the_rest_see_no_error() {
    let (t, before) = health_checked(60);
    let on = |name: &str| -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = before
            .iter()
            .filter(|(_, b)| *b == name)
            .map(|(c, _)| *c)
            .collect();
        v.sort();
        v
    };
    let (on_web, on_exp) = (on("web"), on("experiment"));
    assert!(
        on_web.len() >= 15 && on_exp.len() >= 15,
        "{} on web, {} on experiment",
        on_web.len(),
        on_exp.len()
    );

    let stop = AtomicBool::new(false);
    let start = Instant::now();
    // (client, ms since start, Ok(backend) | Err(reason)) for every new connection.
    let (log, streamed, exp_streams_broke, killed_at, unhealthy_at) = std::thread::scope(|s| {
        // Keep-alive connections from 10 clients of each backend, streaming the whole time.
        let streamer = s.spawn(|| {
            let _in = t.client.enter();
            let mut conns: Vec<(IpAddr, Option<KeepAlive>)> = on_web[..10]
                .iter()
                .chain(&on_exp[..10])
                .map(|&c| {
                    (
                        c,
                        Some(KeepAlive::open(c, vip4()).expect("open keep-alive")),
                    )
                })
                .collect();
            let (mut n, mut broke) = (0u64, 0usize);
            while !stop.load(Ordering::Relaxed) {
                for (c, k) in conns.iter_mut() {
                    let Some(conn) = k else { continue };
                    match conn.get() {
                        Ok(b) => {
                            assert!(b.starts_with(&before[c]), "keep-alive from {c} moved: {b}");
                            n += 1;
                        }
                        Err(e) => {
                            assert_eq!(
                                before[c], "experiment",
                                "keep-alive from {c} on web broke: {e}"
                            );
                            broke += 1;
                            *k = None;
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            (n, broke)
        });
        // New connections from every client in turn, 4 at a time.
        let churners: Vec<_> = (0..4)
            .map(|w| {
                let (t, stop) = (&t, &stop);
                s.spawn(move || {
                    let _in = t.client.enter();
                    let mut out = Vec::new();
                    let clients: Vec<IpAddr> =
                        t.clients4.iter().copied().skip(w).step_by(4).collect();
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let c = clients[i % clients.len()];
                        let r = http_get(c, vip4())
                            .map(|b| b.split(' ').next().unwrap_or("").to_string())
                            .map_err(|e| e.to_string());
                        out.push((c, start.elapsed().as_millis() as u64, r));
                        i += 1;
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    out
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(1500));
        let killed_at = start.elapsed().as_millis() as u64;
        t.kill_nginx("experiment");
        let health = || backend(&t.status(), "frontend", "experiment")["health"].clone();
        ambassador_tests::topology::wait_for(
            Duration::from_secs(5),
            "experiment unhealthy",
            || health() == "unhealthy",
        );
        let unhealthy_at = start.elapsed().as_millis() as u64;
        std::thread::sleep(Duration::from_millis(3000));
        stop.store(true, Ordering::Relaxed);
        let (n, broke) = streamer.join().unwrap();
        let log: Vec<_> = churners
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        (log, n, broke, killed_at, unhealthy_at)
    });

    // Clients of the surviving backend: every request answered, by the same backend.
    let web_log: Vec<_> = log.iter().filter(|(c, _, _)| before[c] == "web").collect();
    for (c, at, r) in &web_log {
        assert_eq!(r.as_deref(), Ok("web"), "{c} (on web) at {at} ms: {r:?}");
    }
    // Clients of the killed backend: failures only between the kill and a moment after the
    // health check took it out (the table then moves them); after that, all answered by web.
    let exp_log: Vec<_> = log
        .iter()
        .filter(|(c, _, _)| before[c] == "experiment")
        .collect();
    let failed: Vec<_> = exp_log.iter().filter(|(_, _, r)| r.is_err()).collect();
    for (c, at, r) in &exp_log {
        if *at < killed_at {
            assert_eq!(r.as_deref(), Ok("experiment"), "{c} before the kill: {r:?}");
        } else if *at > unhealthy_at + 500 {
            assert_eq!(
                r.as_deref(),
                Ok("web"),
                "{c} at {at} ms, after the move: {r:?}"
            );
        }
    }
    assert!(
        failed
            .iter()
            .all(|(_, at, _)| *at + 50 >= killed_at && *at <= unhealthy_at + 500),
        "failures outside the window {killed_at}..{} ms: {failed:?}",
        unhealthy_at + 500
    );
    assert_eq!(
        exp_streams_broke, 10,
        "the killed backend's keep-alives did not all break"
    );
    assert!(
        web_log.len() > 200 && streamed > 200,
        "too little load: {} new, {streamed} streamed",
        web_log.len()
    );
    println!(
        "reliability: a_backend_killed_under_load_moves_only_its_clients_and_the_rest_see_no_error: XDP path, {} clients, experiment's nginx SIGKILLed under load: the other backend's clients made {} new connections and {streamed} keep-alive requests with 0 errors; the killed backend's clients failed {} of {} requests, the last {} ms after the kill (health check: 2 × 200 ms), then moved to web",
        t.clients4.len(),
        web_log.len(),
        failed.len(),
        exp_log.len(),
        failed.iter().map(|(_, at, _)| *at).max().unwrap_or(killed_at).saturating_sub(killed_at)
    );
}
