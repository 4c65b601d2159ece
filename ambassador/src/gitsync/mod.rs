//! `ambassador gitsync`: the book's git-push PaaS sidecar, done so that what is pushed is what
//! runs, atomically.
//!
//! Each commit is checked out into its own directory named by its hash under `root`, validated
//! there (`pre_publish`), and published by renaming a new symlink over `link`: a reader that
//! resolves the link once sees one whole tree, never a mix. Old trees are removed, keeping
//! `keep`. A failed fetch, checkout or hook leaves the published tree as it was.
//!
//! Homes: [`git`] (fetch and checkout), [`hooks`] (pre/post-publish with timeouts and
//! retries), [`http`] (webhook, readiness, status and metrics), [`serve`] (push mode: a bare
//! repository whose pre-receive hook validates pushes).

pub mod git;
pub mod hooks;
pub mod http;
pub mod serve;

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};
use tracing::{error, info, warn};

/// One synced repository: the `gitsync` command's flags and a config's `gitsync:` entries.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Names the job in logs, status and metrics.
    #[serde(default = "default_name")]
    pub name: String,
    /// Remote URL (https, ssh, git, file or a path).
    pub repo: String,
    /// Branch, tag or full ref to follow.
    #[serde(rename = "ref", default = "default_ref")]
    pub reference: String,
    /// Directory holding the per-commit trees, the link and gitsync's own state.
    pub root: PathBuf,
    /// The published symlink, relative to `root` (or absolute).
    #[serde(default = "default_link")]
    pub link: PathBuf,
    #[serde(default = "default_period", with = "crate::config::duration")]
    pub period: Duration,
    /// Shallow fetch depth; 0 fetches the whole history.
    #[serde(default = "default_depth")]
    pub depth: u32,
    /// Trees kept on disk, the published one included (at least 1).
    #[serde(default = "default_keep")]
    pub keep: usize,
    /// Shell command run in the new tree before it is published; failure keeps the old tree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_publish: Option<String>,
    /// Hard-link files a commit did not change from the published tree instead of writing
    /// them again (as `rsync --link-dest`): a push that changes a few files publishes in the
    /// time of those few. Linked files share their inode with older trees, so a hook that
    /// edits a file in place would edit the live tree too: the default is on only without a
    /// pre-publish hook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reuse_unchanged: Option<bool>,
    /// What to tell the application once a tree is published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_publish: Option<PostPublish>,
    #[serde(default = "default_hook_timeout", with = "crate::config::duration")]
    pub hook_timeout: Duration,
    /// Attempts of a failing hook after the first (with doubling backoff from 500 ms).
    #[serde(default = "default_hook_retries")]
    pub hook_retries: u32,
    #[serde(default = "default_fetch_timeout", with = "crate::config::duration")]
    pub fetch_timeout: Duration,
    #[serde(default, skip_serializing_if = "Credentials::is_empty")]
    pub credentials: Credentials,
    /// Serve the webhook (`POST /sync`), `/ready`, `/status` and `/metrics` here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<Webhook>,
}

fn default_name() -> String {
    "app".into()
}
fn default_ref() -> String {
    "main".into()
}
fn default_link() -> PathBuf {
    "current".into()
}
fn default_period() -> Duration {
    Duration::from_secs(10)
}
fn default_depth() -> u32 {
    1
}
fn default_keep() -> usize {
    3
}
fn default_hook_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_hook_retries() -> u32 {
    2
}
fn default_fetch_timeout() -> Duration {
    Duration::from_secs(60)
}

/// Exactly one of `command`, `signal` (with `pid_file`) or `http`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PostPublish {
    /// Shell command, run in the published tree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Signal name (`HUP`, `USR1`, ...) sent to the process in `pid_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_file: Option<PathBuf>,
    /// `http://` URL to POST to; any 2xx is success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
}

/// Secrets are read from files at each fetch (so a rotated Secret volume is picked up) and
/// reach git through its environment, never its argv or our logs.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// An HTTPS token (GitHub, GitLab, Gitea), sent as basic auth with `username`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// SSH private key; requires `known_hosts_file` (host keys are pinned, never trusted on
    /// first use).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_key_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub known_hosts_file: Option<PathBuf>,
}

impl Credentials {
    fn is_empty(&self) -> bool {
        *self == Credentials::default()
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    pub listen: std::net::SocketAddr,
    /// Shared secret: GitHub's `X-Hub-Signature-256` HMAC, GitLab's `X-Gitlab-Token`, or
    /// `Authorization: Bearer`. Without it the listener must be loopback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
}

impl Spec {
    /// Rules serde cannot express, as (key, message, fix).
    pub fn validate(&self) -> std::result::Result<(), (String, String, String)> {
        let err = |k: &str, m: String, f: &str| Err((k.to_string(), m, f.to_string()));
        if self.repo.trim().is_empty() {
            return err("repo", "is empty".into(), "give the remote's URL or path");
        }
        if self.repo.contains('@') && self.repo.starts_with("http") {
            return err(
                "repo",
                "has credentials in the URL; they would show in process lists and logs".into(),
                "remove them from the URL and use `credentials.token_file`",
            );
        }
        if self.reference.is_empty() || self.reference.starts_with('-') {
            return err(
                "ref",
                format!("`{}` is not a ref", self.reference),
                "name a branch, tag or full ref, e.g. `main`",
            );
        }
        if self.keep == 0 {
            return err(
                "keep",
                "is 0: the published tree must stay".into(),
                "use 1 or more (3 gives slow readers time to finish with a previous tree)",
            );
        }
        if self.period < Duration::from_millis(100) {
            return err(
                "period",
                format!("{:?} is too short", self.period),
                "poll at most every 100ms; use the webhook for immediate syncs",
            );
        }
        let l = self.link.to_string_lossy();
        if l.is_empty() || l.contains('/') && self.link.is_relative() {
            return err(
                "link",
                format!("`{l}` must be a plain name inside root, or an absolute path"),
                "use e.g. `current`",
            );
        }
        if let Some(p) = &self.post_publish {
            let n = [p.command.is_some(), p.signal.is_some(), p.http.is_some()]
                .iter()
                .filter(|x| **x)
                .count();
            if n != 1 {
                return err(
                    "post_publish",
                    "needs exactly one of `command`, `signal` or `http`".into(),
                    "keep one of them",
                );
            }
            if p.signal.is_some() {
                if p.pid_file.is_none() {
                    return err(
                        "post_publish.pid_file",
                        "is missing: a signal needs the process to send it to".into(),
                        "add `pid_file: /run/app.pid`",
                    );
                }
                if let Err(e) = hooks::parse_signal(p.signal.as_deref().unwrap_or_default()) {
                    return err("post_publish.signal", e.to_string(), "use e.g. `HUP`");
                }
            }
            if let Some(u) = &p.http {
                if !u.starts_with("http://") {
                    return err(
                        "post_publish.http",
                        format!("`{u}` is not an http:// URL"),
                        "use http:// (for https, use `command` with curl)",
                    );
                }
            }
        }
        let c = &self.credentials;
        if c.ssh_key_file.is_some() != c.known_hosts_file.is_some() {
            return err(
                "credentials",
                "an SSH key needs `known_hosts_file`, and known hosts a key".into(),
                "add both `ssh_key_file` and `known_hosts_file` (host keys are pinned)",
            );
        }
        if let Some(w) = &self.webhook {
            if w.secret_file.is_none() && !w.listen.ip().is_loopback() {
                return err(
                    "webhook.secret_file",
                    format!("is missing and {} is not loopback", w.listen),
                    "add `secret_file`, or listen on 127.0.0.1",
                );
            }
        }
        Ok(())
    }

    /// The published symlink's path.
    pub fn link_path(&self) -> PathBuf {
        self.root.join(&self.link)
    }
}

/// What status, readiness and metrics report.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub name: String,
    /// True once a tree has been published (by this process or an earlier one).
    pub ready: bool,
    pub published: Option<String>,
    /// The remote's commit at the last successful fetch.
    pub remote: Option<String>,
    /// Unix seconds of the last sync that ended without error.
    pub last_success: Option<u64>,
    pub consecutive_failures: u32,
    pub last_duration_ms: Option<u64>,
    pub last_error: Option<String>,
    /// A commit whose pre-publish failed: not retried until a newer commit, a webhook or
    /// SIGHUP.
    pub rejected: Option<String>,
    pub syncs: u64,
    pub publishes: u64,
    pub failures: u64,
    /// Post-publish hook done for this commit.
    pub post_publish_done: Option<String>,
}

/// What one sync did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Unchanged(String),
    Published(String),
    Rejected(String, String),
}

/// An in-process check of a new tree (the daemon validates its config from git this way).
pub type Validator = Arc<dyn Fn(&Path) -> Result<()> + Send + Sync>;

/// Persisted beside the trees so a restarted sidecar knows what it published and whether the
/// post-publish hook finished for it.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Persisted {
    post_publish_done: Option<String>,
}

pub struct Syncer {
    pub spec: Spec,
    status: Mutex<Status>,
    validator: Option<Validator>,
    on_publish: Option<mpsc::UnboundedSender<String>>,
    wake: Notify,
    forced: AtomicBool,
}

impl Syncer {
    pub fn new(spec: Spec) -> Result<Arc<Syncer>> {
        Self::with(spec, None, None)
    }

    /// `validator` runs on each new tree before `pre_publish`; `on_publish` hears each newly
    /// published commit.
    pub fn with(
        spec: Spec,
        validator: Option<Validator>,
        on_publish: Option<mpsc::UnboundedSender<String>>,
    ) -> Result<Arc<Syncer>> {
        spec.validate()
            .map_err(|(k, m, f)| anyhow!("gitsync `{}`: {k}: {m} (fix: {f})", spec.name))?;
        std::fs::create_dir_all(spec.root.join(STATE_DIR))
            .with_context(|| format!("creating {}", spec.root.display()))?;
        let published = published(&spec);
        let persisted = read_persisted(&spec);
        let status = Status {
            name: spec.name.clone(),
            ready: published.is_some(),
            published,
            post_publish_done: persisted.post_publish_done,
            ..Default::default()
        };
        Ok(Arc::new(Syncer {
            spec,
            status: Mutex::new(status),
            validator,
            on_publish,
            wake: Notify::new(),
            forced: AtomicBool::new(false),
        }))
    }

    pub fn status(&self) -> Status {
        self.status.lock().expect("status lock").clone()
    }

    /// Sync as soon as possible (webhook, SIGHUP), retrying a rejected commit too. Requests
    /// that arrive during a sync coalesce into one more.
    pub fn trigger(&self) {
        self.forced.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }

    /// Poll every `period` (backing off after failures) and on each trigger, forever.
    pub async fn run(self: Arc<Self>) {
        self.resume().await;
        loop {
            let force = self.forced.swap(false, Ordering::Relaxed);
            let failures = match self.sync(force).await {
                Ok(_) => 0,
                Err(_) => self.status().consecutive_failures,
            };
            let wait = backoff(self.spec.period, failures);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.wake.notified() => {}
            }
        }
    }

    /// At start: finish the post-publish hook of the published commit if an earlier run did
    /// not (hooks are idempotent by contract, so running one twice is safe).
    async fn resume(&self) {
        let st = self.status();
        if let Some(c) = st.published {
            if st.post_publish_done.as_deref() != Some(c.as_str()) {
                if let Some(p) = &self.spec.post_publish {
                    info!(job = %self.spec.name, commit = %c, "re-running the post-publish hook of the published commit");
                    let tree = self.spec.root.join(&c);
                    match hooks::post_publish(&self.spec, p, &tree, &c).await {
                        Ok(()) => self.mark_post_done(&c),
                        Err(e) => {
                            error!(job = %self.spec.name, commit = %c, "post-publish hook failed: {e:#}")
                        }
                    }
                } else {
                    self.mark_post_done(&c);
                }
            }
        }
    }

    /// One sync: fetch, and publish the fetched commit if it is new. Errors are recorded in
    /// the status and logged; the published tree is untouched by any of them.
    pub async fn sync(&self, force: bool) -> Result<Outcome> {
        let started = Instant::now();
        let res = self.sync_inner(force).await;
        let mut st = self.status.lock().expect("status lock");
        st.syncs += 1;
        st.last_duration_ms = Some(started.elapsed().as_millis() as u64);
        match &res {
            Ok(o) => {
                // Polling past a rejected commit is not a success: it stays reported.
                let still_rejected =
                    matches!(o, Outcome::Unchanged(c) if st.rejected.as_ref() == Some(c));
                if !matches!(o, Outcome::Rejected(..)) && !still_rejected {
                    st.consecutive_failures = 0;
                    st.last_error = None;
                    st.last_success = Some(crate::health::now_secs());
                }
                match o {
                    Outcome::Published(c) => {
                        st.publishes += 1;
                        st.published = Some(c.clone());
                        st.ready = true;
                        st.rejected = None;
                    }
                    Outcome::Rejected(c, why) => {
                        // Fetching worked; the commit did not pass: a failure to report.
                        st.failures += 1;
                        st.consecutive_failures += 1;
                        st.rejected = Some(c.clone());
                        st.last_error = Some(why.clone());
                    }
                    Outcome::Unchanged(_) => {}
                }
            }
            Err(e) => {
                st.failures += 1;
                st.consecutive_failures += 1;
                st.last_error = Some(format!("{e:#}"));
            }
        }
        drop(st);
        match &res {
            Ok(Outcome::Published(c)) => {
                info!(job = %self.spec.name, commit = %c, ms = started.elapsed().as_millis() as u64, "published")
            }
            Ok(Outcome::Rejected(c, why)) => {
                error!(job = %self.spec.name, commit = %c, "not published, the previous tree stays: {why}")
            }
            Ok(Outcome::Unchanged(_)) => {}
            Err(e) => error!(job = %self.spec.name, "sync failed, the published tree stays: {e:#}"),
        }
        res
    }

    async fn sync_inner(&self, force: bool) -> Result<Outcome> {
        let spec = &self.spec;
        let mirror = spec.root.join(STATE_DIR).join("repo.git");
        let t0 = Instant::now();
        git::ensure_mirror(&mirror).await?;
        let commit = git::fetch(spec, &mirror).await?;
        let fetched = t0.elapsed();
        self.status.lock().expect("status lock").remote = Some(commit.clone());
        let st = self.status();
        if st.published.as_deref() == Some(commit.as_str()) {
            if st.post_publish_done.as_deref() != Some(commit.as_str()) {
                self.resume().await;
            }
            return Ok(Outcome::Unchanged(commit));
        }
        if !force && st.rejected.as_deref() == Some(commit.as_str()) {
            return Ok(Outcome::Unchanged(commit));
        }
        let tree = spec.root.join(&commit);
        let existed = tree.is_dir();
        let t1 = Instant::now();
        let mut linked = 0;
        if !existed {
            // Checked out beside its final name and renamed: a tree named by a hash is
            // always complete.
            let tmp = spec.root.join(STATE_DIR).join(format!("tmp-{commit}"));
            let _ = std::fs::remove_dir_all(&tmp);
            let (m, c, t) = (mirror.clone(), commit.clone(), tmp.clone());
            let reuse = spec
                .reuse_unchanged
                .unwrap_or(spec.pre_publish.is_none())
                .then(|| st.published.clone())
                .flatten()
                .map(|p| (spec.root.join(&p), p))
                .filter(|(dir, _)| dir.is_dir());
            let done = tokio::task::spawn_blocking(move || {
                git::checkout(
                    &m,
                    &c,
                    &t,
                    reuse.as_ref().map(|(d, p)| (p.as_str(), d.as_path())),
                )
            })
            .await
            .map_err(|e| anyhow!("checkout task: {e}"))?;
            match done {
                Ok(n) => linked = n,
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&tmp);
                    return Err(e.context(format!("checking out {commit}")));
                }
            }
            std::fs::rename(&tmp, &tree)
                .with_context(|| format!("moving the new tree to {}", tree.display()))?;
        }
        let checked_out = t1.elapsed();
        let t2 = Instant::now();
        let checked = match &self.validator {
            Some(v) => v(&tree),
            None => Ok(()),
        };
        let checked = match (checked, &spec.pre_publish) {
            (Ok(()), Some(cmd)) => hooks::pre_publish(spec, cmd, &tree, &commit).await,
            (r, _) => r,
        };
        if let Err(e) = checked {
            if !existed {
                let _ = std::fs::remove_dir_all(&tree);
            }
            return Ok(Outcome::Rejected(commit, format!("{e:#}")));
        }
        let validated = t2.elapsed();
        publish_link(&spec.link_path(), &commit)?;
        info!(
            job = %spec.name,
            commit = %commit,
            fetch_ms = fetched.as_millis() as u64,
            checkout_ms = checked_out.as_millis() as u64,
            linked = linked,
            pre_publish_ms = validated.as_millis() as u64,
            "link flipped"
        );
        if let Some(tx) = &self.on_publish {
            let _ = tx.send(commit.clone());
        }
        {
            let mut st = self.status.lock().expect("status lock");
            st.published = Some(commit.clone());
        }
        match &spec.post_publish {
            Some(p) => match hooks::post_publish(spec, p, &tree, &commit).await {
                Ok(()) => self.mark_post_done(&commit),
                // Published all the same: the tree is good; the hook is retried at start.
                Err(e) => {
                    error!(job = %spec.name, commit = %commit, "post-publish hook failed: {e:#}")
                }
            },
            None => self.mark_post_done(&commit),
        }
        if let Err(e) = prune(spec, &commit) {
            warn!(job = %spec.name, "removing old trees: {e:#}");
        }
        Ok(Outcome::Published(commit))
    }

    fn mark_post_done(&self, commit: &str) {
        self.status.lock().expect("status lock").post_publish_done = Some(commit.to_string());
        let p = Persisted {
            post_publish_done: Some(commit.to_string()),
        };
        let path = self.spec.root.join(STATE_DIR).join("state.json");
        let tmp = path.with_extension("json.tmp");
        let write = std::fs::write(&tmp, serde_json::to_vec(&p).unwrap_or_default())
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = write {
            warn!(job = %self.spec.name, "saving {}: {e}", path.display());
        }
    }
}

/// gitsync's own files under `root`: the mirror, temporary checkouts, state.
pub const STATE_DIR: &str = ".gitsync";

fn read_persisted(spec: &Spec) -> Persisted {
    std::fs::read(spec.root.join(STATE_DIR).join("state.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// The commit the link points at, if it points at a tree of ours.
pub fn published(spec: &Spec) -> Option<String> {
    let target = std::fs::read_link(spec.link_path()).ok()?;
    let name = target.file_name()?.to_str()?.to_string();
    (is_hash(&name) && spec.root.join(&name).is_dir()).then_some(name)
}

fn is_hash(s: &str) -> bool {
    matches!(s.len(), 40 | 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Point `link` at `commit` atomically: a new symlink renamed over the old one. The target is
/// relative when the link is inside root, so the root can be mounted elsewhere.
fn publish_link(link: &Path, commit: &str) -> Result<()> {
    let dir = link.parent().unwrap_or(Path::new("."));
    let name = link
        .file_name()
        .ok_or_else(|| anyhow!("{} has no file name", link.display()))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(commit, &tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    if let Err(e) = std::fs::rename(&tmp, link) {
        let _ = std::fs::remove_file(&tmp);
        if link.is_dir() && !link.is_symlink() {
            bail!(
                "{} is a directory, not a symlink: move it away so gitsync can publish there",
                link.display()
            );
        }
        return Err(e).with_context(|| format!("replacing {}", link.display()));
    }
    // The rename is durable once the directory is synced.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Remove trees beyond `keep`, oldest first; never the published one.
fn prune(spec: &Spec, published: &str) -> Result<()> {
    let mut trees: Vec<(SystemTime, PathBuf)> = Vec::new();
    for e in std::fs::read_dir(&spec.root)? {
        let e = e?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if !is_hash(name) || name == published || !e.file_type()?.is_dir() {
            continue;
        }
        let t = e.metadata()?.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        trees.push((t, e.path()));
    }
    trees.sort();
    let excess = (trees.len() + 1).saturating_sub(spec.keep);
    for (_, p) in trees.into_iter().take(excess) {
        std::fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
    }
    Ok(())
}

fn backoff(period: Duration, failures: u32) -> Duration {
    if failures == 0 {
        return period;
    }
    let cap = period.max(Duration::from_secs(300));
    period
        .saturating_mul(1u32 << failures.min(10))
        .min(cap)
        .max(Duration::from_millis(100))
}

/// Jobs from a config's `gitsync:` section, run by the daemon: started, and restarted when
/// their entry changes on reload.
#[derive(Default)]
pub struct Jobs {
    running: Vec<Job>,
}

struct Job {
    spec: Spec,
    syncer: Arc<Syncer>,
    task: tokio::task::JoinHandle<()>,
    /// Its webhook listener: stopped with the job so a restarted job can bind the port.
    webhook: Option<tokio::task::JoinHandle<()>>,
}

impl Jobs {
    pub async fn update(&mut self, specs: &[Spec]) {
        let old = std::mem::take(&mut self.running);
        for job in old {
            if specs.contains(&job.spec) {
                self.running.push(job);
            } else {
                job.task.abort();
                if let Some(w) = job.webhook {
                    w.abort();
                }
                info!(job = %job.spec.name, "gitsync job stopped");
            }
        }
        for spec in specs {
            if self.running.iter().any(|j| j.spec == *spec) {
                continue;
            }
            match Syncer::new(spec.clone()) {
                Ok(s) => {
                    let webhook = match &spec.webhook {
                        Some(w) => match http::serve(w, s.clone()).await {
                            Ok(h) => Some(h),
                            Err(e) => {
                                error!(job = %spec.name, "webhook not served: {e:#}");
                                None
                            }
                        },
                        None => None,
                    };
                    let task = tokio::spawn(s.clone().run());
                    info!(job = %spec.name, repo = %spec.repo, root = %spec.root.display(), "gitsync job started");
                    self.running.push(Job {
                        spec: spec.clone(),
                        syncer: s,
                        task,
                        webhook,
                    });
                }
                Err(e) => error!(job = %spec.name, "gitsync job not started: {e:#}"),
            }
        }
    }

    pub fn statuses(&self) -> Vec<Status> {
        self.running.iter().map(|j| j.syncer.status()).collect()
    }

    pub fn trigger_all(&self) {
        for j in &self.running {
            j.syncer.trigger();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Spec {
        serde_yaml::from_str("repo: /srv/git/app.git\nroot: /srv/app\n").unwrap()
    }

    #[test]
    fn defaults_and_rules() {
        let s = spec();
        assert_eq!(s.reference, "main");
        assert_eq!(s.link_path(), PathBuf::from("/srv/app/current"));
        assert_eq!((s.depth, s.keep), (1, 3));
        s.validate().unwrap();
        let mut bad = s.clone();
        bad.keep = 0;
        assert_eq!(bad.validate().unwrap_err().0, "keep");
        let mut bad = s.clone();
        bad.repo = "https://user:tok@git.example/app.git".into();
        assert!(bad.validate().unwrap_err().1.contains("credentials"));
        let mut bad = s.clone();
        bad.post_publish = Some(PostPublish {
            signal: Some("HUP".into()),
            ..Default::default()
        });
        assert_eq!(bad.validate().unwrap_err().0, "post_publish.pid_file");
        let mut bad = s;
        bad.credentials.ssh_key_file = Some("/k".into());
        assert_eq!(bad.validate().unwrap_err().0, "credentials");
        let unknown = serde_yaml::from_str::<Spec>("repo: x\nroot: /r\nbranch: main\n");
        assert!(unknown
            .unwrap_err()
            .to_string()
            .contains("unknown field `branch`"));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = Duration::from_secs(10);
        assert_eq!(backoff(p, 0), p);
        assert_eq!(backoff(p, 1), Duration::from_secs(20));
        assert_eq!(backoff(p, 30), Duration::from_secs(300));
        assert_eq!(
            backoff(Duration::from_secs(600), 3),
            Duration::from_secs(600)
        );
    }

    #[test]
    fn prune_keeps_the_published_tree_and_the_newest() {
        let root = std::env::temp_dir().join(format!("gitsync-prune-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let mut s = spec();
        s.root = root.clone();
        s.keep = 2;
        let names: Vec<String> = (0..4).map(|i| format!("{i}").repeat(40)).collect();
        for n in &names {
            std::fs::create_dir_all(root.join(n)).unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
        std::fs::create_dir_all(root.join("not-a-tree")).unwrap();
        // The oldest is published: it stays, with the newest other one.
        prune(&s, &names[0]).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            vec![names[0].clone(), names[3].clone(), "not-a-tree".into()]
        );
        publish_link(&s.link_path(), &names[3]).unwrap();
        assert_eq!(published(&s).as_deref(), Some(names[3].as_str()));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
