//! `sock-client MODE ADDR:PORT`: a client whose socket calls the
//! socket-level tests watch, run inside a test cgroup in a node's network
//! namespace. It prints one line per fact, or `error: …` and exits 1.
//!
//! - `tcp`: connect(), then `peer <getpeername()>`, then sends `who` and
//!   prints `answer <line>` (pod-echo's `NAME <peer seen by the server>`).
//! - `udp`: an unconnected socket: sendto(ADDR), recvfrom(), prints
//!   `from <source of the reply>` and `answer <payload>`.
//! - `udp-connected`: connect(), `peer <getpeername()>`, send(), recv(),
//!   `answer <payload>`.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

const TIMEOUT: Duration = Duration::from_secs(2);

fn run(mode: &str, addr: SocketAddr) -> std::io::Result<()> {
    match mode {
        "tcp" => {
            let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
            stream.set_read_timeout(Some(TIMEOUT))?;
            println!("peer {}", stream.peer_addr()?);
            stream.write_all(b"who\n")?;
            let mut line = String::new();
            BufReader::new(stream).read_line(&mut line)?;
            println!("answer {}", line.trim_end());
        }
        "udp" => {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            socket.set_read_timeout(Some(TIMEOUT))?;
            socket.send_to(b"who", addr)?;
            let mut buf = [0u8; 512];
            let (n, from) = socket.recv_from(&mut buf)?;
            println!("from {from}");
            println!("answer {}", String::from_utf8_lossy(&buf[..n]).trim_end());
        }
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
        other => return Err(std::io::Error::other(format!("unknown mode {other:?} (tcp, udp, udp-connected)"))),
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(mode), Some(addr)) = (args.get(1), args.get(2).and_then(|a| a.parse::<SocketAddr>().ok())) else {
        eprintln!("usage: sock-client tcp|udp|udp-connected ADDR:PORT");
        std::process::exit(2);
    };
    if let Err(e) = run(mode, addr) {
        println!("error: {e}");
        std::process::exit(1);
    }
}
