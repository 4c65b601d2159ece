//! Fetching and checking out.
//!
//! Fetching shells out to `git`: gix would need an HTTP stack of its own (curl or reqwest)
//! for https remotes and still runs the `ssh` program for ssh ones, and `git` honours the
//! credential and host-key settings users already have (`http.extraHeader`,
//! `GIT_SSH_COMMAND`). Checking out uses gix: it writes a commit's tree into a fresh
//! directory without an index or worktree registration in the mirror, in parallel.

use std::{path::Path, process::Stdio, time::Duration};

use anyhow::{anyhow, bail, Context as _, Result};
use base64::Engine as _;

use super::Spec;

/// Where the fetched commit is kept in the mirror.
pub const TARGET: &str = "refs/gitsync/target";

fn git(mirror: &Path) -> tokio::process::Command {
    let mut c = tokio::process::Command::new("git");
    c.arg("--git-dir")
        .arg(mirror)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

async fn output(mut c: tokio::process::Command, timeout: Duration, what: &str) -> Result<String> {
    let out = tokio::time::timeout(timeout, c.output())
        .await
        .map_err(|_| anyhow!("{what} took longer than {timeout:?}"))?
        .with_context(|| format!("{what}: running git (is it installed?)"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A bare repository that only gitsync writes to.
pub async fn ensure_mirror(mirror: &Path) -> Result<()> {
    if mirror.join("HEAD").is_file() {
        return Ok(());
    }
    let tmp = mirror.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    let mut c = tokio::process::Command::new("git");
    c.args(["init", "--bare", "--quiet"]).arg(&tmp);
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    output(c, Duration::from_secs(30), "git init").await?;
    std::fs::rename(&tmp, mirror).with_context(|| format!("creating {}", mirror.display()))?;
    Ok(())
}

/// Fetch the spec's ref (shallow unless depth is 0; a force-pushed ref is followed) and
/// return its commit.
pub async fn fetch(spec: &Spec, mirror: &Path) -> Result<String> {
    let mut c = git(mirror);
    c.args([
        "fetch",
        "--quiet",
        "--no-tags",
        "--force",
        "--no-write-fetch-head",
    ]);
    if spec.depth > 0 {
        c.arg(format!("--depth={}", spec.depth));
    }
    c.arg("--")
        .arg(&spec.repo)
        .arg(format!("+{}:{TARGET}", spec.reference));
    credentials(spec, &mut c)?;
    output(
        c,
        spec.fetch_timeout,
        &format!("fetching {} from {}", spec.reference, spec.repo),
    )
    .await?;
    let mut c = git(mirror);
    c.args(["rev-parse", "--verify", "--quiet"])
        .arg(format!("{TARGET}^{{commit}}"));
    let commit = output(c, Duration::from_secs(30), "resolving the fetched ref").await?;
    if !super::is_hash(&commit) {
        bail!("`{}` does not name a commit", spec.reference);
    }
    Ok(commit)
}

/// Secrets go to git through its environment (`GIT_CONFIG_*`, read by git only), never
/// its argv, which every user can read in /proc.
fn credentials(spec: &Spec, c: &mut tokio::process::Command) -> Result<()> {
    let cr = &spec.credentials;
    if let Some(f) = &cr.token_file {
        let token = std::fs::read_to_string(f)
            .with_context(|| format!("reading the token file {}", f.display()))?;
        let user = cr.username.as_deref().unwrap_or("x-access-token");
        let basic =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{}", token.trim()));
        c.env("GIT_CONFIG_COUNT", "1")
            .env("GIT_CONFIG_KEY_0", "http.extraHeader")
            .env(
                "GIT_CONFIG_VALUE_0",
                format!("Authorization: Basic {basic}"),
            );
    }
    if let (Some(key), Some(known)) = (&cr.ssh_key_file, &cr.known_hosts_file) {
        for f in [key, known] {
            std::fs::metadata(f).with_context(|| format!("reading {}", f.display()))?;
        }
        c.env(
            "GIT_SSH_COMMAND",
            format!(
                "ssh -i {} -o IdentitiesOnly=yes -o UserKnownHostsFile={} -o StrictHostKeyChecking=yes -o BatchMode=yes",
                quote(key),
                quote(known)
            ),
        );
    }
    Ok(())
}

fn quote(p: &Path) -> String {
    format!("'{}'", p.to_string_lossy().replace('\'', r"'\''"))
}

/// Write `commit`'s tree into `dest` (created; must not exist or be empty) with gix: plain
/// files with their exec bits and symlinks; a submodule (gitlink) is an empty directory.
///
/// With `reuse` (the published commit and its tree), a file whose blob and mode are the same in
/// both commits is hard-linked from that tree instead of written, when the file there still has
/// the blob's size (a tree edited in place is not trusted). Returns how many were linked.
pub fn checkout(
    repo_dir: &Path,
    commit: &str,
    dest: &Path,
    reuse: Option<(&str, &Path)>,
) -> Result<usize> {
    let repo = gix::open(repo_dir).with_context(|| format!("opening {}", repo_dir.display()))?;
    let tree_of = |c: &str| -> Result<gix::ObjectId> {
        let id = gix::ObjectId::from_hex(c.as_bytes())
            .with_context(|| format!("`{c}` is not a commit id"))?;
        Ok(repo
            .find_object(id)
            .with_context(|| format!("finding {c}"))?
            .peel_to_commit()?
            .tree_id()?
            .detach())
    };
    let mut index = repo.index_from_tree(&tree_of(commit)?)?;
    std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    let mut linked = 0;
    if let Some((prev, prev_dir)) = reuse {
        // A previous commit the mirror no longer has (a shallow fetch after a force push)
        // just means nothing is reused.
        if let Ok(prev_index) = tree_of(prev).and_then(|t| Ok(repo.index_from_tree(&t)?)) {
            let before: std::collections::HashMap<
                &gix::bstr::BStr,
                (gix::ObjectId, gix::index::entry::Mode),
            > = prev_index
                .entries()
                .iter()
                .map(|e| (e.path(&prev_index), (e.id, e.mode)))
                .collect();
            let mut done = std::collections::HashSet::new();
            for e in index.entries() {
                let path = e.path(&index);
                let plain = e.mode == gix::index::entry::Mode::FILE
                    || e.mode == gix::index::entry::Mode::FILE_EXECUTABLE;
                if !plain || before.get(path) != Some(&(e.id, e.mode)) {
                    continue;
                }
                let Ok(rel) = gix::path::from_bstr(path) else {
                    continue;
                };
                let (src, dst) = (prev_dir.join(&rel), dest.join(&rel));
                let same_size = std::fs::symlink_metadata(&src).is_ok_and(|m| {
                    m.file_type().is_file()
                        && repo.find_header(e.id).is_ok_and(|h| h.size() == m.len())
                });
                if !same_size {
                    continue;
                }
                if let Some(parent) = dst.parent() {
                    std::fs::create_dir_all(parent)
                        .with_context(|| format!("creating {}", parent.display()))?;
                }
                // Another filesystem or a link limit: the file is written instead.
                if std::fs::hard_link(&src, &dst).is_ok() {
                    done.insert(path.to_owned());
                }
            }
            linked = done.len();
            index.remove_entries(|_, path, _| done.contains(path));
        }
    }
    let mut opts =
        repo.checkout_options(gix::worktree::stack::state::attributes::Source::IdMapping)?;
    opts.destination_is_initially_empty = true;
    let outcome = gix::worktree::state::checkout(
        &mut index,
        dest,
        repo.objects.clone().into_arc()?,
        &gix::progress::Discard,
        &gix::progress::Discard,
        &std::sync::atomic::AtomicBool::new(false),
        opts,
    )?;
    if let Some(e) = outcome.errors.first() {
        bail!(
            "{} file(s) could not be written, the first {}: {}",
            outcome.errors.len(),
            e.path,
            e.error
        );
    }
    if let Some(c) = outcome.collisions.first() {
        bail!(
            "{} path(s) collide on this filesystem, the first {}",
            outcome.collisions.len(),
            c.path
        );
    }
    Ok(linked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_reach_git_by_environment_never_argv() {
        let dir = std::env::temp_dir().join(format!("gitsync-cred-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("token"), "s3cr3t-token\n").unwrap();
        std::fs::write(dir.join("key"), "k").unwrap();
        std::fs::write(dir.join("known"), "h").unwrap();
        let mut spec: Spec =
            serde_yaml::from_str("repo: https://git.example/a.git\nroot: /r\n").unwrap();
        spec.credentials.token_file = Some(dir.join("token"));
        spec.credentials.ssh_key_file = Some(dir.join("key"));
        spec.credentials.known_hosts_file = Some(dir.join("known"));
        let mut c = git(Path::new("/m"));
        c.arg("fetch");
        credentials(&spec, &mut c).unwrap();
        let std = c.as_std();
        let argv: Vec<String> = std
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(!argv.iter().any(|a| a.contains("s3cr3t")), "{argv:?}");
        let env: std::collections::HashMap<String, String> = std
            .get_envs()
            .filter_map(|(k, v)| {
                Some((
                    k.to_string_lossy().into_owned(),
                    v?.to_string_lossy().into_owned(),
                ))
            })
            .collect();
        let header = &env["GIT_CONFIG_VALUE_0"];
        let expected =
            base64::engine::general_purpose::STANDARD.encode("x-access-token:s3cr3t-token");
        assert_eq!(header, &format!("Authorization: Basic {expected}"));
        assert_eq!(env["GIT_CONFIG_KEY_0"], "http.extraHeader");
        let ssh = &env["GIT_SSH_COMMAND"];
        assert!(
            ssh.contains("StrictHostKeyChecking=yes") && ssh.contains("known'"),
            "{ssh}"
        );
        assert_eq!(env["GIT_TERMINAL_PROMPT"], "0");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
