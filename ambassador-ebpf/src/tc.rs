//! The TC program (clsact ingress, `cls_bpf` direct action): the decision path (`path.rs`) on
//! socket buffers, for container veths and drivers without native XDP. Checksums go through
//! the skb helpers, which are right for `CHECKSUM_PARTIAL` and full checksums alike, and a
//! next hop without a neighbour entry is resolved by the kernel (`bpf_redirect_neigh`).
//!
//! Every exit for traffic that is not ours is `TC_ACT_OK` with the packet untouched.

use ambassador_ebpf::{csum, PROTO_UDP};
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK},
    helpers::{bpf_l4_csum_replace, bpf_redirect, bpf_redirect_neigh, bpf_skb_pull_data},
    macros::classifier,
    programs::TcContext,
};

use crate::{
    ctx::{fold32, load, store, Ctx},
    path::run,
};

/// Bytes the decision path may read directly: Ethernet, a tag, the IP and L4 headers, and an
/// ICMP error's quoted headers. A socket buffer's linear part may be shorter; it is pulled
/// up to this (or the frame) once, before anything is read.
const HEADERS: u32 = 160;

#[classifier]
pub fn ambassador_tc(ctx: TcContext) -> i32 {
    let want = if ctx.len() < HEADERS {
        ctx.len()
    } else {
        HEADERS
    };
    if ctx.data() + want as usize > ctx.data_end() {
        // SAFETY: plain helper call on our own skb; packet pointers are read anew after it.
        if unsafe { bpf_skb_pull_data(ctx.skb.skb, want) } != 0 {
            return TC_ACT_OK as i32;
        }
    }
    run(&ctx) as i32
}

impl Ctx for TcContext {
    const PASS: u32 = TC_ACT_OK as u32;
    const RESOLVES_NEIGH: bool = true;

    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    #[inline(always)]
    fn frame_len(&self) -> usize {
        TcContext::len(self) as usize
    }

    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: a field of the program's own context.
        unsafe { (*self.skb.skb).ingress_ifindex }
    }

    #[inline(always)]
    fn hidden_vlan(&self) -> bool {
        // SAFETY: as above.
        unsafe { (*self.skb.skb).vlan_present != 0 }
    }

    #[inline(always)]
    fn gso(&self) -> bool {
        // SAFETY: as above.
        unsafe { (*self.skb.skb).gso_segs > 1 }
    }

    #[inline(always)]
    /// One helper call where there are two kinds of change, not two calls (a helper call is
    /// the largest cost of an established packet here). The pseudo-header change goes through
    /// `bpf_l4_csum_replace`, which knows the skb's checksum state; what it wrote says which
    /// state that was, since it computes `fold(d + ~F)` for a full checksum and `~fold(d + F)`
    /// for a partial one, which differ whenever the addresses changed (`d` ≠ 0). The header
    /// change is then written directly to a full checksum, and left out of a partial one (the
    /// NIC sums the header itself). Where the two cannot be told apart, the helper decides.
    fn update_l4_csum(
        &self,
        off: usize,
        proto: u8,
        _family: u8,
        pseudo: u64,
        header: u64,
    ) -> Result<(), ()> {
        // A zero UDP checksum stays zero, a computed zero becomes 0xffff.
        let udp = proto == PROTO_UDP;
        let mangled = if udp { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
        let mangle = |c: u16| if udp && c == 0 { 0xffff } else { c };
        let before: u16 = load(self, off)?;
        if udp && before == 0 {
            return Ok(());
        }
        let d = fold32(pseudo);
        if pseudo != 0 {
            // Size 0: `to` is a difference (a 32-bit one's-complement sum), not a field's value.
            // SAFETY: plain helper call on our own skb; the helper bounds-checks the offset.
            let rc = unsafe {
                bpf_l4_csum_replace(
                    self.skb.skb,
                    off as u32,
                    0,
                    d as u64,
                    BPF_F_PSEUDO_HDR as u64 | mangled,
                )
            };
            if rc != 0 {
                return Err(());
            }
        }
        if header == 0 {
            return Ok(());
        }
        if pseudo != 0 {
            let after: u16 = load(self, off)?;
            let full = mangle(csum::finish(d as u64 + !(before as u32) as u64));
            let partial = mangle(!csum::finish(d as u64 + before as u64));
            if full != partial {
                if after == full {
                    let c = mangle(csum::finish(csum::start(after) + fold32(header) as u64));
                    return store(self, off, c);
                }
                if after == partial {
                    return Ok(());
                }
            }
        }
        // SAFETY: as above.
        let rc = unsafe {
            bpf_l4_csum_replace(self.skb.skb, off as u32, 0, fold32(header) as u64, mangled)
        };
        if rc != 0 {
            return Err(());
        }
        Ok(())
    }

    #[inline(always)]
    fn can_send_to(&self, _ifindex: u32) -> bool {
        true
    }

    #[inline(always)]
    fn redirect(&self, ifindex: u32) -> u32 {
        // SAFETY: plain helper call; the ifindex came from the FIB (or its cached result).
        unsafe { bpf_redirect(ifindex, 0) as u32 }
    }

    #[inline(always)]
    fn redirect_neigh(&self, ifindex: u32) -> u32 {
        // SAFETY: plain helper call; no parameters: the kernel looks the next hop up itself.
        unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as u32 }
    }
}
