//! The Kubernetes deployment: manifests are real API objects (checked against k8s-openapi's
//! types, unknown fields rejected), the shipped config is valid, the probes reach endpoints
//! the daemon has, and a ConfigMap volume's atomic `..data` swap reloads the daemon.

use std::path::{Path, PathBuf};

use ambassador_tests::{
    ambassador_bin,
    topology::{split_config, Topology, VIP4},
};
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Namespace, Secret, ServiceAccount},
};
use serde::de::DeserializeOwned;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every key of `orig` must survive a round trip through the typed object: serde ignores
/// unknown fields, so a typo'd or misplaced field would otherwise pass silently.
fn assert_known(orig: &serde_json::Value, back: &serde_json::Value, at: &str) {
    match (orig, back) {
        (serde_json::Value::Object(o), serde_json::Value::Object(b)) => {
            for (k, v) in o {
                let here = format!("{at}.{k}");
                let bv = b
                    .get(k)
                    .unwrap_or_else(|| panic!("unknown field {here} (not in the API type)"));
                assert_known(v, bv, &here);
            }
        }
        (serde_json::Value::Array(o), serde_json::Value::Array(b)) => {
            assert_eq!(o.len(), b.len(), "{at}");
            for (i, (v, bv)) in o.iter().zip(b).enumerate() {
                assert_known(v, bv, &format!("{at}[{i}]"));
            }
        }
        _ => {}
    }
}

fn check<T: DeserializeOwned + serde::Serialize>(doc: &serde_json::Value, what: &str) -> T {
    let typed: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{what} is not a valid object: {e}"));
    let back = serde_json::to_value(&typed).unwrap();
    assert_known(doc, &back, what);
    typed
}

/// The documents of a manifest file, as JSON values.
fn documents(file: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(deploy_dir().join(file)).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(d).unwrap();
            serde_json::to_value(v).unwrap()
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn validate(file: &str) -> (Vec<DaemonSet>, Vec<ConfigMap>, Vec<Secret>) {
    let (mut ds, mut cms, mut secrets) = (Vec::new(), Vec::new(), Vec::new());
    for (i, doc) in documents(file).iter().enumerate() {
        let what = format!("{file} document {i}");
        match (doc["apiVersion"].as_str(), doc["kind"].as_str()) {
            (Some("apps/v1"), Some("DaemonSet")) => ds.push(check::<DaemonSet>(doc, &what)),
            (Some("v1"), Some("ConfigMap")) => cms.push(check::<ConfigMap>(doc, &what)),
            (Some("v1"), Some("Secret")) => secrets.push(check::<Secret>(doc, &what)),
            (Some("v1"), Some("Namespace")) => {
                check::<Namespace>(doc, &what);
            }
            (Some("v1"), Some("ServiceAccount")) => {
                check::<ServiceAccount>(doc, &what);
            }
            other => panic!("{what}: unexpected kind {other:?}"),
        }
    }
    (ds, cms, secrets)
}

#[test]
fn manifests_are_valid_kubernetes_objects_that_match_the_daemon() {
    let (ds, _, secrets) = validate("daemonset.yaml");
    let (ds_priv, _, _) = validate("daemonset-privileged.yaml");
    let (_, cms, _) = validate("configmap.yaml");
    assert_eq!(
        (ds.len(), ds_priv.len(), cms.len(), secrets.len()),
        (1, 1, 1, 1)
    );

    // The shipped config passes `ambassador check`.
    let text = &cms[0].data.as_ref().unwrap()["ambassador.yaml"];
    let dir = std::env::temp_dir().join(format!("amb-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("ambassador.yaml"), text).unwrap();
    let out = std::process::Command::new(ambassador_bin())
        .arg("check")
        .arg(dir.join("ambassador.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);

    for (d, privileged) in [(&ds[0], false), (&ds_priv[0], true)] {
        let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        assert_eq!(pod.host_network, Some(true));
        let c = &pod.containers[0];
        let args = c.args.as_ref().unwrap();
        // Every flag the manifest passes is one `ambassador run` has.
        let help = std::process::Command::new(ambassador_bin())
            .args(["run", "--help"])
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&help.stdout);
        for a in args.iter().filter(|a| a.starts_with("--")) {
            assert!(help.contains(a.as_str()), "`run` has no flag {a}");
        }
        assert!(
            args.contains(&"--keep-on-exit".to_string()),
            "rolling updates would drop flows"
        );
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.privileged.unwrap_or(false), privileged);
        if !privileged {
            let caps = sc.capabilities.as_ref().unwrap().add.as_ref().unwrap();
            for need in ["BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE"] {
                assert!(caps.iter().any(|c| c == need), "missing capability {need}");
            }
        }
        // Probes hit the admin API's endpoints.
        for (probe, path) in [
            (c.liveness_probe.as_ref(), "/live"),
            (c.readiness_probe.as_ref(), "/ready"),
        ] {
            let get = probe
                .and_then(|p| p.http_get.as_ref())
                .expect("httpGet probe");
            assert_eq!(get.path.as_deref(), Some(path));
        }
        // The config and the pinned state come from the right places.
        let mounts: Vec<&str> = c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| m.mount_path.as_str())
            .collect();
        for m in ["/etc/ambassador", "/sys/fs/bpf", "/run/ambassador"] {
            assert!(mounts.contains(&m), "no volume mounted at {m}");
        }
        assert!(
            c.volume_mounts
                .as_ref()
                .unwrap()
                .iter()
                .all(|m| m.sub_path.is_none()),
            "a subPath mount never sees ConfigMap updates"
        );
    }
}

#[test]
fn a_configmap_style_data_swap_reloads_and_a_bad_one_keeps_serving() {
    let mut t = Topology::new(20);
    t.start_nginx(1);
    // The kubelet's layout: ambassador.yaml → ..data/ambassador.yaml, ..data → ..<timestamp>.
    let version = |n: u32, text: &str| {
        let d = t.dir.join(format!("..2026_11_25_{n}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("ambassador.yaml"), text).unwrap();
        d
    };
    let swap = |to: &Path| {
        let tmp = t.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(to.file_name().unwrap(), &tmp).unwrap();
        std::fs::rename(&tmp, t.dir.join("..data")).unwrap();
    };
    swap(&version(1, &split_config(1, 1)));
    std::os::unix::fs::symlink("..data/ambassador.yaml", t.config_path()).unwrap();
    t.start_daemon();
    let weight = |st: &serde_json::Value| st["services"][0]["backends"][1]["weight"].clone();
    assert_eq!(weight(&t.status()), 1);

    swap(&version(2, &split_config(1, 7)));
    ambassador_tests::topology::wait_for(
        std::time::Duration::from_secs(10),
        "the ..data swap to be applied",
        || t.status()["generation"] == 2,
    );
    assert_eq!(weight(&t.status()), 7);

    // A broken config arriving the same way is rejected; generation 2 keeps serving.
    swap(&version(3, "services: [ { name: oops } ]\n"));
    ambassador_tests::topology::wait_for(
        std::time::Duration::from_secs(10),
        "the bad config to be rejected",
        || !t.status()["last_error"].is_null(),
    );
    let st = t.status();
    assert_eq!(st["generation"], 2);
    assert_eq!(weight(&st), 7);
    let vip: std::net::SocketAddr = format!("{VIP4}:80").parse().unwrap();
    let r = t.request_all(&t.clients4, vip);
    assert!(r.iter().all(|(_, r)| r.is_ok()), "{r:?}");
}
