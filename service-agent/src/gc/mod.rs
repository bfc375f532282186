//! The garbage collector of the connection-tracking and affinity maps.
//!
//! The programs never walk a map, so entries of flows that ended (or went
//! idle) stay until LRU eviction pushes them out, and an LRU map only evicts
//! when it is full: the collector frees them first, the way Cilium's agent
//! and netfilter's own GC worker do. It walks `conntrack`, `conntrack_new`
//! and `affinity` (and counts `fragments`) a batch of keys per tick, so a
//! pass over hundreds of thousands of entries is spread over seconds instead
//! of holding a core, and deletes:
//!
//! - conntrack entries (either map) that have been idle longer than their
//!   state's timeout (`service_common::conntrack::is_expired`), together
//!   with the other entry of their flow when that one has expired too
//!   ("closed" when the flow had ended with FINs or a RST, "expired"
//!   otherwise); a flow is only as dead as its freshest entry, so an expired
//!   entry whose peer still sees traffic is kept;
//! - affinity entries idle longer than their Service's
//!   `sessionAffinityConfig` timeout ("expired"), whose rev-NAT id no
//!   longer belongs to a frontend with ClientIP affinity ("orphaned"), or
//!   whose backend is no longer in that frontend's set
//!   ("backend_removed"; the programs do not follow such an entry either).
//!
//! It also counts the SNAT ports in use (reply entries of SNATed flows that
//! are not free) per (SNAT address, backend, protocol) group — each group
//! has [`SNAT_RANGE`] ports — and warns once per episode when the programs
//! start dropping new flows for lack of one (`drop_snat_no_port`).
//!
//! The decisions are pure functions of the entries and a clock
//! ([`judge_conntrack`], [`judge_affinity`], [`SnatUsage`], [`SnatAlarm`]),
//! unit-tested without root; the map I/O around them is thin.

mod metrics;

pub use self::metrics::GcMetrics;
pub(crate) use self::metrics::MapLabel;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, MapData};
use service_common::{
    AffinityKey, AffinityValue, CtKey, CtValue, FragKey, FragValue, ServiceKey, ServiceValue, conntrack, ct_flags,
    map_names, service_flags, snat_ports,
};

use crate::maps::{self, LoadError, MapSizes};

/// How often the collector wakes.
/// An expired conntrack entry is deleted only once it has been expired
/// this long: the programs already treat it as free, and a client reusing
/// its tuple right at the timeout replaces it themselves.
const DELETE_MARGIN_NS: u64 = 5_000_000_000;
pub const TICK: Duration = Duration::from_millis(200);
/// Keys looked at per tick, over all maps (about 3 syscalls each): at most
/// ~20,000 keys a second, a few percent of a core.
pub const BATCH: usize = 4_096;
/// A pass starts at most this often; a pass over full maps takes longer.
pub const MIN_PASS_INTERVAL: Duration = Duration::from_secs(5);
/// How often the SNAT drop counter is checked.
const SNAT_CHECK_TICKS: u32 = 5;
/// The ports one (SNAT address, backend, protocol) group can use.
pub const SNAT_RANGE: u32 = snat_ports::MAX as u32 - snat_ports::MIN as u32 + 1;

/// The maps the collector walks, in pass order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    /// `conntrack`: assured flows.
    Conntrack,
    /// `conntrack_new`: flows not yet assured.
    ConntrackNew,
    /// `affinity`: ClientIP session affinity.
    Affinity,
    /// `fragments`: only counted (its LRU ages entries out by itself).
    Fragments,
}

impl Table {
    pub const ALL: [Self; 4] = [Self::Conntrack, Self::ConntrackNew, Self::Affinity, Self::Fragments];

    #[must_use]
    pub const fn map_name(self) -> &'static str {
        match self {
            Self::Conntrack => map_names::CONNTRACK,
            Self::ConntrackNew => map_names::CONNTRACK_NEW,
            Self::Affinity => map_names::AFFINITY,
            Self::Fragments => map_names::FRAGMENTS,
        }
    }

    fn capacity(self, sizes: &MapSizes) -> u32 {
        match self {
            Self::Conntrack => sizes.conntrack,
            Self::ConntrackNew => sizes.conntrack_new,
            Self::Affinity => service_common::capacity::AFFINITY,
            Self::Fragments => sizes.fragments,
        }
    }
}

/// Why an entry was deleted (the `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// Idle longer than its timeout.
    Expired,
    /// A conntrack entry of a flow that ended (FINs both ways, or a RST),
    /// past its closing timeout.
    Closed,
    /// An affinity entry of a frontend that is gone or has no affinity.
    Orphaned,
    /// An affinity entry naming a backend its frontend no longer has.
    BackendRemoved,
}

impl Reason {
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::Closed => "closed",
            Self::Orphaned => "orphaned",
            Self::BackendRemoved => "backend_removed",
        }
    }
}

/// What to do with one conntrack entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtVerdict {
    /// Not expired.
    Live,
    /// Expired, but the other entry of its flow is not: the flow still sees
    /// traffic one way, and its replies need this entry.
    KeepForPeer,
    /// Delete it, and the other entry of its flow (`peer`) with it.
    Delete { reason: Reason, peer: bool },
}

/// The verdict on the entry `key` → `value` at `now_ns`, given what the
/// conntrack maps hold under its [`conntrack::peer_key`] (`peer`).
#[must_use]
pub fn judge_conntrack(key: &CtKey, value: &CtValue, peer: Option<&CtValue>, now_ns: u64) -> CtVerdict {
    if !conntrack::is_expired(value, key.proto, now_ns) {
        return CtVerdict::Live;
    }
    let reason = if conntrack::is_closed(key.proto, value.state) { Reason::Closed } else { Reason::Expired };
    let peer_key = conntrack::peer_key(key, value);
    match peer {
        // The peer's tuple now belongs to another flow (its own peer is not
        // this entry): leave that flow alone.
        Some(p) if conntrack::peer_key(&peer_key, p) != *key => CtVerdict::Delete { reason, peer: false },
        Some(p) if !conntrack::is_expired(p, key.proto, now_ns) => CtVerdict::KeepForPeer,
        Some(_) => CtVerdict::Delete { reason, peer: true },
        None => CtVerdict::Delete { reason, peer: false },
    }
}

/// One conntrack deletion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtDeletion {
    pub table: Table,
    pub key: CtKey,
    pub reason: Reason,
}

/// The deletions for a batch of entries of `table`, and how many of them
/// are live; `lookup` finds an entry in either conntrack map (a flow's two
/// entries live in the same map, but a flow being assured moves between
/// them).
pub fn plan_conntrack(
    table: Table,
    batch: &[(CtKey, CtValue)],
    lookup: impl Fn(&CtKey) -> Option<(Table, CtValue)>,
    now_ns: u64,
) -> (Vec<CtDeletion>, usize) {
    let mut out = Vec::new();
    let mut live = 0;
    let mut planned = BTreeSet::new();
    for (key, value) in batch {
        if planned.contains(key) {
            continue;
        }
        // Most entries are live: no lookup of their peer.
        if !conntrack::is_expired(value, key.proto, now_ns) {
            live += 1;
            continue;
        }
        let peer_key = conntrack::peer_key(key, value);
        let peer = lookup(&peer_key);
        match judge_conntrack(key, value, peer.as_ref().map(|(_, v)| v), now_ns) {
            CtVerdict::Live => live += 1,
            CtVerdict::KeepForPeer => {}
            CtVerdict::Delete { reason, peer: with_peer } => {
                out.push(CtDeletion { table, key: *key, reason });
                planned.insert(*key);
                if let (true, Some((peer_table, _))) = (with_peer, peer) {
                    out.push(CtDeletion { table: peer_table, key: peer_key, reason });
                    planned.insert(peer_key);
                }
            }
        }
    }
    (out, live)
}

/// What the affinity collector knows of the frontends: from the slot-0
/// rows of the `services` map, as the reconciler applied them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AffinityFrontends {
    /// (affinity scope, protocol) of frontends with ClientIP affinity →
    /// their timeout in seconds (the largest, should two frontends share
    /// it; every frontend of a Service port does).
    pub timeouts: BTreeMap<(u32, u8), u32>,
    /// The same frontends' backend ids (their member rows; the union over
    /// the frontends sharing the key).
    pub members: BTreeMap<(u32, u8), std::collections::BTreeSet<u32>>,
    /// `monotonic_ns()` when these rows were read: an entry used since then
    /// may belong to a frontend or backend written after, and is never
    /// judged orphaned or removed.
    pub as_of_ns: u64,
}

impl AffinityFrontends {
    /// From the frontend rows of the services map, and `members`, which
    /// gives a frontend's backend ids.
    pub fn from_rows<'a, M: IntoIterator<Item = u32>>(
        rows: impl IntoIterator<Item = (&'a ServiceKey, &'a ServiceValue)>,
        members: impl Fn(&ServiceKey) -> M,
        as_of_ns: u64,
    ) -> Self {
        let mut out = Self { as_of_ns, ..Self::default() };
        for (k, v) in rows {
            if v.flags & service_flags::AFFINITY != 0 {
                let scope = (v.affinity_scope, k.proto);
                let t = out.timeouts.entry(scope).or_insert(0);
                *t = (*t).max(v.affinity_timeout_s);
                out.members.entry(scope).or_default().extend(members(k));
            }
        }
        out
    }
}

/// Whether (and why) the affinity entry `key` → `value` goes at `now_ns`.
#[must_use]
pub fn judge_affinity(
    key: &AffinityKey,
    value: &AffinityValue,
    frontends: &AffinityFrontends,
    now_ns: u64,
) -> Option<Reason> {
    let frontend = (key.scope, key.proto);
    let stale = value.last_used_ns < frontends.as_of_ns;
    let Some(&timeout_s) = frontends.timeouts.get(&frontend) else {
        return stale.then_some(Reason::Orphaned);
    };
    if now_ns.saturating_sub(value.last_used_ns) > u64::from(timeout_s) * 1_000_000_000 {
        return Some(Reason::Expired);
    }
    let member = frontends.members.get(&frontend).is_some_and(|m| m.contains(&value.backend_id));
    (stale && !member).then_some(Reason::BackendRemoved)
}

/// A group of SNATed flows sharing one SNAT port range: the node address
/// they are SNATed to, the backend and the protocol (the reply tuple's
/// other parts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SnatGroup {
    pub family: u8,
    pub snat_addr: service_common::Addr,
    pub backend_addr: service_common::Addr,
    pub backend_port: service_common::Port,
    pub proto: u8,
}

impl std::fmt::Display for SnatGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::rows::render as dump;
        let backend =
            std::net::SocketAddr::new(dump::ip(self.family, &self.backend_addr), u16::from_be_bytes(self.backend_port));
        write!(f, "{} → {backend}/{}", dump::ip(self.family, &self.snat_addr), dump::proto_name(self.proto))
    }
}

/// SNAT ports in use, per group.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnatUsage {
    pub ports_in_use: u64,
    pub groups: BTreeMap<SnatGroup, u32>,
}

impl SnatUsage {
    /// Counts `key` → `value` when it holds a SNAT port: the reply entry
    /// (backend → this node's SNAT address and port) of a SNATed flow that
    /// is not free (expired or closed flows give their port back at once).
    /// A flow whose source port was only remapped (`snat_addr` is the
    /// client's own address) uses no port of this node.
    pub fn add(&mut self, key: &CtKey, value: &CtValue, now_ns: u64) {
        let snat_reply = ct_flags::REV_NAT | ct_flags::SNAT;
        if value.flags & snat_reply != snat_reply
            || key.daddr == value.snat_addr
            || conntrack::is_free(value, key.proto, now_ns)
        {
            return;
        }
        self.ports_in_use += 1;
        let group = SnatGroup {
            family: key.family,
            snat_addr: key.daddr,
            backend_addr: key.saddr,
            backend_port: key.sport,
            proto: key.proto,
        };
        *self.groups.entry(group).or_insert(0) += 1;
    }

    /// The group with the most ports in use.
    #[must_use]
    pub fn busiest(&self) -> Option<(SnatGroup, u32)> {
        self.groups.iter().max_by_key(|(g, n)| (**n, std::cmp::Reverse(**g))).map(|(g, n)| (*g, *n))
    }
}

/// Turns the `drop_snat_no_port` counter into one warning per episode of
/// drops: the first growth after a quiet check starts an episode (and is
/// reported); the episode lasts while the counter keeps growing.
#[derive(Clone, Copy, Debug, Default)]
pub struct SnatAlarm {
    last: Option<u64>,
    in_episode: bool,
}

impl SnatAlarm {
    /// Feeds the counter's current value; returns the flows dropped since
    /// the previous check when a new episode starts.
    pub fn observe(&mut self, dropped_total: u64) -> Option<u64> {
        let Some(last) = self.last.replace(dropped_total) else {
            // Drops counted before this agent started are not news.
            return None;
        };
        let grown = dropped_total.saturating_sub(last);
        if grown == 0 {
            self.in_episode = false;
            return None;
        }
        let starts = !self.in_episode;
        self.in_episode = true;
        starts.then_some(grown)
    }
}

/// What one completed pass found.
#[derive(Clone, Debug, Default)]
pub struct PassSummary {
    pub duration: Duration,
    /// Entries seen per map (for the occupancy metric).
    pub entries: BTreeMap<Table, u64>,
    /// Entries not expired (not deleted, not kept only for their peer).
    pub live: BTreeMap<Table, u64>,
    pub snat: SnatUsage,
}

/// A pass in progress.
struct Pass {
    started: Instant,
    stage: usize,
    ct_cursor: Option<CtKey>,
    affinity_cursor: Option<AffinityKey>,
    fragments_cursor: Option<FragKey>,
    /// Keys looked at in the current stage: a walk that keeps starting over
    /// (its cursor deleted under it) ends after twice the map's capacity.
    stage_scanned: u64,
    summary: PassSummary,
}

impl Pass {
    fn new(started: Instant) -> Self {
        Self {
            started,
            stage: 0,
            ct_cursor: None,
            affinity_cursor: None,
            fragments_cursor: None,
            stage_scanned: 0,
            summary: PassSummary::default(),
        }
    }
}

struct Maps {
    conntrack: HashMap<MapData, CtKey, CtValue>,
    conntrack_new: HashMap<MapData, CtKey, CtValue>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    fragments: HashMap<MapData, FragKey, FragValue>,
}

impl Maps {
    fn open(root: &std::path::Path) -> Result<Self, LoadError> {
        Ok(Self {
            conntrack: maps::open_hash(root, map_names::CONNTRACK)?,
            conntrack_new: maps::open_hash(root, map_names::CONNTRACK_NEW)?,
            affinity: maps::open_hash(root, map_names::AFFINITY)?,
            fragments: maps::open_hash(root, map_names::FRAGMENTS)?,
        })
    }

    fn ct(&self, table: Table) -> &HashMap<MapData, CtKey, CtValue> {
        if table == Table::ConntrackNew { &self.conntrack_new } else { &self.conntrack }
    }

    fn ct_mut(&mut self, table: Table) -> &mut HashMap<MapData, CtKey, CtValue> {
        if table == Table::ConntrackNew { &mut self.conntrack_new } else { &mut self.conntrack }
    }

    fn lookup_ct(&self, key: &CtKey) -> Option<(Table, CtValue)> {
        [Table::Conntrack, Table::ConntrackNew].into_iter().find_map(|t| self.ct(t).get(key, 0).ok().map(|v| (t, v)))
    }
}

/// A batch of a map walk.
struct Batch<K, V> {
    rows: Vec<(K, V)>,
    /// Keys looked at (rows deleted under the walk are not in `rows`).
    looked: usize,
    /// The walk reached the end of the map.
    done: bool,
}

/// Reads up to `budget` (key, value) rows of `map` after `cursor`.
fn read_batch<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    cursor: Option<K>,
    budget: usize,
) -> std::io::Result<Batch<K, V>> {
    let mut batch = Batch { rows: Vec::new(), looked: 0, done: false };
    let mut key = cursor;
    while batch.looked < budget {
        let Some(next) = maps::next_key(map, key.as_ref())? else {
            batch.done = true;
            break;
        };
        batch.looked += 1;
        // A key deleted since the walk found it is skipped.
        if let Ok(v) = map.get(&next, 0) {
            batch.rows.push((next, v));
        }
        key = Some(next);
    }
    Ok(batch)
}

/// Where a walk resumes after a batch: the last key of `rows` that is
/// still in the map (a deleted cursor would make the kernel start over),
/// or the old cursor when the batch deleted every row it read.
fn resume_after<K: Copy + Ord, V>(rows: &[(K, V)], deleted: &BTreeSet<K>, cursor: Option<K>) -> Option<K> {
    rows.iter().rev().map(|(k, _)| *k).find(|k| !deleted.contains(k)).or(cursor)
}

/// The collector: walks the pinned maps a batch at a time.
pub struct Collector {
    root: PathBuf,
    sizes: MapSizes,
    maps: Option<Maps>,
    frontends: tokio::sync::watch::Receiver<Option<Arc<AffinityFrontends>>>,
    metrics: GcMetrics,
    pass: Option<Pass>,
    last_pass_started: Option<Instant>,
    last_snat: SnatUsage,
    alarm: SnatAlarm,
    ticks: u32,
}

impl Collector {
    /// A collector over the maps pinned under `root`; `frontends` carries
    /// the affinity timeouts (`None` until the first sync: no affinity entry
    /// is judged before).
    #[must_use]
    pub fn new(
        root: PathBuf,
        sizes: MapSizes,
        frontends: tokio::sync::watch::Receiver<Option<Arc<AffinityFrontends>>>,
        metrics: GcMetrics,
    ) -> Self {
        Self {
            root,
            sizes,
            maps: None,
            frontends,
            metrics,
            pass: None,
            last_pass_started: None,
            last_snat: SnatUsage::default(),
            alarm: SnatAlarm::default(),
            ticks: 0,
        }
    }

    /// Runs a tick every [`TICK`] until the task is aborted; the map work of
    /// each tick runs on the blocking pool.
    pub async fn run(self) {
        let mut interval = tokio::time::interval(TICK);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut collector = self;
        loop {
            interval.tick().await;
            collector = match tokio::task::spawn_blocking(move || {
                collector.tick(Instant::now());
                collector
            })
            .await
            {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "the conntrack garbage collector stopped");
                    return;
                }
            };
        }
    }

    /// One tick: up to [`BATCH`] keys of the pass in progress (starting one
    /// when [`MIN_PASS_INTERVAL`] has passed), and the SNAT drop check.
    pub fn tick(&mut self, now: Instant) {
        self.ticks = self.ticks.wrapping_add(1);
        if self.maps.is_none() {
            match Maps::open(&self.root) {
                Ok(m) => self.maps = Some(m),
                Err(e) => {
                    if self.ticks == 1 {
                        tracing::warn!(error = %e, "conntrack garbage collector: opening the maps");
                    }
                    return;
                }
            }
        }
        if self.ticks % SNAT_CHECK_TICKS == 1 {
            self.check_snat_drops();
        }
        if self.pass.is_none() && self.last_pass_started.is_none_or(|t| now.duration_since(t) >= MIN_PASS_INTERVAL) {
            self.pass = Some(Pass::new(now));
            self.last_pass_started = Some(now);
        }
        let Some(mut pass) = self.pass.take() else { return };
        let mut budget = BATCH;
        while budget > 0 && pass.stage < Table::ALL.len() {
            let table = Table::ALL[pass.stage];
            let (looked, done) = match self.step(table, &mut pass, budget) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, map = table.map_name(), "conntrack garbage collector: walking a map");
                    (0, true)
                }
            };
            budget = budget.saturating_sub(looked.max(1));
            pass.stage_scanned += looked as u64;
            if done || pass.stage_scanned > 2 * u64::from(table.capacity(&self.sizes)) + BATCH as u64 {
                pass.stage += 1;
                pass.stage_scanned = 0;
            }
        }
        if pass.stage < Table::ALL.len() {
            self.pass = Some(pass);
            return;
        }
        pass.summary.duration = now.duration_since(pass.started);
        self.metrics.record_pass(&pass.summary);
        self.last_snat = pass.summary.snat;
    }

    /// Walks `budget` keys of `table`; returns the keys looked at and whether
    /// the walk is done.
    fn step(&mut self, table: Table, pass: &mut Pass, budget: usize) -> std::io::Result<(usize, bool)> {
        let Some(maps) = self.maps.as_mut() else { return Ok((0, true)) };
        let now_ns = maps::monotonic_ns();
        let name = table.map_name();
        match table {
            Table::Conntrack | Table::ConntrackNew => {
                let Batch { rows, looked, done } = read_batch(maps.ct(table), pass.ct_cursor, budget)?;
                for (k, v) in &rows {
                    pass.summary.snat.add(k, v, now_ns);
                }
                let (deletions, live) = plan_conntrack(table, &rows, |k| maps.lookup_ct(k), now_ns);
                let deleted: BTreeSet<CtKey> = deletions.iter().filter(|d| d.table == table).map(|d| d.key).collect();
                for d in &deletions {
                    // Judged on a copy read a moment ago: the programs may
                    // have replaced the expired entry with a new flow's
                    // since (a client reusing the tuple). Read it again and
                    // delete only what is still expired, and only once it
                    // has been for a while, which leaves a window of one
                    // syscall, not of a whole batch, and only for tuples
                    // idle for longer than their timeout plus the margin.
                    let still_expired = maps.ct(d.table).get(&d.key, 0).is_ok_and(|v| {
                        conntrack::is_expired(&v, d.key.proto, maps::monotonic_ns().saturating_sub(DELETE_MARGIN_NS))
                    });
                    if !still_expired {
                        continue;
                    }
                    match maps.ct_mut(d.table).remove(&d.key) {
                        Ok(()) => self.metrics.record_deleted(d.table.map_name(), d.reason.name()),
                        Err(e) if maps::is_not_found(&e) => {}
                        Err(e) => return Err(std::io::Error::other(e)),
                    }
                }
                // Resume after the last key that is still there.
                pass.ct_cursor = resume_after(&rows, &deleted, pass.ct_cursor);
                self.metrics.record_scanned(name, looked);
                *pass.summary.entries.entry(table).or_default() += rows.len() as u64;
                *pass.summary.live.entry(table).or_default() += live as u64;
                if done {
                    pass.ct_cursor = None;
                }
                Ok((looked, done))
            }
            Table::Affinity => {
                let frontends = self.frontends.borrow().clone();
                let Batch { rows, looked, done } = read_batch(&maps.affinity, pass.affinity_cursor, budget)?;
                let mut deleted = BTreeSet::new();
                let mut live = 0u64;
                for (k, v) in &rows {
                    let verdict = frontends.as_deref().and_then(|f| judge_affinity(k, v, f, now_ns));
                    let Some(reason) = verdict else {
                        live += 1;
                        continue;
                    };
                    match maps.affinity.remove(k) {
                        Ok(()) => self.metrics.record_deleted(name, reason.name()),
                        Err(e) if maps::is_not_found(&e) => {}
                        Err(e) => return Err(std::io::Error::other(e)),
                    }
                    deleted.insert(*k);
                }
                pass.affinity_cursor = resume_after(&rows, &deleted, pass.affinity_cursor);
                self.metrics.record_scanned(name, looked);
                *pass.summary.entries.entry(table).or_default() += rows.len() as u64;
                *pass.summary.live.entry(table).or_default() += live;
                if done {
                    pass.affinity_cursor = None;
                }
                Ok((looked, done))
            }
            Table::Fragments => {
                let Batch { rows, looked, done } = read_batch(&maps.fragments, pass.fragments_cursor, budget)?;
                pass.fragments_cursor = rows.last().map(|(k, _)| *k).or(pass.fragments_cursor);
                self.metrics.record_scanned(name, looked);
                *pass.summary.entries.entry(table).or_default() += rows.len() as u64;
                *pass.summary.live.entry(table).or_default() += rows.len() as u64;
                if done {
                    pass.fragments_cursor = None;
                }
                Ok((looked, done))
            }
        }
    }

    /// Warns once per episode of new flows dropped for lack of a SNAT port.
    fn check_snat_drops(&mut self) {
        let Ok(stats) = maps::read_stats(&self.root) else { return };
        let Some(&(_, dropped)) = stats.get(service_common::stats::Counter::DropSnatNoPort as usize) else { return };
        if let Some(grown) = self.alarm.observe(dropped) {
            let busiest = self.last_snat.busiest();
            tracing::warn!(
                dropped_flows = grown,
                snat_range = SNAT_RANGE,
                busiest_group = busiest.map(|(g, _)| g.to_string()),
                busiest_group_ports = busiest.map(|(_, n)| n),
                "new flows dropped: no free SNAT port (each SNAT address, backend and protocol has {SNAT_RANGE} \
                 ports, {}-{})",
                snat_ports::MIN,
                snat_ports::MAX
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use service_common::{
        FAMILY_IPV4, PROTO_TCP, PROTO_UDP, SCOPE_EXTERNAL, SCOPE_INTERNAL, addr_v4, conntrack::state, port_be,
    };

    use super::*;

    const S: u64 = 1_000_000_000;

    /// The two entries of a flow client:40000 → 10.96.0.1:80 DNATed to
    /// 10.244.1.5:8080 (and SNATed to 192.168.0.1:`snat_port` when set).
    fn flow(proto: u8, sport: u16, snat_port: Option<u16>, st: u8, seen: (u64, u64)) -> [(CtKey, CtValue); 2] {
        let client = CtKey {
            saddr: addr_v4([10, 0, 0, 1]),
            daddr: addr_v4([10, 96, 0, 1]),
            sport: port_be(sport),
            dport: port_be(80),
            proto,
            family: FAMILY_IPV4,
            _pad: [0; 2],
        };
        let mut original: CtValue = bytemuck::Zeroable::zeroed();
        original.flags = ct_flags::DNAT;
        original.nat_addr = addr_v4([10, 244, 1, 5]);
        original.nat_port = port_be(8080);
        original.state = st;
        original.last_seen_ns = seen.0;
        if let Some(p) = snat_port {
            original.flags |= ct_flags::SNAT;
            original.snat_addr = addr_v4([192, 168, 0, 1]);
            original.snat_port = port_be(p);
        }
        let reply_key = conntrack::peer_key(&client, &original);
        let mut reply: CtValue = bytemuck::Zeroable::zeroed();
        reply.flags = ct_flags::REV_NAT | (original.flags & ct_flags::SNAT);
        reply.nat_addr = client.daddr;
        reply.nat_port = client.dport;
        if snat_port.is_some() {
            reply.snat_addr = client.saddr;
            reply.snat_port = client.sport;
        }
        reply.state = st;
        reply.last_seen_ns = seen.1;
        [(client, original), (reply_key, reply)]
    }

    fn plan(
        assured: &BTreeMap<CtKey, CtValue>,
        new: &BTreeMap<CtKey, CtValue>,
        now: u64,
    ) -> (Vec<CtDeletion>, usize, usize) {
        let lookup = |k: &CtKey| {
            assured.get(k).map(|v| (Table::Conntrack, *v)).or_else(|| new.get(k).map(|v| (Table::ConntrackNew, *v)))
        };
        let a: Vec<_> = assured.iter().map(|(k, v)| (*k, *v)).collect();
        let n: Vec<_> = new.iter().map(|(k, v)| (*k, *v)).collect();
        let (mut out, live_a) = plan_conntrack(Table::Conntrack, &a, lookup, now);
        let (more, live_n) = plan_conntrack(Table::ConntrackNew, &n, lookup, now);
        out.extend(more);
        (out, live_a, live_n)
    }

    #[test]
    fn expired_flows_go_with_both_entries_live_ones_stay() {
        let est = state::SEEN_REPLY | state::ASSURED;
        let closed = est | state::FIN_ORIGINAL | state::FIN_REPLY;
        let now = 1_000 * S;
        let mut assured = BTreeMap::new();
        // Established, fresh both ways.
        assured.extend(flow(PROTO_TCP, 40_000, None, est, (now - S, now - S)));
        // Ended with FINs both ways, past time-wait (10 s).
        let ended = flow(PROTO_TCP, 40_001, None, closed, (now - 11 * S, now - 11 * S));
        assured.extend(ended);
        // Ended, still in time-wait: stragglers are still translated.
        assured.extend(flow(PROTO_TCP, 40_002, None, closed, (now - 5 * S, now - 5 * S)));
        let mut new = BTreeMap::new();
        // An unanswered UDP flow idle past 30 s.
        let udp = flow(PROTO_UDP, 40_003, None, 0, (now - 31 * S, now - 31 * S));
        new.extend(udp);
        // A UDP stream sending one way only: its reply entry is stale, the
        // flow is not.
        new.extend(flow(PROTO_UDP, 40_004, None, state::SEEN_REPLY | state::ASSURED, (now - S, now - 500 * S)));
        let (out, live_a, live_n) = plan(&assured, &new, now);
        let got: BTreeSet<(Table, CtKey, Reason)> = out.iter().map(|d| (d.table, d.key, d.reason)).collect();
        let want: BTreeSet<(Table, CtKey, Reason)> = [
            (Table::Conntrack, ended[0].0, Reason::Closed),
            (Table::Conntrack, ended[1].0, Reason::Closed),
            (Table::ConntrackNew, udp[0].0, Reason::Expired),
            (Table::ConntrackNew, udp[1].0, Reason::Expired),
        ]
        .into();
        assert_eq!(got, want);
        assert_eq!(out.len(), 4, "each entry deleted once: {out:?}");
        assert_eq!((live_a, live_n), (4, 1));
    }

    #[test]
    fn an_expired_entry_whose_peer_is_gone_or_reused_goes_alone() {
        let now = 1_000 * S;
        let [(ck, cv), (rk, _)] = flow(PROTO_UDP, 40_000, None, 0, (now - 31 * S, 0));
        assert_eq!(judge_conntrack(&ck, &cv, None, now), CtVerdict::Delete { reason: Reason::Expired, peer: false });
        // The reply tuple now belongs to another, fresh flow whose own peer
        // is another client.
        let [_, (reused_key, mut reused_value)] = flow(PROTO_UDP, 40_000, None, 0, (now, now));
        assert_eq!(reused_key, rk);
        reused_value.nat_port = port_be(81);
        assert_eq!(
            judge_conntrack(&ck, &cv, Some(&reused_value), now),
            CtVerdict::Delete { reason: Reason::Expired, peer: false }
        );
        // Not expired: live, whatever the peer.
        assert_eq!(judge_conntrack(&ck, &cv, None, now - 10 * S), CtVerdict::Live);
    }

    #[test]
    fn affinity_goes_after_its_timeout_or_with_its_frontend() {
        let key0 = ServiceKey::frontend(FAMILY_IPV4, addr_v4([10, 96, 0, 1]), port_be(80), PROTO_TCP, SCOPE_INTERNAL);
        let sticky = ServiceValue {
            table: 1,
            count: 31,
            members: 2,
            // The affinity scope: the ClusterIP's own rev-NAT id.
            affinity_scope: 7,
            rev_nat_id: 7,
            affinity_timeout_s: 600,
            flags: service_flags::AFFINITY,
            _pad: 0,
        };
        let plain = ServiceValue { rev_nat_id: 8, affinity_timeout_s: 0, flags: 0, ..sticky };
        let key1 = ServiceKey { port: port_be(81), ..key0 };
        // A NodePort of the same Service port: its own rev-NAT id, the
        // ClusterIP's scope, a shorter timeout, a local endpoint only.
        let node_port_key =
            ServiceKey::frontend(FAMILY_IPV4, addr_v4([192, 168, 0, 2]), port_be(30080), PROTO_TCP, SCOPE_EXTERNAL);
        let node_port = ServiceValue { rev_nat_id: 9, affinity_timeout_s: 300, ..sticky };
        let rows = [(key0, sticky), (key1, plain), (node_port_key, node_port)];
        let now = 10_000 * S;
        let members = |k: &ServiceKey| match k {
            k if *k == key0 => vec![3, 4],
            k if *k == node_port_key => vec![6],
            _ => vec![5],
        };
        let f = AffinityFrontends::from_rows(rows.iter().map(|(k, v)| (k, v)), members, now - 5 * S);
        assert_eq!(f.timeouts, BTreeMap::from([((7, PROTO_TCP), 600)]));
        let key = |scope, proto| AffinityKey { client: addr_v4([10, 0, 0, 1]), scope, proto, _pad: [0; 3] };
        let used = |ago: u64| AffinityValue { backend_id: 3, _pad: 0, last_used_ns: now - ago * S };
        assert_eq!(judge_affinity(&key(7, PROTO_TCP), &used(599), &f, now), None);
        assert_eq!(judge_affinity(&key(7, PROTO_TCP), &used(601), &f, now), Some(Reason::Expired));
        // UDP of the same port has no affinity row: orphaned.
        assert_eq!(judge_affinity(&key(7, PROTO_UDP), &used(10), &f, now), Some(Reason::Orphaned));
        // A frontend without affinity, a scope no frontend has (the
        // NodePort's own rev-NAT id names none).
        assert_eq!(judge_affinity(&key(8, PROTO_TCP), &used(10), &f, now), Some(Reason::Orphaned));
        assert_eq!(judge_affinity(&key(9, PROTO_TCP), &used(10), &f, now), Some(Reason::Orphaned));
        // Used after the rows were read: perhaps a frontend written since.
        assert_eq!(judge_affinity(&key(9, PROTO_TCP), &used(1), &f, now), None);
        // The NodePort's endpoint is a member of the Service port's set.
        assert_eq!(judge_affinity(&key(7, PROTO_TCP), &AffinityValue { backend_id: 6, ..used(10) }, &f, now), None);
        // A backend the frontend no longer has (and not one added since).
        let gone = AffinityValue { backend_id: 9, ..used(10) };
        assert_eq!(judge_affinity(&key(7, PROTO_TCP), &gone, &f, now), Some(Reason::BackendRemoved));
        assert_eq!(judge_affinity(&key(7, PROTO_TCP), &AffinityValue { backend_id: 9, ..used(1) }, &f, now), None);
        assert_eq!(judge_affinity(&key(7, PROTO_TCP), &AffinityValue { backend_id: 4, ..used(10) }, &f, now), None);
    }

    #[test]
    fn snat_ports_are_counted_per_address_backend_and_protocol() {
        let est = state::SEEN_REPLY | state::ASSURED;
        let now = 1_000 * S;
        let mut usage = SnatUsage::default();
        let mut entries = Vec::new();
        for (i, port) in (61_000..61_005).enumerate() {
            let sport = 40_000 + u16::try_from(i).expect("small");
            entries.extend(flow(PROTO_TCP, sport, Some(port), est, (now, now)));
        }
        // UDP to the same backend port: another group.
        entries.extend(flow(PROTO_UDP, 50_000, Some(61_000), est, (now, now)));
        // A closed flow gives its port back; an unSNATed flow has none.
        let closed = est | state::RST;
        entries.extend(flow(PROTO_TCP, 50_001, Some(61_100), closed, (now, now)));
        entries.extend(flow(PROTO_TCP, 50_002, None, est, (now, now)));
        // A flow whose source port was only remapped (the client's own
        // address) uses no port of this node.
        let [(ck, mut cv), (_, mut rv)] = flow(PROTO_TCP, 50_003, Some(1_024), est, (now, now));
        cv.snat_addr = ck.saddr;
        let remap_reply_key = conntrack::peer_key(&ck, &cv);
        rv.snat_addr = ck.saddr;
        entries.push((remap_reply_key, rv));
        for (k, v) in &entries {
            usage.add(k, v, now);
        }
        assert_eq!(usage.ports_in_use, 6);
        assert_eq!(usage.groups.len(), 2);
        let (group, n) = usage.busiest().expect("a group");
        assert_eq!((group.proto, n), (PROTO_TCP, 5));
        assert_eq!(group.to_string(), "192.168.0.1 → 10.244.1.5:8080/TCP");
        assert_eq!(SNAT_RANGE, 4_536);
    }

    #[test]
    fn snat_drops_warn_once_per_episode() {
        let mut alarm = SnatAlarm::default();
        // Drops before the agent started are only the baseline.
        assert_eq!(alarm.observe(100), None);
        assert_eq!(alarm.observe(100), None);
        assert_eq!(alarm.observe(130), Some(30));
        assert_eq!(alarm.observe(170), None, "the same episode");
        assert_eq!(alarm.observe(170), None);
        assert_eq!(alarm.observe(171), Some(1), "a new episode");
    }
}
