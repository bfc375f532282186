//! The deploy/ manifests parse as the Kubernetes types they claim to be,
//! and the RBAC grants exactly what the agent's API source uses.

use k8s_openapi::api::{
    core::v1::ServiceAccount,
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};

fn documents() -> Vec<serde_json::Value> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/rbac.yaml");
    let text = std::fs::read_to_string(path).expect("deploy/rbac.yaml");
    serde_norway::Deserializer::from_str(&text).map(|d| serde::Deserialize::deserialize(d).expect("yaml")).collect()
}

#[test]
fn rbac_grants_exactly_list_watch_of_services_and_endpointslices_and_get_list_watch_of_nodes() {
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
        ]
    );
    assert_eq!(binding.role_ref.name, "service-dataplane");
    let subject = &binding.subjects.as_ref().expect("subjects")[0];
    assert_eq!((subject.kind.as_str(), subject.name.as_str()), ("ServiceAccount", "service-dataplane"));
}
