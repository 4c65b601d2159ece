//! The declarative config: strict (`deny_unknown_fields`), and every error names the file, the
//! line, the key and the fix.
//!
//! ```yaml
//! interfaces: [eth0]
//! services:
//!   - name: frontend
//!     listen: 10.200.0.100:80/tcp
//!     split:
//!       key: src-ip
//!       backends:
//!         - { name: web,        address: 10.200.2.2:80, weight: 9 }
//!         - { name: experiment, address: 10.200.3.2:80, weight: 1 }
//! ```

// Config errors are rare and carry the whole diagnostic (file, line, key, fix); boxing them
// would buy nothing.
#![allow(clippy::result_large_err)]

use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use ambassador_ebpf::{KeyMode, MAX_BACKENDS, MAX_SERVICES, PROTO_TCP, PROTO_UDP};
use serde::{Deserialize, Serialize};

/// Largest weight a backend may have; keeps weight maths exact and tables meaningful.
pub const MAX_WEIGHT: u32 = 10_000;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Interfaces the kernel programs attach to (`--interface` overrides).
    #[serde(default)]
    pub interfaces: Vec<String>,
    /// Which kernel program each interface gets (`--attach MODE` overrides).
    #[serde(default, skip_serializing_if = "AttachMode::is_auto")]
    pub attach: AttachMode,
    /// The program for particular interfaces, over `attach` (`--attach IF=MODE` overrides).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub attach_by_interface: std::collections::BTreeMap<String, AttachMode>,
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
    /// Repositories the daemon keeps synced and published (the git-push PaaS sidecar).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gitsync: Vec<crate::gitsync::Spec>,
    /// Which DNS server brokered services ask (default: the system's resolv.conf).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolvers: Option<crate::discovery::Resolvers>,
}

/// Which kernel program goes on an interface (`attach:`, `--attach`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// Native XDP where the driver has it and the device is not a veth; the TC program on
    /// veths and on drivers without native XDP (rather than generic XDP).
    #[default]
    Auto,
    /// XDP (native, or generic where the driver has none; `--xdp-mode` chooses).
    Xdp,
    /// The TC program on clsact ingress.
    Tc,
}

impl AttachMode {
    pub fn is_auto(&self) -> bool {
        *self == AttachMode::Auto
    }
}

impl FromStr for AttachMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(AttachMode::Auto),
            "xdp" => Ok(AttachMode::Xdp),
            "tc" => Ok(AttachMode::Tc),
            _ => Err(format!("`{s}` is not an attach mode: use auto, xdp or tc")),
        }
    }
}

/// `--attach MODE` (every interface) or `--attach IF=MODE` (one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachArg {
    pub interface: Option<String>,
    pub mode: AttachMode,
}

impl FromStr for AttachArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.split_once('=') {
            Some((i, m)) if !i.is_empty() => AttachArg {
                interface: Some(i.to_string()),
                mode: m.parse()?,
            },
            _ => AttachArg {
                interface: None,
                mode: s.parse()?,
            },
        })
    }
}

impl Config {
    /// The program for `iface`: `--attach IF=MODE`, else `--attach MODE`, else
    /// `attach_by_interface`, else `attach`.
    pub fn attach_mode(&self, iface: &str, args: &[AttachArg]) -> AttachMode {
        let arg = |per_if: bool| {
            args.iter()
                .rev()
                .find(|a| match &a.interface {
                    Some(i) => per_if && i == iface,
                    None => !per_if,
                })
                .map(|a| a.mode)
        };
        arg(true)
            .or_else(|| arg(false))
            .or_else(|| self.attach_by_interface.get(iface).copied())
            .unwrap_or(self.attach)
    }
}

impl Config {
    /// The services the L4 data planes (XDP, userspace) carry: all but the sharding ones.
    pub fn l4_services(&self) -> impl Iterator<Item = &ServiceConfig> {
        self.services.iter().filter(|s| s.sharding().is_none())
    }
}

impl ServiceConfig {
    /// The sharding settings and whether the protocol is memcache, for a sharding service.
    pub fn sharding(&self) -> Option<(&RedisConfig, bool)> {
        match (&self.redis, &self.memcache) {
            (Some(r), _) => Some((r, false)),
            (None, Some(m)) => Some((m, true)),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    /// `ADDRESS:PORT/PROTO`, e.g. `10.200.0.100:80/tcp` or `[fd00::100]:80/udp`.
    pub listen: Listen,
    /// The L4 split (XDP or the userspace data plane); absent for a `redis` service.
    #[serde(default, skip_serializing_if = "Split::is_empty")]
    pub split: Split,
    /// A sharding ambassador for Redis (twemproxy's placement); replaces `split`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisConfig>,
    /// The same for memcached's ASCII protocol (same keys as `redis`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memcache: Option<RedisConfig>,
    /// Terminate TLS here (the TLS sidecar) and forward plaintext to the chosen backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// Limits and timeouts of the userspace paths (TLS sidecar, userspace data plane).
    #[serde(default)]
    pub limits: Limits,
    /// The connect-time ambassador: processes in this cgroup (v2) that connect to `listen` are
    /// connected straight to a backend by a cgroup BPF program (no proxy hop); everyone else is
    /// served by the userspace data plane on `listen`, with the same backends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    /// Where the backends come from: `static` (`split.backends`), or resolved from `dns` /
    /// `dns-srv` every `refresh` (the brokering ambassador).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<crate::discovery::BrokerConfig>,
    /// Active health checks of the backends: an unhealthy backend leaves the table (only its
    /// clients move) until it is healthy again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthConfig>,
}

/// How a backend is checked.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum HealthCheck {
    /// A TCP connect.
    #[default]
    Tcp,
    /// An HTTP/1.1 `GET path` answered with `expect_status`.
    Http,
    /// No active checks: only failed connects seen by the userspace paths (passive).
    None,
}

/// Active health checking, as nginx/HAProxy do it: every `interval`, a check that must finish
/// within `timeout`; `fall` failures in a row mark a backend unhealthy, `rise` successes
/// healthy again. Backends start healthy. When every backend of a service is unhealthy, all
/// stay in the table (failing open beats refusing everyone).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    #[serde(default)]
    pub check: HealthCheck,
    /// Request path of an `http` check.
    #[serde(default = "default_health_path")]
    pub path: String,
    /// Status an `http` check expects.
    #[serde(default = "default_expect_status")]
    pub expect_status: u16,
    /// Port to check instead of the backend's (required for UDP services).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(with = "duration", default = "default_health_interval")]
    pub interval: Duration,
    #[serde(with = "duration", default = "default_health_timeout")]
    pub timeout: Duration,
    #[serde(default = "default_rise")]
    pub rise: u32,
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// Passive checks (nginx's max_fails/fail_timeout): this many failed connects by the
    /// userspace paths within `passive_window` take the backend out for `passive_window`
    /// (or until active checks pass `rise` times). 0 turns them off.
    #[serde(default = "default_passive_fails")]
    pub passive_fails: u32,
    #[serde(with = "duration", default = "default_passive_window")]
    pub passive_window: Duration,
}

fn default_passive_fails() -> u32 {
    3
}
fn default_passive_window() -> Duration {
    Duration::from_secs(10)
}

fn default_health_path() -> String {
    "/".into()
}
fn default_expect_status() -> u16 {
    200
}
fn default_health_interval() -> Duration {
    Duration::from_secs(2)
}
fn default_health_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}

/// Limits with safe defaults: a slowloris cannot hold a handshake open, an idle connection
/// does not live forever, and one service cannot take every file descriptor.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Open connections (TCP) or sessions (UDP) per service; more are refused.
    pub max_connections: usize,
    /// A TLS handshake must finish within this.
    #[serde(with = "duration")]
    pub handshake_timeout: Duration,
    /// Connecting to a backend must finish within this.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// A connection with no bytes either way for this long is closed.
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// A UDP session with no datagram either way for this long is forgotten.
    #[serde(with = "duration")]
    pub udp_session_timeout: Duration,
    /// On SIGTERM, open connections get this long to finish.
    #[serde(with = "duration")]
    pub drain_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(300),
            udp_session_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// Durations written the way people write them: `10s`, `500ms`, `5m`.
pub(crate) mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!(
                "`{s}` is not a duration ({e}): write e.g. `10s`, `500ms` or `5m`"
            ))
        })
    }
}

/// The TLS sidecar of a service (the book's "add HTTPS to a legacy service").
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate/key pairs; SNI picks among them by their names, the first is the default.
    pub certificates: Vec<CertificatePair>,
    /// Require client certificates signed by this CA (mTLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: accept only client certificates with one of these SANs (URI or DNS).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_sans: Vec<String>,
    /// Tell the backend the real client address with a PROXY protocol header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<ProxyProtocol>,
    /// Also listen on this port of the same address and redirect HTTP to HTTPS (with HSTS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_http: Option<u16>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct CertificatePair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    V1,
    V2,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Split {
    #[serde(default)]
    pub key: SplitKey,
    /// Hash seed; by default derived from the service name, so each service splits
    /// independently and the same config always splits the same way.
    #[serde(default)]
    pub seed: Option<u32>,
    pub backends: Vec<BackendConfig>,
}

impl Split {
    pub fn is_empty(&self) -> bool {
        self.backends.is_empty() && self.seed.is_none() && self.key == SplitKey::default()
    }
}

/// A Redis sharding ambassador, with twemproxy's keys and meanings (`timeout_ms` and friends
/// keep their names so a nutcracker.yml translates one to one).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    #[serde(default = "default_hash")]
    pub hash: crate::shard::Hash,
    #[serde(default = "default_distribution")]
    pub distribution: crate::shard::dist::Kind,
    /// Two characters, e.g. `"{}"`: only the text between them is hashed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_tag: Option<String>,
    /// A request not answered within this many milliseconds gets an error reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Take a failing shard out of the ring (its keys move to the others) until it retries.
    #[serde(default)]
    pub auto_eject_hosts: bool,
    #[serde(default = "default_retry_ms")]
    pub server_retry_timeout_ms: u64,
    #[serde(default = "default_failure_limit")]
    pub server_failure_limit: u32,
    /// Clients must `AUTH` with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// The ambassador `AUTH`s to the shards with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_password: Option<String>,
    pub shards: Vec<ShardConfig>,
}

fn default_hash() -> crate::shard::Hash {
    crate::shard::Hash::Fnv1a_64
}
fn default_distribution() -> crate::shard::dist::Kind {
    crate::shard::dist::Kind::Ketama
}
fn default_retry_ms() -> u64 {
    30_000
}
fn default_failure_limit() -> u32 {
    2
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct ShardConfig {
    /// twemproxy's server name: what ketama hashes instead of `host:port` when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub address: SocketAddr,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

impl ShardConfig {
    /// The shard as the placement code names it.
    pub fn server(&self) -> crate::shard::Server {
        crate::shard::Server {
            name: self.name.clone(),
            host: self.address.ip().to_string(),
            port: self.address.port(),
            weight: self.weight,
        }
    }

    pub fn id(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| self.address.to_string())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Identity of the backend in the consistent-hash table (defaults to the address): keep it
    /// when an address changes and its clients stay put.
    #[serde(default)]
    pub name: Option<String>,
    pub address: SocketAddr,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

impl BackendConfig {
    pub fn id(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| self.address.to_string())
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SplitKey {
    #[default]
    SrcIp,
    SrcIp24,
    SrcIpPort,
    FiveTuple,
}

impl SplitKey {
    pub fn mode(self) -> KeyMode {
        match self {
            SplitKey::SrcIp => KeyMode::SrcIp,
            SplitKey::SrcIp24 => KeyMode::SrcIp24,
            SplitKey::SrcIpPort => KeyMode::SrcIpPort,
            SplitKey::FiveTuple => KeyMode::FiveTuple,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => PROTO_TCP,
            Proto::Udp => PROTO_UDP,
        }
    }
}

/// Where a service listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Listen {
    pub addr: SocketAddr,
    pub proto: Proto,
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = match self.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        write!(f, "{}/{}", self.addr, p)
    }
}

impl FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, proto) = match s.rsplit_once('/') {
            Some((a, "tcp")) => (a, Proto::Tcp),
            Some((a, "udp")) => (a, Proto::Udp),
            Some((_, p)) => {
                return Err(format!(
                    "unknown protocol `{p}` in `{s}`: write `/tcp` or `/udp`"
                ))
            }
            None => (s, Proto::Tcp),
        };
        let addr: SocketAddr = addr.parse().map_err(|_| {
            format!("`{s}` is not ADDRESS:PORT/PROTO: write e.g. `10.0.0.1:80/tcp` or `[fd00::1]:80/udp`")
        })?;
        Ok(Listen { addr, proto })
    }
}

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for Listen {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A config problem, located and with the fix spelled out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// Dotted path of the offending key, e.g. `services[0].split.backends[1].weight`.
    pub key: String,
    pub message: String,
    pub fix: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
            if let Some(c) = self.column {
                write!(f, ":{c}")?;
            }
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)?;
        if !self.fix.is_empty() {
            write!(f, " (fix: {})", self.fix)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Read, parse and validate a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            line: None,
            column: None,
            key: String::new(),
            message: format!("cannot read the config: {e}"),
            fix: "check the path and that the file is readable".into(),
        })?;
        Config::parse(path, &text)
    }

    /// Parse and validate config text; `path` only labels errors.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = if crate::shard::nutcracker::looks_like(text) {
            crate::shard::nutcracker::import(text).map_err(|message| ConfigError {
                file: path.to_owned(),
                line: None,
                column: None,
                key: "(twemproxy config)".into(),
                message,
                fix: "fix the pool as the message says, or translate it with `ambassador import` and edit the result".into(),
            })?
        } else {
            serde_yaml::from_str(text).map_err(|e| yaml_error(path, text, &e))?
        };
        cfg.validate().map_err(|(key, needle, message, fix)| {
            let line = needle.and_then(|n| locate(text, &n));
            ConfigError {
                file: path.to_owned(),
                line,
                column: None,
                key,
                message,
                fix,
            }
        })?;
        Ok(cfg)
    }

    /// Cross-field rules serde cannot express. Errors carry (key, text to locate, message, fix).
    fn validate(&self) -> Result<(), (String, Option<String>, String, String)> {
        if !self.interfaces.is_empty() {
            if let Some(i) = self
                .attach_by_interface
                .keys()
                .find(|i| !self.interfaces.contains(i))
            {
                return Err((
                    format!("attach_by_interface.{i}"),
                    Some(format!("{i}:")),
                    format!("{i} is not one of `interfaces`"),
                    format!("add {i} to `interfaces`, or remove it here"),
                ));
            }
        }
        let mut jobs = HashSet::new();
        for (i, g) in self.gitsync.iter().enumerate() {
            if let Err((k, m, f)) = g.validate() {
                return Err((format!("gitsync[{i}].{k}"), Some("gitsync".into()), m, f));
            }
            if !jobs.insert(&g.name) {
                return Err((
                    format!("gitsync[{i}].name"),
                    Some(format!("name: {}", g.name)),
                    format!("`{}` names two gitsync jobs", g.name),
                    "give each job its own name".into(),
                ));
            }
        }
        if self.services.is_empty() && self.gitsync.is_empty() {
            return Err((
                "services".into(),
                Some("services".into()),
                "no services are configured".into(),
                "add at least one entry under `services:`".into(),
            ));
        }
        if self.services.len() > MAX_SERVICES as usize {
            return Err((
                "services".into(),
                Some("services".into()),
                format!(
                    "{} services configured, the kernel tables hold {MAX_SERVICES}",
                    self.services.len()
                ),
                "split the services across fewer listen addresses or nodes".into(),
            ));
        }
        let mut names = HashSet::new();
        let mut listens = HashSet::new();
        let mut total_backends = 0usize;
        for (i, s) in self.services.iter().enumerate() {
            let at = format!("services[{i}]");
            if s.name.is_empty()
                || !s
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
            {
                return Err((
                    format!("{at}.name"),
                    Some(format!("name: {}", s.name)),
                    format!(
                        "service name `{}` is empty or has unusual characters",
                        s.name
                    ),
                    "use letters, digits, `-`, `_` or `.`".into(),
                ));
            }
            if !names.insert(&s.name) {
                return Err((
                    format!("{at}.name"),
                    Some(format!("name: {}", s.name)),
                    format!("service name `{}` is used twice", s.name),
                    "give every service a distinct name".into(),
                ));
            }
            if !listens.insert(s.listen) {
                return Err((
                    format!("{at}.listen"),
                    Some(s.listen.to_string()),
                    format!("`{}` is the listen address of two services", s.listen),
                    "each address:port/proto belongs to one service".into(),
                ));
            }
            if s.listen.addr.port() == 0 {
                return Err((
                    format!("{at}.listen"),
                    Some(s.listen.to_string()),
                    "port 0 cannot be a service port".into(),
                    "write the port clients connect to".into(),
                ));
            }
            if let Some(tls) = &s.tls {
                let needle = Some("tls:".to_string());
                if s.listen.proto != Proto::Tcp {
                    return Err((
                        format!("{at}.tls"),
                        needle,
                        "TLS is for TCP services".into(),
                        "use `/tcp` in `listen`, or remove `tls`".into(),
                    ));
                }
                if tls.certificates.is_empty() {
                    return Err((
                        format!("{at}.tls.certificates"),
                        needle,
                        "no certificate configured".into(),
                        "add `- { cert: FILE, key: FILE }` under `certificates`".into(),
                    ));
                }
                if !tls.allow_sans.is_empty() && tls.client_ca.is_none() {
                    return Err((
                        format!("{at}.tls.allow_sans"),
                        Some("allow_sans".into()),
                        "`allow_sans` checks client certificates, which only `client_ca` asks for"
                            .into(),
                        "add `client_ca: CA-FILE`, or remove `allow_sans`".into(),
                    ));
                }
                if let Some(port) = tls.redirect_http {
                    let redirect = Listen {
                        addr: SocketAddr::new(s.listen.addr.ip(), port),
                        proto: Proto::Tcp,
                    };
                    if port == s.listen.addr.port() || !listens.insert(redirect) {
                        return Err((
                            format!("{at}.tls.redirect_http"),
                            Some("redirect_http".into()),
                            format!(
                                "port {port} of {} is already in use by another listener",
                                s.listen.addr.ip()
                            ),
                            "pick a port no service listens on".into(),
                        ));
                    }
                }
            }
            if s.limits.max_connections == 0 {
                return Err((
                    format!("{at}.limits.max_connections"),
                    Some("max_connections".into()),
                    "0 connections would refuse every client".into(),
                    "set at least 1 (default 10000)".into(),
                ));
            }
            if s.redis.is_some() && s.memcache.is_some() {
                return Err((
                    format!("{at}.memcache"),
                    Some("memcache:".into()),
                    "a service speaks one protocol: `redis` or `memcache`".into(),
                    "make two services on two ports".into(),
                ));
            }
            if let Some((r, _)) = s.sharding() {
                validate_redis(&at, s, r)?;
                continue;
            }
            if let Some(h) = &s.health {
                validate_health(&at, s, h)?;
            }
            if let Some(b) = &s.broker {
                crate::discovery::validate(s, b)
                    .map_err(|(k, m, f)| (format!("{at}.{k}"), Some("broker:".into()), m, f))?;
            }
            if s.cgroup.is_some() && s.tls.is_some() {
                return Err((
                    format!("{at}.cgroup"),
                    Some("cgroup:".into()),
                    "the connect-time ambassador connects the app to the backend itself, so it cannot terminate TLS".into(),
                    "remove `tls`, or remove `cgroup`".into(),
                ));
            }
            let mut bnames = HashSet::new();
            for (j, b) in s.split.backends.iter().enumerate() {
                let bat = format!("{at}.split.backends[{j}]");
                let needle = Some(b.address.to_string());
                if b.address.is_ipv4() != s.listen.addr.is_ipv4() {
                    return Err((
                        format!("{bat}.address"),
                        needle,
                        format!(
                            "backend {} and service {} are of different IP families",
                            b.address, s.listen
                        ),
                        "use backends of the service's family (IPv4 with IPv4, IPv6 with IPv6)"
                            .into(),
                    ));
                }
                if b.address.port() == 0 || is_unusable(b.address.ip()) {
                    return Err((
                        format!("{bat}.address"),
                        needle,
                        format!("`{}` cannot be a backend address", b.address),
                        "write the unicast ADDRESS:PORT the backend listens on".into(),
                    ));
                }
                if b.weight == 0 || b.weight > MAX_WEIGHT {
                    return Err((
                        format!("{bat}.weight"),
                        needle,
                        format!("weight {} is out of range", b.weight),
                        format!("use a weight from 1 to {MAX_WEIGHT}; remove the backend (or drain it) to send it nothing"),
                    ));
                }
                if !bnames.insert(b.id()) {
                    return Err((
                        format!("{bat}.name"),
                        needle,
                        format!("backend `{}` appears twice in service `{}`", b.id(), s.name),
                        "give every backend of a service a distinct name and address".into(),
                    ));
                }
            }
            total_backends += s.split.backends.len();
        }
        if total_backends > MAX_BACKENDS as usize / 2 {
            return Err((
                "services".into(),
                Some("services".into()),
                format!(
                    "{total_backends} backends configured; the kernel holds {} (half kept free so a reload can replace every backend)",
                    MAX_BACKENDS / 2
                ),
                "reduce the number of backends".into(),
            ));
        }
        Ok(())
    }
}

type Invalid = (String, Option<String>, String, String);

fn validate_health(at: &str, s: &ServiceConfig, h: &HealthConfig) -> Result<(), Invalid> {
    let needle = Some("health:".to_string());
    let err = |key: &str, message: String, fix: &str| {
        Err((
            format!("{at}.health{key}"),
            needle.clone(),
            message,
            fix.to_string(),
        ))
    };
    if h.interval < Duration::from_millis(50) || h.interval > Duration::from_secs(3600) {
        return err(
            ".interval",
            format!("interval {:?} is out of range", h.interval),
            "use 50ms to 1h",
        );
    }
    if h.timeout.is_zero() || h.timeout > h.interval {
        return err(
            ".timeout",
            format!(
                "timeout {:?} must be above 0 and at most the interval {:?}",
                h.timeout, h.interval
            ),
            "make the timeout shorter than the interval",
        );
    }
    for (k, v) in [(".rise", h.rise), (".fall", h.fall)] {
        if v == 0 || v > 100 {
            return err(
                k,
                format!("{} is out of range", v),
                "use 1 to 100 checks in a row",
            );
        }
    }
    if h.check == HealthCheck::Http && !h.path.starts_with('/') {
        return err(
            ".path",
            format!("path {:?} does not start with /", h.path),
            "write the request path, e.g. /healthz",
        );
    }
    if !(100..=599).contains(&h.expect_status) {
        return err(
            ".expect_status",
            format!("{} is not an HTTP status", h.expect_status),
            "use e.g. 200 or 204",
        );
    }
    if s.listen.proto == Proto::Udp && h.port.is_none() {
        return err(
            ".port",
            "a UDP service's backends cannot be checked over TCP on their own port".into(),
            "set `port:` to a TCP (or HTTP) port the backends answer health checks on",
        );
    }
    Ok(())
}

fn validate_redis(at: &str, s: &ServiceConfig, r: &RedisConfig) -> Result<(), Invalid> {
    let needle = Some("redis:".to_string());
    if s.health.is_some() {
        return Err((
            format!("{at}.health"),
            Some("health:".into()),
            "a sharding service's servers are not health-checked: taking one out would move its keys".into(),
            "remove `health`; set `auto_eject_hosts: true` (with server_failure_limit) if failing shards should be ejected".into(),
        ));
    }
    if !s.split.is_empty() {
        return Err((
            format!("{at}.split"),
            Some("split:".into()),
            "a service either splits connections (`split`) or shards keys (`redis`), not both"
                .into(),
            "move the backends to `redis.shards`, or make two services".into(),
        ));
    }
    if s.tls.is_some() || s.listen.proto != Proto::Tcp {
        return Err((
            format!("{at}.listen"),
            Some(s.listen.to_string()),
            "a redis service is plain TCP".into(),
            "use `/tcp` in `listen` and remove `tls`".into(),
        ));
    }
    if r.shards.is_empty() {
        return Err((
            format!("{at}.redis.shards"),
            needle,
            "no shards configured".into(),
            "add `- { address: HOST:PORT }` entries under `shards`".into(),
        ));
    }
    if let Some(t) = &r.hash_tag {
        if t.len() != 2 {
            return Err((
                format!("{at}.redis.hash_tag"),
                Some("hash_tag".into()),
                format!("hash_tag `{t}` is not two characters"),
                "write the opening and closing character, e.g. `\"{}\"`".into(),
            ));
        }
    }
    if r.timeout_ms == Some(0) || r.server_failure_limit == 0 {
        return Err((
            format!("{at}.redis"),
            needle,
            "`timeout_ms` and `server_failure_limit` must be positive".into(),
            "remove `timeout_ms` to wait without limit; use 1 or more failures".into(),
        ));
    }
    let mut ids = HashSet::new();
    for (j, sh) in r.shards.iter().enumerate() {
        let sat = format!("{at}.redis.shards[{j}]");
        let needle = Some(sh.address.to_string());
        if sh.address.port() == 0 || is_unusable(sh.address.ip()) {
            return Err((
                format!("{sat}.address"),
                needle,
                format!("`{}` cannot be a shard address", sh.address),
                "write the ADDRESS:PORT the Redis server listens on".into(),
            ));
        }
        if sh.weight == 0 || sh.weight > MAX_WEIGHT {
            return Err((
                format!("{sat}.weight"),
                needle,
                format!("weight {} is out of range", sh.weight),
                format!("use a weight from 1 to {MAX_WEIGHT}"),
            ));
        }
        if !ids.insert(sh.id()) {
            return Err((
                format!("{sat}.name"),
                needle,
                format!("shard `{}` appears twice", sh.id()),
                "give every shard a distinct name and address".into(),
            ));
        }
    }
    Ok(())
}

fn is_unusable(ip: IpAddr) -> bool {
    ip.is_unspecified() || ip.is_multicast() || ip == IpAddr::from([255, 255, 255, 255])
}

/// The 1-based line of the first occurrence of `needle`.
fn locate(text: &str, needle: &str) -> Option<usize> {
    text.lines().position(|l| l.contains(needle)).map(|i| i + 1)
}

fn yaml_error(path: &Path, text: &str, e: &serde_yaml::Error) -> ConfigError {
    let (line, column) = match e.location() {
        Some(l) => (Some(l.line()), Some(l.column())),
        None => (None, None),
    };
    let full = e.to_string();
    // serde_yaml says "path.to.key: message at line L column C"; split that apart.
    let body = full.split(" at line ").next().unwrap_or(&full).to_string();
    let (key, message) = match body.split_once(": ") {
        Some((k, m)) if !k.contains(' ') => (k.to_string(), m.to_string()),
        _ => (String::new(), body.clone()),
    };
    let fix = if message.starts_with("unknown field") {
        "remove or rename the key: only the keys listed are valid here".to_string()
    } else if message.starts_with("missing field") {
        "add the missing key".to_string()
    } else if message.starts_with("unknown variant") {
        "use one of the values listed".to_string()
    } else if message.starts_with("invalid type: sequence") {
        "quote IPv6 addresses, YAML reads a bare `[` as a list: address: '[fd00::2]:80'".to_string()
    } else if message.contains("invalid socket address") {
        "write ADDRESS:PORT, with IPv6 in brackets: `[fd00::2]:80`".to_string()
    } else {
        String::new()
    };
    let (mut line, mut column, mut key) = (line, column, key);
    // Errors from our own value parsers are located at the enclosing mapping; when the message
    // quotes the offending value, point at the line that holds it and name its key.
    let ours = ![
        "unknown field",
        "missing field",
        "unknown variant",
        "invalid type",
    ]
    .iter()
    .any(|p| message.starts_with(p));
    if let Some((l, k)) = quoted_values(&message).filter(|_| ours).find_map(|v| {
        let l = locate(text, v)?;
        let k = text
            .lines()
            .nth(l - 1)?
            .split(':')
            .next()?
            .trim()
            .trim_start_matches("- ");
        Some((l, k.to_string()))
    }) {
        line = Some(l);
        column = None;
        if !k.is_empty() && !k.contains(' ') && !key.ends_with(&k) {
            key = if key.is_empty() {
                k
            } else {
                format!("{key}.{k}")
            };
        }
    }
    ConfigError {
        file: path.to_owned(),
        line,
        column,
        key,
        message,
        fix,
    }
}

/// Values quoted in `backticks` in a message, longest first.
fn quoted_values(message: &str) -> impl Iterator<Item = &str> {
    let mut v: Vec<&str> = message
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|s| s.len() > 3)
        .collect();
    v.sort_by_key(|s| std::cmp::Reverse(s.len()));
    v.into_iter()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "interfaces: [eth0]
services:
  - name: frontend
    listen: 10.200.0.100:80/tcp
    split:
      key: src-ip
      backends:
        - { name: web,        address: 10.200.2.2:80, weight: 9 }
        - { name: experiment, address: 10.200.3.2:80, weight: 1 }
";

    fn parse(t: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("a.yaml"), t)
    }

    #[test]
    fn the_documented_example_parses() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.interfaces, vec!["eth0"]);
        let s = &c.services[0];
        assert_eq!(s.listen.addr, "10.200.0.100:80".parse().unwrap());
        assert_eq!(s.listen.proto, Proto::Tcp);
        assert_eq!(s.split.key, SplitKey::SrcIp);
        assert_eq!(s.split.backends[0].weight, 9);
        assert_eq!(s.split.backends[1].id(), "experiment");
    }

    #[test]
    fn unknown_key_names_file_line_key_and_fix() {
        let bad = GOOD.replace("weight: 1 }", "wieght: 1 }");
        let e = parse(&bad).unwrap_err();
        assert_eq!(e.line, Some(9), "{e}");
        assert!(e.message.contains("unknown field `wieght`"), "{e}");
        assert!(e.key.contains("services[0].split.backends[1]"), "{e}");
        let shown = e.to_string();
        assert!(shown.starts_with("a.yaml:9:"), "{shown}");
        assert!(shown.contains("fix:"), "{shown}");
    }

    #[test]
    fn zero_weight_is_rejected_with_its_line() {
        let e = parse(&GOOD.replace("weight: 9", "weight: 0")).unwrap_err();
        assert_eq!(e.key, "services[0].split.backends[0].weight");
        assert_eq!(e.line, Some(8));
        assert!(e.fix.contains("1 to"));
    }

    #[test]
    fn bad_listen_and_family_mismatch_are_explained() {
        let e = parse(&GOOD.replace("80/tcp", "80/sctp")).unwrap_err();
        assert_eq!(e.line, Some(4), "{e}");
        assert_eq!(e.key, "services[0].listen", "{e}");
        assert!(e.message.contains("sctp"), "{e}");
        let e = parse(&GOOD.replace("10.200.3.2:80", "'[fd00::3]:80'")).unwrap_err();
        assert!(e.message.contains("different IP families"), "{e}");
        assert_eq!(e.line, Some(9));
        let e = parse(&GOOD.replace("10.200.3.2:80", "[fd00::3]:80")).unwrap_err();
        assert!(e.fix.contains("quote IPv6"), "{e}");
    }

    #[test]
    fn duplicate_names_and_listens_are_rejected() {
        let two = format!(
            "{GOOD}  - name: frontend\n    listen: 10.200.0.101:80/tcp\n    split: {{ backends: [] }}\n"
        );
        let e = parse(&two).unwrap_err();
        assert!(e.message.contains("used twice"), "{e}");
        let two = format!(
            "{GOOD}  - name: other\n    listen: 10.200.0.100:80/tcp\n    split: {{ backends: [] }}\n"
        );
        let e = parse(&two).unwrap_err();
        assert!(e.message.contains("two services"), "{e}");
    }

    #[test]
    fn ipv6_udp_listen_parses() {
        let c = parse(
            "services:\n  - name: dns\n    listen: '[fd00::100]:53/udp'\n    split:\n      key: five-tuple\n      backends: [ { address: '[fd00::2]:53' } ]\n",
        )
        .unwrap();
        assert_eq!(c.services[0].listen.proto, Proto::Udp);
        assert_eq!(c.services[0].split.backends[0].weight, 1);
        assert_eq!(c.services[0].split.backends[0].id(), "[fd00::2]:53");
    }
}
