//! Real git repositories for the gitsync tests: a bare "remote" on disk, a working clone that
//! commits and pushes with the git CLI, and a `gitsync` sidecar process.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use crate::{ambassador_bin, local::TempDir, topology::wait_for};

/// Run git with a fixed identity and no user config; panics with its stderr on failure.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = try_git(dir, args);
    assert!(
        out.status.success(),
        "git {args:?} in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub fn try_git(dir: &Path, args: &[&str]) -> Output {
    Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_NAME", "test")
        .env("GIT_AUTHOR_EMAIL", "test@example.invalid")
        .env("GIT_COMMITTER_NAME", "test")
        .env("GIT_COMMITTER_EMAIL", "test@example.invalid")
        .output()
        .expect("running git (setup installs it)")
}

/// A bare remote and a working clone of it.
pub struct Repo {
    pub dir: TempDir,
    pub bare: PathBuf,
    pub work: PathBuf,
}

impl Repo {
    pub fn new() -> Repo {
        Self::new_in(&std::env::temp_dir())
    }

    /// In `base` (a bench puts the remote on tmpfs: a real remote's disk is not the node's).
    pub fn new_in(base: &Path) -> Repo {
        let dir = TempDir::new_in(base, "git");
        let bare = dir.path("remote.git");
        let work = dir.path("work");
        git(
            &dir.0,
            &[
                "init",
                "--bare",
                "--quiet",
                "--initial-branch=main",
                "remote.git",
            ],
        );
        git(
            &dir.0,
            &["init", "--quiet", "--initial-branch=main", "work"],
        );
        git(&work, &["remote", "add", "origin", bare.to_str().unwrap()]);
        Repo { dir, bare, work }
    }

    /// Write files (path, content) into the working tree, replacing everything else except
    /// `.git`, commit them and return the commit.
    pub fn commit_tree(&self, files: &[(String, String)], msg: &str) -> String {
        for e in std::fs::read_dir(&self.work).unwrap() {
            let e = e.unwrap();
            if e.file_name() != ".git" {
                let p = e.path();
                if p.is_dir() {
                    std::fs::remove_dir_all(p).unwrap();
                } else {
                    std::fs::remove_file(p).unwrap();
                }
            }
        }
        for (name, text) in files {
            let p = self.work.join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        git(&self.work, &["add", "-A"]);
        git(
            &self.work,
            &["commit", "--quiet", "--allow-empty", "-m", msg],
        );
        git(&self.work, &["rev-parse", "HEAD"])
    }

    pub fn push(&self) {
        git(
            &self.work,
            &["push", "--quiet", "--force", "origin", "HEAD:main"],
        );
    }
}

impl Default for Repo {
    fn default() -> Self {
        Repo::new()
    }
}

/// `n` files in nested directories, each holding `version`: a reader can tell a mixed tree.
pub fn versioned_files(n: usize, version: u32) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            (
                format!("d{}/f{i}.txt", i % 10),
                format!("version {version}\n"),
            )
        })
        .chain(std::iter::once((
            "VERSION".to_string(),
            format!("{version}\n"),
        )))
        .collect()
}

/// A `gitsync` sidecar process serving its webhook and status on loopback.
pub struct Sidecar {
    child: Child,
    pub root: PathBuf,
    pub listen: SocketAddr,
    pub log: PathBuf,
}

impl Sidecar {
    pub fn start(repo: &Path, root: &Path, extra: &[&str]) -> Sidecar {
        let listen: SocketAddr = format!("127.0.0.1:{}", crate::local::free_port())
            .parse()
            .unwrap();
        let log = root.with_extension("log");
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new(ambassador_bin())
            .arg("gitsync")
            .arg("--repo")
            .arg(repo)
            .arg("--root")
            .arg(root)
            .arg("--listen")
            .arg(listen.to_string())
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        let s = Sidecar {
            child,
            root: root.to_owned(),
            listen,
            log,
        };
        wait_for(Duration::from_secs(10), "the gitsync listener", || {
            TcpStream::connect(listen).is_ok()
        });
        s
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait for a log line: a publish is seen (the link flipped) before its line is logged.
    pub fn wait_log(&self, needle: &str) {
        wait_for(
            Duration::from_secs(10),
            &format!("log line `{needle}`"),
            || self.log().contains(needle),
        );
    }

    /// (status code, body) of a request to the sidecar.
    pub fn http(&self, method: &str, path: &str) -> (u16, String) {
        http(self.listen, method, path, &[])
    }

    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.http("GET", "/status").1).unwrap()
    }

    /// The commit `current` points at.
    pub fn published(&self) -> Option<String> {
        std::fs::read_link(self.root.join("current"))
            .ok()
            .map(|p| p.to_string_lossy().into_owned())
    }

    pub fn wait_published(&self, commit: &str) {
        wait_for(
            Duration::from_secs(20),
            &format!("{commit} to be published"),
            || self.published().as_deref() == Some(commit),
        );
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A bare HTTP/1.1 request; returns the status and body.
pub fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 0\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (code, body.to_string())
}
