//! `ambassador run`: load, attach, program, then keep the data planes in step with the config
//! file (SIGHUP or a change on disk) and the TLS files. A rejected config is logged and the
//! running one keeps serving. SIGTERM drains: stop accepting, let open connections finish.

use std::{
    collections::HashMap,
    io::Write as _,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::programs::XdpMode;
use serde::{Deserialize, Serialize};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use crate::{
    config::{AttachArg, Config, TlsConfig},
    dataplane::{
        attach::Attachment,
        kernel::{check_interface, preflight, Ids, KernelDataplane},
        userspace::{ServiceRuntime, UserspaceDataplane},
        Plan,
    },
    overrides::Overrides,
    tls::Sidecar,
};

pub const DEFAULT_STATE_DIR: &str = "/run/ambassador";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/ambassador";

/// Which data plane forwards plain services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataplaneMode {
    /// The kernel programs when they can be loaded and attached, else userspace (with a
    /// warning saying why).
    Auto,
    /// The kernel programs: XDP or TC on each interface (see `dataplane::attach`).
    #[serde(alias = "xdp")]
    Kernel,
    Userspace,
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub config: PathBuf,
    pub interfaces: Vec<String>,
    /// Which program goes on which interface, over the config's `attach:`.
    pub attach: Vec<AttachArg>,
    pub xdp_mode: Option<XdpMode>,
    pub dataplane: DataplaneMode,
    pub state_dir: PathBuf,
    pub pin_dir: PathBuf,
    /// The sharding services' stats port (bound when the config has `redis` services).
    pub stats_listen: SocketAddr,
    /// Worker threads of each userspace path (default: one per core).
    pub workers: Option<usize>,
    /// At exit, leave the XDP program attached and its maps pinned (for an upgrade: the next
    /// daemon adopts them) instead of detaching.
    pub keep_on_exit: bool,
    /// Entries of a new connection table (one per flow; two for a flow to a shared backend).
    pub flow_table_size: u32,
    /// The admin API's endpoint (default `STATE_DIR/admin.sock`).
    pub admin: Option<crate::admin::Endpoint>,
    /// The bearer token a TCP admin endpoint requires.
    pub admin_token: Option<String>,
    /// Take the config from git: `config` is then its path inside the repository, and each
    /// pushed commit whose config passes `check` is applied (others are refused and logged).
    pub config_git: Option<crate::gitsync::Spec>,
}

/// What the daemon publishes in `STATE_DIR/state.json` for `status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct State {
    pub pid: u32,
    pub config_path: PathBuf,
    /// `kernel` or `userspace`: who forwards plain services.
    pub dataplane: DataplaneMode,
    /// Where the kernel maps are pinned (kernel data plane only).
    pub pin_dir: Option<PathBuf>,
    pub interfaces: Vec<String>,
    /// Which program runs on each interface (kernel data plane only).
    #[serde(default)]
    pub attachments: Vec<Attachment>,
    /// Incremented on every applied config.
    pub generation: u64,
    /// The config being served.
    pub config: Config,
    pub ids: Ids,
    /// The last rejected config's (or certificate reload's) error, cleared by the next success.
    pub last_error: Option<String>,
    /// Counters of the userspace paths (TLS sidecar, userspace data plane), refreshed every second.
    #[serde(default)]
    pub userspace: Vec<(String, u64)>,
    /// The sharding services' stats, as twemproxy's stats port shows them.
    #[serde(default)]
    pub shards: serde_json::Value,
    /// Weights and drains set through the admin API, laid over `config`.
    #[serde(default)]
    pub overrides: Overrides,
    /// Health of the checked backends that failed at least once.
    #[serde(default)]
    pub health: Vec<crate::health::BackendHealth>,
    /// The git syncs this daemon runs: its config's repository and `gitsync:` jobs.
    #[serde(default)]
    pub gitsync: Vec<crate::gitsync::Status>,
    /// Brokered services: the endpoint set serving and whether it is stale.
    #[serde(default)]
    pub discovery: Vec<crate::discovery::DiscoveryStatus>,
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

/// Fails when a daemon holds `state_dir`: what it pinned is in use.
pub fn ensure_not_running(state_dir: &Path) -> Result<()> {
    if !state_dir.join("ambassador.pid").exists() {
        return Ok(());
    }
    PidLock::take(state_dir)
        .map(drop)
        .context("a running daemon owns what is pinned; stop it (it detaches at exit unless run with --keep-on-exit)")
}

impl Drop for PidLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Service addresses the userspace data plane listens on must be local; those that were not
/// are added to `lo` and removed again at exit (as kube-proxy's IPVS mode does with its dummy
/// interface). `ip` is used rather than a netlink crate: two commands, no new dependency.
#[derive(Default)]
struct LocalAddresses {
    added: Vec<IpAddr>,
}

impl LocalAddresses {
    fn ensure(&mut self, ip: IpAddr) -> Result<()> {
        if self.added.contains(&ip) || is_local(ip) {
            return Ok(());
        }
        let prefix = if ip.is_ipv4() { 32 } else { 128 };
        let mut cmd = std::process::Command::new("ip");
        if ip.is_ipv6() {
            cmd.arg("-6");
        }
        let out = cmd
            .args(["addr", "add", &format!("{ip}/{prefix}"), "dev", "lo"])
            .args(if ip.is_ipv6() {
                &["nodad"][..]
            } else {
                &[][..]
            })
            .output()
            .context("running `ip addr add` (iproute2)")?;
        if !out.status.success() {
            bail!(
                "service address {ip} is not local and could not be added to lo: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        info!(address = %ip, "added the service address to lo for the userspace data plane");
        self.added.push(ip);
        Ok(())
    }
}

impl Drop for LocalAddresses {
    fn drop(&mut self) {
        for ip in &self.added {
            let prefix = if ip.is_ipv4() { 32 } else { 128 };
            let _ = std::process::Command::new("ip")
                .args(["addr", "del", &format!("{ip}/{prefix}"), "dev", "lo"])
                .output();
        }
    }
}

fn is_local(ip: IpAddr) -> bool {
    // Binding succeeds only for local addresses (no IP_FREEBIND).
    std::net::TcpListener::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// Everything the daemon runs.
struct Daemon {
    opts: RunOptions,
    kernel: Option<KernelDataplane>,
    userspace: UserspaceDataplane,
    shards: crate::shard::proxy::Pools,
    /// The kernel object for the connect-time ambassador when XDP is not running.
    connect_kernel: Option<KernelDataplane>,
    /// cgroups the connect-time programs are attached to.
    attached: std::collections::HashSet<PathBuf>,
    started: std::time::Instant,
    sidecars: HashMap<(String, TlsConfig), Arc<Sidecar>>,
    local: LocalAddresses,
    health: crate::health::Monitor,
    /// The plan last applied: the next one's tables are derived from it.
    last_plan: Option<Plan>,
    /// The config's own repository (`--config-git`) and the config's `gitsync:` jobs.
    config_git: Option<Arc<crate::gitsync::Syncer>>,
    jobs: crate::gitsync::Jobs,
    discovery: crate::discovery::Manager,
    discovery_tx: tokio::sync::mpsc::UnboundedSender<crate::discovery::Update>,
    state: State,
}

impl Daemon {
    /// Build what a config needs in userspace (loading TLS files), reusing sidecars whose
    /// settings did not change so their session caches and tickets survive a reload.
    fn runtimes(&mut self, cfg: &Config, plan: &Plan) -> Result<Vec<ServiceRuntime>> {
        let all = self.kernel.is_none();
        let mut sidecars = HashMap::new();
        let mut out = Vec::new();
        for (s, p) in cfg.l4_services().zip(&plan.services) {
            if !(all || p.userspace) {
                continue;
            }
            let tls = match &s.tls {
                None => None,
                Some(t) => {
                    let k = (s.name.clone(), t.clone());
                    let sc = match self.sidecars.get(&k) {
                        Some(sc) => sc.clone(),
                        None => Arc::new(
                            Sidecar::load(t).with_context(|| format!("service {}: TLS", s.name))?,
                        ),
                    };
                    sidecars.insert(k, sc.clone());
                    Some(sc)
                }
            };
            self.local.ensure(s.listen.addr.ip())?;
            out.push(ServiceRuntime {
                plan: p.clone(),
                limits: s.limits,
                tls,
                redirect_http: s.tls.as_ref().and_then(|t| t.redirect_http),
            });
        }
        self.sidecars = sidecars;
        Ok(out)
    }

    /// Serve `cfg` with the runtime overrides laid over it.
    async fn apply(&mut self, cfg: &Config) -> Result<Ids> {
        ensure_fd_limit(cfg);
        let file_cfg = cfg;
        let effective = self
            .health
            .overlay(&self.state.overrides.overlay(&self.discovery.overlay(cfg)));
        let cfg = &effective;
        let plan = Plan::build_from(cfg, self.last_plan.as_ref());
        for s in cfg.services.iter().filter(|s| s.sharding().is_some()) {
            self.local.ensure(s.listen.addr.ip())?;
        }
        self.shards.apply(cfg).await?;
        let runtimes = self.runtimes(cfg, &plan)?;
        self.userspace.apply(runtimes).await?;
        let ids = match &mut self.kernel {
            Some(k) => k.apply(&plan)?,
            None => Ids::default(),
        };
        self.connect_time(cfg, &plan);
        self.health.reconcile(file_cfg);
        self.last_plan = Some(plan);
        Ok(ids)
    }

    /// A backend's health changed: rebuild the tables without (or with) it.
    async fn health_event(&mut self, ev: crate::health::Event) {
        let (service, backend, healthy, reason) = (
            ev.service.clone(),
            ev.backend.clone(),
            ev.healthy,
            ev.reason.clone(),
        );
        if !self.health.record(ev) {
            return;
        }
        if healthy {
            info!(%service, %backend, %reason, "backend healthy: back in the table");
        } else {
            warn!(%service, %backend, %reason, "backend unhealthy: out of the table (its open flows continue)");
        }
        let cfg = self.state.config.clone();
        match self.apply(&cfg).await {
            Ok(ids) => {
                self.state.generation += 1;
                self.state.ids = ids;
            }
            Err(e) => error!("applying a health change failed: {e:#}"),
        }
        self.publish();
    }

    /// Program and attach the connect-time ambassador for the services that name a cgroup.
    /// Where it cannot be (no cgroup v2 there, no cgroup BPF), the userspace data plane serves
    /// those services on their address, with the same backends: a warning says why.
    fn connect_time(&mut self, cfg: &Config, plan: &Plan) {
        let cgroups: std::collections::BTreeSet<PathBuf> = cfg
            .services
            .iter()
            .filter_map(|s| s.cgroup.clone())
            .collect();
        if cgroups.is_empty() {
            return;
        }
        let dp = match &mut self.kernel {
            Some(k) => k,
            None => {
                if self.connect_kernel.is_none() {
                    match KernelDataplane::load() {
                        Ok(k) => self.connect_kernel = Some(k),
                        Err(e) => {
                            warn!("connect-time ambassador unavailable ({e:#}); the userspace data plane serves those services");
                            return;
                        }
                    }
                }
                let k = self.connect_kernel.as_mut().expect("loaded above");
                if let Err(e) = k.apply(plan) {
                    warn!("connect-time ambassador: programming its maps failed ({e:#}); the userspace data plane serves those services");
                    return;
                }
                k
            }
        };
        for cg in cgroups {
            if self.attached.contains(&cg) {
                continue;
            }
            match dp.attach_connect_time(&cg) {
                Ok(()) => {
                    info!(cgroup = %cg.display(), "connect-time ambassador attached");
                    self.attached.insert(cg);
                }
                Err(e) => warn!(
                    cgroup = %cg.display(),
                    "connect-time ambassador not attached ({e:#}); the userspace data plane serves those services"
                ),
            }
        }
    }

    fn tls_files(&self) -> Vec<PathBuf> {
        self.sidecars.values().flat_map(|s| s.files()).collect()
    }

    async fn reload(&mut self, why: &str, last_text: &mut Option<Vec<u8>>, always: bool) {
        let text = std::fs::read(&self.opts.config).ok();
        if !always && text == *last_text {
            return;
        }
        *last_text = text;
        match Config::load(&self.opts.config) {
            Err(e) => {
                error!(
                    reason = why,
                    "config rejected, still serving generation {}: {e}", self.state.generation
                );
                self.state.last_error = Some(e.to_string());
            }
            Ok(cfg) => {
                let before = self.state.overrides.clone();
                for o in self.state.overrides.prune(&cfg) {
                    warn!(
                        service = %o.service,
                        backend = %o.backend,
                        "dropping the override of a backend the new config does not have"
                    );
                }
                if !cfg.interfaces.is_empty()
                    && self.opts.interfaces.is_empty()
                    && self.kernel.is_some()
                    && cfg.interfaces != self.state.interfaces
                {
                    warn!("`interfaces` changed; attaching to new interfaces takes a restart");
                }
                self.discovery.update(&cfg, &self.discovery_tx).await;
                match self.apply(&cfg).await {
                    Ok(ids) => {
                        self.jobs.update(&cfg.gitsync).await;
                        self.state.generation += 1;
                        self.state.config = cfg;
                        self.state.ids = ids;
                        self.state.last_error = None;
                        self.save_overrides();
                        info!(
                            reason = why,
                            generation = self.state.generation,
                            "config applied"
                        );
                    }
                    Err(e) => {
                        self.state.overrides = before;
                        error!(
                            reason = why,
                            "config not applied, still serving generation {}: {e:#}",
                            self.state.generation
                        );
                        self.state.last_error = Some(format!("{e:#}"));
                    }
                }
            }
        }
        self.publish();
    }

    fn save_overrides(&self) {
        if let Err(e) = self.state.overrides.save(&self.opts.state_dir) {
            warn!("could not save the runtime overrides: {e:#}");
        }
    }

    /// A change from the admin API: applied like a reload, answered with the new generation.
    async fn admin(&mut self, req: crate::admin::AdminRequest) {
        use crate::admin::Command;
        let mut next = self.state.overrides.clone();
        let checked = match &req.cmd {
            Command::SetWeight {
                service,
                backend,
                weight,
            } => next.set_weight(&self.state.config, service, backend, *weight),
            Command::Drain {
                service,
                backend,
                drained,
            } => next.set_drained(&self.state.config, service, backend, *drained),
        };
        if let Err(r) = checked {
            let _ = req.reply.send(Err(r));
            return;
        }
        let before = std::mem::replace(&mut self.state.overrides, next);
        let cfg = self.state.config.clone();
        let answer = match self.apply(&cfg).await {
            Ok(ids) => {
                self.state.generation += 1;
                self.state.ids = ids;
                self.save_overrides();
                info!(change = ?req.cmd, generation = self.state.generation, "admin change applied");
                Ok(self.state.generation)
            }
            Err(e) => {
                self.state.overrides = before;
                error!(change = ?req.cmd, "admin change not applied: {e:#}");
                Err(crate::overrides::Refused {
                    status: 500,
                    message: format!(
                        "not applied, still serving generation {}: {e:#}",
                        self.state.generation
                    ),
                })
            }
        };
        self.publish();
        let _ = req.reply.send(answer);
    }

    fn reload_certificates(&mut self) {
        for ((name, _), sc) in &self.sidecars {
            match sc.reload() {
                Ok(true) => {
                    info!(service = %name, "certificates reloaded: new handshakes use them")
                }
                Ok(false) => {}
                Err(e) => {
                    error!(service = %name, "certificate reload rejected, keeping the previous certificates: {e:#}");
                    self.state.last_error = Some(format!("service {name}: {e:#}"));
                }
            }
        }
        self.publish();
    }

    /// A brokered service's endpoints changed: rebuild its tables (open flows continue).
    async fn discovered(&mut self, u: crate::discovery::Update) {
        if !self.discovery.handle(u) {
            return;
        }
        let cfg = self.state.config.clone();
        match self.apply(&cfg).await {
            Ok(ids) => {
                self.state.generation += 1;
                self.state.ids = ids;
            }
            Err(e) => error!("applying discovered endpoints failed: {e:#}"),
        }
        self.publish();
    }

    fn publish(&mut self) {
        self.state.health = self.health.report();
        self.state.discovery = self.discovery.report();
        self.state.gitsync = self
            .config_git
            .iter()
            .map(|s| s.status())
            .chain(self.jobs.statuses())
            .collect();
        self.state.userspace = self.userspace.counters.snapshot();
        if !self.shards.is_empty() {
            let doc = self.shards.stats_json(self.started.elapsed());
            self.state.shards = doc;
        }
        if let Err(e) = self.state.write(&self.opts.state_dir) {
            warn!("could not write state: {e:#}");
        }
    }
}

/// Open files the userspace paths may need: two per proxied connection (client and backend
/// side) for every service's `max_connections`, plus room for listeners, maps and the rest.
fn fds_needed(cfg: &Config) -> u64 {
    let conns: u64 = cfg
        .services
        .iter()
        .map(|s| s.limits.max_connections as u64)
        .sum();
    conns * 2 + 4096
}

/// Raise RLIMIT_NOFILE to what the config's connection limits need, as haproxy does for its
/// maxconn: the soft limit up to the hard one, and the hard one too when privileged (bounded
/// by `fs.nr_open`). A limit that stays short is logged with the fix.
fn ensure_fd_limit(cfg: &Config) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let want = fds_needed(cfg);
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft >= want {
        return;
    }
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(hard);
    let target = want.min(nr_open.max(hard));
    let new_hard = hard.max(target);
    let got = setrlimit(Resource::RLIMIT_NOFILE, target, new_hard)
        .or_else(|_| setrlimit(Resource::RLIMIT_NOFILE, hard.min(target), hard))
        .ok()
        .and_then(|_| getrlimit(Resource::RLIMIT_NOFILE).ok())
        .map_or(soft, |(s, _)| s);
    if got >= want {
        info!(
            from = soft,
            to = got,
            "raised the open-file limit for the configured max_connections"
        );
    } else {
        warn!(
            limit = got,
            needed = want,
            "the open-file limit is below what the services' max_connections need: raise it (LimitNOFILE=, ulimit -n) or lower limits.max_connections"
        );
    }
}

fn start_kernel(
    opts: &RunOptions,
    interfaces: &[String],
    cfg_path: &Path,
) -> Result<KernelDataplane> {
    if interfaces.is_empty() {
        bail!(
            "no interface to attach to: list them under `interfaces:` in {} or pass --interface IF",
            cfg_path.display()
        );
    }
    preflight(&opts.pin_dir)?;
    for iface in interfaces {
        check_interface(iface)?;
    }
    let (mut dp, adoption) = KernelDataplane::load_pinned(&opts.pin_dir, opts.flow_table_size)?;
    if let Err(e) = dp.spawn_log_reader() {
        warn!("the XDP program's log messages are not read: {e:#}");
    }
    if adoption.adopted {
        // The previous daemon's ids keep the new tables consistent with the adopted flows.
        if let Ok(old) = State::read(&opts.state_dir) {
            dp.prefer_ids(old.ids);
        }
        info!(
            flows = adoption.flows,
            "adopted the connection table pinned in {}",
            opts.pin_dir.display()
        );
    }
    Ok(dp)
}

/// `--config-git`: sync the repository until a commit with a valid config is published (or
/// one published earlier is on disk: the last good config serves while the remote is down),
/// then point `opts.config` at the config in the published tree.
async fn config_from_git(
    opts: &mut RunOptions,
) -> Result<
    Option<(
        Arc<crate::gitsync::Syncer>,
        tokio::sync::mpsc::UnboundedReceiver<String>,
    )>,
> {
    let Some(spec) = opts.config_git.clone() else {
        return Ok(None);
    };
    let rel = opts.config.clone();
    if rel.is_absolute()
        || rel
            .components()
            .any(|c| c == std::path::Component::ParentDir)
    {
        bail!(
            "with --config-git, --config is the config's path inside the repository (e.g. `ambassador.yaml`), not {}",
            rel.display()
        );
    }
    let inner = rel.clone();
    let validator: crate::gitsync::Validator = Arc::new(move |tree: &Path| {
        Config::load(&tree.join(&inner))
            .map(|_| ())
            .map_err(|e| anyhow!("{e}"))
    });
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let syncer = crate::gitsync::Syncer::with(spec, Some(validator), Some(tx))?;
    let mut tries = 0u32;
    loop {
        let _ = syncer.sync(true).await;
        let st = syncer.status();
        if st.ready {
            if let Some(e) = st.last_error {
                warn!(
                    "serving the config published earlier ({}): {e}",
                    st.published.unwrap_or_default()
                );
            }
            break;
        }
        tries += 1;
        let wait = Duration::from_secs(1 << tries.min(5));
        warn!(
            "no valid config from {} yet, retrying in {wait:?}: {}",
            syncer.spec.repo,
            st.last_error.unwrap_or_default()
        );
        tokio::time::sleep(wait).await;
    }
    while rx.try_recv().is_ok() {}
    opts.config = syncer.spec.link_path().join(rel);
    if let Some(w) = &syncer.spec.webhook {
        crate::gitsync::http::serve(w, syncer.clone()).await?;
    }
    tokio::spawn(syncer.clone().run());
    Ok(Some((syncer, rx)))
}

async fn recv_opt<T>(rx: &mut Option<tokio::sync::mpsc::UnboundedReceiver<T>>) -> Option<T> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

pub async fn run(mut opts: RunOptions) -> Result<()> {
    let (config_git, mut git_rx) = match config_from_git(&mut opts).await? {
        Some((s, rx)) => (Some(s), Some(rx)),
        None => (None, None),
    };
    let cfg = Config::load(&opts.config).map_err(|e| anyhow!("{e}"))?;
    let interfaces = if opts.interfaces.is_empty() {
        cfg.interfaces.clone()
    } else {
        opts.interfaces.clone()
    };
    if opts.dataplane == DataplaneMode::Kernel {
        // Say what is missing before touching anything (the state directory included).
        preflight(&opts.pin_dir)?;
        for iface in &interfaces {
            check_interface(iface)?;
        }
    }
    let _lock = PidLock::take(&opts.state_dir)?;
    if opts.dataplane != DataplaneMode::Userspace {
        // Pinned flows this binary cannot adopt are a conflict to resolve, not a reason to
        // fall back to userspace beside a program still forwarding them.
        crate::dataplane::kernel::check_adoptable(&opts.pin_dir)?;
        if !(1024..=1 << 26).contains(&opts.flow_table_size) {
            bail!(
                "--flow-table-size {} is out of range: use 1024 to 67108864 entries (each takes about 200 bytes of kernel memory)",
                opts.flow_table_size
            );
        }
    }
    let kernel = match opts.dataplane {
        DataplaneMode::Userspace => None,
        DataplaneMode::Kernel => Some(start_kernel(&opts, &interfaces, &opts.config)?),
        DataplaneMode::Auto => {
            match start_kernel(&opts, &interfaces, &opts.config) {
                Ok(k) => Some(k),
                Err(e) => {
                    warn!("the kernel data plane is unavailable ({e:#}); using the userspace data plane");
                    None
                }
            }
        }
    };
    let xdp = kernel.is_some();
    let mut overrides = Overrides::load(&opts.state_dir)?;
    for o in overrides.prune(&cfg) {
        warn!(service = %o.service, backend = %o.backend, "dropping the saved override of a backend the config does not have");
    }
    if !overrides.backends.is_empty() {
        info!(
            count = overrides.backends.len(),
            "runtime overrides (set-weight, drain) restored"
        );
    }
    let admin_endpoint = opts
        .admin
        .clone()
        .unwrap_or_else(|| crate::admin::Endpoint::default_for(&opts.state_dir));
    let (admin, mut admin_rx) =
        crate::admin::Admin::new(opts.state_dir.clone(), opts.admin_token.clone());
    crate::admin::serve(&admin_endpoint, admin.clone()).await?;
    let (health, mut health_rx) = crate::health::Monitor::new();
    let (failed_tx, mut failed_rx) = tokio::sync::mpsc::unbounded_channel();
    let (disc_tx, mut disc_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut d = Daemon {
        state: State {
            pid: std::process::id(),
            config_path: opts.config.clone(),
            dataplane: if xdp {
                DataplaneMode::Kernel
            } else {
                DataplaneMode::Userspace
            },
            pin_dir: xdp.then(|| opts.pin_dir.clone()),
            interfaces: if xdp { interfaces.clone() } else { Vec::new() },
            attachments: Vec::new(),
            generation: 1,
            config: cfg.clone(),
            ids: Ids::default(),
            last_error: None,
            userspace: Vec::new(),
            shards: serde_json::Value::Null,
            overrides,
            health: Vec::new(),
            gitsync: Vec::new(),
            discovery: Vec::new(),
        },
        opts: opts.clone(),
        kernel,
        userspace: match opts.workers {
            Some(n) => UserspaceDataplane::with_workers(n),
            None => UserspaceDataplane::new(),
        },
        shards: crate::shard::proxy::Pools::with_workers(opts.workers),
        connect_kernel: None,
        attached: Default::default(),
        started: std::time::Instant::now(),
        sidecars: HashMap::new(),
        local: LocalAddresses::default(),
        health,
        last_plan: None,
        config_git,
        jobs: Default::default(),
        discovery: Default::default(),
        discovery_tx: disc_tx,
    };
    let _ = d.userspace.counters.failed_connects.set(failed_tx);
    d.discovery.update(&cfg, &d.discovery_tx).await;
    d.state.ids = d.apply(&cfg).await?;
    d.jobs.update(&cfg.gitsync).await;
    if cfg.services.iter().any(|s| s.sharding().is_some()) {
        match tokio::net::TcpListener::bind(opts.stats_listen).await {
            Ok(l) => {
                // Read live at each request (the state file's copy is up to a second old).
                tokio::spawn(crate::shard::proxy::serve_stats(
                    l,
                    d.shards.stats_source(d.started),
                ));
                info!(address = %opts.stats_listen, "sharding stats served (twemproxy's format)");
            }
            Err(e) => warn!(
                "sharding stats not served: {}: {e} (choose another with --stats-listen)",
                opts.stats_listen
            ),
        }
    }
    if let Some(k) = &mut d.kernel {
        for iface in &interfaces {
            k.attach(iface, cfg.attach_mode(iface, &opts.attach), opts.xdp_mode)?;
        }
        for a in k.release_other_links()? {
            info!(
                "detached {} from {}: no longer configured",
                a.program.label(),
                a.interface
            );
        }
        d.state.attachments = k.attachments();
    }
    d.publish();
    admin
        .ready
        .store(true, std::sync::atomic::Ordering::Relaxed);
    info!(admin = %admin_endpoint, "admin API serving");
    info!(
        services = cfg.services.len(),
        dataplane = if xdp { "kernel" } else { "userspace" },
        programs = %crate::dataplane::attach::describe(&d.state.attachments),
        "serving {}",
        opts.config.display()
    );

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut changes = watch(std::slice::from_ref(&opts.config))?;
    let mut tls_files = d.tls_files();
    let mut tls_changes = watch(&tls_files)?;
    let mut last_text = std::fs::read(&opts.config).ok();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => d.publish(),
            _ = hup.recv() => {
                if let Some(g) = &d.config_git {
                    g.trigger();
                }
                d.jobs.trigger_all();
                d.reload("SIGHUP", &mut last_text, true).await;
                d.reload_certificates();
            }
            Some(commit) = recv_opt(&mut git_rx) => {
                d.reload(&format!("git commit {commit}"), &mut last_text, false).await;
            }
            Some(()) = changes.rx.recv() => {
                // Let a burst of writes (editors, ConfigMap symlink swaps) settle.
                tokio::time::sleep(Duration::from_millis(150)).await;
                while changes.rx.try_recv().is_ok() {}
                d.reload("file changed", &mut last_text, false).await;
            }
            Some(()) = tls_changes.rx.recv() => {
                tokio::time::sleep(Duration::from_millis(150)).await;
                while tls_changes.rx.try_recv().is_ok() {}
                d.reload_certificates();
            }
            Some(req) = admin_rx.recv() => d.admin(req).await,
            Some(ev) = health_rx.recv() => d.health_event(ev).await,
            Some(u) = disc_rx.recv() => d.discovered(u).await,
            Some((service, backend)) = failed_rx.recv() => {
                if let Some(ev) = d.health.failed_connect(&service, backend) {
                    d.health_event(ev).await;
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        let now = d.tls_files();
        if now != tls_files {
            tls_files = now;
            tls_changes = watch(&tls_files)?;
        }
    }
    if let crate::admin::Endpoint::Unix(p) = &admin_endpoint {
        let _ = std::fs::remove_file(p);
    }
    let deadline = d
        .state
        .config
        .services
        .iter()
        .map(|s| s.limits.drain_timeout)
        .max()
        .unwrap_or_default();
    info!("draining: no new connections; open ones get up to {deadline:?}");
    let _ = std::fs::remove_file(State::path(&opts.state_dir));
    let Daemon {
        userspace,
        kernel,
        local,
        ..
    } = d;
    if !userspace.drain(deadline).await {
        warn!("drain deadline passed with connections still open: closing them");
    }
    drop(kernel);
    if xdp {
        if opts.keep_on_exit {
            info!(
                "XDP left attached with its maps pinned in {}: flows keep being forwarded; the next `ambassador run` adopts them, `ambassador detach` removes them",
                opts.pin_dir.display()
            );
        } else {
            crate::dataplane::kernel::detach(&opts.pin_dir)?;
        }
    }
    drop(local);
    info!("stopped");
    Ok(())
}

/// Events for files. Their directories are watched, not the files, so atomic renames and
/// symlink swaps (Kubernetes ConfigMap and Secret volumes) are seen.
struct Watch {
    _watcher: notify::RecommendedWatcher,
    rx: tokio::sync::mpsc::UnboundedReceiver<()>,
}

fn watch(paths: &[PathBuf]) -> Result<Watch> {
    use notify::{RecursiveMode, Watcher as _};
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    // Only events about the watched files count (or about `..`-prefixed entries: a ConfigMap
    // volume swaps its `..data` symlink): a log file or state written beside the config must
    // not trigger reloads.
    let names: std::collections::HashSet<std::ffi::OsString> = paths
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_owned()))
        .collect();
    let mut w = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        let Ok(ev) = ev else { return };
        // Reading a file is an event too (ours included, when a reload reads the config):
        // only changes count, or every reload would schedule the next.
        let changed = !matches!(ev.kind, notify::EventKind::Access(_));
        let relevant = changed
            && ev.paths.iter().any(|p| {
                p.file_name()
                    .is_some_and(|n| names.contains(n) || n.to_string_lossy().starts_with(".."))
            });
        if relevant {
            let _ = tx.send(());
        }
    })?;
    let mut dirs: Vec<PathBuf> = paths
        .iter()
        .map(|p| {
            p.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_owned()
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    for dir in &dirs {
        w.watch(dir, RecursiveMode::NonRecursive)
            .with_context(|| format!("watching {}", dir.display()))?;
    }
    Ok(Watch { _watcher: w, rx })
}
