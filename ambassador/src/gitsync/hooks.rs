//! Pre- and post-publish hooks: each attempt bounded by `hook_timeout` (the whole process
//! group is killed when it expires), failures retried `hook_retries` times with doubling
//! backoff. Hooks are idempotent by contract: the post-publish hook of the published commit
//! runs again at start when an earlier run did not finish it.

use std::{path::Path, process::Stdio, str::FromStr as _, time::Duration};

use anyhow::{anyhow, bail, Context as _, Result};
use bytes::Bytes;
use http_body_util::Full;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt as _;
use tracing::warn;

use super::{PostPublish, Spec};

/// `HUP`, `SIGHUP` or a number.
pub fn parse_signal(s: &str) -> Result<Signal> {
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| anyhow!("{n} is not a signal number"));
    }
    let name = s.trim().to_ascii_uppercase();
    let name = if name.starts_with("SIG") {
        name
    } else {
        format!("SIG{name}")
    };
    Signal::from_str(&name).map_err(|_| anyhow!("`{s}` is not a signal name"))
}

pub async fn pre_publish(spec: &Spec, cmd: &str, tree: &Path, commit: &str) -> Result<()> {
    retry(spec, "pre-publish", || shell(spec, cmd, tree, commit))
        .await
        .context("pre-publish hook")
}

pub async fn post_publish(spec: &Spec, p: &PostPublish, tree: &Path, commit: &str) -> Result<()> {
    retry(spec, "post-publish", || async {
        if let Some(cmd) = &p.command {
            shell(spec, cmd, tree, commit).await
        } else if let Some(sig) = &p.signal {
            let file = p.pid_file.as_deref().unwrap_or(Path::new(""));
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            let pid: i32 = text
                .trim()
                .parse()
                .with_context(|| format!("{} does not hold a pid", file.display()))?;
            kill(Pid::from_raw(pid), parse_signal(sig)?)
                .with_context(|| format!("sending {sig} to {pid}"))
        } else if let Some(url) = &p.http {
            post(url, commit, spec.hook_timeout).await
        } else {
            Ok(())
        }
    })
    .await
    .context("post-publish hook")
}

async fn retry<F, Fut>(spec: &Spec, what: &str, mut f: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let mut delay = Duration::from_millis(500);
    let mut attempt = 0;
    loop {
        match f().await {
            Ok(()) => return Ok(()),
            Err(e) if attempt < spec.hook_retries => {
                attempt += 1;
                warn!(job = %spec.name, "{what} hook failed (attempt {attempt} of {}), retrying in {delay:?}: {e:#}", spec.hook_retries + 1);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
            Err(e) => return Err(e.context(format!("failed {} time(s)", spec.hook_retries + 1))),
        }
    }
}

/// Run `sh -c cmd` in `tree` with the commit in the environment; its output's tail is the
/// error on failure.
async fn shell(spec: &Spec, cmd: &str, tree: &Path, commit: &str) -> Result<()> {
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .current_dir(tree)
        .env("GITSYNC_COMMIT", commit)
        .env("GITSYNC_TREE", tree)
        .env("GITSYNC_REF", &spec.reference)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .context("starting sh")?;
    let pid = child.id().map(|p| Pid::from_raw(p as i32));
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let run = async {
        let (mut o, mut e) = (Vec::new(), Vec::new());
        let (_, _, status) = tokio::join!(
            out.read_to_end(&mut o),
            err.read_to_end(&mut e),
            child.wait()
        );
        o.extend_from_slice(&e);
        (status, o)
    };
    match tokio::time::timeout(spec.hook_timeout, run).await {
        Ok((status, output)) => {
            let status = status.context("waiting for the hook")?;
            if status.success() {
                Ok(())
            } else {
                bail!("`{cmd}` exited with {status}: {}", tail(&output))
            }
        }
        Err(_) => {
            if let Some(pid) = pid {
                let _ = killpg(pid, Signal::SIGKILL);
            }
            bail!(
                "`{cmd}` took longer than {:?} and was killed",
                spec.hook_timeout
            )
        }
    }
}

fn tail(output: &[u8]) -> String {
    let s = String::from_utf8_lossy(output);
    let s = s.trim();
    let start = s
        .char_indices()
        .rev()
        .nth(1999)
        .map(|(i, _)| i)
        .unwrap_or(0);
    if s.is_empty() {
        "(no output)".into()
    } else {
        s[start..].to_string()
    }
}

/// POST `{"commit": ...}` to an http:// URL; 2xx is success.
async fn post(url: &str, commit: &str, timeout: Duration) -> Result<()> {
    let uri: hyper::Uri = url
        .parse()
        .with_context(|| format!("`{url}` is not a URL"))?;
    let host = uri.host().ok_or_else(|| anyhow!("`{url}` has no host"))?;
    let port = uri.port_u16().unwrap_or(80);
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let req = hyper::Request::post(path)
        .header("host", host)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            serde_json::json!({ "commit": commit }).to_string(),
        )))?;
    let call = async {
        let s = tokio::net::TcpStream::connect((host, port))
            .await
            .with_context(|| format!("connecting to {host}:{port}"))?;
        crate::admin::send(hyper_util::rt::TokioIo::new(s), req).await
    };
    let (status, body) = tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| anyhow!("{url} did not answer within {timeout:?}"))??;
    if !(200..300).contains(&status) {
        bail!("{url} answered {status}: {}", tail(body.as_bytes()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_by_name_and_number() {
        assert_eq!(parse_signal("HUP").unwrap(), Signal::SIGHUP);
        assert_eq!(parse_signal("sigusr1").unwrap(), Signal::SIGUSR1);
        assert_eq!(parse_signal("15").unwrap(), Signal::SIGTERM);
        assert!(parse_signal("NOPE").is_err());
    }

    #[tokio::test]
    async fn a_hook_that_hangs_is_killed_and_retried() {
        let mut spec: Spec = serde_yaml::from_str("repo: x\nroot: /tmp\n").unwrap();
        spec.hook_timeout = Duration::from_millis(200);
        spec.hook_retries = 1;
        let t = std::time::Instant::now();
        let e = pre_publish(&spec, "sleep 30", Path::new("/tmp"), "c")
            .await
            .unwrap_err();
        assert!(format!("{e:#}").contains("killed"), "{e:#}");
        // Two attempts of 200 ms and one 500 ms pause; nowhere near the 30 s sleep.
        assert!(t.elapsed() < Duration::from_secs(5));
        let e = pre_publish(
            &spec,
            "echo broken build >&2; exit 3",
            Path::new("/tmp"),
            "c",
        )
        .await
        .unwrap_err();
        assert!(format!("{e:#}").contains("broken build"), "{e:#}");
        pre_publish(
            &spec,
            "test \"$GITSYNC_COMMIT\" = c",
            Path::new("/tmp"),
            "c",
        )
        .await
        .unwrap();
    }
}
