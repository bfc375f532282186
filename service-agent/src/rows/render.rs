//! Map rows for humans: the canonical, sorted dump the golden tests compare
//! ([`render`]: slot rows shown as their frontend's table, rows of no live
//! table listed as stray, which a correct reconcile never leaves), and the
//! rows and text tables of `inspect` (one `*Row` type per view, serialized
//! as is for `-o json`, whose field names are kept stable).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use serde::Serialize;
use service_common::{
    Addr, CtKey, CtValue, FAMILY_IPV4, Port, ServiceKey, backend_flags, backend_state, conntrack, ct_flags,
    service_flags,
};

use crate::maps::MapState;

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
    format!("{}/{} {scope}", SocketAddr::new(ip(k.family, &k.addr), port(k.port)), proto_name(k.proto))
}

/// `address:port` of an address as `inspect`'s rows hold it (text), an
/// IPv6 one in brackets (`[2001:db8::1]:80`), as `SocketAddr` shows it.
#[must_use]
pub fn host_port(address: &str, port: u16) -> String {
    if address.contains(':') { format!("[{address}]:{port}") } else { format!("{address}:{port}") }
}

fn service_flag_names(flags: u16) -> String {
    let names = flag_names(flags);
    if names.is_empty() { "-".into() } else { names.join(",") }
}

/// `addr:port` of a row's address and port.
#[must_use]
pub fn endpoint(family: u8, addr: &Addr, port: Port) -> String {
    SocketAddr::new(ip(family, addr), u16::from_be_bytes(port)).to_string()
}

/// Renders `state` canonically.
#[must_use]
pub fn render(state: &MapState) -> String {
    let mut out = String::from("services:\n");
    for (k, v) in &state.services {
        let _ = writeln!(
            out,
            "  {} rev_nat={} table={} slots={} flags={} affinity={}s{}",
            frontend(k),
            v.rev_nat_id,
            v.table,
            v.count,
            service_flag_names(v.flags),
            v.affinity_timeout_s,
            if v.flags & service_flags::AFFINITY == 0 { String::new() } else { format!(" scope={}", v.affinity_scope) }
        );
        if v.count == 0 {
            continue;
        }
        let Some(table) = state.tables.get(&v.table) else {
            let _ = writeln!(out, "    TABLE MISSING");
            continue;
        };
        let ids: Vec<String> = table.slots.iter().map(ToString::to_string).collect();
        let _ = writeln!(out, "    table: {}", ids.join(" "));
        // The member list is shown only when it disagrees with the slots
        // or the row.
        let in_table: std::collections::BTreeSet<u32> = table.slots.iter().copied().collect();
        let members: std::collections::BTreeSet<u32> = table.members.iter().copied().collect();
        if members != in_table || table.members.len() != v.members as usize || table.slots.len() != v.count as usize {
            let ids: Vec<String> = table.members.iter().map(ToString::to_string).collect();
            let _ = writeln!(out, "    MEMBERS DIFFER FROM THE TABLE: {}", ids.join(" "));
        }
    }
    out.push_str("backends:\n");
    for (id, b) in &state.backends {
        let local = if b.flags & backend_flags::LOCAL != 0 { " local" } else { "" };
        let state = if b.state == backend_state::TERMINATING { " terminating" } else { "" };
        let _ = writeln!(
            out,
            "  {id} {}/{}{local}{state}",
            SocketAddr::new(ip(b.family, &b.addr), port(b.port)),
            proto_name(b.proto)
        );
    }
    out.push_str("rev_nat:\n");
    for (id, r) in &state.rev_nat {
        let _ = writeln!(out, "  {id} {}", SocketAddr::new(ip(r.family, &r.addr), port(r.port)));
    }
    if !state.source_ranges.is_empty() {
        out.push_str("source_ranges:\n");
        for (len, k) in &state.source_ranges {
            let owner = u32::from_be_bytes(k.rev_nat_id);
            let prefix = len.saturating_sub(service_common::SOURCE_RANGE_FRONTEND_BITS);
            let addr = ip(k.family, &k.addr);
            let _ = if owner == service_common::service_ips::OWNER {
                let kind =
                    if k.proto == service_common::service_ips::CLUSTER_IP { "cluster-ip" } else { "service-ip-range" };
                writeln!(out, "  {kind} {addr}/{prefix}")
            } else {
                writeln!(out, "  rev_nat={owner} {} {addr}/{prefix}", proto_name(k.proto))
            };
        }
    }
    out
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
    /// The Service port's scope (the rev-NAT id of its ClusterIP).
    pub scope: u32,
    /// The Service port, named by its ClusterIP:port: the entry serves
    /// every frontend of the port.
    pub service_port: String,
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
    /// The packets per ingress interface (counters of the fast path are
    /// counted in total only, and show none).
    pub interfaces: Vec<InterfacePackets>,
}

#[derive(Debug, Serialize)]
pub struct InterfacePackets {
    pub interface: String,
    pub ifindex: u32,
    pub packets: u64,
}

/// The names of a frontend's `service_flags`.
#[must_use]
pub fn flag_names(flags: u16) -> Vec<&'static str> {
    service_flags::NAMES.into_iter().filter(|(bit, _)| flags & bit != 0).map(|(_, n)| n).collect()
}

/// One `backends` row, readable.
#[must_use]
pub fn backend_row(id: u32, b: &service_common::BackendValue) -> BackendRow {
    BackendRow {
        id,
        address: ip(b.family, &b.addr).to_string(),
        port: u16::from_be_bytes(b.port),
        protocol: proto_name(b.proto),
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
        .map(|(k, v)| {
            let mut per_backend: BTreeMap<u32, u32> = BTreeMap::new();
            for id in state.table_of(v).map(|t| t.slots.as_slice()).unwrap_or_default() {
                *per_backend.entry(*id).or_default() += 1;
            }
            ServiceRow {
                frontend: frontend(k),
                address: ip(k.family, &k.addr).to_string(),
                port: u16::from_be_bytes(k.port),
                protocol: proto_name(k.proto),
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

fn or_dash(names: &[&str]) -> String {
    if names.is_empty() { "-".into() } else { names.join(",") }
}

/// `inspect services` as text.
#[must_use]
pub fn services_table(rows: Vec<ServiceRow>) -> String {
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|s| {
            let backends: Vec<String> = s
                .backends
                .iter()
                .map(|(b, n)| {
                    let terminating = if b.state == "terminating" { " terminating" } else { "" };
                    format!("{} ({n}/{}){terminating}", host_port(&b.address, b.port), s.slots)
                })
                .collect();
            vec![
                s.frontend,
                or_dash(&s.flags),
                s.packets.to_string(),
                s.bytes.to_string(),
                if backends.is_empty() { "<none>".into() } else { backends.join(", ") },
            ]
        })
        .collect();
    table(&["FRONTEND", "FLAGS", "PACKETS", "BYTES", "BACKENDS (slots)"], &rows)
}

/// `inspect backends` as text.
#[must_use]
pub fn backends_table(rows: Vec<BackendRow>) -> String {
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|b| {
            vec![
                b.id.to_string(),
                format!("{}/{}", host_port(&b.address, b.port), b.protocol),
                if b.local { "local".into() } else { "remote".into() },
                b.state.into(),
                b.packets.to_string(),
                b.bytes.to_string(),
            ]
        })
        .collect();
    table(&["ID", "BACKEND", "NODE", "STATE", "PACKETS", "BYTES"], &rows)
}

/// `inspect conntrack` as text.
#[must_use]
pub fn conntrack_table(rows: Vec<ConntrackRow>) -> String {
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|c| {
            vec![
                c.protocol,
                c.source,
                c.destination,
                c.direction.into(),
                c.translated_to,
                c.backend_id.to_string(),
                c.table.into(),
                or_dash(&c.state),
                format!("{}s", c.idle_seconds),
                format!("{}s", c.expires_in_seconds),
            ]
        })
        .collect();
    table(
        &[
            "PROTO",
            "SOURCE",
            "DESTINATION",
            "DIRECTION",
            "TRANSLATED TO",
            "BACKEND",
            "TABLE",
            "STATE",
            "IDLE",
            "EXPIRES IN",
        ],
        &rows,
    )
}

/// `inspect affinity` as text.
#[must_use]
pub fn affinity_table(rows: Vec<AffinityRow>) -> String {
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|a| {
            vec![a.client, format!("{}/{}", a.service_port, a.protocol), a.backend, format!("{}s", a.idle_seconds)]
        })
        .collect();
    table(&["CLIENT", "SERVICE PORT", "BACKEND", "IDLE"], &rows)
}

/// `inspect stats` as text.
#[must_use]
pub fn stats_table(rows: Vec<StatRow>) -> String {
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|s| {
            let by: Vec<String> = s.interfaces.iter().map(|i| format!("{}={}", i.interface, i.packets)).collect();
            vec![
                s.counter.into(),
                if s.drop { "drop".into() } else { "pass".into() },
                s.packets.to_string(),
                if by.is_empty() { "-".into() } else { by.join(",") },
            ]
        })
        .collect();
    table(&["COUNTER", "KIND", "PACKETS", "BY INTERFACE"], &rows)
}

/// The names of a flow's `conntrack::state` bits.
#[must_use]
pub fn state_names(state: u8) -> Vec<&'static str> {
    conntrack::state::NAMES.into_iter().filter(|(bit, _)| state & bit != 0).map(|(_, n)| n).collect()
}

/// Seconds of idle time left before `v` expires at `now_ns`.
#[must_use]
pub fn expires_in_seconds(proto: u8, v: &CtValue, now_ns: u64) -> u64 {
    let idle = now_ns.saturating_sub(v.last_seen_ns);
    conntrack::timeout_ns(proto, v.state).saturating_sub(idle) / 1_000_000_000
}

/// One conntrack entry, readable; `table` names the map it is in.
#[must_use]
pub fn conntrack_row(table: &'static str, k: &CtKey, v: &CtValue, now_ns: u64) -> ConntrackRow {
    ConntrackRow {
        protocol: proto_name(k.proto),
        source: endpoint(k.family, &k.saddr, k.sport),
        destination: endpoint(k.family, &k.daddr, k.dport),
        direction: if v.flags & ct_flags::DNAT != 0 { "dnat" } else { "rev-nat" },
        translated_to: endpoint(k.family, &v.nat_addr, v.nat_port),
        backend_id: v.backend_id,
        closing: conntrack::is_closing(k.proto, v.state),
        idle_seconds: now_ns.saturating_sub(v.last_seen_ns) / 1_000_000_000,
        table,
        state: state_names(v.state),
        expires_in_seconds: expires_in_seconds(k.proto, v, now_ns),
    }
}

/// `inspect interfaces` as text.
#[must_use]
pub fn interfaces_table(rows: Vec<crate::attach::AttachedProgram>) -> String {
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|a| vec![a.interface, a.ifindex.to_string(), a.program.into(), a.via.into(), a.tag])
        .collect();
    table(&["INTERFACE", "IFINDEX", "PROGRAM", "VIA", "TAG"], &rows)
}

/// `inspect sockets`: the socket path as the maps and pins show it.
#[derive(Debug, Serialize)]
pub struct SocketsView {
    /// `--socket-lb` as the agent wrote it: off, host or all.
    pub mode: &'static str,
    /// The node's network namespace cookie (`host` translates its sockets).
    pub host_netns_cookie: u64,
    /// The pinned socket-level links.
    pub hooks: Vec<crate::attach::socket::PinnedHook>,
    /// Per frontend: the connect() and sendmsg() calls translated.
    pub frontends: Vec<SocketFrontendRow>,
    /// The sockets translated, as `sock_rev_nat` remembers them.
    pub sockets: Vec<SocketRow>,
}

#[derive(Debug, Serialize)]
pub struct SocketFrontendRow {
    pub frontend: String,
    pub rev_nat_id: u32,
    pub connects: u64,
    pub sendmsgs: u64,
}

#[derive(Debug, Serialize)]
pub struct SocketRow {
    pub cookie: u64,
    pub protocol: String,
    /// The Service address the application named (and is shown).
    pub service: String,
    /// The backend the socket was translated to.
    pub backend: String,
    pub rev_nat_id: u32,
    pub backend_id: u32,
}

/// The name of a `socket_lb` mode.
#[must_use]
pub fn socket_lb_name(mode: u32) -> &'static str {
    match mode {
        service_common::socket_lb::HOST => "host",
        service_common::socket_lb::ALL => "all",
        _ => "off",
    }
}

/// A `sock_rev_nat` row as `inspect sockets` shows it.
#[must_use]
pub fn socket_row(k: &service_common::SockRevNatKey, v: &service_common::SockRevNatValue) -> SocketRow {
    SocketRow {
        cookie: k.cookie,
        protocol: proto_name(v.proto),
        service: endpoint(v.family, &v.addr, v.port),
        backend: endpoint(k.family, &k.addr, k.port),
        rev_nat_id: v.rev_nat_id,
        backend_id: v.backend_id,
    }
}

#[must_use]
pub fn sockets_text(view: &SocketsView) -> String {
    let mut out = format!(
        "socket-level load balancing: {} ({})\n",
        view.mode,
        match view.mode {
            "host" => format!("sockets of the node's network namespace, cookie {}", view.host_netns_cookie),
            "all" => "every socket under the cgroup root, pods' too".to_owned(),
            _ => "no socket is translated; the packet path does everything".to_owned(),
        }
    );
    let hooks: Vec<Vec<String>> =
        view.hooks.iter().map(|h| vec![h.attach.clone(), h.cgroup_inode.to_string(), h.tag.clone()]).collect();
    out.push('\n');
    out.push_str(&table(&["HOOK", "CGROUP INODE", "TAG"], &hooks));
    out.push('\n');
    let frontends: Vec<Vec<String>> = view
        .frontends
        .iter()
        .map(|f| vec![f.frontend.clone(), f.rev_nat_id.to_string(), f.connects.to_string(), f.sendmsgs.to_string()])
        .collect();
    out.push_str(&table(&["FRONTEND", "REV_NAT", "CONNECTS", "SENDMSGS"], &frontends));
    out.push('\n');
    let sockets: Vec<Vec<String>> = view
        .sockets
        .iter()
        .map(|s| vec![s.cookie.to_string(), s.protocol.clone(), s.service.clone(), s.backend.clone()])
        .collect();
    out.push_str(&table(&["SOCKET COOKIE", "PROTO", "SERVICE", "BACKEND"], &sockets));
    out
}
