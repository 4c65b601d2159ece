//! Packets built with etherparse, so expected bytes and checksums come from code independent of
//! the XDP program.

use std::net::{IpAddr, SocketAddr};

use etherparse::{
    IpHeaders, IpNumber, Ipv4Header, Ipv4Options, Ipv6Header, PacketBuilder, SingleVlanHeader,
    VlanHeader, VlanId,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp,
    Udp,
}

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

/// A TCP or UDP packet in an Ethernet frame.
#[derive(Clone, Debug)]
pub struct Spec {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub vlan: Option<u16>,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub l4: L4,
    /// TCP flags ([`SYN`], [`ACK`] | [`PSH`] for data...); ignored for UDP.
    pub tcp_flags: u8,
    pub ttl: u8,
    /// IPv4 options (a multiple of 4 bytes).
    pub ip_options: Vec<u8>,
    pub payload: Vec<u8>,
}

impl Spec {
    pub fn tcp(src: &str, dst: &str) -> Spec {
        Spec {
            src_mac: [2, 0, 0, 0, 0, 0xc1],
            dst_mac: [2, 0, 0, 0, 0, 0x1b],
            vlan: None,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            l4: L4::Tcp,
            tcp_flags: SYN,
            ttl: 64,
            ip_options: Vec::new(),
            payload: b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        }
    }

    pub fn udp(src: &str, dst: &str) -> Spec {
        Spec {
            l4: L4::Udp,
            payload: b"\x12\x34query".to_vec(),
            ..Spec::tcp(src, dst)
        }
    }

    /// The IP header this spec describes (payload length filled in by the builder).
    pub fn ip_header(&self) -> IpHeaders {
        let proto = match self.l4 {
            L4::Tcp => IpNumber::TCP,
            L4::Udp => IpNumber::UDP,
        };
        match (self.src.ip(), self.dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut h = Ipv4Header::new(0, self.ttl, proto, s.octets(), d.octets()).unwrap();
                h.options = Ipv4Options::try_from(&self.ip_options[..]).unwrap();
                h.identification = 0x1234;
                h.dont_fragment = true;
                IpHeaders::Ipv4(h, Default::default())
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => IpHeaders::Ipv6(
                Ipv6Header {
                    traffic_class: 0,
                    flow_label: Default::default(),
                    payload_length: 0,
                    next_header: proto,
                    hop_limit: self.ttl,
                    source: s.octets(),
                    destination: d.octets(),
                },
                Default::default(),
            ),
            _ => panic!("mixed families in {self:?}"),
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let eth = PacketBuilder::ethernet2(self.src_mac, self.dst_mac);
        let ip = match self.vlan {
            Some(id) => eth
                .vlan(VlanHeader::Single(SingleVlanHeader {
                    pcp: Default::default(),
                    drop_eligible_indicator: false,
                    vlan_id: VlanId::try_new(id).unwrap(),
                    ether_type: Default::default(),
                }))
                .ip(self.ip_header()),
            None => eth.ip(self.ip_header()),
        };
        let mut out = Vec::new();
        match self.l4 {
            L4::Tcp => {
                let mut b = ip.tcp(self.src.port(), self.dst.port(), 1000, 64_000);
                let f = self.tcp_flags;
                if f & FIN != 0 {
                    b = b.fin();
                }
                if f & SYN != 0 {
                    b = b.syn();
                }
                if f & RST != 0 {
                    b = b.rst();
                }
                if f & PSH != 0 {
                    b = b.psh();
                }
                if f & ACK != 0 {
                    b = b.ack(5000);
                }
                b.write(&mut out, &self.payload).unwrap()
            }
            L4::Udp => ip
                .udp(self.src.port(), self.dst.port())
                .write(&mut out, &self.payload)
                .unwrap(),
        }
        out
    }

    /// The IP packet alone (no Ethernet), as an ICMP error would quote it.
    pub fn ip_bytes(&self) -> Vec<u8> {
        let full = Spec {
            vlan: None,
            ..self.clone()
        }
        .build();
        full[14..].to_vec()
    }
}

/// Offset of the IP header in a frame built from `spec`.
pub fn l3_offset(spec: &Spec) -> usize {
    if spec.vlan.is_some() {
        18
    } else {
        14
    }
}

/// The `struct __sk_buff` a TC program's `BPF_PROG_TEST_RUN` is given: zero but for the
/// interface the packet arrived on (the FIB lookup needs one; the kernel's test run leaves it
/// 0 otherwise) and, for a GSO packet, its segment count and size.
pub fn ingress_skb(ingress_ifindex: u32) -> Vec<u8> {
    gso_skb(ingress_ifindex, 0, 0)
}

/// [`ingress_skb`] for a GSO packet of `segs` segments of `size` bytes.
pub fn gso_skb(ingress_ifindex: u32, segs: u32, size: u32) -> Vec<u8> {
    // Offsets in struct __sk_buff (uapi/linux/bpf.h), 192 bytes in all.
    const INGRESS_IFINDEX: usize = 36;
    const GSO_SEGS: usize = 164;
    const GSO_SIZE: usize = 176;
    let mut skb = vec![0u8; 192];
    skb[INGRESS_IFINDEX..INGRESS_IFINDEX + 4].copy_from_slice(&ingress_ifindex.to_ne_bytes());
    skb[GSO_SEGS..GSO_SEGS + 4].copy_from_slice(&segs.to_ne_bytes());
    skb[GSO_SIZE..GSO_SIZE + 4].copy_from_slice(&size.to_ne_bytes());
    skb
}
