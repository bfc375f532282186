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
            Arc::new(DesiredFrontend {
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
            }),
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
fn a_changed_backend_set_is_written_as_a_new_table_then_switched_and_the_old_kept_for_the_grace() {
    let clock = ManualClock::default();
    let mut r = with_clock(FakeMaps::default(), &clock);
    assert!(r.reconcile(&desired(&[(80, &[1, 2, 3])])).errors.is_empty());
    let key = frontend_key(&frontend(80));
    let v1 = r.programmed().services[&key];
    assert_eq!((v1.count, v1.members), (31, 3));
    assert_ne!(v1.table, 0, "block 0 is never a table");
    let old_blocks = blocks_at(&r, v1.table, 3);
    r.maps.ops.clear();

    let report = r.reconcile(&desired(&[(80, &[1, 2])]));
    assert!(report.errors.is_empty());
    // The old table (and backend 3, which only it lists) waits for the
    // grace period; nothing a packet may be about to read is deleted.
    assert_eq!(report.rows_deferred, 1);
    assert!(!r.maps().ops.iter().any(|op| matches!(op, Op::DelService(_) | Op::DelBackend(_))), "{:?}", r.maps().ops);
    let v2 = r.programmed().services[&key];
    assert_eq!((v2.count, v2.members), (31, 2));
    assert_ne!(v2.table, v1.table);
    // The new table is written whole, into other blocks, before the switch.
    let ops = &r.maps().ops;
    let switch = ops.iter().position(|op| matches!(op, Op::PutService(k, _) if *k == key)).expect("switched");
    assert_eq!(ops[..switch], [Op::PutSlotBlocks(v2.table, 3)]);
    assert_eq!(blocks_at(&r, v1.table, 3), old_blocks);
    assert_eq!(r.next_deferred(), Some(clock.now() + DELETION_GRACE));
    clock.advance(DELETION_GRACE / 2);
    assert!(!r.collect_deferred().changed(), "not due yet");
    settle(&mut r, &clock);
    // Backend 3 is no longer listed by any table: deleted last.
    assert!(matches!(r.maps().ops.last(), Some(Op::DelBackend(_))));
    assert_eq!(r.programmed().backends.len(), 2);
    assert_eq!(r.maps().state, *r.programmed());
    // The old table's blocks are free again: the next table takes them.
    assert!(r.reconcile(&desired(&[(80, &[1, 2]), (81, &[4])])).errors.is_empty());
    assert_eq!(r.programmed().services[&frontend_key(&frontend(81))].table, v1.table);
}

/// Blocks of `backend_slots` in a row, as the fake holds them (`None`:
/// never written).
type Blocks = Vec<Option<service_common::SlotBlock>>;

/// The `n` blocks of `backend_slots` from `first` on.
fn blocks_at(r: &Reconciler<FakeMaps>, first: u32, n: u32) -> Blocks {
    (first..first + n).map(|b| r.maps().blocks.get(&b).copied()).collect()
}

#[test]
fn frontends_with_the_same_backend_set_share_one_table() {
    let clock = ManualClock::default();
    let mut r = with_clock(FakeMaps::default(), &clock);
    assert!(r.reconcile(&desired(&[(80, &[1, 2, 3]), (81, &[1, 2, 3]), (82, &[4])])).errors.is_empty());
    let table = |r: &Reconciler<FakeMaps>, port| r.programmed().services[&frontend_key(&frontend(port))].table;
    assert_eq!(table(&r, 80), table(&r, 81));
    assert_ne!(table(&r, 80), table(&r, 82));
    let writes =
        |r: &Reconciler<FakeMaps>| r.maps().ops.iter().filter(|op| matches!(op, Op::PutSlotBlocks(..))).count();
    assert_eq!(writes(&r), 2, "one table per backend set");
    assert_eq!(r.programmed().tables.len(), 2);
    let shared = table(&r, 80);
    // One of them moves on: the other keeps the table, which stays named.
    r.maps.ops.clear();
    assert!(r.reconcile(&desired(&[(80, &[1, 2, 3]), (81, &[1, 2]), (82, &[4])])).errors.is_empty());
    assert_eq!(table(&r, 80), shared);
    assert_eq!(r.deferred_len(), 0);
    // Port 82 takes port 80's set: no table is written for it.
    r.maps.ops.clear();
    assert!(r.reconcile(&desired(&[(80, &[1, 2, 3]), (81, &[1, 2]), (82, &[1, 2, 3])])).errors.is_empty());
    assert_eq!(table(&r, 82), shared);
    assert_eq!(writes(&r), 0);
    // Port 82's old table is named by no one: released after the grace.
    assert_eq!(r.deferred_len(), 1);
    settle(&mut r, &clock);
    assert_eq!(r.programmed().tables.len(), 2);
    assert_eq!(r.maps().state, *r.programmed());
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
    let maps = {
        let mut first = with_clock(FakeMaps::default(), &clock);
        first.reconcile(&desired(&[(80, &[1, 2]), (81, &[3])]));
        // The agent stops while the old table of port 80 waits for its
        // grace period.
        first.reconcile(&desired(&[(80, &[1, 4]), (81, &[3])]));
        assert!(first.deferred_len() > 0);
        std::mem::take(&mut first.maps)
    };
    let mut second = with_clock(maps, &clock);
    let report = second.reconcile(&desired(&[(80, &[1, 4])]));
    // Port 80 is unchanged (adopted, not rewritten); port 81's row goes at
    // once, its table and rev-NAT row after a grace period from the
    // restart. The table port 80 left before the restart is no frontend's:
    // its blocks are free space to the new agent (a switch made before the
    // agent stopped is longer ago than any packet takes), so backend 2,
    // which only it listed, goes at once.
    assert_eq!(report.rows_written, 0, "{report:?}");
    assert_eq!(report.frontends_deleted, 1);
    assert_eq!(second.programmed().services.len(), 1);
    assert_eq!(second.programmed().backends.len(), 3);
    second.check_deferred();
    settle(&mut second, &clock);
    assert_eq!(second.programmed().services.len(), 1);
    assert_eq!(second.programmed().tables.len(), 1);
    assert_eq!(second.programmed().backends.len(), 2);
    assert_eq!(second.programmed().rev_nat.len(), 1);
    assert_eq!(second.maps().state, *second.programmed());
}

#[test]
fn an_adopted_table_that_is_not_well_formed_is_written_again() {
    let mut maps = {
        let mut first = reconciler();
        first.reconcile(&desired(&[(80, &[1, 2])]));
        std::mem::take(&mut first.maps)
    };
    // Its member list out of order: not what an agent writes.
    let key = frontend_key(&frontend(80));
    let v = maps.state.services[&key];
    let (block, lane) = service_common::backend_slots::locate(v.table, v.count);
    maps.blocks.get_mut(&block).expect("block").ids[lane] = u32::MAX;
    maps.refresh_tables();
    let mut r = Reconciler::new(maps).expect("dump");
    assert!(r.programmed().tables.is_empty(), "not adopted");
    let report = r.reconcile(&desired(&[(80, &[1, 2])]));
    assert!(report.errors.is_empty() && report.frontends_written == 1, "{report:?}");
    let table = r.programmed().table_of(&r.programmed().services[&key]).expect("a table");
    assert_eq!((table.slots.len(), table.members.len()), (31, 2));
    assert_eq!(r.maps().state, *r.programmed());
    r.check_deferred();
}

#[test]
fn a_full_map_names_the_flag_and_leaves_other_frontends_programmed() {
    // Room for one frontend row, not two.
    let mut r = Reconciler::new(FakeMaps::with_services_capacity(1)).expect("dump");
    let report = r.reconcile(&desired(&[(80, &[1, 2, 3]), (81, &[4, 5, 6])]));
    assert_eq!(report.errors.len(), 1);
    let msg = report.errors[0].to_string();
    assert!(msg.contains("10.96.0.10:81/TCP") && msg.contains("raise it with --map-size-services"), "{msg}");
    assert!(r.programmed().services.contains_key(&frontend_key(&frontend(80))));
    assert!(!r.programmed().services.contains_key(&frontend_key(&frontend(81))));
    // The failed frontend's table and rev-NAT row are no one's: released
    // after the grace.
    r.check_deferred();
    assert_eq!(r.deferred_len(), 2);
    assert_eq!(r.maps().state, *r.programmed());
}

#[test]
fn a_full_backend_slots_map_names_its_flag_and_leaves_other_frontends_programmed() {
    // Block 0 and one table of 31 slots and 3 members (3 blocks).
    let maps = FakeMaps { slot_blocks: Some(4), ..FakeMaps::default() };
    let mut r = Reconciler::new(maps).expect("dump");
    let report = r.reconcile(&desired(&[(80, &[1, 2, 3]), (81, &[4, 5, 6]), (82, &[1, 2, 3])]));
    assert_eq!(report.errors.len(), 1, "{report:?}");
    let msg = report.errors[0].to_string();
    assert!(
        msg.contains("10.96.0.10:81/TCP")
            && msg.contains("backend_slots is full (64 entries)")
            && msg.contains("--map-size-backend-slots"),
        "{msg}"
    );
    // Port 82 shares port 80's table: it needs no room.
    for port in [80, 82] {
        assert!(r.programmed().services.contains_key(&frontend_key(&frontend(port))));
    }
    assert!(!r.programmed().services.contains_key(&frontend_key(&frontend(81))));
    assert_eq!(r.slot_blocks(), (4, 4));
    assert_eq!(r.maps().state, *r.programmed());
}

#[test]
fn deleting_everything_leaves_no_rows() {
    let clock = ManualClock::default();
    let mut r = with_clock(FakeMaps::default(), &clock);
    r.reconcile(&desired(&[(80, &[1, 2, 3]), (81, &[3, 4])]));
    r.reconcile(&Desired::default());
    // The frontend rows went at once: no new flow matches.
    assert!(r.maps().state.services.is_empty());
    settle(&mut r, &clock);
    assert_eq!(r.maps().state, MapState { next_ids: r.maps().state.next_ids, ..MapState::default() });
    assert_eq!(r.slot_blocks().0, 1, "every block free again but block 0");
}

#[test]
fn with_no_grace_deletions_run_in_the_same_reconcile() {
    let mut r = reconciler().with_grace(Duration::ZERO);
    r.reconcile(&desired(&[(80, &[1, 2, 3]), (81, &[3, 4])]));
    r.reconcile(&desired(&[(80, &[1, 2])]));
    assert_eq!((r.programmed().services.len(), r.programmed().tables.len()), (1, 1));
    assert_eq!((r.programmed().backends.len(), r.programmed().rev_nat.len()), (2, 1));
    assert_eq!(r.next_deferred(), None);
    r.reconcile(&Desired::default());
    assert_eq!(r.maps().state, MapState { next_ids: r.maps().state.next_ids, ..MapState::default() });
}

#[test]
fn the_old_table_survives_a_switch_until_the_grace_has_passed() {
    let clock = ManualClock::default();
    let mut r = with_clock(FakeMaps::default(), &clock);
    r.reconcile(&desired(&[(80, &[1, 2, 3])]));
    let key = frontend_key(&frontend(80));
    let old = r.programmed().services[&key];
    let old_table = r.programmed().tables[&old.table].clone();
    let old_blocks = blocks_at(&r, old.table, 3);
    r.reconcile(&desired(&[(80, &[1, 2])]));
    r.check_deferred();
    // Until the grace has passed, a packet that read the old frontend row
    // finds the old table as it was and the backend each slot names, while
    // other frontends' new tables are written meanwhile.
    for step in 0..4u8 {
        assert_eq!(blocks_at(&r, old.table, 3), old_blocks, "step {step}");
        for id in &old_table.slots {
            assert!(r.maps().state.backends.contains_key(id), "step {step}");
        }
        clock.advance((DELETION_GRACE / 4).saturating_sub(Duration::from_millis(1)));
        r.collect_deferred();
        let other: &[u8] = &[10 + step, 20 + step, 30 + step];
        assert!(r.reconcile(&desired(&[(80, &[1, 2]), (81, other)])).errors.is_empty());
    }
    clock.advance(Duration::from_millis(4));
    assert!(r.collect_deferred().rows_deleted > 0);
    assert!(!r.programmed().tables.contains_key(&old.table));
    r.check_deferred();
    assert_eq!(r.maps().state, *r.programmed());
}

#[test]
fn a_frontend_deleted_and_created_again_within_the_grace_gets_whole_rows() {
    let clock = ManualClock::default();
    let mut r = with_clock(FakeMaps::default(), &clock);
    r.reconcile(&desired(&[(80, &[1, 2]), (81, &[3])]));
    let key = frontend_key(&frontend(80));
    let first = r.programmed().services[&key];
    r.reconcile(&desired(&[(81, &[3])]));
    assert!(!r.programmed().services.contains_key(&key));
    clock.advance(DELETION_GRACE / 2);
    // Back, with one backend more, before the old table has gone.
    assert!(r.reconcile(&desired(&[(80, &[1, 2, 4]), (81, &[3])])).errors.is_empty());
    r.check_deferred();
    let again = r.programmed().services[&key];
    assert_ne!(again.table, first.table, "blocks awaiting release are not reused");
    assert_eq!(again.rev_nat_id, first.rev_nat_id, "the rev-NAT row awaiting deletion is taken back");
    let live: BTreeSet<u32> =
        r.programmed().live_pairs().iter().filter(|(rn, _)| *rn == again.rev_nat_id).map(|p| p.1).collect();
    assert_eq!(live.len(), 3);
    // The first life's table goes after its grace; the new one stays whole.
    clock.advance(DELETION_GRACE / 2);
    r.collect_deferred();
    let table = &r.programmed().tables[&again.table];
    assert_eq!((table.slots.len(), table.members.len()), (31, 3));
    assert!(r.programmed().rev_nat.contains_key(&again.rev_nat_id));
    assert_eq!(r.programmed().backends.len(), 4);
    settle(&mut r, &clock);
    assert_eq!(r.maps().state, *r.programmed());
    // Deleted and back with the same set within the grace: it takes its
    // table back, whose release is called off.
    let kept = r.programmed().services[&key];
    r.reconcile(&desired(&[(81, &[3])]));
    assert_eq!(r.deferred_len(), 2, "its table and rev-NAT row");
    clock.advance(DELETION_GRACE / 2);
    assert!(r.reconcile(&desired(&[(80, &[1, 2, 4]), (81, &[3])])).errors.is_empty());
    assert_eq!(r.programmed().services[&key], kept);
    r.check_deferred();
    settle(&mut r, &clock);
    assert_eq!(r.programmed().tables.len(), 2);
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
            Op::PutService(k, _) | Op::DelService(k) => *k == key81,
            _ => true,
        }),
        "{:?}",
        r.maps.ops
    );
    // Removed, then desired again unchanged: written again in full.
    assert!(r.reconcile(&desired(&[(80, &[1, 2]), (81, &[3, 5])])).errors.is_empty());
    settle(&mut r, &clock);
    let key82 = frontend_key(&frontend(82));
    assert!(!r.programmed().services.contains_key(&key82));
    let report = r.reconcile(&desired(&[(80, &[1, 2]), (81, &[3, 5]), (82, &[4])]));
    assert_eq!(report.frontends_written, 1);
    assert_eq!(r.programmed().table_of(&r.programmed().services[&key82]).map(|t| t.slots.len()), Some(31));
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

/// Tables named by a frontend row at some point, with their blocks as
/// written and when they were first seen named by none; panics when such a
/// table's blocks or backend rows changed before the grace had passed.
#[derive(Default)]
struct GraceWatch(BTreeMap<u32, (BackendTable, Blocks, Option<Instant>)>);

impl GraceWatch {
    /// Tables `r` counts as named (its mirror: a table it did not adopt is
    /// not its own), their blocks and backends as the maps hold them.
    fn observe(&mut self, r: &Reconciler<FakeMaps>, now: Instant, step: u64) {
        let (maps, named) = (r.maps(), &r.programmed().tables);
        let blocks = |first: u32, t: &BackendTable| -> Blocks {
            let n = u32::try_from(t.blocks().len()).expect("blocks");
            (first..first + n).map(|b| maps.blocks.get(&b).copied()).collect()
        };
        self.0.retain(|first, (table, written, unnamed_since)| {
            if named.get(first) == Some(table) {
                *unnamed_since = None;
                return true;
            }
            let since = *unnamed_since.get_or_insert(now);
            if now >= since + DELETION_GRACE {
                return false;
            }
            // A packet that read a frontend row naming it finds the table
            // as it was, and every backend it lists.
            assert_eq!(blocks(*first, table), *written, "step {step}: table at {first} overwritten within its grace");
            for id in &table.members {
                assert!(maps.state.backends.contains_key(id), "step {step}: backend {id} gone within the grace");
            }
            true
        });
        for (first, table) in named {
            self.0.entry(*first).or_insert_with(|| (table.clone(), blocks(*first, table), None));
        }
    }

    /// A restart: the new agent knows only the tables it adopted (named
    /// by a frontend row, well formed and inside the map).
    fn restart(&mut self, adopted: &MapState) {
        self.0.retain(|first, (table, _, _)| adopted.tables.get(first) == Some(table));
    }
}

/// Panics unless the maps hold what `r` says it programmed, naming the
/// part that differs. Unless `clean` (the last reconcile had no error), a
/// row may still name a table that was not adopted (its blocks read as
/// whatever they hold), which the mirror leaves out.
fn same_state(r: &Reconciler<FakeMaps>, step: u64, clean: bool) {
    let (maps, mirror) = (&r.maps().state, r.programmed());
    assert_eq!(maps.services, mirror.services, "step {step}: services");
    if clean {
        assert_eq!(maps.tables, mirror.tables, "step {step}: tables");
    } else {
        let adopted: BTreeMap<u32, BackendTable> =
            maps.tables.iter().filter(|(f, _)| mirror.tables.contains_key(f)).map(|(f, t)| (*f, t.clone())).collect();
        assert_eq!(adopted, mirror.tables, "step {step}: tables");
    }
    assert_eq!(maps.backends, mirror.backends, "step {step}: backends");
    assert_eq!(maps.rev_nat, mirror.rev_nat, "step {step}: rev-NAT");
    assert_eq!((&maps.source_ranges, maps.next_ids), (&mirror.source_ranges, mirror.next_ids), "step {step}");
}

#[test]
fn indexes_and_maps_agree_with_the_rows_over_random_changes_restarts_and_full_maps() {
    // Every reconcile checks its indexes (table and backend references,
    // tables by member list, rev-NAT references, live (rev-NAT, backend)
    // pairs, ids by value, the free blocks) against a recomputation from
    // the rows; here a long random sequence drives it through changes,
    // deletions, restarts that adopt a table that is not well formed, maps
    // too small for everything, and a clock that moves by random steps
    // around the grace period, so deferred releases run at random points
    // (by a reconcile or on their own).
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
            // Few backends, so frontends often share a set.
            let backends: Vec<u8> = (1..6).filter(|_| rng.below(3) == 0).collect();
            entries.push((port, backends));
        }
        let borrowed: Vec<(u16, &[u8])> = entries.iter().map(|(p, b)| (*p, b.as_slice())).collect();
        let d = desired(&borrowed);
        maps.services_capacity = (step % 7 == 3).then_some(3);
        maps.slot_blocks = (step % 5 == 2).then_some(8);
        if let Some(cap) = maps.slot_blocks {
            // A smaller map is a new one: the blocks beyond it are gone.
            maps.blocks.retain(|b, _| *b < cap);
        }
        if step % 11 == 5
            && let Some(v) = maps.state.services.get_mut(&frontend_key(&frontend(80)))
        {
            // An earlier agent's row naming blocks of garbage.
            v.table = 900;
            v.count = 3;
            v.members = 2;
            maps.blocks.insert(900, service_common::SlotBlock { ids: [7; 16] });
        }
        maps.refresh_tables();
        let mut r = with_clock(std::mem::take(&mut maps), &clock);
        watch.restart(r.programmed());
        watch.observe(&r, clock.now(), step);
        let mut clean = false;
        for _ in 0..=rng.below(3) {
            // Up to 1.5 grace periods.
            clock.advance(Duration::from_millis(rng.below(3_000)));
            if rng.below(3) == 0 {
                r.collect_deferred();
                same_state(&r, step, clean);
                watch.observe(&r, clock.now(), step);
                assert!(r.next_deferred().is_none_or(|at| at > clock.now()), "step {step}");
            }
            let report = r.reconcile(&d);
            clean = report.errors.is_empty();
            same_state(&r, step, clean);
            watch.observe(&r, clock.now(), step);
            r.check_deferred();
            if report.errors.is_empty() {
                for (port, backends) in &entries {
                    let v = r.programmed().services[&frontend_key(&frontend(*port))];
                    let live = r.programmed().live_pairs();
                    let reached: BTreeSet<u32> =
                        live.iter().filter(|(rn, _)| *rn == v.rev_nat_id).map(|(_, b)| *b).collect();
                    assert_eq!(reached.len(), backends.len(), "step {step} port {port}");
                    assert!(reached.iter().all(|b| r.is_live_pair(v.rev_nat_id, *b)));
                    // Every backend of a named table has its row.
                    assert!(reached.iter().all(|b| r.programmed().backends.contains_key(b)), "step {step}");
                }
                assert_eq!(r.programmed().services.len(), entries.len());
            }
        }
        maps = std::mem::take(&mut r.maps);
    }
    // Everything queued goes once the grace has passed.
    maps.services_capacity = None;
    maps.slot_blocks = None;
    let mut r = with_clock(maps, &clock);
    r.reconcile(&Desired::default());
    settle(&mut r, &clock);
    assert_eq!(r.maps().state, MapState { next_ids: r.maps().state.next_ids, ..MapState::default() });
}

/// The member list of `key`'s table: the backend ids of its set.
fn members(r: &Reconciler<FakeMaps>, key: &ServiceKey) -> BTreeSet<u32> {
    r.members(key).collect()
}

/// The backend ids the slots of `key`'s table name.
fn table_ids(r: &Reconciler<FakeMaps>, key: &ServiceKey) -> BTreeSet<u32> {
    let state = r.programmed();
    state.table_of(&state.services[key]).map(|t| t.slots.iter().copied().collect()).unwrap_or_default()
}

#[test]
fn the_member_list_is_the_backend_set_and_a_removed_backend_leaves_it_with_the_switch() {
    let clock = ManualClock::default();
    let mut r = with_clock(FakeMaps::default(), &clock);
    let key = frontend_key(&frontend(80));
    assert!(r.reconcile(&desired(&[(80, &[1, 2, 3])])).errors.is_empty());
    assert_eq!(members(&r, &key), table_ids(&r, &key));
    assert_eq!(members(&r, &key).len(), 3);
    let removed = r.programmed().backends.iter().find(|(_, b)| b.addr[3] == 3).map(|(id, _)| *id).unwrap();
    assert!(r.reconcile(&desired(&[(80, &[1, 2])])).errors.is_empty());
    // The switch to the new table takes the removed backend out of the
    // member list an affinity entry is checked against, in the same update.
    assert!(!members(&r, &key).contains(&removed));
    assert_eq!(members(&r, &key), table_ids(&r, &key));
    assert_eq!(r.programmed().services[&key].members, 2);
    settle(&mut r, &clock);
    assert_eq!(members(&r, &key), table_ids(&r, &key));
    // No backends: no table; the frontend gone: no rows at all.
    assert!(r.reconcile(&desired(&[(80, &[])])).errors.is_empty());
    let v = r.programmed().services[&key];
    assert_eq!((v.table, v.count, v.members), (0, 0, 0));
    assert!(members(&r, &key).is_empty());
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
            Arc::new(DesiredFrontend {
                service: ObjectRef { namespace: "default".into(), name: format!("{protocol:?}").into() },
                port_name: String::new(),
                frontend: f,
                kind: crate::model::FrontendKind::LoadBalancer,
                affinity_timeout_s: None,
                affinity_scope: None,
                source_ranges: ranges.iter().map(|c| c.parse::<Cidr>().unwrap()).collect(),
                masquerade: false,
                backends: vec![backend(1)],
                when_empty: WhenEmpty::Reject,
            }),
        );
    }
    // Only IPv6 ranges: not restricted in IPv4 (as kube-proxy filters them).
    let open = Frontend { addr: lb, port: 80, protocol: Protocol::Tcp, scope: Scope::External };
    let mut df = DesiredFrontend::clone(d.frontends.values().next().unwrap());
    df.frontend = open;
    df.source_ranges = vec!["::/0".parse::<Cidr>().unwrap()];
    d.frontends.insert(open, Arc::new(df));
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
        Arc::new(DesiredFrontend {
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
        }),
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
    // Room for one frontend row, not two.
    let mut r = Reconciler::new(FakeMaps::with_services_capacity(1)).expect("dump");
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

/// What a change ends is what makes the agent walk conntrack for stale
/// UDP flows: a backend leaving a frontend, or a frontend going; not a
/// backend joining, nor a frontend (re)written with the same backends.
#[test]
fn a_change_reports_the_frontend_backend_pairs_it_ended() {
    let mut r = reconciler();
    let changes =
        |ports: &[u16]| Changes { frontends: ports.iter().map(|p| frontend(*p)).collect(), ..Changes::default() };
    let first = r
        .reconcile_changes(&desired(&[(80, &[1, 2]), (81, &[1])]), &Changes { everything: true, ..Changes::default() });
    assert!(first.full && first.errors.is_empty());
    let joined = r.reconcile_changes(&desired(&[(80, &[1, 2, 3]), (81, &[1])]), &changes(&[80]));
    assert!(joined.changed() && !joined.full);
    assert_eq!(joined.pairs_ended, 0, "a backend joined");
    let left = r.reconcile_changes(&desired(&[(80, &[1, 3]), (81, &[1])]), &changes(&[80]));
    assert_eq!(left.pairs_ended, 1, "backend 2 left port 80");
    // Port 81 takes port 80's backends: a new table for it, its backend 1
    // kept, backend 3 joining.
    let moved = r.reconcile_changes(&desired(&[(80, &[1, 3]), (81, &[1, 3])]), &changes(&[81]));
    assert_eq!(moved.pairs_ended, 0);
    let gone = r.reconcile_changes(&desired(&[(80, &[1, 3])]), &changes(&[81]));
    assert_eq!(gone.pairs_ended, 2, "port 81 went with its two backends");
}
