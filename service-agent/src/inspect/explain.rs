//! `explain`: what a flow gets from the live maps, and why, told from where
//! its packets enter the node. A packet from a local pod meets the pod
//! program and the frontends of internal scope (ClusterIPs, and the
//! pod-side twins of the node's NodePorts, LoadBalancer IPs and
//! externalIPs); a packet from outside meets the external program and the
//! external frontends, with their source ranges, traffic policy and SNAT.
//! A socket of the node itself (`--from host`) meets the socket-level
//! programs at connect()/sendmsg() instead, and the same internal
//! frontends.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use service_common::{
    CtKey, CtValue, SCOPE_EXTERNAL, SCOPE_INTERNAL, SOURCE_RANGE_FRONTEND_BITS, ServiceKey, ct_flags, hash, port_be,
    service_flags, service_ips,
};

use super::{InspectError, Pins};
use crate::{
    attach::{self, AttachedProgram},
    maps::{self, MapState},
    rows::{
        encode::{addr_bytes, family},
        render::{
            backend_row, expires_in_seconds, flag_names, frontend, host_port, ip, proto_name, services, state_names,
        },
    },
    vocabulary::Cidr,
};

/// Where the explained packet enters the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Decided from the node's routes: a client routed out of an interface
    /// that carries the pod program is a local pod; any other is outside.
    Auto,
    /// The host side of a local pod's interface (the pod program).
    Pod,
    /// An external interface (the external program).
    External,
    /// A socket of the node itself (the socket-level programs).
    Host,
}

/// `lo` is interface 1 in every network namespace: the route to one of the
/// node's own addresses leaves through it.
const LOOPBACK_IFINDEX: u32 = 1;

/// `SRC_IP[:PORT]` and `DST_IP:PORT/PROTO`, either family: an IPv6 address
/// with a port in brackets (`[2001:db8::1]:80/TCP`), as `SocketAddr` reads
/// it; an IPv6 source without a port bare (`2001:db8::1`) or bracketed.
fn parse_flow(src: &str, dst: &str) -> Result<(IpAddr, Option<u16>, IpAddr, u16, u8), InspectError> {
    let usage = |m: &str| {
        InspectError::Usage(format!(
            "{m} (expected SRC_IP[:PORT] DST_IP:PORT/PROTO; IPv6 as [2001:db8::1]:80 or a bare source 2001:db8::1)"
        ))
    };
    let (src_ip, src_port) = if let Ok(sa) = src.parse::<SocketAddr>() {
        (sa.ip(), Some(sa.port()))
    } else {
        let bare = src.strip_prefix('[').and_then(|s| s.strip_suffix(']')).unwrap_or(src);
        match bare.parse::<IpAddr>() {
            Ok(ip) => (ip, None),
            // `IP:PORT` with a port that is no u16.
            Err(_) if bare.matches(':').count() == 1 || bare.contains("]:") => return Err(usage("bad source port")),
            Err(_) => return Err(usage("bad source address")),
        }
    };
    let (dst, proto) = dst.split_once('/').ok_or_else(|| usage("missing /PROTO"))?;
    let proto = match proto.to_ascii_uppercase().as_str() {
        "TCP" => service_common::PROTO_TCP,
        "UDP" => service_common::PROTO_UDP,
        "SCTP" => service_common::PROTO_SCTP,
        _ => return Err(usage("PROTO must be TCP, UDP or SCTP")),
    };
    let dst = dst.parse::<SocketAddr>().map_err(|_| {
        if dst.parse::<IpAddr>().is_ok() || !dst.contains(':') {
            usage("missing :PORT")
        } else if dst.rsplit_once(':').is_some_and(|(ip, _)| ip.trim_matches(['[', ']']).parse::<IpAddr>().is_ok()) {
            usage("bad destination port")
        } else {
            usage("bad destination address")
        }
    })?;
    Ok((src_ip, src_port, dst.ip(), dst.port(), proto))
}

/// Which side a packet from `src` enters on, and the sentence saying why.
fn resolve_entry(entry: Entry, src: IpAddr, attached: &[AttachedProgram]) -> (Entry, String) {
    match entry {
        Entry::Host => (Entry::Host, "a socket of the node itself (--from host): the socket-level programs".into()),
        Entry::Pod => (Entry::Pod, "entering from a local pod (--from pod): the pod program".into()),
        Entry::External => {
            (Entry::External, "entering from outside the node (--from external): the external program".into())
        }
        Entry::Auto => {
            let oif = attach::netlink::route_oif(src).ok().flatten();
            let on = |program: &str| attached.iter().find(|a| Some(a.ifindex) == oif && a.program == program);
            if oif == Some(LOOPBACK_IFINDEX) {
                (
                    Entry::Host,
                    format!(
                        "{src} is an address of this node (routed via lo): a socket of the node itself, the socket-level programs"
                    ),
                )
            } else if let Some(a) = on("pod") {
                (
                    Entry::Pod,
                    format!("{src} is a local pod (routed via {}, which carries the pod program)", a.interface),
                )
            } else {
                let via = oif.and_then(|i| attached.iter().find(|a| a.ifindex == i)).map_or_else(
                    || oif.map_or_else(|| "no route to it".to_owned(), |i| format!("routed via ifindex {i}")),
                    |a| format!("routed via {}", a.interface),
                );
                (
                    Entry::External,
                    format!("{src} is outside this node ({via}; not a pod interface): the external program"),
                )
            }
        }
    }
}

/// The `source_ranges` row of `owner` and `proto` that `addr` lies in, if
/// any (the longest match, as the LPM trie answers): a frontend's
/// `loadBalancerSourceRanges` (owner: its rev-NAT id), or a service IP row
/// (owner [`service_ips::OWNER`], proto its kind).
fn range_of(state: &MapState, owner: u32, proto: u8, addr: IpAddr) -> Option<String> {
    state
        .source_ranges
        .iter()
        .filter(|(_, k)| u32::from_be_bytes(k.rev_nat_id) == owner && k.proto == proto && k.family == family(addr))
        .filter_map(|(len, k)| {
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let prefix_len = u8::try_from(len.saturating_sub(SOURCE_RANGE_FRONTEND_BITS).min(max)).ok()?;
            let cidr = Cidr { addr: ip(k.family, &k.addr), prefix_len };
            cidr.contains(addr).then_some(cidr)
        })
        .max_by_key(|cidr| cidr.prefix_len)
        .map(|cidr| cidr.to_string())
}

/// The frontend row's summary line.
fn frontend_line(key0: &ServiceKey, svc: &service_common::ServiceValue, out: &mut String) {
    let _ = writeln!(
        out,
        "frontend {}: rev_nat {}, {} slots (table at block {}, shared by every frontend of the same backend set), flags [{}], affinity {} s",
        frontend(key0),
        svc.rev_nat_id,
        svc.count,
        svc.table,
        flag_names(svc.flags).join(","),
        svc.affinity_timeout_s
    );
}

/// The `--socket-lb` mode and hooks a node socket meets; false when they
/// translate nothing.
fn host_hooks(mode: u32, root: &Path, dst: SocketAddr, out: &mut String) -> bool {
    let hooks = attach::socket::pinned_hooks(&root.join("links"));
    if mode == service_common::socket_lb::OFF || hooks.is_empty() {
        let _ = writeln!(
            out,
            "{}: the node's sockets are not translated, and their packets cross no pod or external interface of this node on the way out, so {dst} is not served to them (start the agent with --socket-lb host).",
            if mode == service_common::socket_lb::OFF { "--socket-lb off" } else { "no socket-level hooks are pinned" }
        );
        return false;
    }
    let attaches: Vec<&str> = hooks.iter().map(|h| h.attach.as_str()).collect();
    let cgroups: std::collections::BTreeSet<u64> = hooks.iter().map(|h| h.cgroup_inode).collect();
    let _ = writeln!(
        out,
        "--socket-lb {}: {} attached to cgroup inode {:?}; only sockets of processes under it are translated.",
        crate::rows::render::socket_lb_name(mode),
        attaches.join(", "),
        cgroups
    );
    true
}

/// `explain --from host`: what connect() or sendmsg() of a node socket to
/// `dst_ip:dst_port/proto` gets from the socket-level programs.
fn explain_host(
    pins: &Pins,
    root: &Path,
    dst_ip: IpAddr,
    dst_port: u16,
    proto: u8,
    out: &mut String,
) -> Result<(), InspectError> {
    let state = &pins.programmed;
    let config = pins.readers.socket_lb()?;
    let dst = SocketAddr::new(dst_ip, dst_port);
    if !host_hooks(config.mode, root, dst, out) {
        return Ok(());
    }
    if proto == service_common::PROTO_SCTP {
        let _ = writeln!(out, "SCTP sockets are not translated by the socket-level programs (TCP and UDP only).");
        return Ok(());
    }
    let key0 = ServiceKey::frontend(family(dst_ip), addr_bytes(dst_ip), port_be(dst_port), proto, SCOPE_INTERNAL);
    let Some(svc) = state.services.get(&key0) else {
        let why = if range_of(state, service_ips::OWNER, service_ips::CLUSTER_IP, dst_ip).is_some() {
            format!(
                "connect() fails with ECONNREFUSED: {dst_ip} is a ClusterIP that does not serve {dst_port}/{} (the packet path rejects it)",
                proto_name(proto)
            )
        } else if let Some(range) = range_of(state, service_ips::OWNER, service_ips::RANGE, dst_ip) {
            format!(
                "connect() fails with ENETUNREACH: {dst_ip} is in the service IP range {range} but no Service has it (the packet path drops it)"
            )
        } else {
            format!("{dst}/{} is not a Service frontend: the socket is left alone", proto_name(proto))
        };
        let _ = writeln!(out, "{why}.");
        return Ok(());
    };
    frontend_line(&key0, svc, out);
    if svc.count == 0 {
        let _ = writeln!(
            out,
            "connect() and sendmsg() fail with ECONNREFUSED at once: {}.",
            if svc.flags & service_flags::DROP != 0 {
                "no endpoint this node may use (the packet path drops such flows; a socket is told at once)"
            } else {
                "the Service has no usable endpoint"
            }
        );
        return Ok(());
    }
    let describe = |id: u32| {
        state.backends.get(&id).map_or_else(
            || format!("backend {id} (gone)"),
            |b| {
                let r = backend_row(id, b);
                let local = if r.local { " local" } else { "" };
                format!("backend {id} {}/{}{local}", host_port(&r.address, r.port), r.protocol)
            },
        )
    };
    if svc.flags & service_flags::AFFINITY != 0 {
        // A socket's affinity client is its network namespace (cookie in
        // bytes 8..16), the node's for a host socket.
        let mut client = [0u8; 16];
        client[8..].copy_from_slice(&config.host_netns_cookie.to_ne_bytes());
        let aff = pins.readers.affinity()?;
        match aff.iter().find(|(k, _)| k.client == client && k.scope == svc.affinity_scope && k.proto == proto) {
            Some((_, v)) => {
                let idle = maps::monotonic_ns().saturating_sub(v.last_used_ns) / 1_000_000_000;
                let _ = writeln!(
                    out,
                    "affinity: the node's sockets → {} (idle {idle} s of {} s)",
                    describe(v.backend_id),
                    svc.affinity_timeout_s
                );
            }
            None => {
                let _ = writeln!(out, "affinity: no entry for the node's sockets yet: the next one is remembered.");
            }
        }
    }
    let _ = writeln!(out, "a new socket gets a random slot of the table (it has no source port yet); the table:");
    let row = services(state).into_iter().find(|r| r.frontend == frontend(&key0));
    for (b, n) in row.map(|r| r.backends).unwrap_or_default() {
        let _ = writeln!(out, "  {n:>5} of {} slots → {}", svc.count, describe(b.id));
    }
    let mut sockets: std::collections::BTreeMap<u32, usize> = std::collections::BTreeMap::new();
    for v in pins.readers.sock_rev_nat()?.values().filter(|v| v.rev_nat_id == svc.rev_nat_id) {
        *sockets.entry(v.backend_id).or_default() += 1;
    }
    for (id, n) in &sockets {
        let _ = writeln!(
            out,
            "translated sockets: {n} to {} (shown the Service address by getpeername/recvmsg)",
            describe(*id)
        );
    }
    if let Some(c) = pins.readers.sock_counters()?.get(&svc.rev_nat_id) {
        let _ = writeln!(out, "translated so far: {} connect() and {} sendmsg() calls.", c.connects, c.sendmsgs);
    }
    Ok(())
}

/// `explain`: what a flow from `src` (`IP` or `IP:PORT`) to `dst`
/// (`IP:PORT/PROTO`) gets, and why, from the live maps, for a packet
/// entering as `entry` says.
///
/// # Errors
/// When the arguments do not parse or the maps cannot be read.
#[expect(clippy::too_many_lines, reason = "one report, read top to bottom in the order it prints")]
pub fn explain(root: &Path, src: &str, dst: &str, entry: Entry) -> Result<String, InspectError> {
    let (src_ip, src_port, dst_ip, dst_port, proto) = parse_flow(src, dst)?;
    let pins = Pins::open(root)?;
    let state = &pins.programmed;
    let mut out = String::new();
    let attached = attach::attached_programs(&root.join("links"));
    let (side, why) = resolve_entry(entry, src_ip, &attached);
    let _ = writeln!(out, "{why}.");
    if side == Entry::Host {
        explain_host(&pins, root, dst_ip, dst_port, proto, &mut out)?;
        return Ok(out);
    }
    if side == Entry::Pod && pins.readers.socket_lb()?.mode == service_common::socket_lb::ALL {
        let _ = writeln!(
            out,
            "--socket-lb all: a TCP or UDP socket of a pod under the cgroup root is translated at connect()/sendmsg() instead (explain --from host shows how); the packet path below serves the rest (raw sockets, pods outside the cgroup)."
        );
    }
    let scope = if side == Entry::External { SCOPE_EXTERNAL } else { SCOPE_INTERNAL };
    let key0 = ServiceKey::frontend(family(dst_ip), addr_bytes(dst_ip), port_be(dst_port), proto, scope);
    let Some(svc) = state.services.get(&key0) else {
        // What the programs do with a flow no frontend serves: the service
        // IP rows decide (a ClusterIP rejects, the rest of a range drops).
        if let Some(range) = range_of(state, service_ips::OWNER, service_ips::RANGE, dst_ip) {
            let why = if range_of(state, service_ips::OWNER, service_ips::CLUSTER_IP, dst_ip).is_some() {
                format!(
                    "{dst_ip} is a ClusterIP that does not serve {dst_port}/{}: new flows are rejected (TCP RST / ICMP port unreachable), as kube-proxy's nftables mode does",
                    proto_name(proto)
                )
            } else {
                format!(
                    "{dst_ip} is in the service IP range {range} but no Service has it: new flows are dropped (drop_unallocated_service_ip)"
                )
            };
            let _ = writeln!(out, "{why}.");
            return Ok(out);
        }
        let other = if scope == SCOPE_EXTERNAL { SCOPE_INTERNAL } else { SCOPE_EXTERNAL };
        let elsewhere = state.services.contains_key(&ServiceKey { scope: other, ..key0 });
        let _ = writeln!(
            out,
            "{}/{} is not a Service frontend {}: the packet passes untouched{}.",
            SocketAddr::new(dst_ip, dst_port),
            proto_name(proto),
            if side == Entry::External { "for traffic from outside" } else { "for pods" },
            if elsewhere {
                if side == Entry::External {
                    " (it is one for pods on this node only)"
                } else {
                    " (it is one for traffic from outside only)"
                }
            } else {
                ""
            }
        );
        return Ok(out);
    };
    frontend_line(&key0, svc, &mut out);
    if svc.flags & service_flags::SOURCE_RANGES != 0 {
        if let Some(cidr) = range_of(state, svc.rev_nat_id, key0.proto, src_ip) {
            let _ = writeln!(out, "loadBalancerSourceRanges: {src_ip} is inside {cidr}: allowed.");
        } else {
            let _ = writeln!(
                out,
                "loadBalancerSourceRanges: {src_ip} is outside every range: new flows are dropped (drop_source_range)."
            );
            return Ok(out);
        }
    }
    // How a flow to backend `id` leaves: SNAT or not, and why.
    let masquerade = svc.flags & service_flags::MASQUERADE != 0;
    let translation = |id: u32| -> &'static str {
        let Some(b) = state.backends.get(&id) else { return "" };
        match side {
            Entry::Pod if b.addr == addr_bytes(src_ip) && b.family == family(src_ip) => {
                "; the client itself (hairpin): SNATed to the hairpin address so the reply comes back through here"
            }
            Entry::External if masquerade => {
                "; masqueraded to this node's address (externalTrafficPolicy: Cluster, as kube-proxy) so the reply comes back through here"
            }
            Entry::External => "; the client's address is kept (externalTrafficPolicy: Local)",
            _ if masquerade => {
                "; masqueraded to this node's address (a pod reaching an external frontend, or --masquerade-all, as kube-proxy)"
            }
            _ => "",
        }
    };
    let describe = |id: u32| {
        state.backends.get(&id).map_or_else(
            || format!("backend {id} (gone)"),
            |b| {
                let r = backend_row(id, b);
                format!(
                    "backend {id} {}/{}{}{}",
                    host_port(&r.address, r.port),
                    r.protocol,
                    if r.local { " local" } else { "" },
                    if r.state == "terminating" { " terminating" } else { "" }
                )
            },
        )
    };
    if svc.count == 0 {
        let why = if svc.flags & service_flags::DROP != 0 {
            "dropped (drop_no_local_backend): the traffic policy is Local and this node has no endpoint"
        } else if svc.flags & service_flags::REJECT != 0 {
            "rejected (TCP RST / ICMP port unreachable): the Service has no usable endpoint"
        } else {
            "dropped (drop_no_backend): the Service has no usable endpoint"
        };
        let _ = writeln!(out, "new flows are {why}.");
        return Ok(out);
    }
    // Existing flows from this client, in either conntrack table.
    let ct = pins.conntrack_entries()?;
    let now = maps::monotonic_ns();
    let flows: Vec<&(&str, CtKey, CtValue)> = ct
        .iter()
        .filter(|(_, k, v)| {
            v.flags & ct_flags::DNAT != 0
                && (v.flags & ct_flags::EXTERNAL != 0) == (side == Entry::External)
                && k.family == key0.family
                && k.saddr == addr_bytes(src_ip)
                && k.daddr == key0.addr
                && k.dport == key0.port
                && k.proto == proto
                && src_port.is_none_or(|p| k.sport == port_be(p))
        })
        .collect();
    for (table, k, v) in &flows {
        let _ = writeln!(
            out,
            "conntrack ({table}): the flow from port {} is pinned to {}{} (state [{}], idle {} s, expires in {} s)",
            u16::from_be_bytes(k.sport),
            describe(v.backend_id),
            if v.flags & ct_flags::SNAT != 0 { ", SNATed" } else { "" },
            state_names(v.state).join(","),
            now.saturating_sub(v.last_seen_ns) / 1_000_000_000,
            expires_in_seconds(proto, v, now),
        );
    }
    if svc.flags & service_flags::AFFINITY != 0 {
        let aff = pins.readers.affinity()?;
        let entry = aff
            .iter()
            .find(|(k, _)| k.client == addr_bytes(src_ip) && k.scope == svc.affinity_scope && k.proto == proto);
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
        let h = hash::flow_hash(&addr_bytes(src_ip), &key0.addr, port_be(port), key0.port, proto);
        let slot = hash::slot_for(h, svc.count);
        let row = state.table_of(svc).and_then(|t| t.slots.get(usize::try_from(slot - 1).ok()?)).copied();
        let _ = writeln!(
            out,
            "a new flow from {} hashes to slot {slot} of {}: {}{}",
            SocketAddr::new(src_ip, port),
            svc.count,
            row.map_or_else(|| "(missing table)".into(), describe),
            row.map_or("", translation)
        );
    } else {
        let _ = writeln!(
            out,
            "a new flow's backend depends on its source port (give SRC as IP:PORT to see its slot); the table:"
        );
        let row = services(state).into_iter().find(|r| r.frontend == frontend(&key0));
        for (b, n) in row.map(|r| r.backends).unwrap_or_default() {
            let _ = writeln!(out, "  {n:>5} of {} slots → {}{}", svc.count, describe(b.id), translation(b.id));
        }
    }
    if flows.is_empty() && src_port.is_some() {
        let _ = writeln!(out, "no conntrack entry for this flow yet.");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(src: &str, dst: &str) -> Result<(IpAddr, Option<u16>, IpAddr, u16, u8), String> {
        parse_flow(src, dst).map_err(|e| e.to_string())
    }

    #[test]
    fn flows_of_both_families_are_parsed() {
        let v4 = parsed("10.244.1.10:40000", "10.96.0.10:80/tcp").unwrap();
        assert_eq!(v4, ("10.244.1.10".parse().unwrap(), Some(40000), "10.96.0.10".parse().unwrap(), 80, 6));
        let v6 = parsed("[fd00:10:244::10]:40000", "[fd00:10:96::10]:53/UDP").unwrap();
        assert_eq!(v6, ("fd00:10:244::10".parse().unwrap(), Some(40000), "fd00:10:96::10".parse().unwrap(), 53, 17));
        for bare in ["2001:db8::1", "[2001:db8::1]"] {
            let (src, port, ..) = parsed(bare, "[2001:db8::11]:30080/TCP").unwrap();
            assert_eq!((src, port), ("2001:db8::1".parse().unwrap(), None));
        }
    }

    #[test]
    fn bad_flows_say_what_is_wrong() {
        let err = |src: &str, dst: &str| parsed(src, dst).unwrap_err();
        assert!(err("10.0.0.1:99999", "10.96.0.10:80/TCP").contains("bad source port"));
        assert!(err("[2001:db8::1]:x", "10.96.0.10:80/TCP").contains("bad source port"));
        assert!(err("nope", "10.96.0.10:80/TCP").contains("bad source address"));
        assert!(err("10.0.0.1", "10.96.0.10:80").contains("missing /PROTO"));
        assert!(err("10.0.0.1", "2001:db8::1/TCP").contains("missing :PORT"));
        assert!(err("10.0.0.1", "[2001:db8::1]:http/TCP").contains("bad destination port"));
        assert!(err("10.0.0.1", "10.96.0.300:80/TCP").contains("bad destination address"));
    }
}
