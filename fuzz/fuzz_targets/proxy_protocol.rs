//! PROXY protocol headers we write for any pair of addresses (v1 and v2, mixed families) are
//! read back by an independent parser (`ppp`) to the same addresses, with nothing left over.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ambassador::{config::ProxyProtocol, proxy_protocol::header};
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use ppp::{v1, v2, HeaderResult};

#[derive(Arbitrary, Debug)]
struct Input {
    v2: bool,
    client: (bool, [u8; 16], u16),
    local: (bool, [u8; 16], u16),
}

fn addr((v4, b, port): (bool, [u8; 16], u16)) -> SocketAddr {
    let ip = if v4 {
        IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(b))
    };
    SocketAddr::new(ip, port)
}

/// How a header reports `a` given both families: IPv4 when both are, IPv6 (mapped) otherwise.
fn as_reported(a: SocketAddr, both_v4: bool) -> SocketAddr {
    match a {
        SocketAddr::V4(v) if !both_v4 => SocketAddr::new(v.ip().to_ipv6_mapped().into(), v.port()),
        a => a,
    }
}

fuzz_target!(|input: Input| {
    let (client, local) = (addr(input.client), addr(input.local));
    let both_v4 = client.is_ipv4() && local.is_ipv4();
    let want = (as_reported(client, both_v4), as_reported(local, both_v4));
    let version = if input.v2 {
        ProxyProtocol::V2
    } else {
        ProxyProtocol::V1
    };
    let h = header(version, client, local);
    let got = match HeaderResult::parse(&h) {
        HeaderResult::V1(Ok(p)) => {
            assert!(!input.v2);
            assert_eq!(p.header.len(), h.len(), "bytes left over");
            match p.addresses {
                v1::Addresses::Tcp4(a) => (
                    SocketAddr::new(a.source_address.into(), a.source_port),
                    SocketAddr::new(a.destination_address.into(), a.destination_port),
                ),
                v1::Addresses::Tcp6(a) => (
                    SocketAddr::new(a.source_address.into(), a.source_port),
                    SocketAddr::new(a.destination_address.into(), a.destination_port),
                ),
                other => panic!(
                    "v1 header read as {other:?}: {:?}",
                    String::from_utf8_lossy(&h)
                ),
            }
        }
        HeaderResult::V2(Ok(p)) => {
            assert!(input.v2);
            assert_eq!(p.len(), h.len(), "bytes left over");
            assert_eq!(p.command, v2::Command::Proxy);
            match p.addresses {
                v2::Addresses::IPv4(a) => (
                    SocketAddr::new(a.source_address.into(), a.source_port),
                    SocketAddr::new(a.destination_address.into(), a.destination_port),
                ),
                v2::Addresses::IPv6(a) => (
                    SocketAddr::new(a.source_address.into(), a.source_port),
                    SocketAddr::new(a.destination_address.into(), a.destination_port),
                ),
                other => panic!("v2 header read as {other:?}: {h:02x?}"),
            }
        }
        other => panic!("header not read back: {other:?} from {h:02x?}"),
    };
    assert_eq!(got, want, "{h:02x?}");
});
