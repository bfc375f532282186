//! Socket-level load balancing: cgroup sock_addr hooks on `--cgroup-root`.
//!
//! - `connect4` (TCP and connected UDP) and `sendmsg4` (unconnected UDP),
//!   and their IPv6 twins `connect6` and `sendmsg6`:
//!   a Service address is replaced by a backend's before the socket ever
//!   sends a packet, chosen from the same frontend row and backend table
//!   as the packet path (the internal-scope frontend's, which is what
//!   kube-proxy applies to traffic from the node itself: ClusterIPs under
//!   `internalTrafficPolicy`, NodePorts, LoadBalancer IPs and external IPs
//!   short-circuited to the cluster-wide endpoints), with ClientIP
//!   affinity. The socket's packets then carry the backend's address and
//!   need no translation at all. A Service without endpoints fails the
//!   call with ECONNREFUSED at once.
//! - `recvmsg4` and `getpeername4` (and `recvmsg6`, `getpeername6`): what
//!   the socket was translated to is
//!   shown as the Service address again (a UDP reply's source, a connected
//!   socket's peer), from `sock_rev_nat` keyed by socket cookie and
//!   backend.
//! - An IPv6 socket may name an IPv4 address as a v4-mapped one
//!   (`::ffff:a.b.c.d`: dual-stack applications such as Java do): the
//!   `*6` hooks translate it with the IPv4 frontends and write the IPv4
//!   backend back v4-mapped, as Cilium's sock6 hooks do.
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
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval},
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
};
use service_common::{
    Addr, AffinityKey, AffinityValue, BackendValue, FAMILY_IPV4, FAMILY_IPV6, PROTO_TCP, PROTO_UDP, Port,
    SCOPE_INTERNAL, ServiceKey, ServiceValue, SockRevNatKey, SockRevNatValue, hash, service_flags, socket_lb,
    stats::Counter,
};

use crate::{
    backend_table::{is_member, slot_backend},
    flow::ktime_ns,
    maps::{AFFINITY, BACKENDS, SERVICES, SOCK_COUNTERS, SOCK_REV_NAT, SOCKET_LB, count, counter_row, rev_nat_is_live},
    nat::{ServiceIp, service_ip},
};

/// A sock_addr program's verdicts: let the call go on, or fail it (with
/// EPERM, or the errno `bpf_set_retval` set).
const ALLOW: i32 = 1;
const DENY: i32 = 0;
const ECONNREFUSED: i32 = 111;
const ENETUNREACH: i32 = 101;

/// Which sock_addr hooks a program is: the IPv4 ones (`connect4`, …) may
/// only touch `user_ip4`, the IPv6 ones only `user_ip6`
/// (`sock_addr_is_valid_access`), so every access is picked at compile
/// time by this const generic.
const V4: bool = false;
const V6: bool = true;

/// `::ffff:0:0/96`'s third word (`00 00 ff ff`, as the network-order word
/// reads in memory).
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

#[cgroup_sock_addr(connect4)]
#[expect(clippy::needless_pass_by_value, reason = "the macro fixes the signature")]
pub fn service_sock_connect4(ctx: SockAddrContext) -> i32 {
    translate::<V4>(&ctx, Counter::SockConnect)
}

#[cgroup_sock_addr(sendmsg4)]
#[expect(clippy::needless_pass_by_value, reason = "the macro fixes the signature")]
pub fn service_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    translate::<V4>(&ctx, Counter::SockSendmsg)
}

#[cgroup_sock_addr(recvmsg4)]
#[expect(clippy::needless_pass_by_value, reason = "the macro fixes the signature")]
pub fn service_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore::<V4>(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
#[expect(clippy::needless_pass_by_value, reason = "the macro fixes the signature")]
pub fn service_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    restore::<V4>(&ctx);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
#[expect(clippy::needless_pass_by_value, reason = "the macro fixes the signature")]
pub fn service_sock_connect6(ctx: SockAddrContext) -> i32 {
    translate::<V6>(&ctx, Counter::SockConnect)
}

#[cgroup_sock_addr(sendmsg6)]
#[expect(clippy::needless_pass_by_value, reason = "the macro fixes the signature")]
pub fn service_sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    translate::<V6>(&ctx, Counter::SockSendmsg)
}

#[cgroup_sock_addr(recvmsg6)]
#[expect(clippy::needless_pass_by_value, reason = "the macro fixes the signature")]
pub fn service_sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    restore::<V6>(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
#[expect(clippy::needless_pass_by_value, reason = "the macro fixes the signature")]
pub fn service_sock_getpeername6(ctx: SockAddrContext) -> i32 {
    restore::<V6>(&ctx);
    ALLOW
}

#[cgroup_sock(sock_release)]
#[expect(clippy::needless_pass_by_value, reason = "the macro fixes the signature")]
pub fn service_sock_release(ctx: SockContext) -> i32 {
    forget(&ctx);
    ALLOW
}

/// An address as the maps hold it, from four network-order words (an IPv6
/// address, `user_ip6` or `dst_ip6`): a v4-mapped one becomes the IPv4
/// address it maps.
#[inline(always)]
fn from_words(w: [u32; 4]) -> (u8, Addr) {
    if w[0] == 0 && w[1] == 0 && w[2] == V4_MAPPED_WORD {
        return (FAMILY_IPV4, service_common::addr_v4(w[3].to_ne_bytes()));
    }
    let mut addr = [0u8; 16];
    addr[0..4].copy_from_slice(&w[0].to_ne_bytes());
    addr[4..8].copy_from_slice(&w[1].to_ne_bytes());
    addr[8..12].copy_from_slice(&w[2].to_ne_bytes());
    addr[12..16].copy_from_slice(&w[3].to_ne_bytes());
    (FAMILY_IPV6, addr)
}

/// The four network-order words of an IPv6 socket's view of `addr`: an
/// IPv4 address v4-mapped.
#[inline(always)]
fn to_words(family: u8, addr: &Addr) -> [u32; 4] {
    let word = |i: usize| u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    if family == FAMILY_IPV4 { [0, 0, V4_MAPPED_WORD, word(0)] } else { [word(0), word(4), word(8), word(12)] }
}

/// sock_release: the row of a closing socket connected to a backend.
#[inline(always)]
fn forget(ctx: &SockContext) {
    // SAFETY: single field reads the verifier allows in sock_release
    // programs (network byte order).
    let (family, protocol, port) = unsafe { ((*ctx.sock).family, (*ctx.sock).protocol, (*ctx.sock).dst_port) };
    if protocol != 6 && protocol != 17 {
        return;
    }
    let (family, addr) = match family {
        // SAFETY: as above.
        2 => (FAMILY_IPV4, service_common::addr_v4(unsafe { (*ctx.sock).dst_ip4 }.to_ne_bytes())),
        10 => {
            let ip6 = unsafe { core::ptr::addr_of!((*ctx.sock).dst_ip6) }.cast::<u32>();
            // SAFETY: four 32-bit reads of dst_ip6, the access width the
            // verifier allows (bpf_sock_is_valid_access); volatile so no
            // two are merged into a wider load.
            from_words(unsafe {
                [
                    ip6.read_volatile(),
                    ip6.add(1).read_volatile(),
                    ip6.add(2).read_volatile(),
                    ip6.add(3).read_volatile(),
                ]
            })
        }
        _ => return,
    };
    if addr == [0; 16] {
        return;
    }
    // SAFETY: a helper the kernel offers cgroup sock programs (5.10+).
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevNatKey { cookie, addr, port: port.to_ne_bytes(), family, _pad: [0; 5] };
    // Not found: a socket this path never translated.
    let _ = SOCK_REV_NAT.remove(&key);
}

/// The `user_ip6` words of the call.
#[inline(always)]
fn user_ip6(sa: *mut bpf_sock_addr) -> *mut u32 {
    // SAFETY: only the field's address is taken.
    unsafe { core::ptr::addr_of_mut!((*sa).user_ip6) }.cast::<u32>()
}

/// The address (with its family) and port the call names (`user_ip4` or
/// `user_ip6`, `user_port`: network byte order, the port in the low 16
/// bits). A v4-mapped address on an IPv6 socket is an IPv4 one.
#[inline(always)]
fn user_addr<const IP6: bool>(ctx: &SockAddrContext) -> (u8, Addr, Port) {
    let sa = ctx.sock_addr;
    // SAFETY: single field read of the context the kernel handed us; the
    // verifier allows it in every sock_addr program.
    let port = unsafe { (*sa).user_port };
    #[expect(clippy::cast_possible_truncation, reason = "the port is the low 16 bits")]
    let port = (port as u16).to_ne_bytes();
    if IP6 {
        let ip6 = user_ip6(sa);
        // SAFETY: four 32-bit reads of user_ip6, allowed in the *6 hooks;
        // volatile, so none is merged into a 64-bit load.
        let words = unsafe {
            [ip6.read_volatile(), ip6.add(1).read_volatile(), ip6.add(2).read_volatile(), ip6.add(3).read_volatile()]
        };
        let (family, addr) = from_words(words);
        (family, addr, port)
    } else {
        // SAFETY: a single field read, allowed in the *4 hooks.
        let ip = unsafe { (*sa).user_ip4 };
        (FAMILY_IPV4, service_common::addr_v4(ip.to_ne_bytes()), port)
    }
}

/// Writes `addr` (of `family`) and `port` as the call's address: an IPv4
/// address v4-mapped for an IPv6 socket.
#[inline(always)]
fn set_user_addr<const IP6: bool>(ctx: &SockAddrContext, family: u8, addr: &Addr, port: Port) {
    let sa = ctx.sock_addr;
    if IP6 {
        let words = to_words(family, addr);
        let ip6 = user_ip6(sa);
        // SAFETY: four 32-bit writes of user_ip6: the only width the
        // verifier allows for it (connect6, sendmsg6, recvmsg6,
        // getpeername6); volatile, so none is merged into a 64-bit store.
        unsafe {
            ip6.write_volatile(words[0]);
            ip6.add(1).write_volatile(words[1]);
            ip6.add(2).write_volatile(words[2]);
            ip6.add(3).write_volatile(words[3]);
        }
    } else {
        // SAFETY: a single field write the verifier allows in connect4,
        // sendmsg4, recvmsg4 and getpeername4.
        unsafe { (*sa).user_ip4 = u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]) };
    }
    // SAFETY: a single field write allowed in every hook above.
    unsafe { (*sa).user_port = u32::from(u16::from_ne_bytes(port)) };
}

/// Whether this socket is one `--socket-lb` translates towards `addr`: an
/// IPv4 loopback address (`--localhost-nodeports`, IPv4 only as in
/// kube-proxy; v4-mapped too) only for the node's own sockets, under `all`
/// too, as a pod's 127.0.0.1 is its own.
#[inline(always)]
fn enabled(ctx: &SockAddrContext, family: u8, addr: &Addr) -> bool {
    let Some(config) = SOCKET_LB.get(0) else { return false };
    // SAFETY: a helper the kernel offers sock_addr programs.
    let host = || (unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }) == config.host_netns_cookie;
    match config.mode {
        socket_lb::ALL => family != FAMILY_IPV4 || addr[0] != 127 || host(),
        socket_lb::HOST => host(),
        _ => false,
    }
}

/// The affinity "client" of a socket: its network namespace (its cookie
/// in bytes 8..16, which no IPv4 client address has set, nor an IPv6 one
/// outside `::/64`), so every socket of the node (or of a pod) shares one
/// entry per Service port, as every connection from one source address
/// does in the packet path.
#[inline(always)]
fn socket_client(ctx: &SockAddrContext) -> Addr {
    // SAFETY: a helper the kernel offers sock_addr programs.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }.to_ne_bytes();
    let mut client = [0u8; 16];
    client[8..].copy_from_slice(&netns);
    client
}

/// connect4/6 / sendmsg4/6: a Service address becomes a backend's.
#[inline(always)]
fn translate<const IP6: bool>(ctx: &SockAddrContext, counter: Counter) -> i32 {
    // SAFETY: a single field read.
    let protocol = unsafe { (*ctx.sock_addr).protocol };
    let proto = match protocol {
        6 => PROTO_TCP,
        17 => PROTO_UDP,
        _ => return ALLOW,
    };
    let (family, addr, port) = user_addr::<IP6>(ctx);
    if !enabled(ctx, family, &addr) {
        return ALLOW;
    }
    let key = ServiceKey::frontend(family, addr, port, proto, SCOPE_INTERNAL);
    // SAFETY: plain data written whole by the agent.
    let Some(service) = (unsafe { SERVICES.get(&key) }).copied() else { return unserved(family, &addr) };
    if service.count == 0 {
        // No endpoint (REJECT), or none this node may use (DROP): fail at
        // once rather than let the application wait for a timeout.
        // SAFETY: a helper the kernel offers cgroup programs.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        count(0, Counter::SockRefused);
        return DENY;
    }
    let Some((backend_id, backend)) = choose(ctx, &service, proto) else { return ALLOW };
    // A backend of the other family (the model serves each family from
    // its own endpoints, so none is written) cannot be reached this way.
    if backend.family != family {
        return ALLOW;
    }
    // SAFETY: a helper the kernel offers sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let rev = SockRevNatKey { cookie, addr: backend.addr, port: backend.port, family, _pad: [0; 5] };
    let shown = SockRevNatValue { addr, port, proto, family, rev_nat_id: service.rev_nat_id, backend_id };
    // Losing the row (a full map) only shows the backend's address to
    // recvmsg/getpeername: the connection itself works.
    let _ = SOCK_REV_NAT.insert(&rev, &shown, 0);
    set_user_addr::<IP6>(ctx, family, &backend.addr, backend.port);
    count(0, counter);
    if let Some(c) = counter_row(&SOCK_COUNTERS, service.rev_nat_id, rev_nat_is_live) {
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
/// rows (as the packet path decides). A ClusterIP's unserved port or
/// protocol fails with ECONNREFUSED, as kube-proxy's reject makes it fail;
/// another address of a service CIDR with ENETUNREACH (kube-proxy drops
/// it: the application would wait for a timeout, and its packets would
/// otherwise leave by the default route); any other address is left alone.
/// The rows of the address's family ([`service_ip`]).
#[inline(always)]
fn unserved(family: u8, addr: &Addr) -> i32 {
    let errno = match service_ip(addr, family) {
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
/// has ClientIP affinity and the entry is fresh and still a member of the
/// frontend's backend set, else a random slot of the frontend's Maglev
/// table (a socket has no port yet to hash; every slot is equally likely,
/// as every flow hash is). Both from the frontend's table in
/// `backend_slots`, read as the packet path reads it
/// ([`crate::backend_table`]).
#[inline(always)]
fn choose(ctx: &SockAddrContext, service: &ServiceValue, proto: u8) -> Option<(u32, BackendValue)> {
    let sticky = service.flags & service_flags::AFFINITY != 0;
    let affinity_key = AffinityKey { client: socket_client(ctx), scope: service.affinity_scope, proto, _pad: [0; 3] };
    let now = ktime_ns();
    if sticky
        // SAFETY: plain data; a racing update gives a stale but valid copy.
        && let Some(entry) = unsafe { AFFINITY.get(&affinity_key) }.copied()
        && now.saturating_sub(entry.last_used_ns) <= u64::from(service.affinity_timeout_s) * 1_000_000_000
        && is_member(service, entry.backend_id)
        // SAFETY: plain data written whole by the agent.
        && let Some(backend) = unsafe { BACKENDS.get(&entry.backend_id) }.copied()
    {
        let fresh = AffinityValue { last_used_ns: now, ..entry };
        let _ = AFFINITY.insert(&affinity_key, &fresh, 0);
        return Some((entry.backend_id, backend));
    }
    // `translate` refused a frontend without slots already; checked again
    // beside the modulo so it never needs a division-by-zero panic path
    // (which the verifier would reject), however the calls are inlined.
    let count = service.count;
    if count == 0 {
        return None;
    }
    // SAFETY: a helper without arguments.
    let random = unsafe { bpf_get_prandom_u32() };
    let backend_id = slot_backend(service.table, count, hash::slot_for(random, count))?;
    // SAFETY: plain data written whole by the agent.
    let backend = unsafe { BACKENDS.get(&backend_id) }.copied()?;
    if sticky {
        let entry = AffinityValue { backend_id, _pad: 0, last_used_ns: now };
        // Losing the entry only loses stickiness for the next socket.
        let _ = AFFINITY.insert(&affinity_key, &entry, 0);
    }
    Some((backend_id, backend))
}

/// recvmsg4/6 / getpeername4/6: a backend this socket was translated to
/// is shown as the Service address it asked for.
#[inline(always)]
fn restore<const IP6: bool>(ctx: &SockAddrContext) {
    let (family, addr, port) = user_addr::<IP6>(ctx);
    // SAFETY: a helper the kernel offers sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevNatKey { cookie, addr, port, family, _pad: [0; 5] };
    // SAFETY: plain data written whole by connect/sendmsg.
    if let Some(shown) = unsafe { SOCK_REV_NAT.get(&key) }.copied() {
        set_user_addr::<IP6>(ctx, shown.family, &shown.addr, shown.port);
        count(0, Counter::SockRevNat);
    }
}
