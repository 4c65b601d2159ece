//! Runtime overrides made through the admin API (`set-weight`, `drain`): laid over the config
//! file when plans are built, kept in `STATE_DIR/overrides.json` so a restarted daemon keeps
//! them, and dropped for backends a new config no longer has.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::config::{Config, MAX_WEIGHT};

/// One backend's override.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BackendOverride {
    pub service: String,
    pub backend: String,
    /// A weight replacing the config's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Takes no new flows; open ones continue.
    #[serde(default)]
    pub drained: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    #[serde(default)]
    pub backends: Vec<BackendOverride>,
}

/// Why an override was refused: an HTTP status and a sentence for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub status: u16,
    pub message: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

fn not_found(message: String) -> Refused {
    Refused {
        status: 404,
        message,
    }
}

fn bad_request(message: String) -> Refused {
    Refused {
        status: 400,
        message,
    }
}

impl Overrides {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("overrides.json")
    }

    /// The saved overrides; none when the file does not exist.
    pub fn load(state_dir: &Path) -> Result<Overrides> {
        let p = Self::path(state_dir);
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).with_context(|| {
                format!(
                    "parsing {} (fix it or remove it to drop the overrides)",
                    p.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Overrides::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    pub fn save(&self, state_dir: &Path) -> Result<()> {
        let p = Self::path(state_dir);
        let tmp = p.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, &p).with_context(|| format!("writing {}", p.display()))
    }

    pub fn get(&self, service: &str, backend: &str) -> Option<&BackendOverride> {
        self.backends
            .iter()
            .find(|o| o.service == service && o.backend == backend)
    }

    /// Check that `service`/`backend` is a backend an override can apply to.
    fn check(cfg: &Config, service: &str, backend: &str) -> Result<(), Refused> {
        let Some(s) = cfg.services.iter().find(|s| s.name == service) else {
            let names: Vec<&str> = cfg.services.iter().map(|s| s.name.as_str()).collect();
            return Err(not_found(format!(
                "no service {service:?}; the config has {}",
                names.join(", ")
            )));
        };
        if s.sharding().is_some() {
            return Err(bad_request(format!(
                "service {service:?} shards keys over its servers: changing a shard's weight or draining it would move keys; change the config instead"
            )));
        }
        if !s.split.backends.iter().any(|b| b.id() == backend) {
            let names: Vec<String> = s.split.backends.iter().map(|b| b.id()).collect();
            return Err(not_found(format!(
                "service {service:?} has no backend {backend:?}; it has {}",
                names.join(", ")
            )));
        }
        Ok(())
    }

    fn entry(&mut self, service: &str, backend: &str) -> &mut BackendOverride {
        match self
            .backends
            .iter()
            .position(|o| o.service == service && o.backend == backend)
        {
            Some(i) => &mut self.backends[i],
            None => {
                self.backends.push(BackendOverride {
                    service: service.to_string(),
                    backend: backend.to_string(),
                    weight: None,
                    drained: false,
                });
                self.backends.last_mut().expect("just pushed")
            }
        }
    }

    /// Override a backend's weight; the config's own weight removes the override.
    pub fn set_weight(
        &mut self,
        cfg: &Config,
        service: &str,
        backend: &str,
        weight: u32,
    ) -> Result<(), Refused> {
        if weight == 0 || weight > MAX_WEIGHT {
            return Err(bad_request(format!(
                "weight {weight} is out of range: use 1 to {MAX_WEIGHT}, or drain the backend to send it no new flows"
            )));
        }
        Self::check(cfg, service, backend)?;
        let configured = cfg
            .services
            .iter()
            .find(|s| s.name == service)
            .and_then(|s| s.split.backends.iter().find(|b| b.id() == backend))
            .map(|b| b.weight);
        let e = self.entry(service, backend);
        e.weight = (configured != Some(weight)).then_some(weight);
        self.tidy();
        Ok(())
    }

    /// Drain (no new flows) or undrain a backend.
    pub fn set_drained(
        &mut self,
        cfg: &Config,
        service: &str,
        backend: &str,
        drained: bool,
    ) -> Result<(), Refused> {
        Self::check(cfg, service, backend)?;
        self.entry(service, backend).drained = drained;
        self.tidy();
        Ok(())
    }

    fn tidy(&mut self) {
        self.backends.retain(|o| o.weight.is_some() || o.drained);
    }

    /// Drop overrides for backends `cfg` does not have (or cannot override); returns them.
    pub fn prune(&mut self, cfg: &Config) -> Vec<BackendOverride> {
        let (keep, gone): (Vec<_>, Vec<_>) = self
            .backends
            .drain(..)
            .partition(|o| Self::check(cfg, &o.service, &o.backend).is_ok());
        self.backends = keep;
        gone
    }

    /// The config plans are built from: overridden weights, drained backends left out of the
    /// tables (flows already tracked to them continue).
    pub fn overlay(&self, cfg: &Config) -> Config {
        let mut out = cfg.clone();
        for s in &mut out.services {
            if s.sharding().is_some() {
                continue;
            }
            s.split
                .backends
                .retain_mut(|b| match self.get(&s.name, &b.id()) {
                    Some(o) => {
                        if let Some(w) = o.weight {
                            b.weight = w;
                        }
                        !o.drained
                    }
                    None => true,
                });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config::parse(
            Path::new("test.yaml"),
            "services:
  - name: frontend
    listen: 10.0.0.1:80/tcp
    split:
      backends:
        - { name: web, address: 10.0.0.2:80, weight: 9 }
        - { name: experiment, address: 10.0.0.3:80, weight: 1 }
",
        )
        .unwrap()
    }

    #[test]
    fn weights_and_drains_overlay_the_config_and_the_configured_weight_clears_them() {
        let c = cfg();
        let mut o = Overrides::default();
        o.set_weight(&c, "frontend", "experiment", 5).unwrap();
        o.set_drained(&c, "frontend", "web", true).unwrap();
        let eff = o.overlay(&c);
        let b = &eff.services[0].split.backends;
        assert_eq!(b.len(), 1);
        assert_eq!((b[0].id().as_str(), b[0].weight), ("experiment", 5));
        o.set_weight(&c, "frontend", "experiment", 1).unwrap();
        o.set_drained(&c, "frontend", "web", false).unwrap();
        assert_eq!(o, Overrides::default());
        assert_eq!(o.overlay(&c), c);
    }

    #[test]
    fn unknown_names_and_bad_weights_are_refused_with_what_exists() {
        let c = cfg();
        let mut o = Overrides::default();
        let e = o.set_weight(&c, "nope", "web", 2).unwrap_err();
        assert_eq!(e.status, 404);
        assert!(e.message.contains("frontend"), "{e}");
        let e = o.set_drained(&c, "frontend", "nope", true).unwrap_err();
        assert_eq!(e.status, 404);
        assert!(e.message.contains("web, experiment"), "{e}");
        for w in [0, MAX_WEIGHT + 1] {
            assert_eq!(
                o.set_weight(&c, "frontend", "web", w).unwrap_err().status,
                400
            );
        }
        assert_eq!(o, Overrides::default());
    }

    #[test]
    fn a_new_config_prunes_overrides_of_backends_it_dropped() {
        let c = cfg();
        let mut o = Overrides::default();
        o.set_drained(&c, "frontend", "web", true).unwrap();
        o.set_weight(&c, "frontend", "experiment", 3).unwrap();
        let mut c2 = c.clone();
        c2.services[0].split.backends.remove(0);
        let gone = o.prune(&c2);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].backend, "web");
        assert_eq!(o.backends.len(), 1);
    }
}
