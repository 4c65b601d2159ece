//! The userspace reading of a frame (`dataplane::packet`, the kernel's parse mirrored for
//! `simulate --pcap`): no panic on any bytes; what it reads as a flow has its headers inside
//! the frame; and when the independent etherparse crate reads the same frame as TCP or UDP,
//! both agree on addresses and ports. The verdict against a plan never panics either.
#![no_main]

use std::{net::IpAddr, path::Path, sync::OnceLock};

use ambassador::{
    config::Config,
    dataplane::{
        packet::{parse, verdict, Parsed},
        Plan,
    },
};
use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use libfuzzer_sys::fuzz_target;

fn plan() -> &'static Plan {
    static PLAN: OnceLock<Plan> = OnceLock::new();
    PLAN.get_or_init(|| {
        let cfg = Config::parse(
            Path::new("fuzz.yaml"),
            "services:
  - name: web4
    listen: 10.200.0.100:80/tcp
    split: { backends: [ { name: web, address: 10.200.2.2:8080, weight: 9 }, { name: exp, address: 10.200.3.2:8080 } ] }
  - name: dns6
    listen: '[fd00::100]:53/udp'
    split: { key: five-tuple, backends: [ { address: '[fd00:2::2]:5353' }, { address: '[fd00:3::2]:5353' } ] }
",
        )
        .expect("the fuzz config loads");
        Plan::build(&cfg)
    })
}

fuzz_target!(|frame: &[u8]| {
    let _ = verdict(plan(), frame);
    let Parsed::Flow { ip, sport, dport } = parse(frame) else {
        return;
    };
    assert!(ip.l3 < ip.l4 && ip.l4 + 8 <= frame.len() && ip.l3 + ip.len <= frame.len());
    let Ok(p) = SlicedPacket::from_ethernet(frame) else {
        return;
    };
    let addrs: (IpAddr, IpAddr) = match &p.net {
        Some(NetSlice::Ipv4(v4)) => (
            v4.header().source_addr().into(),
            v4.header().destination_addr().into(),
        ),
        Some(NetSlice::Ipv6(v6)) => (
            v6.header().source_addr().into(),
            v6.header().destination_addr().into(),
        ),
        _ => return,
    };
    let ports = match &p.transport {
        Some(TransportSlice::Tcp(t)) => (t.source_port(), t.destination_port()),
        Some(TransportSlice::Udp(u)) => (u.source_port(), u.destination_port()),
        _ => return,
    };
    assert_eq!(
        addrs,
        (ip.src, ip.dst),
        "addresses differ from etherparse's"
    );
    assert_eq!(ports, (sport, dport), "ports differ from etherparse's");
});
