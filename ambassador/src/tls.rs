//! The TLS sidecar: terminates TLS for a service (rustls), picks the certificate by SNI,
//! optionally requires client certificates (mTLS) with a SAN allow-list, and reloads its
//! certificates from disk without touching open connections. What it forwards, and to which
//! backend, is the userspace data plane's business (`dataplane::userspace`).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{anyhow, bail, Context as _, Result};
use arc_swap::ArcSwap;
use rustls::{
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer},
    server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache, WebPkiClientVerifier},
    sign::CertifiedKey,
    RootCertStore, ServerConfig,
};
use tokio::net::TcpStream;
use tokio_rustls::{server::TlsStream, TlsAcceptor};

use crate::config::{ProxyProtocol, TlsConfig};

/// Resumption state kept per service: enough for a busy node, bounded.
const SESSION_CACHE: usize = 20_000;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A service's TLS termination.
pub struct Sidecar {
    source: TlsConfig,
    config: ArcSwap<ServerConfig>,
    /// The bytes the live config was built from, so a reload that changes nothing does nothing.
    loaded: ArcSwap<Vec<Vec<u8>>>,
    pub proxy_protocol: Option<ProxyProtocol>,
}

impl Sidecar {
    /// Read the certificates, keys and CA named by `cfg`; every error names the file.
    pub fn load(cfg: &TlsConfig) -> Result<Sidecar> {
        let (config, bytes) = build(cfg)?;
        Ok(Sidecar {
            source: cfg.clone(),
            config: ArcSwap::from_pointee(config),
            loaded: ArcSwap::from_pointee(bytes),
            proxy_protocol: cfg.proxy_protocol,
        })
    }

    /// Files whose change should trigger [`Sidecar::reload`].
    pub fn files(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self
            .source
            .certificates
            .iter()
            .flat_map(|p| [p.cert.clone(), p.key.clone()])
            .collect();
        v.extend(self.source.client_ca.clone());
        v
    }

    /// Re-read the files. New handshakes use the new pairs; open connections are untouched.
    /// On error the old pairs keep serving. Returns whether anything changed.
    pub fn reload(&self) -> Result<bool> {
        let bytes = read_all(&self.source)?;
        if *self.loaded.load_full() == bytes {
            return Ok(false);
        }
        let (config, bytes) = build(&self.source)?;
        self.config.store(Arc::new(config));
        self.loaded.store(Arc::new(bytes));
        Ok(true)
    }

    pub async fn accept(&self, stream: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        TlsAcceptor::from(self.config.load_full())
            .accept(stream)
            .await
    }

    /// With an allow-list: the client certificate must carry one of the allowed SANs.
    pub fn check_client(&self, tls: &TlsStream<TcpStream>) -> Result<(), String> {
        if self.source.allow_sans.is_empty() {
            return Ok(());
        }
        let Some(cert) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()) else {
            return Err("no client certificate".into());
        };
        let sans = sans(cert).map_err(|e| format!("unreadable client certificate: {e}"))?;
        if sans.iter().any(|s| self.source.allow_sans.contains(s)) {
            Ok(())
        } else {
            Err(format!(
                "client certificate SANs {sans:?} are not in allow_sans"
            ))
        }
    }
}

/// The raw bytes of every file, in a fixed order.
fn read_all(cfg: &TlsConfig) -> Result<Vec<Vec<u8>>> {
    let mut paths: Vec<&Path> = Vec::new();
    for p in &cfg.certificates {
        paths.push(&p.cert);
        paths.push(&p.key);
    }
    if let Some(ca) = &cfg.client_ca {
        paths.push(ca);
    }
    paths
        .into_iter()
        .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
        .collect()
}

fn build(cfg: &TlsConfig) -> Result<(ServerConfig, Vec<Vec<u8>>)> {
    let bytes = read_all(cfg)?;
    let provider = provider();
    let mut resolver = SniResolver::default();
    for (i, pair) in cfg.certificates.iter().enumerate() {
        let chain = certs(&bytes[2 * i], &pair.cert)?;
        let key = key(&bytes[2 * i + 1], &pair.key)?;
        let ck = CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
            anyhow!(
                "{} and {} do not form a usable pair: {e}",
                pair.cert.display(),
                pair.key.display()
            )
        })?;
        resolver.add(Arc::new(ck), &pair.cert)?;
    }
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS versions")?;
    let builder = match &cfg.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in certs(bytes.last().expect("CA read last"), ca)? {
                roots
                    .add(c)
                    .with_context(|| format!("{}: not a usable CA certificate", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .with_context(|| format!("client CA {}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(resolver));
    config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE);
    config.ticketer = rustls::crypto::ring::Ticketer::new().context("TLS session tickets")?;
    Ok((config, bytes))
}

fn certs(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<_, _>>()
        .with_context(|| format!("{}: unreadable PEM", path.display()))?;
    if certs.is_empty() {
        bail!(
            "{}: no certificate in it (expected PEM `BEGIN CERTIFICATE`)",
            path.display()
        );
    }
    Ok(certs)
}

fn key(pem: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>> {
    rustls_pemfile::private_key(&mut &pem[..])
        .with_context(|| format!("{}: unreadable PEM", path.display()))?
        .ok_or_else(|| {
            anyhow!(
                "{}: no private key in it (PKCS#8, PKCS#1 or SEC1 PEM)",
                path.display()
            )
        })
}

/// Subject alternative names (DNS and URI) of a certificate.
fn sans(cert: &CertificateDer<'_>) -> Result<Vec<String>> {
    use x509_parser::prelude::*;
    let (_, c) = X509Certificate::from_der(cert.as_ref()).map_err(|e| anyhow!("{e}"))?;
    let mut out = Vec::new();
    if let Ok(Some(ext)) = c.subject_alternative_name() {
        for n in &ext.value.general_names {
            match n {
                GeneralName::DNSName(d) => out.push(d.to_string()),
                GeneralName::URI(u) => out.push(u.to_string()),
                _ => {}
            }
        }
    }
    Ok(out)
}

/// SNI: exact names, then `*.suffix` wildcards, then the first pair.
#[derive(Debug, Default)]
struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

impl SniResolver {
    fn add(&mut self, ck: Arc<CertifiedKey>, path: &Path) -> Result<()> {
        let names = sans(&ck.cert[0]).with_context(|| format!("{}", path.display()))?;
        for n in names.into_iter().filter(|n| !n.contains(':')) {
            let n = n.to_ascii_lowercase();
            match n.strip_prefix("*.") {
                Some(suffix) => self
                    .wildcard
                    .entry(suffix.to_string())
                    .or_insert(ck.clone()),
                None => self.exact.entry(n).or_insert(ck.clone()),
            };
        }
        self.default.get_or_insert(ck);
        Ok(())
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = hello.server_name() {
            let name = name.to_ascii_lowercase();
            if let Some(ck) = self.exact.get(&name) {
                return Some(ck.clone());
            }
            if let Some((_, suffix)) = name.split_once('.') {
                if let Some(ck) = self.wildcard.get(suffix) {
                    return Some(ck.clone());
                }
            }
        }
        self.default.clone()
    }
}
