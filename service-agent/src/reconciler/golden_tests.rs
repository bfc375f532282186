//! Reconciler golden tests (tier 1, no root): a directory of manifests as a
//! user writes them goes through the real manifest source, the model and the
//! reconciler (into the in-memory maps); the reported errors and the
//! canonical sorted map dump must equal `golden/<case>.expected`.
//!
//! `UPDATE_GOLDEN=1 cargo test -p service-agent golden` rewrites the
//! expected files; review the diff before committing it.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use crate::{
    maps::{MapState, fake::FakeMaps},
    model::{self, NodeContext},
    reconciler::{DELETION_GRACE, ManualClock, Reconciler},
    rows::render as dump,
    source::manifest,
};
use service_common::{BackendValue, RevNatValue};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn node() -> NodeContext {
    // The node every golden case is computed for: node-a in zone-a,
    // NodePorts on 10.0.0.11 and 2001:db8::11.
    NodeContext {
        node_name: "node-a".into(),
        zone: Some("zone-a".into()),
        nodeport_addresses: vec![
            std::net::IpAddr::from([10, 0, 0, 11]),
            std::net::IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x11]),
        ],
        ..NodeContext::default()
    }
}

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "golden-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A reconciler on in-memory maps, with a clock the cases move past the
/// grace period of deferred deletions.
struct Agent {
    reconciler: Reconciler<FakeMaps>,
    clock: ManualClock,
    /// The agent's incremental model, and the snapshot it last read.
    model: model::Model,
    last: crate::vocabulary::Objects,
}

impl Agent {
    fn new() -> Self {
        let clock = ManualClock::default();
        let reconciler =
            Reconciler::new(FakeMaps::default()).expect("fake").with_clock(std::sync::Arc::new(clock.clone()));
        Self { reconciler, clock, model: model::Model::new(), last: crate::vocabulary::Objects::default() }
    }

    fn programmed(&self) -> &MapState {
        self.reconciler.programmed()
    }
}

/// Source → model → reconciler on `dir` as the agent runs them (the
/// manifest source's snapshot sharing what did not change with the last,
/// the incremental model, the reconciler given its changes), then the
/// grace period passes and the deferred deletions run; rendered: errors
/// then the dump.
fn run_case(dir: &Path, agent: &mut Agent) -> String {
    let mut snapshot = manifest::load_dir(dir).expect("manifest dir");
    snapshot.objects.share_unchanged(&agent.last);
    let changes = agent.model.update(&snapshot.objects, &node());
    let desired = agent.model.desired();
    assert_eq!(*desired, model::desired(&snapshot.objects, &node()), "the incremental model drifted");
    let reconciler = &mut agent.reconciler;
    let report = reconciler.reconcile_changes(desired, &changes);
    assert!(report.errors.is_empty(), "map errors: {:?}", report.errors);
    agent.clock.advance(DELETION_GRACE);
    let report = reconciler.collect_deferred();
    assert!(report.errors.is_empty(), "map errors: {:?}", report.errors);
    assert_eq!(reconciler.next_deferred(), None);
    assert_eq!(reconciler.maps().state, *reconciler.programmed(), "mirror and maps differ");
    let mut out = String::from("errors:\n");
    let prefix = format!("{}/", dir.display());
    for e in &snapshot.errors {
        let _ = writeln!(out, "  {}", e.to_string().replace(&prefix, ""));
    }
    for e in &desired.errors {
        let _ = writeln!(out, "  {e}");
    }
    out.push_str("health_checks:\n");
    for (svc, hc) in &desired.health_checks {
        let _ = writeln!(out, "  {svc} healthCheckNodePort={} localEndpoints={}", hc.port, hc.local_endpoints);
    }
    out.push_str(&dump::render(&reconciler.maps().state));
    agent.last = snapshot.objects;
    out
}

fn cases() -> Vec<PathBuf> {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(golden_dir())
        .expect("golden dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    cases
}

#[test]
fn golden_dumps_match() {
    let update = std::env::var("UPDATE_GOLDEN").is_ok_and(|v| v == "1");
    let mut failures = Vec::new();
    for case in cases() {
        let got = run_case(&case, &mut Agent::new());
        let expected_path = case.with_extension("expected");
        if update {
            std::fs::write(&expected_path, &got).expect("write golden");
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
        if got != expected {
            failures.push(format!("{}:\n--- expected\n{expected}--- got\n{got}", case.display()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(cases().len() >= 4);
}

/// Every YAML document of every case, as (case, text).
fn documents() -> Vec<(String, String)> {
    let mut docs = Vec::new();
    for case in cases() {
        let mut files: Vec<PathBuf> =
            std::fs::read_dir(&case).expect("case").map(|e| e.expect("entry").path()).collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).expect("read");
            for doc in text.split("\n---\n") {
                docs.push((case.file_name().expect("name").to_string_lossy().into_owned(), doc.to_owned()));
            }
        }
    }
    docs
}

/// The applied state with ids resolved to what they stand for, so states
/// reached through different histories (and so different ids) compare.
fn resolved(state: &MapState) -> BTreeMap<String, (u16, RevNatValue, Vec<BackendValue>)> {
    state
        .services
        .iter()
        .map(|(k, v)| {
            let table = state.table_of(v).map_or(&[][..], |t| &t.slots).iter().map(|id| state.backends[id]).collect();
            (dump::frontend(k), (v.flags, state.rev_nat[&v.rev_nat_id], table))
        })
        .collect()
}

fn write_docs(dir: &Path, docs: &[(String, String)]) {
    for entry in std::fs::read_dir(dir).expect("dir") {
        std::fs::remove_file(entry.expect("entry").path()).expect("rm");
    }
    for (i, (_, doc)) in docs.iter().enumerate() {
        std::fs::write(dir.join(format!("{i:03}.yaml")), doc).expect("write");
    }
}

#[test]
fn the_order_objects_arrive_in_does_not_change_the_result() {
    let docs: Vec<(String, String)> = documents().into_iter().filter(|(case, _)| case != "invalid-objects").collect();
    let dir = TempDir::new("order");

    write_docs(&dir.0, &docs);
    let mut all_at_once = Agent::new();
    run_case(&dir.0, &mut all_at_once);
    let expected = resolved(all_at_once.programmed());
    assert!(expected.len() >= 4, "{expected:?}");

    // Reversed, one document at a time (slices before their Services, one
    // reconcile per arrival).
    let mut reversed = docs.clone();
    reversed.reverse();
    let mut incremental = Agent::new();
    for n in 1..=reversed.len() {
        write_docs(&dir.0, &reversed[..n]);
        run_case(&dir.0, &mut incremental);
    }
    assert_eq!(resolved(incremental.programmed()), expected);

    // Removing the documents one at a time leaves no row behind.
    for n in (0..reversed.len()).rev() {
        write_docs(&dir.0, &reversed[..n]);
        run_case(&dir.0, &mut incremental);
    }
    let state = &incremental.reconciler.maps().state;
    // Only the id counters stay (ids are never handed out twice).
    assert_eq!(*state, MapState { next_ids: state.next_ids, ..MapState::default() });
}
