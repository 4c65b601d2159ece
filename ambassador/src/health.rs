//! Active health checks (`health:` of a service): one task per backend probes it every
//! `interval` (TCP connect, or an HTTP GET with an expected status); `fall` failures in a row
//! mark it unhealthy and `rise` successes healthy again. Transitions go to the daemon, which
//! rebuilds the plan without unhealthy backends: with the weighted-rendezvous table only their
//! clients move, and flows already tracked to them continue until they end.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    time::SystemTime,
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::{sync::mpsc, task::JoinHandle};

use crate::config::{Config, HealthCheck, HealthConfig};

/// A backend's health changed.
#[derive(Debug, Clone)]
pub struct Event {
    pub service: String,
    pub backend: String,
    pub healthy: bool,
    /// The last check's result, e.g. `HTTP 503` or `connect: Connection refused`.
    pub reason: String,
}

/// What `status` shows for a checked backend.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackendHealth {
    pub service: String,
    pub backend: String,
    pub healthy: bool,
    pub reason: String,
    /// Unix seconds of the last transition (or of the first check).
    pub since: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    service: String,
    backend: String,
    address: SocketAddr,
    health: HealthConfig,
}

pub struct Monitor {
    tasks: HashMap<Key, JoinHandle<()>>,
    /// Failed connects per checked backend address, for passive checks: recent times.
    passive: HashMap<(String, SocketAddr), std::collections::VecDeque<std::time::Instant>>,
    tx: mpsc::UnboundedSender<Event>,
    /// (service, backend) → health; absent means healthy (not failed yet, or unchecked).
    state: BTreeMap<(String, String), BackendHealth>,
}

impl Drop for Monitor {
    fn drop(&mut self) {
        for t in self.tasks.values() {
            t.abort();
        }
    }
}

/// Unix seconds now (status timestamps).
pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

impl Monitor {
    pub fn new() -> (Monitor, mpsc::UnboundedReceiver<Event>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Monitor {
                tasks: HashMap::new(),
                passive: HashMap::new(),
                tx,
                state: BTreeMap::new(),
            },
            rx,
        )
    }

    /// Run a check task for every backend of every service with `health`, and only those;
    /// a backend whose address or check changed starts over (healthy).
    pub fn reconcile(&mut self, cfg: &Config) {
        let mut want = std::collections::HashSet::new();
        for s in &cfg.services {
            let Some(h) = &s.health else { continue };
            for b in &s.split.backends {
                want.insert(Key {
                    service: s.name.clone(),
                    backend: b.id(),
                    address: b.address,
                    health: h.clone(),
                });
            }
        }
        self.tasks.retain(|k, t| {
            let keep = want.contains(k);
            if !keep {
                t.abort();
            }
            keep
        });
        let live: std::collections::HashSet<(String, String)> = want
            .iter()
            .map(|k| (k.service.clone(), k.backend.clone()))
            .collect();
        self.state.retain(|k, _| live.contains(k));
        self.passive.retain(|(s, a), _| {
            self.tasks
                .keys()
                .any(|k| &k.service == s && &k.address == a)
        });
        for k in want {
            if !self.tasks.contains_key(&k) {
                self.state.remove(&(k.service.clone(), k.backend.clone()));
                let t = tokio::spawn(run(k.clone(), self.tx.clone()));
                self.tasks.insert(k, t);
            }
        }
    }

    /// A failed connect from a userspace path: `passive_fails` of them within `passive_window`
    /// take the backend out; it comes back when the window has passed (an event the monitor
    /// schedules) or active checks pass.
    pub fn failed_connect(&mut self, service: &str, address: SocketAddr) -> Option<Event> {
        let k = self
            .tasks
            .keys()
            .find(|k| k.service == service && k.address == address)?
            .clone();
        let h = &k.health;
        if h.passive_fails == 0 {
            return None;
        }
        let now = std::time::Instant::now();
        let q = self
            .passive
            .entry((service.to_string(), address))
            .or_default();
        q.push_back(now);
        while q
            .front()
            .is_some_and(|t| now.duration_since(*t) > h.passive_window)
        {
            q.pop_front();
        }
        if (q.len() as u32) < h.passive_fails {
            return None;
        }
        q.clear();
        if self
            .state
            .get(&(k.service.clone(), k.backend.clone()))
            .is_some_and(|s| !s.healthy)
        {
            return None;
        }
        let back = Event {
            service: k.service.clone(),
            backend: k.backend.clone(),
            healthy: true,
            reason: format!("passive ejection ended after {:?}", h.passive_window),
        };
        let (tx, window) = (self.tx.clone(), h.passive_window);
        tokio::spawn(async move {
            tokio::time::sleep(window).await;
            let _ = tx.send(back);
        });
        Some(Event {
            service: k.service,
            backend: k.backend,
            healthy: false,
            reason: format!(
                "{} failed connects within {:?} (passive)",
                h.passive_fails, h.passive_window
            ),
        })
    }

    /// Record a transition; true when it changes who is in the tables.
    pub fn record(&mut self, ev: Event) -> bool {
        let key = (ev.service.clone(), ev.backend.clone());
        // A task for a backend no longer configured may still report once.
        if !self
            .tasks
            .keys()
            .any(|k| k.service == ev.service && k.backend == ev.backend)
        {
            return false;
        }
        let was = self.state.get(&key).is_none_or(|h| h.healthy);
        self.state.insert(
            key,
            BackendHealth {
                service: ev.service,
                backend: ev.backend,
                healthy: ev.healthy,
                reason: ev.reason,
                since: now_secs(),
            },
        );
        was != ev.healthy
    }

    pub fn report(&self) -> Vec<BackendHealth> {
        self.state.values().cloned().collect()
    }

    /// `cfg` without unhealthy backends; a service whose backends are all unhealthy keeps
    /// them all (fail open).
    pub fn overlay(&self, cfg: &Config) -> Config {
        let mut out = cfg.clone();
        for s in &mut out.services {
            let down = |b: &crate::config::BackendConfig| {
                self.state
                    .get(&(s.name.clone(), b.id()))
                    .is_some_and(|h| !h.healthy)
            };
            if s.split.backends.iter().all(down) {
                continue;
            }
            s.split.backends.retain(|b| !down(b));
        }
        out
    }
}

/// The check loop of one backend: reports transitions only.
async fn run(k: Key, tx: mpsc::UnboundedSender<Event>) {
    let target = SocketAddr::new(k.address.ip(), k.health.port.unwrap_or(k.address.port()));
    let mut healthy = true;
    let mut streak = 0u32;
    if k.health.check == HealthCheck::None {
        // Passive only: the task just marks the backend as checked.
        return std::future::pending().await;
    }
    let mut tick = tokio::time::interval(k.health.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let result = match tokio::time::timeout(k.health.timeout, probe(target, &k.health)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {:?}", k.health.timeout)),
        };
        let ok = result.is_ok();
        if ok == healthy {
            streak = 0;
            continue;
        }
        streak += 1;
        let need = if healthy {
            k.health.fall
        } else {
            k.health.rise
        };
        if streak >= need {
            healthy = ok;
            streak = 0;
            let reason = match result {
                Ok(r) => r,
                Err(e) => e,
            };
            let ev = Event {
                service: k.service.clone(),
                backend: k.backend.clone(),
                healthy,
                reason,
            };
            if tx.send(ev).is_err() {
                return;
            }
        }
    }
}

/// One check: `Ok(what passed)` or `Err(why it failed)`.
async fn probe(target: SocketAddr, h: &HealthConfig) -> Result<String, String> {
    let s = tokio::net::TcpStream::connect(target)
        .await
        .map_err(|e| format!("connect {target}: {e}"))?;
    if h.check != HealthCheck::Http {
        return Ok(format!("connect {target}: ok"));
    }
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .map_err(|e| format!("HTTP {target}: {e}"))?;
    tokio::spawn(conn);
    let req = Request::get(&h.path)
        .header("host", target.to_string())
        .header("user-agent", "ambassador-health-check")
        .header("connection", "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("HTTP request: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("HTTP GET {}: {e}", h.path))?;
    let code = resp.status().as_u16();
    if code == h.expect_status {
        Ok(format!("HTTP {code}"))
    } else {
        Err(format!(
            "HTTP GET {} answered {code}, expected {}",
            h.path, h.expect_status
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cfg(health: &str) -> Config {
        Config::parse(
            std::path::Path::new("t.yaml"),
            &format!(
                "services:
  - name: s
    listen: 10.0.0.1:80/tcp
    health: {health}
    split:
      backends:
        - {{ name: a, address: 127.0.0.1:1 }}
        - {{ name: b, address: 127.0.0.1:2 }}
"
            ),
        )
        .unwrap()
    }

    #[test]
    fn bad_health_settings_are_rejected_with_the_key() {
        for (h, key) in [
            (
                "{ interval: 1s, timeout: 2s }",
                "services[0].health.timeout",
            ),
            ("{ rise: 0 }", "services[0].health.rise"),
            ("{ check: http, path: healthz }", "services[0].health.path"),
            ("{ expect_status: 42 }", "services[0].health.expect_status"),
        ] {
            let text = format!(
                "services:\n  - name: s\n    listen: 10.0.0.1:80/tcp\n    health: {h}\n    split:\n      backends:\n        - {{ address: 127.0.0.1:1 }}\n"
            );
            let e = Config::parse(std::path::Path::new("t.yaml"), &text).unwrap_err();
            assert_eq!(e.key, key, "{h}: {e}");
        }
        let e = Config::parse(
            std::path::Path::new("t.yaml"),
            "services:\n  - name: s\n    listen: 10.0.0.1:53/udp\n    health: {}\n    split:\n      backends:\n        - { address: 127.0.0.1:1 }\n",
        )
        .unwrap_err();
        assert_eq!(e.key, "services[0].health.port");
    }

    #[tokio::test]
    async fn fall_and_rise_thresholds_drive_transitions_and_the_overlay() {
        // Backend a listens; b's port is closed.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let _ = l.accept().await;
            }
        });
        let c = cfg("{ interval: 50ms, timeout: 40ms, fall: 2, rise: 2 }");
        let text = serde_yaml::to_string(&c)
            .unwrap()
            .replace("127.0.0.1:1", &format!("127.0.0.1:{port}"));
        let c = Config::parse(std::path::Path::new("t.yaml"), &text).unwrap();
        let (mut m, mut rx) = Monitor::new();
        m.reconcile(&c);
        let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("a transition")
            .unwrap();
        assert_eq!((ev.backend.as_str(), ev.healthy), ("b", false), "{ev:?}");
        assert!(ev.reason.contains("connect"), "{ev:?}");
        assert!(m.record(ev));
        let eff = m.overlay(&c);
        let names: Vec<String> = eff.services[0]
            .split
            .backends
            .iter()
            .map(|b| b.id())
            .collect();
        assert_eq!(names, ["a"]);
        // Both down: fail open.
        m.record(Event {
            service: "s".into(),
            backend: "a".into(),
            healthy: false,
            reason: "test".into(),
        });
        assert_eq!(m.overlay(&c).services[0].split.backends.len(), 2);
        // Gone from the config: no task, no state.
        let mut c2 = c.clone();
        c2.services[0].health = None;
        m.reconcile(&c2);
        assert!(m.report().is_empty());
    }
}
