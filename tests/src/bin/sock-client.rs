//! `sock-client MODE ADDR:PORT [COUNT]`: a client whose socket calls the
//! socket-level tests watch, run inside a test cgroup in a node's network
//! namespace. It prints one line per fact, or `error: …` and exits 1.
//!
//! - `tcp`: connect(), then `peer <getpeername()>`, then sends `who` and
//!   prints `answer <line>` (pod-echo's `NAME <peer seen by the server>`).
//! - `udp`: an unconnected socket: sendto(ADDR), recvfrom(), prints
//!   `from <source of the reply>` and `answer <payload>`.
//! - `udp-connected`: connect(), `peer <getpeername()>`, send(), recv(),
//!   `answer <payload>`.
//! - `tcp-many` / `udp-many` (COUNT times, a new socket each: `tcp` /
//!   `udp` as above, every peer or reply source checked to be ADDR):
//!   `backends NAME=N,...`, or the first failure.
//! - `hold-tcp` / `hold-udp` (for COUNT seconds): one connection (a
//!   connected UDP socket) exchanging `who` every 20 ms; `answer NAME` at
//!   the first answer and whenever the backend's name changes, then
//!   `exchanges N`. UDP: when a call fails (a socket closed under it),
//!   `aborted after N: <error>`, then a new socket connected to ADDR and
//!   `reconnected NAME` from its first answer.
//! - `probe-tcp` / `probe-udp` (COUNT new sockets): where connect() really
//!   connected each, without an exchange: `peer ADDR:PORT` once per
//!   distinct peer, or the first failure (see [`probe`]).
//! - `serve ADDR NAME`: a server instead (IPv6 backends: pod-echo listens
//!   on IPv4 only): TCP and UDP on ADDR (`[::]:PORT` takes both families),
//!   each `who` line or datagram answered `NAME <peer>` as pod-echo
//!   answers; `ready` once both are bound.
//!
//! ADDR may be IPv4 or IPv6: the client's socket is of ADDR's family, so a
//! v4-mapped ADDR (`[::ffff:10.96.0.10]:80`) is dialled from an IPv6
//! socket, as dual-stack applications do.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

const TIMEOUT: Duration = Duration::from_secs(2);

/// One TCP exchange: the peer getpeername() shows, and the answer line.
fn tcp_once(addr: SocketAddr) -> std::io::Result<(SocketAddr, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    let peer = stream.peer_addr()?;
    stream.write_all(b"who\n")?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    Ok((peer, line.trim_end().to_owned()))
}

/// An unbound UDP socket of `addr`'s family (an IPv6 one for a
/// v4-mapped address).
fn udp_for(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    UdpSocket::bind(if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })
}

/// One unconnected UDP exchange: the reply's source and payload.
fn udp_once(addr: SocketAddr) -> std::io::Result<(SocketAddr, String)> {
    let socket = udp_for(addr)?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    socket.send_to(b"who", addr)?;
    let mut buf = [0u8; 512];
    let (n, from) = socket.recv_from(&mut buf)?;
    Ok((from, String::from_utf8_lossy(&buf[..n]).trim_end().to_owned()))
}

/// `count` exchanges, each checked to come from `addr`; the backends'
/// names tallied.
fn many(
    count: usize,
    addr: SocketAddr,
    once: fn(SocketAddr) -> std::io::Result<(SocketAddr, String)>,
) -> std::io::Result<()> {
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..count {
        let (peer, answer) = once(addr).map_err(|e| std::io::Error::other(format!("exchange {i}: {e}")))?;
        if peer != addr {
            return Err(std::io::Error::other(format!("exchange {i}: peer {peer}, not {addr}")));
        }
        *tally.entry(answer.split_whitespace().next().unwrap_or_default().to_owned()).or_default() += 1;
    }
    let list: Vec<String> = tally.iter().map(|(name, n)| format!("{name}={n}")).collect();
    println!("backends {}", list.join(","));
    Ok(())
}

const HOLD_INTERVAL: Duration = Duration::from_millis(20);

/// Prints `answer NAME` when `answer`'s name differs from `last`.
fn note_answer(last: &mut String, answer: &str) {
    let name = answer.split_whitespace().next().unwrap_or_default();
    if name != last {
        println!("answer {name}");
        name.clone_into(last);
    }
}

/// One TCP connection kept for `seconds`, exchanging all along.
fn hold_tcp(addr: SocketAddr, seconds: usize) -> std::io::Result<()> {
    let stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    println!("peer {}", stream.peer_addr()?);
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let until = std::time::Instant::now() + Duration::from_secs(u64::try_from(seconds).unwrap_or(1));
    let (mut n, mut last) = (0usize, String::new());
    while std::time::Instant::now() < until {
        writer.write_all(b"who\n").map_err(|e| std::io::Error::other(format!("after {n} exchanges: {e}")))?;
        let mut line = String::new();
        if reader.read_line(&mut line).map_err(|e| std::io::Error::other(format!("after {n} exchanges: {e}")))? == 0 {
            return Err(std::io::Error::other(format!("closed by the server after {n} exchanges")));
        }
        note_answer(&mut last, line.trim_end());
        n += 1;
        std::thread::sleep(HOLD_INTERVAL);
    }
    println!("exchanges {n}");
    Ok(())
}

/// A connected UDP socket's exchange.
fn udp_exchange(socket: &UdpSocket) -> std::io::Result<String> {
    socket.send(b"who")?;
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim_end().to_owned())
}

fn connected_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = udp_for(addr)?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    socket.connect(addr)?;
    Ok(socket)
}

/// One connected UDP socket kept for `seconds`; a failed call is reported
/// and followed by one exchange over a new socket.
fn hold_udp(addr: SocketAddr, seconds: usize) -> std::io::Result<()> {
    let socket = connected_udp(addr)?;
    let until = std::time::Instant::now() + Duration::from_secs(u64::try_from(seconds).unwrap_or(1));
    let (mut n, mut last) = (0usize, String::new());
    while std::time::Instant::now() < until {
        match udp_exchange(&socket) {
            Ok(answer) => note_answer(&mut last, &answer),
            Err(e) => {
                println!("aborted after {n}: {e}");
                let answer = udp_exchange(&connected_udp(addr)?)?;
                println!("reconnected {}", answer.split_whitespace().next().unwrap_or_default());
                break;
            }
        }
        n += 1;
        std::thread::sleep(HOLD_INTERVAL);
    }
    println!("exchanges {n}");
    Ok(())
}

fn run(mode: &str, addr: SocketAddr, count: usize) -> std::io::Result<()> {
    match mode {
        "probe-tcp" => probe(addr, count, true)?,
        "probe-udp" => probe(addr, count, false)?,
        "tcp" => {
            let (peer, answer) = tcp_once(addr)?;
            println!("peer {peer}");
            println!("answer {answer}");
        }
        "udp" => {
            let (from, answer) = udp_once(addr)?;
            println!("from {from}");
            println!("answer {answer}");
        }
        "tcp-many" => many(count, addr, tcp_once)?,
        "udp-many" => many(count, addr, udp_once)?,
        "hold-tcp" => hold_tcp(addr, count)?,
        "hold-udp" => hold_udp(addr, count)?,
        "tcp-rate" | "tcp-rr" => load(mode, addr, count)?,
        "serve" => serve(addr)?,
        "udp-connected" => {
            let socket = udp_for(addr)?;
            socket.set_read_timeout(Some(TIMEOUT))?;
            socket.connect(addr)?;
            println!("peer {}", socket.peer_addr()?);
            socket.send(b"who")?;
            let mut buf = [0u8; 512];
            let n = socket.recv(&mut buf)?;
            println!("answer {}", String::from_utf8_lossy(&buf[..n]).trim_end());
        }
        other => {
            return Err(std::io::Error::other(format!(
                "unknown mode {other:?} (tcp, udp, udp-connected, tcp-many, udp-many, hold-tcp, hold-udp, probe-tcp, probe-udp, tcp-rate, tcp-rr, serve)"
            )));
        }
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(mode), Some(addr)) = (args.get(1), args.get(2).and_then(|a| a.parse::<SocketAddr>().ok())) else {
        eprintln!(
            "usage: sock-client tcp|udp|udp-connected|tcp-many|udp-many|hold-tcp|hold-udp|probe-tcp|probe-udp|tcp-rate|tcp-rr ADDR:PORT [COUNT], or serve ADDR:PORT NAME"
        );
        std::process::exit(2);
    };
    let count = args.get(3).and_then(|c| c.parse().ok()).unwrap_or(1);
    if let Err(e) = run(mode, addr, count) {
        println!("error: {e}");
        std::process::exit(1);
    }
}

/// `probe-tcp` / `probe-udp`: `count` new sockets, each connected to `addr`
/// without reaching anyone, and the peer each really got, printed once per
/// distinct peer (`peer ADDR:PORT`); a failed connect() is the error (the
/// socket path's refusals: ECONNREFUSED, ENETUNREACH). The peer is read
/// from `/proc/self/net/tcp`/`udp` (`tcp6`/`udp6` for an IPv6 `addr`, a
/// v4-mapped one included) by the socket's inode: getpeername() shows what
/// the getpeername hooks restore, the Service address.
///
/// TCP connects without blocking: connect4/6 has run by the time connect()
/// returns EINPROGRESS, and the SYN leaves by the namespace's default route
/// to nowhere. A destination that is the node's own address would answer
/// the SYN with a RST and close the socket before its peer is read, so a
/// listener is bound there first when it can be (an untranslated socket
/// then stays connected to it). UDP's connect() sends nothing at all.
fn probe(addr: SocketAddr, count: usize, tcp: bool) -> std::io::Result<()> {
    let _listener = if tcp { std::net::TcpListener::bind(addr).ok() } else { None };
    let mut peers = std::collections::BTreeSet::new();
    for _ in 0..count {
        peers.insert(probe_once(addr, tcp)?);
    }
    for peer in peers {
        println!("peer {peer}");
    }
    Ok(())
}

/// A socket address as the kernel takes it, and its length.
fn raw_sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data for which all zeroes is valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::sa_family_t::try_from(libc::AF_INET).expect("AF_INET fits"),
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for any
            // sockaddr.
            unsafe { std::ptr::write((&raw mut storage).cast::<libc::sockaddr_in>(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::sa_family_t::try_from(libc::AF_INET6).expect("AF_INET6 fits"),
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: 0,
            };
            // SAFETY: as above.
            unsafe { std::ptr::write((&raw mut storage).cast::<libc::sockaddr_in6>(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, libc::socklen_t::try_from(len).expect("a sockaddr fits"))
}

/// One socket connected to `addr`: its real peer.
fn probe_once(addr: SocketAddr, tcp: bool) -> std::io::Result<SocketAddr> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    let socket = if tcp {
        let domain = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
        // SAFETY: socket(2) with constant arguments; the descriptor is
        // owned at once below.
        let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        let (storage, len) = raw_sockaddr(addr);
        // SAFETY: `storage` holds a complete sockaddr of `len` bytes, alive
        // for the call.
        let rc = unsafe { libc::connect(socket.as_raw_fd(), (&raw const storage).cast(), len) };
        let error = std::io::Error::last_os_error();
        if rc != 0 && error.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(error);
        }
        socket
    } else {
        let socket = udp_for(addr)?;
        socket.connect(addr)?;
        OwnedFd::from(socket)
    };
    let inode =
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(format!("/proc/self/fd/{}", socket.as_raw_fd()))?);
    let table = match (tcp, addr.is_ipv4()) {
        (true, true) => "/proc/self/net/tcp",
        (true, false) => "/proc/self/net/tcp6",
        (false, true) => "/proc/self/net/udp",
        (false, false) => "/proc/self/net/udp6",
    };
    real_peer(&std::fs::read_to_string(table)?, inode)
        .ok_or_else(|| std::io::Error::other(format!("socket inode {inode} not in {table}")))
}

/// The remote address of the socket with `inode` in a `/proc/net/tcp`,
/// `udp`, `tcp6` or `udp6` table: `ADDR:PORT` in hex, the address as the
/// kernel's network-order words (one, or four) each printed in host order,
/// the port in host order.
fn real_peer(table: &str, inode: u64) -> Option<SocketAddr> {
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(9)?.parse::<u64>().ok()? != inode {
            return None;
        }
        let (ip, port) = fields.get(2)?.split_once(':')?;
        let mut octets = Vec::with_capacity(16);
        for word in 0..ip.len() / 8 {
            octets.extend_from_slice(&u32::from_str_radix(ip.get(word * 8..word * 8 + 8)?, 16).ok()?.to_ne_bytes());
        }
        let ip = match octets.len() {
            4 => std::net::IpAddr::from(<[u8; 4]>::try_from(octets).ok()?),
            16 => std::net::IpAddr::from(<[u8; 16]>::try_from(octets).ok()?),
            _ => return None,
        };
        Some(SocketAddr::new(ip, u16::from_str_radix(port, 16).ok()?))
    })
}

/// `serve ADDR NAME`: TCP and UDP on ADDR, answering `NAME <peer>` to each
/// `who` line and each datagram, until killed.
fn serve(addr: SocketAddr) -> std::io::Result<()> {
    let name = std::env::args().nth(3).unwrap_or_else(|| "sock-client".into());
    let listener = std::net::TcpListener::bind(addr)?;
    let udp = UdpSocket::bind(addr)?;
    println!("ready");
    std::io::stdout().flush()?;
    let udp_name = name.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((_, peer)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(format!("{udp_name} {peer}\n").as_bytes(), peer);
        }
    });
    for stream in listener.incoming().flatten() {
        let name = name.clone();
        std::thread::spawn(move || -> std::io::Result<()> {
            let peer = stream.peer_addr()?;
            let mut writer = stream.try_clone()?;
            for line in BufReader::new(stream).lines() {
                if line?.trim() == "who" {
                    writer.write_all(format!("{name} {peer}\n").as_bytes())?;
                }
            }
            Ok(())
        });
    }
    Ok(())
}

/// `tcp-rate|tcp-rr ADDR WORKERS SECONDS [ADDR...]`: the benchmark's loads
/// (`service_tests::bench::traffic`) from this process, so from its cgroup
/// and network namespace: new connections (`tcp-rate`), or round trips on
/// one established connection per worker (`tcp-rr`), for SECONDS (at most
/// a minute), the workers taking ADDR and the further addresses in turn.
/// Prints the figures as one `rate … p50_ms … p99_ms … errors …` line.
fn load(mode: &str, addr: SocketAddr, workers: usize) -> std::io::Result<()> {
    use service_tests::bench::traffic;
    let args: Vec<String> = std::env::args().skip(4).collect();
    let seconds = args
        .first()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| (0.0..=60.0).contains(s))
        .ok_or_else(|| std::io::Error::other("SECONDS: 0 to 60"))?;
    let mut targets = vec![addr];
    for a in args.iter().skip(1) {
        targets.push(a.parse().map_err(|e| std::io::Error::other(format!("{a}: {e}")))?);
    }
    let duration = Duration::from_secs_f64(seconds);
    let result = if mode == "tcp-rate" {
        traffic::new_connections(&targets, workers, duration)
    } else {
        traffic::round_trips(&targets, workers, duration)
    };
    println!("{}", result.to_line());
    Ok(())
}
