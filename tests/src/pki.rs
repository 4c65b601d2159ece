//! A throw-away PKI for the TLS tests: a CA, an ECDSA server pair for `a.example`, an RSA pair
//! for `b.example` and `*.wild.example`, client certificates with SPIFFE URIs, and a client
//! certificate from a CA the server does not trust. RSA keys come from `openssl` (rcgen signs
//! with them but does not generate them).

use std::{
    io::Write as _,
    net::{IpAddr, SocketAddr, TcpStream},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, ServerName},
    ClientConfig, RootCertStore,
};

use crate::local::TempDir;

pub struct Pki {
    pub dir: TempDir,
}

struct Ca {
    params: CertificateParams,
    key: KeyPair,
}

fn new_ca(name: &str) -> (Ca, String) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().unwrap();
    let pem = params.clone().self_signed(&key).unwrap().pem();
    (Ca { params, key }, pem)
}

fn leaf(ca: &Ca, sans: Vec<SanType>, key: KeyPair) -> (String, String) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = sans;
    params
        .distinguished_name
        .push(DnType::CommonName, "ambassador test");
    let issuer = ca.params.clone().self_signed(&ca.key).unwrap();
    let cert = params.signed_by(&key, &issuer, &ca.key).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn dns(n: &str) -> SanType {
    SanType::DnsName(n.try_into().unwrap())
}

fn uri(u: &str) -> SanType {
    SanType::URI(u.try_into().unwrap())
}

impl Pki {
    pub fn new() -> Pki {
        let dir = TempDir::new("pki");
        let (ca, ca_pem) = new_ca("ambassador test CA");
        std::fs::write(dir.path("ca.crt"), &ca_pem).unwrap();
        let w = |name: &str, (cert, key): (String, String)| {
            std::fs::write(dir.path(&format!("{name}.crt")), cert).unwrap();
            std::fs::write(dir.path(&format!("{name}.key")), key).unwrap();
        };
        w(
            "a",
            leaf(&ca, vec![dns("a.example")], KeyPair::generate().unwrap()),
        );
        let rsa = crate::netns::sh(
            "openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 2>/dev/null",
        );
        let rsa = KeyPair::from_pem_and_sign_algo(&rsa, &rcgen::PKCS_RSA_SHA256).unwrap();
        w(
            "b",
            leaf(&ca, vec![dns("b.example"), dns("*.wild.example")], rsa),
        );
        w(
            "a2",
            leaf(&ca, vec![dns("a.example")], KeyPair::generate().unwrap()),
        );
        w(
            "client-web",
            leaf(
                &ca,
                vec![uri("spiffe://prod/web")],
                KeyPair::generate().unwrap(),
            ),
        );
        w(
            "client-other",
            leaf(
                &ca,
                vec![uri("spiffe://prod/other")],
                KeyPair::generate().unwrap(),
            ),
        );
        let (rogue, _) = new_ca("rogue CA");
        w(
            "client-rogue",
            leaf(
                &rogue,
                vec![uri("spiffe://prod/web")],
                KeyPair::generate().unwrap(),
            ),
        );
        Pki { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path(name)
    }

    pub fn cert_der(&self, name: &str) -> CertificateDer<'static> {
        let pem = std::fs::read(self.path(&format!("{name}.crt"))).unwrap();
        let cert = rustls_pemfile::certs(&mut &pem[..])
            .next()
            .unwrap()
            .unwrap();
        cert.into_owned()
    }

    /// A client trusting our CA, optionally presenting `client` (a name above), TLS 1.2/1.3.
    pub fn client(&self, client: Option<&str>, tls12_only: bool) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.cert_der("ca")).unwrap();
        let versions: &[&rustls::SupportedProtocolVersion] = if tls12_only {
            &[&rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        };
        let b =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(versions)
                .unwrap()
                .with_root_certificates(roots);
        Arc::new(match client {
            None => b.with_no_client_auth(),
            Some(c) => {
                let key = std::fs::read(self.path(&format!("{c}.key"))).unwrap();
                let key: PrivateKeyDer =
                    rustls_pemfile::private_key(&mut &key[..]).unwrap().unwrap();
                b.with_client_auth_cert(vec![self.cert_der(c)], key)
                    .unwrap()
            }
        })
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

/// What an HTTPS request saw.
pub struct Https {
    /// The client's end of the connection.
    pub local: SocketAddr,
    pub body: String,
    pub server_cert: CertificateDer<'static>,
    pub version: rustls::ProtocolVersion,
}

/// GET / over TLS to `addr` with SNI `sni`, from `src` if given.
pub fn https_get(
    addr: SocketAddr,
    sni: &str,
    config: Arc<ClientConfig>,
    src: Option<IpAddr>,
) -> std::io::Result<Https> {
    let tcp = match src {
        None => TcpStream::connect_timeout(&addr, Duration::from_secs(3))?,
        Some(src) => {
            use socket2::{Domain, Socket, Type};
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
            s.bind(&SocketAddr::new(src, 0).into())?;
            s.connect_timeout(&addr.into(), Duration::from_secs(3))?;
            s.into()
        }
    };
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    let local = tcp.local_addr()?;
    let name = ServerName::try_from(sni.to_string()).map_err(std::io::Error::other)?;
    let conn = rustls::ClientConnection::new(config, name).map_err(std::io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(b"GET / HTTP/1.1\r\nHost: ambassador\r\nConnection: close\r\n\r\n")?;
    let resp = crate::topology::read_response(&mut tls, &mut Vec::new())?;
    let (head, body) = String::from_utf8_lossy(&resp)
        .split_once("\r\n\r\n")
        .map(|(h, b)| (h.to_string(), b.trim().to_string()))
        .unwrap_or_default();
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("bad status: {head}")));
    }
    let c = &tls.conn;
    Ok(Https {
        local,
        body,
        server_cert: c.peer_certificates().unwrap()[0].clone().into_owned(),
        version: c.protocol_version().unwrap(),
    })
}
