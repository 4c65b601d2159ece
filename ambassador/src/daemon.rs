//! `ambassador run`: load, attach, program, then keep the kernel in step with the config file
//! (SIGHUP or a change on disk). A rejected config is logged and the running one keeps serving.

use std::{
    io::Write as _,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::programs::XdpMode;
use serde::{Deserialize, Serialize};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use crate::{
    config::Config,
    dataplane::{
        kernel::{check_interface, preflight, Ids, KernelDataplane},
        Plan,
    },
};

pub const DEFAULT_STATE_DIR: &str = "/run/ambassador";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/ambassador";

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub config: PathBuf,
    pub interfaces: Vec<String>,
    pub xdp_mode: Option<XdpMode>,
    pub state_dir: PathBuf,
    pub pin_dir: PathBuf,
}

/// What the daemon publishes in `STATE_DIR/state.json` for `status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct State {
    pub pid: u32,
    pub config_path: PathBuf,
    pub pin_dir: PathBuf,
    pub interfaces: Vec<String>,
    /// Incremented on every applied config.
    pub generation: u64,
    /// The config being served.
    pub config: Config,
    pub ids: Ids,
    /// The last rejected config's error, cleared by the next good one.
    pub last_error: Option<String>,
}

impl State {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("state.json")
    }

    pub fn read(state_dir: &Path) -> Result<State> {
        let p = State::path(state_dir);
        let text = std::fs::read_to_string(&p).map_err(|e| {
            anyhow!(
                "no running ambassador found ({}: {e}); start one with `ambassador run`",
                p.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
    }

    fn write(&self, state_dir: &Path) -> Result<()> {
        let p = State::path(state_dir);
        let tmp = p.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, &p).with_context(|| format!("writing {}", p.display()))
    }
}

/// An exclusive lock on the state directory: one daemon per node.
struct PidLock {
    _file: std::fs::File,
    path: PathBuf,
}

impl PidLock {
    fn take(state_dir: &Path) -> Result<PidLock> {
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("creating {}", state_dir.display()))?;
        let path = state_dir.join("ambassador.pid");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let other = std::fs::read_to_string(&path).unwrap_or_default();
            bail!(
                "another ambassador is running (pid {}); stop it first or use another --state-dir",
                other.trim()
            );
        }
        f.set_len(0)?;
        writeln!(f, "{}", std::process::id())?;
        Ok(PidLock { _file: f, path })
    }
}

impl Drop for PidLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

pub async fn run(opts: RunOptions) -> Result<()> {
    let cfg = Config::load(&opts.config).map_err(|e| anyhow!("{e}"))?;
    preflight(&opts.pin_dir)?;
    let interfaces = if opts.interfaces.is_empty() {
        cfg.interfaces.clone()
    } else {
        opts.interfaces.clone()
    };
    if interfaces.is_empty() {
        bail!(
            "no interface to attach to: list them under `interfaces:` in {} or pass --interface IF",
            opts.config.display()
        );
    }
    for iface in &interfaces {
        check_interface(iface)?;
    }
    let _lock = PidLock::take(&opts.state_dir)?;
    let mut dp = KernelDataplane::load()?;
    dp.pin_maps(&opts.pin_dir)?;
    let ids = dp.apply(&Plan::build(&cfg))?;
    for iface in &interfaces {
        dp.attach(iface, opts.xdp_mode)?;
    }
    let mut state = State {
        pid: std::process::id(),
        config_path: opts.config.clone(),
        pin_dir: opts.pin_dir.clone(),
        interfaces: interfaces.clone(),
        generation: 1,
        config: cfg,
        ids,
        last_error: None,
    };
    state.write(&opts.state_dir)?;
    info!(
        services = state.config.services.len(),
        interfaces = ?interfaces,
        "serving {}",
        opts.config.display()
    );

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut changes = watch(&opts.config)?;
    let mut last_text = std::fs::read(&opts.config).ok();
    loop {
        tokio::select! {
            _ = hup.recv() => reload(&mut dp, &mut state, &opts, "SIGHUP", &mut last_text, true),
            Some(()) = changes.recv() => {
                // Let a burst of writes (editors, ConfigMap symlink swaps) settle.
                tokio::time::sleep(Duration::from_millis(150)).await;
                while changes.try_recv().is_ok() {}
                reload(&mut dp, &mut state, &opts, "file changed", &mut last_text, false);
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    info!("shutting down: detaching XDP");
    let _ = std::fs::remove_file(State::path(&opts.state_dir));
    drop(dp);
    Ok(())
}

fn reload(
    dp: &mut KernelDataplane,
    state: &mut State,
    opts: &RunOptions,
    why: &str,
    last_text: &mut Option<Vec<u8>>,
    always: bool,
) {
    let text = std::fs::read(&opts.config).ok();
    if !always && text == *last_text {
        return;
    }
    *last_text = text;
    match Config::load(&opts.config) {
        Err(e) => {
            error!(
                reason = why,
                "config rejected, still serving generation {}: {e}", state.generation
            );
            state.last_error = Some(e.to_string());
        }
        Ok(cfg) => {
            if !cfg.interfaces.is_empty()
                && opts.interfaces.is_empty()
                && cfg.interfaces != state.interfaces
            {
                warn!("`interfaces` changed; attaching to new interfaces takes a restart");
            }
            match dp.apply(&Plan::build(&cfg)) {
                Ok(ids) => {
                    state.generation += 1;
                    state.config = cfg;
                    state.ids = ids;
                    state.last_error = None;
                    info!(
                        reason = why,
                        generation = state.generation,
                        "config applied"
                    );
                }
                Err(e) => {
                    error!(reason = why, "programming the kernel failed: {e:#}");
                    state.last_error = Some(format!("{e:#}"));
                }
            }
        }
    }
    if let Err(e) = state.write(&opts.state_dir) {
        warn!("could not write state: {e:#}");
    }
}

/// Events for the config file. The directory is watched, not the file, so atomic renames and
/// symlink swaps (Kubernetes ConfigMap volumes) are seen.
fn watch(path: &Path) -> Result<tokio::sync::mpsc::UnboundedReceiver<()>> {
    use notify::{RecursiveMode, Watcher as _};
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_owned();
    let mut w = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if ev.is_ok() {
            let _ = tx.send(());
        }
    })?;
    w.watch(&dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", dir.display()))?;
    // The watcher lives as long as the daemon.
    std::mem::forget(w);
    Ok(rx)
}
