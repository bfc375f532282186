use std::net::IpAddr;

use service_common::{FAMILY_IPV4, SOURCE_RANGE_FRONTEND_BITS, SourceRangeKey, service_flags};

use super::*;
use crate::{
    maps::fake::{FakeMaps, Op},
    model::{Protocol, Scope, WhenEmpty},
    rows::frontend_key,
    vocabulary::ObjectRef,
};

fn frontend(port: u16) -> Frontend {
    Frontend { addr: IpAddr::from([10, 96, 0, 10]), port, protocol: Protocol::Tcp, scope: Scope::Internal }
}

fn backend(last: u8) -> Backend {
    Backend { addr: IpAddr::from([10, 244, 1, last]), port: 8080, protocol: Protocol::Tcp, local: true, ready: true }
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
                affinity_scope: None,
                source_ranges: Vec::new(),
                masquerade: false,
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

/// A reconciler on `maps` reading `clock`.
fn with_clock(maps: FakeMaps, clock: &ManualClock) -> Reconciler<FakeMaps> {
    Reconciler::new(maps).expect("fake dump").with_clock(Arc::new(clock.clone()))
}

/// Lets the grace pass and runs the deferred deletions.
fn settle(r: &mut Reconciler<FakeMaps>, clock: &ManualClock) -> ReconcileReport {
    clock.advance(DELETION_GRACE);
    let report = r.collect_deferred();
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(r.deferred_len(), 0);
    assert_eq!(r.next_deferred(), None);
    report
}

#[test]
fn a_changed_backend_set_is_written_as_a_new_version_then_flipped_then_the_old_deleted() {
    let clock = ManualClock::default();
    let mut r = with_clock(FakeMaps::default(), &clock);
    assert!(r.reconcile(&desired(&[(80, &[1, 2, 3])])).errors.is_empty());
    let key0 = frontend_key(&frontend(80));
    let v1 = r.programmed().services[&key0];
    assert_eq!((v1.version, v1.count), (1, 31));
    r.maps.ops.clear();

    let report = r.reconcile(&desired(&[(80, &[1, 2])]));
    assert!(report.errors.is_empty());
    // The old version's rows (and backend 3, which only they name) wait for
    // the grace period.
    assert_eq!(report.rows_deferred, 31);
    // Only backend 3's member row goes at once (affinity must not follow
    // it any more); nothing a packet may be about to read.
    let deleted: Vec<&Op> =
        r.maps().ops.iter().filter(|op| matches!(op, Op::DelService(_) | Op::DelBackend(_))).collect();
    assert!(matches!(deleted.as_slice(), [Op::DelService(k)] if k.is_member()), "{deleted:?}");
    assert_eq!(r.maps().state.services.len(), 1 + 31 + 31 + 2);
    assert_eq!(r.next_deferred(), Some(clock.now() + DELETION_GRACE));
    clock.advance(DELETION_GRACE / 2);
    assert!(!r.collect_deferred().changed(), "not due yet");
    settle(&mut r, &clock);
    let ops = &r.maps().ops;
    let flip = ops.iter().position(|op| matches!(op, Op::PutService(k, _) if *k == key0)).expect("slot 0 flipped");
    let new_rows = ops.iter().filter(|op| matches!(op, Op::PutService(k, _) if k.version == 2 && k.slot != 0));
    let deleted_old = ops.iter().positions_of(|op| matches!(op, Op::DelService(k) if k.version == 1 && !k.is_member()));
    // Every new slot row precedes the flip; every old row is deleted after.
    assert_eq!(new_rows.count(), 31);
    assert!(ops[..flip].iter().filter(|op| matches!(op, Op::PutService(k, _) if k.version == 2)).count() == 31);
    assert_eq!(deleted_old.len(), 31);
    assert!(deleted_old.iter().all(|i| *i > flip));
    // Backend 3 is no longer referenced: deleted last.
    assert!(matches!(ops.last(), Some(Op::DelBackend(_))));
    assert_eq!(r.programmed().services[&key0].version, 2);
    assert_eq!(r.maps().state, *r.programmed());
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
    let v = r.programmed().services[&frontend_key(&frontend(80))];
    assert_eq!((v.count, v.flags), (0, service_flags::REJECT));
    assert_eq!(r.programmed().services.len(), 1);
    assert!(r.programmed().backends.is_empty());
}

#[test]
fn rows_left_by_an_earlier_agent_are_adopted_and_pruned() {
    let clock = ManualClock::default();
    let mut maps = FakeMaps::default();
    {
        let mut first = with_clock(std::mem::take(&mut maps), &clock);
        first.reconcile(&desired(&[(80, &[1, 2]), (81, &[3])]));
        // The agent stops while the old version of port 80 waits for its
        // grace period.
        first.reconcile(&desired(&[(80, &[1, 4]), (81, &[3])]));
        assert!(first.deferred_len() > 0);
        maps = FakeMaps { state: first.programmed().clone(), ..FakeMaps::default() };
    }
    let mut second = with_clock(maps, &clock);
    let report = second.reconcile(&desired(&[(80, &[1, 4])]));
    // Port 80 is unchanged (adopted, not rewritten); port 81's slot 0 goes
    // at once; its slot rows, the old version of port 80, their backends
    // and port 81's rev-NAT row go after a grace period from the restart
    // (how long ago the earlier agent queued them is unknown).
    assert_eq!(report.rows_written, 0, "{report:?}");
    assert_eq!(report.frontends_deleted, 1);
    assert_eq!(second.programmed().services.keys().filter(|k| k.slot == 0).count(), 1);
    assert_eq!(second.programmed().backends.len(), 4);
    second.check_deferred();
    settle(&mut second, &clock);
    // Slot 0, its 31 slots, a member row for each of its 2 backends.
    assert_eq!(second.programmed().services.len(), 1 + 31 + 2);
    assert_eq!(second.programmed().backends.len(), 2);
    assert_eq!(second.programmed().rev_nat.len(), 1);
    assert_eq!(second.maps().state, *second.programmed());
}

#[test]
fn a_full_map_names_the_flag_and_leaves_other_frontends_programmed() {
    // Room for one frontend's 31 slots, 3 member rows and slot 0, not two.
    let mut r = Reconciler::new(FakeMaps::with_services_capacity(40)).expect("dump");
    let report = r.reconcile(&desired(&[(80, &[1, 2, 3]), (81, &[4, 5, 6])]));
    assert_eq!(report.errors.len(), 1);
    let msg = report.errors[0].to_string();
    assert!(msg.contains("10.96.0.10:81/TCP") && msg.contains("raise it with --map-size-services"), "{msg}");
    assert!(r.programmed().services.contains_key(&frontend_key(&frontend(80))));
    assert!(!r.programmed().services.contains_key(&frontend_key(&frontend(81))));
    // The failed frontend's partial slot rows were undone (its member
    // rows, written first, stay for the retry).
    assert_eq!(r.maps().state.services.keys().filter(|k| !k.is_member()).count(), 32);
    assert_eq!(r.maps().state, *r.programmed());
}

#[test]
fn deleting_everything_leaves_no_rows() {
    let clock = ManualClock::default();
    let mut r = with_clock(FakeMaps::default(), &clock);
    r.reconcile(&desired(&[(80, &[1, 2, 3]), (81, &[3, 4])]));
    r.reconcile(&Desired::default());
    // Slot 0 went at once: no new flow matches.
    assert!(!r.maps().state.services.keys().any(|k| k.slot == 0));
    settle(&mut r, &clock);
    assert_eq!(r.maps().state, MapState { next_ids: r.maps().state.next_ids, ..MapState::default() });
}

#[test]
fn with_no_grace_deletions_run_in_the_same_reconcile() {
    let mut r = reconciler().with_grace(Duration::ZERO);
    r.reconcile(&desired(&[(80, &[1, 2, 3]), (81, &[3, 4])]));
    r.reconcile(&desired(&[(80, &[1, 2])]));
    assert_eq!(r.programmed().services.len(), 1 + 31 + 2);
    assert_eq!((r.programmed().backends.len(), r.programmed().rev_nat.len()), (2, 1));
    assert_eq!(r.next_deferred(), None);
    r.reconcile(&Desired::default());
    assert_eq!(r.maps().state, MapState { next_ids: r.maps().state.next_ids, ..MapState::default() });
}

#[test]
fn the_old_version_survives_a_flip_until_the_grace_has_passed() {
    let clock = ManualClock::default();
    let mut r = with_clock(FakeMaps::default(), &clock);
    r.reconcile(&desired(&[(80, &[1, 2, 3])]));
    let key0 = frontend_key(&frontend(80));
    let old = r.programmed().services[&key0];
    let old_rows: Vec<(ServiceKey, ServiceValue)> =
        (1..=31).map(|s| key0.with_slot(old.version, s)).map(|k| (k, r.programmed().services[&k])).collect();
    r.reconcile(&desired(&[(80, &[1, 2])]));
    r.check_deferred();
    // Until the grace has passed, a packet that read the old slot-0 row
    // finds every slot row of its version and the backend each names.
    for step in 0..4 {
        for (k, v) in &old_rows {
            assert_eq!(r.maps().state.services.get(k), Some(v), "step {step}");
            assert!(r.maps().state.backends.contains_key(&v.backend_id), "step {step}");
        }
        clock.advance((DELETION_GRACE / 4).saturating_sub(Duration::from_millis(1)));
        r.collect_deferred();
        r.reconcile(&desired(&[(80, &[1, 2])]));
    }
    clock.advance(Duration::from_millis(4));
    assert!(r.collect_deferred().rows_deleted > 0);
    assert!(old_rows.iter().all(|(k, _)| !r.maps().state.services.contains_key(k)));
    assert_eq!(r.maps().state.backends.len(), 2);
    assert_eq!(r.maps().state, *r.programmed());
}

#[test]
fn a_frontend_deleted_and_created_again_within_the_grace_gets_whole_rows() {
    let clock = ManualClock::default();
    let mut r = with_clock(FakeMaps::default(), &clock);
    r.reconcile(&desired(&[(80, &[1, 2]), (81, &[3])]));
    let key0 = frontend_key(&frontend(80));
    let first = r.programmed().services[&key0];
    r.reconcile(&desired(&[(81, &[3])]));
    assert!(!r.programmed().services.contains_key(&key0));
    clock.advance(DELETION_GRACE / 2);
    // Back, with one backend more, before the old rows have gone.
    assert!(r.reconcile(&desired(&[(80, &[1, 2, 4]), (81, &[3])])).errors.is_empty());
    r.check_deferred();
    let again = r.programmed().services[&key0];
    assert_ne!(again.version, first.version, "a version awaiting deletion is not reused");
    assert_eq!(again.rev_nat_id, first.rev_nat_id, "the rev-NAT row awaiting deletion is taken back");
    let live: BTreeSet<u32> =
        r.programmed().live_pairs().iter().filter(|(rn, _)| *rn == again.rev_nat_id).map(|p| p.1).collect();
    assert_eq!(live.len(), 3);
    // The first life's rows go after their grace; the new ones stay whole.
    clock.advance(DELETION_GRACE / 2);
    r.collect_deferred();
    assert_eq!(r.programmed().services.keys().filter(|k| k.with_slot(0, 0) == key0 && !k.is_member()).count(), 1 + 31);
    assert!(r.programmed().rev_nat.contains_key(&again.rev_nat_id));
    assert_eq!(r.programmed().backends.len(), 4);
    settle(&mut r, &clock);
    assert_eq!(r.maps().state, *r.programmed());
}

#[test]
fn ids_awaiting_deletion_are_not_reused() {
    let clock = ManualClock::default();
    let mut r = with_clock(FakeMaps::default(), &clock);
    r.reconcile(&desired(&[(80, &[1, 2]), (81, &[3])]));
    let ids_of = |r: &Reconciler<FakeMaps>| -> BTreeMap<u8, u32> {
        r.programmed().backends.iter().map(|(id, b)| (b.addr[3], *id)).collect()
    };
    let before = ids_of(&r);
    let rev_nat_81 = r.programmed().services[&frontend_key(&frontend(81))].rev_nat_id;
    // Port 80 moves to backend 5 (backends 1 and 2 now only named by the
    // old version), port 81 goes (its rev-NAT row unreferenced).
    r.reconcile(&desired(&[(80, &[5])]));
    // New rows within the grace: new backends and a new frontend.
    r.reconcile(&desired(&[(80, &[5]), (82, &[6, 7])]));
    let during = ids_of(&r);
    for last in [1, 2, 3] {
        assert_eq!(during.get(&last), before.get(&last), "backend {last} kept its id while pending");
    }
    let pending: BTreeSet<u32> = before.values().copied().collect();
    for last in [5, 6, 7] {
        assert!(!pending.contains(&during[&last]), "backend {last} got a pending id");
    }
    let rev_nat_82 = r.programmed().services[&frontend_key(&frontend(82))].rev_nat_id;
    assert_ne!(rev_nat_82, rev_nat_81, "rev-NAT id awaiting deletion reused");
    assert!(r.programmed().rev_nat.contains_key(&rev_nat_81));
    r.check_deferred();
    settle(&mut r, &clock);
    // Gone now, and so free again.
    assert!(!r.programmed().rev_nat.contains_key(&rev_nat_81));
    let after = ids_of(&r);
    assert!([1, 2, 3].iter().all(|l| !after.contains_key(l)));
    r.reconcile(&desired(&[(80, &[5]), (82, &[6, 7]), (83, &[8])]));
    // Not even then: a freed id is never handed out again.
    assert!(!pending.contains(&ids_of(&r)[&8]), "a freed id reused");
}

#[test]
fn only_changed_frontends_are_written_and_a_removed_one_comes_back_whole() {
    let clock = ManualClock::default();
    let mut r = with_clock(FakeMaps::default(), &clock);
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
    settle(&mut r, &clock);
    let key82 = frontend_key(&frontend(82));
    assert!(!r.programmed().services.keys().any(|k| k.with_slot(0, 0) == key82));
    let report = r.reconcile(&desired(&[(80, &[1, 2]), (81, &[3, 5]), (82, &[4])]));
    assert_eq!(report.frontends_written, 1);
    assert_eq!(r.programmed().services.keys().filter(|k| k.with_slot(0, 0) == key82).count(), 32 + 1);
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

/// Slot rows out of their frontend's live table, with when they were first
/// seen so; panics when one went before the grace period had passed.
#[derive(Default)]
struct GraceWatch(BTreeMap<ServiceKey, Instant>);

impl GraceWatch {
    fn observe(&mut self, state: &MapState, now: Instant, step: u64) {
        let live = |k: &ServiceKey| {
            state.services.get(&k.with_slot(0, 0)).is_some_and(|f| f.version == k.version && k.slot <= f.count)
        };
        self.0.retain(|k, since| {
            let present = state.services.contains_key(k);
            assert!(present || now >= *since + DELETION_GRACE, "step {step}: {k:?} deleted before its grace");
            present
        });
        // Member rows are not read by a packet on its way to a slot: they
        // go at once when their backend leaves the set.
        for (k, v) in state.services.iter().filter(|(k, _)| k.slot != 0 && !k.is_member() && !live(k)) {
            self.0.entry(*k).or_insert(now);
            // A packet that read the old slot-0 row finds the backend row
            // (version 77 is the test's own stray row).
            assert!(k.version == 77 || state.backends.contains_key(&v.backend_id), "step {step}: {k:?}");
        }
    }
}

#[test]
fn indexes_and_maps_agree_with_the_rows_over_random_changes_restarts_and_full_maps() {
    // Every reconcile checks its indexes (rows per frontend, backend and
    // rev-NAT references, live (rev-NAT, backend) pairs, ids by value)
    // against a recomputation from the rows; here a long random sequence
    // drives it through changes, deletions, restarts that adopt stray rows
    // of an interrupted run, a map too small for everything, and a clock
    // that moves by random steps around the grace period, so deferred
    // deletions run at random points (by a reconcile or on their own).
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let clock = ManualClock::default();
    let mut watch = GraceWatch::default();
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
        let mut r = with_clock(std::mem::take(&mut maps), &clock);
        watch.observe(r.programmed(), clock.now(), step);
        for _ in 0..=rng.below(3) {
            // Up to 1.5 grace periods.
            clock.advance(Duration::from_millis(rng.below(3_000)));
            if rng.below(3) == 0 {
                r.collect_deferred();
                assert_eq!(r.maps().state, *r.programmed(), "step {step}");
                watch.observe(r.programmed(), clock.now(), step);
                assert!(r.next_deferred().is_none_or(|at| at > clock.now()), "step {step}");
            }
            let report = r.reconcile(&d);
            assert_eq!(r.maps().state, *r.programmed(), "step {step}");
            watch.observe(r.programmed(), clock.now(), step);
            if report.errors.is_empty() {
                r.check_deferred();
                for (port, backends) in &entries {
                    let v = r.programmed().services[&frontend_key(&frontend(*port))];
                    let live = r.programmed().live_pairs();
                    let reached: BTreeSet<u32> =
                        live.iter().filter(|(rn, _)| *rn == v.rev_nat_id).map(|(_, b)| *b).collect();
                    assert_eq!(reached.len(), backends.len(), "step {step} port {port}");
                    assert!(reached.iter().all(|b| r.is_live_pair(v.rev_nat_id, *b)));
                    // Every slot row of a live table names a backend row.
                    assert!(reached.iter().all(|b| r.programmed().backends.contains_key(b)), "step {step}");
                }
                assert_eq!(r.programmed().services.keys().filter(|k| k.slot == 0).count(), entries.len());
            }
        }
        maps = FakeMaps { state: r.programmed().clone(), ..FakeMaps::default() };
    }
    // Everything queued goes once the grace has passed.
    let mut r = with_clock(maps, &clock);
    r.reconcile(&Desired::default());
    settle(&mut r, &clock);
    assert_eq!(r.maps().state, MapState { next_ids: r.maps().state.next_ids, ..MapState::default() });
}

/// The member rows of `key0`'s frontend: the backend ids of its set.
fn members(r: &Reconciler<FakeMaps>, key0: &ServiceKey) -> BTreeSet<u32> {
    r.maps().state.services.range(key0.member(0)..=key0.member(u32::MAX)).map(|(k, _)| k.version).collect()
}

/// The backend ids of the live table of `key0`'s frontend.
fn table_ids(r: &Reconciler<FakeMaps>, key0: &ServiceKey) -> BTreeSet<u32> {
    let v = r.programmed().services[key0];
    (1..=v.count).map(|s| r.programmed().services[&key0.with_slot(v.version, s)].backend_id).collect()
}

#[test]
fn member_rows_follow_the_backend_set_and_leave_with_a_removed_backend() {
    let clock = ManualClock::default();
    let mut r = with_clock(FakeMaps::default(), &clock);
    let key0 = frontend_key(&frontend(80));
    assert!(r.reconcile(&desired(&[(80, &[1, 2, 3])])).errors.is_empty());
    assert_eq!(members(&r, &key0), table_ids(&r, &key0));
    assert_eq!(members(&r, &key0).len(), 3);
    let removed = r.programmed().backends.iter().find(|(_, b)| b.addr[3] == 3).map(|(id, _)| *id).unwrap();
    r.maps.ops.clear();
    assert!(r.reconcile(&desired(&[(80, &[1, 2])])).errors.is_empty());
    // The removed backend's member row goes at once, after the flip: an
    // affinity entry naming it is no longer followed, while its old slot
    // rows wait for the grace.
    let flip = r.maps.ops.iter().position(|op| matches!(op, Op::PutService(k, _) if *k == key0)).unwrap();
    let gone = r.maps.ops.iter().position(|op| *op == Op::DelService(key0.member(removed))).expect("member deleted");
    assert!(flip < gone);
    assert_eq!(members(&r, &key0), table_ids(&r, &key0));
    settle(&mut r, &clock);
    assert_eq!(members(&r, &key0), table_ids(&r, &key0));
    // No backends: no members; the frontend gone: no rows at all.
    assert!(r.reconcile(&desired(&[(80, &[])])).errors.is_empty());
    assert!(members(&r, &key0).is_empty());
    assert!(r.reconcile(&desired(&[])).errors.is_empty());
    settle(&mut r, &clock);
    assert!(r.maps().state.services.is_empty());
}

#[test]
fn ids_are_not_reused_even_across_restarts() {
    let clock = ManualClock::default();
    let mut r = with_clock(FakeMaps::default(), &clock);
    assert!(r.reconcile(&desired(&[(80, &[1, 2])])).errors.is_empty());
    let first: BTreeSet<u32> = r.programmed().backends.keys().copied().collect();
    let first_rev: BTreeSet<u32> = r.programmed().rev_nat.keys().copied().collect();
    // Everything removed, then other backends and another frontend: on the
    // old code they got the freed ids (1, 2) back at once.
    assert!(r.reconcile(&desired(&[])).errors.is_empty());
    settle(&mut r, &clock);
    assert!(r.programmed().backends.is_empty());
    assert!(r.reconcile(&desired(&[(81, &[3, 4])])).errors.is_empty());
    let second: BTreeSet<u32> = r.programmed().backends.keys().copied().collect();
    assert!(first.is_disjoint(&second), "{first:?} reused in {second:?}");
    assert!(first_rev.is_disjoint(&r.programmed().rev_nat.keys().copied().collect()));
    // A restart (a new reconciler over the same maps) continues from the
    // recorded counter, even once every row is gone.
    assert!(r.reconcile(&desired(&[])).errors.is_empty());
    settle(&mut r, &clock);
    let maps = std::mem::take(&mut r.maps);
    assert!(maps.state.backends.is_empty());
    let mut r = with_clock(maps, &clock);
    assert!(r.reconcile(&desired(&[(82, &[5])])).errors.is_empty());
    let third: BTreeSet<u32> = r.programmed().backends.keys().copied().collect();
    assert!(third.iter().all(|id| second.iter().all(|old| id > old)), "{third:?} after {second:?}");
}

#[test]
fn source_ranges_are_keyed_per_protocol_and_family_and_other_family_ranges_ignored() {
    use crate::vocabulary::Cidr;
    let lb = IpAddr::from([192, 0, 2, 10]);
    let mut d = Desired::default();
    for (protocol, ranges) in [(Protocol::Tcp, vec!["10.0.0.0/8", "::/0"]), (Protocol::Udp, vec!["192.168.0.0/16"])] {
        let f = Frontend { addr: lb, port: 53, protocol, scope: Scope::External };
        d.frontends.insert(
            f,
            DesiredFrontend {
                service: ObjectRef { namespace: "default".into(), name: format!("{protocol:?}") },
                port_name: String::new(),
                frontend: f,
                kind: crate::model::FrontendKind::LoadBalancer,
                affinity_timeout_s: None,
                affinity_scope: None,
                source_ranges: ranges.iter().map(|c| c.parse::<Cidr>().unwrap()).collect(),
                masquerade: false,
                backends: vec![backend(1)],
                when_empty: WhenEmpty::Reject,
            },
        );
    }
    // Only IPv6 ranges: not restricted in IPv4 (as kube-proxy filters them).
    let open = Frontend { addr: lb, port: 80, protocol: Protocol::Tcp, scope: Scope::External };
    let mut df = d.frontends.values().next().unwrap().clone();
    df.frontend = open;
    df.source_ranges = vec!["::/0".parse::<Cidr>().unwrap()];
    d.frontends.insert(open, df);
    let mut r = reconciler();
    assert!(r.reconcile(&d).errors.is_empty());
    let rows: Vec<(u32, SourceRangeKey)> = r.programmed().source_ranges.iter().copied().collect();
    // No IPv6 prefix in any row; each row carries its frontend's protocol.
    assert!(rows.iter().all(|(_, k)| k.family == FAMILY_IPV4), "{rows:?}");
    let described: BTreeSet<(u8, [u8; 4], u32)> = rows
        .iter()
        .map(|(len, k)| (k.proto, [k.addr[0], k.addr[1], k.addr[2], k.addr[3]], len - SOURCE_RANGE_FRONTEND_BITS))
        .collect();
    let tcp = Protocol::Tcp.number();
    let udp = Protocol::Udp.number();
    assert_eq!(described, BTreeSet::from([(tcp, [10, 0, 0, 0], 8), (udp, [192, 168, 0, 0], 16)]));
    let flags = |port, protocol| {
        r.programmed().services[&frontend_key(&Frontend { addr: lb, port, protocol, scope: Scope::External })].flags
    };
    assert_ne!(flags(53, Protocol::Tcp) & service_flags::SOURCE_RANGES, 0);
    assert_ne!(flags(53, Protocol::Udp) & service_flags::SOURCE_RANGES, 0);
    assert_eq!(flags(80, Protocol::Tcp) & service_flags::SOURCE_RANGES, 0);
}

#[test]
fn a_service_with_more_endpoints_than_the_usual_table_keeps_every_endpoint_reachable() {
    // 17 EndpointSlices of 1,000 panicked every agent (maglev.rs asserted).
    let f = frontend(80);
    let backends: Vec<Backend> = (0..17_000u32)
        .map(|i| {
            let [_, b, c, d] = i.to_be_bytes();
            Backend {
                addr: IpAddr::from([10, b + 1, c, d]),
                port: 8080,
                protocol: Protocol::Tcp,
                local: false,
                ready: true,
            }
        })
        .collect();
    let mut d = desired(&[]);
    d.frontends.insert(
        f,
        DesiredFrontend {
            service: ObjectRef { namespace: "default".into(), name: "big".into() },
            port_name: String::new(),
            frontend: f,
            kind: crate::model::FrontendKind::ClusterIp,
            affinity_timeout_s: None,
            affinity_scope: None,
            source_ranges: Vec::new(),
            masquerade: false,
            backends,
            when_empty: WhenEmpty::Reject,
        },
    );
    let mut r = reconciler();
    let report = r.reconcile(&d);
    assert!(report.errors.is_empty(), "{report:?}");
    let key0 = frontend_key(&f);
    assert_eq!(table_ids(&r, &key0).len(), 17_000);
    assert_eq!(r.programmed().services[&key0].count, 32_749);
}

#[test]
fn reconciling_the_model_s_changes_writes_what_reconciling_everything_writes() {
    // Two reconcilers on their own maps follow the same random sequence of
    // snapshots: one compares every frontend and row each time, the other
    // only what the incremental model says changed. Their maps must stay
    // identical (ids included: both write the same rows in the same order).
    use crate::model::{Model, fuzz};
    let plan = fuzz::Plan::from_env(fuzz::DEFAULT_CASES / 40);
    let mut written = 0;
    plan.run("reconciler::changes", |_, rng| {
        let mut objects = fuzz::objects(rng);
        let mut node = fuzz::node(rng);
        let mut model = Model::new();
        let mut full = reconciler().with_grace(Duration::ZERO);
        let mut incremental = reconciler().with_grace(Duration::ZERO);
        for step in 0..8 {
            let changes = model.update(&objects, &node);
            let a = full.reconcile(model.desired());
            let b = incremental.reconcile_changes(model.desired(), &changes);
            assert!(a.errors.is_empty() && b.errors.is_empty(), "step {step}: {:?} {:?}", a.errors, b.errors);
            assert_eq!(full.maps().state, incremental.maps().state, "step {step}");
            assert_eq!(incremental.maps().state, *incremental.programmed(), "step {step}");
            assert_eq!((a.rows_written, a.rows_deleted), (b.rows_written, b.rows_deleted), "step {step}");
            written += b.rows_written;
            fuzz::change(rng, &mut objects, &mut node);
        }
    });
    assert!(plan.only.is_some() || written > 0);
}

#[test]
fn after_a_failed_reconcile_the_next_reconcile_of_changes_writes_again_what_failed() {
    // Room for one frontend's 31 slots, 3 member rows and slot 0, not two.
    let mut r = Reconciler::new(FakeMaps::with_services_capacity(40)).expect("dump");
    let d = desired(&[(80, &[1, 2, 3]), (81, &[4, 5, 6])]);
    let everything = Changes { everything: true, ..Changes::default() };
    assert_eq!(r.reconcile_changes(&d, &everything).errors.len(), 1);
    r.maps_mut().services_capacity = None;
    // Nothing changed since, and yet port 81 is written: the reconcile
    // after a failure compares everything.
    let report = r.reconcile_changes(&d, &Changes::default());
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(report.frontends_written, 1);
    assert!(r.programmed().services.contains_key(&frontend_key(&frontend(81))));
    // From then on only what the changes name is compared.
    let d = desired(&[(80, &[1, 2]), (81, &[4, 5, 6])]);
    assert_eq!(r.reconcile_changes(&d, &Changes::default()).rows_written, 0);
    let named = Changes { frontends: [frontend(80)].into(), ..Changes::default() };
    assert_eq!(r.reconcile_changes(&d, &named).frontends_written, 1);
    assert_eq!(r.maps().state, *r.programmed());
}
