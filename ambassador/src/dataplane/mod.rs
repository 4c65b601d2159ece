//! Data planes: what the config means for packets, and the two places it is carried out.
//!
//! [`Plan`] turns a validated config into per-service selectors (pure: no kernel needed);
//! [`kernel`] writes plans into the XDP program's maps; [`userspace`] proxies with them. Both `simulate` and the tests use the
//! same [`Plan`], so their choices are the kernel's.

pub mod attach;
pub mod kernel;
pub mod packet;
pub mod userspace;

use crate::{
    config::{BackendConfig, Config, Listen, SplitKey},
    select::{flow_key, service_seed, Member, Selector, Table},
};

/// One service, ready to program.
#[derive(Debug, Clone)]
pub struct ServicePlan {
    pub name: String,
    pub listen: Listen,
    pub key: SplitKey,
    pub backends: Vec<BackendConfig>,
    pub selector: Selector,
    /// Served by userspace even when XDP runs (TLS; the fallback of a connect-time service): the
    /// kernel passes its packets to the stack.
    pub userspace: bool,
    /// Connections from the configured cgroup are redirected at `connect()` in the kernel.
    pub connect_time: bool,
}

impl ServicePlan {
    /// The backend a new flow from `client` picks, or `None` for a service without backends.
    pub fn pick(&self, client: std::net::SocketAddr) -> Option<&BackendConfig> {
        let f = flow_key(client, self.listen.addr, self.listen.proto.number());
        self.selector.pick(&f).map(|i| &self.backends[i])
    }
}

/// Every service of a config with its lookup table built.
#[derive(Debug, Clone)]
pub struct Plan {
    pub services: Vec<ServicePlan>,
}

impl Plan {
    pub fn build(cfg: &Config) -> Plan {
        Plan::build_from(cfg, None)
    }

    /// The plan for `cfg`, deriving each service's table from its table in `prev` (same
    /// result as [`Plan::build`], in time proportional to what changed: a weight change on a
    /// service with 1,000 backends rescores one backend, not all of them).
    pub fn build_from(cfg: &Config, prev: Option<&Plan>) -> Plan {
        let services = cfg
            .l4_services()
            .map(|s| {
                let members: Vec<Member> = s
                    .split
                    .backends
                    .iter()
                    .map(|b| Member {
                        id: b.id(),
                        weight: b.weight,
                    })
                    .collect();
                ServicePlan {
                    name: s.name.clone(),
                    listen: s.listen,
                    key: s.split.key,
                    backends: s.split.backends.clone(),
                    selector: Selector {
                        key_mode: s.split.key.mode() as u32,
                        seed: s.split.seed.unwrap_or_else(|| service_seed(&s.name)),
                        table: match prev.and_then(|p| p.service(&s.name)) {
                            Some(p) => Table::rebuild(&p.selector.table, &members),
                            None => Table::build(&members),
                        },
                    },
                    userspace: s.tls.is_some() || s.cgroup.is_some(),
                    connect_time: s.cgroup.is_some(),
                }
            })
            .collect();
        Plan { services }
    }

    pub fn service(&self, name: &str) -> Option<&ServicePlan> {
        self.services.iter().find(|s| s.name == name)
    }
}
