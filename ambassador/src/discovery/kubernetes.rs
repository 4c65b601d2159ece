//! The `kubernetes` source: the EndpointSlices of a Service, watched through the API server
//! with kube's watcher (list, then watch; re-list with backoff after an error).
//!
//! `name` is `namespace/service`, or `service` in the client's default namespace (the pod's
//! own namespace in a cluster). All slices labelled `kubernetes.io/service-name=<service>` are
//! joined. An endpoint whose `ready` condition is true (or unset, which the API defines as
//! ready) takes new flows. A terminating endpoint that is still `serving` takes none, but
//! flows already on it continue: removal from the set never cuts an established flow (the
//! connection table keeps it), so it is reported as draining until its slice drops it.
//! The port is the slice port named `broker.port_name`, or the only port of the service's
//! protocol, or the one numbered `broker.port`.

use std::{collections::BTreeMap, net::SocketAddr};

use futures_util::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{
    runtime::{watcher, WatchStreamExt},
    Api, Client,
};
use tokio::sync::mpsc;

use super::{BrokerConfig, Found};
use crate::config::{BackendConfig, Proto};

/// The slices of one Service, by slice name.
#[derive(Default)]
pub struct Slices {
    by_name: BTreeMap<String, EndpointSlice>,
}

fn key(s: &EndpointSlice) -> String {
    s.metadata.name.clone().unwrap_or_default()
}

impl Slices {
    pub fn apply(&mut self, s: EndpointSlice) {
        self.by_name.insert(key(&s), s);
    }

    pub fn delete(&mut self, s: &EndpointSlice) {
        self.by_name.remove(&key(s));
    }

    /// A fresh list replaces everything (after a (re)list).
    pub fn replace(&mut self, all: Vec<EndpointSlice>) {
        self.by_name = all.into_iter().map(|s| (key(&s), s)).collect();
    }

    /// The joined endpoint set: ready endpoints as backends, serving-but-terminating ones as
    /// draining. No ready endpoint at all is an error, so the last good set keeps serving.
    pub fn endpoints(&self, what: &str, b: &BrokerConfig, proto: Proto) -> Result<Found, String> {
        let want_proto = match proto {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        };
        let mut ready = Vec::new();
        let mut draining = Vec::new();
        for s in self.by_name.values() {
            if s.address_type == "FQDN" {
                continue;
            }
            let ports: Vec<_> = s
                .ports
                .iter()
                .flatten()
                .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == want_proto)
                .collect();
            let port = if let Some(n) = &b.port_name {
                ports.iter().find(|p| p.name.as_deref() == Some(n.as_str()))
            } else if ports.len() == 1 {
                ports.first()
            } else if let Some(want) = b.port {
                ports.iter().find(|p| p.port == Some(i32::from(want)))
            } else {
                let names: Vec<_> = ports
                    .iter()
                    .map(|p| p.name.clone().unwrap_or_default())
                    .collect();
                return Err(format!(
                    "{what}: slice {} has {} {want_proto} ports {names:?}; set `broker.port_name`",
                    key(s),
                    ports.len()
                ));
            };
            // A slice without the port (yet) contributes nothing.
            let Some(port) = port
                .and_then(|p| p.port)
                .and_then(|p| u16::try_from(p).ok())
            else {
                continue;
            };
            for e in &s.endpoints {
                let c = e.conditions.clone().unwrap_or_default();
                let is_ready = c.ready.unwrap_or(true);
                let serving = c.serving.unwrap_or(is_ready);
                let terminating = c.terminating.unwrap_or(false);
                for a in &e.addresses {
                    let Ok(ip) = a.parse() else { continue };
                    let addr = SocketAddr::new(ip, port);
                    if is_ready && !terminating {
                        ready.push(BackendConfig {
                            name: None,
                            address: addr,
                            weight: 1,
                        });
                    } else if serving && terminating {
                        draining.push(addr);
                    }
                }
            }
        }
        if ready.is_empty() {
            return Err(format!(
                "{what}: no ready endpoint in {} slice(s)",
                self.by_name.len()
            ));
        }
        // An address ready in one slice and terminating in another (a slice being rewritten)
        // counts as ready.
        draining.retain(|a| !ready.iter().any(|r| r.address == *a));
        draining.sort();
        draining.dedup();
        Ok(Found {
            backends: ready,
            draining,
        })
    }
}

/// `namespace/service` or `service`.
pub fn split_name(name: &str) -> (Option<&str>, &str) {
    match name.split_once('/') {
        Some((ns, svc)) => (Some(ns), svc),
        None => (None, name),
    }
}

/// Watch the slices of `b.name` and send each changed set (or error) until `tx` closes.
pub async fn watch(
    b: BrokerConfig,
    proto: Proto,
    tx: mpsc::UnboundedSender<Result<Found, String>>,
) {
    let (ns, svc) = split_name(&b.name);
    let client = loop {
        match Client::try_default().await {
            Ok(c) => break c,
            Err(e) => {
                let e = format!("kubernetes {}: no API client: {e}", b.name);
                if tx.send(Err(e)).is_err() {
                    return;
                }
                tokio::time::sleep(b.refresh).await;
            }
        }
    };
    let what = format!("{}/{svc}", ns.unwrap_or(client.default_namespace()));
    let api: Api<EndpointSlice> = match ns {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::default_namespaced(client),
    };
    let cfg = watcher::Config::default().labels(&format!("kubernetes.io/service-name={svc}"));
    let mut events = watcher(api, cfg).default_backoff().boxed();
    let mut slices = Slices::default();
    let mut listing: Option<Vec<EndpointSlice>> = None;
    while let Some(ev) = events.next().await {
        let changed = match ev {
            Ok(watcher::Event::Init) => {
                listing = Some(Vec::new());
                false
            }
            Ok(watcher::Event::InitApply(s)) => {
                listing.get_or_insert_with(Vec::new).push(s);
                false
            }
            Ok(watcher::Event::InitDone) => {
                slices.replace(listing.take().unwrap_or_default());
                true
            }
            Ok(watcher::Event::Apply(s)) => {
                slices.apply(s);
                true
            }
            Ok(watcher::Event::Delete(s)) => {
                slices.delete(&s);
                true
            }
            Err(e) => {
                if tx
                    .send(Err(format!("kubernetes {what}: watch: {e}")))
                    .is_err()
                {
                    return;
                }
                false
            }
        };
        if changed && tx.send(slices.endpoints(&what, &b, proto)).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::Source;
    use kube::core::WatchEvent;
    use std::time::Duration;

    fn broker(port_name: Option<&str>) -> BrokerConfig {
        BrokerConfig {
            source: Source::Kubernetes,
            name: "db/mysql".into(),
            port: None,
            port_name: port_name.map(str::to_string),
            refresh: Duration::from_secs(1),
        }
    }

    /// Watch events as the API server sends them (`GET ...?watch=1`, one JSON per line).
    const EVENTS: &str = r#"{"type":"ADDED","object":{"kind":"EndpointSlice","apiVersion":"discovery.k8s.io/v1","metadata":{"name":"mysql-abc12","generateName":"mysql-","namespace":"db","uid":"8f3e4c1a-0000-4000-8000-000000000001","resourceVersion":"1001","generation":1,"creationTimestamp":"2026-11-25T10:00:00Z","labels":{"endpointslice.kubernetes.io/managed-by":"endpointslice-controller.k8s.io","kubernetes.io/service-name":"mysql"},"ownerReferences":[{"apiVersion":"v1","kind":"Service","name":"mysql","uid":"8f3e4c1a-0000-4000-8000-0000000000ff","controller":true,"blockOwnerDeletion":true}]},"addressType":"IPv4","endpoints":[{"addresses":["10.244.1.7"],"conditions":{"ready":true,"serving":true,"terminating":false},"targetRef":{"kind":"Pod","namespace":"db","name":"mysql-0","uid":"8f3e4c1a-0000-4000-8000-000000000010"},"nodeName":"node-a"},{"addresses":["10.244.2.9"],"conditions":{"ready":true,"serving":true,"terminating":false},"targetRef":{"kind":"Pod","namespace":"db","name":"mysql-1","uid":"8f3e4c1a-0000-4000-8000-000000000011"},"nodeName":"node-b"}],"ports":[{"name":"mysql","protocol":"TCP","port":3306},{"name":"metrics","protocol":"TCP","port":9104}]}}
{"type":"ADDED","object":{"kind":"EndpointSlice","apiVersion":"discovery.k8s.io/v1","metadata":{"name":"mysql-def34","generateName":"mysql-","namespace":"db","resourceVersion":"1002","labels":{"kubernetes.io/service-name":"mysql"}},"addressType":"IPv4","endpoints":[{"addresses":["10.244.3.4"],"conditions":{"ready":false,"serving":false,"terminating":false},"targetRef":{"kind":"Pod","namespace":"db","name":"mysql-2"}}],"ports":[{"name":"mysql","protocol":"TCP","port":3306},{"name":"metrics","protocol":"TCP","port":9104}]}}
{"type":"MODIFIED","object":{"kind":"EndpointSlice","apiVersion":"discovery.k8s.io/v1","metadata":{"name":"mysql-def34","generateName":"mysql-","namespace":"db","resourceVersion":"1003","labels":{"kubernetes.io/service-name":"mysql"}},"addressType":"IPv4","endpoints":[{"addresses":["10.244.3.4"],"conditions":{"ready":true,"serving":true,"terminating":false},"targetRef":{"kind":"Pod","namespace":"db","name":"mysql-2"}}],"ports":[{"name":"mysql","protocol":"TCP","port":3306},{"name":"metrics","protocol":"TCP","port":9104}]}}
{"type":"MODIFIED","object":{"kind":"EndpointSlice","apiVersion":"discovery.k8s.io/v1","metadata":{"name":"mysql-abc12","generateName":"mysql-","namespace":"db","resourceVersion":"1004","labels":{"kubernetes.io/service-name":"mysql"}},"addressType":"IPv4","endpoints":[{"addresses":["10.244.1.7"],"conditions":{"ready":false,"serving":true,"terminating":true},"targetRef":{"kind":"Pod","namespace":"db","name":"mysql-0"}},{"addresses":["10.244.2.9"],"conditions":{"ready":true,"serving":true,"terminating":false},"targetRef":{"kind":"Pod","namespace":"db","name":"mysql-1"}}],"ports":[{"name":"mysql","protocol":"TCP","port":3306},{"name":"metrics","protocol":"TCP","port":9104}]}}
{"type":"DELETED","object":{"kind":"EndpointSlice","apiVersion":"discovery.k8s.io/v1","metadata":{"name":"mysql-def34","generateName":"mysql-","namespace":"db","resourceVersion":"1005","labels":{"kubernetes.io/service-name":"mysql"}},"addressType":"IPv4","endpoints":[{"addresses":["10.244.3.4"],"conditions":{"ready":true,"serving":true,"terminating":false}}],"ports":[{"name":"mysql","protocol":"TCP","port":3306},{"name":"metrics","protocol":"TCP","port":9104}]}}
{"type":"MODIFIED","object":{"kind":"EndpointSlice","apiVersion":"discovery.k8s.io/v1","metadata":{"name":"mysql-abc12","generateName":"mysql-","namespace":"db","resourceVersion":"1006","labels":{"kubernetes.io/service-name":"mysql"}},"addressType":"IPv4","endpoints":[{"addresses":["10.244.2.9"],"conditions":{"ready":false,"serving":false,"terminating":true}}],"ports":[{"name":"mysql","protocol":"TCP","port":3306},{"name":"metrics","protocol":"TCP","port":9104}]}}"#;

    fn addrs(f: &Found) -> Vec<String> {
        f.backends.iter().map(|b| b.address.to_string()).collect()
    }

    #[test]
    fn watch_events_join_slices_and_keep_terminating_endpoints_out_of_new_flows() {
        let mut slices = Slices::default();
        let mut seen = Vec::new();
        for line in EVENTS.lines() {
            match serde_json::from_str::<WatchEvent<EndpointSlice>>(line).unwrap() {
                WatchEvent::Added(s) | WatchEvent::Modified(s) => slices.apply(s),
                WatchEvent::Deleted(s) => slices.delete(&s),
                other => panic!("unexpected event {other:?}"),
            }
            seen.push(slices.endpoints("db/mysql", &broker(Some("mysql")), Proto::Tcp));
        }
        let ok = |i: usize| seen[i].as_ref().unwrap();
        // Two ready pods; a not-ready one in a second slice is not used.
        assert_eq!(addrs(ok(0)), ["10.244.1.7:3306", "10.244.2.9:3306"]);
        assert_eq!(addrs(ok(1)), ["10.244.1.7:3306", "10.244.2.9:3306"]);
        // It becomes ready: all slices are joined.
        assert_eq!(
            addrs(ok(2)),
            ["10.244.1.7:3306", "10.244.2.9:3306", "10.244.3.4:3306"]
        );
        // mysql-0 terminates but still serves: no new flows, listed as draining.
        assert_eq!(addrs(ok(3)), ["10.244.2.9:3306", "10.244.3.4:3306"]);
        assert_eq!(ok(3).draining, ["10.244.1.7:3306".parse().unwrap()]);
        // Its slice deleted: its endpoints go.
        assert_eq!(addrs(ok(4)), ["10.244.2.9:3306"]);
        // Nothing ready: an error, so the daemon keeps the last good set.
        let e = seen[5].as_ref().unwrap_err();
        assert!(
            e.contains("db/mysql") && e.contains("no ready endpoint"),
            "{e}"
        );
    }

    #[test]
    fn ports_are_chosen_by_name_or_must_be_unambiguous() {
        let mut slices = Slices::default();
        let first = EVENTS.lines().next().unwrap();
        let WatchEvent::Added(s) = serde_json::from_str(first).unwrap() else {
            panic!()
        };
        slices.apply(s);
        let m = slices
            .endpoints("db/mysql", &broker(Some("metrics")), Proto::Tcp)
            .unwrap();
        assert_eq!(addrs(&m), ["10.244.1.7:9104", "10.244.2.9:9104"]);
        let e = slices
            .endpoints("db/mysql", &broker(None), Proto::Tcp)
            .unwrap_err();
        assert!(
            e.contains("set `broker.port_name`") && e.contains("metrics"),
            "{e}"
        );
        let mut by_number = broker(None);
        by_number.port = Some(3306);
        let m = slices
            .endpoints("db/mysql", &by_number, Proto::Tcp)
            .unwrap();
        assert_eq!(addrs(&m), ["10.244.1.7:3306", "10.244.2.9:3306"]);
        // No UDP port at all: nothing ready for a UDP service.
        assert!(slices
            .endpoints("db/mysql", &broker(Some("mysql")), Proto::Udp)
            .is_err());
    }

    #[test]
    fn names_carry_an_optional_namespace() {
        assert_eq!(split_name("db/mysql"), (Some("db"), "mysql"));
        assert_eq!(split_name("mysql"), (None, "mysql"));
    }
}
