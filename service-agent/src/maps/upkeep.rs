//! What the agent writes into the programs' maps besides the reconciler's
//! rows: the node address SNAT uses per interface, and the flush of UDP
//! conntrack entries whose backend left (kube-proxy's conntrack cleanup),
//! with its counterpart on the socket path (the `sock_rev_nat` rows of
//! UDP sockets translated to such a backend, whose sockets the agent then
//! closes).

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use aya::maps::{HashMap, MapData};
use service_common::{CtKey, CtValue, SnatAddrKey, SockRevNatKey, SockRevNatValue, map_names};

use super::{
    LoadError,
    access::{is_not_found, open_hash},
};

/// Makes the pinned `snat_addrs` map hold exactly `rows` ((ifindex, or
/// `service_common::SNAT_HAIRPIN`, and family) → the address SNAT writes;
/// a row whose address is not of its key's family is refused).
///
/// # Errors
/// When the pin is missing or a row cannot be written.
pub fn write_snat_addrs(root: &Path, rows: &BTreeMap<SnatAddrKey, IpAddr>) -> Result<(), LoadError> {
    let name = map_names::SNAT_ADDRS;
    if let Some((key, addr)) = rows.iter().find(|(k, a)| k.family != crate::rows::family(**a)) {
        return Err(LoadError::Object(format!(
            "snat_addrs: {addr} is not of family {} (interface {})",
            key.family, key.ifindex
        )));
    }
    let mut map: HashMap<MapData, SnatAddrKey, service_common::Addr> = open_hash(root, name)?;
    let stale: Vec<SnatAddrKey> = map.keys().filter_map(Result::ok).filter(|k| !rows.contains_key(k)).collect();
    for key in stale {
        map.remove(&key).map_err(|source| LoadError::Map { name, source })?;
    }
    for (key, addr) in rows {
        let value = crate::rows::addr_bytes(*addr);
        if map.get(key, 0).ok() != Some(value) {
            map.insert(key, value, 0).map_err(|source| LoadError::Map { name, source })?;
        }
    }
    Ok(())
}

/// Writes the `socket_lb` row: `--socket-lb`'s mode, and the network
/// namespace cookie of the agent's own namespace (the node's, whose
/// sockets `host` translates).
///
/// # Errors
/// When the pin is missing, the cookie cannot be read, or the row cannot
/// be written.
pub fn write_socket_lb(root: &Path, mode: u32) -> Result<(), LoadError> {
    let name = map_names::SOCKET_LB;
    let data = aya::maps::MapData::from_pin(root.join(name)).map_err(|source| LoadError::Map { name, source })?;
    let mut map: aya::maps::Array<MapData, service_common::SocketLbConfig> =
        aya::maps::Array::try_from(aya::maps::Map::Array(data)).map_err(|source| LoadError::Map { name, source })?;
    let host_netns_cookie = own_netns_cookie().map_err(|e| LoadError::Object(format!("SO_NETNS_COOKIE: {e}")))?;
    let row = service_common::SocketLbConfig { mode, _pad: 0, host_netns_cookie };
    map.set(0, row, 0).map_err(|source| LoadError::Map { name, source })
}

/// The cookie of this process's network namespace (`SO_NETNS_COOKIE` of a
/// socket opened here: the value `bpf_get_netns_cookie` gives programs).
///
/// # Errors
/// When no socket can be opened or the kernel has no `SO_NETNS_COOKIE`.
fn own_netns_cookie() -> std::io::Result<u64> {
    use std::os::fd::AsRawFd as _;
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").or_else(|_| std::net::UdpSocket::bind("0.0.0.0:0"))?;
    let mut cookie: u64 = 0;
    #[expect(clippy::cast_possible_truncation, reason = "8 fits in socklen_t")]
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE, (&raw mut cookie).cast(), &raw mut len)
    };
    if rc == 0 { Ok(cookie) } else { Err(std::io::Error::last_os_error()) }
}

/// Deletes the UDP conntrack entries (both directions, in `conntrack` and
/// `conntrack_new`) whose (frontend, backend) pair is no longer live, so
/// clients of a removed backend move to a live one with their next
/// datagram, as kube-proxy's conntrack cleanup does. TCP entries are left
/// alone: a removed backend that still runs finishes its connections.
/// Returns how many entries were deleted.
///
/// # Errors
/// When a pin is missing or unreadable.
pub fn flush_udp_conntrack(root: &Path, live: impl Fn(u32, u32) -> bool) -> Result<usize, LoadError> {
    let mut removed = 0;
    for name in [map_names::CONNTRACK, map_names::CONNTRACK_NEW] {
        let mut map: HashMap<MapData, CtKey, CtValue> = open_hash(root, name)?;
        let stale: Vec<CtKey> = map
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| k.proto == service_common::PROTO_UDP && !live(v.rev_nat_id, v.backend_id))
            .map(|(k, _)| k)
            .collect();
        for key in stale {
            // Read again just before the delete: a client reusing the
            // tuple may have replaced the stale flow with a new one (of a
            // live backend) since the walk saw it.
            if map.get(&key, 0).is_ok_and(|v| live(v.rev_nat_id, v.backend_id)) {
                continue;
            }
            match map.remove(&key) {
                Ok(()) => removed += 1,
                Err(e) if is_not_found(&e) => {}
                Err(source) => return Err(LoadError::Map { name, source }),
            }
        }
    }
    Ok(removed)
}

/// Takes the UDP rows of `sock_rev_nat` whose (rev-NAT id, backend id)
/// pair is no longer live — sockets the socket path translated to a
/// backend that has since left — out of the map, and returns their
/// sockets (cookie, backend address: IPv4 or IPv6) for the agent to close the connected
/// ones among them.
///
/// # Errors
/// When the pin is missing or unreadable.
pub fn take_udp_sockets_of_removed_backends(
    root: &Path,
    live: impl Fn(u32, u32) -> bool,
) -> Result<Vec<(u64, SocketAddr)>, LoadError> {
    let name = map_names::SOCK_REV_NAT;
    let mut map: HashMap<MapData, SockRevNatKey, SockRevNatValue> = open_hash(root, name)?;
    let stale = |v: &SockRevNatValue| v.proto == service_common::PROTO_UDP && !live(v.rev_nat_id, v.backend_id);
    let keys: Vec<SockRevNatKey> =
        map.iter().filter_map(Result::ok).filter(|(_, v)| stale(v)).map(|(k, _)| k).collect();
    let mut taken = Vec::new();
    for key in keys {
        // Read again: the socket may have been translated afresh since.
        if !map.get(&key, 0).is_ok_and(|v| stale(&v)) {
            continue;
        }
        match map.remove(&key) {
            Ok(()) => {
                let ip = crate::rows::render::ip(key.family, &key.addr);
                taken.push((key.cookie, SocketAddr::new(ip, u16::from_be_bytes(key.port))));
            }
            Err(e) if is_not_found(&e) => {}
            Err(source) => return Err(LoadError::Map { name, source }),
        }
    }
    Ok(taken)
}
