//! What the agent writes into the programs' maps besides the reconciler's
//! rows: the node address SNAT uses per interface, and the flush of UDP
//! conntrack entries whose backend left (kube-proxy's conntrack cleanup).

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use aya::maps::{HashMap, MapData};
use service_common::{CtKey, CtValue, map_names};

use super::{
    LoadError,
    access::{is_not_found, open_hash},
};

/// Makes the pinned `snat_addrs` map hold exactly `rows` (ifindex, or
/// `service_common::SNAT_HAIRPIN`, → the IPv4 address SNAT writes).
///
/// # Errors
/// When the pin is missing or a row cannot be written.
pub fn write_snat_addrs(root: &Path, rows: &BTreeMap<u32, Ipv4Addr>) -> Result<(), LoadError> {
    let name = map_names::SNAT_ADDRS;
    let mut map: HashMap<MapData, u32, service_common::Addr> = open_hash(root, name)?;
    let stale: Vec<u32> = map.keys().filter_map(Result::ok).filter(|k| !rows.contains_key(k)).collect();
    for key in stale {
        map.remove(&key).map_err(|source| LoadError::Map { name, source })?;
    }
    for (key, addr) in rows {
        let value = service_common::addr_v4(addr.octets());
        if map.get(key, 0).ok() != Some(value) {
            map.insert(key, value, 0).map_err(|source| LoadError::Map { name, source })?;
        }
    }
    Ok(())
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
