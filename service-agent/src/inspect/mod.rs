//! `service-agent inspect` and `explain`: readable views straight from the
//! pinned maps, in the spirit of `cilium bpf lb list` and `kubectl get
//! endpoints`. The JSON output (`-o json`) is the same data, with field
//! names that are kept stable (documented in README.md).

use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr, path::Path};

use serde::Serialize;
use service_common::{
    CtKey, CtValue, FAMILY_IPV4, ServiceKey, addr_v4, backend_flags, backend_state, conntrack, ct_flags, hash, port_be,
    service_flags,
};

use crate::{
    maps::{self, LoadError, MapSizes, PinnedMaps},
    reconciler::{MapIo as _, MapState, dump},
};

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("reading the pinned maps: {0}")]
    Load(#[from] LoadError),
    #[error("reading the pinned maps: {0}")]
    Map(#[from] crate::reconciler::MapError),
    #[error("{0}")]
    Usage(String),
}

#[derive(Debug, Serialize)]
pub struct BackendRow {
    pub id: u32,
    pub address: String,
    pub port: u16,
    pub protocol: String,
    pub local: bool,
    pub state: &'static str,
    /// Packets and bytes translated to and from it (both directions).
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct ServiceRow {
    pub frontend: String,
    pub address: String,
    pub port: u16,
    pub protocol: String,
    pub scope: &'static str,
    pub rev_nat_id: u32,
    pub flags: Vec<&'static str>,
    pub affinity_timeout_seconds: u32,
    pub slots: u32,
    /// Backends with the number of table slots each holds.
    pub backends: Vec<(BackendRow, u32)>,
    /// Packets and bytes translated for this frontend's address:port
    /// (both directions; TCP and UDP of one port share the count).
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct ConntrackRow {
    pub protocol: String,
    pub source: String,
    pub destination: String,
    /// "dnat" (original direction) or "rev-nat" (reply direction).
    pub direction: &'static str,
    pub translated_to: String,
    pub backend_id: u32,
    /// A FIN or RST was seen (TCP).
    pub closing: bool,
    pub idle_seconds: u64,
    /// "assured" (the `conntrack` map) or "new" (`conntrack_new`: not yet
    /// answered).
    pub table: &'static str,
    /// The flow's state bits by name (`conntrack::state::NAMES`).
    pub state: Vec<&'static str>,
    /// The idle time left before the entry expires (0: expired, the
    /// garbage collector frees it).
    pub expires_in_seconds: u64,
}

#[derive(Debug, Serialize)]
pub struct AffinityRow {
    pub client: String,
    pub rev_nat_id: u32,
    pub frontend: String,
    pub protocol: String,
    pub backend_id: u32,
    pub backend: String,
    pub idle_seconds: u64,
}

#[derive(Debug, Serialize)]
pub struct StatRow {
    pub counter: &'static str,
    pub drop: bool,
    pub packets: u64,
}

fn flag_names(flags: u16) -> Vec<&'static str> {
    service_flags::NAMES.into_iter().filter(|(bit, _)| flags & bit != 0).map(|(_, n)| n).collect()
}

/// One `backends` row, readable.
#[must_use]
pub fn services_backend(id: u32, b: &service_common::BackendValue) -> BackendRow {
    backend_row(id, b)
}

fn backend_row(id: u32, b: &service_common::BackendValue) -> BackendRow {
    BackendRow {
        id,
        address: dump::ip(b.family, &b.addr).to_string(),
        port: u16::from_be_bytes(b.port),
        protocol: dump::proto_name(b.proto),
        local: b.flags & backend_flags::LOCAL != 0,
        state: if b.state == backend_state::TERMINATING { "terminating" } else { "active" },
        packets: 0,
        bytes: 0,
    }
}

/// The frontends with their backends, from the applied rows.
#[must_use]
pub fn services(state: &MapState) -> Vec<ServiceRow> {
    state
        .services
        .iter()
        .filter(|(k, _)| k.slot == 0)
        .map(|(k, v)| {
            let mut per_backend: BTreeMap<u32, u32> = BTreeMap::new();
            for s in 1..=v.count {
                let slot = k.with_slot(v.version, s);
                if let Some(row) = state.services.get(&slot) {
                    *per_backend.entry(row.backend_id).or_default() += 1;
                }
            }
            ServiceRow {
                frontend: dump::frontend(k),
                address: dump::ip(k.family, &k.addr).to_string(),
                port: u16::from_be_bytes(k.port),
                protocol: dump::proto_name(k.proto),
                scope: if k.scope == service_common::SCOPE_INTERNAL { "internal" } else { "external" },
                rev_nat_id: v.rev_nat_id,
                flags: flag_names(v.flags),
                affinity_timeout_seconds: v.affinity_timeout_s,
                slots: v.count,
                backends: per_backend
                    .into_iter()
                    .filter_map(|(id, n)| state.backends.get(&id).map(|b| (backend_row(id, b), n)))
                    .collect(),
                packets: 0,
                bytes: 0,
            }
        })
        .collect()
}

/// Fills the packet and byte counts from the per-CPU counter maps.
///
/// # Errors
/// When the counter maps cannot be read.
pub fn add_counters(rows: &mut [ServiceRow], backends: &mut [BackendRow], root: &Path) -> Result<(), InspectError> {
    let svc = maps::read_counters(root, service_common::map_names::SERVICE_COUNTERS)?;
    let be = maps::read_counters(root, service_common::map_names::BACKEND_COUNTERS)?;
    for r in rows {
        let c = svc.get(&r.rev_nat_id).copied().unwrap_or_default();
        (r.packets, r.bytes) = (c.packets, c.bytes);
        for (b, _) in &mut r.backends {
            let c = be.get(&b.id).copied().unwrap_or_default();
            (b.packets, b.bytes) = (c.packets, c.bytes);
        }
    }
    for b in backends {
        let c = be.get(&b.id).copied().unwrap_or_default();
        (b.packets, b.bytes) = (c.packets, c.bytes);
    }
    Ok(())
}

fn endpoint(family: u8, addr: &service_common::Addr, port: service_common::Port) -> String {
    format!("{}:{}", dump::ip(family, addr), u16::from_be_bytes(port))
}

/// The names of a flow's `conntrack::state` bits.
#[must_use]
pub fn state_names(state: u8) -> Vec<&'static str> {
    conntrack::state::NAMES.into_iter().filter(|(bit, _)| state & bit != 0).map(|(_, n)| n).collect()
}

/// Seconds of idle time left before `v` expires at `now_ns`.
fn expires_in_seconds(proto: u8, v: &CtValue, now_ns: u64) -> u64 {
    let idle = now_ns.saturating_sub(v.last_seen_ns);
    conntrack::timeout_ns(proto, v.state).saturating_sub(idle) / 1_000_000_000
}

/// Both conntrack maps' entries, each with the name of its table
/// ("assured": `conntrack`, "new": `conntrack_new`).
///
/// # Errors
/// When a map cannot be read.
pub fn conntrack_entries(root: &Path) -> Result<Vec<(&'static str, CtKey, CtValue)>, InspectError> {
    let mut out: Vec<_> = maps::read_conntrack(root)?.into_iter().map(|(k, v)| ("assured", k, v)).collect();
    out.extend(maps::read_conntrack_new(root)?.into_iter().map(|(k, v)| ("new", k, v)));
    Ok(out)
}

/// Conntrack entries of both tables (assured flows, then new ones).
///
/// # Errors
/// When a map cannot be read.
pub fn conntrack(root: &Path) -> Result<Vec<ConntrackRow>, InspectError> {
    let now = maps::monotonic_ns();
    Ok(conntrack_entries(root)?
        .into_iter()
        .map(|(table, k, v)| ConntrackRow {
            protocol: dump::proto_name(k.proto),
            source: endpoint(k.family, &k.saddr, k.sport),
            destination: endpoint(k.family, &k.daddr, k.dport),
            direction: if v.flags & ct_flags::DNAT != 0 { "dnat" } else { "rev-nat" },
            translated_to: endpoint(k.family, &v.nat_addr, v.nat_port),
            backend_id: v.backend_id,
            closing: conntrack::is_closing(k.proto, v.state),
            idle_seconds: now.saturating_sub(v.last_seen_ns) / 1_000_000_000,
            table,
            state: state_names(v.state),
            expires_in_seconds: expires_in_seconds(k.proto, &v, now),
        })
        .collect())
}

/// ClientIP affinity entries.
///
/// # Errors
/// When the maps cannot be read.
pub fn affinity(root: &Path, state: &MapState) -> Result<Vec<AffinityRow>, InspectError> {
    let now = maps::monotonic_ns();
    Ok(maps::read_affinity(root)?
        .into_iter()
        .map(|(k, v)| AffinityRow {
            client: dump::ip(FAMILY_IPV4, &k.client).to_string(),
            rev_nat_id: k.rev_nat_id,
            frontend: state
                .rev_nat
                .get(&k.rev_nat_id)
                .map_or_else(|| "?".into(), |r| endpoint(r.family, &r.addr, r.port)),
            protocol: dump::proto_name(k.proto),
            backend_id: v.backend_id,
            backend: state
                .backends
                .get(&v.backend_id)
                .map_or_else(|| "(gone)".into(), |b| endpoint(b.family, &b.addr, b.port)),
            idle_seconds: now.saturating_sub(v.last_used_ns) / 1_000_000_000,
        })
        .collect())
}

/// The per-CPU counters, summed.
///
/// # Errors
/// When the map cannot be read.
pub fn stats(root: &Path) -> Result<Vec<StatRow>, InspectError> {
    Ok(maps::read_stats(root)?
        .into_iter()
        .enumerate()
        .map(|(id, (counter, packets))| StatRow {
            counter,
            drop: service_common::stats::is_drop(u32::try_from(id).unwrap_or(u32::MAX)),
            packets,
        })
        .collect())
}

/// The rows the agent wrote, read back from the pins.
///
/// # Errors
/// When the maps cannot be read.
pub fn applied(root: &Path) -> Result<MapState, InspectError> {
    Ok(PinnedMaps::open(root, MapSizes::default())?.dump()?)
}

/// Renders rows as an aligned text table.
#[must_use]
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &[String]| {
        let cols: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        let _ = writeln!(out, "{}", cols.join("  ").trim_end());
    };
    line(&mut out, &header.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>());
    for r in rows {
        line(&mut out, r);
    }
    out
}

/// `SRC_IP[:PORT]` and `DST_IP:PORT/PROTO`.
fn parse_flow(src: &str, dst: &str) -> Result<(Ipv4Addr, Option<u16>, Ipv4Addr, u16, u8), InspectError> {
    let usage = |m: &str| InspectError::Usage(format!("{m} (expected SRC_IP[:PORT] DST_IP:PORT/PROTO)"));
    let (src_ip, src_port) = match src.split_once(':') {
        Some((ip, port)) => (ip, Some(port.parse::<u16>().map_err(|_| usage("bad source port"))?)),
        None => (src, None),
    };
    let src_ip: Ipv4Addr = src_ip.parse().map_err(|_| usage("bad source address"))?;
    let (dst, proto) = dst.split_once('/').ok_or_else(|| usage("missing /PROTO"))?;
    let proto = match proto.to_ascii_uppercase().as_str() {
        "TCP" => service_common::PROTO_TCP,
        "UDP" => service_common::PROTO_UDP,
        "SCTP" => service_common::PROTO_SCTP,
        _ => return Err(usage("PROTO must be TCP, UDP or SCTP")),
    };
    let (dst_ip, dst_port) = dst.split_once(':').ok_or_else(|| usage("missing :PORT"))?;
    let dst_ip: Ipv4Addr = dst_ip.parse().map_err(|_| usage("bad destination address"))?;
    let dst_port: u16 = dst_port.parse().map_err(|_| usage("bad destination port"))?;
    Ok((src_ip, src_port, dst_ip, dst_port, proto))
}

/// `explain`: what a flow from `src` (`IP` or `IP:PORT`) to `dst`
/// (`IP:PORT/PROTO`) gets, and why, from the live maps.
///
/// # Errors
/// When the arguments do not parse or the maps cannot be read.
#[expect(clippy::too_many_lines, reason = "one report, read top to bottom in the order it prints")]
pub fn explain(root: &Path, src: &str, dst: &str) -> Result<String, InspectError> {
    let (src_ip, src_port, dst_ip, dst_port, proto) = parse_flow(src, dst)?;
    let state = applied(root)?;
    let mut out = String::new();
    let key0 = ServiceKey::frontend(
        FAMILY_IPV4,
        addr_v4(dst_ip.octets()),
        port_be(dst_port),
        proto,
        service_common::SCOPE_INTERNAL,
    );
    let Some(svc) = state.services.get(&key0) else {
        let _ = writeln!(
            out,
            "{dst_ip}:{dst_port}/{} is not a Service frontend here: the packet passes untouched.",
            dump::proto_name(proto)
        );
        return Ok(out);
    };
    let _ = writeln!(
        out,
        "frontend {}: rev_nat {}, {} slots (version {}), flags [{}], affinity {} s",
        dump::frontend(&key0),
        svc.rev_nat_id,
        svc.count,
        svc.version,
        flag_names(svc.flags).join(","),
        svc.affinity_timeout_s
    );
    let describe = |id: u32| {
        state.backends.get(&id).map_or_else(
            || format!("backend {id} (gone)"),
            |b| {
                let r = backend_row(id, b);
                format!(
                    "backend {id} {}:{}/{}{}{}",
                    r.address,
                    r.port,
                    r.protocol,
                    if r.local { " local" } else { "" },
                    if r.state == "terminating" { " terminating" } else { "" }
                )
            },
        )
    };
    if svc.count == 0 {
        let why = if svc.flags & service_flags::DROP != 0 {
            "dropped: the traffic policy is Local and this node has no endpoint"
        } else {
            "rejected (TCP RST / ICMP port unreachable): the Service has no usable endpoint"
        };
        let _ = writeln!(out, "new flows are {why}.");
        return Ok(out);
    }
    // Existing flows from this client, in either conntrack table.
    let ct = conntrack_entries(root)?;
    let now = maps::monotonic_ns();
    let flows: Vec<&(&str, CtKey, CtValue)> = ct
        .iter()
        .filter(|(_, k, v)| {
            v.flags & ct_flags::DNAT != 0
                && k.saddr == addr_v4(src_ip.octets())
                && k.daddr == key0.addr
                && k.dport == key0.port
                && k.proto == proto
                && src_port.is_none_or(|p| k.sport == port_be(p))
        })
        .collect();
    for (table, k, v) in &flows {
        let names = state_names(v.state);
        let _ = writeln!(
            out,
            "conntrack ({table}): the flow from port {} is pinned to {} (state [{}], idle {} s, expires in {} s)",
            u16::from_be_bytes(k.sport),
            describe(v.backend_id),
            names.join(","),
            now.saturating_sub(v.last_seen_ns) / 1_000_000_000,
            expires_in_seconds(proto, v, now),
        );
    }
    if svc.flags & service_flags::AFFINITY != 0 {
        let aff = maps::read_affinity(root)?;
        let entry = aff
            .iter()
            .find(|(k, _)| k.client == addr_v4(src_ip.octets()) && k.rev_nat_id == svc.rev_nat_id && k.proto == proto);
        match entry {
            Some((_, v)) => {
                let idle = now.saturating_sub(v.last_used_ns) / 1_000_000_000;
                let live = idle <= u64::from(svc.affinity_timeout_s);
                let _ = writeln!(
                    out,
                    "affinity: {src_ip} → {} (idle {idle} s of {} s{})",
                    describe(v.backend_id),
                    svc.affinity_timeout_s,
                    if live { "" } else { ", expired: a new flow is hashed again" }
                );
            }
            None => {
                let _ =
                    writeln!(out, "affinity: no entry for {src_ip} yet: its next new flow is hashed and remembered.");
            }
        }
    }
    if let Some(port) = src_port {
        let h = hash::flow_hash(&addr_v4(src_ip.octets()), &key0.addr, port_be(port), key0.port, proto);
        let slot = hash::slot_for(h, svc.count);
        let row = state.services.get(&key0.with_slot(svc.version, slot));
        let _ = writeln!(
            out,
            "a new flow from {src_ip}:{port} hashes to slot {slot} of {}: {}",
            svc.count,
            row.map_or_else(|| "(missing slot row)".into(), |r| describe(r.backend_id))
        );
    } else {
        let _ = writeln!(
            out,
            "a new flow's backend depends on its source port (give SRC as IP:PORT to see its slot); the table:"
        );
        let row = services(&state).into_iter().find(|r| r.frontend == dump::frontend(&key0));
        for (b, n) in row.map(|r| r.backends).unwrap_or_default() {
            let _ = writeln!(out, "  {n:>5} of {} slots → {}", svc.count, describe(b.id));
        }
    }
    if flows.is_empty() && src_port.is_some() {
        let _ = writeln!(out, "no conntrack entry for this flow yet.");
    }
    Ok(out)
}
