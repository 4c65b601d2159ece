//! The connection table: tracking a new flow in both directions, finding an established
//! one, and each CPU's flow cache in front of the table.

use ambassador_ebpf::{
    seen_clock, Backend, Flow, FlowKey, Service, Stat, FLOW_FORWARD, FLOW_REVERSE, TCP_FIN, TCP_RST,
};
use core::mem::size_of;

use crate::maps::{clock_now, count, FLOWS, FLOW_EPOCH};

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

/// The connection table's entry for an IPv4 5-tuple (words as loaded from the packet).
#[inline(always)]
pub(crate) fn fast_lookup(src: u32, dst: u32, ports: u32, proto_word: u32) -> Option<*mut Flow> {
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
pub(crate) fn zero_words<T>(raw: &mut core::mem::MaybeUninit<T>) {
    const { assert!(size_of::<T>() % 4 == 0 && core::mem::align_of::<T>() >= 4) };
    let w = raw.as_mut_ptr() as *mut u32;
    for i in 0..size_of::<T>() / 4 {
        // SAFETY: within the struct, aligned (asserted above).
        unsafe { w.add(i).write_volatile(0) };
    }
}

/// Record both directions of a new flow: the forward entry keeps the client on its backend, the
/// reverse entry lets replies be rewritten back to the service address.
#[inline(always)]
pub(crate) fn track(key: &FlowKey, svc: &Service, id: u32, b: &Backend) {
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
