//! Desired frontends and backends as map keys and values: the one place
//! that knows how the model's words become the programs' rows (byte order,
//! families, flags). The reconciler decides which rows to write and when;
//! this decides what they hold.

use std::net::IpAddr;

use service_common::{
    BackendValue, FAMILY_IPV4, FAMILY_IPV6, RevNatValue, SOURCE_RANGE_FRONTEND_BITS, ServiceKey, ServiceValue,
    SourceRangeKey, backend_flags, backend_state, service_flags, service_ips,
};

use crate::{
    model::{Backend, Desired, DesiredFrontend, Frontend, FrontendKind, WhenEmpty},
    vocabulary::Cidr,
};

/// The `FAMILY_*` of an address.
#[must_use]
pub fn family(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { FAMILY_IPV4 } else { FAMILY_IPV6 }
}

/// An address as the maps hold it (IPv4 in the first four bytes).
#[must_use]
pub fn addr_bytes(addr: IpAddr) -> service_common::Addr {
    match addr {
        IpAddr::V4(a) => service_common::addr_v4(a.octets()),
        IpAddr::V6(a) => a.octets(),
    }
}

/// The slot-0 key of a frontend.
#[must_use]
pub fn frontend_key(f: &Frontend) -> ServiceKey {
    ServiceKey::frontend(
        family(f.addr),
        addr_bytes(f.addr),
        service_common::port_be(f.port),
        f.protocol.number(),
        f.scope.number(),
    )
}

/// The `backends` row of a backend.
#[must_use]
pub fn backend_value(b: &Backend) -> BackendValue {
    BackendValue {
        addr: addr_bytes(b.addr),
        port: service_common::port_be(b.port),
        proto: b.protocol.number(),
        family: family(b.addr),
        flags: if b.local { backend_flags::LOCAL } else { 0 },
        state: if b.ready { backend_state::READY } else { backend_state::TERMINATING },
        _pad: [0; 2],
    }
}

/// The `rev_nat` row of a frontend: the address replies get back.
#[must_use]
pub fn rev_nat_value(f: &Frontend) -> RevNatValue {
    RevNatValue { addr: addr_bytes(f.addr), port: service_common::port_be(f.port), family: family(f.addr), _pad: 0 }
}

/// The row of a frontend whose table has `table_len` slots: what a new
/// flow's packet reads first. `affinity_scope` is the rev-NAT id of
/// `df.affinity_scope` (see [`ServiceValue::affinity_scope`]); `table` and
/// `members` are set by the reconciler.
#[must_use]
pub fn frontend_value(df: &DesiredFrontend, rev_nat_id: u32, affinity_scope: u32, table_len: usize) -> ServiceValue {
    let mut flags = match (table_len == 0, df.when_empty) {
        (false, _) => 0,
        (true, WhenEmpty::Reject) => service_flags::REJECT,
        (true, WhenEmpty::Drop) => service_flags::DROP,
    };
    if df.affinity_timeout_s.is_some() {
        flags |= service_flags::AFFINITY;
    }
    if frontend_ranges(df).next().is_some() {
        flags |= service_flags::SOURCE_RANGES;
    }
    if df.kind == FrontendKind::NodePort {
        flags |= service_flags::NODE_ADDRESS;
    }
    if df.masquerade {
        flags |= service_flags::MASQUERADE;
    }
    ServiceValue {
        table: 0,
        count: u32::try_from(table_len).unwrap_or(u32::MAX),
        members: 0,
        affinity_scope: if df.affinity_timeout_s.is_some() { affinity_scope } else { 0 },
        rev_nat_id,
        affinity_timeout_s: df.affinity_timeout_s.unwrap_or(0),
        flags,
        _pad: 0,
    }
}

/// The `loadBalancerSourceRanges` of `df` that apply to it: those of its
/// address family. kube-proxy filters them the same way, so a Service
/// whose ranges are all of the other family is not restricted in this one.
pub fn frontend_ranges(df: &DesiredFrontend) -> impl Iterator<Item = &crate::vocabulary::Cidr> {
    let v4 = df.frontend.addr.is_ipv4();
    df.source_ranges.iter().filter(move |c| c.addr.is_ipv4() == v4)
}

/// A `source_ranges` row: the prefix length the LPM trie matches on, and
/// the key.
pub type SourceRangeRow = (u32, SourceRangeKey);

/// The `source_ranges` rows desired frontend `df` needs, keyed by its
/// rev-NAT id `rev_nat_id`, its protocol and family (none without ranges).
/// Frontends that share a rev-NAT row and protocol (a LoadBalancer IP's
/// external and pod-side twins) need the same rows.
#[must_use]
pub fn frontend_range_rows(df: &DesiredFrontend, rev_nat_id: u32) -> Vec<SourceRangeRow> {
    let (proto, fam) = (df.frontend.protocol.number(), family(df.frontend.addr));
    frontend_ranges(df)
        .map(|cidr| {
            let key = SourceRangeKey::new(rev_nat_id, proto, fam, addr_bytes(cidr.addr));
            (SOURCE_RANGE_FRONTEND_BITS + u32::from(cidr.prefix_len), key)
        })
        .collect()
}

/// The service CIDRs of `desired` (its `unserved` drops), which
/// [`unserved_rows`] needs.
#[must_use]
pub fn service_cidrs(desired: &Desired) -> Vec<Cidr> {
    desired.unserved.iter().filter(|(_, w)| **w == WhenEmpty::Drop).map(|(c, _)| *c).collect()
}

/// The rows `unserved` entry `cidr` needs in `service_ips`: a service CIDR
/// as a `RANGE`; a ClusterIP as a `CLUSTER_IP`, and as a `RANGE` too when
/// it is outside every service CIDR (`service_cidrs`), each in its own
/// family.
#[must_use]
pub fn unserved_rows(cidr: &Cidr, when: WhenEmpty, service_cidrs: &[Cidr]) -> Vec<SourceRangeRow> {
    let row = |kind: u8| {
        let key = SourceRangeKey::new(service_ips::OWNER, kind, family(cidr.addr), addr_bytes(cidr.addr));
        (SOURCE_RANGE_FRONTEND_BITS + u32::from(cidr.prefix_len), key)
    };
    match when {
        WhenEmpty::Drop => vec![row(service_ips::RANGE)],
        WhenEmpty::Reject if service_cidrs.iter().any(|c| c.contains(cidr.addr)) => vec![row(service_ips::CLUSTER_IP)],
        WhenEmpty::Reject => vec![row(service_ips::CLUSTER_IP), row(service_ips::RANGE)],
    }
}
