//! The connect-time ambassador (cgroup `connect4/6`, `getpeername4/6`, and for UDP
//! `sendmsg4/6`, `recvmsg4/6`): a process in the
//! configured cgroup that connects to a service address is connected straight to a backend,
//! chosen from the same tables as the XDP path, with no proxy hop and no per-packet cost;
//! `getpeername` still shows the address it dialed. Processes outside the cgroup are untouched
//! (the userspace data plane serves them on the service address).
//!
//! At `connect()` the source port is not chosen yet, so the choice is per connection: the
//! socket cookie stands in for the client in the hash.

use ambassador_ebpf::{
    flow_slot, KeyMode, ServiceKey, FAMILY_V4, FAMILY_V6, NO_BACKEND, PROTO_TCP, PROTO_UDP,
    SERVICE_CONNECT_TIME, TABLE_SIZE,
};
use aya_ebpf::{
    helpers::bpf_get_socket_cookie,
    macros::{cgroup_sock_addr, map},
    maps::LruHashMap,
    programs::SockAddrContext,
};

use crate::maps::{BACKENDS, RINGS, SERVICES};

/// What a socket dialed (wire words, wire port), for `getpeername`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Dialed {
    addr: [u32; 4],
    port: u32,
    /// The backend it was connected to (replies from it are shown as from `addr`).
    backend: [u32; 4],
    backend_port: u32,
}

/// Socket cookie → what it dialed.
#[map]
static DIALED: LruHashMap<u64, Dialed> = LruHashMap::with_max_entries(65_536, 0);

/// Let the call proceed (cgroup sock_addr programs return 1 to allow, 0 to refuse).
const ALLOW: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn ambassador_connect4(ctx: SockAddrContext) -> i32 {
    redirect4(&ctx)
}

#[inline(always)]
fn redirect4(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    if let Some(b) = pick(
        ctx,
        [sa.user_ip4, 0, 0, 0],
        sa.user_port,
        sa.protocol,
        FAMILY_V4,
    ) {
        sa.user_ip4 = b.0[0];
        sa.user_port = b.1;
    }
    ALLOW
}

/// UDP without connect(): each datagram to the service goes to the socket's backend.
#[cgroup_sock_addr(sendmsg4)]
pub fn ambassador_sendmsg4(ctx: SockAddrContext) -> i32 {
    redirect4(&ctx)
}

/// UDP replies from the backend read as from the service address (`recvfrom`).
#[cgroup_sock_addr(recvmsg4)]
pub fn ambassador_recvmsg4(ctx: SockAddrContext) -> i32 {
    // SAFETY: plain helper call on our context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // SAFETY: plain data read once.
    if let Some(d) = unsafe { DIALED.get(&cookie) } {
        // SAFETY: the kernel passes a valid bpf_sock_addr for the program's lifetime.
        let sa = unsafe { &mut *ctx.sock_addr };
        if sa.user_ip4 == d.backend[0] && sa.user_port == d.backend_port {
            sa.user_ip4 = d.addr[0];
            sa.user_port = d.port;
        }
    }
    ALLOW
}

#[cgroup_sock_addr(sendmsg6)]
pub fn ambassador_sendmsg6(ctx: SockAddrContext) -> i32 {
    redirect6(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn ambassador_recvmsg6(ctx: SockAddrContext) -> i32 {
    // SAFETY: plain helper call on our context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // SAFETY: plain data read once.
    if let Some(d) = unsafe { DIALED.get(&cookie) } {
        let (addr, port, backend, backend_port) = (d.addr, d.port, d.backend, d.backend_port);
        // SAFETY: the kernel passes a valid bpf_sock_addr for the program's lifetime.
        let sa = unsafe { &mut *ctx.sock_addr };
        let from = [
            sa.user_ip6[0],
            sa.user_ip6[1],
            sa.user_ip6[2],
            sa.user_ip6[3],
        ];
        if from == backend && sa.user_port == backend_port {
            sa.user_ip6[0] = addr[0];
            sa.user_ip6[1] = addr[1];
            sa.user_ip6[2] = addr[2];
            sa.user_ip6[3] = addr[3];
            sa.user_port = port;
        }
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn ambassador_connect6(ctx: SockAddrContext) -> i32 {
    redirect6(&ctx)
}

#[inline(always)]
fn redirect6(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    let dst = [
        sa.user_ip6[0],
        sa.user_ip6[1],
        sa.user_ip6[2],
        sa.user_ip6[3],
    ];
    if let Some(b) = pick(ctx, dst, sa.user_port, sa.protocol, FAMILY_V6) {
        sa.user_ip6[0] = b.0[0];
        sa.user_ip6[1] = b.0[1];
        sa.user_ip6[2] = b.0[2];
        sa.user_ip6[3] = b.0[3];
        sa.user_port = b.1;
    }
    ALLOW
}

/// The backend (wire address, wire port) for a connection to `dst:port` when that is a
/// connect-time service, remembering what was dialed for `getpeername`.
#[inline(always)]
fn pick(
    ctx: &SockAddrContext,
    dst: [u32; 4],
    user_port: u32,
    protocol: u32,
    family: u8,
) -> Option<([u32; 4], u32)> {
    let proto = match protocol {
        6 => PROTO_TCP,
        17 => PROTO_UDP,
        _ => return None,
    };
    let port = user_port as u16;
    let key = ServiceKey {
        addr: dst,
        port,
        proto,
        family,
    };
    // SAFETY: plain data read once; a concurrent update replaces the element (RCU).
    let svc = unsafe { SERVICES.get(&key) }?;
    if svc.flags & SERVICE_CONNECT_TIME == 0 {
        return None;
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
        family,
    );
    // No backend: leave the address alone; the userspace data plane answers (and refuses).
    let id = *RINGS.get(svc.ring * TABLE_SIZE + slot)?;
    if id == NO_BACKEND {
        return None;
    }
    let b = BACKENDS.get(id)?;
    if b.flags & ambassador_ebpf::BACKEND_VALID == 0 || b.family != family {
        return None;
    }
    let d = Dialed {
        addr: dst,
        port: port as u32,
        backend: b.addr,
        backend_port: b.port as u32,
    };
    // Word by word, volatile: LLVM would merge the zero words of an IPv4 address into one
    // misaligned 8-byte stack store, which the verifier refuses.
    let mut raw = core::mem::MaybeUninit::<Dialed>::uninit();
    let w = raw.as_mut_ptr() as *mut u32;
    let words = [
        d.addr[0],
        d.addr[1],
        d.addr[2],
        d.addr[3],
        d.port,
        d.backend[0],
        d.backend[1],
        d.backend[2],
        d.backend[3],
        d.backend_port,
    ];
    for (i, v) in words.iter().enumerate() {
        // SAFETY: Dialed is ten u32 words (repr(C)), 4-aligned.
        unsafe { w.add(i).write_volatile(*v) };
    }
    // SAFETY: every word was just written.
    let _ = DIALED.insert(&cookie, unsafe { raw.assume_init_ref() }, 0);
    Some((b.addr, b.port as u32))
}

#[cgroup_sock_addr(getpeername4)]
pub fn ambassador_getpeername4(ctx: SockAddrContext) -> i32 {
    // SAFETY: plain helper call on our context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // SAFETY: plain data read once.
    if let Some(d) = unsafe { DIALED.get(&cookie) } {
        let (addr, port) = (d.addr[0], d.port);
        // SAFETY: the kernel passes a valid bpf_sock_addr for the program's lifetime.
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip4 = addr;
        sa.user_port = port;
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn ambassador_getpeername6(ctx: SockAddrContext) -> i32 {
    // SAFETY: plain helper call on our context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // SAFETY: plain data read once.
    if let Some(d) = unsafe { DIALED.get(&cookie) } {
        let (addr, port) = (d.addr, d.port);
        // SAFETY: the kernel passes a valid bpf_sock_addr for the program's lifetime.
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip6[0] = addr[0];
        sa.user_ip6[1] = addr[1];
        sa.user_ip6[2] = addr[2];
        sa.user_ip6[3] = addr[3];
        sa.user_port = port;
    }
    ALLOW
}
