//! A new flow's backend: the service's live table picks it, the flow is tracked in both
//! directions, and the packet is rewritten to the backend.

use ambassador_ebpf::{
    flow_slot, FlowKey, Service, Stat, BACKEND_VALID, NO_BACKEND, SERVICE_PASS_TO_STACK, TABLE_SIZE,
};

use crate::{
    ctx::Ctx,
    flow::track,
    maps::{count, count_backend, BACKENDS, RINGS},
    nat::rewrite_dst,
    parse::Packet,
    path::to_sub,
};

/// [`to_service`]'s `how`: the 5-tuple's tracked entry is a closed flow being replaced.
pub(crate) const NEW_REPLACING: u32 = 1;
/// [`to_service`]'s `how`: a TCP packet other than a SYN (its flow's entry is gone).
pub(crate) const NEW_MIDSTREAM: u32 = 2;

/// A new flow to a service: pick its backend from the service's live table and track it.
// A real subprogram (not inlined) to keep each frame within the 512-byte BPF stack.
#[inline(never)]
pub(crate) fn to_service<C: Ctx>(
    ctx: &C,
    pkt: &Packet,
    key: &FlowKey,
    svc: &Service,
    how: u32,
) -> u32 {
    to_sub(new_flow(ctx, pkt, key, svc, how))
}

#[inline(always)]
fn new_flow<C: Ctx>(
    ctx: &C,
    pkt: &Packet,
    key: &FlowKey,
    svc: &Service,
    how: u32,
) -> Result<bool, ()> {
    if svc.flags & SERVICE_PASS_TO_STACK != 0 {
        count(Stat::PassToStack);
        return Ok(false);
    }
    let slot = flow_slot(
        svc.key_mode,
        svc.seed,
        &key.src,
        &key.dst,
        key.sport,
        key.dport,
        key.proto,
        key.family,
    );
    let id = match RINGS.get(svc.ring * TABLE_SIZE + slot) {
        Some(id) if *id != NO_BACKEND => *id,
        _ => {
            count(Stat::NoBackend);
            // Rare, and only written when the daemon logs at debug (AYA_LOG_LEVEL).
            // The target users filter on (`RUST_LOG=ambassador::xdp=debug`), whatever this
            // object's crate is called.
            aya_log_ebpf::debug!(
                ctx,
                target: "ambassador::xdp",
                "service {}: no backend for a new flow (all drained, unhealthy or removed?)",
                svc.id
            );
            return Ok(false);
        }
    };
    let b = match BACKENDS.get(id) {
        Some(b) if b.flags & BACKEND_VALID != 0 && b.family == key.family => *b,
        _ => {
            count(Stat::NoBackend);
            return Ok(false);
        }
    };
    track(key, svc, id, &b, how & NEW_REPLACING != 0);
    if how & NEW_MIDSTREAM != 0 {
        count(Stat::FlowRepicked);
    }
    rewrite_dst(ctx, pkt, &b.addr, b.port)?;
    count_backend(id, pkt.len as u64, true);
    Ok(true)
}
