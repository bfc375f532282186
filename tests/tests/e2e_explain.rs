//! Tier 3: `service-agent explain` tells a flow from where its packets
//! enter the node. Run on node 1 of the two-node north-south cluster (in
//! its network namespace, as an operator would in the agent's pod), after
//! real traffic: a client outside the node meets the external frontend
//! (its source ranges, its traffic policy, the masquerade of a Cluster
//! policy), a client pod meets the pod-side frontend, and a ClusterIP
//! reached from outside is translated and masqueraded.
//!
//! The test runs twice (`::ipv4`, `::ipv6`): over IPv4 against IPv4
//! Services, and over IPv6 against the same Services written dual-stack,
//! explain asked about the IPv6 frontends (`[addr]:port/PROTO`).

use std::net::{Ipv4Addr, SocketAddr};

use service_tests::{
    cluster::EXTERNAL_IP,
    in_both_families,
    netns::{Family, Netns},
    north_south::{A1, B2, CLIENT_POD, Ep, LB_IP, NorthSouth, Svc, WEB, agent_cli, answers, assert_both_backends},
};

in_both_families!(explain_describes_the_frontend_the_packet_meets_where_it_enters);

/// `web`'s ClusterIP (IPv4 form), and an address no Service has.
const WEB_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const NO_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 99);
/// A source inside `guarded`'s ranges (IPv4 form).
const INSIDE_RANGES: Ipv4Addr = Ipv4Addr::new(10, 1, 2, 3);

/// A LoadBalancer Service for 10.0.0.0/8 only (and fd00:10::/32, the
/// twins of 10.0.0.0/8, for its IPv6 frontend when dual-stack), with
/// `externalTrafficPolicy: Local` and its one endpoint on node 2.
fn guarded(family: Family) -> Svc<'static> {
    Svc {
        name: "guarded",
        cluster_ip: "10.96.0.40",
        type_: "LoadBalancer",
        ports: &[("http", 81, 8080, "TCP", Some(30084))],
        spec_extra: match family {
            Family::V4 => "  externalTrafficPolicy: Local\n  loadBalancerSourceRanges: [10.0.0.0/8]\n",
            Family::V6 => "  externalTrafficPolicy: Local\n  loadBalancerSourceRanges: [10.0.0.0/8, fd00:10::/32]\n",
        },
        status: "status:\n  loadBalancer:\n    ingress:\n    - ip: 198.51.100.10\n",
        endpoints: &[B2],
    }
}

fn explain(node: &Netns, root: &std::path::Path, args: &[&str]) -> String {
    agent_cli(node, root, "explain", args)
}

fn explain_describes_the_frontend_the_packet_meets_where_it_enters(family: Family) {
    let ns = NorthSouth::start_in(family, &[WEB, guarded(family)]);
    let node1 = &ns.cluster.node(1).node;
    let root = ns.root(1);
    // `ADDR:PORT` of the address whose IPv4 form is `v4`, in the family
    // (an IPv6 one in brackets, as explain reads and writes it).
    let at = |v4: Ipv4Addr, port: u16| SocketAddr::new(ns.addr(v4), port);
    let external = ns.addr(EXTERNAL_IP).to_string();
    let client_pod = ns.addr(CLIENT_POD).to_string();
    let backend = |ep: Ep| format!("{}/TCP", SocketAddr::new(ep.addr(family), 8080));
    // Real flows first, so explain has conntrack entries to show.
    let seen = answers(&ns.cluster.external, &ns.url(LB_IP, 80), 12);
    assert_both_backends(&seen, ns.node_addr(1));

    // The external client: routed out of eth0, so the external frontend.
    let lb = format!("{}/TCP", at(LB_IP, 80));
    let why = explain(node1, &root, &[&external, &lb]);
    assert!(why.contains(&format!("{external} is outside this node")), "{why}");
    assert!(why.contains(&format!("frontend {lb} external")), "{why}");
    assert!(why.contains("conntrack (assured): the flow from port"), "{why}");
    assert!(why.contains(", SNATed (state"), "the flows to b2 were SNATed: {why}");
    // Its table: both backends, each masqueraded (eTP Cluster, as kube-proxy).
    for ep in [A1, B2] {
        assert!(why.contains(&backend(ep)) && why.contains("masqueraded to this node's address"), "{why}");
    }

    // A client pod of node 1: the pod-side twin of the same address.
    let why = explain(node1, &root, &[&client_pod, &lb]);
    assert!(why.contains(&format!("{client_pod} is a local pod (routed via veth")), "{why}");
    assert!(why.contains(&format!("frontend {lb} internal")), "{why}");
    assert!(
        why.contains("masqueraded to this node's address (a pod reaching an external frontend"),
        "a pod reaching a LoadBalancer IP of a Cluster-policy Service is masqueraded, as kube-proxy does: {why}"
    );

    // The same client pod, forced to the external side, and the other way.
    let why = explain(node1, &root, &[&client_pod, &lb, "--from", "external"]);
    assert!(why.contains(&format!("frontend {lb} external")), "{why}");
    let why = explain(node1, &root, &[&external, &lb, "--from", "pod"]);
    assert!(why.contains(&format!("frontend {lb} internal")), "{why}");

    // loadBalancerSourceRanges: the external client is outside them.
    let guarded = format!("{}/TCP", at(LB_IP, 81));
    let why = explain(node1, &root, &[&external, &guarded]);
    assert!(why.contains(&format!("frontend {guarded} external")), "{why}");
    assert!(why.contains("outside every range: new flows are dropped (drop_source_range)"), "{why}");
    // Real packets from outside the ranges: dropped, and `inspect stats`
    // says on which interface.
    assert!(service_tests::north_south::get(&ns.cluster.external, &ns.url(LB_IP, 81)).is_err(), "outside the ranges");
    let stats: serde_json::Value =
        serde_json::from_str(&agent_cli(node1, &root, "inspect", &["stats", "-o", "json"])).expect("json");
    let row = stats.as_array().expect("rows").iter().find(|r| r["counter"] == "drop_source_range").expect("row");
    let on = |name: &str| {
        row["interfaces"]
            .as_array()
            .expect("interfaces")
            .iter()
            .find(|i| i["interface"] == name)
            .map(|i| i["packets"].clone())
    };
    assert!(on("eth0").and_then(|p| p.as_u64()).is_some_and(|p| p >= 1), "{row}");
    assert!(on("veth1").is_none(), "no drop on a pod interface: {row}");
    let text = agent_cli(node1, &root, "inspect", &["stats"]);
    assert!(text.lines().any(|l| l.starts_with("drop_source_range") && l.contains("eth0=")), "{text}");

    // A source inside them meets the Local policy: no endpoint on node 1.
    let inside = ns.addr(INSIDE_RANGES).to_string();
    let range = match family {
        Family::V4 => "10.0.0.0/8",
        Family::V6 => "fd00:10::/32",
    };
    let why = explain(node1, &root, &[&inside, &guarded, "--from", "external"]);
    assert!(why.contains(&format!("{inside} is inside {range}: allowed")), "{why}");
    assert!(why.contains("dropped (drop_no_local_backend)"), "{why}");
    // From a pod the ranges and the policy do not apply (the pod-side
    // twin: internalTrafficPolicy Cluster reaches b2 on node 2).
    let why = explain(node1, &root, &[&client_pod, &guarded]);
    assert!(why.contains(&format!("frontend {guarded} internal")), "{why}");
    assert!(why.contains(&backend(B2)) && !why.contains("drop_source_range"), "{why}");

    // Which program runs where, as explain's `auto` saw it.
    let attached = agent_cli(node1, &root, "inspect", &["interfaces"]);
    let line = |name: &str| attached.lines().find(|l| l.split_whitespace().next() == Some(name)).map(str::to_owned);
    let eth0 = line("eth0").unwrap_or_else(|| panic!("eth0 missing:\n{attached}"));
    assert!(eth0.contains("external") && eth0.contains("tcx"), "{attached}");
    let pods = attached.lines().filter(|l| l.starts_with("veth") && l.contains(" pod ")).count();
    assert_eq!(pods, 2, "node 1's pods are a1 and the client: {attached}");

    // A ClusterIP reached from outside (a service CIDR routed to the
    // nodes): translated and masqueraded, as kube-proxy does.
    let cluster_ip = format!("{}/TCP", at(WEB_CLUSTER_IP, 80));
    let why = explain(node1, &root, &[&external, &cluster_ip]);
    assert!(why.contains(&format!("frontend {cluster_ip} external")), "{why}");
    assert!(why.contains("masqueraded to this node's address"), "{why}");
    // A port the Service does not serve: rejected, as the programs do.
    let why = explain(node1, &root, &[&external, &format!("{}/TCP", at(WEB_CLUSTER_IP, 81))]);
    let unserved =
        format!("{} is a ClusterIP that does not serve 81/TCP: new flows are rejected", ns.addr(WEB_CLUSTER_IP));
    assert!(why.contains(&unserved), "{why}");
    // An address no Service has is no frontend at all.
    let why = explain(node1, &root, &[&external, &format!("{}/TCP", at(NO_SERVICE_IP, 80))]);
    assert!(why.contains("is not a Service frontend for traffic from outside"), "{why}");
}
