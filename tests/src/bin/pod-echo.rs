//! `pod-echo --name NAME [--tcp-port 8080] [--udp-port 5353]`: the server
//! the test and demo pods run. Every answer is `NAME <peer ip>:<peer port>`
//! so a client learns which backend it reached and what source that backend
//! saw.
//!
//! - TCP: an HTTP/1.1 request gets a 200 with that line as its body
//!   (keep-alive honoured); a raw line `who` gets the line back, as often as
//!   asked, so a test can hold one connection open and keep checking it.
//! - UDP: each datagram is answered with that line; a datagram starting
//!   with `echo:` gets the line followed by the whole datagram back, so a
//!   test can send (and receive) datagrams larger than the MTU.
//!
//! Both families: an IPv4 socket and an IPv6-only one (`IPV6_V6ONLY`) per
//! protocol, so an IPv4 client is reported as `10.244.1.10:port`, never as
//! an IPv4-mapped IPv6 address, and an IPv6 one as `[fd00:…]:port`. A
//! namespace without IPv6 gets the IPv4 sockets only.
//!
//! Prints `ready` once the sockets are bound.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

fn arg(args: &[String], flag: &str) -> Option<String> {
    args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned()
}

fn answer(name: &str, peer: SocketAddr) -> String {
    format!("{name} {peer}\n")
}

fn serve_tcp(name: &str, stream: TcpStream) -> std::io::Result<()> {
    let peer = stream.peer_addr()?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if line.trim_end() == "who" {
            writer.write_all(answer(name, peer).as_bytes())?;
            continue;
        }
        // An HTTP request: skip the headers, note keep-alive.
        let http11 = line.contains("HTTP/1.1");
        let mut close = !http11;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 || header.trim_end().is_empty() {
                break;
            }
            let lower = header.to_ascii_lowercase();
            if lower.starts_with("connection:") {
                close = lower.contains("close");
            }
        }
        let body = answer(name, peer);
        let conn = if close { "close" } else { "keep-alive" };
        write!(
            writer,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {conn}\r\n\r\n{body}",
            body.len()
        )?;
        if close {
            return Ok(());
        }
    }
}

/// `setsockopt(fd, level, option, value)` for a c_int option.
fn set_int(fd: &impl std::os::fd::AsRawFd, level: libc::c_int, option: libc::c_int, value: libc::c_int) -> bool {
    // SAFETY: a valid socket and a c_int option of the right size.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            option,
            (&raw const value).cast(),
            libc::socklen_t::try_from(size_of::<libc::c_int>()).unwrap_or(4),
        ) == 0
    }
}

/// An IPv6-only socket of `kind` bound to `[::]:port` (listening when a
/// stream): std binds `[::]` dual-stack, which would clash with the IPv4
/// socket on the same port and report IPv4 peers as `::ffff:a.b.c.d`.
fn bind_v6_only(kind: libc::c_int, port: u16) -> std::io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the descriptor is owned
    // by the OwnedFd at once.
    let raw = unsafe { libc::socket(libc::AF_INET6, kind | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    if !set_int(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1) || !set_int(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)
    {
        return Err(std::io::Error::last_os_error());
    }
    let addr = SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0);
    let sockaddr = libc::sockaddr_in6 {
        sin6_family: libc::sa_family_t::try_from(libc::AF_INET6).unwrap_or(10),
        sin6_port: addr.port().to_be(),
        sin6_flowinfo: 0,
        sin6_addr: libc::in6_addr { s6_addr: addr.ip().octets() },
        sin6_scope_id: 0,
    };
    let len = libc::socklen_t::try_from(size_of::<libc::sockaddr_in6>()).unwrap_or(28);
    // SAFETY: a valid socket and a sockaddr_in6 of `len` bytes.
    if unsafe { libc::bind(fd.as_raw_fd(), (&raw const sockaddr).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: listen(2) on a bound stream socket.
    if kind == libc::SOCK_STREAM && unsafe { libc::listen(fd.as_raw_fd(), 1024) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// A deep receive queue (SO_RCVBUFFORCE: the tests run as root) so a busy
/// soak does not lose datagrams at this socket while its one thread is off
/// the CPU; without the privilege the default stays.
fn deepen(udp: &UdpSocket) {
    let _ = set_int(udp, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 8 << 20);
}

fn serve_udp(name: String, udp: UdpSocket) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, peer)) = udp.recv_from(&mut buf) {
            let mut reply = answer(&name, peer).into_bytes();
            if buf[..n].starts_with(b"echo:") {
                reply.extend_from_slice(&buf[..n]);
            }
            let _ = udp.send_to(&reply, peer);
        }
    });
}

fn accept_tcp(name: &str, listener: &TcpListener) {
    for stream in listener.incoming().flatten() {
        let name = name.to_owned();
        std::thread::spawn(move || {
            let _ = serve_tcp(&name, stream);
        });
    }
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let name = arg(&args, "--name").unwrap_or_else(|| "pod-echo".into());
    let tcp_port: u16 = arg(&args, "--tcp-port").and_then(|p| p.parse().ok()).unwrap_or(8080);
    let udp_port: u16 = arg(&args, "--udp-port").and_then(|p| p.parse().ok()).unwrap_or(5353);
    let listener = TcpListener::bind(("0.0.0.0", tcp_port))?;
    let udp = UdpSocket::bind(("0.0.0.0", udp_port))?;
    deepen(&udp);
    // IPv6 where the namespace has it (EAFNOSUPPORT or EADDRNOTAVAIL
    // otherwise: then IPv4 alone, as before).
    let v6 = bind_v6_only(libc::SOCK_STREAM, tcp_port)
        .and_then(|tcp| Ok((TcpListener::from(tcp), UdpSocket::from(bind_v6_only(libc::SOCK_DGRAM, udp_port)?))));
    println!("ready");
    std::io::stdout().flush()?;

    serve_udp(name.clone(), udp);
    if let Ok((listener6, udp6)) = v6 {
        deepen(&udp6);
        serve_udp(name.clone(), udp6);
        let name6 = name.clone();
        std::thread::spawn(move || accept_tcp(&name6, &listener6));
    }
    accept_tcp(&name, &listener);
    Ok(())
}
