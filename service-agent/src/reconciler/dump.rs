//! The canonical, sorted, human-readable dump of the map rows: what the
//! golden tests compare and what `inspect` builds on. Slot rows are shown as
//! their frontend's table; rows that belong to no live table are listed as
//! stray (a correct reconcile leaves none).

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use service_common::{Addr, FAMILY_IPV4, Port, ServiceKey, backend_flags, backend_state, service_flags};

use super::MapState;

#[must_use]
pub fn ip(family: u8, addr: &Addr) -> IpAddr {
    if family == FAMILY_IPV4 {
        IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*addr))
    }
}

#[must_use]
pub fn proto_name(proto: u8) -> String {
    match proto {
        service_common::PROTO_TCP => "TCP".into(),
        service_common::PROTO_UDP => "UDP".into(),
        service_common::PROTO_SCTP => "SCTP".into(),
        other => format!("proto{other}"),
    }
}

fn port(p: Port) -> u16 {
    u16::from_be_bytes(p)
}

#[must_use]
pub fn frontend(k: &ServiceKey) -> String {
    let scope = if k.scope == service_common::SCOPE_INTERNAL { "internal" } else { "external" };
    format!("{}:{}/{} {scope}", ip(k.family, &k.addr), port(k.port), proto_name(k.proto))
}

fn service_flag_names(flags: u16) -> String {
    let names: Vec<&str> = service_flags::NAMES.iter().filter(|(bit, _)| flags & bit != 0).map(|(_, n)| *n).collect();
    if names.is_empty() { "-".into() } else { names.join(",") }
}

/// Renders `state` canonically.
#[must_use]
pub fn render(state: &MapState) -> String {
    let mut out = String::from("services:\n");
    let mut live = std::collections::BTreeSet::new();
    for (k, v) in state.services.iter().filter(|(k, _)| k.slot == 0) {
        let _ = writeln!(
            out,
            "  {} rev_nat={} version={} slots={} flags={} affinity={}s",
            frontend(k),
            v.rev_nat_id,
            v.version,
            v.count,
            service_flag_names(v.flags),
            v.affinity_timeout_s
        );
        live.insert(*k);
        let mut table = Vec::new();
        let mut in_table = std::collections::BTreeSet::new();
        for s in 1..=v.count {
            let key = k.with_slot(v.version, s);
            live.insert(key);
            let row = state.services.get(&key);
            in_table.extend(row.map(|r| r.backend_id));
            table.push(row.map_or_else(|| "MISSING".to_owned(), |r| r.backend_id.to_string()));
        }
        if !table.is_empty() {
            let _ = writeln!(out, "    table: {}", table.join(" "));
        }
        // Member rows are shown only when they disagree with the table.
        let members: std::collections::BTreeSet<u32> = state
            .services
            .range(k.member(0)..=k.member(u32::MAX))
            .map(|(m, _)| {
                live.insert(*m);
                m.version
            })
            .collect();
        if members != in_table {
            let ids: Vec<String> = members.iter().map(ToString::to_string).collect();
            let _ = writeln!(out, "    MEMBERS DIFFER FROM THE TABLE: {}", ids.join(" "));
        }
    }
    for (k, v) in state.services.iter().filter(|(k, _)| !live.contains(k)) {
        let _ = writeln!(out, "  STRAY {} version={} slot={} backend={}", frontend(k), k.version, k.slot, v.backend_id);
    }
    out.push_str("backends:\n");
    for (id, b) in &state.backends {
        let local = if b.flags & backend_flags::LOCAL != 0 { " local" } else { "" };
        let state = if b.state == backend_state::TERMINATING { " terminating" } else { "" };
        let _ =
            writeln!(out, "  {id} {}:{}/{}{local}{state}", ip(b.family, &b.addr), port(b.port), proto_name(b.proto));
    }
    out.push_str("rev_nat:\n");
    for (id, r) in &state.rev_nat {
        let _ = writeln!(out, "  {id} {}:{}", ip(r.family, &r.addr), port(r.port));
    }
    if !state.source_ranges.is_empty() {
        out.push_str("source_ranges:\n");
        for (len, k) in &state.source_ranges {
            let _ = writeln!(
                out,
                "  rev_nat={} {} {}/{}",
                u32::from_be_bytes(k.rev_nat_id),
                proto_name(k.proto),
                ip(k.family, &k.addr),
                len.saturating_sub(service_common::SOURCE_RANGE_FRONTEND_BITS)
            );
        }
    }
    out
}
