//! The connection table: tracking a new flow (one entry its replies also find), finding an established
//! one, and each CPU's flow cache in front of the table.

use ambassador_ebpf::{
    seen_clock, Backend, Flow, FlowKey, Route, Service, Stat, BACKEND_SHARED, FLOW_FORWARD,
    FLOW_REVERSE, MAX_FRONTENDS, TCP_FIN, TCP_RST,
};
use aya_ebpf::maps::LruHashMap;
use core::mem::{size_of, MaybeUninit};

use crate::maps::{
    clock_now, count, flood_limit, scratch, FLOOD_FLOWS, FLOOD_RATE, FLOOD_SEEN, FLOWS, FLOW_EPOCH,
    REPLY_NAT,
};

/// Slots of each CPU's flow cache (a power of two; 64 bytes each, 256 KiB a CPU).
pub(crate) const FLOW_CACHE_SLOTS: u32 = 4096;

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
pub(crate) struct CachedFlow {
    /// The key, as loaded from the packet; `proto_word` 0 marks an empty slot.
    pub(crate) src: u32,
    pub(crate) dst: u32,
    pub(crate) ports: u32,
    pub(crate) proto_word: u32,
    pub(crate) epoch: u64,
    pub(crate) tick: u32,
    pub(crate) fib_stamp: u32,
    pub(crate) nat_addr: u32,
    pub(crate) nat_port: u16,
    pub(crate) fib_len: u16,
    pub(crate) direction: u32,
    pub(crate) backend: u32,
    pub(crate) fib_ifindex: u32,
    pub(crate) fib_mac_tail: u32,
    pub(crate) fib_mac_head: u64,
}

const _: () = assert!(size_of::<CachedFlow>() == 64);

/// The flow cache slot of an IPv4 5-tuple (as loaded from the packet).
#[inline(always)]
pub(crate) fn cache_slot(src: u32, dst: u32, ports: u32) -> u32 {
    let h = (src ^ dst.rotate_left(16) ^ ports).wrapping_mul(0x9e37_79b1);
    h >> (32 - FLOW_CACHE_SLOTS.trailing_zeros())
}

#[inline(always)]
pub(crate) fn flow_epoch() -> u64 {
    match FLOW_EPOCH.get(0) {
        Some(e) => *e,
        None => 0,
    }
}

/// Void every CPU's cached copies (after the insert that made them stale).
#[inline(always)]
pub(crate) fn bump_flow_epoch() {
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

/// A flow key written word by word, as laid out in memory (`ports` is the packet's ports word,
/// as loaded): LLVM would merge the zero words of a struct literal into 64-bit stores at
/// 4-aligned stack offsets, which the verifier refuses; volatile stores are never merged. Into
/// the caller's key, not returned: the copy of a returned key would be merged all the same.
#[inline(always)]
pub(crate) fn key_words<'a>(
    key: &'a mut FlowKey,
    src: &[u32; 4],
    dst: &[u32; 4],
    ports: u32,
    proto_word: u32,
) -> &'a FlowKey {
    let words = [
        src[0], src[1], src[2], src[3], dst[0], dst[1], dst[2], dst[3], ports, proto_word,
    ];
    const { assert!(size_of::<FlowKey>() == 40) };
    let w = key as *mut FlowKey as *mut u32;
    for (i, v) in words.into_iter().enumerate() {
        // SAFETY: ten words inside the 40-byte key, 4-aligned.
        unsafe { w.add(i).write_volatile(v) };
    }
    key
}

/// The ports word of a key, as a packet's would load: source port first.
#[inline(always)]
pub(crate) fn ports_word(sport: u16, dport: u16) -> u32 {
    let [a, b] = sport.to_ne_bytes();
    let [c, d] = dport.to_ne_bytes();
    u32::from_ne_bytes([a, b, c, d])
}

/// The protocol word of a key (protocol, family, padding).
#[inline(always)]
pub(crate) fn proto_word(proto: u8, family: u8) -> u32 {
    u32::from_ne_bytes([proto, family, 0, 0])
}

/// Ticks after the last diverted flow during which lookups also try `FLOOD_FLOWS` (a few
/// minutes at any `HZ`: 17 at HZ 250): a flow tracked there during a flood and still alive
/// after is re-picked from the current table on its next packet (and counted).
const FLOOD_LINGER_TICKS: u32 = 1024;

/// Whether a flood was seen within [`FLOOD_LINGER_TICKS`].
#[inline(always)]
fn flood_recent() -> bool {
    match FLOOD_SEEN.get(0) {
        Some(&seen) if seen != 0 => {
            seen_clock(clock_now()).wrapping_sub(seen.wrapping_sub(1)) < FLOOD_LINGER_TICKS
        }
        _ => false,
    }
}

/// The tracked entry of a 5-tuple: the connection table, then the flood table while a flood
/// was seen recently.
#[inline(always)]
pub(crate) fn lookup(key: &FlowKey) -> Option<*mut Flow> {
    if let Some(f) = FLOWS.get_ptr_mut(key) {
        return Some(f);
    }
    if flood_recent() {
        return FLOOD_FLOWS.get_ptr_mut(key);
    }
    None
}

#[inline(always)]
fn same_addr(a: &[u32; 4], b: &[u32; 4]) -> bool {
    // Word by word: an array comparison becomes a `bcmp` call, which BPF does not have.
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]
}

/// The flow a reply belongs to, and the service address it is rewritten to come from.
pub(crate) struct Reply {
    pub(crate) flow: *mut Flow,
    pub(crate) nat_addr: [u32; 4],
    pub(crate) nat_port: u16,
}

/// [`reply_lookup`] as a subprogram of its own, for the general path, whose frame is the one
/// every other subprogram's is stacked on (the 512-byte stack holds the deepest chain of
/// frames): 1 when found, with the answer in `out`. Integers and pointers in and out, which
/// subprograms pass in registers.
#[inline(never)]
pub(crate) fn reply_lookup_sub(
    out: &mut MaybeUninit<Reply>,
    src: &[u32; 4],
    dst: &[u32; 4],
    ports: u32,
    pw: u32,
) -> u32 {
    let [s0, s1, d0, d1] = ports.to_ne_bytes();
    let (sport, dport) = (u16::from_ne_bytes([s0, s1]), u16::from_ne_bytes([d0, d1]));
    let [proto, family, _, _] = pw.to_ne_bytes();
    match reply_lookup(src, dst, sport, dport, proto, family) {
        Some(r) => {
            out.write(r);
            1
        }
        None => 0,
    }
}

/// The flow of a packet from a backend (`src`:`sport`) to a client (`dst`:`dport`): for each
/// service address the backend answers for (`REPLY_NAT`, one for nearly every backend), the
/// client's own entry, if it was sent to this backend; for a [`BACKEND_SHARED`] backend, its
/// reverse entry. `None`: not a reply we made (the backend talking to someone directly).
/// Inlined into the straight-line path and ICMP errors, whose frames have room for it.
#[inline(always)]
pub(crate) fn reply_lookup(
    src: &[u32; 4],
    dst: &[u32; 4],
    sport: u16,
    dport: u16,
    proto: u8,
    family: u8,
) -> Option<Reply> {
    let sc = scratch()?;
    // SAFETY: this CPU's scratch slot, ours for the duration of the program (see Scratch).
    let (ep, probe) = unsafe { (&raw mut (*sc).endpoint, &raw mut (*sc).probe) };
    // SAFETY: fields of a live map value; plain stores.
    unsafe {
        (*ep).addr = *src;
        (*ep).port = sport;
        (*ep).proto = proto;
        (*ep).family = family;
    }
    // SAFETY: map values are plain data, and a concurrent update replaces the element (RCU).
    let r = unsafe { REPLY_NAT.get(&*ep) }?;
    let pw = proto_word(proto, family);
    for i in 0..MAX_FRONTENDS {
        if i as u32 >= r.count {
            break;
        }
        let fe = &r.frontends[i];
        // SAFETY: probe is our scratch key (see above).
        if let Some(f) = lookup(key_words(
            unsafe { &mut *probe },
            dst,
            &fe.addr,
            ports_word(dport, fe.port),
            pw,
        )) {
            // SAFETY: a live map value for the duration of the program.
            let flow = unsafe { &*f };
            if flow.direction == FLOW_FORWARD
                && flow.nat_port == sport
                && same_addr(&flow.nat_addr, src)
            {
                return Some(Reply {
                    flow: f,
                    nat_addr: fe.addr,
                    nat_port: fe.port,
                });
            }
        }
    }
    if r.flags & BACKEND_SHARED as u32 != 0 {
        // SAFETY: as above.
        let key = key_words(
            unsafe { &mut *probe },
            src,
            dst,
            ports_word(sport, dport),
            pw,
        );
        if let Some(f) = lookup(key) {
            // SAFETY: a live map value for the duration of the program.
            let flow = unsafe { &*f };
            if flow.direction == FLOW_REVERSE {
                return Some(Reply {
                    flow: f,
                    nat_addr: flow.nat_addr,
                    nat_port: flow.nat_port,
                });
            }
        }
    }
    None
}

/// The route cached in a flow for packets of `direction`.
#[inline(always)]
pub(crate) fn route_of(f: *mut Flow, direction: u32) -> *mut Route {
    // SAFETY: field addresses within a live map value; nothing is read.
    unsafe {
        if direction == FLOW_FORWARD {
            &raw mut (*f).to_backend
        } else {
            &raw mut (*f).to_client
        }
    }
}

/// Remember a FIN or RST (rare packets: the common case is one test, no write); true when a
/// new bit was set.
#[inline(always)]
pub(crate) fn mark_closing(f: *mut Flow, tcp: u32) -> bool {
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
pub(crate) fn touch_now(cache: *mut Flow) {
    if !cache.is_null() {
        touch(cache, clock_now());
    }
}

/// Refresh a flow's last-seen time (one store a second per flow, not one per packet).
#[inline(always)]
pub(crate) fn touch(f: *mut Flow, fib_now: u32) {
    let now = seen_clock(fib_now);
    // SAFETY: a live map value for the duration of the program.
    unsafe {
        if (*f).last_seen != now {
            (*f).last_seen = now;
        }
    }
}

/// Zero a stack struct with 32-bit stores. BPF has no `memset`: LLVM turns a zeroed struct, or
/// even adjacent zero fields, into a call to a byte loop; volatile stores are never merged.
#[inline(always)]
pub(crate) fn zero_words<T>(raw: &mut MaybeUninit<T>) {
    const { assert!(size_of::<T>() % 4 == 0 && core::mem::align_of::<T>() >= 4) };
    let w = raw.as_mut_ptr() as *mut u32;
    for i in 0..size_of::<T>() / 4 {
        // SAFETY: within the struct, aligned (asserted above).
        unsafe { w.add(i).write_volatile(0) };
    }
}

/// Whether this CPU is flooded, which sends its new flows to the flood table: its new flows in
/// this tick, counting this one, or in the tick before, reached its share ([`flood_limit`]).
/// So a flood puts at most one tick's share into the connection table, at its start, and
/// none after while it lasts (the kernel's LRU is approximate: a table churned tick after tick
/// evicts a few entries refreshed every tick, measured with a flood spread over many ticks).
#[inline(always)]
fn divert_to_flood() -> bool {
    let Some(r) = FLOOD_RATE.get_ptr_mut(0) else {
        return false;
    };
    let tick = seen_clock(clock_now());
    let limit = flood_limit();
    // SAFETY: this CPU's slot, no concurrent writer.
    let flooded = unsafe {
        if (*r).tick != tick {
            (*r).prev = if (*r).tick.wrapping_add(1) == tick {
                (*r).count
            } else {
                0
            };
            (*r).tick = tick;
            (*r).count = 0;
        }
        (*r).count = (*r).count.saturating_add(1);
        (*r).count > limit || (*r).prev >= limit
    };
    if !flooded {
        return false;
    }
    if let Some(seen) = FLOOD_SEEN.get_ptr_mut(0) {
        // SAFETY: a live map value; racing CPUs store the same tick. Written once a tick.
        unsafe {
            if *seen != tick.wrapping_add(1) {
                *seen = tick.wrapping_add(1);
            }
        }
    }
    count(Stat::FloodDiverted);
    true
}

/// Record a new flow: one entry, keyed by the client's packets, which replies also find (see
/// [`reply_lookup`]); a flow to a [`BACKEND_SHARED`] backend has a reverse entry too. It goes to
/// the connection table, or to the flood table while this CPU is flooded;
/// `replacing` (a closed flow's 5-tuple reused) always goes to the connection table, where
/// lookups would find the old entry first.
#[inline(always)]
pub(crate) fn track(key: &FlowKey, svc: &Service, id: u32, b: &Backend, replacing: bool) {
    let Some(sc) = scratch() else {
        count(Stat::FlowInsertFailed);
        return;
    };
    // SAFETY: this CPU's scratch slot, ours for the duration of the program (see Scratch);
    // all-zero is a valid Flow (no route cached), and zero_words writes every byte.
    let (flow, rkey) = unsafe {
        let f = &raw mut (*sc).flow;
        zero_words(&mut *(f as *mut MaybeUninit<Flow>));
        (&mut *f, &mut (*sc).probe)
    };
    flow.nat_addr = b.addr;
    flow.nat_port = b.port;
    flow.direction = FLOW_FORWARD;
    flow.last_seen = seen_clock(clock_now());
    flow.backend = id;
    flow.service = svc.id;
    let flood = !replacing && divert_to_flood();
    let table = if flood { &FLOOD_FLOWS } else { &FLOWS };
    let (mut failed, mut replaced) = insert_flow(table, key, flow);
    if b.flags & BACKEND_SHARED != 0 {
        *rkey = FlowKey {
            src: b.addr,
            dst: key.src,
            sport: b.port,
            dport: key.sport,
            proto: key.proto,
            family: key.family,
            _pad: 0,
        };
        flow.nat_addr = key.dst;
        flow.nat_port = key.dport;
        flow.direction = FLOW_REVERSE;
        let (f, r) = insert_flow(table, rkey, flow);
        failed |= f;
        replaced |= r;
    }
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
fn insert_flow(table: &LruHashMap<FlowKey, Flow>, key: &FlowKey, flow: &Flow) -> (bool, bool) {
    const BPF_NOEXIST: u64 = 1;
    if table.insert(key, flow, BPF_NOEXIST).is_ok() {
        return (false, false);
    }
    // The key was tracked (or the table refused it; then this fails too).
    (table.insert(key, flow, 0).is_err(), true)
}
