//! Types and selection primitives shared by the kernel programs (XDP and TC) and userspace.
//!
//! Everything here is `no_std`, `#[repr(C)]` without implicit padding, and compiled into both the
//! eBPF object and the `ambassador` binary, so the kernel and userspace hash, key and index flows
//! with the *same* code. Userspace adds the table builder (`ambassador::select`) on top of these.
//!
//! # Byte-order convention
//! Addresses and ports are kept exactly as they sit in the packet ("wire words"): an IPv4 address
//! is the `u32` whose in-memory bytes are the four octets, a port is the `u16` whose in-memory
//! bytes are the big-endian port. Use [`addr4`], [`addr6`] and [`wire_port`] to build them from
//! host values. Hashing and checksums work on these words directly, so no byte swap ever happens
//! on the packet path.
//!
//! # Map layout (the design; the XDP and TC programs and `ambassador::dataplane::kernel` follow it)
//! | map | type | key → value | entries | written by | read by |
//! |---|---|---|---|---|---|
//! | `SERVICES` | hash | [`ServiceKey`] → [`Service`] | [`MAX_SERVICES`] | daemon | XDP, TC |
//! | `BACKENDS` | array | backend id → [`Backend`] | [`MAX_BACKENDS`] | daemon | XDP, TC |
//! | `RINGS` | array | `ring * TABLE_SIZE + slot` → backend id | `2 * MAX_SERVICES * TABLE_SIZE` | daemon | XDP, TC |
//! | `FLOWS` | LRU hash (common LRU) | [`FlowKey`] of the client's packets → [`Flow`] (the backend, a cached route per direction): one entry per flow, a second keyed by the reply for a [`BACKEND_SHARED`] backend | [`FLOW_TABLE_SIZE`] (`--flow-table-size`) | XDP, TC (daemon reads) | XDP, TC |
//! | `FLOOD_FLOWS` | LRU hash | as `FLOWS`: the new flows of a flooded CPU | a quarter of `FLOWS` | XDP, TC | XDP, TC (while a flood was seen in the last 1,024 ticks) |
//! | `FLOOD_RATE` | per-CPU array | 0 → this CPU's tick and its new flows in it and in the tick before | 1 | XDP, TC | XDP, TC |
//! | `FLOOD_SEEN` | array | 0 → the last tick a flow was diverted, + 1 | 1 | XDP, TC | XDP, TC |
//! | `REPLY_NAT` | hash | backend address:port/proto ([`ServiceKey`]) → [`ReplyNat`]: the service addresses it answers for (up to [`MAX_FRONTENDS`], kept while flows may live) | [`MAX_REPLY_NAT`] | daemon | XDP, TC (replies, ICMP errors) |
//! | `FLOW_CACHE` | per-CPU array | slot of an IPv4 5-tuple → a copy of its flow (`CachedFlow`) | 4,096 | XDP, TC | XDP, TC |
//! | `FLOW_EPOCH` | array | 0 → bumped when a new flow replaces an entry (voids every cached copy) | 1 | XDP, TC | XDP, TC |
//! | `SCRATCH` | per-CPU array | 0 → the general path's keys and the new entry (off the 512-byte stack) | 1 | XDP, TC | XDP, TC |
//! | `XDP_EGRESS` | hash | ifindex → 1 | [`MAX_XDP_EGRESS`] | daemon (as it attaches XDP) | XDP (before redirecting) |
//! | `ADDR_FILTER` | array | [`filter_index`] of an address → [`FILTER_SERVICE`]/[`FILTER_BACKEND`] bits | [`FILTER_SIZE`] | daemon | XDP, TC |
//! | `BACKEND_STATS` | per-CPU array | backend id → [`Counters`] (service totals are their sums) | [`MAX_BACKENDS`] | XDP, TC | daemon |
//! | `GLOBAL_STATS` | per-CPU array | [`Stat`] → `u64` | [`STAT_COUNT`] | XDP, TC | daemon |
//!
//! Each service owns two rings (`2 * id` and `2 * id + 1`). A reload writes the whole new table
//! into the ring that is not live, then points [`Service::ring`] at it with one `SERVICES` update,
//! so no packet ever sees a half-written table.
#![no_std]

/// Size of each consistent-hash lookup table: a prime, as Maglev requires, and large enough that
/// a 1-in-10 weight lands within 0.2% of its share (see `ambassador::select`).
pub const TABLE_SIZE: u32 = 65_537;
/// Services the kernel can hold (each costs `2 * TABLE_SIZE * 4` bytes of rings, 512 KiB).
pub const MAX_SERVICES: u32 = 64;
/// Backends across all services.
pub const MAX_BACKENDS: u32 = 4_096;
/// Tracked flows (one entry each; two for a flow to a [`BACKEND_SHARED`] backend).
pub const FLOW_TABLE_SIZE: u32 = 262_144;
/// Backend address:port entries of `REPLY_NAT` (kept while flows to them may live).
pub const MAX_REPLY_NAT: u32 = 4 * MAX_BACKENDS;
/// `BPF_F_NO_COMMON_LRU`: an LRU hash whose free and LRU lists are per CPU.
pub const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;
/// Interfaces the XDP program may redirect to (`XDP_EGRESS`).
pub const MAX_XDP_EGRESS: u32 = 1024;
/// Entries of the address pre-filter; a power of two.
pub const FILTER_SIZE: u32 = 4_096;
/// `ADDR_FILTER` bit: some service listens on an address folding to this index.
pub const FILTER_SERVICE: u32 = 1;
/// `ADDR_FILTER` bit: some backend has an address folding to this index.
pub const FILTER_BACKEND: u32 = 2;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// [`Service::flags`]: hand the service's packets to the local stack (userspace terminates
/// them, e.g. TLS) instead of forwarding them in the kernel.
pub const SERVICE_PASS_TO_STACK: u32 = 1;
/// [`Service::flags`]: the connect-time ambassador (cgroup `connect4`) rewrites connections to
/// this service in the sockets of the configured cgroup, before any packet exists.
pub const SERVICE_CONNECT_TIME: u32 = 2;

/// [`Backend::flags`]: the slot holds a backend.
pub const BACKEND_VALID: u8 = 1;
/// [`Backend::flags`] and [`ReplyNat::flags`]: the backend's address:port serves more service
/// addresses than `REPLY_NAT` holds, so a new flow to it also inserts a reverse entry.
pub const BACKEND_SHARED: u8 = 2;

/// [`Flow::direction`]: client → service, rewrite the destination to the backend.
pub const FLOW_FORWARD: u32 = 0;
/// [`Flow::direction`]: backend → client, rewrite the source to the service address.
pub const FLOW_REVERSE: u32 = 1;

/// Backend id stored in a ring slot when the service has no backend at all.
pub const NO_BACKEND: u32 = u32::MAX;

/// How the client is identified when a new flow picks its backend.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyMode {
    /// The client's address: every connection of a client goes to the same backend.
    SrcIp = 0,
    /// nginx `ip_hash`: the first three octets of an IPv4 client (the whole IPv6 address).
    SrcIp24 = 1,
    /// Client address and port: spreads one client's connections.
    SrcIpPort = 2,
    /// Source, destination, ports and protocol.
    FiveTuple = 3,
}

impl KeyMode {
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            0 => Some(Self::SrcIp),
            1 => Some(Self::SrcIp24),
            2 => Some(Self::SrcIpPort),
            3 => Some(Self::FiveTuple),
            _ => None,
        }
    }
}

/// `SERVICES` key: where a service listens, as the packet carries it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceKey {
    /// IPv4 in `addr[0]` (rest zero) or IPv6; wire words.
    pub addr: [u32; 4],
    /// Wire port.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

/// `SERVICES` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Service {
    /// Owner of rings `2 * id` and `2 * id + 1`.
    pub id: u32,
    /// The live ring: `2 * id` or `2 * id + 1`.
    pub ring: u32,
    /// Per-service xxh32 seed, so services sharing clients do not share their skew.
    pub seed: u32,
    /// A [`KeyMode`] as `u32`.
    pub key_mode: u32,
    /// `SERVICE_*` flags.
    pub flags: u32,
}

/// `BACKENDS` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    /// Wire words, like [`ServiceKey::addr`].
    pub addr: [u32; 4],
    /// Wire port.
    pub port: u16,
    pub family: u8,
    /// [`BACKEND_VALID`] when this slot holds a backend, and [`BACKEND_SHARED`].
    pub flags: u8,
}

/// `FLOWS` key: a packet's 5-tuple as it arrives.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: u16,
}

/// `FLOWS` value: how to rewrite packets of a tracked flow. One entry per flow, keyed by the
/// client's packets as they arrive ([`FLOW_FORWARD`]): replies find it through `REPLY_NAT`
/// (the backend's service addresses) and the client's tuple. A flow to a backend shared by more
/// services than [`MAX_FRONTENDS`] has a second, [`FLOW_REVERSE`] entry keyed by the reply.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Flow {
    /// New destination ([`FLOW_FORWARD`]) or new source ([`FLOW_REVERSE`]); wire words.
    pub nat_addr: [u32; 4],
    /// New destination or source port; wire port.
    pub nat_port: u16,
    pub _pad: u16,
    /// [`FLOW_FORWARD`] or [`FLOW_REVERSE`].
    pub direction: u32,
    /// Backend id, for its counters.
    pub backend: u32,
    /// Service id.
    pub service: u32,
    /// The route cached for the client's packets (to the backend).
    pub to_backend: Route,
    /// The route cached for the replies (to the client).
    pub to_client: Route,
    /// When a packet of the flow was last seen, in [`seen_clock`] units (256 jiffies).
    pub last_seen: u32,
    /// The TCP FIN and RST bits seen ([`TCP_FIN`], [`TCP_RST`]) in either direction. A flow
    /// with either is closing, and a new SYN on its 5-tuple picks a backend again.
    pub closing: u32,
}

/// A FIB result cached in a flow, for one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Route {
    /// Egress ifindex, 0 when none is cached.
    pub ifindex: u32,
    /// When the FIB result was cached, in [`fib_clock`] units.
    pub stamp: u32,
    /// The Ethernet header's first 8 bytes for this route (next hop's MAC, then the first two
    /// bytes of ours), as loaded from the packet; scalars, not a `[u8; 12]`, because BPF
    /// lowers array copies and zeroing to byte-loop calls.
    pub mac_head: u64,
    /// The header's bytes 8..12 (the rest of our MAC).
    pub mac_tail: u32,
    /// The largest IP length the route was checked for (MTU); longer packets look up again.
    pub len: u16,
    pub _pad: u16,
}

/// Service addresses a backend address:port can answer for without a reverse entry per flow
/// (`REPLY_NAT`); a backend in more services than this is [`BACKEND_SHARED`].
pub const MAX_FRONTENDS: usize = 4;

/// One service address a backend answers for: the address replies are rewritten to come from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Frontend {
    /// Wire words, like [`ServiceKey::addr`].
    pub addr: [u32; 4],
    /// Wire port.
    pub port: u16,
    pub _pad: u16,
}

/// `REPLY_NAT` value: the service addresses a backend address:port has been programmed behind
/// (kept after it leaves them, while flows to it may live).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ReplyNat {
    /// Entries of `frontends` in use (at most [`MAX_FRONTENDS`]).
    pub count: u32,
    /// [`BACKEND_SHARED`] when the backend had more service addresses than fit.
    pub flags: u32,
    pub frontends: [Frontend; MAX_FRONTENDS],
}

pub const TCP_FIN: u32 = 0x01;
pub const TCP_SYN: u32 = 0x02;
pub const TCP_RST: u32 = 0x04;
pub const TCP_ACK: u32 = 0x10;

/// The flow clocks count jiffies (`bpf_jiffies64`, which the verifier inlines into one load;
/// `bpf_ktime_get_coarse_ns` is a helper call, about 15 ns a packet on these machines). Jiffies
/// tick at the kernel's `HZ` (100–1000 a second): userspace reads it as the resolution of
/// `CLOCK_MONOTONIC_COARSE` ([`hz_from_coarse_resolution`]) and tells the program through the
/// `FIB_CACHE_JIFFIES` global.
///
/// [`Flow::fib_stamp`]'s clock: the low 32 bits of jiffies.
#[inline(always)]
pub const fn fib_clock(jiffies: u64) -> u32 {
    jiffies as u32
}

/// Jiffies per tick of [`seen_clock`], as a shift: 256 jiffies (0.26 s at HZ 1000, 1.02 s at
/// HZ 250, 2.56 s at HZ 100).
pub const SEEN_SHIFT: u32 = 8;

/// The clock of [`Flow::last_seen`]: [`fib_clock`] ticks to ticks of 2^[`SEEN_SHIFT`] jiffies,
/// so a busy flow's entry is written a few times a second at most, not once a packet.
#[inline(always)]
pub const fn seen_clock(fib_ticks: u32) -> u32 {
    fib_ticks >> SEEN_SHIFT
}

/// `HZ` from the resolution of `CLOCK_MONOTONIC_COARSE`, which the kernel reports as one jiffy
/// (`TICK_NSEC`, rounded to the nearest nanosecond).
pub const fn hz_from_coarse_resolution(ns: u64) -> u32 {
    if ns == 0 {
        return 0;
    }
    ((1_000_000_000 + ns / 2) / ns) as u32
}

/// Version of the layout of the maps a restarted daemon adopts (`FLOWS`, `ADDR_FILTER`, the
/// counters). Bump it whenever their keys, values or meaning change: a daemon refuses to adopt
/// pinned maps of another version rather than misread live flows. 2: flow clocks in jiffies;
/// 3: two more global counters; 4: one entry per flow with a route for each direction,
/// `REPLY_NAT` and `FLOOD_FLOWS` adopted, two more counters.
pub const LAYOUT_VERSION: u32 = 4;

/// Per-backend counters (per CPU; userspace sums them, and sums backends into services).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

/// Indexes of `GLOBAL_STATS`: why packets left the program the way they did.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Parsed, but not for a service or a tracked flow.
    PassNotOurs = 0,
    /// Could not be parsed (truncated, unknown ethertype, bad IHL, unhandled IPv6 extension).
    PassUnparsed = 1,
    /// IP fragment: passed to the stack, which reassembles.
    PassFragment = 2,
    /// Service handled by userspace (`SERVICE_PASS_TO_STACK`).
    PassToStack = 3,
    /// Rewritten, then handed to the stack to route (VLAN, TTL expiring, MTU exceeded; on XDP
    /// also no neighbour entry yet, or an egress that takes no XDP frames).
    NatThenStack = 4,
    /// Rewritten and sent: `XDP_REDIRECT` / `XDP_TX`, or TC's `bpf_redirect(_neigh)`.
    Forwarded = 5,
    /// A new flow was created.
    NewFlow = 6,
    /// A reply was rewritten back to the service address.
    ReverseNat = 7,
    /// An ICMP error about a tracked flow was translated.
    IcmpTranslated = 8,
    /// A service with no backend: passed to the stack, which answers (RST / port unreachable).
    NoBackend = 9,
    /// The flow table refused an insert (the flow is still forwarded, by hash).
    FlowInsertFailed = 10,
    /// An established IPv4 flow's decision copied into a CPU's flow cache (a cache miss).
    FlowCacheFill = 11,
    /// A new flow replaced a tracked entry of its 5-tuple (a SYN on a closed flow's tuple):
    /// every CPU's flow cache is invalidated.
    FlowReplaced = 12,
    /// A new flow went to the flood table: this CPU had already put its share of new flows
    /// into the connection table in this tick.
    FloodDiverted = 13,
    /// A TCP packet other than a SYN found no tracked flow and was given a backend again: its
    /// entry was evicted or had expired (the evictions established flows see).
    FlowRepicked = 14,
}

pub const STAT_COUNT: u32 = 15;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is #[repr(C)], Copy, has no padding (checked by the size asserts below)
    // and every bit pattern is valid.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::Service {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::Flow {}
    unsafe impl aya::Pod for super::ReplyNat {}
    unsafe impl aya::Pod for super::Counters {}
}

// No implicit padding: each size equals the sum of its fields.
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 20);
const _: () = assert!(core::mem::size_of::<Service>() == 20);
const _: () = assert!(core::mem::size_of::<Backend>() == 20);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);
const _: () = assert!(core::mem::size_of::<Route>() == 24);
const _: () = assert!(core::mem::size_of::<Flow>() == 88);
const _: () = assert!(core::mem::size_of::<Frontend>() == 20);
const _: () = assert!(core::mem::size_of::<ReplyNat>() == 88);
const _: () = assert!(core::mem::size_of::<Counters>() == 24);

/// Wire words of an IPv4 address given as octets.
#[inline(always)]
pub const fn addr4(octets: [u8; 4]) -> [u32; 4] {
    [u32::from_ne_bytes(octets), 0, 0, 0]
}

/// Wire words of an IPv6 address given as octets.
#[inline(always)]
pub const fn addr6(o: [u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// Wire form of a host-order port.
#[inline(always)]
pub const fn wire_port(port: u16) -> u16 {
    port.to_be()
}

/// The 40 bytes a flow's backend choice is hashed over: `src[4] dst[4] ports proto`, with the
/// fields the [`KeyMode`] ignores zeroed.
#[inline(always)]
pub fn hash_input(
    mode: u32,
    src: &[u32; 4],
    dst: &[u32; 4],
    sport: u16,
    dport: u16,
    proto: u8,
    family: u8,
) -> [u32; 10] {
    let mut w = [0u32; 10];
    w[0] = src[0];
    w[1] = src[1];
    w[2] = src[2];
    w[3] = src[3];
    w[9] = family as u32;
    if mode == KeyMode::SrcIp24 as u32 && family == FAMILY_V4 {
        // nginx ip_hash: the first three octets, which are the first three bytes in memory.
        w[0] = u32::from_ne_bytes([0xff, 0xff, 0xff, 0]) & src[0];
    } else if mode == KeyMode::SrcIpPort as u32 {
        w[8] = sport as u32;
    } else if mode == KeyMode::FiveTuple as u32 {
        w[4] = dst[0];
        w[5] = dst[1];
        w[6] = dst[2];
        w[7] = dst[3];
        w[8] = (sport as u32) | ((dport as u32) << 16);
        w[9] |= (proto as u32) << 8;
    }
    w
}

const P1: u32 = 2_654_435_761;
const P2: u32 = 2_246_822_519;
const P3: u32 = 3_266_489_917;
const P4: u32 = 668_265_263;

#[inline(always)]
fn round(acc: u32, input: u32) -> u32 {
    acc.wrapping_add(input.wrapping_mul(P2))
        .rotate_left(13)
        .wrapping_mul(P1)
}

/// XXH32 of the 40 bytes of `w` (read little-endian, as XXH32 specifies). Straight-line code
/// with a fixed length, so the verifier sees no loop; equal to `xxhash_rust::xxh32` over the
/// same bytes on little-endian machines (tested in `ambassador::select`).
#[inline(always)]
pub fn xxh32_40(w: &[u32; 10], seed: u32) -> u32 {
    let mut v1 = seed.wrapping_add(P1).wrapping_add(P2);
    let mut v2 = seed.wrapping_add(P2);
    let mut v3 = seed;
    let mut v4 = seed.wrapping_sub(P1);
    v1 = round(v1, u32::from_le(w[0]));
    v2 = round(v2, u32::from_le(w[1]));
    v3 = round(v3, u32::from_le(w[2]));
    v4 = round(v4, u32::from_le(w[3]));
    v1 = round(v1, u32::from_le(w[4]));
    v2 = round(v2, u32::from_le(w[5]));
    v3 = round(v3, u32::from_le(w[6]));
    v4 = round(v4, u32::from_le(w[7]));
    let mut h = v1
        .rotate_left(1)
        .wrapping_add(v2.rotate_left(7))
        .wrapping_add(v3.rotate_left(12))
        .wrapping_add(v4.rotate_left(18));
    h = h.wrapping_add(40);
    h = h
        .wrapping_add(u32::from_le(w[8]).wrapping_mul(P3))
        .rotate_left(17)
        .wrapping_mul(P4);
    h = h
        .wrapping_add(u32::from_le(w[9]).wrapping_mul(P3))
        .rotate_left(17)
        .wrapping_mul(P4);
    h ^= h >> 15;
    h = h.wrapping_mul(P2);
    h ^= h >> 13;
    h = h.wrapping_mul(P3);
    h ^= h >> 16;
    h
}

/// The lookup-table slot a flow lands in.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn flow_slot(
    mode: u32,
    seed: u32,
    src: &[u32; 4],
    dst: &[u32; 4],
    sport: u16,
    dport: u16,
    proto: u8,
    family: u8,
) -> u32 {
    xxh32_40(
        &hash_input(mode, src, dst, sport, dport, proto, family),
        seed,
    ) % TABLE_SIZE
}

/// `ADDR_FILTER` index of an address: a cheap fold, good enough to keep non-service traffic
/// to one array read.
#[inline(always)]
pub fn filter_index(addr: &[u32; 4]) -> u32 {
    let x = addr[0] ^ addr[1] ^ addr[2] ^ addr[3];
    let x = x ^ (x >> 16);
    (x ^ (x >> 8)) & (FILTER_SIZE - 1)
}

/// One's-complement checksum arithmetic on wire words (RFC 1071/1624): byte-order independent,
/// so it works on values as loaded from the packet.
pub mod csum {
    /// Start an incremental update of checksum field `check` (wire value).
    #[inline(always)]
    pub fn start(check: u16) -> u64 {
        (!check) as u64
    }

    /// Account for a 32-bit word changing from `old` to `new`.
    #[inline(always)]
    pub fn replace32(sum: u64, old: u32, new: u32) -> u64 {
        sum + (!old) as u64 + new as u64
    }

    /// Account for a 16-bit word changing from `old` to `new`.
    #[inline(always)]
    pub fn replace16(sum: u64, old: u16, new: u16) -> u64 {
        sum + (!old) as u64 + new as u64
    }

    /// Fold a running sum back into a checksum field value.
    #[inline(always)]
    pub fn finish(sum: u64) -> u16 {
        let mut s = (sum & 0xffff_ffff) + (sum >> 32);
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        !(s as u16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hz_is_the_inverse_of_the_coarse_clock_resolution() {
        // TICK_NSEC for each HZ a kernel can be built with.
        for (tick_ns, hz) in [
            (10_000_000, 100),
            (4_000_000, 250),
            (3_333_333, 300),
            (1_000_000, 1000),
        ] {
            assert_eq!(hz_from_coarse_resolution(tick_ns), hz);
        }
        assert_eq!(hz_from_coarse_resolution(0), 0);
    }

    #[test]
    fn csum_incremental_matches_recompute() {
        // IPv4 header with checksum zeroed; compute full checksum, change a word, compare.
        let mut hdr: [u16; 10] = [
            0x4500u16.to_be(),
            0x0073u16.to_be(),
            0,
            0x4000u16.to_be(),
            0x4011u16.to_be(),
            0,
            0xc0a8u16.to_be(),
            0x0001u16.to_be(),
            0xc0a8u16.to_be(),
            0x00c7u16.to_be(),
        ];
        let full = |h: &[u16; 10]| {
            let mut s: u32 = h.iter().map(|&w| w as u32).sum();
            while s > 0xffff {
                s = (s & 0xffff) + (s >> 16);
            }
            !(s as u16)
        };
        hdr[5] = full(&hdr);
        let old = (hdr[8] as u32) | ((hdr[9] as u32) << 16);
        let new = u32::from_ne_bytes([10, 200, 2, 2]);
        let sum = csum::replace32(csum::start(hdr[5]), old, new);
        hdr[8] = new as u16;
        hdr[9] = (new >> 16) as u16;
        let inc = csum::finish(sum);
        hdr[5] = 0;
        assert_eq!(inc, full(&hdr));
    }
}
