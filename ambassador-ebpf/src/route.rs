//! Sending a rewritten packet on its way: the route cached in its flow entry, or the FIB; one
//! hop less; out of the egress interface.

use ambassador_ebpf::{csum, Flow, Route, Stat, FAMILY_V4};
use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS},
    helpers::bpf_fib_lookup,
};
use core::mem::size_of;

use crate::{
    ctx::{load, store, Ctx},
    flow::{route_of, touch, touch_now, zero_words},
    maps::{clock_now, count, fib_cache_jiffies},
    parse::Packet,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Count a forwarded packet and send it out of `ifindex`.
#[inline(always)]
pub(crate) fn send<C: Ctx>(ctx: &C, ifindex: u32) -> u32 {
    count(Stat::Forwarded);
    ctx.redirect(ifindex)
}

/// Send a rewritten packet on its way: the FIB picks the egress and next hop; whatever the FIB
/// cannot resolve here (MTU exceeded, TTL expiring, VLAN; on XDP also no neighbour entry yet)
/// goes to the stack, which routes it and answers with the proper ICMP. A flow entry (`cache`,
/// or null) keeps the FIB result for `FIB_CACHE_JIFFIES`, for packets no longer than one it
/// was checked for, so established flows skip the lookup.
#[inline(never)]
pub(crate) fn forward<C: Ctx>(ctx: &C, pkt: &Packet, cache: *mut Flow, direction: u32) -> u32 {
    match route(ctx, pkt, cache, direction) {
        Ok(action) => action,
        Err(()) => {
            count(Stat::PassUnparsed);
            C::PASS
        }
    }
}

#[inline(always)]
fn route<C: Ctx>(ctx: &C, pkt: &Packet, cache: *mut Flow, direction: u32) -> Result<u32, ()> {
    if pkt.vlan {
        touch_now(cache);
        count(Stat::NatThenStack);
        return Ok(C::PASS);
    }
    let (ttl_off, ip_len) = if pkt.family == FAMILY_V4 {
        (pkt.l3 + 8, u16::from_be(load::<C, u16>(ctx, pkt.l3 + 2)?))
    } else {
        (
            pkt.l3 + 7,
            u16::from_be(load::<C, u16>(ctx, pkt.l3 + 4)?).wrapping_add(40),
        )
    };
    let ttl: u8 = load(ctx, ttl_off)?;
    if ttl <= 1 {
        touch_now(cache);
        count(Stat::NatThenStack);
        return Ok(C::PASS);
    }
    // A GSO packet is longer than any route's MTU by design: the kernel checks its segments,
    // and the route cache (checked per wire packet) is neither used nor filled.
    let gso = ctx.gso();
    let mut now = 0;
    let cached = if gso {
        touch_now(cache);
        None
    } else {
        cached_route(cache, direction, ip_len, &mut now)
    };
    let ifindex = match cached {
        Some(r) => {
            // SAFETY: a live map value for the duration of the program.
            let (head, tail) = unsafe { ((*r).mac_head, (*r).mac_tail) };
            store(ctx, 0, head)?;
            store(ctx, 8, tail)?;
            // SAFETY: as above.
            unsafe { (*r).ifindex }
        }
        None => {
            let mut raw = core::mem::MaybeUninit::<FibParams>::uninit();
            fib_params(ctx, pkt, if gso { 0 } else { ip_len }, &mut raw)?;
            // Used in place: `assume_init()` would copy it, and part of the copy becomes a
            // byte-loop memset call.
            let fib = raw.as_mut_ptr();
            // SAFETY: fib points to a live, fully written bpf_fib_lookup struct on our stack.
            let rc = unsafe { bpf_fib_lookup(ctx.as_ptr(), fib, size_of::<FibParams>() as i32, 0) };
            if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 && C::RESOLVES_NEIGH {
                // SAFETY: the helper set the egress interface before finding no neighbour.
                let ifindex = unsafe { (*fib).ifindex };
                decrement_ttl(ctx, pkt, ttl_off, ttl)?;
                count(Stat::Forwarded);
                return Ok(ctx.redirect_neigh(ifindex));
            }
            if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
                count(Stat::NatThenStack);
                return Ok(C::PASS);
            }
            // SAFETY: fully written by fib_params and the helper.
            if !ctx.can_send_to(unsafe { (*fib).ifindex }) {
                // The stack forwards it (one hop less there); its route is not cached, so
                // every packet of the flow asks again.
                count(Stat::NatThenStack);
                return Ok(C::PASS);
            }
            // The MACs go to the packet first, and from there to the cache: both may be
            // misaligned, the stack may not (the verifier insists), so they never sit there.
            // SAFETY: fully written by fib_params and the helper.
            let (d, s) = unsafe { (mac_words(&(*fib).dmac), mac_words(&(*fib).smac)) };
            store(ctx, 0, d)?;
            store(ctx, 6, s)?;
            if !cache.is_null() && !gso {
                let (head, tail): (u64, u32) = (load(ctx, 0)?, load(ctx, 8)?);
                let r = route_of(cache, direction);
                // SAFETY: a live map value (concurrent writers store the same route), and our
                // fully written stack struct.
                unsafe {
                    (*r).ifindex = (*fib).ifindex;
                    (*r).stamp = now;
                    (*r).len = ip_len;
                    (*r).mac_head = head;
                    (*r).mac_tail = tail;
                }
            }
            // SAFETY: as above.
            unsafe { (*fib).ifindex }
        }
    };
    decrement_ttl(ctx, pkt, ttl_off, ttl)?;
    Ok(send(ctx, ifindex))
}

/// We are routing: one hop less.
#[inline(always)]
fn decrement_ttl<C: Ctx>(ctx: &C, pkt: &Packet, ttl_off: usize, ttl: u8) -> Result<(), ()> {
    store(ctx, ttl_off, ttl - 1)?;
    if pkt.family == FAMILY_V4 {
        // TTL is the high byte of the 16-bit word at offset 8 (TTL, protocol).
        let check: u16 = load(ctx, pkt.l3 + 10)?;
        let old = u16::from_ne_bytes([ttl, pkt.proto]);
        let new = u16::from_ne_bytes([ttl - 1, pkt.proto]);
        store(
            ctx,
            pkt.l3 + 10,
            csum::finish(csum::replace16(csum::start(check), old, new)),
        )?;
    }
    Ok(())
}

/// The route `cache` holds for packets of `direction`, if it is fresh and was checked for
/// packets this long; refreshes the flow's last-seen time and sets `now`.
#[inline(always)]
pub(crate) fn cached_route(
    cache: *mut Flow,
    direction: u32,
    ip_len: u16,
    now: &mut u32,
) -> Option<*mut Route> {
    if cache.is_null() {
        return None;
    }
    *now = clock_now();
    touch(cache, *now);
    let r = route_of(cache, direction);
    // SAFETY: a live map value for the duration of the program.
    let route = unsafe { &*r };
    if route.ifindex != 0
        && now.wrapping_sub(route.stamp) < fib_cache_jiffies()
        && ip_len <= route.len
    {
        Some(r)
    } else {
        None
    }
}

/// Fill `raw` with the FIB query for a packet: zeroed, then the fields set in place. A zero
/// `tot_len` makes the kernel check the MTU against the packet itself (its GSO segments).
#[inline(always)]
fn fib_params<C: Ctx>(
    ctx: &C,
    pkt: &Packet,
    tot_len: u16,
    raw: &mut core::mem::MaybeUninit<FibParams>,
) -> Result<(), ()> {
    zero_words(raw);
    let fib = raw.as_mut_ptr();
    // SAFETY: every byte was just zeroed; plain field writes into our own stack struct.
    unsafe {
        (*fib).l4_protocol = pkt.proto;
        (*fib).ifindex = ctx.ingress_ifindex();
        (*fib).__bindgen_anon_1.tot_len = tot_len;
        if pkt.family == FAMILY_V4 {
            (*fib).family = AF_INET;
            (*fib).__bindgen_anon_2.tos = load::<C, u8>(ctx, pkt.l3 + 1)?;
            (*fib).__bindgen_anon_3.ipv4_src = load::<C, u32>(ctx, pkt.l3 + 12)?;
            (*fib).__bindgen_anon_4.ipv4_dst = load::<C, u32>(ctx, pkt.l3 + 16)?;
        } else {
            (*fib).family = AF_INET6;
            // Word by word: an array copy here becomes a byte-loop memmove call.
            for i in 0..4 {
                (*fib).__bindgen_anon_3.ipv6_src[i] = load::<C, u32>(ctx, pkt.l3 + 8 + 4 * i)?;
                (*fib).__bindgen_anon_4.ipv6_dst[i] = load::<C, u32>(ctx, pkt.l3 + 24 + 4 * i)?;
            }
        }
    }
    Ok(())
}

/// A MAC address in `bpf_fib_lookup` (2-byte aligned) as three separate 16-bit loads: LLVM would
/// otherwise merge them into a misaligned wider stack load, which the verifier refuses.
#[inline(always)]
fn mac_words(mac: &[u8; 6]) -> [u16; 3] {
    let w = mac.as_ptr() as *const u16;
    // SAFETY: six bytes at a 2-byte aligned address inside a live struct.
    unsafe {
        [
            w.read_volatile(),
            w.add(1).read_volatile(),
            w.add(2).read_volatile(),
        ]
    }
}
