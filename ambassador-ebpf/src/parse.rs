//! Reading a frame: Ethernet, one optional 802.1Q tag, IPv4 (any IHL) or IPv6 without
//! extension headers. The userspace reading (`ambassador::dataplane::packet`) follows this one
//! step for step; the packet fuzzer checks they agree.

use ambassador_ebpf::{Stat, FAMILY_V4, FAMILY_V6, PROTO_TCP};

use crate::{
    ctx::{bounded_u16, load, Ctx},
    maps::count,
};

pub(crate) const ETH_HLEN: usize = 14;
pub(crate) const ETH_P_IP: u16 = 0x0800u16.to_be();
const ETH_P_IPV6: u16 = 0x86DDu16.to_be();
const ETH_P_8021Q: u16 = 0x8100u16.to_be();
pub(crate) const IPPROTO_ICMP: u8 = 1;
pub(crate) const IPPROTO_ICMPV6: u8 = 58;
/// IPv4 `frag_off` bits that mark a fragment: MF or a non-zero offset (wire order).
pub(crate) const IP_FRAG_MASK: u16 = 0x3FFFu16.to_be();

/// Where the parsed headers are, and the 5-tuple.
pub(crate) struct Packet {
    pub(crate) vlan: bool,
    pub(crate) l3: usize,
    pub(crate) l4: usize,
    pub(crate) family: u8,
    pub(crate) proto: u8,
    pub(crate) src: [u32; 4],
    pub(crate) dst: [u32; 4],
    /// IP datagram length (what byte counters count).
    pub(crate) len: u32,
}

/// `Ok(None)` is a packet to pass (fragment, other ethertype); `Err` one that is malformed.
#[inline(always)]
pub(crate) fn parse<C: Ctx>(ctx: &C) -> Result<Option<Packet>, ()> {
    let mut l3 = ETH_HLEN;
    let mut ethertype: u16 = load(ctx, 12)?;
    let mut vlan = ctx.hidden_vlan();
    if ethertype == ETH_P_8021Q {
        ethertype = load(ctx, 16)?;
        l3 += 4;
        vlan = true;
    }
    if ethertype == ETH_P_IP {
        // One checked read of the fixed header; the length check comes last so the compiler
        // cannot use it to drop bounds checks the verifier needs.
        let h: [u8; 20] = load(ctx, l3)?;
        let ihl = ((h[0] & 0x0f) as usize) * 4;
        if h[0] >> 4 != 4 || ihl < 20 {
            return Err(());
        }
        let tot_len = bounded_u16(u16::from_be_bytes([h[2], h[3]]))?;
        if u16::from_ne_bytes([h[6], h[7]]) & IP_FRAG_MASK != 0 {
            count(Stat::PassFragment);
            return Ok(None);
        }
        if tot_len < ihl || l3 + tot_len > ctx.frame_len() {
            return Err(());
        }
        Ok(Some(Packet {
            vlan,
            l3,
            l4: l3 + ihl,
            family: FAMILY_V4,
            proto: h[9],
            src: [u32::from_ne_bytes([h[12], h[13], h[14], h[15]]), 0, 0, 0],
            dst: [u32::from_ne_bytes([h[16], h[17], h[18], h[19]]), 0, 0, 0],
            len: tot_len as u32,
        }))
    } else if ethertype == ETH_P_IPV6 {
        let h: [u32; 10] = load(ctx, l3)?;
        let b0 = h[0].to_ne_bytes();
        if b0[0] >> 4 != 6 {
            return Err(());
        }
        let b1 = h[1].to_ne_bytes();
        let plen = bounded_u16(u16::from_be_bytes([b1[0], b1[1]]))?;
        // Extension headers are not walked: they fall through to "not ours" and pass.
        let next = b1[2];
        if next == 44 {
            count(Stat::PassFragment);
            return Ok(None);
        }
        if l3 + 40 + plen > ctx.frame_len() {
            return Err(());
        }
        Ok(Some(Packet {
            vlan,
            l3,
            l4: l3 + 40,
            family: FAMILY_V6,
            proto: next,
            src: [h[2], h[3], h[4], h[5]],
            dst: [h[6], h[7], h[8], h[9]],
            len: (plen + 40) as u32,
        }))
    } else {
        count(Stat::PassNotOurs);
        Ok(None)
    }
}

/// Offset of the checksum field in the L4 header.
#[inline(always)]
pub(crate) fn l4_check_off(proto: u8) -> usize {
    if proto == PROTO_TCP {
        16
    } else {
        6
    }
}

/// The TCP flags byte (0 for UDP); the header was bounds-checked by the caller.
#[inline(always)]
pub(crate) fn tcp_flags<C: Ctx>(ctx: &C, pkt: &Packet) -> Result<u32, ()> {
    if pkt.proto == PROTO_TCP {
        Ok(load::<C, u8>(ctx, pkt.l4 + 13)? as u32)
    } else {
        Ok(0)
    }
}
