//! Discovery for brokered services (`broker:`): a logical name resolved to live endpoints
//! that become the service's backends in every data plane (XDP, userspace, connect-time).
//!
//! Each brokered service has a task that resolves its name every `refresh` (DNS A/AAAA, or
//! SRV with RFC 2782 priority and weight) through hickory and sends the result to the daemon,
//! which applies a changed set like any reload: only the clients of removed endpoints move,
//! open connections continue. A failed or empty answer keeps the last good set serving and
//! is reported (`status`, metrics) as stale with the name and the reason.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{anyhow, Result};
use hickory_resolver::{
    config::{
        ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig,
        ResolverOpts,
    },
    net::runtime::TokioRuntimeProvider,
    proto::rr::RData,
    Resolver, TokioResolver,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::config::{BackendConfig, Config, Proto, ServiceConfig};

mod binding;
mod kubernetes;

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// The backends written under `split.backends`.
    Static,
    /// A and AAAA records of `name`; each address on `port` (default: the listen port).
    Dns,
    /// SRV records of `name`: the lowest priority with a live target, SRV weights as weights.
    DnsSrv,
    /// A Consul service through Consul's DNS interface (`resolvers.dns`, usually the agent on
    /// 127.0.0.1:8600): SRV records of `NAME.service.consul`, healthy instances only.
    Consul,
    /// The EndpointSlices of a Kubernetes Service (`namespace/service`), watched.
    Kubernetes,
    /// A Service Binding directory (`$SERVICE_BINDING_ROOT/<name>`, or an absolute path).
    Binding,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    pub source: Source,
    /// The DNS name (for `dns`) or SRV name (for `dns-srv`, e.g. `_mysql._tcp.db.internal`).
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// `kubernetes`: which of the Service's named ports (needed when it has several).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_name: Option<String>,
    #[serde(default = "default_refresh", with = "crate::config::duration")]
    pub refresh: Duration,
}

fn default_refresh() -> Duration {
    Duration::from_secs(10)
}

/// Which DNS server to ask (default: the system's resolv.conf).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct Resolvers {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<SocketAddr>,
}

/// What `status` shows of one brokered service.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DiscoveryStatus {
    pub service: String,
    pub name: String,
    /// The set serving now: the last good answer.
    pub backends: Vec<BackendConfig>,
    /// Unix seconds of the last good answer.
    pub last_success: Option<u64>,
    /// Set while answers fail: the last good set is stale.
    pub last_error: Option<String>,
    /// Endpoints that are terminating but still serve: flows already on them continue,
    /// new flows go to `backends` (Kubernetes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub draining: Vec<SocketAddr>,
}

/// A source's answer: the endpoints that take new flows, and those draining.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Found {
    pub backends: Vec<BackendConfig>,
    pub draining: Vec<SocketAddr>,
}

/// One resolution's result for a service.
pub struct Update {
    pub service: String,
    pub result: Result<Found, String>,
}

fn resolver(r: &Resolvers) -> Result<TokioResolver> {
    let opts_fix = |o: &mut ResolverOpts| {
        o.timeout = Duration::from_secs(1);
        o.attempts = 1;
        // Each refresh asks the server: the refresh period is the cache.
        o.cache_size = 0;
        o.use_hosts_file = ResolveHosts::Never;
        o.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    };
    match r.dns {
        Some(server) => {
            let mut udp = ConnectionConfig::udp();
            udp.port = server.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = server.port();
            let ns = NameServerConfig::new(server.ip(), true, vec![udp, tcp]);
            let cfg = ResolverConfig::from_parts(None, vec![], vec![ns]);
            let mut b = Resolver::builder_with_config(cfg, TokioRuntimeProvider::default());
            opts_fix(b.options_mut());
            b.build()
                .map_err(|e| anyhow!("building the DNS resolver: {e}"))
        }
        None => {
            let mut b = TokioResolver::builder_tokio()
                .map_err(|e| anyhow!("reading /etc/resolv.conf: {e}"))?;
            b.options_mut().cache_size = 0;
            b.build()
                .map_err(|e| anyhow!("building the DNS resolver: {e}"))
        }
    }
}

pub(crate) fn fqdn(name: &str) -> String {
    if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    }
}

/// Resolve one service's endpoints. An empty answer is an error: it never empties a service.
pub async fn resolve(
    r: &TokioResolver,
    b: &BrokerConfig,
    listen_port: u16,
) -> Result<Vec<BackendConfig>, String> {
    let name = fqdn(&b.name);
    let out: Vec<BackendConfig> = match b.source {
        Source::Static | Source::Kubernetes => {
            return Err(format!(
                "a {:?} broker is not resolved by polling",
                b.source
            ))
        }
        Source::Binding => binding::resolve(r, b, listen_port).await?,
        Source::Dns => {
            let port = b.port.unwrap_or(listen_port);
            let ips = r
                .lookup_ip(name.as_str())
                .await
                .map_err(|e| format!("{name}: {e}"))?;
            ips.iter()
                .map(|ip| BackendConfig {
                    name: None,
                    address: SocketAddr::new(ip, port),
                    weight: 1,
                })
                .collect()
        }
        Source::DnsSrv | Source::Consul => {
            let name = if b.source == Source::Consul {
                format!("{}.service.consul.", b.name.trim_end_matches('.'))
            } else {
                name.clone()
            };
            let lk = r
                .srv_lookup(name.as_str())
                .await
                .map_err(|e| format!("{name} SRV: {e}"))?;
            // Addresses sent along (additional section) save a lookup per target.
            let mut glue: HashMap<String, Vec<IpAddr>> = HashMap::new();
            for rec in lk.additionals() {
                let ip = match &rec.data {
                    RData::A(a) => IpAddr::V4(a.0),
                    RData::AAAA(a) => IpAddr::V6(a.0),
                    _ => continue,
                };
                glue.entry(rec.name.to_string()).or_default().push(ip);
            }
            let mut records = Vec::new();
            for rec in lk.answers() {
                let RData::SRV(s) = &rec.data else { continue };
                let target = s.target.to_string();
                let addrs = match glue.get(&target) {
                    Some(v) => v.clone(),
                    None => match r.lookup_ip(target.as_str()).await {
                        Ok(l) => l.iter().collect(),
                        Err(e) => {
                            warn!(srv = %name, %target, "SRV target does not resolve, skipped: {e}");
                            Vec::new()
                        }
                    },
                };
                records.push((s.priority, s.weight, s.port, target, addrs));
            }
            // RFC 2782: the lowest priority that has a reachable target; weights within it.
            let Some(best) = records
                .iter()
                .filter(|r| !r.4.is_empty())
                .map(|r| r.0)
                .min()
            else {
                return Err(format!("{name} SRV: no record points to an address"));
            };
            let group: Vec<_> = records.into_iter().filter(|r| r.0 == best).collect();
            // Weight 0 means "rarely" in RFC 2782; in a table it gets the smallest share.
            group
                .into_iter()
                .flat_map(|(_, w, port, _, addrs)| {
                    addrs.into_iter().map(move |ip| BackendConfig {
                        name: None,
                        address: SocketAddr::new(ip, port),
                        weight: u32::from(w).clamp(1, crate::config::MAX_WEIGHT),
                    })
                })
                .collect()
        }
    };
    if out.is_empty() {
        return Err(format!("{name}: empty answer"));
    }
    Ok(out)
}

/// How long a new service waits for its source's first answer before the daemon goes on.
const FIRST_ANSWER: Duration = Duration::from_secs(5);

/// A running discovery task: what it was started with, and its tasks (producer, forwarder).
struct Task {
    broker: BrokerConfig,
    resolvers: Resolvers,
    listen: (u16, Proto),
    handles: [tokio::task::JoinHandle<()>; 2],
}

/// The discovery tasks of a config, restarted when their settings change.
#[derive(Default)]
pub struct Manager {
    tasks: HashMap<String, Task>,
    status: HashMap<String, DiscoveryStatus>,
}

fn brokered(cfg: &Config) -> impl Iterator<Item = (&ServiceConfig, &BrokerConfig)> {
    cfg.services.iter().filter_map(|s| {
        s.broker
            .as_ref()
            .filter(|b| b.source != Source::Static)
            .map(|b| (s, b))
    })
}

/// Produce a service's answers on `out` until it closes: a watch for Kubernetes, else a poll
/// every `refresh`.
async fn produce(
    b: BrokerConfig,
    resolvers: Resolvers,
    (port, proto): (u16, Proto),
    out: mpsc::UnboundedSender<Result<Found, String>>,
) {
    if b.source == Source::Kubernetes {
        return kubernetes::watch(b, proto, out).await;
    }
    let r = match resolver(&resolvers) {
        Ok(r) => r,
        Err(e) => {
            let _ = out.send(Err(format!("{e:#}")));
            return;
        }
    };
    loop {
        let found = resolve(&r, &b, port).await.map(|backends| Found {
            backends,
            draining: Vec::new(),
        });
        if out.send(found).is_err() {
            return;
        }
        tokio::time::sleep(b.refresh).await;
    }
}

impl Manager {
    /// Start, restart or stop tasks to match `cfg`. A new service waits for its first answer
    /// (at most [`FIRST_ANSWER`]) before this returns, so its first table is not empty.
    pub async fn update(&mut self, cfg: &Config, tx: &mpsc::UnboundedSender<Update>) {
        let resolvers = cfg.resolvers.clone().unwrap_or_default();
        let wanted: HashMap<String, (BrokerConfig, (u16, Proto))> = brokered(cfg)
            .map(|(s, b)| {
                (
                    s.name.clone(),
                    (b.clone(), (s.listen.addr.port(), s.listen.proto)),
                )
            })
            .collect();
        self.tasks.retain(|name, t| {
            let keep =
                wanted.get(name) == Some(&(t.broker.clone(), t.listen)) && t.resolvers == resolvers;
            if !keep {
                t.handles.iter().for_each(|h| h.abort());
            }
            keep
        });
        self.status.retain(|name, _| wanted.contains_key(name));
        for (service, (b, listen)) in wanted {
            if self.tasks.contains_key(&service) {
                continue;
            }
            let (rtx, mut rrx) = mpsc::unbounded_channel();
            let producer = tokio::spawn(produce(b.clone(), resolvers.clone(), listen, rtx));
            let first = match tokio::time::timeout(FIRST_ANSWER, rrx.recv()).await {
                Ok(Some(r)) => r,
                Ok(None) => Err("discovery stopped".to_string()),
                Err(_) => Err(format!("no answer within {FIRST_ANSWER:?}")),
            };
            self.record(&service, &b, first);
            let (tx, svc) = (tx.clone(), service.clone());
            let forwarder = tokio::spawn(async move {
                while let Some(result) = rrx.recv().await {
                    let u = Update {
                        service: svc.clone(),
                        result,
                    };
                    if tx.send(u).is_err() {
                        return;
                    }
                }
            });
            info!(%service, name = %b.name, source = ?b.source, "discovery started");
            self.tasks.insert(
                service,
                Task {
                    broker: b,
                    resolvers: resolvers.clone(),
                    listen,
                    handles: [producer, forwarder],
                },
            );
        }
    }

    /// Record a result; true when the serving set changed.
    fn record(&mut self, service: &str, b: &BrokerConfig, result: Result<Found, String>) -> bool {
        let st = self
            .status
            .entry(service.to_string())
            .or_insert_with(|| DiscoveryStatus {
                service: service.to_string(),
                name: b.name.clone(),
                ..Default::default()
            });
        match result {
            Ok(found) => {
                st.last_success = Some(crate::health::now_secs());
                if st.last_error.take().is_some() {
                    info!(%service, name = %st.name, "discovery answers again");
                }
                if st.draining != found.draining {
                    info!(%service, name = %st.name, draining = ?found.draining, "draining endpoints changed");
                    st.draining = found.draining;
                }
                // A stable order, for every source: the tables do not care, but status and
                // change detection do.
                let mut set = found.backends;
                set.sort_by_key(|b| b.address);
                set.dedup_by(|a, b| a.address == b.address);
                if st.backends != set {
                    info!(%service, name = %st.name, endpoints = ?set.iter().map(|b| b.address).collect::<Vec<_>>(), "endpoints changed");
                    st.backends = set;
                    return true;
                }
                false
            }
            Err(e) => {
                if st.last_error.as_deref() != Some(e.as_str()) {
                    warn!(%service, name = %st.name, "discovery failed, the last good set keeps serving: {e}");
                }
                st.last_error = Some(e);
                false
            }
        }
    }

    /// A task's result: true when the service's set changed (the daemon applies it).
    pub fn handle(&mut self, u: Update) -> bool {
        let Some(t) = self.tasks.get(&u.service) else {
            return false;
        };
        let b = t.broker.clone();
        self.record(&u.service, &b, u.result)
    }

    /// `cfg` with each brokered service's backends replaced by its last good set.
    pub fn overlay(&self, cfg: &Config) -> Config {
        overlay(cfg, self.status.values())
    }

    pub fn report(&self) -> Vec<DiscoveryStatus> {
        let mut v: Vec<_> = self.status.values().cloned().collect();
        v.sort_by(|a, b| a.service.cmp(&b.service));
        v
    }
}

/// `cfg` with the discovered sets in place (used by the daemon and by `status`).
pub fn overlay<'a>(cfg: &Config, found: impl IntoIterator<Item = &'a DiscoveryStatus>) -> Config {
    let mut out = cfg.clone();
    for d in found {
        if let Some(s) = out.services.iter_mut().find(|s| s.name == d.service) {
            s.split.backends = d.backends.clone();
        }
    }
    out
}

/// Check a `broker:` section; (key, message, fix).
pub fn validate(s: &ServiceConfig, b: &BrokerConfig) -> Result<(), (String, String, String)> {
    let err = |k: &str, m: String, f: &str| Err((k.to_string(), m, f.to_string()));
    match b.source {
        Source::Static => {
            if s.split.backends.is_empty() {
                return err(
                    "broker.source",
                    "is static but `split.backends` is empty".into(),
                    "list the backends under `split.backends`, or use `source: dns`",
                );
            }
        }
        Source::Dns | Source::DnsSrv | Source::Consul | Source::Kubernetes | Source::Binding => {
            if b.name.trim().is_empty() {
                return err(
                    "broker.name",
                    "is missing".into(),
                    "name what to resolve, e.g. `db.internal` (dns), `_mysql._tcp.db.internal` (dns-srv), `mysql` (consul), `db/mysql` (kubernetes: namespace/service) or `mysql` (binding: a directory under $SERVICE_BINDING_ROOT)",
                );
            }
            if !s.split.backends.is_empty() {
                return err(
                    "split.backends",
                    "is not empty, but the broker provides the backends".into(),
                    "write `backends: []`, or use `source: static`",
                );
            }
            if matches!(b.source, Source::DnsSrv | Source::Consul) && b.port.is_some() {
                return err(
                    "broker.port",
                    "is set, but SRV records carry their own ports".into(),
                    "remove `port`",
                );
            }
            if b.port_name.is_some() && b.source != Source::Kubernetes {
                return err(
                    "broker.port_name",
                    format!(
                        "is set, but only `source: kubernetes` has named ports (this is {:?})",
                        b.source
                    ),
                    "remove `port_name`",
                );
            }
            if b.source == Source::Kubernetes {
                let (ns, svc) = kubernetes::split_name(&b.name);
                if ns.is_some_and(str::is_empty) || svc.is_empty() || svc.contains('/') {
                    return err(
                        "broker.name",
                        format!("{:?} is not a Kubernetes Service name", b.name),
                        "write `namespace/service` or `service`",
                    );
                }
            }
            if b.refresh < Duration::from_millis(100) {
                return err(
                    "broker.refresh",
                    format!("{:?} is too short", b.refresh),
                    "refresh at most every 100ms",
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_replaces_only_brokered_services() {
        let cfg: Config = serde_yaml::from_str(
            "services:\n  - name: db\n    listen: 127.0.0.1:3306/tcp\n    broker: { source: dns, name: db.internal }\n    split: { key: src-ip-port, backends: [] }\n  - name: web\n    listen: 127.0.0.1:80/tcp\n    split:\n      backends:\n        - { address: 127.0.0.9:80 }\n",
        )
        .unwrap();
        let d = DiscoveryStatus {
            service: "db".into(),
            backends: vec![BackendConfig {
                name: None,
                address: "127.0.0.2:3306".parse().unwrap(),
                weight: 1,
            }],
            ..Default::default()
        };
        let out = overlay(&cfg, [&d]);
        assert_eq!(out.services[0].split.backends, d.backends);
        assert_eq!(
            out.services[1].split.backends,
            cfg.services[1].split.backends
        );
    }

    #[test]
    fn broker_sections_are_checked_with_the_fix() {
        let bad = Config::parse(
            std::path::Path::new("a.yaml"),
            "services:\n  - name: db\n    listen: 127.0.0.1:3306/tcp\n    broker: { source: dns-srv }\n    split: { backends: [] }\n",
        )
        .unwrap_err();
        assert!(bad.key.ends_with("broker.name"), "{bad}");
        let bad = Config::parse(
            std::path::Path::new("a.yaml"),
            "services:\n  - name: db\n    listen: 127.0.0.1:3306/tcp\n    broker: { source: dns, name: x, refersh: 1s }\n    split: { backends: [] }\n",
        )
        .unwrap_err();
        assert!(bad.message.contains("refersh"), "{bad}");
        let bad = Config::parse(
            std::path::Path::new("a.yaml"),
            "services:\n  - name: db\n    listen: 127.0.0.1:3306/tcp\n    broker: { source: binding, name: db, port_name: mysql }\n    split: { backends: [] }\n",
        )
        .unwrap_err();
        assert!(bad.key.ends_with("broker.port_name"), "{bad}");
        let bad = Config::parse(
            std::path::Path::new("a.yaml"),
            "services:\n  - name: db\n    listen: 127.0.0.1:3306/tcp\n    broker: { source: kubernetes, name: /mysql }\n    split: { backends: [] }\n",
        )
        .unwrap_err();
        assert!(
            bad.key.ends_with("broker.name") && bad.fix.contains("namespace/service"),
            "{bad}"
        );
    }
}
