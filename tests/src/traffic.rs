//! Clients the conntrack and soak tests drive: one TCP exchange or one UDP
//! request per call, each with a deadline, run inside a namespace (the
//! calling thread has entered it, see `Netns::run_in`).

use std::{
    io::{self, BufRead as _, BufReader, Write as _},
    net::{Shutdown, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    time::Duration,
};

/// One TCP connection to `addr`: asks pod-echo `who`, reads the answer
/// line and closes, the client first (so TIME_WAIT sits with the client,
/// as it does for most request/response clients). Returns the answer.
///
/// # Errors
/// Connection refused or timed out, a reset, or no answer in time.
pub fn tcp_who(addr: SocketAddrV4, timeout: Duration) -> io::Result<String> {
    let stream = TcpStream::connect_timeout(&SocketAddr::V4(addr), timeout)?;
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
pub fn udp_ask(addr: SocketAddrV4, payload: &[u8], timeout: Duration) -> io::Result<Vec<u8>> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(timeout))?;
    socket.connect(addr)?;
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
pub fn tcp_from_port(local_port: u16, addr: SocketAddrV4, timeout: Duration) -> io::Result<TcpStream> {
    // SAFETY: plain socket syscalls on a descriptor this function owns
    // until it is handed to TcpStream.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
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
    let sockaddr = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::sa_family_t::try_from(libc::AF_INET).expect("AF_INET fits"),
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
        sin_zero: [0; 8],
    };
    let here = sockaddr(SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, local_port));
    let addr_len = libc::socklen_t::try_from(size_of::<libc::sockaddr_in>()).expect("16 bytes");
    // SAFETY: a valid fd and sockaddr_in of `addr_len` bytes.
    if unsafe { libc::bind(stream.as_raw_fd(), (&raw const here).cast(), addr_len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let remote = sockaddr(addr);
    // SAFETY: as above (blocking connect; the kernel's SYN retries bound it).
    if unsafe { libc::connect(stream.as_raw_fd(), (&raw const remote).cast(), addr_len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    stream.set_read_timeout(Some(timeout))?;
    Ok(stream)
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
