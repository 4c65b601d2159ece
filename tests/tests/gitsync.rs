//! The git-push PaaS sidecar with real repositories: commits pushed to a bare remote during a
//! tight read loop over the published path; failing hooks; bad remotes; push-time validation.

use std::{
    collections::HashSet,
    path::Path,
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use ambassador_tests::{
    ambassador_bin,
    git::{git, try_git, versioned_files, Repo, Sidecar},
    local::{free_port, TempDir},
    topology::wait_for,
};

/// Read every file of the tree `current` resolves to (resolving it once, as a well-behaved
/// reader does) and return the version they share, or panic describing the mix.
fn read_tree(root: &Path, files: usize) -> Option<u32> {
    let tree = std::fs::canonicalize(root.join("current")).ok()?;
    let version: u32 = std::fs::read_to_string(tree.join("VERSION"))
        .ok()?
        .trim()
        .parse()
        .unwrap();
    let mut n = 0;
    for d in std::fs::read_dir(&tree).unwrap() {
        let d = d.unwrap().path();
        if !d.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(&d).unwrap() {
            let text = std::fs::read_to_string(f.unwrap().path()).unwrap();
            assert_eq!(
                text,
                format!("version {version}\n"),
                "mixed tree in {}",
                tree.display()
            );
            n += 1;
        }
    }
    assert_eq!(n, files, "partial tree in {}", tree.display());
    Some(version)
}

#[test]
fn readers_never_see_a_mixed_or_partial_tree() {
    const FILES: usize = 300;
    let repo = Repo::new();
    let first = repo.commit_tree(&versioned_files(FILES, 0), "v0");
    repo.push();
    let dir = TempDir::new("gitsync-read");
    let root = dir.path("app");
    let sc = Sidecar::start(&repo.bare, &root, &["--period", "30s", "--keep", "3"]);
    // Not ready before the first publish would be racy to observe; after it, it must be.
    sc.wait_published(&first);
    assert_eq!(sc.http("GET", "/ready").0, 200);

    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (stop, reads, seen, root) =
                (stop.clone(), reads.clone(), seen.clone(), root.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    // A tree removed under a reader after 3 newer publishes would be a
                    // failure of `keep`, not of atomicity; the pushes below are spaced so
                    // that cannot happen while one read is in flight.
                    if let Some(v) = read_tree(&root, FILES) {
                        seen.lock().unwrap().insert(v);
                        reads.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let mut last = first;
    for v in 1..=8 {
        last = repo.commit_tree(&versioned_files(FILES, v), &format!("v{v}"));
        repo.push();
        // The webhook: sync now rather than at the 30 s poll.
        assert_eq!(sc.http("POST", "/sync").0, 202);
        sc.wait_published(&last);
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().expect("a reader saw a mixed or partial tree");
    }
    let seen = seen.lock().unwrap().clone();
    let reads = reads.load(Ordering::Relaxed);
    println!("{reads} whole-tree reads, versions seen {seen:?}");
    assert!(reads > 50, "the readers barely ran: {reads} reads");
    assert!(seen.len() >= 5, "readers saw too few versions: {seen:?}");

    // Old trees are pruned to `keep` (3), the published one included.
    let trees: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().len() == 40)
        .collect();
    assert_eq!(trees.len(), 3, "trees kept: {trees:?}");
    let st = sc.status();
    assert_eq!(st["published"], last.as_str());
    assert_eq!(st["publishes"], 9);
    assert_eq!(st["consecutive_failures"], 0);
    let (_, metrics) = sc.http("GET", "/metrics");
    assert!(
        metrics.contains("ambassador_gitsync_publishes_total{job=\"app\"} 9"),
        "{metrics}"
    );
    assert!(metrics.contains(&format!("commit=\"{last}\"")));
}

#[test]
fn a_failing_pre_publish_hook_keeps_the_old_tree() {
    let repo = Repo::new();
    let good = |v: u32| {
        let mut f = versioned_files(5, v);
        f.push(("ok".into(), String::new()));
        f
    };
    let c1 = repo.commit_tree(&good(1), "good");
    repo.push();
    let dir = TempDir::new("gitsync-hook");
    let root = dir.path("app");
    let posted = dir.path("post.log");
    let sc = Sidecar::start(
        &repo.bare,
        &root,
        &[
            "--period",
            "200ms",
            "--hook-retries",
            "1",
            "--pre-publish",
            "test -f ok || { echo 'make check: no ok file' >&2; exit 1; }",
            "--post-publish",
            &format!("echo $GITSYNC_COMMIT >> {}", posted.display()),
        ],
    );
    sc.wait_published(&c1);

    let c2 = repo.commit_tree(&versioned_files(5, 2), "broken: no ok file");
    repo.push();
    wait_for(Duration::from_secs(20), "the rejection of c2", || {
        sc.status()["rejected"] == c2.as_str()
    });
    assert_eq!(sc.published().as_deref(), Some(c1.as_str()));
    assert_eq!(
        sc.http("GET", "/ready").0,
        200,
        "still ready: the old tree serves"
    );
    let st = sc.status();
    assert!(st["consecutive_failures"].as_u64().unwrap() >= 1, "{st}");
    assert!(
        st["last_error"].as_str().unwrap().contains("no ok file"),
        "{st}"
    );
    assert!(!root.join(&c2).exists(), "the rejected tree is removed");
    // Polling does not retry a rejected commit: the hook ran twice (1 retry) for it, once.
    std::thread::sleep(Duration::from_millis(800));
    let rejections = sc
        .log()
        .matches("not published, the previous tree stays")
        .count();
    assert_eq!(rejections, 1, "{}", sc.log());

    let c3 = repo.commit_tree(&good(3), "fixed");
    repo.push();
    sc.wait_published(&c3);
    wait_for(
        Duration::from_secs(10),
        "the post-publish hook of c3",
        || {
            std::fs::read_to_string(&posted)
                .unwrap_or_default()
                .contains(&c3)
        },
    );
    let log = std::fs::read_to_string(&posted).unwrap();
    assert_eq!(
        log,
        format!("{c1}\n{c3}\n"),
        "post-publish ran once per published commit"
    );
    assert_eq!(sc.status()["consecutive_failures"], 0);
}

#[test]
fn bad_remotes_and_force_pushes_leave_the_published_tree_intact() {
    // An unreachable remote with nothing published: `--once` fails naming the reason.
    let dir = TempDir::new("gitsync-bad");
    let out = Command::new(ambassador_bin())
        .args(["gitsync", "--once", "--repo"])
        .arg(dir.path("nowhere.git"))
        .arg("--root")
        .arg(dir.path("never"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("nothing published") && err.contains("nowhere.git"),
        "{err}"
    );
    assert!(!dir.path("never/current").exists());

    // Bad flags are refused before anything runs.
    let out = Command::new(ambassador_bin())
        .args(["gitsync", "--repo", "x", "--root"])
        .arg(dir.path("r"))
        .args(["--keep", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("keep"));

    let repo = Repo::new();
    let c1 = repo.commit_tree(&versioned_files(3, 1), "one");
    repo.push();
    let c2 = repo.commit_tree(&versioned_files(3, 2), "two");
    repo.push();
    let root = dir.path("app");
    let sc = Sidecar::start(&repo.bare, &root, &["--period", "200ms"]);
    sc.wait_published(&c2);

    // A force-push rewinding main to a new commit on top of c1 is followed.
    git(&repo.work, &["reset", "--quiet", "--hard", &c1]);
    let c3 = repo.commit_tree(&versioned_files(3, 3), "rewritten");
    repo.push();
    sc.wait_published(&c3);

    // The remote goes away: failures are counted and reported, the tree stays published
    // and readable, the sidecar stays ready.
    let moved = repo.dir.path("moved.git");
    std::fs::rename(&repo.bare, &moved).unwrap();
    wait_for(Duration::from_secs(10), "failures to be reported", || {
        sc.status()["consecutive_failures"].as_u64().unwrap_or(0) >= 2
    });
    assert_eq!(sc.published().as_deref(), Some(c3.as_str()));
    assert_eq!(read_tree(&root, 3), Some(3));
    assert_eq!(sc.http("GET", "/ready").0, 200);
    assert!(sc.log().contains("sync failed, the published tree stays"));
    // Back again: the next sync succeeds without a restart (the backoff is bounded).
    std::fs::rename(&moved, &repo.bare).unwrap();
    let c4 = repo.commit_tree(&versioned_files(3, 4), "back");
    repo.push();
    sc.http("POST", "/sync");
    sc.wait_published(&c4);
}

#[test]
fn a_submodule_does_not_break_the_sync() {
    // A gitlink whose submodule URL points nowhere: the tree is published without it.
    let repo = Repo::new();
    let sub = Repo::new();
    let sc1 = sub.commit_tree(&versioned_files(1, 1), "sub");
    sub.push();
    repo.commit_tree(&versioned_files(2, 1), "main");
    git(
        &repo.work,
        &[
            "-c",
            "protocol.file.allow=always",
            "submodule",
            "add",
            "--quiet",
            sub.bare.to_str().unwrap(),
            "vendor/lib",
        ],
    );
    std::fs::write(
        repo.work.join(".gitmodules"),
        "[submodule \"vendor/lib\"]\n\tpath = vendor/lib\n\turl = /nonexistent/lib.git\n",
    )
    .unwrap();
    git(
        &repo.work,
        &["commit", "--quiet", "-am", "broken submodule"],
    );
    let head = git(&repo.work, &["rev-parse", "HEAD"]);
    repo.push();
    let dir = TempDir::new("gitsync-sub");
    let root = dir.path("app");
    let sc = Sidecar::start(&repo.bare, &root, &["--period", "1s"]);
    sc.wait_published(&head);
    assert!(root.join("current/VERSION").is_file());
    assert!(
        root.join("current/vendor/lib").is_dir(),
        "the gitlink is an empty directory"
    );
    let _ = sc1;
}

#[test]
fn serve_refuses_a_push_whose_config_fails_check() {
    let dir = TempDir::new("gitsync-serve");
    let bare = dir.path("cfg.git");
    let port = free_port();
    let mut server = Command::new(ambassador_bin())
        .args(["gitsync", "serve", "--dir"])
        .arg(&bare)
        .args([
            "--check-config",
            "ambassador.yaml",
            "--validate",
            "test ! -e BROKEN",
        ])
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .stderr(std::fs::File::create(dir.path("serve.log")).unwrap())
        .spawn()
        .unwrap();
    wait_for(Duration::from_secs(10), "git daemon", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let url = format!("git://127.0.0.1:{port}/cfg.git");
    let work = dir.path("work");
    git(
        &dir.0,
        &["init", "--quiet", "--initial-branch=main", "work"],
    );
    let config = |weight: u32| {
        format!(
            "services:\n  - name: frontend\n    listen: 127.0.0.1:18080/tcp\n    split:\n      key: src-ip\n      backends:\n        - {{ name: web, address: 127.0.0.1:18081, weight: {weight} }}\n"
        )
    };
    std::fs::write(work.join("ambassador.yaml"), config(9)).unwrap();
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "--quiet", "-m", "good"]);
    git(&work, &["push", "--quiet", &url, "HEAD:main"]);
    let good = git(&work, &["rev-parse", "HEAD"]);
    assert_eq!(git(&bare, &["rev-parse", "main"]), good);

    // A weight over the maximum fails `check`: the push is refused with the reason.
    std::fs::write(work.join("ambassador.yaml"), config(99_999)).unwrap();
    git(&work, &["commit", "--quiet", "-am", "bad weight"]);
    let out = try_git(&work, &["push", &url, "HEAD:main"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a broken config was accepted: {err}");
    assert!(
        err.contains("refusing refs/heads/main") && err.contains("weight"),
        "{err}"
    );
    assert_eq!(
        git(&bare, &["rev-parse", "main"]),
        good,
        "the ref did not move"
    );

    // The --validate command refuses too.
    std::fs::write(work.join("ambassador.yaml"), config(5)).unwrap();
    std::fs::write(work.join("BROKEN"), "").unwrap();
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "--quiet", "-m", "validate fails"]);
    let out = try_git(&work, &["push", &url, "HEAD:main"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("test ! -e BROKEN"));
    git(&work, &["rm", "--quiet", "BROKEN"]);
    git(&work, &["commit", "--quiet", "-m", "fixed"]);
    git(&work, &["push", "--quiet", &url, "HEAD:main"]);
    assert_eq!(
        git(&bare, &["rev-parse", "main"]),
        git(&work, &["rev-parse", "HEAD"])
    );
    // A sidecar syncs from the served repository over git://.
    let out = Command::new(ambassador_bin())
        .args(["gitsync", "--once", "--repo", &url, "--root"])
        .arg(dir.path("synced"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_link(dir.path("synced/current"))
            .unwrap()
            .to_string_lossy(),
        git(&work, &["rev-parse", "HEAD"])
    );
    // SIGTERM stops the git daemon with it (no listener left behind).
    ambassador_tests::netns::sh(&format!("kill -TERM {}", server.id()));
    let _ = server.wait();
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "git daemon outlived serve"
    );
}

#[test]
fn a_pushed_weight_change_changes_the_kernel_split_and_a_broken_push_is_ignored() {
    use ambassador_tests::topology::{share, split_config, Topology, VIP4};
    let vip: std::net::SocketAddr = format!("{VIP4}:80").parse().unwrap();
    let mut t = Topology::new(100);
    t.start_nginx(1);
    let repo = Repo::new();
    let yaml = |text: String| vec![("ambassador.yaml".to_string(), text)];
    repo.commit_tree(&yaml(split_config(9, 1)), "90/10");
    repo.push();
    t.start_daemon_from_git(&repo.bare, &["--config-git-period", "300ms"]);
    let before = t.request_all(&t.clients4, vip);
    let web = share(&before, "web");
    assert!(
        (0.8..=0.97).contains(&web),
        "web got {:.0}% before",
        web * 100.0
    );

    // A broken config pushed to a remote without a pre-receive check: ignored with an
    // error, generation 1 keeps serving.
    let broken = repo.commit_tree(
        &yaml(split_config(9, 1).replace("weight: 1", "wieght: 1")),
        "typo",
    );
    repo.push();
    wait_for(
        Duration::from_secs(20),
        "the broken commit to be refused",
        || t.status()["gitsync"][0]["rejected"] == broken.as_str(),
    );
    let st = t.status();
    assert_eq!(st["generation"], 1);
    assert!(
        st["gitsync"][0]["last_error"]
            .as_str()
            .unwrap()
            .contains("wieght"),
        "{st}"
    );

    // The fix flips the split to 10/90: applied from git, measured in the kernel's choices.
    let fixed = repo.commit_tree(&yaml(split_config(1, 9)), "flip to 10/90");
    repo.push();
    wait_for(
        Duration::from_secs(20),
        "the pushed config to be applied",
        || t.status()["generation"] == 2,
    );
    let st = t.status();
    assert_eq!(st["gitsync"][0]["published"], fixed.as_str());
    assert!(st["last_error"].is_null(), "{st}");
    assert!(t.daemon_log().contains("git commit"), "{}", t.daemon_log());
    let after = t.request_all(&t.clients4, vip);
    assert!(
        after.iter().all(|(_, r)| r.is_ok()),
        "requests failed after the change"
    );
    let web = share(&after, "web");
    assert!(
        (0.03..=0.2).contains(&web),
        "web got {:.0}% after",
        web * 100.0
    );
}

#[test]
fn the_daemon_runs_the_gitsync_jobs_of_its_config_and_rejects_bad_ones() {
    use ambassador_tests::local::LocalDaemon;
    let repo = Repo::new();
    let c1 = repo.commit_tree(&versioned_files(4, 1), "one");
    repo.push();
    let dir = TempDir::new("gitsync-daemon");
    let root = dir.path("site");
    let port = free_port();
    let yaml = format!(
        "services:\n  - name: web\n    listen: 127.0.0.1:{port}/tcp\n    split:\n      key: src-ip\n      backends:\n        - {{ name: a, address: 127.0.0.1:9, weight: 1 }}\ngitsync:\n  - name: site\n    repo: {}\n    root: {}\n    period: 200ms\n    post_publish: {{ command: 'echo $GITSYNC_COMMIT > ../posted' }}\n",
        repo.bare.display(),
        root.display()
    );
    let d = LocalDaemon::start(&yaml);
    wait_for(Duration::from_secs(20), "the job's first publish", || {
        std::fs::read_link(root.join("current")).is_ok_and(|p| p.to_string_lossy() == c1)
    });
    let c2 = repo.commit_tree(&versioned_files(4, 2), "two");
    repo.push();
    wait_for(Duration::from_secs(20), "the push to be published", || {
        std::fs::read_to_string(root.join("posted")).is_ok_and(|s| s.trim() == c2)
    });
    // `status` reads what the daemon writes each second.
    wait_for(Duration::from_secs(5), "status to show the job", || {
        d.status()["gitsync"][0]["published"] == c2.as_str()
    });
    assert_eq!(d.status()["gitsync"][0]["name"], "site");

    // A job with a bad setting is a config error naming the key; nothing else changes.
    std::fs::write(
        d.config_path(),
        yaml.replace("period: 200ms", "period: 200ms\n    keep: 0"),
    )
    .unwrap();
    d.signal("HUP");
    wait_for(Duration::from_secs(10), "the rejection", || {
        d.status()["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("gitsync[0].keep"))
    });
    assert_eq!(d.status()["generation"], 1);
}

/// A one-request-at-a-time HTTP server recording each POST body; `up` controls whether it
/// answers 200 or 503.
struct Receiver {
    addr: std::net::SocketAddr,
    bodies: Arc<Mutex<Vec<String>>>,
    up: Arc<AtomicBool>,
}

impl Receiver {
    fn start() -> Receiver {
        use std::io::{Read as _, Write as _};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let up = Arc::new(AtomicBool::new(true));
        let (b, u) = (bodies.clone(), up.clone());
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let mut buf = vec![0u8; 8192];
                let mut got = 0;
                // Headers and the small JSON body arrive together or soon after.
                s.set_read_timeout(Some(Duration::from_millis(300)))
                    .unwrap();
                while let Ok(n) = s.read(&mut buf[got..]) {
                    if n == 0 {
                        break;
                    }
                    got += n;
                    let text = String::from_utf8_lossy(&buf[..got]).to_string();
                    if let Some((_, body)) = text.split_once("\r\n\r\n") {
                        if body.ends_with('}') {
                            break;
                        }
                    }
                }
                let text = String::from_utf8_lossy(&buf[..got]).to_string();
                let ok = u.load(Ordering::Relaxed);
                if ok {
                    if let Some((_, body)) = text.split_once("\r\n\r\n") {
                        b.lock().unwrap().push(body.to_string());
                    }
                }
                let status = if ok {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                };
                let _ = s.write_all(
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .as_bytes(),
                );
            }
        });
        Receiver { addr, bodies, up }
    }
}

#[test]
fn post_publish_signals_and_http_calls_and_an_unfinished_hook_runs_again_at_start() {
    let repo = Repo::new();
    let c1 = repo.commit_tree(&versioned_files(2, 1), "one");
    repo.push();
    let dir = TempDir::new("gitsync-post");

    // A signal to the process in a pid file.
    let hups = dir.path("hups");
    let mut app = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "trap 'echo hup >> {}' HUP; echo $$ > {}; while true; do sleep 0.05; done",
            hups.display(),
            dir.path("app.pid").display()
        ))
        .spawn()
        .unwrap();
    wait_for(Duration::from_secs(5), "the app's pid file", || {
        dir.path("app.pid").exists()
    });
    let pid_file = dir.path("app.pid");
    let sc = Sidecar::start(
        &repo.bare,
        &dir.path("sig"),
        &[
            "--period",
            "200ms",
            "--post-publish-signal",
            "HUP",
            "--pid-file",
            pid_file.to_str().unwrap(),
        ],
    );
    sc.wait_published(&c1);
    wait_for(Duration::from_secs(5), "SIGHUP to reach the app", || {
        std::fs::read_to_string(&hups).is_ok_and(|s| s.lines().count() == 1)
    });
    drop(sc);
    let _ = app.kill();
    let _ = app.wait();

    // An HTTP call; while the receiver fails, the hook fails (the tree is published all the
    // same) and a restarted sidecar calls again for the published commit.
    let rx = Receiver::start();
    rx.up.store(false, Ordering::Relaxed);
    let root = dir.path("http");
    let url = format!("http://{}/deployed", rx.addr);
    let args = [
        "--period",
        "1h",
        "--hook-retries",
        "0",
        "--post-publish-http",
        url.as_str(),
    ];
    let sc = Sidecar::start(&repo.bare, &root, &args);
    sc.wait_published(&c1);
    wait_for(
        Duration::from_secs(10),
        "the failed hook to be logged",
        || sc.log().contains("post-publish hook failed"),
    );
    assert!(
        sc.status()["post_publish_done"].is_null(),
        "{}",
        sc.status()
    );
    drop(sc);
    rx.up.store(true, Ordering::Relaxed);
    let sc = Sidecar::start(&repo.bare, &root, &args);
    wait_for(
        Duration::from_secs(10),
        "the hook to run again at start",
        || rx.bodies.lock().unwrap().iter().any(|b| b.contains(&c1)),
    );
    wait_for(Duration::from_secs(5), "the hook to be recorded", || {
        sc.status()["post_publish_done"] == c1.as_str()
    });
    assert!(sc.log().contains("re-running the post-publish hook"));
    assert_eq!(
        rx.bodies.lock().unwrap().len(),
        1,
        "called once when it succeeded"
    );
}

#[test]
fn a_full_disk_fails_the_sync_and_keeps_the_published_tree() {
    let repo = Repo::new();
    let c1 = repo.commit_tree(&versioned_files(3, 1), "small");
    repo.push();
    let dir = TempDir::new("gitsync-full");
    let root = dir.path("app");
    std::fs::create_dir_all(&root).unwrap();
    // A 2 MiB filesystem: the mirror and one small tree fit, a 3 MiB file does not.
    ambassador_tests::netns::sh(&format!(
        "mount -t tmpfs -o size=2m gitsync-full {}",
        root.display()
    ));
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _m = Unmount(root.clone());
    let sc = Sidecar::start(&repo.bare, &root, &["--period", "300ms"]);
    sc.wait_published(&c1);
    let mut files = versioned_files(3, 2);
    let big: String = (0..3 * 1024 * 1024 / 64)
        .map(|i| format!("{i:063x}\n"))
        .collect();
    files.push(("big.bin".into(), big));
    repo.commit_tree(&files, "too big");
    repo.push();
    wait_for(
        Duration::from_secs(20),
        "the failure to be reported",
        || sc.status()["consecutive_failures"].as_u64().unwrap_or(0) >= 1,
    );
    let st = sc.status();
    let err = st["last_error"].as_str().unwrap_or_default().to_lowercase();
    assert!(err.contains("space") || err.contains("quota"), "{st}");
    assert_eq!(sc.published().as_deref(), Some(c1.as_str()));
    assert_eq!(read_tree(&root, 3), Some(1));
    // Nothing half-written is left to fill the disk for the next sync.
    let leftovers: Vec<_> = std::fs::read_dir(root.join(".gitsync"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // Space again: a smaller commit publishes.
    let c3 = repo.commit_tree(&versioned_files(3, 3), "small again");
    repo.push();
    sc.wait_published(&c3);
}

#[test]
fn unchanged_files_are_hard_linked_from_the_published_tree_unless_a_hook_could_edit_them() {
    use std::os::unix::fs::MetadataExt as _;
    let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
    let files = |changed: &str| {
        let mut f = versioned_files(50, 1);
        f.push(("bin/run.sh".into(), "#!/bin/sh\necho run\n".into()));
        f.push(("changed.txt".into(), changed.into()));
        f
    };
    let repo = Repo::new();
    repo.commit_tree(&files("one\n"), "one");
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(
        repo.work.join("bin/run.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    git(
        &repo.work,
        &["commit", "--quiet", "-a", "--amend", "--no-edit"],
    );
    let c1 = git(&repo.work, &["rev-parse", "HEAD"]);
    repo.push();
    let dir = TempDir::new("gitsync-reuse");
    let root = dir.path("app");
    let sc = Sidecar::start(&repo.bare, &root, &["--period", "200ms"]);
    sc.wait_published(&c1);

    // A push that changes one file: the rest are the published tree's own inodes.
    std::fs::write(repo.work.join("changed.txt"), "two\n").unwrap();
    git(&repo.work, &["commit", "--quiet", "-am", "two"]);
    let c2 = git(&repo.work, &["rev-parse", "HEAD"]);
    repo.push();
    sc.wait_published(&c2);
    let (t1, t2) = (root.join(&c1), root.join(&c2));
    for f in ["d3/f13.txt", "VERSION", "bin/run.sh"] {
        assert_eq!(ino(&t1.join(f)), ino(&t2.join(f)), "{f} was not linked");
    }
    assert_ne!(ino(&t1.join("changed.txt")), ino(&t2.join("changed.txt")));
    assert_eq!(
        std::fs::read_to_string(t2.join("changed.txt")).unwrap(),
        "two\n"
    );
    assert_eq!(
        std::fs::read_to_string(t1.join("changed.txt")).unwrap(),
        "one\n"
    );
    assert_ne!(
        std::fs::metadata(t2.join("bin/run.sh"))
            .unwrap()
            .permissions()
            .mode()
            & 0o111,
        0,
        "the exec bit is kept"
    );
    // The log says how many were linked.
    sc.wait_log("linked=52");

    // A published file edited in place (a different size) is not trusted: written anew.
    std::fs::write(t2.join("VERSION"), "tampered with\n").unwrap();
    std::fs::write(repo.work.join("changed.txt"), "three\n").unwrap();
    git(&repo.work, &["commit", "--quiet", "-am", "three"]);
    let c3 = git(&repo.work, &["rev-parse", "HEAD"]);
    repo.push();
    sc.wait_published(&c3);
    let t3 = root.join(&c3);
    assert_eq!(std::fs::read_to_string(t3.join("VERSION")).unwrap(), "1\n");
    assert_ne!(ino(&t2.join("VERSION")), ino(&t3.join("VERSION")));
    assert_eq!(ino(&t2.join("d3/f13.txt")), ino(&t3.join("d3/f13.txt")));
    drop(sc);

    // With a pre-publish hook, which may edit the new tree, every file is written.
    let root = dir.path("hooked");
    let sc = Sidecar::start(
        &repo.bare,
        &root,
        &["--period", "200ms", "--pre-publish", "true"],
    );
    sc.wait_published(&c3);
    std::fs::write(repo.work.join("changed.txt"), "four\n").unwrap();
    git(&repo.work, &["commit", "--quiet", "-am", "four"]);
    let c4 = git(&repo.work, &["rev-parse", "HEAD"]);
    repo.push();
    sc.wait_published(&c4);
    assert_ne!(
        ino(&root.join(&c3).join("d3/f13.txt")),
        ino(&root.join(&c4).join("d3/f13.txt")),
        "linked although a pre-publish hook could edit the tree"
    );
}
