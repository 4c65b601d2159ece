//! The Redis sharding ambassador: clients talk to one address as if to one Redis; each key's
//! command goes to the shard twemproxy would pick.
//!
//! Each client connection is a task on the daemon's multi-threaded runtime (twemproxy runs one
//! thread), with its own connection to each shard. A pipelined batch of commands is split by
//! shard, written to every shard it touches before any reply is awaited, and the replies are
//! put back in request order; multi-key commands (MGET, DEL, EXISTS, TOUCH, UNLINK, MSET) are
//! split per shard and reassembled. A shard that fails, times out or closes fails only the
//! requests that went to it; with `auto_eject_hosts` it leaves the ring after
//! `server_failure_limit` consecutive failures and is retried after `server_retry_timeout_ms`.

use std::{
    io::Cursor,
    net::SocketAddr,
    ops::Range,
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tracing::{debug, warn};

use super::{
    command::{self, Command, Kind},
    dist::Distribution,
    hashed_part,
    resp::{self, Error},
    Hash, Server,
};
use crate::config::{Limits, RedisConfig};

/// Commands taken from one client read before their replies are collected.
const MAX_BATCH: usize = 1024;
/// Connecting to a shard gives up after this when the pool sets no `timeout_ms`.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Per-shard figures, with twemproxy's names.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub requests: AtomicU64,
    pub request_bytes: AtomicU64,
    pub responses: AtomicU64,
    pub response_bytes: AtomicU64,
    pub server_connections: AtomicU64,
    pub server_eof: AtomicU64,
    pub server_err: AtomicU64,
    pub server_timedout: AtomicU64,
    pub server_ejected_at: AtomicU64,
}

/// Per-pool figures, with twemproxy's names.
#[derive(Debug, Default)]
pub struct PoolStats {
    pub client_connections: AtomicU64,
    pub client_eof: AtomicU64,
    pub client_err: AtomicU64,
    pub forward_error: AtomicU64,
    pub fragments: AtomicU64,
    pub server_ejects: AtomicU64,
}

#[derive(Debug, Default)]
struct Health {
    failures: AtomicU32,
    /// Milliseconds since the pool's epoch until which the shard is out of the ring; 0 if in.
    ejected_until: AtomicU64,
}

/// One service's shards, ring and counters. Replaced whole on reload; connections notice and
/// reconnect to the new shards between batches.
#[derive(Debug)]
pub struct Pool {
    pub name: String,
    pub cfg: RedisConfig,
    pub limits: Limits,
    pub servers: Vec<Server>,
    pub addrs: Vec<SocketAddr>,
    tag: Option<[u8; 2]>,
    ring: ArcSwap<Distribution>,
    health: Vec<Health>,
    /// Earliest `ejected_until` of an ejected shard (u64::MAX when none is).
    next_retry: AtomicU64,
    rebuild: Mutex<()>,
    epoch: Instant,
    pub stats: PoolStats,
    pub server_stats: Vec<ServerStats>,
}

impl Pool {
    pub fn new(name: &str, cfg: &RedisConfig, limits: Limits) -> Pool {
        let servers: Vec<Server> = cfg.shards.iter().map(|s| s.server()).collect();
        let live = vec![true; servers.len()];
        Pool {
            name: name.to_string(),
            cfg: cfg.clone(),
            limits,
            addrs: cfg.shards.iter().map(|s| s.address).collect(),
            tag: cfg
                .hash_tag
                .as_ref()
                .and_then(|t| t.as_bytes().try_into().ok()),
            ring: ArcSwap::from_pointee(Distribution::build(cfg.distribution, &servers, &live)),
            health: servers.iter().map(|_| Health::default()).collect(),
            next_retry: AtomicU64::new(u64::MAX),
            rebuild: Mutex::new(()),
            epoch: Instant::now(),
            stats: PoolStats::default(),
            server_stats: servers.iter().map(|_| ServerStats::default()).collect(),
            servers,
        }
    }

    fn hash(&self) -> Hash {
        self.cfg.hash
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// The shard of a key, or None when every shard is ejected.
    pub fn shard_for(&self, key: &[u8]) -> Option<usize> {
        self.ring
            .load()
            .dispatch(self.hash().hash(hashed_part(key, self.tag)))
    }

    /// Put shards whose retry time has come back into the ring.
    fn readmit(&self) {
        if self.now_ms() < self.next_retry.load(Relaxed) {
            return;
        }
        let _g = self.rebuild.lock().unwrap_or_else(|e| e.into_inner());
        let now = self.now_ms();
        for h in &self.health {
            let until = h.ejected_until.load(Relaxed);
            if until != 0 && until <= now {
                h.ejected_until.store(0, Relaxed);
                h.failures.store(0, Relaxed);
            }
        }
        self.rebuild_ring();
    }

    fn rebuild_ring(&self) {
        let live: Vec<bool> = self
            .health
            .iter()
            .map(|h| h.ejected_until.load(Relaxed) == 0)
            .collect();
        let next = self
            .health
            .iter()
            .map(|h| h.ejected_until.load(Relaxed))
            .filter(|&u| u != 0)
            .min()
            .unwrap_or(u64::MAX);
        self.next_retry.store(next, Relaxed);
        self.ring.store(Arc::new(Distribution::build(
            self.cfg.distribution,
            &self.servers,
            &live,
        )));
    }

    fn succeeded(&self, shard: usize) {
        if self.health[shard].failures.load(Relaxed) != 0 {
            self.health[shard].failures.store(0, Relaxed);
        }
    }

    fn failed(&self, shard: usize) {
        let n = self.health[shard].failures.fetch_add(1, Relaxed) + 1;
        if !self.cfg.auto_eject_hosts || n < self.cfg.server_failure_limit {
            return;
        }
        let _g = self.rebuild.lock().unwrap_or_else(|e| e.into_inner());
        if self.health[shard].ejected_until.load(Relaxed) != 0 {
            return;
        }
        let until = self.now_ms() + self.cfg.server_retry_timeout_ms;
        self.health[shard].ejected_until.store(until, Relaxed);
        self.stats.server_ejects.fetch_add(1, Relaxed);
        self.server_stats[shard].server_ejected_at.store(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            Relaxed,
        );
        warn!(pool = %self.name, shard = %self.addrs[shard], "shard ejected after {n} failures; its keys go to the others until it is retried");
        self.rebuild_ring();
    }

    fn timeout(&self) -> Option<Duration> {
        self.cfg.timeout_ms.map(Duration::from_millis)
    }
}

/// A connection to one shard, owned by one client session.
struct ShardConn {
    stream: TcpStream,
    rbuf: Vec<u8>,
    /// Start of the first reply not yet consumed in this batch.
    rpos: usize,
}

async fn connect(pool: &Pool, shard: usize) -> Result<ShardConn, String> {
    let addr = pool.addrs[shard];
    let t = pool.timeout().unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let stream = match tokio::time::timeout(t, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(format!("shard {addr} unavailable: {e}")),
        Err(_) => return Err(format!("shard {addr} unavailable: connect timed out")),
    };
    let _ = stream.set_nodelay(true);
    let mut c = ShardConn {
        stream,
        rbuf: Vec::with_capacity(16 * 1024),
        rpos: 0,
    };
    pool.server_stats[shard]
        .server_connections
        .fetch_add(1, Relaxed);
    if let Some(pw) = &pool.cfg.server_password {
        let mut auth = Vec::new();
        command::encode(&mut auth, [&b"AUTH"[..], pw.as_bytes()].into_iter());
        c.stream
            .write_all(&auth)
            .await
            .map_err(|e| format!("shard {addr}: {e}"))?;
        let r = c.reply(pool.timeout()).await?;
        if c.rbuf[r.clone()].starts_with(b"-") {
            return Err(format!(
                "shard {addr} refused the server_password: {}",
                String::from_utf8_lossy(&c.rbuf[r.start + 1..r.end - 2])
            ));
        }
        c.finish_batch();
    }
    Ok(c)
}

impl ShardConn {
    /// The next whole reply, as a range of `rbuf`; Err means the connection is unusable.
    async fn reply(&mut self, timeout: Option<Duration>) -> Result<Range<usize>, String> {
        loop {
            let mut c = Cursor::new(&self.rbuf[self.rpos..]);
            match resp::check(&mut c) {
                Ok(()) => {
                    let r = self.rpos..self.rpos + c.position() as usize;
                    self.rpos = r.end;
                    return Ok(r);
                }
                Err(Error::Incomplete) => {}
                Err(Error::Protocol(m)) => return Err(format!("shard sent bad RESP: {m}")),
            }
            let read = self.stream.read_buf(&mut self.rbuf);
            let n = match timeout {
                Some(t) => match tokio::time::timeout(t, read).await {
                    Ok(r) => r,
                    Err(_) => return Err("timed out".into()),
                },
                None => read.await,
            };
            match n {
                Ok(0) => return Err("shard closed the connection".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("shard connection failed: {e}")),
            }
        }
    }

    fn finish_batch(&mut self) {
        self.rbuf.drain(..self.rpos);
        self.rpos = 0;
    }
}

/// A request of a batch and how its reply is made.
enum Req {
    /// Answered here.
    Local(Vec<u8>),
    /// One reply from this shard, passed through.
    One(usize),
    /// MGET: per shard part, the key positions it holds; `n` keys in all.
    Mget {
        parts: Vec<(usize, Vec<usize>)>,
        n: usize,
    },
    /// DEL and friends: the sum of every part's count.
    Count(Vec<usize>),
    /// MSET: +OK when every part said OK.
    Mset(Vec<usize>),
}

/// The session of one client.
struct Session {
    pool: Arc<Pool>,
    conns: Vec<Option<ShardConn>>,
    /// What each shard is to be sent in this batch.
    unsent: Vec<Vec<u8>>,
    /// Why a shard failed in this batch (its further replies in the batch fail the same way).
    dead: Vec<Option<String>>,
    authed: bool,
    close: bool,
}

fn bulk(out: &mut Vec<u8>, b: &[u8]) {
    out.push(b'$');
    command::push_num(out, b.len() as i64);
    out.extend_from_slice(b);
    out.extend_from_slice(b"\r\n");
}

fn err_reply(msg: &str) -> Vec<u8> {
    let clean: String = msg
        .chars()
        .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
        .collect();
    format!("-ERR ambassador: {clean}\r\n").into_bytes()
}

impl Session {
    fn new(pool: Arc<Pool>) -> Session {
        let n = pool.addrs.len();
        Session {
            authed: pool.cfg.password.is_none(),
            pool,
            conns: (0..n).map(|_| None).collect(),
            unsent: vec![Vec::new(); n],
            dead: vec![None; n],
            close: false,
        }
    }

    /// Switch to a reloaded pool between batches: new shard connections, same client.
    fn adopt(&mut self, pool: Arc<Pool>) {
        let authed = self.authed && pool.cfg.password == self.pool.cfg.password;
        *self = Session::new(pool);
        self.authed = self.authed || authed;
    }

    /// Turn one command (`cmd` holds exactly its bytes) into a request, queueing what the
    /// shards must receive.
    fn plan(&mut self, cmd: &[u8], c: &Command, reqs: &mut Vec<Req>) {
        let arg = |i: usize| &cmd[c.args[i].clone()];
        let name = arg(0);
        let kind = command::classify(name, c.args.len());
        let pre_auth = kind == Kind::Local && !name.eq_ignore_ascii_case(b"SELECT");
        if !self.authed && !pre_auth {
            reqs.push(Req::Local(b"-NOAUTH Authentication required.\r\n".to_vec()));
            return;
        }
        match kind {
            Kind::Local => {
                let r = self.local(c, cmd);
                reqs.push(Req::Local(r))
            }
            Kind::Unsupported(why) => reqs.push(Req::Local(err_reply(&format!(
                "'{}' is not proxied: {why}",
                String::from_utf8_lossy(name).to_ascii_uppercase()
            )))),
            Kind::Key(i) => match self.pool.shard_for(arg(i)) {
                None => reqs.push(Req::Local(err_reply("every shard is ejected"))),
                Some(s) => {
                    if c.resp {
                        self.unsent[s].extend_from_slice(cmd);
                    } else {
                        command::encode(
                            &mut self.unsent[s],
                            c.args.iter().map(|r| &cmd[r.clone()]),
                        );
                    }
                    self.count_request(s, cmd.len());
                    reqs.push(Req::One(s));
                }
            },
            Kind::Mget | Kind::Count | Kind::Mset => {
                let step = if kind == Kind::Mset { 2 } else { 1 };
                let keys = (c.args.len() - 1) / step;
                let mut parts: Vec<(usize, Vec<usize>)> = Vec::new();
                for k in 0..keys {
                    let Some(s) = self.pool.shard_for(arg(1 + k * step)) else {
                        reqs.push(Req::Local(err_reply("every shard is ejected")));
                        return;
                    };
                    match parts.iter_mut().find(|(ps, _)| *ps == s) {
                        Some((_, v)) => v.push(k),
                        None => parts.push((s, vec![k])),
                    }
                }
                if parts.len() > 1 {
                    self.pool
                        .stats
                        .fragments
                        .fetch_add(parts.len() as u64, Relaxed);
                }
                for (s, ks) in &parts {
                    let w = &mut self.unsent[*s];
                    let before = w.len();
                    let args: Vec<&[u8]> = std::iter::once(name)
                        .chain(ks.iter().flat_map(|&k| {
                            (0..step).map(move |j| &cmd[c.args[1 + k * step + j].clone()])
                        }))
                        .collect();
                    command::encode(w, args.into_iter());
                    let len = w.len() - before;
                    self.count_request(*s, len);
                }
                let shards = parts.iter().map(|(s, _)| *s).collect();
                reqs.push(match kind {
                    Kind::Mget => Req::Mget { parts, n: keys },
                    Kind::Count => Req::Count(shards),
                    _ => Req::Mset(shards),
                });
            }
        }
    }

    fn count_request(&self, s: usize, bytes: usize) {
        let st = &self.pool.server_stats[s];
        st.requests.fetch_add(1, Relaxed);
        st.request_bytes.fetch_add(bytes as u64, Relaxed);
    }

    fn local(&mut self, c: &Command, cmd: &[u8]) -> Vec<u8> {
        let arg = |i: usize| &cmd[c.args[i].clone()];
        let name = arg(0).to_ascii_uppercase();
        let n = c.args.len();
        let mut out = Vec::new();
        match &name[..] {
            b"PING" if n == 1 => out.extend_from_slice(b"+PONG\r\n"),
            b"PING" | b"ECHO" if n == 2 => bulk(&mut out, arg(1)),
            b"QUIT" => {
                self.close = true;
                out.extend_from_slice(b"+OK\r\n");
            }
            b"AUTH" if n == 2 => match &self.pool.cfg.password {
                None => out.extend_from_slice(b"-ERR Client sent AUTH, but no password is set\r\n"),
                Some(p) if p.as_bytes() == arg(1) => {
                    self.authed = true;
                    out.extend_from_slice(b"+OK\r\n");
                }
                Some(_) => {
                    self.authed = false;
                    out.extend_from_slice(b"-ERR invalid password\r\n");
                }
            },
            b"SELECT" if n == 2 && arg(1) == b"0" => out.extend_from_slice(b"+OK\r\n"),
            b"SELECT" if n == 2 => out.extend_from_slice(
                b"-ERR only database 0 exists behind the ambassador: shards are one keyspace\r\n",
            ),
            _ => out.extend_from_slice(
                format!(
                    "-ERR wrong number of arguments for '{}' command\r\n",
                    String::from_utf8_lossy(&name).to_ascii_lowercase()
                )
                .as_bytes(),
            ),
        }
        out
    }

    /// Send every shard its part of the batch (connecting first if need be).
    async fn flush(&mut self) {
        for s in 0..self.unsent.len() {
            if self.unsent[s].is_empty() {
                continue;
            }
            if self.conns[s].is_none() {
                match connect(&self.pool, s).await {
                    Ok(c) => self.conns[s] = Some(c),
                    Err(e) => {
                        debug!(pool = %self.pool.name, "{e}");
                        self.pool.server_stats[s].server_err.fetch_add(1, Relaxed);
                        self.pool.failed(s);
                        self.dead[s] = Some(e);
                        self.unsent[s].clear();
                        continue;
                    }
                }
            }
            let conn = self.conns[s].as_mut().expect("connected above");
            if let Err(e) = conn.stream.write_all(&self.unsent[s]).await {
                self.kill(s, format!("shard {}: {e}", self.pool.addrs[s]));
            }
            self.unsent[s].clear();
        }
    }

    fn kill(&mut self, s: usize, why: String) {
        self.conns[s] = None;
        self.pool.server_stats[s].server_err.fetch_add(1, Relaxed);
        self.pool.failed(s);
        self.dead[s] = Some(why);
    }

    /// The next reply of shard `s` in this batch.
    async fn reply(&mut self, s: usize) -> Result<Range<usize>, String> {
        if let Some(e) = &self.dead[s] {
            return Err(e.clone());
        }
        let timeout = self.pool.timeout();
        let conn = self.conns[s]
            .as_mut()
            .expect("a live shard has a connection");
        match conn.reply(timeout).await {
            Ok(r) => {
                let st = &self.pool.server_stats[s];
                st.responses.fetch_add(1, Relaxed);
                st.response_bytes.fetch_add(r.len() as u64, Relaxed);
                self.pool.succeeded(s);
                Ok(r)
            }
            Err(e) => {
                let st = &self.pool.server_stats[s];
                if e == "timed out" {
                    st.server_timedout.fetch_add(1, Relaxed);
                } else {
                    st.server_eof.fetch_add(1, Relaxed);
                }
                let e = format!("shard {}: {e}", self.pool.addrs[s]);
                self.kill(s, e.clone());
                Err(e)
            }
        }
    }

    fn bytes(&self, s: usize, r: &Range<usize>) -> &[u8] {
        &self.conns[s].as_ref().expect("replied").rbuf[r.clone()]
    }

    /// Collect the replies of a batch in request order into `out`.
    async fn answer(&mut self, reqs: Vec<Req>, out: &mut Vec<u8>) {
        for req in reqs {
            match req {
                Req::Local(b) => out.extend_from_slice(&b),
                Req::One(s) => match self.reply(s).await {
                    Ok(r) => out.extend_from_slice(self.bytes(s, &r)),
                    Err(e) => self.forward_error(out, &e),
                },
                Req::Count(shards) => {
                    let mut sum = 0i64;
                    let mut failure: Option<Vec<u8>> = None;
                    for s in shards {
                        match self.reply(s).await {
                            Ok(r) => {
                                let b = self.bytes(s, &r);
                                match b.first() {
                                    Some(b':') => {
                                        sum += std::str::from_utf8(&b[1..b.len() - 2])
                                            .ok()
                                            .and_then(|t| t.parse::<i64>().ok())
                                            .unwrap_or(0)
                                    }
                                    _ => failure = failure.or_else(|| Some(b.to_vec())),
                                }
                            }
                            Err(e) => failure = failure.or_else(|| Some(err_reply(&e))),
                        }
                    }
                    match failure {
                        Some(f) => out.extend_from_slice(&f),
                        None => {
                            out.push(b':');
                            command::push_num(out, sum);
                        }
                    }
                }
                Req::Mset(shards) => {
                    let mut failure: Option<Vec<u8>> = None;
                    for s in shards {
                        match self.reply(s).await {
                            Ok(r) => {
                                let b = self.bytes(s, &r);
                                if !b.starts_with(b"+") {
                                    failure = failure.or_else(|| Some(b.to_vec()));
                                }
                            }
                            Err(e) => failure = failure.or_else(|| Some(err_reply(&e))),
                        }
                    }
                    match failure {
                        Some(f) => out.extend_from_slice(&f),
                        None => out.extend_from_slice(b"+OK\r\n"),
                    }
                }
                Req::Mget { parts, n } => {
                    // Each part's reply, split into its elements (ranges in its shard's buffer).
                    let mut slots: Vec<Option<(usize, Range<usize>)>> = vec![None; n];
                    let mut failure: Option<Vec<u8>> = None;
                    for (s, keys) in parts {
                        match self.reply(s).await {
                            Ok(r) => match self.elements(s, &r) {
                                Some(els) if els.len() == keys.len() => {
                                    for (k, el) in keys.into_iter().zip(els) {
                                        slots[k] = Some((s, el));
                                    }
                                }
                                _ => {
                                    let b = self.bytes(s, &r);
                                    failure = failure.or_else(|| {
                                        Some(if b.starts_with(b"-") {
                                            b.to_vec()
                                        } else {
                                            err_reply("a shard answered MGET with no array")
                                        })
                                    })
                                }
                            },
                            Err(e) => failure = failure.or_else(|| Some(err_reply(&e))),
                        }
                    }
                    match failure {
                        Some(f) => out.extend_from_slice(&f),
                        None => {
                            out.push(b'*');
                            command::push_num(out, n as i64);
                            for (s, el) in slots.into_iter().flatten() {
                                out.extend_from_slice(self.bytes(s, &el));
                            }
                        }
                    }
                }
            }
        }
        for (c, d) in self.conns.iter_mut().zip(self.dead.iter_mut()) {
            if let Some(c) = c {
                c.finish_batch();
            }
            *d = None;
        }
    }

    fn forward_error(&self, out: &mut Vec<u8>, e: &str) {
        self.pool.stats.forward_error.fetch_add(1, Relaxed);
        out.extend_from_slice(&err_reply(e));
    }

    /// The elements of an array reply, as ranges of its shard's buffer.
    fn elements(&self, s: usize, r: &Range<usize>) -> Option<Vec<Range<usize>>> {
        let buf = &self.conns[s].as_ref()?.rbuf[..r.end];
        if buf.get(r.start) != Some(&b'*') {
            return None;
        }
        let hdr_end = r.start + buf[r.start..].windows(2).position(|w| w == b"\r\n")?;
        let n: usize = std::str::from_utf8(&buf[r.start + 1..hdr_end])
            .ok()?
            .parse()
            .ok()?;
        let mut pos = hdr_end + 2;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let mut c = Cursor::new(&buf[pos..]);
            resp::check(&mut c).ok()?;
            let end = pos + c.position() as usize;
            out.push(pos..end);
            pos = end;
        }
        Some(out)
    }
}

/// Serve one client until it leaves, breaks framing or says QUIT.
pub async fn serve_client(pools: Arc<ArcSwap<Pool>>, mut client: TcpStream) {
    let _ = client.set_nodelay(true);
    let mut session = Session::new(pools.load_full());
    let stats_pool = session.pool.clone();
    stats_pool.stats.client_connections.fetch_add(1, Relaxed);
    let mut inbuf: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut out: Vec<u8> = Vec::with_capacity(16 * 1024);
    let idle = session.pool.limits.idle_timeout;
    'conn: loop {
        match tokio::time::timeout(idle, client.read_buf(&mut inbuf)).await {
            Ok(Ok(0)) => {
                stats_pool.stats.client_eof.fetch_add(1, Relaxed);
                break;
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => {
                stats_pool.stats.client_err.fetch_add(1, Relaxed);
                break;
            }
        }
        let current = pools.load();
        if !Arc::ptr_eq(&current, &session.pool) {
            session.adopt(current.clone());
        }
        session.pool.readmit();
        let mut pos = 0;
        loop {
            let mut reqs = Vec::new();
            let mut lost_framing = None;
            while reqs.len() < MAX_BATCH && !session.close {
                match command::parse(&inbuf[pos..]) {
                    Ok((None, n)) => pos += n,
                    Ok((Some(c), n)) => {
                        let cmd = &inbuf[pos..pos + n];
                        session.plan(cmd, &c, &mut reqs);
                        pos += n;
                    }
                    Err(Error::Incomplete) => break,
                    Err(Error::Protocol(m)) => {
                        lost_framing = Some(m);
                        break;
                    }
                }
            }
            if reqs.is_empty() && lost_framing.is_none() {
                break;
            }
            session.flush().await;
            session.answer(reqs, &mut out).await;
            if let Some(m) = &lost_framing {
                out.extend_from_slice(format!("-ERR Protocol error: {m}\r\n").as_bytes());
                session.close = true;
            }
            if client.write_all(&out).await.is_err() {
                stats_pool.stats.client_err.fetch_add(1, Relaxed);
                break 'conn;
            }
            out.clear();
            if session.close {
                break 'conn;
            }
        }
        inbuf.drain(..pos);
    }
    stats_pool.stats.client_connections.fetch_sub(1, Relaxed);
}

/// Accept clients for one pool until the task is aborted (the service was removed).
pub async fn serve(listener: TcpListener, pools: Arc<ArcSwap<Pool>>) {
    loop {
        match listener.accept().await {
            Ok((sock, _)) => {
                let max = pools.load().limits.max_connections as u64;
                if pools.load().stats.client_connections.load(Relaxed) >= max {
                    drop(sock);
                    continue;
                }
                tokio::spawn(serve_client(pools.clone(), sock));
            }
            Err(e) => {
                warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The running sharding services of the daemon.
#[derive(Default)]
pub struct Pools {
    running: std::collections::HashMap<String, Running>,
}

struct Running {
    listen: SocketAddr,
    pools: Arc<ArcSwap<Pool>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Pools {
    /// Serve the `redis` services of `cfg`: new listeners are bound before anything changes (a
    /// port in use rejects the whole config); a changed service swaps its pool under its open
    /// client connections, which move to the new shards at their next batch.
    pub async fn apply(&mut self, cfg: &crate::config::Config) -> anyhow::Result<()> {
        use anyhow::Context as _;
        let mut bound = Vec::new();
        for s in &cfg.services {
            let Some(r) = &s.redis else { continue };
            let keep =
                matches!(self.running.get(&s.name), Some(run) if run.listen == s.listen.addr);
            if !keep {
                let l = TcpListener::bind(s.listen.addr).await.with_context(|| {
                    format!("service {}: listening on {}", s.name, s.listen.addr)
                })?;
                bound.push((s.name.clone(), l, r, s.limits, s.listen.addr));
            }
        }
        let wanted: std::collections::HashSet<&str> = cfg
            .services
            .iter()
            .filter(|s| s.redis.is_some())
            .map(|s| s.name.as_str())
            .collect();
        self.running
            .retain(|name, _| wanted.contains(name.as_str()));
        for s in &cfg.services {
            let Some(r) = &s.redis else { continue };
            if let Some(run) = self.running.get(&s.name) {
                if run.listen == s.listen.addr {
                    let cur = run.pools.load();
                    if cur.cfg != *r || cur.limits != s.limits {
                        run.pools.store(Arc::new(Pool::new(&s.name, r, s.limits)));
                    }
                }
            }
        }
        for (name, l, r, limits, listen) in bound {
            let pools = Arc::new(ArcSwap::from_pointee(Pool::new(&name, r, limits)));
            let task = tokio::spawn(serve(l, pools.clone()));
            self.running.insert(
                name,
                Running {
                    listen,
                    pools,
                    task,
                },
            );
        }
        Ok(())
    }

    /// twemproxy's stats document: the same field names, so its dashboards keep working.
    pub fn stats_json(&self, uptime: Duration) -> serde_json::Value {
        use serde_json::{json, Map, Value};
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut doc = Map::new();
        doc.insert("service".into(), json!("ambassador"));
        doc.insert("source".into(), json!(hostname()));
        doc.insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
        doc.insert("uptime".into(), json!(uptime.as_secs()));
        doc.insert("timestamp".into(), json!(now));
        let mut curr = 0;
        let mut names: Vec<&String> = self.running.keys().collect();
        names.sort();
        for name in names {
            let p = self.running[name].pools.load_full();
            let st = &p.stats;
            curr += st.client_connections.load(Relaxed);
            let mut pool = Map::new();
            for (k, v) in [
                ("client_eof", &st.client_eof),
                ("client_err", &st.client_err),
                ("client_connections", &st.client_connections),
                ("server_ejects", &st.server_ejects),
                ("forward_error", &st.forward_error),
                ("fragments", &st.fragments),
            ] {
                pool.insert(k.into(), json!(v.load(Relaxed)));
            }
            for (i, sh) in p.cfg.shards.iter().enumerate() {
                let ss = &p.server_stats[i];
                let mut m = Map::new();
                for (k, v) in [
                    ("server_eof", &ss.server_eof),
                    ("server_err", &ss.server_err),
                    ("server_timedout", &ss.server_timedout),
                    ("server_connections", &ss.server_connections),
                    ("server_ejected_at", &ss.server_ejected_at),
                    ("requests", &ss.requests),
                    ("request_bytes", &ss.request_bytes),
                    ("responses", &ss.responses),
                    ("response_bytes", &ss.response_bytes),
                ] {
                    m.insert(k.into(), json!(v.load(Relaxed)));
                }
                pool.insert(sh.id(), Value::Object(m));
            }
            doc.insert(name.clone(), Value::Object(pool));
        }
        doc.insert("curr_connections".into(), json!(curr));
        Value::Object(doc)
    }

    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Serve the stats document to whoever connects (twemproxy's `--stats-port` protocol: connect,
/// read the JSON, connection closes).
pub async fn serve_stats(
    listener: TcpListener,
    doc: impl Fn() -> serde_json::Value + Send + 'static,
) {
    loop {
        if let Ok((mut sock, _)) = listener.accept().await {
            let body = doc().to_string();
            tokio::spawn(async move {
                let _ = sock.write_all(body.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    }
}
