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

/// One unconnected UDP exchange: the reply's source and payload.
fn udp_once(addr: SocketAddr) -> std::io::Result<(SocketAddr, String)> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
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

fn run(mode: &str, addr: SocketAddr, count: usize) -> std::io::Result<()> {
    match mode {
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
        "tcp-rate" | "tcp-rr" => load(mode, addr, count)?,
        "udp-connected" => {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
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
                "unknown mode {other:?} (tcp, udp, udp-connected, tcp-many, udp-many)"
            )));
        }
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(mode), Some(addr)) = (args.get(1), args.get(2).and_then(|a| a.parse::<SocketAddr>().ok())) else {
        eprintln!("usage: sock-client tcp|udp|udp-connected|tcp-many|udp-many ADDR:PORT [COUNT]");
        std::process::exit(2);
    };
    let count = args.get(3).and_then(|c| c.parse().ok()).unwrap_or(1);
    if let Err(e) = run(mode, addr, count) {
        println!("error: {e}");
        std::process::exit(1);
    }
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
