//! The deploy/ manifests parse as the Kubernetes types they claim to be,
//! and the RBAC grants exactly what the agent's API source uses.

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};

fn documents() -> Vec<serde_json::Value> {
    read("rbac.yaml")
}

fn read(file: &str) -> Vec<serde_json::Value> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(file);
    let text = std::fs::read_to_string(path).expect("deploy manifest");
    serde_norway::Deserializer::from_str(&text).map(|d| serde::Deserialize::deserialize(d).expect("yaml")).collect()
}

#[test]
fn rbac_grants_exactly_list_watch_of_services_endpointslices_and_servicecidrs_and_get_list_watch_of_nodes() {
    let docs = documents();
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(kinds, ["ServiceAccount", "ClusterRole", "ClusterRoleBinding"]);
    let _: ServiceAccount = serde_json::from_value(docs[0].clone()).expect("ServiceAccount");
    let role: ClusterRole = serde_json::from_value(docs[1].clone()).expect("ClusterRole");
    let binding: ClusterRoleBinding = serde_json::from_value(docs[2].clone()).expect("ClusterRoleBinding");
    let mut grants: Vec<String> = role
        .rules
        .iter()
        .flatten()
        .flat_map(|r| {
            let groups = r.api_groups.clone().unwrap_or_default();
            let resources = r.resources.clone().unwrap_or_default();
            groups.into_iter().flat_map(move |g| {
                let verbs = r.verbs.clone();
                resources.clone().into_iter().flat_map(move |res| {
                    let g = g.clone();
                    verbs.clone().into_iter().map(move |v| format!("{g}/{res}:{v}"))
                })
            })
        })
        .collect();
    grants.sort();
    assert_eq!(
        grants,
        [
            "/nodes:get",
            "/nodes:list",
            "/nodes:watch",
            "/services:list",
            "/services:watch",
            "discovery.k8s.io/endpointslices:list",
            "discovery.k8s.io/endpointslices:watch",
            "networking.k8s.io/servicecidrs:list",
            "networking.k8s.io/servicecidrs:watch",
        ]
    );
    assert_eq!(binding.role_ref.name, "service-dataplane");
    let subject = &binding.subjects.as_ref().expect("subjects")[0];
    assert_eq!((subject.kind.as_str(), subject.name.as_str()), ("ServiceAccount", "service-dataplane"));
}

#[test]
fn the_daemonset_runs_the_agent_like_kube_proxy_with_only_the_capabilities_it_needs() {
    let docs = read("daemonset.yaml");
    let ds: DaemonSet = serde_json::from_value(docs[0].clone()).expect("DaemonSet");
    let pod = ds.spec.template.spec.expect("pod spec");
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.service_account_name.as_deref(), Some("service-dataplane"), "the ServiceAccount of rbac.yaml");
    let c = &pod.containers[0];
    let sc = c.security_context.as_ref().expect("securityContext");
    assert_eq!(sc.privileged, Some(false), "capabilities, not blanket privileged");
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    assert_eq!(caps.add.clone().unwrap_or_default(), ["BPF", "PERFMON", "NET_ADMIN", "SYS_RESOURCE"]);
    let node_name = c.env.iter().flatten().find(|e| e.name == "NODE_NAME").expect("NODE_NAME");
    let field = node_name.value_from.as_ref().and_then(|v| v.field_ref.as_ref()).expect("downward API");
    assert_eq!(field.field_path, "spec.nodeName");
    let ports: Vec<i32> = c.ports.iter().flatten().map(|p| p.container_port).collect();
    assert_eq!(ports, [10256], "kube-proxy's healthz port");
    let mount = c.volume_mounts.iter().flatten().find(|m| m.mount_path == "/sys/fs/bpf").expect("bpffs mount");
    assert_eq!(mount.mount_propagation.as_deref(), Some("HostToContainer"));

    // Every flag in the manifest is one the agent accepts.
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_service-agent"))
        .args(["run", "--help"])
        .output()
        .expect("service-agent run --help");
    let help = String::from_utf8_lossy(&help.stdout);
    let args = c.args.clone().unwrap_or_default();
    assert_eq!(args[0], "run");
    for arg in &args[1..] {
        let flag = arg.split('=').next().unwrap_or_default();
        assert!(
            help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
            "{flag} is not a flag of `service-agent run`"
        );
    }
    assert!(args.iter().any(|a| a == "--keep-on-exit"), "rolling updates must not detach the dataplane");
    // The socket-level hooks go on the host's cgroup2 root, mounted in.
    let root = args.iter().find_map(|a| a.strip_prefix("--cgroup-root=")).expect("--cgroup-root");
    let mount = c.volume_mounts.iter().flatten().find(|m| m.mount_path == root).expect("a mount at --cgroup-root");
    let volume = pod.volumes.iter().flatten().find(|v| v.name == mount.name).expect("its volume");
    assert_eq!(volume.host_path.as_ref().map(|h| h.path.as_str()), Some("/sys/fs/cgroup"));
}

#[test]
fn the_daemonset_reaches_the_api_server_at_the_configmaps_address_and_resolves_without_cluster_dns() {
    // The ConfigMap: the two variables kube-rs's in-cluster configuration
    // reads (kube-client's incluster_config.rs), with a port that parses.
    let docs = read("apiserver.yaml");
    assert_eq!(docs.len(), 1);
    let cm: ConfigMap = serde_json::from_value(docs[0].clone()).expect("ConfigMap");
    assert_eq!(cm.metadata.namespace.as_deref(), Some("kube-system"));
    let data = cm.data.clone().expect("data");
    let keys: Vec<&str> = data.keys().map(String::as_str).collect();
    assert_eq!(keys, ["KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"]);
    data["KUBERNETES_SERVICE_PORT"].parse::<u16>().expect("a port");
    let host = &data["KUBERNETES_SERVICE_HOST"];
    assert!(
        host.ends_with(".invalid"),
        "the shipped host is a placeholder that cannot reach anything until it is edited: {host}"
    );

    let docs = read("daemonset.yaml");
    let ds: DaemonSet = serde_json::from_value(docs[0].clone()).expect("DaemonSet");
    assert_eq!(ds.metadata.namespace, cm.metadata.namespace, "envFrom reads a ConfigMap of the pod's namespace");
    let pod = ds.spec.template.spec.expect("pod spec");
    // Not ClusterFirstWithHostNet: cluster DNS is behind a ClusterIP this
    // agent has not programmed yet when it starts.
    assert_eq!(pod.dns_policy.as_deref(), Some("Default"), "the node's resolvers");
    let c = &pod.containers[0];
    let from: Vec<_> = c.env_from.iter().flatten().filter_map(|e| e.config_map_ref.as_ref()).collect();
    assert_eq!(from.len(), 1, "envFrom the ConfigMap");
    assert_eq!(Some(from[0].name.as_str()), cm.metadata.name.as_deref());
    assert_ne!(from[0].optional, Some(true), "a missing ConfigMap must stop the pod, not fall back to the ClusterIP");
    // Nothing in `env` (which would win over envFrom) sets them back.
    for e in c.env.iter().flatten() {
        assert!(!e.name.starts_with("KUBERNETES_SERVICE_"), "env overrides the ConfigMap's {}", e.name);
    }
    // The probes: liveness on /livez (wedged), readiness on /healthz.
    let path = |p: Option<&k8s_openapi::api::core::v1::Probe>| {
        p.and_then(|p| p.http_get.as_ref()).and_then(|h| h.path.clone()).unwrap_or_default()
    };
    assert_eq!(path(c.liveness_probe.as_ref()), "/livez");
    assert_eq!(path(c.readiness_probe.as_ref()), "/healthz");
}

#[test]
fn run_accepts_kube_proxys_master_flag() {
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_service-agent"))
        .args(["run", "--help"])
        .output()
        .expect("service-agent run --help");
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--master <URL>"), "{help}");
}

#[test]
fn the_container_file_builds_the_agent_with_its_ebpf_object() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/Containerfile");
    let text = std::fs::read_to_string(path).expect("Containerfile");
    for needle in
        ["rust-src", "bpf-linker@0.10.0", "SERVICE_DATAPLANE_REQUIRE_EBPF=1", "-p service-agent", "ENTRYPOINT"]
    {
        assert!(text.contains(needle), "Containerfile lacks {needle}");
    }
}
