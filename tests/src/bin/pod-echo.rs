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
//! Prints `ready` once both sockets are bound.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
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

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let name = arg(&args, "--name").unwrap_or_else(|| "pod-echo".into());
    let tcp_port: u16 = arg(&args, "--tcp-port").and_then(|p| p.parse().ok()).unwrap_or(8080);
    let udp_port: u16 = arg(&args, "--udp-port").and_then(|p| p.parse().ok()).unwrap_or(5353);
    let listener = TcpListener::bind(("0.0.0.0", tcp_port))?;
    let udp = UdpSocket::bind(("0.0.0.0", udp_port))?;
    // A deep receive queue (SO_RCVBUFFORCE: the tests run as root) so a
    // busy soak does not lose datagrams at this socket while its one
    // thread is off the CPU; without the privilege the default stays.
    let bytes: libc::c_int = 8 << 20;
    // SAFETY: a valid socket and a c_int option of the right size.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&udp),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const bytes).cast(),
            libc::socklen_t::try_from(size_of::<libc::c_int>()).unwrap_or(4),
        );
    }
    println!("ready");
    std::io::stdout().flush()?;

    let udp_name = name.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, peer)) = udp.recv_from(&mut buf) {
            let mut reply = answer(&udp_name, peer).into_bytes();
            if buf[..n].starts_with(b"echo:") {
                reply.extend_from_slice(&buf[..n]);
            }
            let _ = udp.send_to(&reply, peer);
        }
    });
    for stream in listener.incoming().flatten() {
        let name = name.clone();
        std::thread::spawn(move || {
            let _ = serve_tcp(&name, stream);
        });
    }
    Ok(())
}
