//! Tier 3: `service-agent explain` tells a flow from where its packets
//! enter the node. Run on node 1 of the two-node north-south cluster (in
//! its network namespace, as an operator would in the agent's pod), after
//! real traffic: a client outside the node meets the external frontend
//! (its source ranges, its traffic policy, the masquerade of a Cluster
//! policy), a client pod meets the pod-side frontend, and a ClusterIP
//! reached from outside is translated and masqueraded.

use service_tests::{
    cluster::EXTERNAL_IP,
    netns::Netns,
    north_south::{A1, B2, CLIENT_POD, LB_IP, NorthSouth, Svc, WEB, agent_cli, answers, assert_both_backends},
};

/// A LoadBalancer Service for 10.0.0.0/8 only, with
/// `externalTrafficPolicy: Local` and its one endpoint on node 2.
const GUARDED: Svc = Svc {
    name: "guarded",
    cluster_ip: "10.96.0.40",
    type_: "LoadBalancer",
    ports: &[("http", 81, 8080, "TCP", Some(30084))],
    spec_extra: "  externalTrafficPolicy: Local\n  loadBalancerSourceRanges: [10.0.0.0/8]\n",
    status: "status:\n  loadBalancer:\n    ingress:\n    - ip: 198.51.100.10\n",
    endpoints: &[B2],
};

fn explain(node: &Netns, root: &std::path::Path, args: &[&str]) -> String {
    agent_cli(node, root, "explain", args)
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn explain_describes_the_frontend_the_packet_meets_where_it_enters() {
    let ns = NorthSouth::start(&[WEB, GUARDED]);
    let node1 = &ns.cluster.node(1).node;
    let root = ns.root(1);
    // Real flows first, so explain has conntrack entries to show.
    let seen = answers(&ns.cluster.external, &format!("http://{LB_IP}/"), 12);
    assert_both_backends(&seen, service_tests::cluster::node_ip(1));

    // The external client: routed out of eth0, so the external frontend.
    let lb = format!("{LB_IP}:80/TCP");
    let why = explain(node1, &root, &[&EXTERNAL_IP.to_string(), &lb]);
    assert!(why.contains(&format!("{EXTERNAL_IP} is outside this node")), "{why}");
    assert!(why.contains("frontend 198.51.100.10:80/TCP external"), "{why}");
    assert!(why.contains("conntrack (assured): the flow from port"), "{why}");
    assert!(why.contains(", SNATed (state"), "the flows to b2 were SNATed: {why}");
    // Its table: both backends, each masqueraded (eTP Cluster, as kube-proxy).
    for ep in [A1, B2] {
        assert!(
            why.contains(&format!("{}:8080/TCP", ep.2)) && why.contains("masqueraded to this node's address"),
            "{why}"
        );
    }

    // A client pod of node 1: the pod-side twin of the same address.
    let why = explain(node1, &root, &[&CLIENT_POD.to_string(), &lb]);
    assert!(why.contains(&format!("{CLIENT_POD} is a local pod (routed via veth")), "{why}");
    assert!(why.contains("frontend 198.51.100.10:80/TCP internal"), "{why}");
    assert!(
        why.contains("masqueraded to this node's address (a pod reaching an external frontend"),
        "a pod reaching a LoadBalancer IP of a Cluster-policy Service is masqueraded, as kube-proxy does: {why}"
    );

    // The same client pod, forced to the external side, and the other way.
    let why = explain(node1, &root, &[&CLIENT_POD.to_string(), &lb, "--from", "external"]);
    assert!(why.contains("frontend 198.51.100.10:80/TCP external"), "{why}");
    let why = explain(node1, &root, &[&EXTERNAL_IP.to_string(), &lb, "--from", "pod"]);
    assert!(why.contains("frontend 198.51.100.10:80/TCP internal"), "{why}");

    // loadBalancerSourceRanges: the external client is outside them.
    let guarded = format!("{LB_IP}:81/TCP");
    let why = explain(node1, &root, &[&EXTERNAL_IP.to_string(), &guarded]);
    assert!(why.contains("frontend 198.51.100.10:81/TCP external"), "{why}");
    assert!(why.contains("outside every range: new flows are dropped (drop_source_range)"), "{why}");
    // Real packets from outside the ranges: dropped, and `inspect stats`
    // says on which interface.
    assert!(
        service_tests::north_south::get(&ns.cluster.external, &format!("http://{LB_IP}:81/")).is_err(),
        "outside the ranges"
    );
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
    let why = explain(node1, &root, &["10.1.2.3", &guarded, "--from", "external"]);
    assert!(why.contains("10.1.2.3 is inside 10.0.0.0/8: allowed"), "{why}");
    assert!(why.contains("dropped (drop_no_local_backend)"), "{why}");
    // From a pod the ranges and the policy do not apply (the pod-side
    // twin: internalTrafficPolicy Cluster reaches b2 on node 2).
    let why = explain(node1, &root, &[&CLIENT_POD.to_string(), &guarded]);
    assert!(why.contains("frontend 198.51.100.10:81/TCP internal"), "{why}");
    assert!(why.contains(&format!("{}:8080/TCP", B2.2)) && !why.contains("drop_source_range"), "{why}");

    // Which program runs where, as explain's `auto` saw it.
    let attached = agent_cli(node1, &root, "inspect", &["interfaces"]);
    let line = |name: &str| attached.lines().find(|l| l.split_whitespace().next() == Some(name)).map(str::to_owned);
    let eth0 = line("eth0").unwrap_or_else(|| panic!("eth0 missing:\n{attached}"));
    assert!(eth0.contains("external") && eth0.contains("tcx"), "{attached}");
    let pods = attached.lines().filter(|l| l.starts_with("veth") && l.contains(" pod ")).count();
    assert_eq!(pods, 2, "node 1's pods are a1 and the client: {attached}");

    // A ClusterIP reached from outside (a service CIDR routed to the
    // nodes): translated and masqueraded, as kube-proxy does.
    let why = explain(node1, &root, &[&EXTERNAL_IP.to_string(), "10.96.0.10:80/TCP"]);
    assert!(why.contains("frontend 10.96.0.10:80/TCP external"), "{why}");
    assert!(why.contains("masqueraded to this node's address"), "{why}");
    // A port the Service does not serve: rejected, as the programs do.
    let why = explain(node1, &root, &[&EXTERNAL_IP.to_string(), "10.96.0.10:81/TCP"]);
    assert!(why.contains("10.96.0.10 is a ClusterIP that does not serve 81/TCP: new flows are rejected"), "{why}");
    // An address no Service has is no frontend at all.
    let why = explain(node1, &root, &[&EXTERNAL_IP.to_string(), "198.51.100.99:80/TCP"]);
    assert!(why.contains("is not a Service frontend for traffic from outside"), "{why}");
}
