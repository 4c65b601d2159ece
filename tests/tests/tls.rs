//! The TLS sidecar with real clients (rustls and `openssl s_client`) on loopback, and HTTPS
//! through the XDP ambassador's pass-to-stack path in the netns topology.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use ambassador::{config::ProxyProtocol, proxy_protocol};
use ambassador_tests::{
    local::{free_port, write, HttpBackend, LocalDaemon},
    pki::{https_get, Pki},
    topology::{share, split_config, Topology},
};

fn config(pki: &Pki, port: u16, backend: SocketAddr, tls_extra: &str) -> String {
    format!(
        "services:
  - name: legacy
    listen: 127.0.0.1:{port}/tcp
    tls:
      certificates:
        - {{ cert: {a}, key: {ak} }}
        - {{ cert: {b}, key: {bk} }}
{tls_extra}
    limits: {{ handshake_timeout: 1s }}
    split: {{ key: src-ip, backends: [ {{ name: legacy, address: '{backend}' }} ] }}
",
        a = pki.path("a.crt").display(),
        ak = pki.path("a.key").display(),
        b = pki.path("b.crt").display(),
        bk = pki.path("b.key").display(),
    )
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[test]
fn sni_picks_the_certificate_over_tls_1_3_and_1_2_with_ecdsa_and_rsa() {
    let pki = Pki::new();
    let backend = HttpBackend::start("legacy");
    let port = free_port();
    let _d = LocalDaemon::start(&config(&pki, port, backend.addr, ""));
    for (sni, cert) in [
        ("a.example", "a"),
        ("b.example", "b"),
        ("x.wild.example", "b"),
    ] {
        for tls12 in [false, true] {
            let r = https_get(addr(port), sni, pki.client(None, tls12), None).unwrap();
            assert_eq!(r.server_cert, pki.cert_der(cert), "SNI {sni}");
            assert_eq!(r.body.split(' ').next(), Some("legacy"));
            let want = if tls12 {
                rustls::ProtocolVersion::TLSv1_2
            } else {
                rustls::ProtocolVersion::TLSv1_3
            };
            assert_eq!(r.version, want);
        }
    }
}

#[test]
fn openssl_s_client_interoperates_and_resumes_sessions() {
    let pki = Pki::new();
    let backend = HttpBackend::start("legacy");
    let port = free_port();
    let _d = LocalDaemon::start(&config(&pki, port, backend.addr, ""));
    let sess = pki.path("session.pem");
    let s_client = |extra: &str| {
        ambassador_tests::netns::sh(&format!(
            "openssl s_client -connect 127.0.0.1:{port} -servername a.example -CAfile {} -tls1_2 {extra} </dev/null 2>&1",
            pki.path("ca.crt").display()
        ))
    };
    let first = s_client(&format!("-sess_out {}", sess.display()));
    assert!(first.contains("Verify return code: 0 (ok)"), "{first}");
    assert!(first.contains("New, TLSv1.2"), "{first}");
    let again = s_client(&format!("-sess_in {}", sess.display()));
    assert!(
        again.contains("Reused, TLSv1.2"),
        "session not resumed:\n{again}"
    );
    let v13 = ambassador_tests::netns::sh(&format!(
        "openssl s_client -connect 127.0.0.1:{port} -servername b.example -CAfile {} -tls1_3 </dev/null 2>&1",
        pki.path("ca.crt").display()
    ));
    assert!(
        v13.contains("TLSv1.3") && v13.contains("Verify return code: 0 (ok)"),
        "{v13}"
    );
}

#[test]
fn mtls_accepts_the_allowed_client_and_refuses_the_others() {
    let pki = Pki::new();
    let backend = HttpBackend::start("legacy");
    let port = free_port();
    let extra = format!(
        "      client_ca: {}\n      allow_sans: [spiffe://prod/web]",
        pki.path("ca.crt").display()
    );
    let d = LocalDaemon::start(&config(&pki, port, backend.addr, &extra));
    let ok = https_get(
        addr(port),
        "a.example",
        pki.client(Some("client-web"), false),
        None,
    )
    .unwrap();
    assert!(ok.body.starts_with("legacy"));
    for (who, why) in [
        (Some("client-other"), "not in allow_sans"),
        (Some("client-rogue"), "TLS handshake failed"),
        (None, "TLS handshake failed"),
    ] {
        let r = https_get(addr(port), "a.example", pki.client(who, false), None);
        assert!(r.is_err(), "{who:?} was let in");
        d.wait_log(why);
    }
    assert_eq!(
        backend.seen.lock().unwrap().len(),
        1,
        "a refused client reached the backend"
    );
}

#[test]
fn proxy_protocol_v2_header_is_byte_exact() {
    let pki = Pki::new();
    let backend = HttpBackend::start("legacy");
    let port = free_port();
    let _d = LocalDaemon::start(&config(
        &pki,
        port,
        backend.addr,
        "      proxy_protocol: v2",
    ));
    let r = https_get(addr(port), "a.example", pki.client(None, false), None).unwrap();
    let seen = backend.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].preamble,
        proxy_protocol::header(ProxyProtocol::V2, r.local, addr(port))
    );
    assert_eq!(r.body, "legacy 127.0.0.1");
}

#[test]
fn garbage_truncated_and_silent_clients_close_only_their_own_connection() {
    let pki = Pki::new();
    let backend = HttpBackend::start("legacy");
    let port = free_port();
    let d = LocalDaemon::start(&config(&pki, port, backend.addr, ""));
    let open = |bytes: &[u8]| {
        let mut s = TcpStream::connect(addr(port)).unwrap();
        s.write_all(bytes).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(4))).unwrap();
        s
    };
    // A real ClientHello's first bytes, then nothing; plain garbage; nothing at all.
    let truncated = open(&[
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ]);
    let garbage = open(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    let silent = open(b"");
    let t0 = Instant::now();
    // Others are served meanwhile.
    for _ in 0..5 {
        let r = https_get(addr(port), "a.example", pki.client(None, false), None).unwrap();
        assert!(r.body.starts_with("legacy"));
    }
    for (name, mut s) in [
        ("truncated", truncated),
        ("garbage", garbage),
        ("silent", silent),
    ] {
        let mut buf = [0u8; 256];
        // Closed (EOF or reset), possibly after a TLS alert: never left hanging.
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "{name} connection was held open"
        );
    }
    d.wait_log("TLS handshake failed");
    d.wait_log("TLS handshake not finished within 1s");
}

#[test]
fn certificate_reload_rejects_a_broken_key_and_takes_a_good_pair() {
    let pki = Pki::new();
    let backend = HttpBackend::start("legacy");
    let port = free_port();
    let d = LocalDaemon::start(&config(&pki, port, backend.addr, ""));
    let get = || https_get(addr(port), "a.example", pki.client(None, false), None).unwrap();
    assert_eq!(get().server_cert, pki.cert_der("a"));
    // An open connection made before any reload.
    let mut held = {
        let tcp = TcpStream::connect(addr(port)).unwrap();
        let conn =
            rustls::ClientConnection::new(pki.client(None, false), "a.example".try_into().unwrap())
                .unwrap();
        rustls::StreamOwned::new(conn, tcp)
    };
    let keepalive_get = |s: &mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>| {
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    assert!(keepalive_get(&mut held).contains("200 OK"));

    // Junk replaces the key: rejected, the old pair keeps serving.
    write(
        &pki.path("a.key"),
        "-----BEGIN PRIVATE KEY-----\njunk\n-----END PRIVATE KEY-----\n",
    );
    d.wait_log("certificate reload rejected, keeping the previous certificates");
    assert_eq!(get().server_cert, pki.cert_der("a"));

    // A good new pair: new handshakes use it; the open connection is untouched.
    std::fs::copy(pki.path("a2.key"), pki.path("a.key.new")).unwrap();
    std::fs::copy(pki.path("a2.crt"), pki.path("a.crt.new")).unwrap();
    std::fs::rename(pki.path("a.crt.new"), pki.path("a.crt")).unwrap();
    std::fs::rename(pki.path("a.key.new"), pki.path("a.key")).unwrap();
    d.wait_log("certificates reloaded");
    ambassador_tests::topology::wait_for(Duration::from_secs(5), "the new certificate", || {
        get().server_cert == pki.cert_der("a2")
    });
    assert!(
        keepalive_get(&mut held).contains("200 OK"),
        "open connection broken by reload"
    );
}

#[test]
fn http_redirects_to_https_with_hsts() {
    let pki = Pki::new();
    let backend = HttpBackend::start("legacy");
    let (port, http) = (free_port(), free_port());
    let _d = LocalDaemon::start(&config(
        &pki,
        port,
        backend.addr,
        &format!("      redirect_http: {http}"),
    ));
    let mut s = TcpStream::connect(addr(http)).unwrap();
    s.write_all(b"GET /path?q=1 HTTP/1.1\r\nHost: example.org:8080\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 301"), "{resp}");
    assert!(
        resp.contains(&format!(
            "Location: https://example.org:{port}/path?q=1\r\n"
        )),
        "{resp}"
    );
    assert!(
        resp.contains("Strict-Transport-Security: max-age="),
        "{resp}"
    );
}

/// The netns topology with the TLS service beside the XDP one: TLS packets go to the stack,
/// plain ones stay in the kernel, and the split is the same.
#[test]
fn https_through_the_xdp_ambassador_splits_90_10_sticks_and_backends_see_clients_via_proxy_v2() {
    let pki = Pki::new();
    let mut t = Topology::new(200);
    t.start_nginx(1);
    let cfg = format!(
        "{}  - name: legacy
    listen: 10.200.0.100:443/tcp
    tls:
      certificates: [ {{ cert: {}, key: {} }} ]
      proxy_protocol: v2
    split:
      key: src-ip
      backends:
        - {{ name: web,        address: 10.200.2.2:8080, weight: 9 }}
        - {{ name: experiment, address: 10.200.3.2:8080, weight: 1 }}
",
        split_config(9, 1),
        pki.path("a.crt").display(),
        pki.path("a.key").display()
    );
    t.write_config(&cfg);
    t.start_daemon();
    assert_eq!(t.status()["dataplane"], "kernel");
    let vip: SocketAddr = "10.200.0.100:443".parse().unwrap();
    let client = pki.client(None, false);
    let rounds: Vec<Vec<(std::net::IpAddr, Result<String, String>)>> = (0..2)
        .map(|_| {
            let _in = t.client.enter();
            t.clients4
                .iter()
                .map(|&c| {
                    (
                        c,
                        https_get(vip, "a.example", client.clone(), Some(c))
                            .map(|r| r.body)
                            .map_err(|e| e.to_string()),
                    )
                })
                .collect()
        })
        .collect();
    let mut first = std::collections::HashMap::new();
    for round in &rounds {
        for (c, r) in round {
            let body = r
                .as_ref()
                .unwrap_or_else(|e| panic!("HTTPS from {c}: {e}\n{}", t.daemon_log()));
            let (backend, seen) = body.split_once(' ').unwrap();
            assert_eq!(
                seen,
                c.to_string(),
                "backend did not learn the client address"
            );
            assert_eq!(
                first.entry(*c).or_insert(backend.to_string()),
                backend,
                "{c} flipped"
            );
        }
    }
    let web = share(&rounds[0], "web");
    assert!((0.85..=0.95).contains(&web), "web got {:.1}%", web * 100.0);
    // Plain HTTP on port 80 of the same address still takes the kernel path.
    let plain = t.request_all(&t.clients4[..20], "10.200.0.100:80".parse().unwrap());
    assert!(plain.iter().all(|(_, r)| r.is_ok()));
    let st = t.status();
    let kernel: std::collections::HashMap<String, u64> =
        serde_json::from_value(serde_json::Value::Object(
            st["kernel"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (p[0].as_str().unwrap().to_string(), p[1].clone()))
                .collect(),
        ))
        .unwrap();
    assert!(
        kernel["pass_to_stack"] >= 400,
        "TLS packets were not passed to the stack: {st:#}"
    );
    assert_eq!(
        kernel["new_flow"], 20,
        "plain flows did not take the kernel path: {st:#}"
    );
}
