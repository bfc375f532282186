//! Minimal rtnetlink: a subscriber (a `NETLINK_ROUTE` socket joined to the
//! link, IPv4 address and IPv4 route multicast groups: any message — a link
//! added, removed, renamed, moved into or out of this namespace; an address
//! or a default route coming or going — wakes the agent, which then re-reads
//! the interfaces and the node's addresses; the messages themselves are not
//! parsed), and the few requests the attach manager makes: the links with
//! their link type and kind, and the clsact ingress filters (listed,
//! deleted).

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use tokio::sync::mpsc;

/// `RTMGRP_LINK`, `RTMGRP_IPV4_IFADDR` and `RTMGRP_IPV4_ROUTE` from
/// `linux/rtnetlink.h`.
const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;

fn link_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the returned fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_nl is plain old data; zeroed is a valid value.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = u16::try_from(libc::AF_NETLINK).unwrap_or_default();
    addr.nl_groups = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE;
    let len = u32::try_from(std::mem::size_of::<libc::sockaddr_nl>()).unwrap_or_default();
    // SAFETY: addr is a valid sockaddr_nl of `len` bytes for the call.
    if unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Starts a thread that sends `()` on every link, address or route event. The channel holds
/// one pending wake-up: a burst of events becomes one re-scan.
///
/// # Errors
/// When the netlink socket cannot be opened.
pub fn watch_links() -> io::Result<mpsc::Receiver<()>> {
    let fd = link_socket()?;
    let (tx, rx) = mpsc::channel(1);
    std::thread::Builder::new().name("link-events".into()).spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: buf is writable for buf.len() bytes; fd stays open for
            // the thread's life.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                // ENOBUFS: events were lost; a re-scan covers them.
                if e.raw_os_error() != Some(libc::ENOBUFS) && e.kind() != io::ErrorKind::Interrupted {
                    tracing::warn!(error = %e, "link event socket failed; falling back to periodic re-scans");
                    return;
                }
            }
            match tx.try_send(()) {
                Ok(()) | Err(mpsc::error::TrySendError::Full(())) => {}
                Err(mpsc::error::TrySendError::Closed(())) => return,
            }
        }
    })?;
    Ok(rx)
}

// ---------------------------------------------------------------------------
// Requests: the interfaces with their link type and kind, and the clsact
// ingress filters of an interface (found, and deleted). rtnetlink answers
// for the caller's network namespace, which `/sys/class/net` does not under
// `nsenter --net`.

/// `linux/rtnetlink.h` message types.
const RTM_GETLINK: u16 = 18;
const RTM_GETROUTE: u16 = 26;
const RTM_DELTFILTER: u16 = 45;
const RTM_GETTFILTER: u16 = 46;
/// `linux/netlink.h`.
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_HDRLEN: usize = 16;
/// `linux/if_link.h`.
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
/// `linux/rtnetlink.h`, `linux/pkt_cls.h`.
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_TAG: u16 = 10;
const TCA_BPF_ID: u16 = 11;
/// `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)`: the clsact qdisc's ingress
/// hook, the parent of every filter the agent installs.
const CLSACT_INGRESS: u32 = 0xffff_fff2;
/// `ETH_P_ALL`, the protocol the agent's filters match (aya's choice).
const ETH_P_ALL: u16 = 0x0003;
/// Attribute types carry `NLA_F_NESTED` / `NLA_F_NET_BYTEORDER` flags.
const NLA_TYPE_MASK: u16 = 0x3fff;

/// One network interface, as rtnetlink describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub ifindex: u32,
    pub name: String,
    /// `ifi_type`: the device's `ARPHRD_*` link type.
    pub link_type: u16,
    /// `IFLA_INFO_KIND` (`vxlan`, `wireguard`, `tun`, `veth`, …); `None`
    /// for a physical device.
    pub kind: Option<String>,
}

/// One filter on a clsact ingress hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcFilter {
    pub priority: u16,
    pub handle: u32,
    /// The filter's kind (`bpf` for cls_bpf).
    pub kind: String,
    /// `TCA_BPF_NAME`: the program name the loader gave.
    pub name: String,
    /// `TCA_BPF_TAG` as aya's `ProgramInfo::tag` reads it (big endian).
    pub tag: Option<u64>,
    pub prog_id: Option<u32>,
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// The attributes in `buf`: (type without flags, payload).
fn attributes(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([buf[0], buf[1]]));
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            break;
        }
        out.push((kind, &buf[4..len]));
        buf = &buf[align4(len).min(buf.len())..];
    }
    out
}

fn push_attr(msg: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = u16::try_from(4 + payload.len()).unwrap_or(u16::MAX);
    msg.extend_from_slice(&len.to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(payload);
    msg.resize(align4(msg.len()), 0);
}

fn c_string(payload: &[u8]) -> String {
    let end = payload.iter().position(|b| *b == 0).unwrap_or(payload.len());
    String::from_utf8_lossy(&payload[..end]).into_owned()
}

/// Sends one request (`body` after the netlink header) and returns the
/// payloads of the answer's messages: every part of a dump, or nothing for
/// an acknowledged request. A netlink error becomes the `io::Error` of its
/// errno.
fn request(msg_type: u16, flags: u16, body: &[u8]) -> io::Result<Vec<Vec<u8>>> {
    // SAFETY: plain socket(2); the returned fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut msg = Vec::with_capacity(NLMSG_HDRLEN + body.len());
    let len = u32::try_from(NLMSG_HDRLEN + body.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    msg.extend_from_slice(&len.to_ne_bytes());
    msg.extend_from_slice(&msg_type.to_ne_bytes());
    msg.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence number
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
    msg.extend_from_slice(body);
    // SAFETY: sockaddr_nl is plain old data; zeroed (pid 0) is the kernel.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = u16::try_from(libc::AF_NETLINK).unwrap_or_default();
    let addr_len = u32::try_from(std::mem::size_of::<libc::sockaddr_nl>()).unwrap_or_default();
    // SAFETY: msg and kernel are valid for the lengths passed.
    let sent = unsafe {
        libc::sendto(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0, (&raw const kernel).cast(), addr_len)
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: buf is writable for buf.len() bytes.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        let mut rest = &buf[..n];
        while rest.len() >= NLMSG_HDRLEN {
            let len = usize::try_from(u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]])).unwrap_or(0);
            let kind = u16::from_ne_bytes([rest[4], rest[5]]);
            if len < NLMSG_HDRLEN || len > rest.len() {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "truncated netlink message"));
            }
            let payload = &rest[NLMSG_HDRLEN..len];
            match kind {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let errno = payload.get(..4).map_or(0, |e| i32::from_ne_bytes([e[0], e[1], e[2], e[3]]));
                    return if errno == 0 { Ok(out) } else { Err(io::Error::from_raw_os_error(-errno)) };
                }
                _ => out.push(payload.to_vec()),
            }
            rest = &rest[align4(len).min(rest.len())..];
        }
    }
}

/// `linux/rtnetlink.h` route attributes.
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
/// `sizeof(struct rtmsg)`.
const RTMSG_LEN: usize = 12;

/// The interface this namespace routes `dst` out of (what `ip route get`
/// answers), or `None` when it has no route to it.
///
/// # Errors
/// When the rtnetlink request fails for another reason.
pub fn route_oif(dst: std::net::IpAddr) -> io::Result<Option<u32>> {
    // struct rtmsg: the family, a host-length destination, everything
    // else zero.
    let mut body = vec![0u8; RTMSG_LEN];
    match dst {
        std::net::IpAddr::V4(a) => {
            body[0] = u8::try_from(libc::AF_INET).unwrap_or_default();
            body[1] = 32;
            push_attr(&mut body, RTA_DST, &a.octets());
        }
        std::net::IpAddr::V6(a) => {
            body[0] = u8::try_from(libc::AF_INET6).unwrap_or_default();
            body[1] = 128;
            push_attr(&mut body, RTA_DST, &a.octets());
        }
    }
    let parts = match request(RTM_GETROUTE, NLM_F_ACK, &body) {
        Ok(parts) => parts,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EINVAL)) => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    Ok(parts.iter().filter(|p| p.len() >= RTMSG_LEN).find_map(|p| {
        attributes(&p[RTMSG_LEN..]).into_iter().find_map(|(kind, payload)| {
            (kind & NLA_TYPE_MASK == RTA_OIF && payload.len() >= 4)
                .then(|| u32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]]))
        })
    }))
}

/// Every interface of this network namespace with its link type and kind.
///
/// # Errors
/// When the rtnetlink dump fails.
pub fn links() -> io::Result<Vec<LinkInfo>> {
    // struct ifinfomsg, all zero: every family, every link.
    let parts = request(RTM_GETLINK, NLM_F_DUMP, &[0u8; 16])?;
    let mut out = Vec::new();
    for part in parts {
        if part.len() < 16 {
            continue;
        }
        let link_type = u16::from_ne_bytes([part[2], part[3]]);
        let ifindex = u32::from_ne_bytes([part[4], part[5], part[6], part[7]]);
        let (mut name, mut kind) = (None, None);
        for (t, payload) in attributes(&part[16..]) {
            match t {
                IFLA_IFNAME => name = Some(c_string(payload)),
                IFLA_LINKINFO => {
                    kind =
                        attributes(payload).into_iter().find(|(t, _)| *t == IFLA_INFO_KIND).map(|(_, k)| c_string(k));
                }
                _ => {}
            }
        }
        if let Some(name) = name {
            out.push(LinkInfo { ifindex, name, link_type, kind });
        }
    }
    out.sort_by_key(|l| l.ifindex);
    Ok(out)
}

/// `struct tcmsg` for the clsact ingress hook of `ifindex`.
fn tcmsg(ifindex: u32, handle: u32, info: u32) -> Vec<u8> {
    let mut m = vec![0u8; 4]; // family, padding
    m.extend_from_slice(&ifindex.to_ne_bytes());
    m.extend_from_slice(&handle.to_ne_bytes());
    m.extend_from_slice(&CLSACT_INGRESS.to_ne_bytes());
    m.extend_from_slice(&info.to_ne_bytes());
    m
}

/// The filters on the clsact ingress hook of `ifindex` (none when the
/// interface has no clsact qdisc).
///
/// # Errors
/// When the rtnetlink dump fails (the interface is gone, for one).
pub fn ingress_filters(ifindex: u32) -> io::Result<Vec<TcFilter>> {
    let parts = request(RTM_GETTFILTER, NLM_F_DUMP, &tcmsg(ifindex, 0, 0))?;
    let mut out = Vec::new();
    for part in parts {
        if part.len() < 20 || u32::from_ne_bytes([part[4], part[5], part[6], part[7]]) != ifindex {
            continue;
        }
        let handle = u32::from_ne_bytes([part[8], part[9], part[10], part[11]]);
        let parent = u32::from_ne_bytes([part[12], part[13], part[14], part[15]]);
        let info = u32::from_ne_bytes([part[16], part[17], part[18], part[19]]);
        // Handle 0 is the classifier instance (one per priority) itself.
        if handle == 0 || parent != CLSACT_INGRESS {
            continue;
        }
        let priority = u16::try_from(info >> 16).unwrap_or_default();
        let mut filter =
            TcFilter { priority, handle, kind: String::new(), name: String::new(), tag: None, prog_id: None };
        for (t, payload) in attributes(&part[20..]) {
            match t {
                TCA_KIND => filter.kind = c_string(payload),
                TCA_OPTIONS => {
                    for (t, v) in attributes(payload) {
                        match (t, v.len()) {
                            (TCA_BPF_NAME, _) => filter.name = c_string(v),
                            (TCA_BPF_TAG, 8) => {
                                filter.tag = Some(u64::from_be_bytes([v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]]));
                            }
                            (TCA_BPF_ID, 4) => filter.prog_id = Some(u32::from_ne_bytes([v[0], v[1], v[2], v[3]])),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        out.push(filter);
    }
    Ok(out)
}

/// Deletes the cls_bpf filter (`priority`, `handle`) from the clsact
/// ingress hook of `ifindex`.
///
/// # Errors
/// When the kernel refuses (ENOENT: no such filter; ENODEV: no such
/// interface).
pub fn delete_filter(ifindex: u32, priority: u16, handle: u32) -> io::Result<()> {
    let info = (u32::from(priority) << 16) | u32::from(ETH_P_ALL.to_be());
    let mut body = tcmsg(ifindex, handle, info);
    push_attr(&mut body, TCA_KIND, b"bpf\0");
    request(RTM_DELTFILTER, NLM_F_ACK, &body).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip() {
        let mut buf = Vec::new();
        push_attr(&mut buf, TCA_KIND, b"bpf\0");
        push_attr(&mut buf, TCA_BPF_ID | 0x8000, &7u32.to_ne_bytes());
        let attrs = attributes(&buf);
        assert_eq!(attrs.len(), 2);
        assert_eq!((attrs[0].0, c_string(attrs[0].1).as_str()), (TCA_KIND, "bpf"));
        assert_eq!(attrs[1], (TCA_BPF_ID, &7u32.to_ne_bytes()[..]));
    }

    #[test]
    fn the_loopback_link_is_listed_with_its_type() {
        let links = links().expect("rtnetlink dump");
        let lo = links.iter().find(|l| l.name == "lo").expect("lo");
        assert_eq!(lo.link_type, 772, "ARPHRD_LOOPBACK");
        assert_eq!(lo.kind, None);
    }
}
