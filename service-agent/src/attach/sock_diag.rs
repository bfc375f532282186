//! Closing the UDP sockets the socket path connected to a backend that
//! has since left its Service: kube-proxy flushes such flows' UDP
//! conntrack entries so the next datagram picks a live endpoint; a
//! connected socket has no entry to flush (its address *is* the backend's),
//! so it is aborted instead, as Cilium does: the application's next call
//! fails with ECONNABORTED and the socket is disconnected, and a client
//! that connects again is translated to a live backend. Unconnected
//! sockets are left alone (their next sendmsg is translated afresh), and
//! TCP is never touched (a removed backend that still runs finishes its
//! connections, as under kube-proxy).
//!
//! Sockets are found with `NETLINK_SOCK_DIAG` (a dump of the namespace's
//! UDP sockets, IPv4 and IPv6: an IPv6 socket connected to a v4-mapped
//! address, `::ffff:a.b.c.d`, is matched by that IPv4 peer, which is how
//! the socket path records it) and closed with `SOCK_DESTROY` (`CONFIG_INET_DIAG_DESTROY`),
//! matched by socket cookie *and* peer: a socket whose cookie is in
//! `sock_rev_nat` but that was connected elsewhere since is not closed.
//! Sockets live in their own network namespace: the node's are found from
//! the agent's; with `--socket-lb all`, the namespaces of the node's
//! processes are visited too (a thread enters each) while targets remain.

use std::{
    collections::BTreeSet,
    io,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
};

/// A socket to close: its cookie and the backend it is connected to.
pub type Target = (u64, SocketAddr);

/// A socket found by a dump: its family (`AF_INET` or `AF_INET6`, which
/// the `SOCK_DESTROY` request must name) and its socket id.
type Found = (u8, [u8; SOCKID_LEN]);

/// `NETLINK_SOCK_DIAG`, `SOCK_DIAG_BY_FAMILY` and `SOCK_DESTROY` from
/// `linux/sock_diag.h`.
const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDRLEN: usize = 16;
/// `struct inet_diag_sockid`: ports, 4 × 32-bit source and destination
/// addresses, interface, cookie.
const SOCKID_LEN: usize = 48;
/// `struct inet_diag_req_v2`: family, protocol, extensions, pad, states,
/// sockid.
const REQ_LEN: usize = 8 + SOCKID_LEN;
/// `struct inet_diag_msg`: family, state, timer, retransmits, sockid,
/// then five 32-bit fields.
const MSG_LEN: usize = 4 + SOCKID_LEN + 20;

/// Closes the connected UDP sockets among `targets`: in the agent's own
/// network namespace, then (`other_namespaces`) in those of the node's
/// processes while some are left. Returns how many were closed.
///
/// # Errors
/// When the agent's own namespace cannot be dumped (no `NETLINK_SOCK_DIAG`,
/// or no permission); another namespace that cannot be entered is skipped.
pub fn destroy_udp(targets: &[Target], other_namespaces: bool) -> io::Result<usize> {
    let mut left: BTreeSet<Target> = targets.iter().copied().collect();
    if left.is_empty() {
        return Ok(0);
    }
    let mut closed = destroy_here(&mut left)?;
    if other_namespaces && !left.is_empty() {
        let own = std::fs::metadata("/proc/self/ns/net").map(|m| (m.dev(), m.ino())).ok();
        for path in namespaces().into_iter().filter(|(id, _)| Some(*id) != own).map(|(_, p)| p) {
            if left.is_empty() {
                break;
            }
            let mut theirs = left.clone();
            // setns(2) moves the calling thread only: a thread of its own
            // enters the namespace and ends there.
            let outcome = std::thread::scope(|s| {
                s.spawn(|| -> io::Result<usize> {
                    enter(&path)?;
                    destroy_here(&mut theirs)
                })
                .join()
            });
            if let Ok(Ok(n)) = outcome {
                closed += n;
                left = theirs;
            }
        }
    }
    Ok(closed)
}

/// The network namespaces of the node's processes, one path each (by
/// device and inode).
fn namespaces() -> Vec<((u64, u64), std::path::PathBuf)> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return out };
    for entry in dir.filter_map(Result::ok) {
        if !entry.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let path = entry.path().join("ns/net");
        if let Ok(m) = std::fs::metadata(&path)
            && seen.insert((m.dev(), m.ino()))
        {
            out.push(((m.dev(), m.ino()), path));
        }
    }
    out
}

/// Moves this thread into the network namespace at `path`.
fn enter(path: &std::path::Path) -> io::Result<()> {
    let file = std::fs::File::open(path)?;
    // SAFETY: setns(2) on a namespace file we hold open.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Closes the sockets of `left` found in the current namespace, removing
/// them from `left`.
fn destroy_here(left: &mut BTreeSet<Target>) -> io::Result<usize> {
    let fd = diag_socket()?;
    let mut found: Vec<Found> = Vec::new();
    for family in [AF_INET, AF_INET6] {
        let ids = dump_udp(&fd, family)?;
        found.extend(ids.into_iter().filter(|id| left.remove(&(cookie(id), peer(family, id)))).map(|id| (family, id)));
    }
    let mut closed = 0;
    for (family, id) in found {
        match request(&fd, SOCK_DESTROY, libc::NLM_F_REQUEST | libc::NLM_F_ACK, family, &id) {
            Ok(()) => closed += 1,
            // Closed by its owner since the dump.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(closed)
}

fn diag_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the returned fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, NETLINK_SOCK_DIAG) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The cookie of a socket id (two 32-bit halves in host order, low first:
/// the value `bpf_get_socket_cookie` gives programs).
fn cookie(id: &[u8; SOCKID_LEN]) -> u64 {
    let low = u32::from_ne_bytes([id[40], id[41], id[42], id[43]]);
    let high = u32::from_ne_bytes([id[44], id[45], id[46], id[47]]);
    u64::from(high) << 32 | u64::from(low)
}

/// The peer of a socket id of `family` (destination port, and the first
/// address word or all four, in network order); a v4-mapped IPv6 peer is
/// the IPv4 address it maps.
fn peer(family: u8, id: &[u8; SOCKID_LEN]) -> SocketAddr {
    let port = u16::from_be_bytes([id[2], id[3]]);
    if family == AF_INET {
        return SocketAddr::new(IpAddr::from([id[20], id[21], id[22], id[23]]), port);
    }
    let mut octets = [0u8; 16];
    octets.copy_from_slice(&id[20..36]);
    let ip = Ipv6Addr::from(octets);
    SocketAddr::new(ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4), port)
}

/// `AF_INET` and `AF_INET6`, as the one byte `inet_diag_req_v2` holds.
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const _: () = assert!(AF_INET as libc::c_int == libc::AF_INET && AF_INET6 as libc::c_int == libc::AF_INET6);

/// One `inet_diag_req_v2` message for UDP of `family`, every state, about
/// `id`.
fn message(kind: u16, flags: libc::c_int, seq: u32, family: u8, id: &[u8; SOCKID_LEN]) -> Vec<u8> {
    let len = NLMSG_HDRLEN + REQ_LEN;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&u32::try_from(len).unwrap_or_default().to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&u16::try_from(flags).unwrap_or_default().to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.push(family);
    m.push(u8::try_from(libc::IPPROTO_UDP).unwrap_or_default());
    m.extend_from_slice(&[0, 0]);
    m.extend_from_slice(&u32::MAX.to_ne_bytes());
    m.extend_from_slice(id);
    m
}

fn send(fd: &OwnedFd, m: &[u8]) -> io::Result<()> {
    // SAFETY: m is readable for m.len() bytes; the kernel is the
    // destination (an unbound netlink socket sends to pid 0).
    let n = unsafe { libc::send(fd.as_raw_fd(), m.as_ptr().cast(), m.len(), 0) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Reads datagrams, handing each netlink message (type, payload) to `each`
/// until it returns `Some`.
fn receive<T>(fd: &OwnedFd, mut each: impl FnMut(u16, &[u8]) -> Option<io::Result<T>>) -> io::Result<T> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: buf is writable for buf.len() bytes.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        let mut at = 0;
        while at + NLMSG_HDRLEN <= n {
            let len = u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
            let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
            if len < NLMSG_HDRLEN || at + len > n {
                return Err(io::Error::other("malformed netlink message"));
            }
            if let Some(done) = each(kind, &buf[at + NLMSG_HDRLEN..at + len]) {
                return done;
            }
            at += (len + 3) & !3;
        }
    }
}

/// The error an `NLMSG_ERROR` payload carries (`Ok` for an ack).
fn nl_error(payload: &[u8]) -> io::Result<()> {
    let code = payload.get(..4).map_or(-libc::EPROTO, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    if code == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(-code)) }
}

/// The socket ids of every UDP socket of `family` in the current namespace.
fn dump_udp(fd: &OwnedFd, family: u8) -> io::Result<Vec<[u8; SOCKID_LEN]>> {
    send(fd, &message(SOCK_DIAG_BY_FAMILY, libc::NLM_F_REQUEST | libc::NLM_F_DUMP, 1, family, &[0; SOCKID_LEN]))?;
    let mut ids = Vec::new();
    receive(fd, |kind, payload| match kind {
        NLMSG_DONE => Some(Ok(())),
        NLMSG_ERROR => Some(nl_error(payload)),
        SOCK_DIAG_BY_FAMILY if payload.len() >= MSG_LEN => {
            let mut id = [0u8; SOCKID_LEN];
            id.copy_from_slice(&payload[4..4 + SOCKID_LEN]);
            ids.push(id);
            None
        }
        _ => None,
    })?;
    Ok(ids)
}

/// Sends one request about `id` (a socket of `family`) and waits for its
/// ack.
fn request(fd: &OwnedFd, kind: u16, flags: libc::c_int, family: u8, id: &[u8; SOCKID_LEN]) -> io::Result<()> {
    send(fd, &message(kind, flags, 2, family, id))?;
    receive(fd, |k, payload| (k == NLMSG_ERROR).then(|| nl_error(payload)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_id_gives_its_cookie_and_peer() {
        let mut id = [0u8; SOCKID_LEN];
        id[2..4].copy_from_slice(&53u16.to_be_bytes());
        id[20..24].copy_from_slice(&[10, 0, 1, 7]);
        id[40..44].copy_from_slice(&0x0506_0708u32.to_ne_bytes());
        id[44..48].copy_from_slice(&0x0102_0304u32.to_ne_bytes());
        assert_eq!(cookie(&id), 0x0102_0304_0506_0708);
        assert_eq!(peer(AF_INET, &id), "10.0.1.7:53".parse().unwrap());
        let m = message(SOCK_DESTROY, libc::NLM_F_REQUEST | libc::NLM_F_ACK, 9, AF_INET, &id);
        assert_eq!(m.len(), 72);
        assert_eq!(&m[4..6], &SOCK_DESTROY.to_ne_bytes());
        assert_eq!(m[16], 2, "AF_INET");
        assert_eq!(m[17], 17, "IPPROTO_UDP");
        assert_eq!(&m[24..], &id);
    }

    #[test]
    fn an_ipv6_socket_id_gives_its_peer_and_a_v4_mapped_one_the_ipv4_address() {
        let mut id = [0u8; SOCKID_LEN];
        id[2..4].copy_from_slice(&53u16.to_be_bytes());
        id[20..36].copy_from_slice(&"fd00:244:1::11".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(peer(AF_INET6, &id), "[fd00:244:1::11]:53".parse().unwrap());
        id[20..36].copy_from_slice(&"::ffff:10.0.1.7".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(peer(AF_INET6, &id), "10.0.1.7:53".parse().unwrap());
        let m = message(SOCK_DESTROY, libc::NLM_F_REQUEST | libc::NLM_F_ACK, 9, AF_INET6, &id);
        assert_eq!(m[16], 10, "AF_INET6");
    }

    /// A real connected UDP socket of this process is found by its cookie
    /// and peer, and closed: its next receive fails with ECONNABORTED.
    /// Needs `NETLINK_SOCK_DIAG` with `SOCK_DESTROY` and CAP_NET_ADMIN: when
    /// the dump is refused (an unprivileged run), there is nothing to test.
    #[test]
    fn a_connected_udp_socket_is_closed_by_cookie_and_peer() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let peer_socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind peer");
        let to = peer_socket.local_addr().expect("addr");
        socket.connect(to).expect("connect");
        let cookie = socket_cookie(&socket);
        let other = (cookie ^ 1, to);
        match destroy_udp(&[other], false) {
            Ok(0) => {}
            Ok(n) => panic!("closed {n} sockets of another cookie"),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => return,
            Err(e) => panic!("dump: {e}"),
        }
        let elsewhere = (cookie, SocketAddr::new(to.ip(), to.port().wrapping_add(1)));
        assert_eq!(destroy_udp(&[elsewhere], false).expect("dump"), 0, "closed a socket of another peer");
        match destroy_udp(&[(cookie, to)], false) {
            Ok(1) => {}
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => return,
            other => panic!("{other:?}"),
        }
        socket.set_read_timeout(Some(std::time::Duration::from_secs(2))).expect("timeout");
        let err = socket.recv(&mut [0u8; 8]).expect_err("closed");
        assert_eq!(err.raw_os_error(), Some(libc::ECONNABORTED), "{err}");
    }

    /// IPv6: a socket connected to an IPv6 peer is found by that peer, one
    /// connected to a v4-mapped address by the IPv4 address it maps (as
    /// `sock_rev_nat` records it); both are closed. Skipped, as above,
    /// without the privilege, and without IPv6 on loopback.
    #[test]
    fn ipv6_and_v4_mapped_udp_sockets_are_closed_by_cookie_and_peer() {
        let (Ok(v6), Ok(v6_peer)) = (std::net::UdpSocket::bind("[::1]:0"), std::net::UdpSocket::bind("[::1]:0")) else {
            return;
        };
        let mapped = std::net::UdpSocket::bind("[::]:0").expect("bind [::]");
        let v4_peer = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind v4 peer");
        let to6 = v6_peer.local_addr().expect("addr");
        v6.connect(to6).expect("connect");
        let to4 = v4_peer.local_addr().expect("addr");
        let std::net::SocketAddr::V4(to4_v4) = to4 else { unreachable!() };
        mapped.connect(SocketAddr::new(IpAddr::V6(to4_v4.ip().to_ipv6_mapped()), to4.port())).expect("connect mapped");
        let targets = [(socket_cookie(&v6), to6), (socket_cookie(&mapped), to4)];
        match destroy_udp(&targets, false) {
            Ok(2) => {}
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => return,
            other => panic!("{other:?}"),
        }
        for socket in [&v6, &mapped] {
            socket.set_read_timeout(Some(std::time::Duration::from_secs(2))).expect("timeout");
            let err = socket.recv(&mut [0u8; 8]).expect_err("closed");
            assert_eq!(err.raw_os_error(), Some(libc::ECONNABORTED), "{err}");
        }
    }

    fn socket_cookie(socket: &std::net::UdpSocket) -> u64 {
        const SO_COOKIE: libc::c_int = 57;
        let mut cookie: u64 = 0;
        #[expect(clippy::cast_possible_truncation, reason = "8 fits in socklen_t")]
        let mut len = size_of::<u64>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
        let rc = unsafe {
            libc::getsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, SO_COOKIE, (&raw mut cookie).cast(), &raw mut len)
        };
        assert_eq!(rc, 0, "SO_COOKIE: {}", io::Error::last_os_error());
        cookie
    }
}
