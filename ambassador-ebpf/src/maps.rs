//! The maps of the XDP and TC programs (one set: both programs of one object use the same
//! maps, so a flow whose requests arrive through XDP can have its replies come back through
//! TC, and the reverse), the loader-set globals, and the counters. The layout is documented in
//! `lib.rs`.

use ambassador_ebpf::{
    fib_clock, filter_index, Backend, Counters, Flow, FlowKey, Service, ServiceKey, Stat,
    FILTER_SIZE, FLOW_TABLE_SIZE, MAX_BACKENDS, MAX_SERVICES, MAX_XDP_EGRESS, STAT_COUNT,
    TABLE_SIZE,
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
/// The kernel's common LRU (per-CPU free lists refilled in batches): measured here, inserts cost
/// about a third less than with per-CPU LRU lists (BPF_F_NO_COMMON_LRU), whose every pop
/// rotates the list.
#[map]
pub(crate) static FLOWS: LruHashMap<FlowKey, Flow> =
    LruHashMap::with_max_entries(FLOW_TABLE_SIZE, 0);
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
