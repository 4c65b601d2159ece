//! `cargo xtask bench gitsync`: time from `git push` returning to the tree being published
//! (the link flipped) and to the post-publish hook being done, for a 1,000-file repository:
//! pushes that change every file (the worst case), and pushes that change 10 files (a typical
//! push, where gitsync hard-links the 990 others from the published tree).
//!
//! Modes, one run: `gitsync --period 1s`; `gitsync` with its webhook called right after the
//! push; and the peer, the book's sidecar loop (`while true; do git pull; sleep 1; done`),
//! timed to the pulled tree showing the new version. Goal: webhook push-to-published < 300 ms.
//! The remote lives on tmpfs (it is another machine's disk in production); the trees are on
//! the node's disk. Each log line of the sidecar splits a publish into fetch, checkout and
//! pre-publish time.

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use ambassador_tests::{
    git::{git, http, versioned_files, Repo, Sidecar},
    local::TempDir,
};

const FILES: usize = 1_000;
const PUSHES: u32 = 10;

struct Times {
    published: Vec<Duration>,
    hooked: Vec<Duration>,
    /// The disk's floor: `git archive | tar -x` of the same commit into the same filesystem.
    floor: Vec<Duration>,
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    false
}

fn published(root: &Path) -> Option<String> {
    std::fs::read_link(root.join("current"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

fn archive_floor(repo: &Repo, commit: &str, base: &Path) -> Duration {
    let out = TempDir::new_in(base, "bench-floor");
    let start = Instant::now();
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "git --git-dir {} archive {commit} | tar -x -C {}",
            repo.bare.display(),
            out.0.display()
        ))
        .status()
        .unwrap()
        .success();
    assert!(ok, "git archive | tar failed");
    start.elapsed()
}

/// The repository at `version` when a push changes only `changed` files (and VERSION).
fn files_at(version: u32, changed: usize) -> Vec<(String, String)> {
    let mut f = versioned_files(FILES, 0);
    for (i, (name, text)) in f.iter_mut().enumerate() {
        if i < changed || name == "VERSION" {
            *text = if name == "VERSION" {
                format!("{version}\n")
            } else {
                format!("version {version}\n")
            };
        }
    }
    f
}

fn run_gitsync(
    repo: &Repo,
    version: &mut u32,
    webhook: bool,
    changed: usize,
    base: &Path,
) -> Times {
    let dir = TempDir::new_in(base, "bench-gitsync");
    let root = dir.path("app");
    let posted = dir.path("posted");
    let period = if webhook { "1h" } else { "1s" };
    let sc = Sidecar::start(
        &repo.bare,
        &root,
        &[
            "--period",
            period,
            "--post-publish",
            &format!("echo $GITSYNC_COMMIT > {}", posted.display()),
        ],
    );
    let head = git(&repo.work, &["rev-parse", "HEAD"]);
    assert!(
        wait_until(Duration::from_secs(30), || published(&root).as_deref()
            == Some(&head)),
        "first publish: {}",
        sc.log()
    );
    let mut t = Times {
        published: Vec::new(),
        hooked: Vec::new(),
        floor: Vec::new(),
    };
    for _ in 0..PUSHES {
        *version += 1;
        let c = repo.commit_tree(&files_at(*version, changed), "bench");
        repo.push();
        let start = Instant::now();
        if webhook {
            assert_eq!(http(sc.listen, "POST", "/sync", &[]).0, 202);
        }
        assert!(
            wait_until(Duration::from_secs(30), || published(&root).as_deref()
                == Some(&c)),
            "not published: {}",
            sc.log()
        );
        t.published.push(start.elapsed());
        assert!(
            wait_until(Duration::from_secs(30), || std::fs::read_to_string(&posted)
                .is_ok_and(|s| s.trim() == c)),
            "post-publish hook not done: {}",
            sc.log()
        );
        t.hooked.push(start.elapsed());
        std::thread::sleep(Duration::from_millis(300));
        t.floor.push(archive_floor(repo, &c, base));
        // Pushes a second apart (plus a drift, so the poller's phase varies): still far
        // more often than real pushes, and it lets the disk settle between checkouts.
        std::thread::sleep(Duration::from_millis(1137));
    }
    let phases: Vec<String> = sc
        .log()
        .lines()
        .filter_map(|l| l.split_once("fetch_ms=").map(|(_, r)| r.to_string()))
        .collect();
    println!(
        "  sidecar phases ({}): fetch_ms={}",
        if webhook { "webhook" } else { "poll" },
        phases.join(" | fetch_ms=")
    );
    t
}

/// The book's sidecar: a clone and `while true; do git pull; sleep 1; done`.
fn run_book_loop(repo: &Repo, version: &mut u32) -> Vec<Duration> {
    let dir = TempDir::new("bench-gitpull");
    let clone = dir.path("clone");
    git(
        &dir.0,
        &["clone", "--quiet", repo.bare.to_str().unwrap(), "clone"],
    );
    let mut child: Child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && while true; do git pull --quiet --ff-only; sleep 1; done",
            clone.display()
        ))
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let version_of = |p: &PathBuf| {
        std::fs::read_to_string(p.join("VERSION"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
    };
    let mut out = Vec::new();
    for _ in 0..PUSHES {
        *version += 1;
        let v = *version;
        repo.commit_tree(&files_at(v, FILES), "bench");
        repo.push();
        let start = Instant::now();
        assert!(wait_until(Duration::from_secs(30), || version_of(&clone) == Some(v)));
        out.push(start.elapsed());
        std::thread::sleep(Duration::from_millis(1137));
    }
    let _ = Command::new("kill")
        .arg("--")
        .arg(format!("-{}", child.id()))
        .status();
    let _ = child.wait();
    out
}

fn median(v: &[Duration]) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    s[s.len() / 2]
}

fn max(v: &[Duration]) -> Duration {
    v.iter().copied().max().unwrap_or_default()
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    ambassador_tests::require_root();
    // The remote (and the clone that pushes to it) on tmpfs: a real remote's disk is not the
    // node's; the synced trees are on the node's disk as in production.
    let repo = Repo::new_in(Path::new("/dev/shm"));
    let mut version = 0;
    repo.commit_tree(&files_at(version, FILES), "v0");
    repo.push();
    println!("gitsync bench: {FILES}-file repository, {PUSHES} pushes per mode\n");
    let disk = std::env::temp_dir();
    let shm = Path::new("/dev/shm");
    let polled = run_gitsync(&repo, &mut version, false, FILES, &disk);
    let hooked = run_gitsync(&repo, &mut version, true, FILES, &disk);
    let hooked_mem = run_gitsync(&repo, &mut version, true, FILES, shm);
    // The typical push: from a tree whose other 990 files are already what they will stay.
    version += 1;
    repo.commit_tree(&files_at(version, 10), "baseline");
    repo.push();
    let few = run_gitsync(&repo, &mut version, true, 10, &disk);
    let book = run_book_loop(&repo, &mut version);
    println!(
        "\n{:<40} {:>14} {:>14} {:>18} {:>18} {:>16}",
        "mode",
        "published p50",
        "published max",
        "post-hook done p50",
        "post-hook done max",
        "disk floor p50"
    );
    for (name, t) in [
        ("--period 1s, all files changed, disk", &polled),
        ("webhook, all files changed, disk", &hooked),
        ("webhook, all files changed, tmpfs", &hooked_mem),
        ("webhook, 10 files changed, disk", &few),
    ] {
        println!(
            "{:<40} {:>14} {:>14} {:>18} {:>18} {:>16}",
            name,
            ms(median(&t.published)),
            ms(max(&t.published)),
            ms(median(&t.hooked)),
            ms(max(&t.hooked)),
            ms(median(&t.floor))
        );
    }
    println!(
        "{:<40} {:>14} {:>14} {:>18} {:>18} {:>16}",
        "peer: book loop (git pull; sleep 1)",
        ms(median(&book)),
        ms(max(&book)),
        "-",
        "-",
        "-"
    );
    let goal = Duration::from_millis(300);
    let web = median(&hooked.published);
    for (name, t) in [
        ("all files changed, root on disk", &hooked),
        ("all files changed, root on tmpfs", &hooked_mem),
        ("10 files changed, root on disk", &few),
    ] {
        let p50 = median(&t.published);
        println!(
            "webhook push-to-published, {name}: {} median, {} max (goal < {}): {}; writing the tree alone (git archive | tar) takes {} there, gitsync {} {}",
            ms(p50),
            ms(max(&t.published)),
            ms(goal),
            if p50 < goal { "met" } else { "MISSED" },
            ms(median(&t.floor)),
            if p50 > median(&t.floor) { "adds" } else { "saves" },
            ms(if p50 > median(&t.floor) {
                p50 - median(&t.floor)
            } else {
                median(&t.floor) - p50
            })
        );
    }
    println!(
        "ratio, book loop / gitsync webhook (median time to new tree): {:.1}x",
        median(&book).as_secs_f64() / web.as_secs_f64()
    );
    println!(
        "ratio, book loop / gitsync --period 1s: {:.2}x (both poll every second; the book's loop exposes half-written trees)",
        median(&book).as_secs_f64() / median(&polled.published).as_secs_f64()
    );
}
