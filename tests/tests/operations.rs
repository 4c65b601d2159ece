//! Operating the daemon on a node: it can die or be upgraded under traffic without breaking a
//! flow, and what it pinned is checked before it is adopted and removed by `detach`.

use std::{
    net::{IpAddr, SocketAddr},
    process::Command,
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

/// Whether the lb namespace's veths have an XDP program attached.
fn xdp_attached(t: &Topology) -> [bool; 3] {
    ["lbc", "lbw", "lbe"].map(|dev| t.lb.ip(&format!("link show {dev}")).contains("prog/xdp"))
}

fn detach(t: &Topology) -> String {
    let out = Command::new(ambassador_bin())
        .args(["detach", "--pin-dir"])
        .arg(&t.pin_dir)
        .arg("--state-dir")
        .arg(t.state_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "detach failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
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
            xdp_attached(&t),
            [true; 3],
            "XDP left an interface with the daemon"
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
    // A graceful stop detaches and removes the pins.
    t.stop_daemon();
    assert_eq!(
        xdp_attached(&t),
        [false; 3],
        "XDP still attached after SIGTERM"
    );
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
    // Refused starts touched nothing: XDP still forwards with the killed daemon's state.
    assert_eq!(xdp_attached(&t), [true; 3]);
    let r = t.request_all(&t.clients4, vip4());
    assert!(r.iter().all(|(_, r)| r.is_ok()), "{r:?}");

    let out = detach(&t);
    assert!(out.contains("link-xdp-lbc"), "{out}");
    assert_eq!(xdp_attached(&t), [false; 3], "detach left XDP attached");
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
    let out = Command::new(ambassador_bin())
        .args(["detach", "--pin-dir"])
        .arg(&t.pin_dir)
        .arg("--state-dir")
        .arg(t.state_dir())
        .output()
        .unwrap();
    assert!(!out.status.success(), "detach ran under a live daemon");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("a running daemon owns what is pinned"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.stop_daemon();
    t.start_daemon_with(&["--keep-on-exit"]);
    t.stop_daemon();
    assert_eq!(xdp_attached(&t), [true; 3], "--keep-on-exit detached");
    let r = t.request_all(&t.clients4, vip4());
    assert!(r.iter().all(|(_, r)| r.is_ok()), "{r:?}");
    detach(&t);
    assert_eq!(xdp_attached(&t), [false; 3]);
}
