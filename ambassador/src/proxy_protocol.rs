//! PROXY protocol v1 and v2 headers (haproxy's spec), so a backend behind the TLS sidecar or
//! the userspace data plane learns the real client address.

use std::net::SocketAddr;

use crate::config::ProxyProtocol;

const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The header for a TCP connection from `client` to `local` (the address it reached).
pub fn header(version: ProxyProtocol, client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    // Mixed families (an IPv4 client on a dual-stack socket) are reported as IPv6.
    let (client, local) = match (client, local) {
        (SocketAddr::V4(c), SocketAddr::V6(l)) => (
            SocketAddr::new(c.ip().to_ipv6_mapped().into(), c.port()),
            SocketAddr::V6(l),
        ),
        (SocketAddr::V6(c), SocketAddr::V4(l)) => (
            SocketAddr::V6(c),
            SocketAddr::new(l.ip().to_ipv6_mapped().into(), l.port()),
        ),
        pair => pair,
    };
    match version {
        ProxyProtocol::V1 => {
            let fam = if client.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {fam} {} {} {} {}\r\n",
                client.ip(),
                local.ip(),
                client.port(),
                local.port()
            )
            .into_bytes()
        }
        ProxyProtocol::V2 => {
            let mut h = V2_SIGNATURE.to_vec();
            h.push(0x21); // version 2, command PROXY
            match (client, local) {
                (SocketAddr::V4(c), SocketAddr::V4(l)) => {
                    h.push(0x11); // AF_INET, STREAM
                    h.extend_from_slice(&12u16.to_be_bytes());
                    h.extend_from_slice(&c.ip().octets());
                    h.extend_from_slice(&l.ip().octets());
                }
                (SocketAddr::V6(c), SocketAddr::V6(l)) => {
                    h.push(0x21); // AF_INET6, STREAM
                    h.extend_from_slice(&36u16.to_be_bytes());
                    h.extend_from_slice(&c.ip().octets());
                    h.extend_from_slice(&l.ip().octets());
                }
                _ => unreachable!("families were unified above"),
            }
            h.extend_from_slice(&client.port().to_be_bytes());
            h.extend_from_slice(&local.port().to_be_bytes());
            h
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_is_the_text_line_of_the_spec() {
        let h = header(
            ProxyProtocol::V1,
            "192.0.2.7:40000".parse().unwrap(),
            "10.200.0.100:443".parse().unwrap(),
        );
        assert_eq!(h, b"PROXY TCP4 192.0.2.7 10.200.0.100 40000 443\r\n");
        let h = header(
            ProxyProtocol::V1,
            "[fd00:1::7]:40000".parse().unwrap(),
            "[fd00::100]:443".parse().unwrap(),
        );
        assert_eq!(h, b"PROXY TCP6 fd00:1::7 fd00::100 40000 443\r\n");
    }

    #[test]
    fn v2_ipv4_is_byte_exact() {
        let h = header(
            ProxyProtocol::V2,
            "192.0.2.7:40000".parse().unwrap(),
            "10.200.0.100:443".parse().unwrap(),
        );
        let want: Vec<u8> = [
            &b"\r\n\r\n\0\r\nQUIT\n"[..],
            &[0x21, 0x11, 0, 12],
            &[192, 0, 2, 7],
            &[10, 200, 0, 100],
            &40000u16.to_be_bytes(),
            &443u16.to_be_bytes(),
        ]
        .concat();
        assert_eq!(h, want);
        assert_eq!(h.len(), 16 + 12);
    }

    #[test]
    fn v2_ipv6_and_mixed_families() {
        let h = header(
            ProxyProtocol::V2,
            "192.0.2.7:1".parse().unwrap(),
            "[fd00::100]:443".parse().unwrap(),
        );
        assert_eq!(&h[12..16], &[0x21, 0x21, 0, 36]);
        // The IPv4 client appears IPv4-mapped.
        assert_eq!(
            &h[16..32],
            &"::ffff:192.0.2.7"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
        assert_eq!(h.len(), 16 + 36);
    }
}
