//! Rewriting a packet's destination (client → backend) or source (backend → service address),
//! with the IPv4 header checksum updated here (it is always a full checksum) and the L4
//! checksum by the program kind's rule ([`Ctx::update_l4_csum`]).

use ambassador_ebpf::{csum, FAMILY_V4};

use crate::{
    ctx::{load, store, Ctx},
    parse::{l4_check_off, Packet},
};

/// Rewrite the destination address and port.
#[inline(always)]
pub(crate) fn rewrite_dst<C: Ctx>(
    ctx: &C,
    pkt: &Packet,
    addr: &[u32; 4],
    port: u16,
) -> Result<(), ()> {
    let addr_off = if pkt.family == FAMILY_V4 {
        pkt.l3 + 16
    } else {
        pkt.l3 + 24
    };
    rewrite(ctx, pkt, addr_off, &pkt.dst, addr, pkt.l4 + 2, port)
}

/// Rewrite the source address and port.
#[inline(always)]
pub(crate) fn rewrite_src<C: Ctx>(
    ctx: &C,
    pkt: &Packet,
    addr: &[u32; 4],
    port: u16,
) -> Result<(), ()> {
    let addr_off = if pkt.family == FAMILY_V4 {
        pkt.l3 + 12
    } else {
        pkt.l3 + 8
    };
    rewrite(ctx, pkt, addr_off, &pkt.src, addr, pkt.l4, port)
}

#[inline(always)]
fn rewrite<C: Ctx>(
    ctx: &C,
    pkt: &Packet,
    addr_off: usize,
    old_addr: &[u32; 4],
    addr: &[u32; 4],
    port_off: usize,
    port: u16,
) -> Result<(), ()> {
    let old_port: u16 = load(ctx, port_off)?;
    // The L4 checksum covers the pseudo-header addresses and the port.
    let header = csum::replace16(0, old_port, port);
    let pseudo = replace_addr(ctx, pkt.family, 0, addr_off, old_addr, addr)?;
    if pkt.family == FAMILY_V4 {
        let ip_check: u16 = load(ctx, pkt.l3 + 10)?;
        let ip = csum::replace32(csum::start(ip_check), old_addr[0], addr[0]);
        store(ctx, pkt.l3 + 10, csum::finish(ip))?;
    }
    store(ctx, port_off, port)?;
    // Last: on TC it is a helper call, after which packet pointers must be taken anew.
    ctx.update_l4_csum(
        pkt.l4 + l4_check_off(pkt.proto),
        pkt.proto,
        pkt.family,
        pseudo,
        header,
    )
}

/// Write an address (one word for IPv4, four for IPv6) and add its change to `sum`.
#[inline(always)]
pub(crate) fn replace_addr<C: Ctx>(
    ctx: &C,
    family: u8,
    sum: u64,
    off: usize,
    old: &[u32; 4],
    new: &[u32; 4],
) -> Result<u64, ()> {
    let mut s = csum::replace32(sum, old[0], new[0]);
    if family == FAMILY_V4 {
        store(ctx, off, new[0])?;
    } else {
        s = csum::replace32(s, old[1], new[1]);
        s = csum::replace32(s, old[2], new[2]);
        s = csum::replace32(s, old[3], new[3]);
        store(ctx, off, *new)?;
    }
    Ok(s)
}
