//! `GET /metrics`: the status report as Prometheus (OpenMetrics) text, via prometheus-client.
//! Built from the same [`StatusReport`] as `ambassador status`, so the two never disagree.

use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::status::StatusReport;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    service: String,
    backend: String,
    address: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DiscoveryLabels {
    service: String,
    name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NameLabel {
    name: String,
}

/// The content type of [`encode_report`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub fn encode_report(r: &StatusReport) -> String {
    let mut reg = Registry::with_prefix("ambassador");
    let packets = Family::<BackendLabels, Counter>::default();
    let bytes = Family::<BackendLabels, Counter>::default();
    let new_flows = Family::<BackendLabels, Counter>::default();
    let weight = Family::<BackendLabels, Gauge>::default();
    let drained = Family::<BackendLabels, Gauge>::default();
    let open = Family::<BackendLabels, Gauge>::default();
    let healthy = Family::<BackendLabels, Gauge>::default();
    reg.register(
        "backend_healthy",
        "1 when the backend passes its health checks (services with `health` only)",
        healthy.clone(),
    );
    reg.register(
        "backend_packets",
        "Packets forwarded to and from the backend by XDP",
        packets.clone(),
    );
    reg.register(
        "backend_bytes",
        "IP bytes forwarded to and from the backend by XDP",
        bytes.clone(),
    );
    reg.register(
        "backend_new_flows",
        "New flows the backend was picked for by XDP",
        new_flows.clone(),
    );
    reg.register(
        "backend_weight",
        "The backend's weight in force (config or set-weight)",
        weight.clone(),
    );
    reg.register(
        "backend_drained",
        "1 when the backend is drained (no new flows)",
        drained.clone(),
    );
    reg.register(
        "backend_open_flows",
        "Flows to the backend the connection table holds open",
        open.clone(),
    );
    for s in &r.services {
        for b in &s.backends {
            let l = BackendLabels {
                service: s.name.clone(),
                backend: b.name.clone(),
                address: b.address.clone(),
            };
            packets.get_or_create(&l).inc_by(b.packets);
            bytes.get_or_create(&l).inc_by(b.bytes);
            new_flows.get_or_create(&l).inc_by(b.new_flows);
            weight.get_or_create(&l).set(b.weight as i64);
            drained.get_or_create(&l).set(b.drained as i64);
            if let Some(h) = &b.health {
                healthy.get_or_create(&l).set((h == "healthy") as i64);
            }
            if let Some(n) = b.open_flows {
                open.get_or_create(&l).set(n as i64);
            }
        }
    }
    let kernel = Family::<NameLabel, Counter>::default();
    reg.register(
        "kernel_events",
        "Kernel program (XDP and TC) counters by event (see `ambassador status`)",
        kernel.clone(),
    );
    for (k, v) in &r.kernel {
        kernel
            .get_or_create(&NameLabel { name: k.clone() })
            .inc_by(*v);
    }
    let user = Family::<NameLabel, Counter>::default();
    reg.register(
        "userspace_events",
        "Counters of the userspace paths (TLS sidecar, userspace data plane)",
        user.clone(),
    );
    for (k, v) in &r.userspace {
        user.get_or_create(&NameLabel { name: k.clone() })
            .inc_by(*v);
    }
    let endpoints = Family::<DiscoveryLabels, Gauge>::default();
    reg.register(
        "discovery_endpoints",
        "Endpoints of a brokered service taking new flows (the last good set)",
        endpoints.clone(),
    );
    let draining = Family::<DiscoveryLabels, Gauge>::default();
    reg.register(
        "discovery_draining_endpoints",
        "Terminating endpoints of a brokered service that keep their open flows",
        draining.clone(),
    );
    let stale = Family::<DiscoveryLabels, Gauge>::default();
    reg.register(
        "discovery_stale",
        "1 while a brokered service's discovery fails and the last good set serves",
        stale.clone(),
    );
    let last_success = Family::<DiscoveryLabels, Gauge>::default();
    reg.register(
        "discovery_last_success_timestamp_seconds",
        "Unix time of a brokered service's last good answer",
        last_success.clone(),
    );
    for d in &r.discovery {
        let l = DiscoveryLabels {
            service: d.service.clone(),
            name: d.name.clone(),
        };
        endpoints.get_or_create(&l).set(d.backends.len() as i64);
        draining.get_or_create(&l).set(d.draining.len() as i64);
        stale.get_or_create(&l).set(d.last_error.is_some() as i64);
        if let Some(t) = d.last_success {
            last_success.get_or_create(&l).set(t as i64);
        }
    }
    let generation = Gauge::<i64>::default();
    generation.set(r.generation as i64);
    reg.register(
        "config_generation",
        "Incremented on every applied config or override",
        generation,
    );
    let rejected = Gauge::<i64>::default();
    rejected.set(r.last_error.is_some() as i64);
    reg.register(
        "config_last_reload_rejected",
        "1 when the last config or certificate reload was rejected",
        rejected,
    );
    let mut out = String::new();
    encode(&mut out, &reg).expect("writing to a String cannot fail");
    out
}
