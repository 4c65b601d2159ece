//! The common case, straight-line: an untagged IPv4 packet without options, TCP or UDP, that
//! is not ours or belongs to an established flow whose route is cached.

use ambassador_ebpf::{
    csum, seen_clock, Stat, FAMILY_V4, FILTER_BACKEND, FILTER_SERVICE, FLOW_FORWARD, FLOW_REVERSE,
    PROTO_TCP, PROTO_UDP, TCP_FIN, TCP_RST, TCP_SYN,
};

use crate::{
    ctx::{bounded_u16, Ctx},
    flow::{cache_slot, flow_epoch, key_words, lookup, reply_lookup},
    maps::{clock_now, count, count_backend, fib_cache_jiffies, filter_has, scratch, FLOW_CACHE},
    parse::{ETH_HLEN, ETH_P_IP, IP_FRAG_MASK},
    route::{cached_route, send},
};

/// Offsets of an untagged IPv4 header without options, and of the L4 header after it.
const FAST_IP: usize = ETH_HLEN;
const FAST_L4: usize = ETH_HLEN + 20;

/// A read at a constant offset the caller has bounds-checked against `data_end`.
///
/// # Safety
/// `data + off + size_of::<T>()` must be within the packet, checked where the verifier sees it.
#[inline(always)]
unsafe fn fast_read<T: Copy>(data: usize, off: usize) -> T {
    // SAFETY: per the contract; packet data has no alignment guarantee.
    unsafe { ((data + off) as *const T).read_unaligned() }
}

/// A write at a constant offset the caller has bounds-checked against `data_end`.
///
/// # Safety
/// As [`fast_read`].
#[inline(always)]
unsafe fn fast_write<T: Copy>(data: usize, off: usize, v: T) {
    // SAFETY: per the contract; packet data has no alignment guarantee.
    unsafe { ((data + off) as *mut T).write_unaligned(v) }
}

/// What the straight-line path needs of a flow to rewrite and send one of its packets.
#[derive(Clone, Copy)]
struct FastRoute {
    nat_addr: u32,
    nat_port: u16,
    backend: u32,
    ifindex: u32,
    mac_head: u64,
    mac_tail: u32,
}

/// The common case, straight-line: an untagged IPv4 packet without options, TCP or UDP, that
/// is not ours (passed) or belongs to an established flow, in either direction, whose route is
/// cached. Every header is at a constant offset, one bounds check covers them, and no parse
/// struct is built. Anything else (a SYN, FIN or RST, a stale route, an expiring TTL, a new
/// flow, whatever the general path would count as malformed) returns `None` having changed
/// nothing, and takes the general path, which decides exactly as before: this is a shortcut
/// to the same results, not a second policy.
#[inline(always)]
fn fast_v4_inline<C: Ctx>(ctx: &C) -> Option<u32> {
    // Packets whose link layer hides a tag, and GSO packets (longer than the cached route's
    // MTU by design), take the general path.
    if ctx.hidden_vlan() || ctx.gso() {
        return None;
    }
    let data = ctx.data();
    let end = ctx.data_end();
    if data + FAST_L4 + 8 > end {
        return None;
    }
    // SAFETY: the 42 bytes up to the end of a UDP header were checked just above.
    let (ethertype, ip0, ip1, ip2, src, dst, ports) = unsafe {
        (
            fast_read::<u16>(data, 12),
            fast_read::<u32>(data, FAST_IP),
            fast_read::<u32>(data, FAST_IP + 4),
            fast_read::<u32>(data, FAST_IP + 8),
            fast_read::<u32>(data, FAST_IP + 12),
            fast_read::<u32>(data, FAST_IP + 16),
            fast_read::<u32>(data, FAST_L4),
        )
    };
    let [vihl, _tos, len_hi, len_lo] = ip0.to_ne_bytes();
    let [_, _, frag_hi, frag_lo] = ip1.to_ne_bytes();
    let [ttl, proto, check_a, check_b] = ip2.to_ne_bytes();
    if ethertype != ETH_P_IP
        || vihl != 0x45
        || u16::from_ne_bytes([frag_hi, frag_lo]) & IP_FRAG_MASK != 0
    {
        return None;
    }
    let (min, check_off) = match proto {
        PROTO_TCP => (20, FAST_L4 + 16),
        PROTO_UDP => (8, FAST_L4 + 6),
        _ => return None,
    };
    let tot_len = bounded_u16(u16::from_be_bytes([len_hi, len_lo])).ok()?;
    if tot_len < 20 + min || FAST_IP + tot_len > ctx.frame_len() {
        return None;
    }
    let for_service = filter_has(&[dst, 0, 0, 0], FILTER_SERVICE);
    if !for_service && !filter_has(&[src, 0, 0, 0], FILTER_BACKEND) {
        count(Stat::PassNotOurs);
        return Some(C::PASS);
    }
    let tcp = if proto == PROTO_TCP {
        if data + FAST_L4 + 20 > end {
            return None;
        }
        // SAFETY: within the TCP header, checked just above.
        unsafe { fast_read::<u8>(data, FAST_L4 + 13) as u32 }
    } else {
        0
    };
    if tcp & (TCP_SYN | TCP_FIN | TCP_RST) != 0 || ttl <= 1 {
        return None;
    }
    let [sport_a, sport_b, dport_a, dport_b] = ports.to_ne_bytes();
    let (sport, dport) = (
        u16::from_ne_bytes([sport_a, sport_b]),
        u16::from_ne_bytes([dport_a, dport_b]),
    );
    let proto_word = u32::from_ne_bytes([proto, FAMILY_V4, 0, 0]);
    let want = if for_service {
        FLOW_FORWARD
    } else {
        FLOW_REVERSE
    };
    let now = clock_now();
    // Read before the table is: see CachedFlow.
    let epoch = flow_epoch();
    let slot = FLOW_CACHE.get_ptr_mut(cache_slot(src, dst, ports));
    let hit = match slot {
        Some(c) => {
            // SAFETY: this CPU's slot, a live map value for the duration of the program.
            let c = unsafe { &*c };
            if c.src == src
                && c.dst == dst
                && c.ports == ports
                && c.proto_word == proto_word
                && c.epoch == epoch
                && c.tick == seen_clock(now)
                && c.direction == want
                && now.wrapping_sub(c.fib_stamp) < fib_cache_jiffies()
                && tot_len as u16 <= c.fib_len
            {
                Some(FastRoute {
                    nat_addr: c.nat_addr,
                    nat_port: c.nat_port,
                    backend: c.backend,
                    ifindex: c.fib_ifindex,
                    mac_head: c.fib_mac_head,
                    mac_tail: c.fib_mac_tail,
                })
            } else {
                None
            }
        }
        None => None,
    };
    let route = match hit {
        Some(r) => r,
        None => {
            // A service's packet: its flow's entry; a backend's: the flow it replies to. The
            // key is built in this CPU's scratch space (see Scratch): on the stack it would
            // not fit this frame beside the general path's.
            let sc = scratch()?;
            // SAFETY: this CPU's scratch slot, ours for the duration of the program.
            let key = unsafe { &mut (*sc).key };
            key_words(key, &[src, 0, 0, 0], &[dst, 0, 0, 0], ports, proto_word);
            let (f, nat_addr, nat_port) = if for_service {
                let f = lookup(key)?;
                // SAFETY: a live map value for the duration of the program.
                let flow = unsafe { &*f };
                if flow.direction != FLOW_FORWARD {
                    return None;
                }
                (f, flow.nat_addr[0], flow.nat_port)
            } else {
                let r = reply_lookup(&key.src, &key.dst, sport, dport, proto, FAMILY_V4)?;
                (r.flow, r.nat_addr[0], r.nat_port)
            };
            let rt = cached_route(f, want, tot_len as u16, &mut 0)?;
            // SAFETY: live map values for the duration of the program.
            let (flow, rt) = unsafe { (&*f, &*rt) };
            let r = FastRoute {
                nat_addr,
                nat_port,
                backend: flow.backend,
                ifindex: rt.ifindex,
                mac_head: rt.mac_head,
                mac_tail: rt.mac_tail,
            };
            if let Some(c) = slot {
                // SAFETY: this CPU's slot; field by field (no memcpy in BPF).
                unsafe {
                    (*c).src = src;
                    (*c).dst = dst;
                    (*c).ports = ports;
                    (*c).proto_word = proto_word;
                    (*c).epoch = epoch;
                    (*c).tick = seen_clock(now);
                    (*c).fib_stamp = rt.stamp;
                    (*c).fib_len = rt.len;
                    (*c).direction = want;
                    (*c).nat_addr = r.nat_addr;
                    (*c).nat_port = r.nat_port;
                    (*c).backend = r.backend;
                    (*c).fib_ifindex = r.ifindex;
                    (*c).fib_mac_head = r.mac_head;
                    (*c).fib_mac_tail = r.mac_tail;
                }
                count(Stat::FlowCacheFill);
            }
            r
        }
    };
    // Nothing was changed above; from here on the packet is rewritten and forwarded.
    let (addr_off, old_addr, port_off, old_port) = if for_service {
        (FAST_IP + 16, dst, FAST_L4 + 2, dport)
    } else {
        (FAST_IP + 12, src, FAST_L4, sport)
    };
    let new_addr = route.nat_addr;
    let ip_check = csum::finish(csum::replace16(
        csum::replace32(
            csum::start(u16::from_ne_bytes([check_a, check_b])),
            old_addr,
            new_addr,
        ),
        u16::from_ne_bytes([ttl, proto]),
        u16::from_ne_bytes([ttl - 1, proto]),
    ));
    // Checked again where it is used: the compiler merges the TCP and UDP paths, and the
    // verifier would see a checksum offset without the check that covers it.
    if data + check_off + 2 > end {
        return None;
    }
    // SAFETY: every offset below is within the headers checked above.
    unsafe {
        fast_write(data, addr_off, new_addr);
        fast_write(data, port_off, route.nat_port);
        fast_write(data, FAST_IP + 8, ttl - 1);
        fast_write(data, FAST_IP + 10, ip_check);
        fast_write(data, 0, route.mac_head);
        fast_write(data, 8, route.mac_tail);
    }
    // Last: on TC it is a helper call, after which packet pointers must be taken anew.
    let pseudo = csum::replace32(0, old_addr, new_addr);
    let header = csum::replace16(0, old_port, route.nat_port);
    if ctx
        .update_l4_csum(check_off, proto, FAMILY_V4, pseudo, header)
        .is_err()
    {
        count(Stat::PassUnparsed);
        return Some(C::PASS);
    }
    count_backend(route.backend, tot_len as u64, false);
    if !for_service {
        count(Stat::ReverseNat);
    }
    Some(send(ctx, route.ifindex))
}

/// [`fast_v4_inline`] as a subprogram of its own, so its frame and the general path's are not
/// one (the 512-byte BPF stack holds the deepest chain of frames, not their sum): the action,
/// or [`NOT_HANDLED`] for the general path. A plain integer, returned in a register.
#[inline(never)]
pub(crate) fn fast_v4<C: Ctx>(ctx: &C) -> u32 {
    fast_v4_inline(ctx).unwrap_or(NOT_HANDLED)
}

/// [`fast_v4`]: the packet takes the general path.
pub(crate) const NOT_HANDLED: u32 = u32::MAX;
