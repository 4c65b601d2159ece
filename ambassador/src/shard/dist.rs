//! twemproxy's distributions: ketama (a consistent-hash continuum of md5 points), modula
//! (`hash % total weight`, each server repeated weight times) and random (weighted).

use serde::{Deserialize, Serialize};

use super::hash::md5;

/// A shard as twemproxy names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// The name given in the config (`host:port:weight name`), if any.
    pub name: Option<String>,
    pub host: String,
    pub port: u16,
    pub weight: u32,
}

impl Server {
    /// What ketama hashes: the given name, else `host:port`, else (port 11211, for
    /// libmemcached compatibility) just the host.
    pub fn ketama_name(&self) -> String {
        match &self.name {
            Some(n) => n.clone(),
            None if self.port == 11211 => self.host.clone(),
            None => format!("{}:{}", self.host, self.port),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Ketama,
    Modula,
    Random,
}

/// A built distribution: `dispatch(hash)` is the index of the server a key goes to.
#[derive(Debug, Clone)]
pub struct Distribution {
    kind: Kind,
    /// (point, server index), sorted by point for ketama; one entry per weight unit otherwise.
    continuum: Vec<(u32, usize)>,
}

const POINTS_PER_SERVER: f32 = 160.0;

impl Distribution {
    /// Build over the live servers (indexes refer to `servers`; `live[i]` false leaves server i
    /// out, as `auto_eject_hosts` does).
    pub fn build(kind: Kind, servers: &[Server], live: &[bool]) -> Distribution {
        let alive: Vec<usize> = (0..servers.len())
            .filter(|&i| live.get(i).copied().unwrap_or(true))
            .collect();
        let mut continuum = Vec::new();
        match kind {
            Kind::Ketama => {
                let total: u32 = alive.iter().map(|&i| servers[i].weight).sum();
                let n = alive.len() as f32;
                for &i in &alive {
                    let s = &servers[i];
                    // twemproxy's float maths, step by step: float pct, float products, a
                    // double epsilon, then floorf.
                    let pct = s.weight as f32 / total as f32;
                    let v = pct * POINTS_PER_SERVER / 4.0 * n;
                    let points = ((v as f64 + 0.000_000_000_1) as f32).floor() as u32 * 4;
                    let name = s.ketama_name();
                    for p in 0..points / 4 {
                        let d = md5(format!("{name}-{p}").as_bytes());
                        for x in 0..4 {
                            let w = u32::from_le_bytes([
                                d[4 * x],
                                d[4 * x + 1],
                                d[4 * x + 2],
                                d[4 * x + 3],
                            ]);
                            continuum.push((w, i));
                        }
                    }
                }
                continuum.sort_by_key(|&(v, _)| v);
            }
            Kind::Modula | Kind::Random => {
                for &i in &alive {
                    for _ in 0..servers[i].weight {
                        continuum.push((0, i));
                    }
                }
            }
        }
        Distribution { kind, continuum }
    }

    /// The server for a key hash; None when no server is live.
    pub fn dispatch(&self, hash: u32) -> Option<usize> {
        if self.continuum.is_empty() {
            return None;
        }
        Some(match self.kind {
            Kind::Ketama => {
                let i = self.continuum.partition_point(|&(v, _)| v < hash);
                self.continuum[if i == self.continuum.len() { 0 } else { i }].1
            }
            Kind::Modula => self.continuum[hash as usize % self.continuum.len()].1,
            Kind::Random => self.continuum[random_index(self.continuum.len())].1,
        })
    }
}

fn random_index(n: usize) -> usize {
    use std::sync::atomic::{AtomicU64, Ordering};
    static STATE: AtomicU64 = AtomicU64::new(0x9e37_79b9_7f4a_7c15);
    let x = STATE.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
    let mut z = x ^ (x >> 30);
    z = z.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z ^= z >> 27;
    (z % n as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers(weights: &[u32]) -> Vec<Server> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| Server {
                name: Some(format!("shard-{i}")),
                host: "127.0.0.1".into(),
                port: 6379 + i as u16,
                weight: w,
            })
            .collect()
    }

    #[test]
    fn ketama_has_160_points_per_equal_server_and_is_sorted() {
        let d = Distribution::build(Kind::Ketama, &servers(&[1, 1, 1]), &[]);
        assert_eq!(d.continuum.len(), 480);
        assert!(d.continuum.windows(2).all(|w| w[0].0 <= w[1].0));
    }

    #[test]
    fn ketama_naming_follows_twemproxy() {
        let mut s = servers(&[1])[0].clone();
        assert_eq!(s.ketama_name(), "shard-0");
        s.name = None;
        assert_eq!(s.ketama_name(), "127.0.0.1:6379");
        s.port = 11211;
        assert_eq!(s.ketama_name(), "127.0.0.1");
    }

    #[test]
    fn modula_repeats_servers_by_weight() {
        let d = Distribution::build(Kind::Modula, &servers(&[1, 2]), &[]);
        assert_eq!(d.dispatch(0), Some(0));
        assert_eq!(d.dispatch(1), Some(1));
        assert_eq!(d.dispatch(2), Some(1));
        assert_eq!(d.dispatch(3), Some(0));
    }

    #[test]
    fn ejected_servers_leave_the_distribution() {
        let d = Distribution::build(Kind::Ketama, &servers(&[1, 1, 1]), &[true, false, true]);
        assert!((0..10_000u32).all(|h| d.dispatch(h.wrapping_mul(2_654_435_761)) != Some(1)));
        let none = Distribution::build(Kind::Ketama, &servers(&[1]), &[false]);
        assert_eq!(none.dispatch(5), None);
    }
}
