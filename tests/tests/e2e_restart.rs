//! Tier 3: operating the agent like kube-proxy: SIGKILL it while a client
//! keeps opening connections and holds one open — nothing fails, the held
//! connection survives, the next agent adopts the pinned links and maps —
//! and `service-agent cleanup` leaves nothing behind. In both families
//! (`::ipv4`, `::ipv6`: the Service dual-stack, the client on its IPv6
//! ClusterIP).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use service_tests::{
    fixture::{self, ManifestDir},
    in_both_families,
    netns::{Agent, BpffsMount, Family, Topology, binary},
    north_south::dual_stack,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {port: 80, targetPort: 8080}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- addresses: ["10.244.1.11"]
- addresses: ["10.244.1.12"]
- addresses: ["10.244.1.13"]
"#;

/// One request over `stream` with pod-echo's line protocol: the backend.
fn who(stream: &mut TcpStream) -> std::io::Result<String> {
    stream.write_all(b"who\n")?;
    let mut line = String::new();
    BufReader::new(stream.try_clone()?).read_line(&mut line)?;
    Ok(line.split_whitespace().next().unwrap_or_default().to_owned())
}

fn fresh_request(vip: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    who(&mut s)
}

/// The link pins under the agent's bpffs root (one per pod interface).
fn link_pins(root: &std::path::Path) -> usize {
    std::fs::read_dir(root.join("links")).map_or(0, Iterator::count)
}

in_both_families!(sigkill_and_restart_lose_no_connection_and_cleanup_leaves_nothing);

fn sigkill_and_restart_lose_no_connection_and_cleanup_leaves_nothing(family: Family) {
    let vip = SocketAddr::new(family.addr(VIP), 80);
    let mut topo = Topology::new().expect("node");
    topo.add_pod("client", Ipv4Addr::new(10, 244, 1, 10)).expect("client");
    let mut servers = Vec::new();
    for (name, ip) in
        [("backend-a", [10, 244, 1, 11]), ("backend-b", [10, 244, 1, 12]), ("backend-c", [10, 244, 1, 13])]
    {
        topo.add_pod(name, Ipv4Addr::from(ip)).expect("pod");
        servers.push(fixture::start_echo(&topo.pod(name).ns, name, &[]).expect("echo"));
    }
    let manifests = ManifestDir::new();
    manifests.write(
        "web.yaml",
        &match family {
            Family::V4 => MANIFESTS.to_owned(),
            Family::V6 => dual_stack(MANIFESTS),
        },
    );
    let bpffs = BpffsMount::new().expect("bpffs");
    let root = bpffs.path().join("node-1");
    let mut first = Agent::start(&topo.node, manifests.path(), "node-1", &root, &[]).expect("agent");
    first.wait_for_log("synced", 1, Duration::from_secs(20)).expect("sync");
    first.wait_for_log("attached pod ingress program", 4, Duration::from_secs(5)).expect("attach");

    let mut held = topo.pod("client").ns.run_in(|| {
        let s = TcpStream::connect_timeout(&vip, Duration::from_secs(2)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
        s
    });
    let serving = who(&mut held).expect("held connection");

    // A client opening connections all along (bounded: 3 s at most).
    let load = topo.pod("client").ns.spawn_in(move || {
        let (mut ok, mut failed) = (0, Vec::new());
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            match fresh_request(vip) {
                Ok(_) => ok += 1,
                Err(e) => failed.push(e.to_string()),
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        (ok, failed)
    });
    std::thread::sleep(Duration::from_millis(500));
    first.kill().expect("SIGKILL");
    assert!(root.join("services").exists(), "map pins survive a SIGKILL");
    assert_eq!(link_pins(&root), 4, "pinned links survive a SIGKILL (traffic below shows they still run)");
    std::thread::sleep(Duration::from_millis(500));

    // The second agent runs as the DaemonSet runs it: --keep-on-exit.
    let mut second = Agent::start(&topo.node, manifests.path(), "node-1", &root, &["--keep-on-exit"]).expect("agent");
    second.wait_for_log("synced", 1, Duration::from_secs(20)).expect("sync");
    let log = second.log();
    assert_eq!(log.matches("adopted the pinned pod ingress link of an earlier agent").count(), 4, "{log}");
    assert!(!log.contains("attached pod ingress program"), "nothing was missing, nothing reattached:\n{log}");
    assert!(log.contains("adopted_rows="), "{log}");
    assert!(log.contains("rows_written=0"), "the adopted maps were already right:\n{log}");

    let (ok, failed) = load.join().expect("load thread");
    assert!(
        failed.is_empty(),
        "{} of {} requests failed across the restart: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
    assert!(ok > 50, "only {ok} requests");
    assert_eq!(who(&mut held).expect("the held connection survives"), serving);

    // SIGTERM with --keep-on-exit (a rolling update) leaves the dataplane
    // running; then `cleanup` removes every link and pin.
    let status = second.stop().expect("exit on SIGTERM");
    assert!(status.success(), "{status}");
    assert_eq!(link_pins(&root), 4, "links stay for the next agent");
    assert!(topo.pod("client").ns.run_in(|| fresh_request(vip)).is_ok(), "traffic flows with no agent running");
    let out = Command::new("nsenter")
        .arg(format!("--net={}", topo.node.path().display()))
        .arg(binary("service-agent", "SERVICE_AGENT_BIN"))
        .args(["cleanup", "--bpffs-root"])
        .arg(&root)
        .output()
        .expect("cleanup");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!root.exists(), "pins left under {}", root.display());
    let tc = topo.node.exec("tc", &["filter", "show", "dev", &topo.pod("client").host_if, "ingress"]).expect("tc");
    assert!(String::from_utf8_lossy(&tc.stdout).trim().is_empty(), "tc filters left");
    assert!(topo.pod("client").ns.run_in(|| fresh_request(vip)).is_err(), "the ClusterIP is not served anymore");
}
