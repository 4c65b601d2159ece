//! The TC program (clsact ingress, `cls_bpf` direct action): the decision path (`path.rs`) on
//! socket buffers, for container veths and drivers without native XDP. Checksums go through
//! the skb helpers, which are right for `CHECKSUM_PARTIAL` and full checksums alike, and a
//! next hop without a neighbour entry is resolved by the kernel (`bpf_redirect_neigh`).
//!
//! Every exit for traffic that is not ours is `TC_ACT_OK` with the packet untouched.

use ambassador_ebpf::PROTO_UDP;
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK},
    helpers::{bpf_l4_csum_replace, bpf_redirect, bpf_redirect_neigh, bpf_skb_pull_data},
    macros::classifier,
    programs::TcContext,
};

use crate::{
    ctx::{fold32, Ctx},
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
    fn update_l4_csum(
        &self,
        off: usize,
        proto: u8,
        _family: u8,
        pseudo: u64,
        header: u64,
    ) -> Result<(), ()> {
        // A zero UDP checksum stays zero, a computed zero becomes 0xffff.
        let mangled = if proto == PROTO_UDP {
            BPF_F_MARK_MANGLED_0 as u64
        } else {
            0
        };
        // Size 0: `to` is a difference (a 32-bit one's-complement sum), not a field's value.
        // SAFETY: plain helper calls on our own skb; the helper bounds-checks the offset.
        unsafe {
            if pseudo != 0
                && bpf_l4_csum_replace(
                    self.skb.skb,
                    off as u32,
                    0,
                    fold32(pseudo) as u64,
                    BPF_F_PSEUDO_HDR as u64 | mangled,
                ) != 0
            {
                return Err(());
            }
            if header != 0
                && bpf_l4_csum_replace(self.skb.skb, off as u32, 0, fold32(header) as u64, mangled)
                    != 0
            {
                return Err(());
            }
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
