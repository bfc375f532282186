use std::net::IpAddr;

use super::{
    fake::{FakeMaps, Op},
    *,
};
use crate::{
    model::{Protocol, Scope},
    source::ObjectRef,
};

fn frontend(port: u16) -> Frontend {
    Frontend { addr: IpAddr::from([10, 96, 0, 10]), port, protocol: Protocol::Tcp, scope: Scope::Internal }
}

fn backend(last: u8) -> Backend {
    Backend {
        addr: IpAddr::from([10, 244, 1, last]),
        port: 8080,
        protocol: Protocol::Tcp,
        local: true,
        terminating: false,
    }
}

fn desired(entries: &[(u16, &[u8])]) -> Desired {
    let mut d = Desired::default();
    for (port, backends) in entries {
        let f = frontend(*port);
        d.frontends.insert(
            f,
            DesiredFrontend {
                service: ObjectRef { namespace: "default".into(), name: "web".into() },
                port_name: String::new(),
                frontend: f,
                kind: crate::model::FrontendKind::ClusterIp,
                affinity_timeout_s: None,
                source_ranges: Vec::new(),
                backends: backends.iter().map(|b| backend(*b)).collect(),
                when_empty: WhenEmpty::Reject,
            },
        );
    }
    d
}

fn reconciler() -> Reconciler<FakeMaps> {
    Reconciler::new(FakeMaps::default()).expect("fake dump")
}

#[test]
fn a_changed_backend_set_is_written_as_a_new_version_then_flipped_then_the_old_deleted() {
    let mut r = reconciler();
    assert!(r.reconcile(&desired(&[(80, &[1, 2, 3])])).errors.is_empty());
    let key0 = frontend_key(&frontend(80));
    let v1 = r.applied().services[&key0];
    assert_eq!((v1.version, v1.count), (1, 31));
    r.maps.ops.clear();

    assert!(r.reconcile(&desired(&[(80, &[1, 2])])).errors.is_empty());
    let ops = &r.maps().ops;
    let flip = ops.iter().position(|op| matches!(op, Op::PutService(k, _) if *k == key0)).expect("slot 0 flipped");
    let new_rows = ops.iter().filter(|op| matches!(op, Op::PutService(k, _) if k.version == 2 && k.slot != 0));
    let deleted_old = ops.iter().positions_of(|op| matches!(op, Op::DelService(k) if k.version == 1));
    // Every new slot row precedes the flip; every old row is deleted after.
    assert_eq!(new_rows.count(), 31);
    assert!(ops[..flip].iter().filter(|op| matches!(op, Op::PutService(k, _) if k.version == 2)).count() == 31);
    assert_eq!(deleted_old.len(), 31);
    assert!(deleted_old.iter().all(|i| *i > flip));
    // Backend 3 is no longer referenced: deleted last.
    assert!(matches!(ops.last(), Some(Op::DelBackend(_))));
    assert_eq!(r.applied().services[&key0].version, 2);
    assert_eq!(r.maps().state, *r.applied());
}

trait Positions<T> {
    fn positions_of(self, f: impl Fn(&T) -> bool) -> Vec<usize>;
}

impl<'a, T: 'a, I: Iterator<Item = &'a T>> Positions<T> for I {
    fn positions_of(self, f: impl Fn(&T) -> bool) -> Vec<usize> {
        self.enumerate().filter(|(_, x)| f(x)).map(|(i, _)| i).collect()
    }
}

#[test]
fn an_unchanged_desired_state_writes_nothing() {
    let mut r = reconciler();
    let d = desired(&[(80, &[1, 2, 3]), (81, &[])]);
    assert!(r.reconcile(&d).changed());
    let again = r.reconcile(&d);
    assert!(!again.changed(), "{again:?}");
}

#[test]
fn a_frontend_without_backends_rejects_and_has_no_slot_rows() {
    let mut r = reconciler();
    r.reconcile(&desired(&[(80, &[])]));
    let v = r.applied().services[&frontend_key(&frontend(80))];
    assert_eq!((v.count, v.flags), (0, service_flags::REJECT));
    assert_eq!(r.applied().services.len(), 1);
    assert!(r.applied().backends.is_empty());
}

#[test]
fn rows_left_by_an_earlier_agent_are_adopted_and_pruned() {
    let mut maps = FakeMaps::default();
    {
        let mut first = Reconciler::new(std::mem::take(&mut maps)).expect("dump");
        first.reconcile(&desired(&[(80, &[1, 2]), (81, &[3])]));
        maps = FakeMaps { state: first.applied().clone(), ..FakeMaps::default() };
    }
    let mut second = Reconciler::new(maps).expect("dump");
    let report = second.reconcile(&desired(&[(80, &[1, 2])]));
    // Port 80 is unchanged (adopted, not rewritten); port 81 and backend 3
    // are pruned.
    assert_eq!(report.rows_written, 0, "{report:?}");
    assert_eq!(report.frontends_deleted, 1);
    assert_eq!(second.applied().backends.len(), 2);
    assert_eq!(second.applied().rev_nat.len(), 1);
}

#[test]
fn a_full_map_names_the_flag_and_leaves_other_frontends_programmed() {
    // Room for one frontend's 31 slots + slot 0, not two.
    let mut r = Reconciler::new(FakeMaps::with_services_capacity(40)).expect("dump");
    let report = r.reconcile(&desired(&[(80, &[1, 2, 3]), (81, &[4, 5, 6])]));
    assert_eq!(report.errors.len(), 1);
    let msg = report.errors[0].to_string();
    assert!(msg.contains("10.96.0.10:81/TCP") && msg.contains("raise it with --map-size-services"), "{msg}");
    assert!(r.applied().services.contains_key(&frontend_key(&frontend(80))));
    assert!(!r.applied().services.contains_key(&frontend_key(&frontend(81))));
    // The failed frontend's partial rows were undone.
    assert_eq!(r.maps().state.services.len(), 32);
    assert_eq!(r.maps().state, *r.applied());
}

#[test]
fn deleting_everything_leaves_no_rows() {
    let mut r = reconciler();
    r.reconcile(&desired(&[(80, &[1, 2, 3]), (81, &[3, 4])]));
    r.reconcile(&Desired::default());
    assert_eq!(r.maps().state, MapState::default());
}

#[test]
fn only_changed_frontends_are_written_and_a_removed_one_comes_back_whole() {
    let mut r = reconciler();
    assert!(r.reconcile(&desired(&[(80, &[1, 2]), (81, &[3]), (82, &[4])])).errors.is_empty());
    r.maps.ops.clear();
    // One frontend's backends change: only its rows are touched.
    let report = r.reconcile(&desired(&[(80, &[1, 2]), (81, &[3, 5]), (82, &[4])]));
    assert_eq!(report.frontends_written, 1);
    let key81 = frontend_key(&frontend(81));
    assert!(
        r.maps.ops.iter().all(|op| match op {
            Op::PutService(k, _) | Op::DelService(k) => k.with_slot(0, 0) == key81,
            _ => true,
        }),
        "{:?}",
        r.maps.ops
    );
    // Removed, then desired again unchanged: written again in full.
    assert!(r.reconcile(&desired(&[(80, &[1, 2]), (81, &[3, 5])])).errors.is_empty());
    let key82 = frontend_key(&frontend(82));
    assert!(!r.applied().services.keys().any(|k| k.with_slot(0, 0) == key82));
    let report = r.reconcile(&desired(&[(80, &[1, 2]), (81, &[3, 5]), (82, &[4])]));
    assert_eq!(report.frontends_written, 1);
    assert_eq!(r.applied().services.keys().filter(|k| k.with_slot(0, 0) == key82).count(), 32);
}

/// A small deterministic generator (xorshift), so the sequence below is the
/// same on every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn indexes_and_maps_agree_with_the_rows_over_random_changes_restarts_and_full_maps() {
    // Every reconcile checks its indexes (rows per frontend, backend and
    // rev-NAT references, live (rev-NAT, backend) pairs, ids by value)
    // against a recomputation from the rows; here a long random sequence
    // drives it through changes, deletions, restarts that adopt stray rows
    // of an interrupted run, and a map too small for everything.
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut maps = FakeMaps::default();
    for step in 0..300 {
        let mut entries: Vec<(u16, Vec<u8>)> = Vec::new();
        for port in 80..86 {
            if rng.below(4) == 0 {
                continue;
            }
            let backends: Vec<u8> = (1..12).filter(|_| rng.below(3) == 0).collect();
            entries.push((port, backends));
        }
        let borrowed: Vec<(u16, &[u8])> = entries.iter().map(|(p, b)| (*p, b.as_slice())).collect();
        let d = desired(&borrowed);
        maps.services_capacity = (step % 7 == 3).then_some(100);
        if step % 11 == 5 {
            // An interrupted run left the rows of an unfinished version.
            let key0 = frontend_key(&frontend(80));
            let stray = ServiceValue { backend_id: 1, ..<ServiceValue as bytemuck::Zeroable>::zeroed() };
            maps.state.services.insert(key0.with_slot(77, 1), stray);
        }
        let mut r = Reconciler::new(std::mem::take(&mut maps)).expect("dump");
        for _ in 0..=rng.below(3) {
            let report = r.reconcile(&d);
            assert_eq!(r.maps().state, *r.applied(), "step {step}");
            if report.errors.is_empty() {
                for (port, backends) in &entries {
                    let v = r.applied().services[&frontend_key(&frontend(*port))];
                    let live = r.applied().live_pairs();
                    let reached: BTreeSet<u32> =
                        live.iter().filter(|(rn, _)| *rn == v.rev_nat_id).map(|(_, b)| *b).collect();
                    assert_eq!(reached.len(), backends.len(), "step {step} port {port}");
                    assert!(reached.iter().all(|b| r.is_live_pair(v.rev_nat_id, *b)));
                }
                assert_eq!(r.applied().services.keys().filter(|k| k.slot == 0).count(), entries.len());
            }
        }
        maps = FakeMaps { state: r.applied().clone(), ..FakeMaps::default() };
    }
}
