//! Test harness: network namespaces the tests create and remove, packet construction with
//! etherparse (independent of the code under test), and the real `ambassador` binary.

pub mod bench;
pub mod cgroup;
pub mod dnsmasq;
pub mod fixture;
pub mod git;
pub mod local;
pub mod netns;
pub mod packets;
pub mod pki;
pub mod topology;

use std::path::PathBuf;

/// The `ambassador` binary built alongside the tests (same profile).
pub fn ambassador_bin() -> PathBuf {
    let mut p = std::env::current_exe().expect("test binary path");
    p.pop();
    if p.ends_with("deps") {
        p.pop();
    }
    let bin = p.join("ambassador");
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build -p ambassador`, or `cargo xtask test`)",
        bin.display()
    );
    bin
}

/// Remove what a test process that died (a timeout's kill, say) left pinned in bpffs:
/// `/sys/fs/bpf/amb-test-PID-N` of a PID that no longer runs. Its pinned XDP links would keep
/// their programs and maps (a 262,144-entry flow table each) loaded until the next reboot.
pub fn sweep_stale_pins() {
    let Ok(dir) = std::fs::read_dir("/sys/fs/bpf") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("amb-test-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Fail with a message naming the missing kernel feature or privilege, never skip.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "these tests load BPF programs and create network namespaces: run them as root"
    );
    if !std::path::Path::new("/sys/fs/bpf").join(".").exists() {
        panic!("/sys/fs/bpf is missing: this kernel lacks bpffs (CONFIG_BPF_SYSCALL)");
    }
}
