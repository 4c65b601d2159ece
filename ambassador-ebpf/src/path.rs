//! The decision path, one implementation for the XDP and TC programs: the straight-line
//! IPv4 path for the common case, else parse → classify → established flow, or a new flow's
//! backend → NAT → route.

use ambassador_ebpf::{
    Flow, FlowKey, ServiceKey, Stat, FAMILY_V4, FAMILY_V6, FILTER_BACKEND, FILTER_SERVICE,
    FLOW_FORWARD, FLOW_REVERSE, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_SYN,
};

use core::mem::MaybeUninit;

use crate::{
    ctx::{load, Ctx},
    fast::{fast_v4, NOT_HANDLED},
    flow::{lookup, mark_closing, ports_word, proto_word, reply_lookup_sub, Reply},
    icmp::icmp_error,
    maps::{count, count_backend, filter_has, scratch, SERVICES},
    nat::{rewrite_dst, rewrite_src},
    parse::{parse, tcp_flags, Packet, IPPROTO_ICMP, IPPROTO_ICMPV6},
    route::forward,
    select::{to_service, NEW_MIDSTREAM, NEW_REPLACING},
};

/// What the program does with a packet, as its kind's action code.
#[inline(always)]
pub(crate) fn run<C: Ctx>(ctx: &C) -> u32 {
    let action = fast_v4(ctx);
    if action != NOT_HANDLED {
        return action;
    }
    let forward_it = match parse(ctx) {
        Ok(Some(pkt)) => match classify(ctx, &pkt) {
            Ok(Verdict::Forward(flow, direction)) => Ok(forward(ctx, &pkt, flow, direction)),
            Ok(Verdict::Pass) => Ok(C::PASS),
            Err(()) => Err(()),
        },
        Ok(None) => Ok(C::PASS),
        Err(()) => Err(()),
    };
    match forward_it {
        Ok(action) => action,
        Err(()) => {
            count(Stat::PassUnparsed);
            C::PASS
        }
    }
}

/// What a subprogram decided, as a plain integer: subprograms must return in a register (a
/// value returned through memory leaves a stack pointer in R0, which the verifier refuses).
const SUB_PASS: u32 = 0;
const SUB_FORWARD: u32 = 1;
const SUB_MALFORMED: u32 = 2;

#[inline(always)]
pub(crate) fn from_sub(code: u32) -> Result<Verdict, ()> {
    match code {
        SUB_PASS => Ok(Verdict::Pass),
        SUB_FORWARD => Ok(Verdict::Forward(core::ptr::null_mut(), FLOW_FORWARD)),
        _ => Err(()),
    }
}

#[inline(always)]
pub(crate) fn to_sub(r: Result<bool, ()>) -> u32 {
    match r {
        Ok(true) => SUB_FORWARD,
        Ok(false) => SUB_PASS,
        Err(()) => SUB_MALFORMED,
    }
}

/// What to do with a packet: pass it untouched, or forward it (rewritten), using and
/// refreshing the FIB result its flow entry caches for the packet's direction when there is
/// one (else null).
pub(crate) enum Verdict {
    Pass,
    Forward(*mut Flow, u32),
}

/// Decide what to do with a parsed packet.
#[inline(always)]
pub(crate) fn classify<C: Ctx>(ctx: &C, pkt: &Packet) -> Result<Verdict, ()> {
    match pkt.proto {
        PROTO_TCP | PROTO_UDP => l4_packet(ctx, pkt),
        IPPROTO_ICMP if pkt.family == FAMILY_V4 => from_sub(icmp_error(ctx, pkt)),
        IPPROTO_ICMPV6 if pkt.family == FAMILY_V6 => from_sub(icmp_error(ctx, pkt)),
        _ => {
            count(Stat::PassNotOurs);
            Ok(Verdict::Pass)
        }
    }
}

#[inline(always)]
fn l4_packet<C: Ctx>(ctx: &C, pkt: &Packet) -> Result<Verdict, ()> {
    // Most traffic is not ours: one array read per address says so before anything else is
    // read or built (a truncated header to no service passes untouched all the same).
    let for_service = filter_has(&pkt.dst, FILTER_SERVICE);
    if !for_service && !filter_has(&pkt.src, FILTER_BACKEND) {
        count(Stat::PassNotOurs);
        return Ok(Verdict::Pass);
    }
    // Ports, and the checksum field we may rewrite, must be inside the packet.
    let min = if pkt.proto == PROTO_TCP { 20 } else { 8 };
    // Within the IP datagram, not just the frame: a header cut by the IP length is malformed.
    if (pkt.l4 - pkt.l3) + min > pkt.len as usize || ctx.data() + pkt.l4 + min > ctx.data_end() {
        return Err(());
    }
    let sport: u16 = load(ctx, pkt.l4)?;
    let dport: u16 = load(ctx, pkt.l4 + 2)?;
    let bytes = pkt.len as u64;
    // The key lives in this CPU's scratch space, not on the stack (see Scratch).
    let sc = scratch().ok_or(())?;
    // SAFETY: this CPU's scratch slot, ours for the duration of the program.
    let key = unsafe { &mut (*sc).key };
    *key = FlowKey {
        src: pkt.src,
        dst: pkt.dst,
        sport,
        dport,
        proto: pkt.proto,
        family: pkt.family,
        _pad: 0,
    };
    let key = &*key;

    if for_service {
        // Established flows first: one lookup, and they keep their backend whatever the
        // service's table now says.
        let found = lookup(key);
        let mut how = 0;
        if let Some(f) = found {
            // SAFETY: a live map value for the duration of the program.
            let flow = unsafe { &*f };
            let tcp = tcp_flags(ctx, pkt)?;
            // A SYN on a closed flow's 5-tuple is a new connection (port reuse): it picks a
            // backend again, so a drained or removed backend gets no new connections.
            let reopened = tcp & (TCP_SYN | TCP_ACK) == TCP_SYN && flow.closing != 0;
            if flow.direction == FLOW_FORWARD && !reopened {
                let _ = mark_closing(f, tcp);
                rewrite_dst(ctx, pkt, &flow.nat_addr, flow.nat_port)?;
                count_backend(flow.backend, bytes, false);
                return Ok(Verdict::Forward(f, FLOW_FORWARD));
            }
            how = NEW_REPLACING;
        } else if pkt.proto == PROTO_TCP && tcp_flags(ctx, pkt)? & TCP_SYN == 0 {
            how = NEW_MIDSTREAM;
        }
        let skey = ServiceKey {
            addr: pkt.dst,
            port: dport,
            proto: pkt.proto,
            family: pkt.family,
        };
        // SAFETY: values are plain data; a concurrent update replaces the element (RCU).
        if let Some(svc) = unsafe { SERVICES.get(&skey) } {
            return from_sub(to_service(ctx, pkt, key, svc, how));
        }
    }
    if filter_has(&pkt.src, FILTER_BACKEND) {
        let mut out = MaybeUninit::<Reply>::uninit();
        let found = reply_lookup_sub(
            &mut out,
            &pkt.src,
            &pkt.dst,
            ports_word(sport, dport),
            proto_word(pkt.proto, pkt.family),
        );
        if found != 0 {
            // SAFETY: written by reply_lookup_sub, which found it.
            let r = unsafe { out.assume_init() };
            let tcp = tcp_flags(ctx, pkt)?;
            // SAFETY: a live map value for the duration of the program.
            let flow = unsafe { &*r.flow };
            if mark_closing(r.flow, tcp) && flow.direction == FLOW_REVERSE {
                // A shared backend's flow has two entries: the forward one is what userspace
                // counts open flows by (a FIN or RST is rare: one more lookup).
                // SAFETY: the scratch probe key; reply_lookup is done with it.
                let fkey = unsafe { &mut (*sc).probe };
                *fkey = FlowKey {
                    src: pkt.dst,
                    dst: flow.nat_addr,
                    sport: dport,
                    dport: flow.nat_port,
                    proto: pkt.proto,
                    family: pkt.family,
                    _pad: 0,
                };
                if let Some(ff) = lookup(fkey) {
                    mark_closing(ff, tcp);
                }
            }
            rewrite_src(ctx, pkt, &r.nat_addr, r.nat_port)?;
            count_backend(flow.backend, bytes, false);
            count(Stat::ReverseNat);
            return Ok(Verdict::Forward(r.flow, FLOW_REVERSE));
        }
    }
    count(Stat::PassNotOurs);
    Ok(Verdict::Pass)
}
