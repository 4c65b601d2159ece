//! The connect-time ambassador (cgroup `connect4` / `getpeername4`): a process in the
//! configured cgroup that connects to a service address is connected straight to a backend,
//! chosen from the same tables as the XDP path, with no proxy hop and no per-packet cost;
//! `getpeername` still shows the address it dialed. Processes outside the cgroup are untouched
//! (the userspace data plane serves them on the service address).
//!
//! At `connect()` the source port is not chosen yet, so the choice is per connection: the
//! socket cookie stands in for the client in the hash.

use ambassador_ebpf::{
    flow_slot, KeyMode, ServiceKey, FAMILY_V4, NO_BACKEND, PROTO_TCP, PROTO_UDP,
    SERVICE_CONNECT_TIME, TABLE_SIZE,
};
use aya_ebpf::{
    helpers::bpf_get_socket_cookie,
    macros::{cgroup_sock_addr, map},
    maps::LruHashMap,
    programs::SockAddrContext,
};

use crate::xdp::{BACKENDS, RINGS, SERVICES};

/// Socket cookie → the address it dialed (wire address, wire port), for `getpeername`.
#[map]
static DIALED: LruHashMap<u64, [u32; 2]> = LruHashMap::with_max_entries(65_536, 0);

/// Let the call proceed (cgroup sock_addr programs return 1 to allow, 0 to refuse).
const ALLOW: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn ambassador_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    let proto = match sa.protocol {
        6 => PROTO_TCP,
        17 => PROTO_UDP,
        _ => return ALLOW,
    };
    let dst = sa.user_ip4;
    let port = sa.user_port as u16;
    let key = ServiceKey {
        addr: [dst, 0, 0, 0],
        port,
        proto,
        family: FAMILY_V4,
    };
    // SAFETY: plain data read once; a concurrent update replaces the element (RCU).
    let Some(svc) = (unsafe { SERVICES.get(&key) }) else {
        return ALLOW;
    };
    if svc.flags & SERVICE_CONNECT_TIME == 0 {
        return ALLOW;
    }
    // SAFETY: plain helper call on our context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let slot = flow_slot(
        KeyMode::SrcIp as u32,
        svc.seed,
        &[cookie as u32, (cookie >> 32) as u32, 0, 0],
        &key.addr,
        0,
        port,
        proto,
        FAMILY_V4,
    );
    let id = match RINGS.get(svc.ring * TABLE_SIZE + slot) {
        Some(id) if *id != NO_BACKEND => *id,
        // No backend: leave the address alone; the userspace data plane answers (and refuses).
        _ => return ALLOW,
    };
    let Some(b) = BACKENDS.get(id) else {
        return ALLOW;
    };
    if b.valid == 0 || b.family != FAMILY_V4 {
        return ALLOW;
    }
    let _ = DIALED.insert(&cookie, &[dst, port as u32], 0);
    sa.user_ip4 = b.addr[0];
    sa.user_port = b.port as u32;
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn ambassador_getpeername4(ctx: SockAddrContext) -> i32 {
    // SAFETY: plain helper call on our context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // SAFETY: plain data read once.
    if let Some(d) = unsafe { DIALED.get(&cookie) } {
        let (addr, port) = (d[0], d[1]);
        // SAFETY: the kernel passes a valid bpf_sock_addr for the program's lifetime.
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip4 = addr;
        sa.user_port = port;
    }
    ALLOW
}
