//! The sidecar's HTTP face: `POST /sync` (the webhook: sync now), `/live`, `/ready` (503
//! until the first tree is published), `/status` (JSON) and `/metrics` (OpenMetrics).

use std::{convert::Infallible, sync::Arc};

use anyhow::{Context as _, Result};
use http_body_util::{BodyExt as _, Limited};
use hyper::{body::Incoming, server::conn::http1, service::service_fn, Method, Request};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tracing::{debug, info, warn};

use super::{Status, Syncer, Webhook};
use crate::admin::{reply, text, Resp};

/// Bind and serve in the background; aborting the returned task closes the listener.
pub async fn serve(w: &Webhook, syncer: Arc<Syncer>) -> Result<tokio::task::JoinHandle<()>> {
    let secret = match &w.secret_file {
        Some(f) => Some(Arc::new(
            std::fs::read_to_string(f)
                .with_context(|| format!("reading the webhook secret {}", f.display()))?
                .trim()
                .to_string(),
        )),
        None => None,
    };
    let l = tokio::net::TcpListener::bind(w.listen)
        .await
        .with_context(|| format!("webhook: binding {}", w.listen))?;
    let addr = l.local_addr()?;
    info!(job = %syncer.spec.name, %addr, "webhook, readiness and metrics served");
    Ok(tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let (syncer, secret) = (syncer.clone(), secret.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req| handle(syncer.clone(), secret.clone(), req));
                if let Err(e) = http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await
                {
                    debug!("webhook connection: {e}");
                }
            });
        }
    }))
}

async fn handle(
    syncer: Arc<Syncer>,
    secret: Option<Arc<String>>,
    req: Request<Incoming>,
) -> Result<Resp, Infallible> {
    let path = req.uri().path().to_string();
    Ok(match (req.method().clone(), path.as_str()) {
        (Method::POST, "/sync" | "/") => {
            let headers = req.headers().clone();
            let body = match Limited::new(req.into_body(), 4 << 20).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return Ok(text(413, "body over 4 MiB")),
            };
            if let Some(s) = &secret {
                if !authorized(s.as_bytes(), &headers, &body) {
                    warn!(job = %syncer.spec.name, "webhook call refused: no valid signature or token");
                    return Ok(text(401, "needs X-Hub-Signature-256, X-Gitlab-Token or Authorization: Bearer with the webhook secret"));
                }
            }
            syncer.trigger();
            text(202, "sync scheduled")
        }
        (Method::GET, "/live") => text(200, "ok"),
        (Method::GET, "/ready") => {
            let st = syncer.status();
            if st.ready {
                text(200, "ready")
            } else {
                text(503, "not ready: nothing published yet")
            }
        }
        (Method::GET, "/status") => reply(
            200,
            "application/json",
            serde_json::to_vec_pretty(&syncer.status()).unwrap_or_default(),
        ),
        (Method::GET, "/metrics") => reply(
            200,
            crate::metrics::CONTENT_TYPE,
            encode_metrics(&[syncer.status()]),
        ),
        _ => text(
            404,
            "try POST /sync, or GET /live, /ready, /status, /metrics",
        ),
    })
}

/// GitHub signs the body (HMAC-SHA256); GitLab and others send the secret itself.
fn authorized(secret: &[u8], h: &hyper::HeaderMap, body: &[u8]) -> bool {
    if let Some(sig) = h
        .get("x-hub-signature-256")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("sha256="))
    {
        let Some(sig) = hex(sig) else { return false };
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        return ring::hmac::verify(&key, body, &sig).is_ok();
    }
    let given = h
        .get("x-gitlab-token")
        .and_then(|v| v.to_str().ok())
        .or_else(|| {
            h.get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
        });
    given.is_some_and(|g| crate::admin::same(g.as_bytes(), secret))
}

fn hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Job {
    job: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Published {
    job: String,
    commit: String,
}

pub fn encode_metrics(statuses: &[Status]) -> String {
    let mut reg = Registry::with_prefix("ambassador_gitsync");
    let ready = Family::<Job, Gauge>::default();
    let last_success = Family::<Job, Gauge>::default();
    let failures_now = Family::<Job, Gauge>::default();
    let duration = Family::<Job, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    let syncs = Family::<Job, Counter>::default();
    let publishes = Family::<Job, Counter>::default();
    let failures = Family::<Job, Counter>::default();
    let published = Family::<Published, Gauge>::default();
    reg.register("ready", "1 once a tree is published", ready.clone());
    reg.register(
        "last_success_timestamp_seconds",
        "Unix time of the last sync without error",
        last_success.clone(),
    );
    reg.register(
        "consecutive_failures",
        "Failed syncs since the last good one",
        failures_now.clone(),
    );
    reg.register(
        "last_sync_duration_seconds",
        "Duration of the last sync",
        duration.clone(),
    );
    reg.register("syncs", "Syncs attempted", syncs.clone());
    reg.register("publishes", "Trees published", publishes.clone());
    reg.register(
        "failures",
        "Syncs that failed or were rejected",
        failures.clone(),
    );
    reg.register(
        "published_info",
        "The published commit (value 1)",
        published.clone(),
    );
    for s in statuses {
        let j = Job {
            job: s.name.clone(),
        };
        ready.get_or_create(&j).set(s.ready as i64);
        last_success
            .get_or_create(&j)
            .set(s.last_success.unwrap_or(0) as i64);
        failures_now
            .get_or_create(&j)
            .set(s.consecutive_failures as i64);
        duration
            .get_or_create(&j)
            .set(s.last_duration_ms.unwrap_or(0) as f64 / 1000.0);
        syncs.get_or_create(&j).inc_by(s.syncs);
        publishes.get_or_create(&j).inc_by(s.publishes);
        failures.get_or_create(&j).inc_by(s.failures);
        if let Some(c) = &s.published {
            published
                .get_or_create(&Published {
                    job: s.name.clone(),
                    commit: c.clone(),
                })
                .set(1);
        }
    }
    let mut out = String::new();
    encode(&mut out, &reg).expect("writing to a String");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn github_signatures_and_tokens_are_checked() {
        let secret = b"s3cret";
        let body = b"{\"ref\":\"refs/heads/main\"}";
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        let tag = ring::hmac::sign(&key, body);
        let sig: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let mut h = hyper::HeaderMap::new();
        h.insert(
            "x-hub-signature-256",
            format!("sha256={sig}").parse().unwrap(),
        );
        assert!(authorized(secret, &h, body));
        assert!(!authorized(secret, &h, b"{\"ref\":\"refs/heads/evil\"}"));
        assert!(!authorized(b"other", &h, body));
        let mut h = hyper::HeaderMap::new();
        h.insert("x-gitlab-token", "s3cret".parse().unwrap());
        assert!(authorized(secret, &h, body));
        let mut h = hyper::HeaderMap::new();
        h.insert("authorization", "Bearer nope".parse().unwrap());
        assert!(!authorized(secret, &h, body));
        assert!(!authorized(secret, &hyper::HeaderMap::new(), body));
    }

    #[test]
    fn metrics_name_the_job_and_commit() {
        let s = Status {
            name: "app".into(),
            ready: true,
            published: Some("ab".repeat(20)),
            consecutive_failures: 2,
            syncs: 5,
            ..Default::default()
        };
        let m = encode_metrics(&[s]);
        assert!(m.contains("ambassador_gitsync_ready{job=\"app\"} 1"), "{m}");
        assert!(m.contains("ambassador_gitsync_consecutive_failures{job=\"app\"} 2"));
        assert!(m.contains("ambassador_gitsync_syncs_total{job=\"app\"} 5"));
        assert!(m.contains(&format!("commit=\"{}\"", "ab".repeat(20))));
    }
}
