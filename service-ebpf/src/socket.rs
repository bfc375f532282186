//! Socket-level load balancing: cgroup sock_addr hooks on `--cgroup-root`.
//!
//! - `connect4` (TCP and connected UDP) and `sendmsg4` (unconnected UDP):
//!   a Service address is replaced by a backend's before the socket ever
//!   sends a packet, chosen from the same frontend rows as the packet path
//!   (the Maglev table of the internal-scope frontend, which is what
//!   kube-proxy applies to traffic from the node itself: ClusterIPs under
//!   `internalTrafficPolicy`, NodePorts, LoadBalancer IPs and external IPs
//!   short-circuited to the cluster-wide endpoints), with ClientIP
//!   affinity. The socket's packets then carry the backend's address and
//!   need no translation at all. A Service without endpoints fails the
//!   call with ECONNREFUSED at once.
//! - `recvmsg4` and `getpeername4`: what the socket was translated to is
//!   shown as the Service address again (a UDP reply's source, a connected
//!   socket's peer), from `sock_rev_nat` keyed by socket cookie and
//!   backend.
//! - `sock_release` (a cgroup sock program): a connected socket's row goes
//!   when the socket is closed, so `sock_rev_nat` holds live sockets, not
//!   the history of every connection (an unconnected UDP socket's rows,
//!   one per backend it sent to, are left to LRU eviction).
//!
//! `--socket-lb` (the `socket_lb` row) says whose sockets: the node's own
//! network namespace only (`host`), every namespace under the cgroup root
//! (`all`), or none. A loopback address (a `--localhost-nodeports`
//! NodePort) is only ever translated for the node's own namespace.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval},
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
};
use service_common::{
    Addr, AffinityKey, AffinityValue, BackendValue, FAMILY_IPV4, MEMBER_SLOT, PROTO_TCP, PROTO_UDP, Port,
    SCOPE_INTERNAL, ServiceKey, SockRevNatKey, SockRevNatValue, hash, service_flags, socket_lb, stats::Counter,
};

use crate::{
    flow::ktime_ns,
    maps::{AFFINITY, BACKENDS, SERVICES, SOCK_COUNTERS, SOCK_REV_NAT, SOCKET_LB, count},
    nat::{ServiceIp, service_ip},
};

/// A sock_addr program's verdicts: let the call go on, or fail it (with
/// EPERM, or the errno `bpf_set_retval` set).
const ALLOW: i32 = 1;
const DENY: i32 = 0;
const ECONNREFUSED: i32 = 111;
const ENETUNREACH: i32 = 101;

#[cgroup_sock_addr(connect4)]
#[expect(clippy::needless_pass_by_value, reason = "the macro fixes the signature")]
pub fn service_sock_connect4(ctx: SockAddrContext) -> i32 {
    translate(&ctx, Counter::SockConnect)
}

#[cgroup_sock_addr(sendmsg4)]
#[expect(clippy::needless_pass_by_value, reason = "the macro fixes the signature")]
pub fn service_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    translate(&ctx, Counter::SockSendmsg)
}

#[cgroup_sock_addr(recvmsg4)]
#[expect(clippy::needless_pass_by_value, reason = "the macro fixes the signature")]
pub fn service_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
#[expect(clippy::needless_pass_by_value, reason = "the macro fixes the signature")]
pub fn service_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    restore(&ctx);
    ALLOW
}

#[cgroup_sock(sock_release)]
#[expect(clippy::needless_pass_by_value, reason = "the macro fixes the signature")]
pub fn service_sock_release(ctx: SockContext) -> i32 {
    forget(&ctx);
    ALLOW
}

/// sock_release: the row of a closing socket connected to a backend.
#[inline(always)]
fn forget(ctx: &SockContext) {
    // SAFETY: single field reads the verifier allows in sock_release
    // programs (dst_ip4 and dst_port: network byte order).
    let (family, protocol, ip, port) =
        unsafe { ((*ctx.sock).family, (*ctx.sock).protocol, (*ctx.sock).dst_ip4, (*ctx.sock).dst_port) };
    if family != 2 || (protocol != 6 && protocol != 17) || ip == 0 {
        return;
    }
    // SAFETY: a helper the kernel offers cgroup sock programs (5.10+).
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevNatKey {
        cookie,
        addr: service_common::addr_v4(ip.to_ne_bytes()),
        port: port.to_ne_bytes(),
        _pad: [0; 6],
    };
    // Not found: a socket this path never translated.
    let _ = SOCK_REV_NAT.remove(&key);
}

/// The address and port the call names (`user_ip4`, `user_port`: both in
/// network byte order, the port in the low 16 bits).
#[inline(always)]
fn user_addr(ctx: &SockAddrContext) -> (Addr, Port) {
    // SAFETY: single field reads of the context the kernel handed us; the
    // verifier allows both in every sock_addr program.
    let (ip, port) = unsafe { ((*ctx.sock_addr).user_ip4, (*ctx.sock_addr).user_port) };
    let ip = ip.to_ne_bytes();
    #[expect(clippy::cast_possible_truncation, reason = "the port is the low 16 bits")]
    let port = (port as u16).to_ne_bytes();
    (service_common::addr_v4(ip), port)
}

#[inline(always)]
fn set_user_addr(ctx: &SockAddrContext, addr: &Addr, port: Port) {
    // SAFETY: single field writes the verifier allows in connect4,
    // sendmsg4, recvmsg4 and getpeername4.
    unsafe {
        (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]);
        (*ctx.sock_addr).user_port = u32::from(u16::from_ne_bytes(port));
    }
}

/// Whether this socket is one `--socket-lb` translates towards `addr`: a
/// loopback address (`--localhost-nodeports`) only for the node's own
/// sockets, under `all` too, as a pod's 127.0.0.1 is its own.
#[inline(always)]
fn enabled(ctx: &SockAddrContext, addr: &Addr) -> bool {
    let Some(config) = SOCKET_LB.get(0) else { return false };
    // SAFETY: a helper the kernel offers sock_addr programs.
    let host = || (unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }) == config.host_netns_cookie;
    match config.mode {
        socket_lb::ALL => addr[0] != 127 || host(),
        socket_lb::HOST => host(),
        _ => false,
    }
}

/// The affinity "client" of a socket: its network namespace (its cookie
/// in bytes 8..16, which no IPv4 client address has set), so every socket
/// of the node (or of a pod) shares one entry per Service port, as every
/// connection from one source address does in the packet path.
#[inline(always)]
fn socket_client(ctx: &SockAddrContext) -> Addr {
    // SAFETY: a helper the kernel offers sock_addr programs.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }.to_ne_bytes();
    let mut client = [0u8; 16];
    client[8..].copy_from_slice(&netns);
    client
}

/// connect4 / sendmsg4: a Service address becomes a backend's.
#[inline(always)]
fn translate(ctx: &SockAddrContext, counter: Counter) -> i32 {
    // SAFETY: a single field read.
    let protocol = unsafe { (*ctx.sock_addr).protocol };
    let proto = match protocol {
        6 => PROTO_TCP,
        17 => PROTO_UDP,
        _ => return ALLOW,
    };
    let (addr, port) = user_addr(ctx);
    if !enabled(ctx, &addr) {
        return ALLOW;
    }
    let key = ServiceKey::frontend(FAMILY_IPV4, addr, port, proto, SCOPE_INTERNAL);
    // SAFETY: plain data written whole by the agent.
    let Some(service) = (unsafe { SERVICES.get(&key) }).copied() else { return unserved(&addr) };
    if service.count == 0 {
        // No endpoint (REJECT), or none this node may use (DROP): fail at
        // once rather than let the application wait for a timeout.
        // SAFETY: a helper the kernel offers cgroup programs.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        count(0, Counter::SockRefused);
        return DENY;
    }
    let Some((backend_id, backend)) = choose(ctx, &key, &service, proto) else { return ALLOW };
    // SAFETY: a helper the kernel offers sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let rev = SockRevNatKey { cookie, addr: backend.addr, port: backend.port, _pad: [0; 6] };
    let shown = SockRevNatValue { addr, port, proto, _pad: 0, rev_nat_id: service.rev_nat_id, backend_id };
    // Losing the row (a full map) only shows the backend's address to
    // recvmsg/getpeername: the connection itself works.
    let _ = SOCK_REV_NAT.insert(&rev, &shown, 0);
    set_user_addr(ctx, &backend.addr, backend.port);
    count(0, counter);
    if let Some(c) = SOCK_COUNTERS.get_ptr_mut(&service.rev_nat_id) {
        // SAFETY: a per-CPU value: only this CPU writes it.
        unsafe {
            if counter == Counter::SockConnect {
                (*c).connects += 1;
            } else {
                (*c).sendmsgs += 1;
            }
        }
    }
    ALLOW
}

/// No frontend for this address, port and protocol: from the service IP
/// rows ([`service_ip`], as the packet path decides). A ClusterIP's
/// unserved port or protocol fails with ECONNREFUSED, as kube-proxy's
/// reject makes it fail; another address of a service CIDR with
/// ENETUNREACH (kube-proxy drops it: the application would wait for a
/// timeout, and its packets would otherwise leave by the default route);
/// any other address is left alone.
#[inline(always)]
fn unserved(addr: &Addr) -> i32 {
    let errno = match service_ip(addr, service_common::FAMILY_IPV4) {
        ServiceIp::None => return ALLOW,
        ServiceIp::ClusterIp => ECONNREFUSED,
        ServiceIp::Unallocated => ENETUNREACH,
    };
    // SAFETY: a helper the kernel offers cgroup programs.
    unsafe { bpf_set_retval(-errno) };
    count(0, Counter::SockRefused);
    DENY
}

/// The backend for a new socket: its affinity entry's when the Service
/// has ClientIP affinity and the entry is fresh and still a member, else a
/// random slot of the frontend's Maglev table (a socket has no port yet to
/// hash; every slot is equally likely, as every flow hash is).
#[inline(always)]
fn choose(
    ctx: &SockAddrContext,
    key: &ServiceKey,
    service: &service_common::ServiceValue,
    proto: u8,
) -> Option<(u32, BackendValue)> {
    let sticky = service.flags & service_flags::AFFINITY != 0;
    let affinity_key = AffinityKey { client: socket_client(ctx), scope: service.affinity_scope(), proto, _pad: [0; 3] };
    let now = ktime_ns();
    if sticky
        // SAFETY: plain data; a racing update gives a stale but valid copy.
        && let Some(entry) = unsafe { AFFINITY.get(&affinity_key) }.copied()
        && now.saturating_sub(entry.last_used_ns) <= u64::from(service.affinity_timeout_s) * 1_000_000_000
    {
        let member = ServiceKey { slot: MEMBER_SLOT, version: entry.backend_id, ..*key };
        // SAFETY: plain data written whole by the agent.
        if unsafe { SERVICES.get(&member) }.is_some()
            && let Some(backend) = unsafe { BACKENDS.get(&entry.backend_id) }.copied()
        {
            let fresh = AffinityValue { last_used_ns: now, ..entry };
            let _ = AFFINITY.insert(&affinity_key, &fresh, 0);
            return Some((entry.backend_id, backend));
        }
    }
    // SAFETY: a helper without arguments.
    let random = unsafe { bpf_get_prandom_u32() };
    let slot = ServiceKey { slot: hash::slot_for(random, service.count), version: service.version, ..*key };
    // SAFETY: plain data written whole by the agent.
    let backend_id = unsafe { SERVICES.get(&slot) }?.backend_id;
    // SAFETY: as above.
    let backend = unsafe { BACKENDS.get(&backend_id) }.copied()?;
    if sticky {
        let entry = AffinityValue { backend_id, _pad: 0, last_used_ns: now };
        // Losing the entry only loses stickiness for the next socket.
        let _ = AFFINITY.insert(&affinity_key, &entry, 0);
    }
    Some((backend_id, backend))
}

/// recvmsg4 / getpeername4: a backend this socket was translated to is
/// shown as the Service address it asked for.
#[inline(always)]
fn restore(ctx: &SockAddrContext) {
    let (addr, port) = user_addr(ctx);
    // SAFETY: a helper the kernel offers sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevNatKey { cookie, addr, port, _pad: [0; 6] };
    // SAFETY: plain data written whole by connect4/sendmsg4.
    if let Some(shown) = unsafe { SOCK_REV_NAT.get(&key) }.copied() {
        set_user_addr(ctx, &shown.addr, shown.port);
        count(0, Counter::SockRevNat);
    }
}
