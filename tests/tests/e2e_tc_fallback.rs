//! Tier 3: the clsact fallback of kernels before 6.6, forced on this one
//! with `--attach-mode tc`. The agent's cls_bpf filters carry its own
//! priority and handle: restarted agents (SIGKILL or SIGTERM with
//! `--keep-on-exit`) adopt them — exactly one filter per interface however
//! often it restarts —, an upgrade (another program in the agent's filter)
//! is replaced in place and a filter an older agent stacked is removed,
//! `service-agent cleanup` removes them all; traffic is translated
//! throughout.
//!
//! On the old code each restart stacked another filter (netlink filters
//! were neither adopted nor removed) and `cleanup` left them translating
//! against frozen maps; there was no way to force the fallback either.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use aya::programs::{
    SchedClassifier, TcAttachType,
    tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
};
use service_agent::{
    attach::{FILTER_HANDLE_POD, FILTER_PRIORITY_POD},
    maps::{self, MapSizes},
};
use service_tests::{
    fixture::{self, ManifestDir},
    netns::{Agent, BpffsMount, Netns, Topology, binary},
    traffic,
};

const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
const FLAGS: &[&str] = &["--attach-mode", "tc", "--keep-on-exit"];
const RESTARTS: usize = 4;

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

/// One fresh connection to the ClusterIP asking its backend's name.
fn fresh_request() -> std::io::Result<String> {
    traffic::tcp_who(VIP, Duration::from_secs(2))
}

/// The filters on `dev`'s clsact ingress hook, one line each (`tc filter
/// show` also prints a line per priority without a handle: skipped).
fn filters(node: &Netns, dev: &str) -> Vec<String> {
    let out = node.exec("tc", &["filter", "show", "dev", dev, "ingress"]).expect("tc");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains(" handle ")).map(str::to_owned).collect()
}

/// The program tag a filter line shows.
fn tag(line: &str) -> String {
    line.split_whitespace().skip_while(|w| *w != "tag").nth(1).unwrap_or_default().to_owned()
}

/// Every pod interface has exactly the agent's one filter; their tags.
fn assert_one_agent_filter_each(topo: &Topology) -> Vec<String> {
    let mut tags = Vec::new();
    for pod in &topo.pods {
        let lines = filters(&topo.node, &pod.host_if);
        assert_eq!(lines.len(), 1, "{}: {lines:#?}", pod.host_if);
        let line = &lines[0];
        let (prio, handle) = (format!("pref {FILTER_PRIORITY_POD} "), format!("handle {FILTER_HANDLE_POD:#x} "));
        assert!(line.contains(&prio) && line.contains(&handle), "the agent's own priority and handle: {line}");
        assert!(line.contains(service_common::PROG_POD_INGRESS), "{line}");
        tags.push(tag(line));
    }
    tags
}

fn start(topo: &Topology, manifests: &ManifestDir, root: &std::path::Path) -> Agent {
    let mut agent = Agent::start(&topo.node, manifests.path(), "node-1", root, FLAGS).expect("agent");
    agent.wait_for_log("synced", 1, Duration::from_secs(20)).expect("sync");
    agent
}

/// What an "older agent" left, done with aya from inside the node: the
/// client's filter (the agent's priority and handle) now runs another
/// program — the external one, which serves no ClusterIP —, and backend-a
/// gets a second filter with the pod program at a kernel-chosen priority,
/// as agents before the fix stacked them on every restart.
fn plant_old_filters(topo: &Topology, root: &std::path::Path) {
    let (client_if, backend_if) = (topo.pod("client").host_if.clone(), topo.pod("backend-a").host_if.clone());
    let root = root.to_owned();
    topo.node.run_in(move || {
        let mut ebpf = maps::load(&root, MapSizes::default()).expect("load object");
        let ext: &mut SchedClassifier =
            ebpf.program_mut(service_common::PROG_EXTERNAL_INGRESS).expect("program").try_into().expect("classifier");
        ext.load().expect("load");
        let old = SchedClassifierLink::attached(
            &client_if,
            TcAttachType::Ingress,
            FILTER_PRIORITY_POD,
            TcHandle::from(FILTER_HANDLE_POD),
            None,
        )
        .expect("the agent's filter");
        let id = ext.attach_to_link(old).expect("swap the program");
        // Dropping the link would delete the filter: it must outlive us.
        std::mem::forget(ext.take_link(id).expect("link"));
        let pod: &mut SchedClassifier =
            ebpf.program_mut(service_common::PROG_POD_INGRESS).expect("program").try_into().expect("classifier");
        pod.load().expect("load");
        let id = pod
            .attach_with_options(&backend_if, TcAttachType::Ingress, TcAttachOptions::Netlink(NlOptions::default()))
            .expect("stacked filter");
        std::mem::forget(pod.take_link(id).expect("link"));
    });
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn clsact_filters_are_adopted_replaced_and_removed_like_tcx_links() {
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
    manifests.write("web.yaml", MANIFESTS);
    let bpffs = BpffsMount::new().expect("bpffs");
    let root = bpffs.path().join("node-1");
    let client = &topo.pod("client").ns;

    // Stopped agents stay in `retired` until the end: dropping an `Agent`
    // runs `cleanup` on its bpffs root, which the next agent still uses.
    let mut retired = Vec::new();
    let mut agent = start(&topo, &manifests, &root);
    agent.wait_for_log("attached pod ingress program", 4, Duration::from_secs(5)).expect("attach");
    let tags = assert_one_agent_filter_each(&topo);
    assert!(tags.iter().all(|t| !t.is_empty() && *t == tags[0]), "{tags:?}");
    assert_eq!(std::fs::read_dir(root.join("links")).map_or(0, Iterator::count), 0, "no TCX link in tc mode");
    assert!(client.run_in(fresh_request).is_ok());

    // Restarts, SIGKILL and SIGTERM (--keep-on-exit) in turn, while a
    // client keeps opening connections.
    let stop = Arc::new(AtomicBool::new(false));
    let load = client.spawn_in({
        let stop = stop.clone();
        move || {
            let (mut ok, mut failed) = (0, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match fresh_request() {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(e.to_string()),
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (ok, failed)
        }
    });
    for i in 0..RESTARTS {
        std::thread::sleep(Duration::from_millis(200));
        if i % 2 == 0 {
            agent.kill().expect("SIGKILL");
        } else {
            assert!(agent.stop().expect("SIGTERM").success());
        }
        assert_one_agent_filter_each(&topo);
        let next = start(&topo, &manifests, &root);
        retired.push(std::mem::replace(&mut agent, next));
        let log = agent.log();
        assert_eq!(log.matches("adopted the pod ingress clsact filter of an earlier agent").count(), 4, "{log}");
        assert!(!log.contains("attached pod ingress program"), "nothing reattached:\n{log}");
        assert_eq!(assert_one_agent_filter_each(&topo), tags, "restart {i}");
    }
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = load.join().expect("load thread");
    assert!(
        failed.is_empty(),
        "{} of {} requests failed across the restarts: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
    assert!(ok > 20, "only {ok} requests");

    // An upgrade: the agent's filter on the client's interface runs another
    // program (the ClusterIP is not served there any more), and an older
    // agent's filter is stacked on backend-a's.
    assert!(agent.stop().expect("SIGTERM").success());
    plant_old_filters(&topo, &root);
    let client_if = topo.pod("client").host_if.clone();
    assert_ne!(tag(&filters(&topo.node, &client_if)[0]), tags[0], "another program in the agent's filter");
    assert_eq!(filters(&topo.node, &topo.pod("backend-a").host_if).len(), 2);
    assert!(client.run_in(fresh_request).is_err(), "the other program does not serve the ClusterIP");
    let next = start(&topo, &manifests, &root);
    retired.push(std::mem::replace(&mut agent, next));
    let log = agent.log();
    assert_eq!(log.matches("replaced an earlier agent's pod ingress program (upgrade)").count(), 1, "{log}");
    assert!(log.contains(&format!("replaced an earlier agent's pod ingress program (upgrade) interface={client_if}")));
    assert_eq!(log.matches("removed a stray pod ingress clsact filter").count(), 1, "{log}");
    assert_eq!(log.matches("adopted the pod ingress clsact filter of an earlier agent").count(), 3, "{log}");
    assert_eq!(assert_one_agent_filter_each(&topo), tags, "replaced in place, the stacked one removed");
    assert!(client.run_in(fresh_request).is_ok(), "translated again");

    // SIGTERM with --keep-on-exit leaves the filters translating; cleanup
    // (in the node's namespace, where the filters are) removes them all.
    assert!(agent.stop().expect("SIGTERM").success());
    assert_one_agent_filter_each(&topo);
    assert!(client.run_in(fresh_request).is_ok(), "traffic flows with no agent running");
    let out = Command::new("nsenter")
        .arg(format!("--net={}", topo.node.path().display()))
        .arg(binary("service-agent", "SERVICE_AGENT_BIN"))
        .args(["cleanup", "--bpffs-root"])
        .arg(&root)
        .output()
        .expect("cleanup");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for pod in &topo.pods {
        assert!(filters(&topo.node, &pod.host_if).is_empty(), "filters left on {}", pod.host_if);
    }
    assert!(!root.exists(), "pins left under {}", root.display());
    assert!(client.run_in(fresh_request).is_err(), "the ClusterIP is not served anymore");
    drop(agent);
    drop(retired);
    drop(servers);
}
