//! The maps of the XDP and TC programs (one set: both programs of one object use the same
//! maps, so a flow whose requests arrive through XDP can have its replies come back through
//! TC, and the reverse), the loader-set globals, and the counters. The layout is documented in
//! `lib.rs`.

use ambassador_ebpf::{
    fib_clock, filter_index, Backend, Counters, Flow, FlowKey, ReplyNat, Service, ServiceKey, Stat,
    FILTER_SIZE, FLOW_TABLE_SIZE, MAX_BACKENDS, MAX_REPLY_NAT, MAX_SERVICES, MAX_XDP_EGRESS,
    STAT_COUNT, TABLE_SIZE,
};
use aya_ebpf::{
    helpers::bpf_jiffies64,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};

use crate::flow::{CachedFlow, FLOW_CACHE_SLOTS};

#[map]
pub(crate) static SERVICES: HashMap<ServiceKey, Service> =
    HashMap::with_max_entries(MAX_SERVICES, 0);
#[map]
pub(crate) static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);
#[map]
pub(crate) static RINGS: Array<u32> = Array::with_max_entries(2 * MAX_SERVICES * TABLE_SIZE, 0);
/// The connection table: one entry per flow (see [`Flow`]). The kernel's common LRU (per-CPU
/// free lists refilled in batches from one shared list), chosen by `cargo xtask bench xdp`,
/// which times parse + one insert into both flavours (262,144 entries, 40-byte key, 88-byte
/// value): emptied, common 390 ns and per-CPU lists (`BPF_F_NO_COMMON_LRU`) 347 ns; full, every
/// insert evicting, common 553 ns and per-CPU lists 670 ns. A busy node sits in the full state,
/// and per-CPU lists also give each CPU only its share of the entries, so a node whose flows
/// land on one CPU would track a fraction of them. One table, not one per CPU as Katran has:
/// a flow's replies may arrive on another CPU (through TC on a veth) than its requests.
#[map]
pub(crate) static FLOWS: LruHashMap<FlowKey, Flow> =
    LruHashMap::with_max_entries(FLOW_TABLE_SIZE, 0);
/// While a CPU is flooded (its new flows in this tick or the last reached [`flood_limit`]), its
/// new flows are tracked here instead of in `FLOWS`, so a flood of new flows (SYNs from random
/// sources, say) churns this table and not the established flows in `FLOWS`.
/// Looked up only while a flood was seen recently ([`FLOOD_SEEN`]). The loader sizes it to a
/// quarter of `FLOWS`.
#[map]
pub(crate) static FLOOD_FLOWS: LruHashMap<FlowKey, Flow> =
    LruHashMap::with_max_entries(FLOW_TABLE_SIZE / 4, 0);
/// Each CPU's count of new flows in the current and the previous tick.
#[map]
pub(crate) static FLOOD_RATE: PerCpuArray<FloodRate> = PerCpuArray::with_max_entries(1, 0);
/// The last tick ([`ambassador_ebpf::seen_clock`]) a new flow went to `FLOOD_FLOWS`, plus one
/// (0: never).
#[map]
pub(crate) static FLOOD_SEEN: Array<u32> = Array::with_max_entries(1, 0);
/// Backend address:port → the service addresses it answers for: how a reply finds its flow's
/// one entry (keyed by the client's tuple) without a reverse entry per flow.
#[map]
pub(crate) static REPLY_NAT: HashMap<ServiceKey, ReplyNat> =
    HashMap::with_max_entries(MAX_REPLY_NAT, 0);
/// Each CPU's flow cache: see [`CachedFlow`].
#[map]
pub(crate) static FLOW_CACHE: PerCpuArray<CachedFlow> =
    PerCpuArray::with_max_entries(FLOW_CACHE_SLOTS, 0);
/// Bumped after a new flow replaces a tracked entry: every cached copy made before is void.
#[map]
pub(crate) static FLOW_EPOCH: Array<u64> = Array::with_max_entries(1, 0);
#[map]
pub(crate) static ADDR_FILTER: Array<u32> = Array::with_max_entries(FILTER_SIZE, 0);
/// Interfaces the XDP program may redirect to (ifindex → 1): those it is attached to, whose
/// drivers take XDP frames. Written by the daemon as it attaches.
#[map]
pub(crate) static XDP_EGRESS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_XDP_EGRESS, 0);
#[map]
static BACKEND_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);
#[map]
static GLOBAL_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

/// How long a FIB result cached in a flow is used before it is looked up again, in jiffies:
/// bounds how long a flow follows a stale neighbour. The loader sets it to `HZ` (one second);
/// a read-only global, so the verifier folds it into the comparison.
#[unsafe(no_mangle)]
static FIB_CACHE_JIFFIES: u32 = 250;

/// Each CPU's scratch space for the general path's keys and new entries: the 512-byte BPF stack
/// holds the deepest chain of subprogram frames, and keys on it would overflow that chain (as
/// Cilium keeps large temporaries in per-CPU maps). One user of each field at a time:
/// - `key`: the packet's 5-tuple on the general path (or the quoted one in an ICMP error);
/// - `probe` and `endpoint`: [`crate::flow::reply_lookup`]'s keys; `probe` is also
///   [`crate::flow::track`]'s reverse key (no reply is looked up while a flow is tracked);
/// - `flow`: the entry [`crate::flow::track`] inserts.
///
/// The programs run in softirq context, one at a time on a CPU, so nothing else writes a CPU's
/// slot while a packet uses it.
#[repr(C)]
pub(crate) struct Scratch {
    pub(crate) key: FlowKey,
    pub(crate) probe: FlowKey,
    pub(crate) endpoint: ServiceKey,
    pub(crate) _pad: u32,
    pub(crate) flow: Flow,
}

#[map]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's scratch space (`None` never happens: the array has its one slot).
#[inline(always)]
pub(crate) fn scratch() -> Option<*mut Scratch> {
    SCRATCH.get_ptr_mut(0)
}

/// New flows each CPU may start in one tick before it counts as flooded. The loader sets it to
/// a quarter of the table split over the CPUs. A flooded CPU (this tick's new flows or the
/// last tick's reached it) sends every new flow to `FLOOD_FLOWS`, so a flood, however long,
/// puts at most one tick's share into `FLOWS`. A read-only global.
#[unsafe(no_mangle)]
static FLOOD_INSERTS_PER_TICK: u32 = FLOW_TABLE_SIZE / 8;

/// A CPU's new flows in the current tick and in the one before it.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct FloodRate {
    pub(crate) tick: u32,
    pub(crate) count: u32,
    /// The previous tick's count, when that tick was the one just before `tick` (else 0).
    pub(crate) prev: u32,
}

#[inline(always)]
pub(crate) fn flood_limit() -> u32 {
    // SAFETY: a read of our own read-only global, as in fib_cache_jiffies.
    unsafe { core::ptr::read_volatile(&FLOOD_INSERTS_PER_TICK) }
}

#[inline(always)]
pub(crate) fn fib_cache_jiffies() -> u32 {
    // SAFETY: a read of our own read-only global; volatile so the loader's value is read, not
    // the default folded at compile time.
    unsafe { core::ptr::read_volatile(&FIB_CACHE_JIFFIES) }
}

/// The flow clock now ([`fib_clock`] of jiffies).
#[inline(always)]
pub(crate) fn clock_now() -> u32 {
    // SAFETY: plain helper call (inlined by the verifier into a load of `jiffies`).
    fib_clock(unsafe { bpf_jiffies64() })
}

#[inline(always)]
pub(crate) fn count(stat: Stat) {
    if let Some(c) = GLOBAL_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub(crate) fn count_backend(backend: u32, bytes: u64, new_flow: bool) {
    if let Some(c) = BACKEND_STATS.get_ptr_mut(backend) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            (*c).new_flows += new_flow as u64;
        }
    }
}

#[inline(always)]
pub(crate) fn filter_has(addr: &[u32; 4], bit: u32) -> bool {
    match ADDR_FILTER.get(filter_index(addr)) {
        Some(v) => *v & bit != 0,
        None => false,
    }
}
