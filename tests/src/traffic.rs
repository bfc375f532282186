//! Clients the conntrack and soak tests drive: one TCP exchange or one UDP
//! request per call, each with a deadline, run inside a namespace (the
//! calling thread has entered it, see `Netns::run_in`). Every destination
//! is a `SocketAddr` of either family (a `SocketAddrV4` converts).

use std::{
    io::{self, BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    time::Duration,
};

/// The unspecified address of `addr`'s family, port 0: where a client
/// socket towards `addr` binds.
#[must_use]
pub fn any_port_for(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    }
}

/// A fresh UDP socket of `addr`'s family, connected to `addr`, with a
/// read timeout.
///
/// # Errors
/// The socket calls fail.
pub fn udp_connected(addr: impl Into<SocketAddr>, timeout: Duration) -> io::Result<UdpSocket> {
    let addr = addr.into();
    let socket = UdpSocket::bind(any_port_for(addr))?;
    socket.set_read_timeout(Some(timeout))?;
    socket.connect(addr)?;
    Ok(socket)
}

/// One TCP connection to `addr`: asks pod-echo `who`, reads the answer
/// line and closes, the client first (so TIME_WAIT sits with the client,
/// as it does for most request/response clients). Returns the answer.
///
/// # Errors
/// Connection refused or timed out, a reset, or no answer in time.
pub fn tcp_who(addr: impl Into<SocketAddr>, timeout: Duration) -> io::Result<String> {
    let stream = TcpStream::connect_timeout(&addr.into(), timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    (&stream).write_all(b"who\n")?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    if line.is_empty() {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before the answer"));
    }
    stream.shutdown(Shutdown::Both)?;
    Ok(line)
}

/// One UDP request from a fresh socket: `payload` out, the answer back.
///
/// # Errors
/// The answer did not come in time.
pub fn udp_ask(addr: impl Into<SocketAddr>, payload: &[u8], timeout: Duration) -> io::Result<Vec<u8>> {
    let socket = udp_connected(addr, timeout)?;
    socket.send(payload)?;
    let mut buf = vec![0u8; 65_536];
    let n = socket.recv(&mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

/// A TCP socket bound to `local_port` with `SO_REUSEADDR`, connected to
/// `addr`: two of them may share a source port towards different
/// destinations, as Linux allows (and ephemeral ports do across
/// destinations).
///
/// # Errors
/// The socket calls fail.
///
/// # Panics
/// Never: the socket address sizes fit `socklen_t`.
pub fn tcp_from_port(local_port: u16, addr: impl Into<SocketAddr>, timeout: Duration) -> io::Result<TcpStream> {
    let addr = addr.into();
    let family = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain socket syscalls on a descriptor this function owns
    // until it is handed to TcpStream.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    let stream = unsafe { <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: a valid fd and a c_int option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            libc::socklen_t::try_from(size_of::<libc::c_int>()).expect("4 bytes"),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut here = any_port_for(addr);
    here.set_port(local_port);
    let (here, here_len) = Sockaddr::from(here);
    // SAFETY: a valid fd and a sockaddr of `here_len` bytes.
    if unsafe { libc::bind(stream.as_raw_fd(), here.as_ptr(), here_len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let (remote, remote_len) = Sockaddr::from(addr);
    // SAFETY: as above (blocking connect; the kernel's SYN retries bound it).
    if unsafe { libc::connect(stream.as_raw_fd(), remote.as_ptr(), remote_len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    stream.set_read_timeout(Some(timeout))?;
    Ok(stream)
}

/// A `SocketAddr` as the kernel takes it: `sockaddr_in` or `sockaddr_in6`.
enum Sockaddr {
    V4(libc::sockaddr_in),
    V6(libc::sockaddr_in6),
}

impl Sockaddr {
    /// The address and its length, for bind(2) and connect(2).
    ///
    /// # Panics
    /// Never: the socket address sizes fit `socklen_t`.
    fn from(addr: SocketAddr) -> (Self, libc::socklen_t) {
        match addr {
            SocketAddr::V4(a) => (
                Self::V4(libc::sockaddr_in {
                    sin_family: libc::sa_family_t::try_from(libc::AF_INET).expect("AF_INET fits"),
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                    sin_zero: [0; 8],
                }),
                libc::socklen_t::try_from(size_of::<libc::sockaddr_in>()).expect("16 bytes"),
            ),
            SocketAddr::V6(a) => (
                Self::V6(libc::sockaddr_in6 {
                    sin6_family: libc::sa_family_t::try_from(libc::AF_INET6).expect("AF_INET6 fits"),
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: a.flowinfo(),
                    sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                    sin6_scope_id: a.scope_id(),
                }),
                libc::socklen_t::try_from(size_of::<libc::sockaddr_in6>()).expect("28 bytes"),
            ),
        }
    }

    fn as_ptr(&self) -> *const libc::sockaddr {
        match self {
            Self::V4(a) => (&raw const *a).cast(),
            Self::V6(a) => (&raw const *a).cast(),
        }
    }
}

/// Asks `who` on a held connection and reads the answer line.
///
/// # Errors
/// The connection broke or did not answer in time.
pub fn who(stream: &mut TcpStream) -> io::Result<String> {
    stream.write_all(b"who\n")?;
    let mut line = String::new();
    BufReader::new(&*stream).read_line(&mut line)?;
    if line.is_empty() {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
    }
    Ok(line)
}
