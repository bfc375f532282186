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
    let semantics =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/semantics.md")).unwrap_or_default();
    let (mut agree, mut deliberate, mut skipped) = (0, 0, Vec::new());
    let mut wrong = Vec::new();
    for (path, table) in &tables {
        let name = path.strip_prefix(&dir).unwrap_or(path).display().to_string();
        let snapshot = manifest::parse(Path::new(&name), &table.objects);
        assert!(snapshot.errors.is_empty(), "{name}: objects: {:?}", snapshot.errors);
        let desired = model::desired(&snapshot.objects, &table.node_context());
        for flow in &table.flows {
            let entry = match table.entry(flow) {
                Ok(entry) => entry,
                Err(why) => {
                    skipped.push(format!("{name}: {}: {why}", flow.name));
                    continue;
                }
            };
            let got = model::trace::trace(&desired, &flow.probe(entry));
            let expected = flow.expected();
            if got != expected {
                wrong.push(format!(
                    "{name}: {:?} ({} → {} {}): expected {expected}, got {got}",
                    flow.name,
                    flow.source,
                    flow.destination,
                    flow.protocol()
                ));
            } else if let Some(ours) = &flow.ours {
                assert!(
                    semantics.contains(&ours.why),
                    "{name}: {:?}: docs/semantics.md has no row {:?}",
                    flow.name,
                    ours.why
                );
                deliberate += 1;
            } else {
                agree += 1;
            }
        }
    }
    println!(
        "{} tables: {agree} flows agree with kube-proxy, {deliberate} differ deliberately, {} not run here, {} wrong",
        tables.len(),
        skipped.len(),
        wrong.len()
    );
    for s in &skipped {
        println!("  skipped {s}");
    }
    assert!(wrong.is_empty(), "{} flows disagree:\n{}", wrong.len(), wrong.join("\n"));
}
