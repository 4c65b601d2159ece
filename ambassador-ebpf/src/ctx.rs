//! What the decision path needs of the program it runs in: packet access, the checksum rule
//! for the L4 header, and how a packet is sent. One decision path (parse → classify → flow →
//! select → NAT → route) is compiled for XDP (`xdp.rs`) and TC (`tc.rs`) through this trait,
//! as Cilium's datapath is through `struct __ctx_buff`.
//!
//! The one real difference between the two is the L4 checksum. A frame sent by a local socket
//! or a container is `CHECKSUM_PARTIAL`: its L4 checksum field holds only the pseudo-header
//! sum, which the NIC (or the receiving veth) completes. XDP sees no such metadata and must
//! assume a full checksum, so XDP is right only where packets arrive with full checksums (a
//! NIC). TC hands the update to `bpf_l4_csum_replace`, which applies pseudo-header changes
//! to either kind and payload changes only to full checksums.

use aya_ebpf::EbpfContext;
use core::mem::size_of;

use ambassador_ebpf::{csum, FAMILY_V4, PROTO_UDP};

/// The program kind the decision path runs in.
pub(crate) trait Ctx: EbpfContext {
    /// The verdict that hands the packet, as it now is, to the kernel's stack.
    const PASS: u32;
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Bytes of the frame from its Ethernet header, whether or not they are all in
    /// `data..data_end` (a TC packet's payload may sit in page fragments).
    fn frame_len(&self) -> usize;
    fn ingress_ifindex(&self) -> u32;
    /// A VLAN tag the packet data does not show (TC: taken off by the driver into the skb).
    fn hidden_vlan(&self) -> bool;
    /// A GSO packet: several wire segments in one, longer than the MTU by design. It is routed
    /// without the route cache (whose length check is per wire packet) and the MTU is checked
    /// by the kernel per segment.
    fn gso(&self) -> bool;
    /// Update the L4 checksum at `off`: `pseudo` and `header` are running sums
    /// ([`csum::replace32`] from 0) of the pseudo-header words and of the L4 header words that
    /// changed. A zero UDP checksum over IPv4 means "none" and is left alone; a computed zero
    /// is sent as 0xffff (RFC 768).
    fn update_l4_csum(
        &self,
        off: usize,
        proto: u8,
        family: u8,
        pseudo: u64,
        header: u64,
    ) -> Result<(), ()>;
    /// Whether [`Ctx::redirect`] can send a packet out of `ifindex`. XDP can only where the
    /// egress takes XDP frames (the interfaces XDP is attached to; a veth whose peer has no
    /// GRO drops them): elsewhere the stack forwards the rewritten packet. TC can everywhere.
    fn can_send_to(&self, ifindex: u32) -> bool;
    /// Send the (rewritten, MACs set) packet out of `ifindex`.
    fn redirect(&self, ifindex: u32) -> u32;
    /// Whether [`Ctx::redirect_neigh`] can send a packet whose next hop has no neighbour
    /// entry yet (TC, `bpf_redirect_neigh`); XDP hands such packets to the stack instead.
    const RESOLVES_NEIGH: bool;
    /// Send the (rewritten) packet out of `ifindex`, the kernel resolving the next hop's MAC.
    fn redirect_neigh(&self, ifindex: u32) -> u32;
}

/// A bounds-checked pointer `off` bytes into the packet; the one place packet memory is reached.
#[inline(always)]
pub(crate) fn ptr_at<C: Ctx, T>(ctx: &C, off: usize) -> Result<*mut T, ()> {
    let start = ctx.data();
    if start + off + size_of::<T>() > ctx.data_end() {
        return Err(());
    }
    Ok((start + off) as *mut T)
}

#[inline(always)]
pub(crate) fn load<C: Ctx, T: Copy>(ctx: &C, off: usize) -> Result<T, ()> {
    // SAFETY: ptr_at checked the bounds; packet data has no alignment guarantee.
    Ok(unsafe { ptr_at::<C, T>(ctx, off)?.read_unaligned() })
}

#[inline(always)]
pub(crate) fn store<C: Ctx, T: Copy>(ctx: &C, off: usize, v: T) -> Result<(), ()> {
    // SAFETY: ptr_at checked the bounds; packet data has no alignment guarantee.
    unsafe { ptr_at::<C, T>(ctx, off)?.write_unaligned(v) };
    Ok(())
}

/// The new L4 checksum field for a full checksum, or `None` to leave the field as it is: a
/// zero UDP checksum over IPv4 means "none", and a computed zero is sent as 0xffff (RFC 768).
#[inline(always)]
pub(crate) fn full_l4_check(proto: u8, family: u8, old_check: u16, sum: u64) -> Option<u16> {
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

/// A running sum folded to the 32-bit one's-complement value the kernel's checksum helpers
/// take as a difference (`__wsum`).
#[inline(always)]
pub(crate) fn fold32(sum: u64) -> u32 {
    let s = (sum & 0xffff_ffff) + (sum >> 32);
    ((s & 0xffff_ffff) + (s >> 32)) as u32
}

/// A byte-swapped u16 as a length the verifier can bound. Kernels before 6.3 or so do not
/// track the range of a `be16` result, and refuse adding it to a packet pointer ("math between
/// pkt pointer and register with unbounded min value"); an explicit check on a value the
/// compiler cannot see through (so cannot drop as always false) gives them the bound.
#[inline(always)]
pub(crate) fn bounded_u16(v: u16) -> Result<usize, ()> {
    let v = core::hint::black_box(v as usize);
    if v > 0xffff {
        return Err(());
    }
    Ok(v)
}
