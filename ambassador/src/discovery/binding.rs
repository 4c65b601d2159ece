//! The `binding` source: a Service Binding directory (servicebinding.io), as a platform
//! projects it into the pod: `$SERVICE_BINDING_ROOT/<name>/` with one file per entry.
//!
//! The endpoint comes from `host` (one name or address, or several separated by commas or
//! white space, each optionally `host:port`) and `port`, or else from `uri`
//! (`mysql://user:secret@db-1:3306/app`). A port missing from both comes from `broker.port`,
//! then from the service's listen port. Names are resolved through the DNS resolver. The
//! directory is read again every `refresh`; platforms update it by swapping a symlink, so a
//! read sees either the old entries or the new ones.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use hickory_resolver::TokioResolver;

use super::BrokerConfig;
use crate::config::BackendConfig;

/// Where the binding named `name` lives: an absolute path as is, else under
/// `$SERVICE_BINDING_ROOT`.
pub fn dir(name: &str) -> Result<PathBuf, String> {
    let p = Path::new(name);
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    match std::env::var_os("SERVICE_BINDING_ROOT") {
        Some(root) if !root.is_empty() => Ok(Path::new(&root).join(p)),
        _ => Err(format!(
            "binding {name:?}: SERVICE_BINDING_ROOT is not set; set it, or give the binding's absolute path"
        )),
    }
}

/// Read one entry; None when the file does not exist.
fn entry(dir: &Path, key: &str) -> Result<Option<String>, String> {
    match std::fs::read_to_string(dir.join(key)) {
        Ok(s) => Ok(Some(s.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", dir.join(key).display())),
    }
}

fn port(dir: &Path, s: &str, what: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!(
            "{}: {what} {s:?} is not a port (1-65535)",
            dir.display()
        )),
    }
}

/// Split `host` or `host:port` (IPv6 in brackets); the port is validated.
fn host_port<'a>(dir: &Path, s: &'a str) -> Result<(&'a str, Option<u16>), String> {
    if let Some(rest) = s.strip_prefix('[') {
        let (h, tail) = rest
            .split_once(']')
            .ok_or_else(|| format!("{}: host {s:?} has no closing ']'", dir.display()))?;
        return match tail.strip_prefix(':') {
            Some(p) => Ok((h, Some(port(dir, p, "port in host")?))),
            None if tail.is_empty() => Ok((h, None)),
            None => Err(format!("{}: host {s:?} is not host[:port]", dir.display())),
        };
    }
    match s.rsplit_once(':') {
        // More than one colon and no brackets: a bare IPv6 address.
        Some((h, _)) if h.contains(':') => Ok((s, None)),
        Some((h, p)) => Ok((h, Some(port(dir, p, "port in host")?))),
        None => Ok((s, None)),
    }
}

/// The (host, port) pairs a binding names.
pub fn read(dir: &Path, b: &BrokerConfig, listen_port: u16) -> Result<Vec<(String, u16)>, String> {
    if !dir.is_dir() {
        return Err(format!("{}: no such binding directory", dir.display()));
    }
    let default_port = match entry(dir, "port")? {
        Some(p) => port(dir, &p, "port")?,
        None => b.port.unwrap_or(listen_port),
    };
    let mut out = Vec::new();
    if let Some(hosts) = entry(dir, "host")? {
        for h in hosts.split(|c: char| c == ',' || c.is_whitespace()) {
            if h.is_empty() {
                continue;
            }
            let (host, p) = host_port(dir, h)?;
            out.push((host.to_string(), p.unwrap_or(default_port)));
        }
    } else if let Some(uri) = entry(dir, "uri")? {
        let u: hyper::Uri = uri
            .parse()
            .map_err(|e| format!("{}: uri is not a URI: {e}", dir.display()))?;
        let host = u
            .host()
            .ok_or_else(|| format!("{}: uri has no host", dir.display()))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        out.push((host.to_string(), u.port_u16().unwrap_or(default_port)));
    } else {
        return Err(format!("{}: has neither `host` nor `uri`", dir.display()));
    }
    if out.is_empty() {
        return Err(format!("{}: `host` is empty", dir.display()));
    }
    Ok(out)
}

/// The binding's endpoints, names resolved.
pub async fn resolve(
    r: &TokioResolver,
    b: &BrokerConfig,
    listen_port: u16,
) -> Result<Vec<BackendConfig>, String> {
    let dir = dir(&b.name)?;
    let mut out = Vec::new();
    for (host, port) in read(&dir, b, listen_port)? {
        let ips: Vec<IpAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => r
                .lookup_ip(super::fqdn(&host).as_str())
                .await
                .map_err(|e| format!("{}: host {host}: {e}", dir.display()))?
                .iter()
                .collect(),
        };
        out.extend(ips.into_iter().map(|ip| BackendConfig {
            name: None,
            address: SocketAddr::new(ip, port),
            weight: 1,
        }));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::Source;

    fn broker(port: Option<u16>) -> BrokerConfig {
        BrokerConfig {
            source: Source::Binding,
            name: "db".into(),
            port,
            port_name: None,
            refresh: std::time::Duration::from_secs(1),
        }
    }

    fn binding(files: &[(&str, &str)]) -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "amb-binding-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        for (k, v) in files {
            std::fs::write(d.join(k), format!("{v}\n")).unwrap();
        }
        d
    }

    #[test]
    fn host_and_port_entries() {
        let d = binding(&[("type", "mysql"), ("host", "10.0.0.5"), ("port", "3307")]);
        assert_eq!(
            read(&d, &broker(None), 3306).unwrap(),
            vec![("10.0.0.5".to_string(), 3307)]
        );
        // Several hosts, one with its own port; IPv6 bare and in brackets.
        let d = binding(&[("host", "10.0.0.5, 10.0.0.6:4000 fd00::1 [fd00::2]:5000")]);
        assert_eq!(
            read(&d, &broker(Some(3300)), 3306).unwrap(),
            vec![
                ("10.0.0.5".to_string(), 3300),
                ("10.0.0.6".to_string(), 4000),
                ("fd00::1".to_string(), 3300),
                ("fd00::2".to_string(), 5000),
            ]
        );
    }

    #[test]
    fn uri_entry() {
        let d = binding(&[("uri", "mysql://app:secret@db-1.internal:3309/app")]);
        assert_eq!(
            read(&d, &broker(None), 3306).unwrap(),
            vec![("db-1.internal".to_string(), 3309)]
        );
        let d = binding(&[("uri", "mysql://[fd00::7]/app")]);
        assert_eq!(
            read(&d, &broker(None), 3306).unwrap(),
            vec![("fd00::7".to_string(), 3306)]
        );
    }

    #[test]
    fn bad_bindings_name_the_file_and_the_reason() {
        for (files, want) in [
            (
                vec![("host", "10.0.0.5"), ("port", "http")],
                "port \"http\" is not a port",
            ),
            (
                vec![("host", "10.0.0.5"), ("port", "70000")],
                "is not a port",
            ),
            (vec![("host", "10.0.0.5:0")], "port in host \"0\""),
            (vec![("type", "mysql")], "neither `host` nor `uri`"),
            (vec![("host", " ")], "`host` is empty"),
            (vec![("uri", "no host here")], "uri"),
        ] {
            let d = binding(&files);
            let e = read(&d, &broker(None), 3306).unwrap_err();
            assert!(e.contains(&d.display().to_string()), "{e}");
            assert!(e.contains(want), "{files:?}: {e}");
        }
        let e = read(Path::new("/nonexistent/binding"), &broker(None), 1).unwrap_err();
        assert!(e.contains("no such binding directory"), "{e}");
    }
}
