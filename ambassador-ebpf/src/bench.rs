//! Programs for `cargo xtask bench xdp` only; never attached. They give the benchmark its
//! floors and let it time a program that rewrites packets with `BPF_PROG_TEST_RUN`'s `repeat`,
//! which does not restore the packet between iterations.

use ambassador_ebpf::{Flow, FlowKey, BPF_F_NO_COMMON_LRU, FAMILY_V4, PROTO_TCP};
use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray},
    programs::{TcContext, XdpContext},
};

use crate::ctx::Ctx;

/// Bytes of the benchmark packet the wrappers restore (covers Ethernet + IPv4 + TCP headers).
pub const BENCH_RESTORE_LEN: usize = 64;

/// The original first bytes of the benchmark packets: slot 0 for the wrappers that replay one
/// packet, slot 1 for those that make every iteration a new flow (so one run can time
/// established packets on one CPU while another floods new flows).
#[map]
static BENCH_PACKET: Array<[u64; BENCH_RESTORE_LEN / 8]> = Array::with_max_entries(2, 0);
/// Slot 0: the program under test.
#[map]
static BENCH_TARGET: ProgramArray = ProgramArray::with_max_entries(1, 0);
/// The same for the TC wrappers (a program array holds programs of one type).
#[map]
static BENCH_TC_TARGET: ProgramArray = ProgramArray::with_max_entries(1, 0);
#[map]
static BENCH_COUNTER: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);
/// The floor's one hash lookup, keyed like `SERVICES`.
#[map]
static BENCH_LOOKUP: HashMap<[u32; 5], u32> = HashMap::with_max_entries(1024, 0);

/// Floor 3's connection table: `FLOWS`' key and value. One entry here; the benchmark loads it
/// with `FLOWS`' size, so daemons do not carry a second table.
#[map]
static BENCH_FLOWS: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(1, 0);
/// The same with per-CPU LRU lists (`BPF_F_NO_COMMON_LRU`), to measure the other flavour.
#[map]
static BENCH_FLOWS_NO_COMMON: LruHashMap<FlowKey, Flow> =
    LruHashMap::with_max_entries(1, BPF_F_NO_COMMON_LRU);

/// Floor 1: the cost of running an XDP program at all.
#[xdp]
pub fn bench_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The source, destination and ports word of an Ethernet/IPv4 (no options)/TCP frame.
#[inline(always)]
fn ipv4_tuple(ctx: &XdpContext) -> Option<(u32, u32, u32)> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + 54 > end {
        return None;
    }
    // SAFETY: 54 bytes (Ethernet + IPv4 + TCP) are inside the packet, checked above.
    let (ethertype, vihl, src, dst, ports) = unsafe {
        (
            ((start + 12) as *const u16).read_unaligned(),
            ((start + 14) as *const u8).read(),
            ((start + 26) as *const u32).read_unaligned(),
            ((start + 30) as *const u32).read_unaligned(),
            ((start + 34) as *const u32).read_unaligned(),
        )
    };
    if ethertype != 0x0800u16.to_be() || vihl != 0x45 {
        return None;
    }
    Some((src, dst, ports))
}

/// Floor 2: parse Ethernet/IPv4/TCP and do one hash lookup.
#[xdp]
pub fn bench_parse_lookup(ctx: XdpContext) -> u32 {
    let Some((_, dst, ports)) = ipv4_tuple(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    let key = [dst, 0, 0, 0, ports];
    // SAFETY: plain lookup; the value is only tested for presence.
    match unsafe { BENCH_LOOKUP.get(&key) } {
        Some(_) => xdp_action::XDP_TX,
        None => xdp_action::XDP_PASS,
    }
}

/// Floor 3: parse Ethernet/IPv4/TCP and insert the flow into an LRU table shaped like `FLOWS`
/// (what any connection tracking pays for a new flow, before picking a backend or forwarding).
#[xdp]
pub fn bench_parse_insert(ctx: XdpContext) -> u32 {
    parse_insert(&ctx, &BENCH_FLOWS)
}

/// Floor 3 into a table with per-CPU LRU lists.
#[xdp]
pub fn bench_parse_insert_no_common(ctx: XdpContext) -> u32 {
    parse_insert(&ctx, &BENCH_FLOWS_NO_COMMON)
}

#[inline(always)]
fn parse_insert(ctx: &XdpContext, table: &LruHashMap<FlowKey, Flow>) -> u32 {
    let Some((src, dst, ports)) = ipv4_tuple(ctx) else {
        return xdp_action::XDP_PASS;
    };
    // Zeroed word by word, then filled: LLVM would merge the zero fields of a struct literal
    // into misaligned stack stores, which the verifier refuses.
    let mut k = core::mem::MaybeUninit::<FlowKey>::uninit();
    crate::flow::zero_words(&mut k);
    // SAFETY: all-zero is a valid FlowKey; plain field writes.
    let key = unsafe { k.assume_init_mut() };
    key.src[0] = src;
    key.dst[0] = dst;
    // The ports word as loaded (little-endian BPF): source port first, both in wire order.
    key.sport = ports as u16;
    key.dport = (ports >> 16) as u16;
    key.proto = PROTO_TCP;
    key.family = FAMILY_V4;
    let mut raw = core::mem::MaybeUninit::<Flow>::uninit();
    crate::flow::zero_words(&mut raw);
    // SAFETY: all-zero is a valid Flow.
    let flow = unsafe { raw.assume_init_ref() };
    match table.insert(key, flow, 0) {
        Ok(()) => xdp_action::XDP_TX,
        Err(_) => xdp_action::XDP_DROP,
    }
}

/// TC's floor: the cost of running a TC program at all.
#[classifier]
pub fn bench_tc_ok(_ctx: TcContext) -> i32 {
    TC_ACT_OK as i32
}

#[inline(always)]
fn restore<C: Ctx>(ctx: &C, slot: u32) -> bool {
    let start = ctx.data();
    if start + BENCH_RESTORE_LEN > ctx.data_end() {
        return false;
    }
    let Some(orig) = BENCH_PACKET.get(slot) else {
        return false;
    };
    let p = start as *mut u64;
    for (i, w) in orig.iter().enumerate() {
        // SAFETY: BENCH_RESTORE_LEN bytes are inside the packet, checked above; volatile keeps
        // the word stores from becoming a byte-loop memmove call.
        unsafe { p.add(i).write_volatile(*w) };
    }
    true
}

/// Restore the packet, then run the program under test.
#[xdp]
pub fn bench_restore(ctx: XdpContext) -> u32 {
    if !restore(&ctx, 0) {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: tail call into slot 0 of our program array; on failure we fall through.
    unsafe { BENCH_TARGET.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}

/// Give the restored packet a source no flow has had yet.
#[inline(always)]
fn new_source<C: Ctx>(ctx: &C) -> bool {
    let Some(c) = BENCH_COUNTER.get_ptr_mut(0) else {
        return false;
    };
    let start = ctx.data();
    if start + BENCH_RESTORE_LEN > ctx.data_end() {
        return false;
    }
    // SAFETY: per-CPU counter; the source port (34..36) and the last source octet (29) are
    // inside the restored bytes.
    unsafe {
        let n = *c;
        *c = n.wrapping_add(1);
        ((start + 34) as *mut u16).write_unaligned(n as u16);
        ((start + 29) as *mut u8).write((n >> 16) as u8);
    }
    true
}

/// Restore the packet, give it a source no flow has had yet, then run the program under test:
/// every iteration is a new flow.
#[xdp]
pub fn bench_restore_new_flow(ctx: XdpContext) -> u32 {
    if !restore(&ctx, 1) || !new_source(&ctx) {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: as in bench_restore.
    unsafe { BENCH_TARGET.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}

/// [`bench_restore`] for TC programs.
#[classifier]
pub fn bench_tc_restore(ctx: TcContext) -> i32 {
    if !restore(&ctx, 0) {
        return TC_ACT_SHOT as i32;
    }
    // SAFETY: tail call into slot 0 of our program array; on failure we fall through.
    unsafe { BENCH_TC_TARGET.tail_call(&ctx, 0) };
    TC_ACT_SHOT as i32
}

/// [`bench_restore_new_flow`] for TC programs.
#[classifier]
pub fn bench_tc_restore_new_flow(ctx: TcContext) -> i32 {
    if !restore(&ctx, 1) || !new_source(&ctx) {
        return TC_ACT_SHOT as i32;
    }
    // SAFETY: as in bench_tc_restore.
    unsafe { BENCH_TC_TARGET.tail_call(&ctx, 0) };
    TC_ACT_SHOT as i32
}

/// Restore the packet and void every flow-cache copy (as a replaced flow does), then run the
/// program under test: every iteration takes the connection-table lookup, as a CPU's first
/// packet of a flow in each clock tick does.
#[xdp]
pub fn bench_restore_uncached(ctx: XdpContext) -> u32 {
    if !restore(&ctx, 0) {
        return xdp_action::XDP_ABORTED;
    }
    if let Some(e) = crate::maps::FLOW_EPOCH.get_ptr_mut(0) {
        // SAFETY: a live map value; the benchmark runs on one thread, so a plain add will do.
        unsafe { *e += 1 };
    }
    // SAFETY: as in bench_restore.
    unsafe { BENCH_TARGET.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}
