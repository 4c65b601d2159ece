//! twemproxy (nutcracker) configs: `ambassador import nutcracker.yml` prints the equivalent
//! `ambassador.yaml`, and `ambassador run --config nutcracker.yml` serves one directly.
//!
//! Every twemproxy pool key is understood; the ones this ambassador does not act on
//! (`backlog`, `preconnect`, `client_connections`, `server_connections`, `tcpkeepalive`) are
//! accepted and ignored because they tune twemproxy's own process, not placement or behaviour a
//! client sees. `redis: false` pools become `memcache` services. What cannot be honoured (a
//! non-zero `redis_db`, Unix sockets)
//! is an error naming the pool and the key.

use std::{collections::BTreeMap, net::ToSocketAddrs};

use serde::Deserialize;

use super::{dist::Kind, Hash};
use crate::config::{
    Config, Limits, Listen, Proto, RedisConfig, ServiceConfig, ShardConfig, Split,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NcPool {
    listen: String,
    #[serde(default)]
    hash: Option<Hash>,
    #[serde(default)]
    hash_tag: Option<String>,
    #[serde(default)]
    distribution: Option<Kind>,
    #[serde(default)]
    timeout: Option<u64>,
    #[serde(default)]
    redis: bool,
    #[serde(default)]
    redis_auth: Option<String>,
    #[serde(default)]
    redis_db: Option<u32>,
    #[serde(default)]
    auto_eject_hosts: Option<bool>,
    #[serde(default)]
    server_retry_timeout: Option<u64>,
    #[serde(default)]
    server_failure_limit: Option<u32>,
    servers: Vec<String>,
    // Process tuning of twemproxy's own; nothing to translate.
    #[serde(default)]
    #[allow(dead_code)]
    backlog: Option<u32>,
    #[serde(default)]
    #[allow(dead_code)]
    preconnect: Option<bool>,
    #[serde(default)]
    #[allow(dead_code)]
    client_connections: Option<u32>,
    #[serde(default)]
    #[allow(dead_code)]
    server_connections: Option<u32>,
    #[serde(default)]
    #[allow(dead_code)]
    tcpkeepalive: Option<bool>,
}

/// Whether `text` looks like a twemproxy config: a map of pools, each with `servers`, and no
/// `services` key.
pub fn looks_like(text: &str) -> bool {
    match serde_yaml::from_str::<serde_yaml::Value>(text) {
        Ok(serde_yaml::Value::Mapping(m)) => {
            !m.is_empty()
                && !m.contains_key("services")
                && m.values().all(|v| v.get("servers").is_some())
        }
        _ => false,
    }
}

/// Translate a twemproxy config. Errors name the pool, the key and the fix.
pub fn import(text: &str) -> Result<Config, String> {
    let pools: BTreeMap<String, NcPool> =
        serde_yaml::from_str(text).map_err(|e| format!("not a twemproxy config: {e}"))?;
    let mut services = Vec::new();
    for (name, p) in pools {
        let at = |key: &str| format!("pool `{name}`, key `{key}`");
        if p.redis_db.unwrap_or(0) != 0 {
            return Err(format!(
                "{}: shards are one keyspace in database 0; remove `redis_db`",
                at("redis_db")
            ));
        }
        let listen: Listen = format!("{}/tcp", p.listen.trim()).parse().map_err(|e| {
            format!(
                "{}: `{}` is not HOST:PORT ({e}); Unix sockets are not supported",
                at("listen"),
                p.listen
            )
        })?;
        let mut shards = Vec::new();
        for s in &p.servers {
            shards.push(server(s).map_err(|e| format!("{}: `{s}`: {e}", at("servers")))?);
        }
        let service_name: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        services.push(ServiceConfig {
            name: service_name,
            listen: Listen {
                addr: listen.addr,
                proto: Proto::Tcp,
            },
            split: Split::default(),
            redis: None,
            memcache: None,
            tls: None,
            limits: Limits::default(),
            cgroup: None,
            broker: None,
            health: None,
        });
        let sharding = RedisConfig {
            hash: p.hash.unwrap_or(Hash::Fnv1a_64),
            distribution: p.distribution.unwrap_or(Kind::Ketama),
            hash_tag: p.hash_tag,
            timeout_ms: p.timeout,
            auto_eject_hosts: p.auto_eject_hosts.unwrap_or(false),
            server_retry_timeout_ms: p.server_retry_timeout.unwrap_or(30_000),
            server_failure_limit: p.server_failure_limit.unwrap_or(2),
            // twemproxy's redis_auth is both what clients must AUTH with and what it sends.
            password: p.redis_auth.clone(),
            server_password: p.redis_auth,
            shards,
        };
        let svc = services.last_mut().expect("just pushed");
        if p.redis {
            svc.redis = Some(sharding);
        } else {
            svc.memcache = Some(sharding);
        }
    }
    Ok(Config {
        interfaces: Vec::new(),
        attach: Default::default(),
        attach_by_interface: Default::default(),
        services,
        gitsync: Vec::new(),
        resolvers: None,
    })
}

/// `host:port:weight [name]`.
fn server(s: &str) -> Result<ShardConfig, String> {
    let mut words = s.split_whitespace();
    let addr = words.next().ok_or("empty server line")?;
    let name = words.next().map(String::from);
    let (hostport, weight) = addr.rsplit_once(':').ok_or("expected host:port:weight")?;
    let weight: u32 = weight
        .parse()
        .map_err(|_| format!("weight `{weight}` is not a number"))?;
    let address = hostport
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve `{hostport}`: {e}"))?
        .next()
        .ok_or_else(|| format!("`{hostport}` has no address"))?;
    Ok(ShardConfig {
        name,
        address,
        weight,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NC: &str = "
alpha:
  listen: 127.0.0.1:22121
  hash: fnv1a_64
  distribution: ketama
  auto_eject_hosts: true
  redis: true
  server_retry_timeout: 2000
  server_failure_limit: 1
  timeout: 400
  hash_tag: \"{}\"
  preconnect: true
  servers:
   - 127.0.0.1:6379:1 shard-a
   - 127.0.0.1:6380:2
";

    #[test]
    fn a_redis_pool_translates_key_for_key() {
        assert!(looks_like(NC));
        let c = import(NC).unwrap();
        let s = &c.services[0];
        assert_eq!(s.name, "alpha");
        assert_eq!(s.listen.to_string(), "127.0.0.1:22121/tcp");
        let r = s.redis.as_ref().unwrap();
        assert_eq!(r.hash, Hash::Fnv1a_64);
        assert_eq!(r.timeout_ms, Some(400));
        assert!(r.auto_eject_hosts);
        assert_eq!(r.server_retry_timeout_ms, 2000);
        assert_eq!(r.shards[0].name.as_deref(), Some("shard-a"));
        assert_eq!(r.shards[1].weight, 2);
        assert_eq!(r.shards[1].name, None);
        // What is printed parses back as an ambassador config.
        let yaml = serde_yaml::to_string(&c).unwrap();
        let back = Config::parse(std::path::Path::new("x.yaml"), &yaml).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn what_cannot_be_honoured_is_an_error_naming_pool_and_key() {
        let mc = import(
            &NC.replace("redis: true", "redis: false")
                .replace("  timeout: 400\n", ""),
        )
        .unwrap();
        assert!(mc.services[0].memcache.is_some() && mc.services[0].redis.is_none());
        let e = import(&NC.replace("preconnect: true", "redis_db: 3")).unwrap_err();
        assert!(e.contains("redis_db"), "{e}");
        let e = import(&NC.replace("preconnect: true", "colour: blue")).unwrap_err();
        assert!(e.contains("colour"), "{e}");
        assert!(!looks_like("services: []\n"));
    }
}
