//! `tun-relay NETNS_A IFNAME_A NETNS_B IFNAME_B`: the cable between two
//! nodes' L3 devices. Creates a TUN device (`IFF_TUN | IFF_NO_PI`: no
//! Ethernet header, no packet information, each read one IP packet) named
//! IFNAME_A in the network namespace NETNS_A (a path such as
//! /run/netns/NAME) and IFNAME_B in NETNS_B, prints `ready`, then copies
//! every packet one device sends onto the other until it is killed. The
//! devices vanish with the process (they are not persistent).
//!
//! This kernel has no ipip or wireguard module; a tun device is the L3
//! device the end-to-end tests can make, and it looks like one to the
//! dataplane (`ARPHRD_NONE`, the packet starts at the IP header).

use std::{
    fs::{File, OpenOptions},
    io::{Read as _, Write as _},
    os::{fd::AsRawFd as _, unix::fs::OpenOptionsExt as _},
};

/// `TUNSETIFF` (`_IOW('T', 202, int)`), `IFF_TUN`, `IFF_NO_PI` from
/// `linux/if_tun.h`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

/// Creates the TUN device `name` in the network namespace at `netns`.
fn tun_in(netns: &str, name: &str) -> std::io::Result<File> {
    let ns = File::open(netns)?;
    // SAFETY: setns on a valid namespace fd; it moves this (only) thread,
    // and /dev/net/tun creates its device in the opener's namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let tun = OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC).open("/dev/net/tun")?;
    // struct ifreq: the name (16 bytes), then the flags (a short).
    let mut ifreq = [0u8; 40];
    let bytes = name.as_bytes();
    if bytes.len() >= 16 {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "interface name too long"));
    }
    ifreq[..bytes.len()].copy_from_slice(bytes);
    ifreq[16..18].copy_from_slice(&(IFF_TUN | IFF_NO_PI).to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes an ifreq, which ifreq is (40
    // bytes, the size of struct ifreq on 64-bit Linux).
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, ifreq.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(tun)
}

/// Copies packets from `from` to `to` until either fails.
fn pump(mut from: &File, mut to: &File) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // A packet the other side cannot take (its device down) is lost,
        // as on a cable.
        let _ = to.write(&buf[..n]);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [ns_a, if_a, ns_b, if_b] = args.as_slice() else {
        eprintln!("usage: tun-relay NETNS_A IFNAME_A NETNS_B IFNAME_B");
        std::process::exit(2);
    };
    let a = tun_in(ns_a, if_a).unwrap_or_else(|e| panic!("tun {if_a} in {ns_a}: {e}"));
    let b = tun_in(ns_b, if_b).unwrap_or_else(|e| panic!("tun {if_b} in {ns_b}: {e}"));
    println!("ready");
    let _ = std::io::stdout().flush();
    let (a2, b2) = (a.try_clone().expect("dup"), b.try_clone().expect("dup"));
    let back = std::thread::spawn(move || pump(&b2, &a2));
    pump(&a, &b);
    let _ = back.join();
}
