use std::{fmt::Write as _, sync::Arc};

use super::{Changes, Model};
use crate::{
    model::{
        Desired, NodeContext, desired,
        fuzz::{self, Plan},
    },
    vocabulary::{ObjectRef, Objects},
};

/// Panics unless every difference between `before` and `after` is named
/// in `changes`.
fn check_changes(before: &Desired, after: &Desired, changes: &Changes) {
    for f in before.frontends.keys().chain(after.frontends.keys()) {
        if before.frontends.get(f) != after.frontends.get(f) {
            assert!(changes.everything || changes.frontends.contains(f), "{f} changed and was not named");
        }
    }
    for c in before.unserved.keys().chain(after.unserved.keys()) {
        if before.unserved.get(c) != after.unserved.get(c) {
            assert!(changes.everything || changes.unserved.contains(c), "unserved {c} changed and was not named");
        }
    }
}

#[test]
fn random_changes_keep_the_model_equal_to_desired() {
    let plan = Plan::from_env(fuzz::DEFAULT_CASES / 10);
    let mut steps: std::collections::BTreeMap<&str, u64> = std::collections::BTreeMap::new();
    let mut conflicts = 0u64;
    plan.run("model::incremental", |_, rng| {
        let mut objects = fuzz::objects(rng);
        let mut node = fuzz::node(rng);
        let mut model = Model::new();
        let changes = model.update(&objects, &node);
        assert!(changes.everything, "the first update compares everything");
        assert_eq!(*model.desired(), desired(&objects, &node), "first update");
        for step in 0..=rng.below(12) {
            let before = model.desired().clone();
            let what = fuzz::change(rng, &mut objects, &mut node);
            *steps.entry(what).or_default() += 1;
            let changes = model.update(&objects, &node);
            assert!(!changes.everything);
            let want = desired(&objects, &node);
            assert_eq!(*model.desired(), want, "step {step}: {what}");
            check_changes(&before, &want, &changes);
            conflicts += u64::from(want.errors.iter().any(|e| e.message.contains("already served")));
        }
    });
    eprintln!(
        "model::incremental: {} cases (FUZZ_SEED={}): {steps:?}, {conflicts} with conflicts",
        plan.cases, plan.seed
    );
    // Every kind of change ran, and frontends claimed twice too.
    assert!(plan.only.is_some() || (steps.len() >= 11 && conflicts > 0), "{steps:?} {conflicts}");
}

/// `services` ClusterIP Services in namespace `ns`, one slice each.
fn cluster(services: usize) -> Objects {
    let mut yaml = String::new();
    for i in 0..services {
        let _ = write!(
            yaml,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: ns}}\nspec:\n  clusterIP: \
             10.96.0.{}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n---\napiVersion: \
             discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc-{i}-x\n  namespace: ns\n  labels: \
             {{kubernetes.io/service-name: svc-{i}}}\naddressType: IPv4\nports:\n- {{name: http, port: 8080}}\n\
             endpoints:\n- addresses: [\"10.244.0.{}\"]\n",
            i + 1,
            i + 1
        );
    }
    crate::model::tests::objects(&yaml)
}

#[test]
fn one_slice_change_recomputes_its_service_alone() {
    let mut objects = cluster(50);
    let node = NodeContext { node_name: "node-a".into(), ..NodeContext::default() };
    let mut model = Model::new();
    model.update(&objects, &node);
    assert_eq!(model.recomputed(), 50);

    // One endpoint of svc-7 moves.
    let key = ObjectRef { namespace: "ns".into(), name: "svc-7-x".into() };
    let mut slice = (*objects.endpoint_slices[&key]).clone();
    slice.endpoints.get_or_insert_default()[0].address = Some("10.244.1.7".into());
    objects.endpoint_slices.insert(key.clone(), Arc::new(slice));
    let changes = model.update(&objects, &node);
    assert_eq!(model.recomputed(), 51, "svc-7 alone");
    let named: Vec<String> = changes.frontends.iter().map(ToString::to_string).collect();
    assert_eq!(named, ["10.96.0.8:80/TCP external", "10.96.0.8:80/TCP internal"]);
    assert!(changes.unserved.is_empty());
    assert_eq!(*model.desired(), desired(&objects, &node));

    // The same snapshot again, and an equal copy of the slice (a new
    // allocation, as a relist gives): nothing changes and nothing is
    // computed (the diff compares objects by value where their
    // allocations differ).
    let changes = model.update(&objects.clone(), &node);
    assert!(changes.is_empty());
    assert_eq!(model.recomputed(), 51);
    let copy = Arc::new((*objects.endpoint_slices[&key]).clone());
    objects.endpoint_slices.insert(key, copy);
    let changes = model.update(&objects, &node);
    assert!(changes.is_empty(), "{changes:?}");
    assert_eq!(model.recomputed(), 51);

    // A Service deleted: its frontends go, nothing is computed.
    objects.services.remove(&ObjectRef { namespace: "ns".into(), name: "svc-3".into() });
    let changes = model.update(&objects, &node);
    assert_eq!(model.recomputed(), 51);
    assert_eq!(changes.frontends.len(), 2);
    assert_eq!(changes.unserved.len(), 1, "its ClusterIP's reject row");
    assert_eq!(*model.desired(), desired(&objects, &node));

    // A new node context touches every Service.
    let node = NodeContext { masquerade_all: true, ..node };
    model.update(&objects, &node);
    assert_eq!(model.recomputed(), 51 + 49);
    assert_eq!(*model.desired(), desired(&objects, &node));
}

#[test]
fn a_frontend_two_services_claim_passes_to_the_second_when_the_first_goes() {
    let service = |name: &str| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: ns}}\nspec:\n  clusterIP: \
             10.96.0.1\n  ports:\n  - {{name: {name}, port: 80}}\n"
        )
    };
    let mut objects = crate::model::tests::objects(&(service("a") + &service("b")));
    let node = NodeContext { node_name: "node-a".into(), ..NodeContext::default() };
    let mut model = Model::new();
    model.update(&objects, &node);
    let served_by =
        |m: &Model| m.desired().frontends.values().map(|df| df.service.name.to_string()).collect::<Vec<_>>();
    assert_eq!(served_by(&model), ["a", "a"]);
    assert!(model.desired().errors.iter().all(|e| &*e.object.name == "b" && e.message.contains("Service ns/a")));
    assert_eq!(model.desired().errors.len(), 2);

    // a goes: b's claims, kept from before, are served without computing
    // b again, and its errors go.
    objects.services.remove(&ObjectRef { namespace: "ns".into(), name: "a".into() });
    let changes = model.update(&objects, &node);
    assert_eq!(model.recomputed(), 2);
    assert_eq!(served_by(&model), ["b", "b"]);
    assert!(model.desired().errors.is_empty());
    assert_eq!(changes.frontends.len(), 2);
    assert_eq!(*model.desired(), desired(&objects, &node));
}
