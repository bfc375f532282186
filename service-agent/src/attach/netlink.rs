//! A minimal rtnetlink subscriber: a `NETLINK_ROUTE` socket joined to the
//! link, IPv4 address and IPv4 route multicast groups. Any message (a link
//! added, removed, renamed, moved into or out of this namespace; an address
//! or a default route coming or going) wakes the agent, which then re-reads
//! the interfaces and the node's addresses; the messages themselves are not
//! parsed.

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
