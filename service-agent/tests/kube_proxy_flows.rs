//! The flow tables of `tests/flows` against the model: each flow's first
//! packet traced through the desired frontends ([`model::trace`]) must do
//! what kube-proxy's own packet-flow tests say (the tables under
//! `tests/flows/kube-proxy` are ported from them), or what the flow's
//! `ours:` says where this project deliberately differs, with the row of
//! `docs/semantics.md` explaining why.

#[path = "support/flows.rs"]
mod flows;

use std::path::Path;

use service_agent::{model, source::manifest};

#[test]
fn every_flow_table_agrees_with_the_model() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/flows");
    let tables = flows::load(&dir);
    assert!(!tables.is_empty(), "no flow tables under {}", dir.display());
    let mut tally = flows::Tally::new();
    for (path, table) in &tables {
        let name = path.strip_prefix(&dir).unwrap_or(path).display().to_string();
        let snapshot = manifest::parse(Path::new(&name), &table.objects);
        assert!(snapshot.errors.is_empty(), "{name}: objects: {:?}", snapshot.errors);
        let desired = model::desired(&snapshot.objects, &table.node_context());
        for flow in &table.flows {
            match table.entry(flow) {
                Ok(entry) => tally.record(&name, flow, entry, &model::trace::trace(&desired, &flow.probe(entry)), ""),
                Err(why) => tally.skip(&name, flow, &why),
            }
        }
    }
    tally.finish("the model", tables.len());
}
