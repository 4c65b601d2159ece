//! The namespace packet tests and `bench xdp` run the XDP program in: routes and permanent
//! neighbour entries, so `bpf_fib_lookup` succeeds and rewritten MACs are known.
//!
//! `BPF_PROG_TEST_RUN` without a context runs the program as if received on this namespace's
//! loopback; service traffic is routed out of `be0` (backends) and replies out of `cl0`.

use crate::netns::Netns;

pub const LB_BACKEND_MAC: [u8; 6] = [2, 0, 0, 0, 0xbe, 0];
pub const LB_CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0xc1, 0];
pub const WEB_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
pub const EXPERIMENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 3];
pub const GATEWAY_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0xfe];

pub fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Backends 10.200.2.2 / fd00:2::2 (`WEB_MAC`) and 10.200.3.2 / fd00:3::2 (`EXPERIMENT_MAC`)
/// behind `be0`; clients behind `cl0` through the gateway 192.0.2.254 / fd00:1::fe.
pub fn forwarding_netns() -> Netns {
    let ns = Netns::new("pkt");
    // be0: toward the backends; cl0: toward the clients (default route).
    ns.ip("link add be0 type veth peer name be1");
    ns.ip("link add cl0 type veth peer name cl1");
    ns.ip(&format!("link set be0 address {}", mac(LB_BACKEND_MAC)));
    ns.ip(&format!("link set cl0 address {}", mac(LB_CLIENT_MAC)));
    for l in ["be0", "be1", "cl0", "cl1"] {
        ns.ip(&format!("link set {l} up"));
    }
    for a in [
        "10.200.2.1/24",
        "10.200.3.1/24",
        "fd00:2::1/64 nodad",
        "fd00:3::1/64 nodad",
    ] {
        ns.ip(&format!("addr add {a} dev be0"));
    }
    for a in ["192.0.2.1/24", "fd00:1::1/64 nodad"] {
        ns.ip(&format!("addr add {a} dev cl0"));
    }
    for (ip, m) in [
        ("10.200.2.2", WEB_MAC),
        ("10.200.3.2", EXPERIMENT_MAC),
        ("fd00:2::2", WEB_MAC),
        ("fd00:3::2", EXPERIMENT_MAC),
    ] {
        ns.ip(&format!(
            "neigh replace {ip} lladdr {} dev be0 nud permanent",
            mac(m)
        ));
    }
    ns.ip(&format!(
        "neigh replace 192.0.2.254 lladdr {} dev cl0 nud permanent",
        mac(GATEWAY_MAC)
    ));
    ns.ip(&format!(
        "neigh replace fd00:1::fe lladdr {} dev cl0 nud permanent",
        mac(GATEWAY_MAC)
    ));
    ns.ip("route add default via 192.0.2.254 dev cl0");
    ns.ip("-6 route add default via fd00:1::fe dev cl0");
    ns.sh("sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1");

    ns
}

/// Let the XDP program redirect to the fixture's two interfaces (`XDP_EGRESS`), as if XDP ran
/// on both; call it inside the fixture's namespace.
pub fn allow_fixture_egress(dp: &mut ambassador::dataplane::kernel::KernelDataplane) {
    for dev in ["be0", "cl0"] {
        dp.allow_xdp_egress(dev).expect("XDP_EGRESS");
    }
}
