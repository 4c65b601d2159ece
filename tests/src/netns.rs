//! Network namespaces owned by a test: created with `ip netns add`, removed on drop.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

static NEXT: AtomicU32 = AtomicU32::new(0);
static REAPED: std::sync::Once = std::sync::Once::new();

/// Remove namespaces left by test processes that died before their cleanup ran (their names
/// carry the pid that created them).
fn reap_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let pid = name
            .strip_prefix("amb-")
            .and_then(|rest| rest.split('-').nth(1));
        if let Some(pid) = pid.and_then(|p| p.parse::<u32>().ok()) {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = Command::new("sh")
                    .arg("-c")
                    .arg(format!(
                        "ip netns pids {name} | xargs -r kill -9; ip netns del {name}"
                    ))
                    .output();
            }
        }
    }
}

pub struct Netns {
    pub name: String,
}

fn check(what: &str, out: std::io::Result<Output>) -> String {
    let out = out.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run a shell command on the host, panicking with its output on failure.
pub fn sh(cmd: &str) -> String {
    check(cmd, Command::new("sh").arg("-c").arg(cmd).output())
}

impl Netns {
    /// A fresh namespace with loopback up; `tag` goes into its name to make leftovers obvious.
    pub fn new(tag: &str) -> Netns {
        REAPED.call_once(reap_stale);
        let name = format!(
            "amb-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        sh(&format!("ip netns add {name}"));
        let ns = Netns { name };
        ns.ip("link set lo up");
        ns
    }

    /// `ip -n NAME ARGS`.
    pub fn ip(&self, args: &str) -> String {
        sh(&format!("ip -n {} {args}", self.name))
    }

    /// A shell command inside the namespace (host mounts kept, so bpffs stays visible).
    pub fn sh(&self, cmd: &str) -> String {
        check(cmd, self.command("sh").arg("-c").arg(cmd).output())
    }

    /// A command that will run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.name))
            .arg(program);
        c
    }

    /// Start a background process inside the namespace, its output to `log`.
    pub fn spawn(&self, cmd: &str, log: &std::path::Path) -> Child {
        spawn_logged(
            &format!("nsenter --net=/run/netns/{} {cmd}", self.name),
            log,
        )
    }

    /// Move the calling thread into the namespace until the guard drops.
    pub fn enter(&self) -> Entered {
        let own = File::open("/proc/thread-self/ns/net").expect("own netns");
        let target = File::open(format!("/run/netns/{}", self.name)).expect("netns file");
        // SAFETY: setns on fds we own; it only affects this thread.
        let rc = unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns into {}", self.name);
        Entered { own }
    }
}

/// Start `cmd` (a shell command line) in the background, stdout and stderr to `log`.
pub fn spawn_logged(cmd: &str, log: &std::path::Path) -> Child {
    let f = File::create(log).expect("log file");
    Command::new("sh")
        .arg("-c")
        .arg(format!("exec {cmd}"))
        .stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd}: {e}"))
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Processes still inside would keep interfaces alive; kill them first.
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ip netns pids {0} | xargs -r kill -9; ip netns del {0}",
                self.name
            ))
            .output();
    }
}

pub struct Entered {
    own: File,
}

impl Drop for Entered {
    fn drop(&mut self) {
        // SAFETY: returning this thread to the namespace it came from.
        unsafe { libc::setns(self.own.as_raw_fd(), libc::CLONE_NEWNET) };
    }
}

/// A veth pair `a` (in `ns_a`) — `b` (in `ns_b`), both up.
pub fn veth(ns_a: &Netns, a: &str, ns_b: &Netns, b: &str) {
    ns_a.ip(&format!(
        "link add {a} type veth peer name {b} netns {}",
        ns_b.name
    ));
    ns_a.ip(&format!("link set {a} up"));
    ns_b.ip(&format!("link set {b} up"));
}
