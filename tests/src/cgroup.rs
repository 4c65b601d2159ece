//! A cgroup v2 directory for a test (the connect-time ambassador attaches to one).

use std::{path::PathBuf, process::Command};

use crate::netns::sh;

/// A cgroup v2 directory for this test: under an existing cgroup2 mount, or a fresh mount
/// (these machines mount only v1 hierarchies), removed on drop.
pub struct Cgroup {
    pub dir: PathBuf,
    mount: Option<PathBuf>,
}

impl Cgroup {
    pub fn create() -> Cgroup {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
        let existing = mounts
            .lines()
            .find(|l| l.split_whitespace().nth(2) == Some("cgroup2"))
            .map(|l| PathBuf::from(l.split_whitespace().nth(1).unwrap()));
        let (root, mount) = match existing {
            Some(r) => (r, None),
            None => {
                let m = std::env::temp_dir().join(format!("amb-cg2-{}", std::process::id()));
                std::fs::create_dir_all(&m).unwrap();
                let out = Command::new("mount")
                    .args(["-t", "cgroup2", "none"])
                    .arg(&m)
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "cannot mount cgroup2 (the kernel needs CONFIG_CGROUPS with cgroup v2): {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                (m.clone(), Some(m))
            }
        };
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = root.join(format!(
            "amb-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Cgroup { dir, mount }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
        if let Some(m) = &self.mount {
            sh(&format!("umount {} ; rmdir {}", m.display(), m.display()));
        }
    }
}
