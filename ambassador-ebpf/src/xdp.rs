//! XDP fast path: parse → classify → look up flow → pick backend → rewrite → forward.
//!
//! The map layout is documented in `lib.rs`. Every exit for traffic that is not ours, or that
//! this program does not fully understand, is `XDP_PASS` with the packet untouched.

use ambassador_ebpf::{
    csum, fib_clock, filter_index, flow_slot, seen_clock, Backend, Counters, Flow, FlowKey,
    Service, ServiceKey, Stat, FAMILY_V4, FAMILY_V6, FILTER_BACKEND, FILTER_SERVICE, FILTER_SIZE,
    FLOW_FORWARD, FLOW_REVERSE, FLOW_TABLE_SIZE, MAX_BACKENDS, MAX_SERVICES, NO_BACKEND, PROTO_TCP,
    PROTO_UDP, SERVICE_PASS_TO_STACK, STAT_COUNT, TABLE_SIZE, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
};
use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, xdp_action, BPF_FIB_LKUP_RET_SUCCESS},
    helpers::{bpf_fib_lookup, bpf_jiffies64, bpf_redirect},
    macros::{map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::XdpContext,
};
use core::mem::size_of;

#[map]
pub(crate) static SERVICES: HashMap<ServiceKey, Service> =
    HashMap::with_max_entries(MAX_SERVICES, 0);
#[map]
pub(crate) static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);
#[map]
pub(crate) static RINGS: Array<u32> = Array::with_max_entries(2 * MAX_SERVICES * TABLE_SIZE, 0);
/// The kernel's common LRU (per-CPU free lists refilled in batches): measured here, inserts cost
/// about a third less than with per-CPU LRU lists (BPF_F_NO_COMMON_LRU), whose every pop
/// rotates the list.
#[map]
static FLOWS: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(FLOW_TABLE_SIZE, 0);
/// Each CPU's flow cache: see [`CachedFlow`].
#[map]
static FLOW_CACHE: PerCpuArray<CachedFlow> = PerCpuArray::with_max_entries(FLOW_CACHE_SLOTS, 0);
/// Bumped after a new flow replaces a tracked entry: every cached copy made before is void.
#[map]
pub(crate) static FLOW_EPOCH: Array<u64> = Array::with_max_entries(1, 0);
#[map]
static ADDR_FILTER: Array<u32> = Array::with_max_entries(FILTER_SIZE, 0);
#[map]
static BACKEND_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);
#[map]
static GLOBAL_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

/// How long a FIB result cached in a flow is used before it is looked up again, in jiffies:
/// bounds how long a flow follows a stale neighbour. The loader sets it to `HZ` (one second);
/// a read-only global, so the verifier folds it into the comparison.
#[unsafe(no_mangle)]
static FIB_CACHE_JIFFIES: u32 = 250;

/// The flow clock now ([`fib_clock`] of jiffies).
#[inline(always)]
fn clock_now() -> u32 {
    // SAFETY: plain helper call (inlined by the verifier into a load of `jiffies`).
    fib_clock(unsafe { bpf_jiffies64() })
}

/// The current jiffies for userspace, which has no other exact reading of them: written into
/// the first 8 bytes of a test-run packet (little-endian). Never attached.
#[xdp]
pub fn clock_probe(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + 8 > ctx.data_end() {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: 8 bytes are inside the packet, checked above; plain helper call.
    unsafe { (start as *mut u64).write_unaligned(bpf_jiffies64()) };
    xdp_action::XDP_PASS
}

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800u16.to_be();
const ETH_P_IPV6: u16 = 0x86DDu16.to_be();
const ETH_P_8021Q: u16 = 0x8100u16.to_be();
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// IPv4 `frag_off` bits that mark a fragment: MF or a non-zero offset (wire order).
const IP_FRAG_MASK: u16 = 0x3FFFu16.to_be();

#[xdp]
pub fn ambassador_xdp(ctx: XdpContext) -> u32 {
    if let Some(action) = fast_v4(&ctx) {
        return action;
    }
    let forward_it = match parse(&ctx) {
        Ok(Some(pkt)) => match classify(&ctx, &pkt) {
            Ok(Verdict::Forward(flow)) => Ok(forward(&ctx, &pkt, flow)),
            Ok(Verdict::Pass) => Ok(xdp_action::XDP_PASS),
            Err(()) => Err(()),
        },
        Ok(None) => Ok(xdp_action::XDP_PASS),
        Err(()) => Err(()),
    };
    match forward_it {
        Ok(action) => action,
        Err(()) => {
            count(Stat::PassUnparsed);
            xdp_action::XDP_PASS
        }
    }
}

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

/// Slots of each CPU's flow cache (a power of two; 64 bytes each, 256 KiB a CPU).
const FLOW_CACHE_SLOTS: u32 = 4096;

/// One CPU's copy of what an established IPv4 flow's packets need (OVS's exact-match cache in
/// front of its classifier): on a hit the packet skips the connection table's hash lookup,
/// which is the largest cost of an established packet (~50 ns of ~140 here). Direct-mapped by a
/// hash of the 5-tuple, per CPU, so it needs no locks. A copy is used only while
/// - `FLOW_EPOCH` still holds the value read before the connection table was looked up (a new
///   flow that replaces a tracked entry bumps it after the insert, so a copy of the old entry
///   is never used after the new one is visible);
/// - the [`seen_clock`] tick is the one it was made in, so every flow still reaches its table
///   entry at least once a tick on each CPU: `last_seen` stays current and the LRU sees the
///   flow as used;
/// - its route is as fresh and long enough, as the table's cached route must be.
#[repr(C)]
#[derive(Clone, Copy)]
struct CachedFlow {
    /// The key, as loaded from the packet; `proto_word` 0 marks an empty slot.
    src: u32,
    dst: u32,
    ports: u32,
    proto_word: u32,
    epoch: u64,
    tick: u32,
    fib_stamp: u32,
    nat_addr: u32,
    nat_port: u16,
    fib_len: u16,
    direction: u32,
    backend: u32,
    fib_ifindex: u32,
    fib_mac_tail: u32,
    fib_mac_head: u64,
}

const _: () = assert!(size_of::<CachedFlow>() == 64);

/// The flow cache slot of an IPv4 5-tuple (as loaded from the packet).
#[inline(always)]
fn cache_slot(src: u32, dst: u32, ports: u32) -> u32 {
    let h = (src ^ dst.rotate_left(16) ^ ports).wrapping_mul(0x9e37_79b1);
    h >> (32 - FLOW_CACHE_SLOTS.trailing_zeros())
}

#[inline(always)]
fn flow_epoch() -> u64 {
    match FLOW_EPOCH.get(0) {
        Some(e) => *e,
        None => 0,
    }
}

/// Void every CPU's cached copies (after the insert that made them stale).
#[inline(always)]
fn bump_flow_epoch() {
    if let Some(e) = FLOW_EPOCH.get_ptr_mut(0) {
        // SAFETY: a live, aligned map value; an atomic add (BPF_XADD), its result unused.
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                e, 1,
            )
        };
    }
    count(Stat::FlowReplaced);
}

/// The connection table's entry for an IPv4 5-tuple (words as loaded from the packet).
#[inline(always)]
fn fast_lookup(src: u32, dst: u32, ports: u32, proto_word: u32) -> Option<*mut Flow> {
    // Word by word, as laid out in memory (the ports word is the packet's, as loaded): LLVM
    // would merge the zero words of a struct literal into 64-bit stores at 4-aligned stack
    // offsets, which the verifier refuses; volatile stores are never merged.
    let mut key = core::mem::MaybeUninit::<FlowKey>::uninit();
    let words = [src, 0, 0, 0, dst, 0, 0, 0, ports, proto_word];
    const { assert!(size_of::<FlowKey>() == 40) };
    let w = key.as_mut_ptr() as *mut u32;
    for (i, v) in words.into_iter().enumerate() {
        // SAFETY: ten words inside the 40-byte key, 4-aligned.
        unsafe { w.add(i).write_volatile(v) };
    }
    // SAFETY: all 40 bytes were written above.
    FLOWS.get_ptr_mut(unsafe { key.assume_init_ref() })
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
fn fast_v4(ctx: &XdpContext) -> Option<u32> {
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
    if tot_len < 20 + min || data + FAST_IP + tot_len > end {
        return None;
    }
    let for_service = filter_has(&[dst, 0, 0, 0], FILTER_SERVICE);
    if !for_service && !filter_has(&[src, 0, 0, 0], FILTER_BACKEND) {
        count(Stat::PassNotOurs);
        return Some(xdp_action::XDP_PASS);
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
            let f = fast_lookup(src, dst, ports, proto_word)?;
            // SAFETY: a live map value for the duration of the program.
            let flow = unsafe { &*f };
            // A service's packet on a forward entry, or a backend's on a reverse one.
            if flow.direction != want {
                return None;
            }
            cached_route(f, tot_len as u16, &mut 0)?;
            let r = FastRoute {
                nat_addr: flow.nat_addr[0],
                nat_port: flow.nat_port,
                backend: flow.backend,
                ifindex: flow.fib_ifindex,
                mac_head: flow.fib_mac_head,
                mac_tail: flow.fib_mac_tail,
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
                    (*c).fib_stamp = flow.fib_stamp;
                    (*c).fib_len = flow.fib_len;
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
        let old_check: u16 = fast_read(data, check_off);
        let sum = csum::replace16(
            csum::replace32(csum::start(old_check), old_addr, new_addr),
            old_port,
            route.nat_port,
        );
        if let Some(c) = l4_check(proto, FAMILY_V4, old_check, sum) {
            fast_write(data, check_off, c);
        }
        fast_write(data, addr_off, new_addr);
        fast_write(data, port_off, route.nat_port);
        fast_write(data, FAST_IP + 8, ttl - 1);
        fast_write(data, FAST_IP + 10, ip_check);
        fast_write(data, 0, route.mac_head);
        fast_write(data, 8, route.mac_tail);
    }
    count_backend(route.backend, tot_len as u64, false);
    if !for_service {
        count(Stat::ReverseNat);
    }
    Some(send(ctx, route.ifindex))
}

/// A bounds-checked pointer `off` bytes into the packet; the one place packet memory is reached.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Result<*mut T, ()> {
    let start = ctx.data();
    if start + off + size_of::<T>() > ctx.data_end() {
        return Err(());
    }
    Ok((start + off) as *mut T)
}

#[inline(always)]
fn load<T: Copy>(ctx: &XdpContext, off: usize) -> Result<T, ()> {
    // SAFETY: ptr_at checked the bounds; packet data has no alignment guarantee.
    Ok(unsafe { ptr_at::<T>(ctx, off)?.read_unaligned() })
}

#[inline(always)]
fn store<T: Copy>(ctx: &XdpContext, off: usize, v: T) -> Result<(), ()> {
    // SAFETY: ptr_at checked the bounds; packet data has no alignment guarantee.
    unsafe { ptr_at::<T>(ctx, off)?.write_unaligned(v) };
    Ok(())
}

#[inline(always)]
fn count(stat: Stat) {
    if let Some(c) = GLOBAL_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn count_backend(backend: u32, bytes: u64, new_flow: bool) {
    if let Some(c) = BACKEND_STATS.get_ptr_mut(backend) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            (*c).new_flows += new_flow as u64;
        }
    }
}

/// What a subprogram decided, as a plain integer: subprograms must return in a register (a
/// value returned through memory leaves a stack pointer in R0, which the verifier refuses).
const SUB_PASS: u32 = 0;
const SUB_FORWARD: u32 = 1;
const SUB_MALFORMED: u32 = 2;

#[inline(always)]
fn from_sub(code: u32) -> Result<Verdict, ()> {
    match code {
        SUB_PASS => Ok(Verdict::Pass),
        SUB_FORWARD => Ok(Verdict::Forward(core::ptr::null_mut())),
        _ => Err(()),
    }
}

#[inline(always)]
fn to_sub(r: Result<bool, ()>) -> u32 {
    match r {
        Ok(true) => SUB_FORWARD,
        Ok(false) => SUB_PASS,
        Err(()) => SUB_MALFORMED,
    }
}

/// What to do with a packet: pass it untouched, or forward it (rewritten), using and
/// refreshing the FIB result cached in its flow entry when there is one (else null).
enum Verdict {
    Pass,
    Forward(*mut Flow),
}

/// Where the parsed headers are, and the 5-tuple.
struct Packet {
    vlan: bool,
    l3: usize,
    l4: usize,
    family: u8,
    proto: u8,
    src: [u32; 4],
    dst: [u32; 4],
    /// IP datagram length (what byte counters count).
    len: u32,
}

/// Decide what to do with a parsed packet.
#[inline(always)]
fn classify(ctx: &XdpContext, pkt: &Packet) -> Result<Verdict, ()> {
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

/// Ethernet, one optional 802.1Q tag, IPv4 (any IHL) or IPv6 without extension headers.
/// `Ok(None)` is a packet to pass (fragment, other ethertype); `Err` one that is malformed.
#[inline(always)]
fn parse(ctx: &XdpContext) -> Result<Option<Packet>, ()> {
    let mut l3 = ETH_HLEN;
    let mut ethertype: u16 = load(ctx, 12)?;
    let mut vlan = false;
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
        if tot_len < ihl || ctx.data() + l3 + tot_len > ctx.data_end() {
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
        if ctx.data() + l3 + 40 + plen > ctx.data_end() {
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

#[inline(always)]
fn l4_check_off(proto: u8) -> usize {
    if proto == PROTO_TCP {
        16
    } else {
        6
    }
}

#[inline(always)]
fn l4_packet(ctx: &XdpContext, pkt: &Packet) -> Result<Verdict, ()> {
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
    let key = FlowKey {
        src: pkt.src,
        dst: pkt.dst,
        sport,
        dport,
        proto: pkt.proto,
        family: pkt.family,
        _pad: 0,
    };

    if for_service {
        // Established flows first: one lookup, and they keep their backend whatever the
        // service's table now says.
        if let Some(f) = FLOWS.get_ptr_mut(&key) {
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
                return Ok(Verdict::Forward(f));
            }
        }
        let skey = ServiceKey {
            addr: pkt.dst,
            port: dport,
            proto: pkt.proto,
            family: pkt.family,
        };
        // SAFETY: values are plain data; a concurrent update replaces the element (RCU).
        if let Some(svc) = unsafe { SERVICES.get(&skey) } {
            return from_sub(to_service(ctx, pkt, &key, svc));
        }
    }
    if filter_has(&pkt.src, FILTER_BACKEND) {
        if let Some(f) = FLOWS.get_ptr_mut(&key) {
            // SAFETY: a live map value for the duration of the program.
            let flow = unsafe { &*f };
            if flow.direction == FLOW_REVERSE {
                let tcp = tcp_flags(ctx, pkt)?;
                if mark_closing(f, tcp) {
                    // The backend closed: say so on the forward entry too, which is the one
                    // userspace counts open flows by (a FIN or RST is rare: one more lookup).
                    let fkey = FlowKey {
                        src: pkt.dst,
                        dst: flow.nat_addr,
                        sport: dport,
                        dport: flow.nat_port,
                        proto: pkt.proto,
                        family: pkt.family,
                        _pad: 0,
                    };
                    if let Some(ff) = FLOWS.get_ptr_mut(&fkey) {
                        mark_closing(ff, tcp);
                    }
                }
                rewrite_src(ctx, pkt, &flow.nat_addr, flow.nat_port)?;
                count_backend(flow.backend, bytes, false);
                count(Stat::ReverseNat);
                return Ok(Verdict::Forward(f));
            }
        }
    }
    count(Stat::PassNotOurs);
    Ok(Verdict::Pass)
}

/// The TCP flags byte (0 for UDP); the header was bounds-checked by the caller.
#[inline(always)]
fn tcp_flags(ctx: &XdpContext, pkt: &Packet) -> Result<u32, ()> {
    if pkt.proto == PROTO_TCP {
        Ok(load::<u8>(ctx, pkt.l4 + 13)? as u32)
    } else {
        Ok(0)
    }
}

/// Remember a FIN or RST (rare packets: the common case is one test, no write); true when a
/// new bit was set.
#[inline(always)]
fn mark_closing(f: *mut Flow, tcp: u32) -> bool {
    let bits = tcp & (TCP_FIN | TCP_RST);
    // SAFETY: a live map value for the duration of the program; racing writers only add bits.
    unsafe {
        if bits & !(*f).closing != 0 {
            (*f).closing |= bits;
            return true;
        }
    }
    false
}

/// [`touch`] on paths that do not read the clock for the FIB cache.
#[inline(always)]
fn touch_now(cache: *mut Flow) {
    if !cache.is_null() {
        touch(cache, clock_now());
    }
}

/// Refresh a flow's last-seen time (one store a second per flow, not one per packet).
#[inline(always)]
fn touch(f: *mut Flow, fib_now: u32) {
    let now = seen_clock(fib_now);
    // SAFETY: a live map value for the duration of the program.
    unsafe {
        if (*f).last_seen != now {
            (*f).last_seen = now;
        }
    }
}

#[inline(always)]
fn filter_has(addr: &[u32; 4], bit: u32) -> bool {
    match ADDR_FILTER.get(filter_index(addr)) {
        Some(v) => *v & bit != 0,
        None => false,
    }
}

/// A new flow to a service: pick its backend from the service's live table and track it.
// A real subprogram (not inlined) to keep each frame within the 512-byte BPF stack.
#[inline(never)]
fn to_service(ctx: &XdpContext, pkt: &Packet, key: &FlowKey, svc: &Service) -> u32 {
    to_sub(new_flow(ctx, pkt, key, svc))
}

#[inline(always)]
fn new_flow(ctx: &XdpContext, pkt: &Packet, key: &FlowKey, svc: &Service) -> Result<bool, ()> {
    if svc.flags & SERVICE_PASS_TO_STACK != 0 {
        count(Stat::PassToStack);
        return Ok(false);
    }
    let slot = flow_slot(
        svc.key_mode,
        svc.seed,
        &key.src,
        &key.dst,
        key.sport,
        key.dport,
        key.proto,
        key.family,
    );
    let id = match RINGS.get(svc.ring * TABLE_SIZE + slot) {
        Some(id) if *id != NO_BACKEND => *id,
        _ => {
            count(Stat::NoBackend);
            // Rare, and only written when the daemon logs at debug (AYA_LOG_LEVEL).
            // The target users filter on (`RUST_LOG=ambassador::xdp=debug`), whatever this
            // object's crate is called.
            aya_log_ebpf::debug!(
                ctx,
                target: "ambassador::xdp",
                "service {}: no backend for a new flow (all drained, unhealthy or removed?)",
                svc.id
            );
            return Ok(false);
        }
    };
    let b = match BACKENDS.get(id) {
        Some(b) if b.valid != 0 && b.family == key.family => *b,
        _ => {
            count(Stat::NoBackend);
            return Ok(false);
        }
    };
    track(key, svc, id, &b);
    rewrite_dst(ctx, pkt, &b.addr, b.port)?;
    count_backend(id, pkt.len as u64, true);
    Ok(true)
}

/// Record both directions of a new flow: the forward entry keeps the client on its backend, the
/// reverse entry lets replies be rewritten back to the service address.
#[inline(always)]
fn track(key: &FlowKey, svc: &Service, id: u32, b: &Backend) {
    let rkey = FlowKey {
        src: b.addr,
        dst: key.src,
        sport: b.port,
        dport: key.sport,
        proto: key.proto,
        family: key.family,
        _pad: 0,
    };
    let mut raw = core::mem::MaybeUninit::<Flow>::uninit();
    zero_words(&mut raw);
    // SAFETY: all-zero is a valid Flow (no FIB result cached).
    let flow = unsafe { raw.assume_init_mut() };
    flow.nat_addr = key.dst;
    flow.nat_port = key.dport;
    flow.direction = FLOW_REVERSE;
    flow.last_seen = seen_clock(clock_now());
    flow.backend = id;
    flow.service = svc.id;
    let (mut failed, mut replaced) = insert_flow(&rkey, flow);
    flow.nat_addr = b.addr;
    flow.nat_port = b.port;
    flow.direction = FLOW_FORWARD;
    let (f, r) = insert_flow(key, flow);
    failed |= f;
    replaced |= r;
    if failed {
        count(Stat::FlowInsertFailed);
    }
    if replaced {
        // After the inserts: a CPU that read the old epoch may have copied the old entry;
        // one that reads the new epoch finds the new entry.
        bump_flow_epoch();
    }
    count(Stat::NewFlow);
}

/// Insert a flow entry: (failed, replaced an entry of the same key).
#[inline(always)]
fn insert_flow(key: &FlowKey, flow: &Flow) -> (bool, bool) {
    const BPF_NOEXIST: u64 = 1;
    if FLOWS.insert(key, flow, BPF_NOEXIST).is_ok() {
        return (false, false);
    }
    // The key was tracked (or the table refused it; then this fails too).
    (FLOWS.insert(key, flow, 0).is_err(), true)
}

/// Rewrite the destination address and port, updating IPv4 and L4 checksums incrementally.
#[inline(always)]
fn rewrite_dst(ctx: &XdpContext, pkt: &Packet, addr: &[u32; 4], port: u16) -> Result<(), ()> {
    let (addr_off, port_off) = if pkt.family == FAMILY_V4 {
        (pkt.l3 + 16, pkt.l4 + 2)
    } else {
        (pkt.l3 + 24, pkt.l4 + 2)
    };
    rewrite(ctx, pkt, addr_off, &pkt.dst, addr, port_off, port)
}

/// Rewrite the source address and port, updating IPv4 and L4 checksums incrementally.
#[inline(always)]
fn rewrite_src(ctx: &XdpContext, pkt: &Packet, addr: &[u32; 4], port: u16) -> Result<(), ()> {
    let addr_off = if pkt.family == FAMILY_V4 {
        pkt.l3 + 12
    } else {
        pkt.l3 + 8
    };
    rewrite(ctx, pkt, addr_off, &pkt.src, addr, pkt.l4, port)
}

#[inline(always)]
fn rewrite(
    ctx: &XdpContext,
    pkt: &Packet,
    addr_off: usize,
    old_addr: &[u32; 4],
    addr: &[u32; 4],
    port_off: usize,
    port: u16,
) -> Result<(), ()> {
    let check_off = pkt.l4 + l4_check_off(pkt.proto);
    let old_port: u16 = load(ctx, port_off)?;
    let old_check: u16 = load(ctx, check_off)?;
    // The L4 checksum covers the pseudo-header addresses and the port.
    let mut l4 = csum::replace16(csum::start(old_check), old_port, port);
    if pkt.family == FAMILY_V4 {
        l4 = csum::replace32(l4, old_addr[0], addr[0]);
        let ip_check: u16 = load(ctx, pkt.l3 + 10)?;
        let ip = csum::replace32(csum::start(ip_check), old_addr[0], addr[0]);
        store(ctx, pkt.l3 + 10, csum::finish(ip))?;
        store(ctx, addr_off, addr[0])?;
    } else {
        l4 = csum::replace32(l4, old_addr[0], addr[0]);
        l4 = csum::replace32(l4, old_addr[1], addr[1]);
        l4 = csum::replace32(l4, old_addr[2], addr[2]);
        l4 = csum::replace32(l4, old_addr[3], addr[3]);
        store(ctx, addr_off, *addr)?;
    }
    store(ctx, port_off, port)?;
    if let Some(c) = l4_check(pkt.proto, pkt.family, old_check, l4) {
        store(ctx, check_off, c)?;
    }
    Ok(())
}

/// The new L4 checksum field from a running sum, or `None` to leave the field as it is: a zero
/// UDP checksum over IPv4 means "none", and a computed zero is sent as 0xffff (RFC 768).
#[inline(always)]
fn l4_check(proto: u8, family: u8, old_check: u16, sum: u64) -> Option<u16> {
    if proto == PROTO_UDP && old_check == 0 && family == FAMILY_V4 {
        return None;
    }
    let c = csum::finish(sum);
    Some(if proto == PROTO_UDP && c == 0 {
        0xffff
    } else {
        c
    })
}

/// Count a forwarded packet and send it out of `ifindex`: back out of the port it came in on,
/// or redirected to another.
#[inline(always)]
fn send(ctx: &XdpContext, ifindex: u32) -> u32 {
    count(Stat::Forwarded);
    if ifindex == ctx.ingress_ifindex() as u32 {
        xdp_action::XDP_TX
    } else {
        // SAFETY: plain helper call; the ifindex came from the FIB (or its cached result).
        unsafe { bpf_redirect(ifindex, 0) as u32 }
    }
}

/// Send a rewritten packet on its way: the FIB picks the egress and next hop; whatever the FIB
/// cannot resolve here (no neighbour entry yet, MTU exceeded, TTL expiring, VLAN) goes to the
/// stack, which routes it and answers with the proper ICMP. A flow entry (`cache`, or null)
/// keeps the FIB result for `FIB_CACHE_JIFFIES`, for packets no longer than one it was checked
/// for, so established flows skip the lookup.
#[inline(never)]
fn forward(ctx: &XdpContext, pkt: &Packet, cache: *mut Flow) -> u32 {
    match route(ctx, pkt, cache) {
        Ok(action) => action,
        Err(()) => {
            count(Stat::PassUnparsed);
            xdp_action::XDP_PASS
        }
    }
}

/// A byte-swapped u16 as a length the verifier can bound. Kernels before 6.3 or so do not
/// track the range of a `be16` result, and refuse adding it to a packet pointer ("math between
/// pkt pointer and register with unbounded min value"); an explicit check on a value the
/// compiler cannot see through (so cannot drop as always false) gives them the bound.
#[inline(always)]
fn bounded_u16(v: u16) -> Result<usize, ()> {
    let v = core::hint::black_box(v as usize);
    if v > 0xffff {
        return Err(());
    }
    Ok(v)
}

fn route(ctx: &XdpContext, pkt: &Packet, cache: *mut Flow) -> Result<u32, ()> {
    if pkt.vlan {
        touch_now(cache);
        count(Stat::NatThenStack);
        return Ok(xdp_action::XDP_PASS);
    }
    let (ttl_off, ip_len) = if pkt.family == FAMILY_V4 {
        (pkt.l3 + 8, u16::from_be(load::<u16>(ctx, pkt.l3 + 2)?))
    } else {
        (
            pkt.l3 + 7,
            u16::from_be(load::<u16>(ctx, pkt.l3 + 4)?).wrapping_add(40),
        )
    };
    let ttl: u8 = load(ctx, ttl_off)?;
    if ttl <= 1 {
        touch_now(cache);
        count(Stat::NatThenStack);
        return Ok(xdp_action::XDP_PASS);
    }
    let mut now = 0;
    let ifindex = match cached_route(cache, ip_len, &mut now) {
        Some(f) => {
            // SAFETY: a live map value for the duration of the program.
            let (head, tail) = unsafe { ((*f).fib_mac_head, (*f).fib_mac_tail) };
            store(ctx, 0, head)?;
            store(ctx, 8, tail)?;
            // SAFETY: as above.
            unsafe { (*f).fib_ifindex }
        }
        None => {
            let mut raw = core::mem::MaybeUninit::<FibParams>::uninit();
            fib_params(ctx, pkt, ip_len, &mut raw)?;
            // Used in place: `assume_init()` would copy it, and part of the copy becomes a
            // byte-loop memset call.
            let fib = raw.as_mut_ptr();
            // SAFETY: fib points to a live, fully written bpf_fib_lookup struct on our stack.
            let rc =
                unsafe { bpf_fib_lookup(ctx.ctx.cast(), fib, size_of::<FibParams>() as i32, 0) };
            if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
                count(Stat::NatThenStack);
                return Ok(xdp_action::XDP_PASS);
            }
            // The MACs go to the packet first, and from there to the cache: both may be
            // misaligned, the stack may not (the verifier insists), so they never sit there.
            // SAFETY: fully written by fib_params and the helper.
            let (d, s) = unsafe { (mac_words(&(*fib).dmac), mac_words(&(*fib).smac)) };
            store(ctx, 0, d)?;
            store(ctx, 6, s)?;
            if !cache.is_null() {
                let (head, tail): (u64, u32) = (load(ctx, 0)?, load(ctx, 8)?);
                // SAFETY: a live map value (concurrent writers store the same route), and our
                // fully written stack struct.
                unsafe {
                    (*cache).fib_ifindex = (*fib).ifindex;
                    (*cache).fib_stamp = now;
                    (*cache).fib_len = ip_len;
                    (*cache).fib_mac_head = head;
                    (*cache).fib_mac_tail = tail;
                }
            }
            // SAFETY: as above.
            unsafe { (*fib).ifindex }
        }
    };
    // We are routing: one hop less.
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
    Ok(send(ctx, ifindex))
}

#[inline(always)]
fn fib_cache_jiffies() -> u32 {
    // SAFETY: a read of our own read-only global; volatile so the loader's value is read, not
    // the default folded at compile time.
    unsafe { core::ptr::read_volatile(&FIB_CACHE_JIFFIES) }
}

/// `cache` if it holds a fresh route checked for packets this long; sets `now` when it had to
/// read the clock.
#[inline(always)]
fn cached_route(cache: *mut Flow, ip_len: u16, now: &mut u32) -> Option<*mut Flow> {
    if cache.is_null() {
        return None;
    }
    *now = clock_now();
    touch(cache, *now);
    // SAFETY: a live map value for the duration of the program.
    let f = unsafe { &*cache };
    if f.fib_ifindex != 0
        && now.wrapping_sub(f.fib_stamp) < fib_cache_jiffies()
        && ip_len <= f.fib_len
    {
        Some(cache)
    } else {
        None
    }
}

/// Zero a stack struct with 32-bit stores. BPF has no `memset`: LLVM turns a zeroed struct, or
/// even adjacent zero fields, into a call to a byte loop; volatile stores are never merged.
#[inline(always)]
pub(crate) fn zero_words<T>(raw: &mut core::mem::MaybeUninit<T>) {
    const { assert!(size_of::<T>() % 4 == 0 && core::mem::align_of::<T>() >= 4) };
    let w = raw.as_mut_ptr() as *mut u32;
    for i in 0..size_of::<T>() / 4 {
        // SAFETY: within the struct, aligned (asserted above).
        unsafe { w.add(i).write_volatile(0) };
    }
}

/// Fill `raw` with the FIB query for a packet: zeroed, then the fields set in place.
#[inline(always)]
fn fib_params(
    ctx: &XdpContext,
    pkt: &Packet,
    ip_len: u16,
    raw: &mut core::mem::MaybeUninit<FibParams>,
) -> Result<(), ()> {
    zero_words(raw);
    let fib = raw.as_mut_ptr();
    // SAFETY: every byte was just zeroed; plain field writes into our own stack struct.
    unsafe {
        (*fib).l4_protocol = pkt.proto;
        (*fib).ifindex = ctx.ingress_ifindex() as u32;
        (*fib).__bindgen_anon_1.tot_len = ip_len;
        if pkt.family == FAMILY_V4 {
            (*fib).family = AF_INET;
            (*fib).__bindgen_anon_2.tos = load::<u8>(ctx, pkt.l3 + 1)?;
            (*fib).__bindgen_anon_3.ipv4_src = load::<u32>(ctx, pkt.l3 + 12)?;
            (*fib).__bindgen_anon_4.ipv4_dst = load::<u32>(ctx, pkt.l3 + 16)?;
        } else {
            (*fib).family = AF_INET6;
            // Word by word: an array copy here becomes a byte-loop memmove call.
            for i in 0..4 {
                (*fib).__bindgen_anon_3.ipv6_src[i] = load::<u32>(ctx, pkt.l3 + 8 + 4 * i)?;
                (*fib).__bindgen_anon_4.ipv6_dst[i] = load::<u32>(ctx, pkt.l3 + 24 + 4 * i)?;
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

/// An ICMP/ICMPv6 error quoting a packet of a tracked flow is translated like the flow, so
/// path-MTU discovery and unreachables work through the ambassador. The quoted packet went out
/// *from* us, so its reversed tuple is the key of the entry that produced it:
/// - a forward entry (we sent service → client on behalf of the backend): the quote's source
///   becomes the backend again, and an error addressed to the service address goes to the backend;
/// - a reverse entry (we sent client → backend): the quote's destination becomes the service
///   address again, and the error continues to the client.
#[inline(never)]
fn icmp_error(ctx: &XdpContext, pkt: &Packet) -> u32 {
    to_sub(translate_icmp_error(ctx, pkt))
}

#[inline(always)]
fn translate_icmp_error(ctx: &XdpContext, pkt: &Packet) -> Result<bool, ()> {
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
            load::<u8>(ctx, il3 + 9)?,
            [s, 0, 0, 0],
            [d, 0, 0, 0],
            il3 + 12,
            il3 + 16,
        )
    } else {
        (
            il3 + 40,
            load::<u8>(ctx, il3 + 6)?,
            load::<[u32; 4]>(ctx, il3 + 8)?,
            load::<[u32; 4]>(ctx, il3 + 24)?,
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
    let key = FlowKey {
        src: idst,
        dst: isrc,
        sport: idport,
        dport: isport,
        proto: iproto,
        family: pkt.family,
        _pad: 0,
    };
    // SAFETY: values are plain data read once.
    let flow = match unsafe { FLOWS.get(&key) } {
        Some(f) => *f,
        None => {
            count(Stat::PassNotOurs);
            return Ok(false);
        }
    };
    let (addr_off, old_addr, port_off) = if flow.direction == FLOW_FORWARD {
        (isrc_off, isrc, il4)
    } else {
        (idst_off, idst, il4 + 2)
    };
    let old_port: u16 = load(ctx, port_off)?;
    let icmp_check: u16 = load(ctx, pkt.l4 + 2)?;
    let mut ic = csum::replace16(csum::start(icmp_check), old_port, flow.nat_port);
    store(ctx, port_off, flow.nat_port)?;
    ic = replace_addr(ctx, pkt.family, ic, addr_off, &old_addr, &flow.nat_addr)?;
    if pkt.family == FAMILY_V4 {
        // The quoted IPv4 header's own checksum changes too, and the ICMP checksum covers it.
        let iold: u16 = load(ctx, il3 + 10)?;
        let inew = csum::finish(csum::replace32(
            csum::start(iold),
            old_addr[0],
            flow.nat_addr[0],
        ));
        store(ctx, il3 + 10, inew)?;
        ic = csum::replace16(ic, iold, inew);
    }
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
            ic = replace_addr(ctx, pkt.family, ic, dst_off, &pkt.dst, &flow.nat_addr)?;
        }
    }
    store(ctx, pkt.l4 + 2, csum::finish(ic))?;
    count(Stat::IcmpTranslated);
    Ok(true)
}

#[inline(always)]
fn replace_addr(
    ctx: &XdpContext,
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
