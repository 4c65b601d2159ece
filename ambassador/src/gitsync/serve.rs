//! Push mode (the Dokku way): `ambassador gitsync serve` hosts a bare repository whose
//! pre-receive hook checks out each pushed commit and validates it, so a broken push is
//! refused at `git push` and never reaches the servers that sync from it.

use std::{
    io::BufRead as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use tracing::info;

/// What the hook checks, kept in the repository (`ambassador-gitsync.json`) so the hook script
/// itself is only `exec ambassador gitsync pre-receive`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Validation {
    /// Shell command run in the checked-out commit; non-zero refuses the push.
    pub validate: Option<String>,
    /// An ambassador config inside the repository (e.g. `ambassador.yaml`) that must pass
    /// `ambassador check`.
    pub check_config: Option<PathBuf>,
    #[serde(with = "crate::config::duration")]
    pub timeout: Duration,
}

const SETTINGS: &str = "ambassador-gitsync.json";

/// Create the bare repository (if new) and install the hook and its settings.
pub fn install(dir: &Path, v: &Validation) -> Result<()> {
    if !dir.join("HEAD").is_file() {
        let out = std::process::Command::new("git")
            .args(["init", "--bare", "--quiet", "--initial-branch=main"])
            .arg(dir)
            .output()
            .context("running git init (is git installed?)")?;
        if !out.status.success() {
            bail!(
                "git init {}: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    std::fs::write(dir.join(SETTINGS), serde_json::to_vec_pretty(v)?)?;
    let exe = std::env::current_exe().context("locating the ambassador binary")?;
    let hook = dir.join("hooks").join("pre-receive");
    std::fs::create_dir_all(hook.parent().expect("has a parent"))?;
    let script = format!(
        "#!/bin/sh\n# Installed by `ambassador gitsync serve`: refuses pushes that fail validation.\nexec '{}' gitsync pre-receive\n",
        exe.to_string_lossy().replace('\'', r"'\''")
    );
    std::fs::write(&hook, script)?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Serve the repository with `git daemon` (fetch and push) until SIGTERM or SIGINT.
/// `git daemon` has no authentication: it refuses non-loopback addresses here; for remote
/// pushes, use ssh to the same repository (the hook runs for every transport).
pub async fn serve(dir: &Path, v: &Validation, listen: SocketAddr) -> Result<()> {
    if !listen.ip().is_loopback() {
        bail!("`git daemon` has no authentication: listen on 127.0.0.1, and push over ssh to {} from elsewhere", dir.display());
    }
    install(dir, v)?;
    let dir = std::fs::canonicalize(dir)?;
    let base = dir
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent", dir.display()))?;
    let mut child = tokio::process::Command::new("git")
        .arg("daemon")
        .arg("--reuseaddr")
        .arg(format!("--listen={}", listen.ip()))
        .arg(format!("--port={}", listen.port()))
        .arg(format!("--base-path={}", base.display()))
        .args([
            "--export-all",
            "--enable=receive-pack",
            "--informative-errors",
        ])
        .arg(&dir)
        // `git daemon` runs git-daemon as a child: a group of their own stops both.
        .process_group(0)
        .kill_on_drop(true)
        .stdin(Stdio::null())
        .spawn()
        .context("starting git daemon")?;
    let group = child.id().map(|p| nix::unistd::Pid::from_raw(p as i32));
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    info!(
        "serving git://{listen}/{name} (push validates with {:?}, config {:?})",
        v.validate, v.check_config
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        st = child.wait() => bail!("git daemon exited: {}", st?),
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    if let Some(g) = group {
        let _ = nix::sys::signal::killpg(g, nix::sys::signal::Signal::SIGTERM);
    }
    let _ = child.wait().await;
    Ok(())
}

/// The hook: git runs it in the repository with the pushed objects in quarantine and one
/// `old new ref` line per updated ref on stdin. Exits non-zero (refusing the whole push) when
/// any new commit fails; git relays our stderr to the pusher.
pub fn pre_receive() -> Result<bool> {
    let v: Validation = serde_json::from_slice(
        &std::fs::read(SETTINGS).with_context(|| format!("reading {SETTINGS}"))?,
    )?;
    let mut ok = true;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let parts: Vec<&str> = line.split_whitespace().collect();
        let [_old, new, refname] = parts[..] else {
            bail!("unexpected hook input `{line}`");
        };
        if new.bytes().all(|b| b == b'0') {
            continue; // a deletion: nothing to validate
        }
        match check(&v, new, refname) {
            Ok(()) => eprintln!("ambassador: {refname} {} passed validation", &new[..12]),
            Err(e) => {
                eprintln!("ambassador: refusing {refname} at {}: {e:#}", &new[..12]);
                ok = false;
            }
        }
    }
    Ok(ok)
}

/// Extract a pushed commit with `git archive | tar`: during pre-receive the pushed objects are
/// in git's quarantine directory, which git finds through its environment and gix 0.90 does
/// not read (gitsync's own checkouts use gix).
fn export(commit: &str, dest: &Path) -> Result<()> {
    std::fs::create_dir_all(dest)?;
    let mut archive = std::process::Command::new("git")
        .args(["archive", "--format=tar", commit])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running git archive")?;
    let tar = std::process::Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(dest)
        .stdin(archive.stdout.take().expect("piped"))
        .output()
        .context("running tar")?;
    let out = archive.wait_with_output()?;
    if !out.status.success() || !tar.status.success() {
        bail!(
            "extracting {commit}: {}{}",
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&tar.stderr).trim()
        );
    }
    Ok(())
}

fn check(v: &Validation, commit: &str, refname: &str) -> Result<()> {
    let tmp = std::env::temp_dir().join(format!(
        "ambassador-pre-receive-{}-{}",
        std::process::id(),
        &commit[..12]
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    let res = (|| {
        export(commit, &tmp)?;
        if let Some(p) = &v.check_config {
            crate::config::Config::load(&tmp.join(p)).map_err(|e| anyhow!("{e}"))?;
        }
        if let Some(cmd) = &v.validate {
            let spec: super::Spec = serde_json::from_value(serde_json::json!({
                "name": "pre-receive", "repo": ".", "root": ".", "ref": refname,
                "hook_retries": 0, "hook_timeout": humantime::format_duration(v.timeout).to_string(),
            }))?;
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(super::hooks::pre_publish(&spec, cmd, &tmp, commit))?;
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    res
}
