//! The admin API: HTTP/1.1 (hyper) on a unix socket (mode 0600, `STATE_DIR/admin.sock` by
//! default), or on a loopback TCP address with a bearer token.
//!
//! `GET /live`, `/ready`, `/status` (JSON, as `status --json`), `/config` (YAML), `/metrics`
//! (Prometheus), `/` (a live dashboard); `POST /weight`, `/drain`, `/undrain` with a JSON body
//! `{"service": S, "backend": B[, "weight": N]}`, which the CLI's `set-weight`, `drain` and
//! `undrain` use. Changes go to the daemon's loop as [`Command`]s, so they are applied exactly
//! like a config reload.

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    str::FromStr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use anyhow::{anyhow, bail, Context as _, Result};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{body::Incoming, server::conn::http1, service::service_fn, Method, Request, Response};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::overrides::Refused;

/// Where the admin API listens: a unix socket path, or `IP:PORT` (loopback only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl FromStr for Endpoint {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.parse::<SocketAddr>() {
            Ok(a) => Endpoint::Tcp(a),
            Err(_) => Endpoint::Unix(PathBuf::from(s)),
        })
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "{a}"),
        }
    }
}

impl Endpoint {
    /// The default: a socket in the state directory.
    pub fn default_for(state_dir: &Path) -> Endpoint {
        Endpoint::Unix(state_dir.join("admin.sock"))
    }
}

/// A change asked for through the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    SetWeight {
        service: String,
        backend: String,
        weight: u32,
    },
    Drain {
        service: String,
        backend: String,
        drained: bool,
    },
}

/// A [`Command`] and where the daemon answers: the new config generation, or why not.
pub struct AdminRequest {
    pub cmd: Command,
    pub reply: oneshot::Sender<Result<u64, Refused>>,
}

pub struct Admin {
    state_dir: PathBuf,
    tx: mpsc::Sender<AdminRequest>,
    /// Set once the daemon serves its first config.
    pub ready: AtomicBool,
    /// Required (as `Authorization: Bearer TOKEN`) on TCP.
    token: Option<String>,
    /// The last status report and when it was built (see [`report`]).
    last_report: tokio::sync::Mutex<Option<(std::time::Instant, Arc<crate::status::StatusReport>)>>,
}

impl Admin {
    pub fn new(
        state_dir: PathBuf,
        token: Option<String>,
    ) -> (Arc<Admin>, mpsc::Receiver<AdminRequest>) {
        let (tx, rx) = mpsc::channel(16);
        (
            Arc::new(Admin {
                state_dir,
                tx,
                ready: AtomicBool::new(false),
                token,
                last_report: Default::default(),
            }),
            rx,
        )
    }
}

/// Read a token file: one line, at least 16 characters; never logged.
pub fn read_token(path: &Path) -> Result<String> {
    let t = std::fs::read_to_string(path)
        .with_context(|| format!("reading the admin token file {}", path.display()))?;
    let t = t.trim().to_string();
    if t.len() < 16 {
        bail!(
            "the admin token in {} is shorter than 16 characters: write a longer random one (e.g. `head -c 32 /dev/urandom | base64`)",
            path.display()
        );
    }
    Ok(t)
}

/// Bind the endpoint and serve it in the background.
pub async fn serve(endpoint: &Endpoint, admin: Arc<Admin>) -> Result<()> {
    match endpoint {
        Endpoint::Unix(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            // The daemon holds the state-directory lock: a socket left here is a dead one's.
            let _ = std::fs::remove_file(path);
            let l = tokio::net::UnixListener::bind(path)
                .with_context(|| format!("binding the admin socket {}", path.display()))?;
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
            tokio::spawn(async move {
                loop {
                    match l.accept().await {
                        Ok((s, _)) => spawn_conn(TokioIo::new(s), admin.clone(), false),
                        Err(e) => {
                            warn!("admin socket accept: {e}");
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        }
                    }
                }
            });
        }
        Endpoint::Tcp(addr) => {
            if !addr.ip().is_loopback() {
                bail!("the admin API listens on loopback only ({addr} is not): use 127.0.0.1 or [::1], or a unix socket path");
            }
            if admin.token.is_none() {
                bail!("a TCP admin endpoint needs a token: pass --admin-token-file FILE");
            }
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the admin API on {addr}"))?;
            tokio::spawn(async move {
                loop {
                    match l.accept().await {
                        Ok((s, _)) => spawn_conn(TokioIo::new(s), admin.clone(), true),
                        Err(e) => {
                            warn!("admin accept: {e}");
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        }
                    }
                }
            });
        }
    }
    Ok(())
}

fn spawn_conn<I>(io: TokioIo<I>, admin: Arc<Admin>, tcp: bool)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let svc = service_fn(move |req| handle(admin.clone(), tcp, req));
        if let Err(e) = http1::Builder::new().serve_connection(io, svc).await {
            debug!("admin connection: {e}");
        }
    });
}

pub(crate) type Resp = Response<Full<Bytes>>;

pub(crate) fn reply(status: u16, content_type: &str, body: impl Into<Bytes>) -> Resp {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("cache-control", "no-store")
        .body(Full::new(body.into()))
        .expect("static parts are valid")
}

pub(crate) fn text(status: u16, body: impl Into<String>) -> Resp {
    let mut b: String = body.into();
    if !b.ends_with('\n') {
        b.push('\n');
    }
    reply(status, "text/plain; charset=utf-8", b)
}

/// The JSON body of the POST endpoints.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendBody {
    service: String,
    backend: String,
    #[serde(default)]
    weight: Option<u32>,
}

/// Compare without an early exit, so response timing says nothing about the token.
pub(crate) fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

async fn handle(admin: Arc<Admin>, tcp: bool, req: Request<Incoming>) -> Result<Resp, Infallible> {
    // The dashboard page itself holds no data: it is served without the token, and its
    // script sends the token (from the URL fragment, `/#token=...`) with each request.
    let page = req.method() == Method::GET && req.uri().path() == "/";
    if tcp && !page {
        let want = admin.token.as_deref().unwrap_or_default();
        let got = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if !same(got.as_bytes(), want.as_bytes()) {
            return Ok(text(
                401,
                "missing or wrong token: send `Authorization: Bearer TOKEN` (the CLI's --admin-token-file)",
            ));
        }
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let resp = match (method.clone(), path.as_str()) {
        (Method::GET, "/live") => text(200, "ok"),
        (Method::GET, "/ready") => {
            if admin.ready.load(Ordering::Relaxed) {
                text(200, "ready")
            } else {
                text(503, "starting: the first config is not applied yet")
            }
        }
        (Method::GET, "/status") => match report(&admin).await {
            Ok(r) => reply(
                200,
                "application/json",
                serde_json::to_vec_pretty(&*r).unwrap_or_default(),
            ),
            Err(e) => text(503, format!("{e:#}")),
        },
        (Method::GET, "/metrics") => match report(&admin).await {
            Ok(r) => reply(200, crate::metrics::CONTENT_TYPE, crate::metrics::encode_report(&r)),
            Err(e) => text(503, format!("{e:#}")),
        },
        (Method::GET, "/config") => match crate::daemon::State::read(&admin.state_dir) {
            Ok(st) => reply(
                200,
                "application/yaml",
                serde_yaml::to_string(&st.config).unwrap_or_default(),
            ),
            Err(e) => text(503, format!("{e:#}")),
        },
        (Method::GET, "/") => reply(200, "text/html; charset=utf-8", DASHBOARD),
        (Method::POST, "/weight" | "/drain" | "/undrain") => {
            let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return Ok(text(400, format!("reading the body: {e}"))),
            };
            match command(&path, &body) {
                Ok(cmd) => submit(&admin, cmd).await,
                Err(e) => text(400, e.to_string()),
            }
        }
        (_, "/live" | "/ready" | "/status" | "/metrics" | "/config" | "/") => {
            text(405, format!("{path} takes GET"))
        }
        (_, "/weight" | "/drain" | "/undrain") => text(405, format!("{path} takes POST")),
        _ => text(
            404,
            format!("no endpoint {path}: try /live, /ready, /status, /config, /metrics, / or POST /weight, /drain, /undrain"),
        ),
    };
    debug!(%method, %path, status = resp.status().as_u16(), "admin request");
    Ok(resp)
}

/// The status report, shared by requests within a second of each other: building it walks the
/// whole connection table (seconds at a million entries), so a dashboard polling every second,
/// a scraper and the CLI must not each start a walk. One walk runs at a time.
async fn report(admin: &Admin) -> Result<Arc<crate::status::StatusReport>> {
    let mut last = admin.last_report.lock().await;
    if let Some((at, r)) = last.as_ref() {
        if at.elapsed() < std::time::Duration::from_secs(1) {
            return Ok(r.clone());
        }
    }
    let dir = admin.state_dir.clone();
    let r = Arc::new(
        tokio::task::spawn_blocking(move || crate::status::report(&dir))
            .await
            .map_err(|e| anyhow!("status task: {e}"))??,
    );
    *last = Some((std::time::Instant::now(), r.clone()));
    Ok(r)
}

/// The command a POST asks for, or why its body is wrong.
fn command(path: &str, body: &[u8]) -> Result<Command> {
    let b: BackendBody = serde_json::from_slice(body).map_err(|e| {
        anyhow!(
            "the body must be JSON {{\"service\": S, \"backend\": B{}}}: {e}",
            if path == "/weight" {
                ", \"weight\": N"
            } else {
                ""
            }
        )
    })?;
    Ok(match path {
        "/weight" => Command::SetWeight {
            service: b.service,
            backend: b.backend,
            weight: b
                .weight
                .ok_or_else(|| anyhow!("/weight needs \"weight\": N in the body"))?,
        },
        _ => {
            if b.weight.is_some() {
                bail!("{path} takes no \"weight\"");
            }
            Command::Drain {
                service: b.service,
                backend: b.backend,
                drained: path == "/drain",
            }
        }
    })
}

async fn submit(admin: &Admin, cmd: Command) -> Resp {
    let (tx, rx) = oneshot::channel();
    if admin
        .tx
        .send(AdminRequest { cmd, reply: tx })
        .await
        .is_err()
    {
        return text(503, "the daemon is shutting down");
    }
    match rx.await {
        Ok(Ok(generation)) => reply(
            200,
            "application/json",
            serde_json::to_vec(&serde_json::json!({ "generation": generation }))
                .unwrap_or_default(),
        ),
        Ok(Err(r)) => text(r.status, r.message),
        Err(_) => text(503, "the daemon is shutting down"),
    }
}

/// A client for the CLI: one request, the status code and body.
pub async fn call(
    endpoint: &Endpoint,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<(u16, String)> {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "ambassador");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = match body {
        Some(b) => req
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(serde_json::to_vec(&b)?)))?,
        None => req.body(Full::new(Bytes::new()))?,
    };
    let hint = "is `ambassador run` running? (--admin/--state-dir must match the daemon's)";
    match endpoint {
        Endpoint::Unix(p) => {
            let s = tokio::net::UnixStream::connect(p)
                .await
                .with_context(|| format!("connecting to {}: {hint}", p.display()))?;
            send(TokioIo::new(s), req).await
        }
        Endpoint::Tcp(a) => {
            let s = tokio::net::TcpStream::connect(a)
                .await
                .with_context(|| format!("connecting to {a}: {hint}"))?;
            send(TokioIo::new(s), req).await
        }
    }
}

pub(crate) async fn send<I>(io: TokioIo<I>, req: Request<Full<Bytes>>) -> Result<(u16, String)>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The dashboard: services, backends, weights, drain state, open flows, and each backend's
/// share of new flows over the last second as bars, refreshed every second from `/status`.
const DASHBOARD: &str = include_str!("dashboard.html");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn post_bodies_are_checked_with_the_reason() {
        assert_eq!(
            command("/weight", br#"{"service":"s","backend":"b","weight":3}"#).unwrap(),
            Command::SetWeight {
                service: "s".into(),
                backend: "b".into(),
                weight: 3
            }
        );
        assert_eq!(
            command("/undrain", br#"{"service":"s","backend":"b"}"#).unwrap(),
            Command::Drain {
                service: "s".into(),
                backend: "b".into(),
                drained: false
            }
        );
        let e = command("/weight", br#"{"service":"s","backend":"b"}"#).unwrap_err();
        assert!(e.to_string().contains("needs \"weight\""), "{e}");
        let e = command("/drain", br#"{"service":"s","backend":"b","wieght":1}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        assert!(command("/drain", b"not json").is_err());
    }

    #[test]
    fn endpoints_parse_as_tcp_or_unix() {
        assert_eq!(
            "127.0.0.1:9901".parse::<Endpoint>().unwrap(),
            Endpoint::Tcp("127.0.0.1:9901".parse().unwrap())
        );
        assert_eq!(
            "/run/a.sock".parse::<Endpoint>().unwrap(),
            Endpoint::Unix("/run/a.sock".into())
        );
    }
}
