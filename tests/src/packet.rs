//! Crafting and checking packets for the BPF_PROG_TEST_RUN tier, and the
//! test-run syscall itself. Checksums are computed here independently of the
//! kernel (RFC 1071 over the whole header / pseudo-header + segment), so a
//! frame the program rewrote can be compared byte for byte with one built
//! from scratch.

use std::{
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, BorrowedFd},
};

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const TTL: u8 = 64;
const IP_ID: u16 = 0x1234;
const IP_DF: u16 = 0x4000;

/// RFC 1071 one's-complement sum of `data`, folded, not inverted.
#[must_use]
pub fn ones_complement_sum(initial: u32, data: &[u8]) -> u16 {
    let mut sum = initial;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 { u16::from_be_bytes([chunk[0], chunk[1]]) } else { u16::from(chunk[0]) << 8 };
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    u16::try_from(sum).unwrap_or(0xffff)
}

/// The Internet checksum of `data` (what goes into the header field).
#[must_use]
pub fn checksum(data: &[u8]) -> u16 {
    !ones_complement_sum(0, data)
}

fn pseudo_header_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes());
    u32::from(ones_complement_sum(0, &pseudo))
}

/// The L4 checksum over pseudo-header + segment (checksum field zeroed).
#[must_use]
pub fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, segment: &[u8]) -> u16 {
    !ones_complement_sum(pseudo_header_sum(src, dst, proto, segment.len()), segment)
}

/// IPv4 "more fragments".
const IP_MF: u16 = 0x2000;

fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload_len: usize, frag: u16) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&u16::try_from(20 + payload_len).unwrap_or(u16::MAX).to_be_bytes());
    h[4..6].copy_from_slice(&IP_ID.to_be_bytes());
    h[6..8].copy_from_slice(&frag.to_be_bytes());
    h[8] = TTL;
    h[9] = proto;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&NODE_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn ipv4_frame(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, segment: &[u8], frag: u16) -> Vec<u8> {
    let mut ip = ipv4_header(src, dst, proto, segment.len(), frag).to_vec();
    ip.extend_from_slice(segment);
    ethernet(ETH_P_IP, &ip)
}

/// An Ethernet + IPv4 + TCP frame (20-byte TCP header, window 64240) with
/// exact checksums.
#[must_use]
pub fn tcp_v4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut seg = tcp_segment_without_checksum(sport, dport, flags, payload);
    let c = l4_checksum(src, dst, 6, &seg);
    seg[16..18].copy_from_slice(&c.to_be_bytes());
    ipv4_frame(src, dst, 6, &seg, IP_DF)
}

/// A TCP segment of either family (20-byte header: sequence 1000000, the
/// acknowledgement 2000000 when ACK is set, window 64240), its checksum
/// field still 0.
#[must_use]
pub fn tcp_segment_without_checksum(sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut seg = vec![0u8; 20];
    seg[0..2].copy_from_slice(&sport.to_be_bytes());
    seg[2..4].copy_from_slice(&dport.to_be_bytes());
    seg[4..8].copy_from_slice(&1_000_000u32.to_be_bytes());
    seg[8..12].copy_from_slice(&(if flags & 0x10 != 0 { 2_000_000u32 } else { 0 }).to_be_bytes());
    seg[12] = 5 << 4;
    seg[13] = flags;
    seg[14..16].copy_from_slice(&64240u16.to_be_bytes());
    seg.extend_from_slice(payload);
    seg
}

fn udp_segment(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, payload: &[u8], with_checksum: bool) -> Vec<u8> {
    let mut seg = vec![0u8; 8];
    seg[0..2].copy_from_slice(&sport.to_be_bytes());
    seg[2..4].copy_from_slice(&dport.to_be_bytes());
    seg[4..6].copy_from_slice(&u16::try_from(8 + payload.len()).unwrap_or(u16::MAX).to_be_bytes());
    seg.extend_from_slice(payload);
    if with_checksum {
        let mut c = l4_checksum(src, dst, 17, &seg);
        if c == 0 {
            c = 0xffff; // RFC 768: a computed 0 is sent as all ones.
        }
        seg[6..8].copy_from_slice(&c.to_be_bytes());
    }
    seg
}

/// An Ethernet + IPv4 + UDP frame with exact checksums.
#[must_use]
pub fn udp_v4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    ipv4_frame(src, dst, 17, &udp_segment(src, sport, dst, dport, payload, true), 0)
}

/// An Ethernet + IPv4 + ICMP "fragmentation needed" (type 3, code 4) from
/// `src` to `dst` advertising `mtu`, quoting `quoted_frame`'s IP packet
/// (header and all of its payload), with an exact ICMP checksum.
#[must_use]
pub fn icmp_frag_needed_v4(src: Ipv4Addr, dst: Ipv4Addr, mtu: u16, quoted_frame: &[u8]) -> Vec<u8> {
    let mut msg = vec![3, 4, 0, 0, 0, 0];
    msg.extend_from_slice(&mtu.to_be_bytes());
    msg.extend_from_slice(&quoted_frame[14..]);
    let c = checksum(&msg);
    msg[2..4].copy_from_slice(&c.to_be_bytes());
    ipv4_frame(src, dst, 1, &msg, 0)
}

/// The same with the UDP checksum left 0 ("not computed", RFC 768).
#[must_use]
pub fn udp_v4_no_checksum(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    ipv4_frame(src, dst, 17, &udp_segment(src, sport, dst, dport, payload, false), 0)
}

/// CRC32c (Castagnoli), as SCTP uses it (RFC 9260 appendix A).
#[must_use]
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for b in data {
        crc ^= u32::from(*b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82f6_3b78 } else { crc >> 1 };
        }
    }
    !crc
}

/// An Ethernet + IPv4 + SCTP frame carrying an INIT chunk, with a correct
/// CRC32c (which covers the SCTP packet only, not the IP addresses).
#[must_use]
pub fn sctp_init_v4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let mut seg = vec![0u8; 12];
    seg[0..2].copy_from_slice(&sport.to_be_bytes());
    seg[2..4].copy_from_slice(&dport.to_be_bytes());
    // INIT: type 1, flags 0, length 20, initiate tag, a_rwnd, streams, TSN.
    seg.extend_from_slice(&[1, 0, 0, 20]);
    seg.extend_from_slice(&0x1234_5678u32.to_be_bytes());
    seg.extend_from_slice(&65_535u32.to_be_bytes());
    seg.extend_from_slice(&[0, 10, 0, 10]);
    seg.extend_from_slice(&1u32.to_be_bytes());
    // The CRC is stored little-endian (RFC 9260 appendix A).
    let crc = crc32c(&seg);
    seg[8..12].copy_from_slice(&crc.to_le_bytes());
    ipv4_frame(src, dst, 132, &seg, IP_DF)
}

/// A UDP datagram (exact checksum over all of it) sent as two IPv4
/// fragments: the first carries the UDP header and `first_len - 8` bytes
/// of payload (MF set), the second the rest (at offset `first_len`). Both
/// carry the same identification.
///
/// # Panics
/// When `first_len` is not a multiple of 8 or not shorter than the segment.
#[must_use]
pub fn udp_v4_fragments(
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    payload: &[u8],
    first_len: usize,
) -> (Vec<u8>, Vec<u8>) {
    let seg = udp_segment(src, sport, dst, dport, payload, true);
    assert!(first_len.is_multiple_of(8) && first_len < seg.len());
    let first = ipv4_frame(src, dst, 17, &seg[..first_len], IP_MF);
    let offset = u16::try_from(first_len / 8).expect("offset");
    let rest = ipv4_frame(src, dst, 17, &seg[first_len..], offset);
    (first, rest)
}

/// `frame` (Ethernet + a 20-byte IPv4 header) with 4 bytes of IP options
/// (three NOPs and an end of list) after its header: IHL 6, the total
/// length and the header checksum redone. The L4 checksum stays exact (the
/// pseudo-header counts the L4 length, which does not change).
///
/// # Panics
/// When `frame` has no 20-byte IPv4 header.
#[must_use]
pub fn with_ip_options(frame: &[u8]) -> Vec<u8> {
    assert_eq!(frame[14], 0x45, "a 20-byte IPv4 header");
    let mut f = frame[..34].to_vec();
    f.extend_from_slice(&[1, 1, 1, 0]);
    f.extend_from_slice(&frame[34..]);
    f[14] = 0x46;
    let tot_len = u16::from_be_bytes([f[16], f[17]]) + 4;
    f[16..18].copy_from_slice(&tot_len.to_be_bytes());
    f[24] = 0;
    f[25] = 0;
    let c = checksum(&f[14..38]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f
}

/// A non-first IPv4 fragment (offset in 8-byte units) of a UDP datagram.
#[must_use]
pub fn ipv4_fragment(src: Ipv4Addr, dst: Ipv4Addr, offset_units: u16, data: &[u8]) -> Vec<u8> {
    ipv4_frame(src, dst, 17, data, offset_units & 0x1fff)
}

/// An ARP request "who has `target`? tell `sender`".
#[must_use]
pub fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 0x08, 0x00, 6, 4, 0, 1];
    a.extend_from_slice(&CLIENT_MAC);
    a.extend_from_slice(&sender.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target.octets());
    let mut f = ethernet(ETH_P_ARP, &a);
    f[0..6].copy_from_slice(&[0xff; 6]);
    f
}

/// The fields of an Ethernet + IPv4 + TCP/UDP frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub ethertype: u16,
    pub ip_src: Ipv4Addr,
    pub ip_dst: Ipv4Addr,
    pub proto: u8,
    pub ip_checksum: u16,
    pub sport: u16,
    pub dport: u16,
    pub l4_checksum: u16,
    pub payload: Vec<u8>,
}

/// Parses an Ethernet + IPv4 + TCP/UDP frame; `None` for anything else.
#[must_use]
pub fn parse(frame: &[u8]) -> Option<Parsed> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = frame.get(14..)?;
    let ihl = usize::from(ip.first()? & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
    let proto = *ip.get(9)?;
    let l4 = ip.get(ihl..total)?;
    let (csum_off, header_len) = match proto {
        6 => (16, usize::from(l4.get(12)? >> 4) * 4),
        17 => (6, 8),
        _ => return None,
    };
    Some(Parsed {
        ethertype,
        ip_src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        ip_dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        proto,
        ip_checksum: u16::from_be_bytes([ip[10], ip[11]]),
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dport: u16::from_be_bytes([l4[2], l4[3]]),
        l4_checksum: u16::from_be_bytes([*l4.get(csum_off)?, *l4.get(csum_off + 1)?]),
        payload: l4.get(header_len..)?.to_vec(),
    })
}

/// Whether both the IPv4 header checksum and the TCP/UDP checksum of
/// `frame` verify (a UDP checksum of 0 means "none" and verifies).
#[must_use]
pub fn checksums_valid(frame: &[u8]) -> bool {
    let Some(p) = parse(frame) else { return false };
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ones_complement_sum(0, &ip[..ihl]) != 0xffff {
        return false;
    }
    if p.proto == 17 && p.l4_checksum == 0 {
        return true;
    }
    let seg = &ip[ihl..total];
    ones_complement_sum(pseudo_header_sum(p.ip_src, p.ip_dst, p.proto, seg.len()), seg) == 0xffff
}

/// What one BPF_PROG_TEST_RUN returned.
#[derive(Clone, Debug)]
pub struct TestRunOutput {
    /// The program's return value (for TC: the `TC_ACT_*` verdict).
    pub retval: u32,
    /// The packet as the program left it.
    pub data_out: Vec<u8>,
    /// Average run time per repetition, in nanoseconds.
    pub duration_ns: u32,
}

/// `bpf_attr.test` from `include/uapi/linux/bpf.h` (the BPF_PROG_TEST_RUN
/// member of the union), padded to the size the kernel accepts.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// Runs the program `prog_fd` once per `repeat` on `data_in`. For TC
/// programs the kernel builds an skb from `data_in` (Ethernet header
/// included, `CHECKSUM_NONE`), so the checksums the program writes must be
/// complete ones.
///
/// # Errors
/// The bpf(2) error.
pub fn prog_test_run(prog_fd: BorrowedFd<'_>, data_in: &[u8], repeat: u32) -> io::Result<TestRunOutput> {
    let mut out = vec![0u8; data_in.len() + 256];
    let mut attr = TestRunAttr {
        prog_fd: u32::try_from(prog_fd.as_raw_fd()).map_err(io::Error::other)?,
        data_size_in: u32::try_from(data_in.len()).map_err(io::Error::other)?,
        data_size_out: u32::try_from(out.len()).map_err(io::Error::other)?,
        data_in: data_in.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat,
        ..TestRunAttr::default()
    };
    // SAFETY: attr is a valid, initialised bpf_attr prefix of the size
    // passed; data_in/data_out point at buffers of the sizes given, which
    // outlive the call.
    let rc =
        unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_TEST_RUN, &raw mut attr, std::mem::size_of::<TestRunAttr>()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    out.truncate(attr.data_size_out as usize);
    Ok(TestRunOutput { retval: attr.retval, data_out: out, duration_ns: attr.duration })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        // The standard check value of CRC-32C over "123456789".
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn rfc1071_example() {
        // The worked example of RFC 1071 section 3: sum 0xddf2.
        assert_eq!(ones_complement_sum(0, &[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]), 0xddf2);
    }

    #[test]
    fn a_known_ipv4_header_checksum() {
        // A classic example header (Wikipedia, "IPv4 header checksum").
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0, 0, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8, 0x00,
            0xc7,
        ];
        assert_eq!(checksum(&h), 0xb861);
    }

    #[test]
    fn built_frames_verify_and_corruption_is_caught() {
        let (a, b) = (Ipv4Addr::new(10, 244, 1, 10), Ipv4Addr::new(10, 96, 0, 10));
        for mut f in
            [tcp_v4(a, 40000, b, 80, 0x02, b"hi"), udp_v4(a, 5000, b, 53, b"odd"), udp_v4_no_checksum(a, 1, b, 2, b"")]
        {
            assert!(checksums_valid(&f));
            let last = f.len() - 1;
            f[last] ^= 0x40;
            if parse(&f).is_some_and(|p| p.l4_checksum != 0) {
                assert!(!checksums_valid(&f));
            }
        }
    }

    #[test]
    fn parse_reads_every_field() {
        let f = tcp_v4(Ipv4Addr::new(1, 2, 3, 4), 1000, Ipv4Addr::new(5, 6, 7, 8), 80, 0x12, b"payload");
        let p = parse(&f).expect("parse");
        assert_eq!((p.ethertype, p.proto, p.sport, p.dport), (0x0800, 6, 1000, 80));
        assert_eq!((p.ip_src, p.ip_dst), (Ipv4Addr::new(1, 2, 3, 4), Ipv4Addr::new(5, 6, 7, 8)));
        assert_eq!(p.payload, b"payload");
        assert!(parse(&arp_request(Ipv4Addr::new(1, 2, 3, 4), Ipv4Addr::new(5, 6, 7, 8))).is_none());
    }

    #[test]
    fn test_run_attr_matches_the_uapi_layout() {
        // bpf_attr.test: batch_size is the last field, at offset 72.
        assert_eq!(std::mem::offset_of!(TestRunAttr, data_in), 16);
        assert_eq!(std::mem::offset_of!(TestRunAttr, repeat), 32);
        assert_eq!(std::mem::offset_of!(TestRunAttr, ctx_in), 48);
        assert_eq!(std::mem::offset_of!(TestRunAttr, batch_size), 72);
    }
}
