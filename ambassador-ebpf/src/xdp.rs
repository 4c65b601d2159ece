//! The XDP program: the decision path (`path.rs`) on frames as the driver hands them over,
//! before any socket buffer exists. For NICs, where packets arrive with full checksums; on
//! container veths the TC program (`tc.rs`) runs instead (see `ctx.rs` for why).
//!
//! Every exit for traffic that is not ours, or that this program does not fully understand,
//! is `XDP_PASS` with the packet untouched.

use ambassador_ebpf::csum;
use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_jiffies64, bpf_redirect},
    macros::xdp,
    programs::XdpContext,
};

use crate::{
    ctx::{full_l4_check, load, store, Ctx},
    maps::XDP_EGRESS,
    path::run,
};

#[xdp]
pub fn ambassador_xdp(ctx: XdpContext) -> u32 {
    run(&ctx)
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

impl Ctx for XdpContext {
    const PASS: u32 = xdp_action::XDP_PASS;
    const RESOLVES_NEIGH: bool = false;

    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }

    #[inline(always)]
    fn frame_len(&self) -> usize {
        XdpContext::data_end(self) - XdpContext::data(self)
    }

    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        XdpContext::ingress_ifindex(self) as u32
    }

    #[inline(always)]
    fn hidden_vlan(&self) -> bool {
        false
    }

    #[inline(always)]
    fn gso(&self) -> bool {
        false
    }

    /// The checksum is taken to be full: right for frames from a wire, wrong for
    /// `CHECKSUM_PARTIAL` frames from a local socket or a container's veth.
    #[inline(always)]
    fn update_l4_csum(
        &self,
        off: usize,
        proto: u8,
        family: u8,
        pseudo: u64,
        header: u64,
    ) -> Result<(), ()> {
        let old: u16 = load(self, off)?;
        if let Some(c) = full_l4_check(proto, family, old, csum::start(old) + pseudo + header) {
            store(self, off, c)?;
        }
        Ok(())
    }

    #[inline(always)]
    fn can_send_to(&self, ifindex: u32) -> bool {
        // SAFETY: values are plain data.
        ifindex == Ctx::ingress_ifindex(self) || unsafe { XDP_EGRESS.get(&ifindex).is_some() }
    }

    /// Back out of the port it came in on, or redirected to another.
    #[inline(always)]
    fn redirect(&self, ifindex: u32) -> u32 {
        if ifindex == Ctx::ingress_ifindex(self) {
            xdp_action::XDP_TX
        } else {
            // SAFETY: plain helper call; the ifindex came from the FIB (or its cached result).
            unsafe { bpf_redirect(ifindex, 0) as u32 }
        }
    }

    #[inline(always)]
    fn redirect_neigh(&self, _ifindex: u32) -> u32 {
        xdp_action::XDP_PASS
    }
}
