//! ICMP errors about tracked flows, translated like the flows they quote, so path-MTU
//! discovery and unreachables work through the ambassador.

use ambassador_ebpf::{
    csum, FlowKey, Stat, FAMILY_V4, FLOW_FORWARD, FLOW_REVERSE, PROTO_TCP, PROTO_UDP,
};

use crate::{
    ctx::{load, store, Ctx},
    flow::{lookup, reply_lookup},
    maps::{count, scratch},
    nat::replace_addr,
    parse::Packet,
    path::to_sub,
};

/// How the quoted packet's flow was found: its client's entry (the quote is a reply we sent),
/// or as the reply to it (the quote is a request we sent), and what its addresses become.
struct Quoted {
    direction: u32,
    nat_addr: [u32; 4],
    nat_port: u16,
}

/// An ICMP/ICMPv6 error quoting a packet of a tracked flow is translated like the flow, so
/// path-MTU discovery and unreachables work through the ambassador. The quoted packet went out
/// *from* us, so its reversed tuple is the key of the entry that produced it:
/// - the client's entry (we sent service → client on behalf of the backend): the quote's source
///   becomes the backend again, and an error addressed to the service address goes to the backend;
/// - else the flow it is a reply to, found as replies are (we sent client → backend): the
///   quote's destination becomes the service address again, and the error continues to the
///   client.
#[inline(never)]
pub(crate) fn icmp_error<C: Ctx>(ctx: &C, pkt: &Packet) -> u32 {
    to_sub(translate_icmp_error(ctx, pkt))
}

#[inline(always)]
fn translate_icmp_error<C: Ctx>(ctx: &C, pkt: &Packet) -> Result<bool, ()> {
    let icmp_type: u8 = load(ctx, pkt.l4)?;
    let is_error = if pkt.family == FAMILY_V4 {
        icmp_type == 3 || icmp_type == 11 || icmp_type == 12
    } else {
        (1..=4).contains(&icmp_type)
    };
    if !is_error {
        count(Stat::PassNotOurs);
        return Ok(false);
    }
    let il3 = pkt.l4 + 8;
    let (il4, iproto, isrc, idst, isrc_off, idst_off) = if pkt.family == FAMILY_V4 {
        let vihl: u8 = load(ctx, il3)?;
        let ihl = ((vihl & 0x0f) as usize) * 4;
        if vihl >> 4 != 4 || ihl < 20 {
            return Err(());
        }
        let s: u32 = load(ctx, il3 + 12)?;
        let d: u32 = load(ctx, il3 + 16)?;
        (
            il3 + ihl,
            load::<C, u8>(ctx, il3 + 9)?,
            [s, 0, 0, 0],
            [d, 0, 0, 0],
            il3 + 12,
            il3 + 16,
        )
    } else {
        (
            il3 + 40,
            load::<C, u8>(ctx, il3 + 6)?,
            load::<C, [u32; 4]>(ctx, il3 + 8)?,
            load::<C, [u32; 4]>(ctx, il3 + 24)?,
            il3 + 8,
            il3 + 24,
        )
    };
    if iproto != PROTO_TCP && iproto != PROTO_UDP {
        count(Stat::PassNotOurs);
        return Ok(false);
    }
    // Everything we rewrite in the quote must lie inside the ICMP message (the outer IP
    // datagram), or the checksum would cover bytes that are not part of it.
    if il4 + 4 > pkt.l3 + pkt.len as usize {
        return Err(());
    }
    let isport: u16 = load(ctx, il4)?;
    let idport: u16 = load(ctx, il4 + 2)?;
    // In this CPU's scratch space, not on the stack (see Scratch).
    let sc = scratch().ok_or(())?;
    // SAFETY: this CPU's scratch slot, ours for the duration of the program.
    let key = unsafe { &mut (*sc).key };
    *key = FlowKey {
        src: idst,
        dst: isrc,
        sport: idport,
        dport: isport,
        proto: iproto,
        family: pkt.family,
        _pad: 0,
    };
    // SAFETY (both): live map values, plain data read once.
    let flow = match lookup(key) {
        Some(f) if unsafe { (*f).direction } == FLOW_FORWARD => {
            let f = unsafe { &*f };
            Quoted {
                direction: FLOW_FORWARD,
                nat_addr: f.nat_addr,
                nat_port: f.nat_port,
            }
        }
        _ => match reply_lookup(&idst, &isrc, idport, isport, iproto, pkt.family) {
            Some(r) => Quoted {
                direction: FLOW_REVERSE,
                nat_addr: r.nat_addr,
                nat_port: r.nat_port,
            },
            None => {
                count(Stat::PassNotOurs);
                return Ok(false);
            }
        },
    };
    let (addr_off, old_addr, port_off) = if flow.direction == FLOW_FORWARD {
        (isrc_off, isrc, il4)
    } else {
        (idst_off, idst, il4 + 2)
    };
    // What the quote changes is ICMP payload to its checksum; an outer IPv6 address is
    // pseudo-header.
    let old_port: u16 = load(ctx, port_off)?;
    let mut quote = csum::replace16(0, old_port, flow.nat_port);
    store(ctx, port_off, flow.nat_port)?;
    quote = replace_addr(ctx, pkt.family, quote, addr_off, &old_addr, &flow.nat_addr)?;
    if pkt.family == FAMILY_V4 {
        // The quoted IPv4 header's own checksum changes too, and the ICMP checksum covers it.
        let iold: u16 = load(ctx, il3 + 10)?;
        let inew = csum::finish(csum::replace32(
            csum::start(iold),
            old_addr[0],
            flow.nat_addr[0],
        ));
        store(ctx, il3 + 10, inew)?;
        quote = csum::replace16(quote, iold, inew);
    }
    let mut pseudo = 0;
    // An error addressed to the service address is for the backend.
    if flow.direction == FLOW_FORWARD && pkt.dst == isrc {
        let dst_off = if pkt.family == FAMILY_V4 {
            pkt.l3 + 16
        } else {
            pkt.l3 + 24
        };
        if pkt.family == FAMILY_V4 {
            let c: u16 = load(ctx, pkt.l3 + 10)?;
            let c = csum::finish(csum::replace32(
                csum::start(c),
                pkt.dst[0],
                flow.nat_addr[0],
            ));
            store(ctx, pkt.l3 + 10, c)?;
            store(ctx, dst_off, flow.nat_addr[0])?;
        } else {
            // ICMPv6's checksum covers the pseudo-header, so the outer destination counts too.
            pseudo = replace_addr(ctx, pkt.family, 0, dst_off, &pkt.dst, &flow.nat_addr)?;
        }
    }
    ctx.update_l4_csum(pkt.l4 + 2, pkt.proto, pkt.family, pseudo, quote)?;
    count(Stat::IcmpTranslated);
    Ok(true)
}
