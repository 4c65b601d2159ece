//! The userspace data plane: proxies TCP (optionally terminating TLS: the sidecar) and UDP
//! (with a per-client session table) for the services given to it, choosing backends with the
//! same [`ServicePlan::pick`] the kernel tables are built from. Used for every service when XDP
//! is unavailable, and for TLS services always.
//!
//! Each listener reads its service through an `ArcSwap`, so a reload swaps one pointer: new
//! connections see the new plan, open ones keep the backend they have.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use arc_swap::ArcSwap;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::{TcpListener, TcpStream, UdpSocket},
    time::timeout,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

use super::ServicePlan;
use crate::{
    config::{Limits, Listen, Proto},
    proxy_protocol,
    tls::Sidecar,
};

/// One service as the userspace data plane runs it.
pub struct ServiceRuntime {
    pub plan: ServicePlan,
    pub limits: Limits,
    pub tls: Option<Arc<Sidecar>>,
    /// With TLS: a plain-HTTP port on the same address that redirects to HTTPS.
    pub redirect_http: Option<u16>,
}

impl ServiceRuntime {
    /// The backend a new connection from `client` goes to (the kernel's choice, by construction).
    pub fn route(&self, client: SocketAddr) -> Option<SocketAddr> {
        self.plan.pick(client).map(|b| b.address)
    }
}

enum Kind {
    Service,
    Redirect { https_port: u16 },
}

struct Listener {
    state: Arc<ArcSwap<ServiceRuntime>>,
    stop: CancellationToken,
}

/// Counters the daemon publishes for `status`.
#[derive(Debug, Default)]
pub struct Counters {
    pub accepted: AtomicU64,
    pub refused_over_limit: AtomicU64,
    pub handshake_failures: AtomicU64,
    pub backend_failures: AtomicU64,
    pub idle_closed: AtomicU64,
    /// Where failed connects are reported for passive health checking (service, backend).
    pub failed_connects:
        std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<(String, SocketAddr)>>,
}

impl Counters {
    /// (name, value) pairs, in a fixed order.
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        [
            ("accepted", &self.accepted),
            ("refused_over_limit", &self.refused_over_limit),
            ("handshake_failures", &self.handshake_failures),
            ("backend_failures", &self.backend_failures),
            ("idle_closed", &self.idle_closed),
        ]
        .into_iter()
        .map(|(n, c)| (n.to_string(), c.load(Ordering::Relaxed)))
        .collect()
    }
}

/// One single-threaded runtime per core. Each TCP service has one `SO_REUSEPORT` listener per
/// worker, so the kernel spreads connections and a connection lives on one thread from accept
/// to close, as in haproxy and nginx: no cross-thread wake-ups on the data path.
pub(crate) struct Workers {
    pub(crate) handles: Vec<tokio::runtime::Handle>,
}

impl Workers {
    /// One per core.
    pub(crate) fn default_count() -> usize {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    }

    pub(crate) fn start(n: usize) -> Workers {
        let n = n.max(1);
        let handles = (0..n)
            .map(|i| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("worker runtime");
                let h = rt.handle().clone();
                std::thread::Builder::new()
                    .name(format!("ambassador-worker-{i}"))
                    .spawn(move || rt.block_on(std::future::pending::<()>()))
                    .expect("worker thread");
                h
            })
            .collect();
        Workers { handles }
    }
}

pub struct UserspaceDataplane {
    listeners: HashMap<Listen, Listener>,
    tracker: TaskTracker,
    workers: Workers,
    pub counters: Arc<Counters>,
}

impl Default for UserspaceDataplane {
    fn default() -> Self {
        UserspaceDataplane::with_workers(Workers::default_count())
    }
}

impl UserspaceDataplane {
    pub fn new() -> UserspaceDataplane {
        UserspaceDataplane::default()
    }

    /// With `n` worker threads instead of one per core.
    pub fn with_workers(n: usize) -> UserspaceDataplane {
        UserspaceDataplane {
            listeners: HashMap::new(),
            tracker: TaskTracker::new(),
            workers: Workers::start(n),
            counters: Arc::default(),
        }
    }

    /// Serve exactly `services`: bind what is new (all binds first, so a failure changes
    /// nothing), swap the plans of what stays, stop accepting on what is gone (its open
    /// connections finish on their own).
    pub async fn apply(&mut self, services: Vec<ServiceRuntime>) -> Result<()> {
        let mut wanted: HashMap<Listen, (ServiceRuntime, Option<Listen>)> = HashMap::new();
        let mut redirects: HashMap<Listen, Arc<ArcSwap<ServiceRuntime>>> = HashMap::new();
        for s in services {
            let redirect = s.redirect_http.map(|port| Listen {
                addr: SocketAddr::new(s.plan.listen.addr.ip(), port),
                proto: Proto::Tcp,
            });
            wanted.insert(s.plan.listen, (s, redirect));
        }
        // 1. Bind every new socket before touching anything.
        let mut new_tcp = Vec::new();
        let mut new_udp = Vec::new();
        for (listen, (_, redirect)) in &wanted {
            for (l, is_redirect) in [(Some(*listen), false), (*redirect, true)] {
                let Some(l) = l else { continue };
                if self.listeners.contains_key(&l) {
                    continue;
                }
                match l.proto {
                    Proto::Tcp => {
                        let socks = (0..self.workers.handles.len())
                            .map(|_| bind_tcp(l.addr))
                            .collect::<Result<Vec<_>>>()?;
                        new_tcp.push((l, is_redirect, *listen, socks))
                    }
                    Proto::Udp => new_udp.push((l, bind_udp(l.addr)?)),
                }
            }
        }
        // 2. Swap plans of listeners that stay; remember states for the new ones.
        let mut states: HashMap<Listen, Arc<ArcSwap<ServiceRuntime>>> = HashMap::new();
        for (listen, (rt, redirect)) in wanted {
            let state = match self.listeners.get(&listen) {
                Some(l) => {
                    l.state.store(Arc::new(rt));
                    l.state.clone()
                }
                None => Arc::new(ArcSwap::from_pointee(rt)),
            };
            if let Some(r) = redirect {
                redirects.insert(r, state.clone());
            }
            states.insert(listen, state);
        }
        // 3. Stop listeners no longer wanted.
        let keep: Vec<Listen> = states.keys().chain(redirects.keys()).copied().collect();
        self.listeners.retain(|l, listener| {
            let k = keep.contains(l);
            if !k {
                info!(listen = %l, "stopped accepting");
                listener.stop.cancel();
            }
            k
        });
        // 4. Start the new ones.
        for (l, is_redirect, service, socks) in new_tcp {
            let state = if is_redirect {
                redirects[&l].clone()
            } else {
                states[&service].clone()
            };
            let stop = CancellationToken::new();
            // max_connections is per service: the workers share one count.
            let active = Arc::new(AtomicUsize::new(0));
            for (sock, worker) in socks.into_iter().zip(&self.workers.handles) {
                let kind = if is_redirect {
                    Kind::Redirect {
                        https_port: service.addr.port(),
                    }
                } else {
                    Kind::Service
                };
                let (state, stop, tracker, counters, active) = (
                    state.clone(),
                    stop.clone(),
                    self.tracker.clone(),
                    self.counters.clone(),
                    active.clone(),
                );
                self.tracker.spawn_on(
                    async move {
                        // Registered with this worker's reactor.
                        match TcpListener::from_std(sock) {
                            Ok(sock) => {
                                accept_loop(sock, state, kind, stop, tracker, counters, active)
                                    .await
                            }
                            Err(e) => warn!("listener setup failed: {e}"),
                        }
                    },
                    worker,
                );
            }
            info!(listen = %l, "userspace data plane accepting");
            self.listeners.insert(l, Listener { state, stop });
        }
        for (l, sock) in new_udp {
            let state = states[&l].clone();
            let stop = CancellationToken::new();
            self.tracker
                .spawn(udp_loop(Arc::new(sock), state.clone(), stop.clone()));
            info!(listen = %l, "userspace data plane receiving");
            self.listeners.insert(l, Listener { state, stop });
        }
        Ok(())
    }

    /// The runtime serving `listen`, if any (tests and status).
    pub fn runtime(&self, listen: &Listen) -> Option<Arc<ServiceRuntime>> {
        self.listeners.get(listen).map(|l| l.state.load_full())
    }

    /// Stop accepting everywhere and let open connections finish, up to `deadline`.
    /// Returns whether everything finished in time.
    pub async fn drain(self, deadline: Duration) -> bool {
        for l in self.listeners.values() {
            l.stop.cancel();
        }
        self.tracker.close();
        timeout(deadline, self.tracker.wait()).await.is_ok()
    }
}

pub(crate) fn bind_tcp(addr: SocketAddr) -> Result<std::net::TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())
        .with_context(|| format!("binding {addr}/tcp"))?;
    s.listen(4096)?;
    Ok(s.into())
}

fn bind_udp(addr: SocketAddr) -> Result<UdpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        None,
    )?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())
        .with_context(|| format!("binding {addr}/udp"))?;
    Ok(UdpSocket::from_std(s.into())?)
}

async fn accept_loop(
    sock: TcpListener,
    state: Arc<ArcSwap<ServiceRuntime>>,
    kind: Kind,
    stop: CancellationToken,
    tracker: TaskTracker,
    counters: Arc<Counters>,
    active: Arc<AtomicUsize>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = sock.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let rt = state.load_full();
        if active.load(Ordering::Relaxed) >= rt.limits.max_connections {
            counters.refused_over_limit.fetch_add(1, Ordering::Relaxed);
            debug!(client = %peer, service = %rt.plan.name, "refused: max_connections reached");
            continue;
        }
        counters.accepted.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let guard = ActiveGuard::new(active.clone());
        let counters = counters.clone();
        match kind {
            Kind::Service => {
                tracker.spawn(async move {
                    let _guard = guard;
                    let local = stream.local_addr().unwrap_or(rt.plan.listen.addr);
                    if let Err(e) = serve_tcp(stream, peer, local, &rt, &counters).await {
                        debug!(client = %peer, service = %rt.plan.name, "connection ended: {e:#}");
                    }
                });
            }
            Kind::Redirect { https_port } => {
                tracker.spawn(async move {
                    let _guard = guard;
                    let t = rt.limits.handshake_timeout;
                    if let Err(e) = timeout(t, redirect(stream, https_port)).await {
                        debug!(client = %peer, "redirect: no request within {t:?}: {e}");
                    }
                });
            }
        }
    }
}

struct ActiveGuard(Arc<AtomicUsize>);

impl ActiveGuard {
    fn new(a: Arc<AtomicUsize>) -> ActiveGuard {
        a.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(a)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve_tcp(
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    rt: &ServiceRuntime,
    counters: &Counters,
) -> Result<()> {
    let Some(backend) = rt.route(peer) else {
        anyhow::bail!("service {} has no backend", rt.plan.name);
    };
    match &rt.tls {
        None => {
            let up = connect(backend, rt, counters).await?;
            splice(stream, up, rt.limits.idle_timeout, counters).await
        }
        Some(sidecar) => {
            let tls = match timeout(rt.limits.handshake_timeout, sidecar.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    counters.handshake_failures.fetch_add(1, Ordering::Relaxed);
                    warn!(client = %peer, service = %rt.plan.name, "TLS handshake failed: {e}");
                    return Ok(());
                }
                Err(_) => {
                    counters.handshake_failures.fetch_add(1, Ordering::Relaxed);
                    warn!(client = %peer, service = %rt.plan.name,
                        "TLS handshake not finished within {:?}: closed", rt.limits.handshake_timeout);
                    return Ok(());
                }
            };
            if let Err(why) = sidecar.check_client(&tls) {
                counters.handshake_failures.fetch_add(1, Ordering::Relaxed);
                warn!(client = %peer, service = %rt.plan.name, "client certificate refused: {why}");
                return Ok(());
            }
            let mut up = connect(backend, rt, counters).await?;
            if let Some(v) = sidecar.proxy_protocol {
                up.write_all(&proxy_protocol::header(v, peer, local))
                    .await?;
            }
            splice(tls, up, rt.limits.idle_timeout, counters).await
        }
    }
}

async fn connect(
    backend: SocketAddr,
    rt: &ServiceRuntime,
    counters: &Counters,
) -> Result<TcpStream> {
    let limit = rt.limits.connect_timeout;
    let e = match timeout(limit, TcpStream::connect(backend)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            return Ok(s);
        }
        Ok(Err(e)) => anyhow::anyhow!("connecting to backend {backend}: {e}"),
        Err(_) => anyhow::anyhow!("connecting to backend {backend}: no answer within {limit:?}"),
    };
    counters.backend_failures.fetch_add(1, Ordering::Relaxed);
    if let Some(tx) = counters.failed_connects.get() {
        let _ = tx.send((rt.plan.name.clone(), backend));
    }
    Err(e)
}

/// Copy both ways until both sides close, or until nothing moved for `idle`.
async fn splice<A, B>(a: A, b: B, idle: Duration, counters: &Counters) -> Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut a = Watched {
        inner: a,
        start,
        last: last.clone(),
    };
    let mut b = Watched {
        inner: b,
        start,
        last: last.clone(),
    };
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    loop {
        let since = Duration::from_millis(last.load(Ordering::Relaxed));
        let wake = start + since + idle;
        tokio::select! {
            r = &mut copy => { r?; return Ok(()); }
            _ = tokio::time::sleep_until(wake.into()) => {
                let quiet = start.elapsed().saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
                if quiet >= idle {
                    counters.idle_closed.fetch_add(1, Ordering::Relaxed);
                    anyhow::bail!("idle for {idle:?}: closed");
                }
            }
        }
    }
}

/// A stream that records when it last read something.
struct Watched<S> {
    inner: S,
    start: Instant,
    last: Arc<AtomicU64>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.last
                .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Answer one plain-HTTP request with a redirect to the same host and path over HTTPS.
async fn redirect(mut s: TcpStream, https_port: u16) -> io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut chunk).await?;
        if n == 0 || buf.len() > 16 * 1024 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let target = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .filter(|t| t.starts_with('/'))
        .unwrap_or("/");
    let host = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("host").then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| {
            s.local_addr()
                .map(|a| a.ip().to_string())
                .unwrap_or_default()
        });
    // Drop any port from Host; add ours unless it is the default.
    let host = match host.rsplit_once(':') {
        Some((h, p))
            if p.chars().all(|c| c.is_ascii_digit()) && !h.ends_with(']') && !h.contains(':') =>
        {
            h.to_string()
        }
        Some((h, p)) if h.ends_with(']') && p.chars().all(|c| c.is_ascii_digit()) => h.to_string(),
        _ => host,
    };
    let port = if https_port == 443 {
        String::new()
    } else {
        format!(":{https_port}")
    };
    let resp = format!(
        "HTTP/1.1 301 Moved Permanently\r\nLocation: https://{host}{port}{target}\r\n\
         Strict-Transport-Security: max-age=31536000\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(resp.as_bytes()).await?;
    s.shutdown().await
}

/// UDP: one upstream socket per client (its session), forgotten after `udp_session_timeout`.
async fn udp_loop(
    sock: Arc<UdpSocket>,
    state: Arc<ArcSwap<ServiceRuntime>>,
    stop: CancellationToken,
) {
    struct Session {
        up: Arc<UdpSocket>,
        last: Arc<AtomicU64>,
        stop: CancellationToken,
    }
    let start = Instant::now();
    let now_ms = move || start.elapsed().as_millis() as u64;
    let mut sessions: HashMap<SocketAddr, Session> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    let mut sweep = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = sweep.tick() => {
                let limit = state.load().limits.udp_session_timeout.as_millis() as u64;
                let now = now_ms();
                sessions.retain(|_, s| {
                    let keep = now.saturating_sub(s.last.load(Ordering::Relaxed)) < limit;
                    if !keep { s.stop.cancel(); }
                    keep
                });
            }
            r = sock.recv_from(&mut buf) => {
                let Ok((n, client)) = r else { continue };
                if !sessions.contains_key(&client) {
                    let rt = state.load_full();
                    if sessions.len() >= rt.limits.max_connections { continue; }
                    let Some(backend) = rt.route(client) else { continue };
                    let local: SocketAddr = if backend.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
                    let Ok(up) = UdpSocket::bind(local).await else { continue };
                    if up.connect(backend).await.is_err() { continue; }
                    let s = Session { up: Arc::new(up), last: Arc::new(AtomicU64::new(now_ms())), stop: CancellationToken::new() };
                    let (up, last, sstop, down) = (s.up.clone(), s.last.clone(), s.stop.clone(), sock.clone());
                    tokio::spawn(async move {
                        let mut b = vec![0u8; 65_536];
                        loop {
                            tokio::select! {
                                _ = sstop.cancelled() => return,
                                r = up.recv(&mut b) => match r {
                                    Ok(n) => {
                                        last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
                                        let _ = down.send_to(&b[..n], client).await;
                                    }
                                    Err(_) => continue,
                                },
                            }
                        }
                    });
                    sessions.insert(client, s);
                }
                let s = &sessions[&client];
                s.last.store(now_ms(), Ordering::Relaxed);
                let _ = s.up.send(&buf[..n]).await;
            }
        }
    }
    for s in sessions.values() {
        s.stop.cancel();
    }
}
