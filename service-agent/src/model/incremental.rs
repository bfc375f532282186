//! The incremental model: [`super::desired`] kept up to date by recomputing
//! only the Services whose inputs changed.
//!
//! A Service's frontends depend on its own object, its EndpointSlices and
//! the node context, and on nothing else except where two Services claim
//! one frontend (the first, in [`ObjectRef`] order, gets it). So each
//! Service's own output ([`ServiceOutput`]: its claims, its errors, its
//! health check) is kept, and the claims of every frontend are indexed:
//! a change recomputes the Services it touches, withdraws their old claims
//! and adds the new ones, and re-decides only the frontends those claims
//! name. What is derived from the served frontends (the ClusterIPs'
//! `unserved` rows, health checks, "already served" errors) follows the
//! frontends that changed hands.
//!
//! The changed objects are found by diffing the last snapshot's maps with
//! the new ones ([`crate::vocabulary::ObjectMap`], persistent maps): the
//! subtrees both share are skipped, so one changed object costs O(log n)
//! to find, not a walk over every key; objects are compared by value only
//! where their allocations differ.
//!
//! The result always equals `desired` on the same snapshot (a property
//! test applies random changes and compares after every step).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use foldhash::HashMap;
use k8s_openapi::api::{core::v1::Service, networking::v1::ServiceCIDR};

use super::{
    Desired, Frontend, FrontendClaim, FrontendKind, HealthOutcome, ModelError, NodeContext, Scope, ServiceOutput,
    WhenEmpty, node_with_zone, service_cidr_objects, service_frontends, slice_service,
};
use crate::vocabulary::{Cidr, ObjectMap, ObjectRef, Objects, Slice, changed_keys};

/// What one [`Model::update`] changed in the model's [`Desired`]; the
/// reconciler compares only these with what it wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// The first update: everything is new, compare all of it.
    pub everything: bool,
    /// Frontends added, changed or removed (it may name some that ended
    /// up unchanged).
    pub frontends: BTreeSet<Frontend>,
    /// `unserved` entries added, changed or removed (likewise).
    pub unserved: BTreeSet<Cidr>,
}

impl Changes {
    /// Whether nothing changed.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        !self.everything && self.frontends.is_empty() && self.unserved.is_empty()
    }
}

/// One claim of a frontend: which Service, and which of its claims.
/// Ordered as `desired` takes them: by Service, then in the Service's
/// order.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ClaimRef {
    service: ObjectRef,
    index: usize,
}

/// What a Service asked for from its inputs as last seen.
#[derive(Debug)]
struct ServiceState {
    output: ServiceOutput,
}

/// The model, kept from one snapshot to the next: [`Model::update`] with
/// each new snapshot, [`Model::desired`] for the result.
#[derive(Debug, Default)]
pub struct Model {
    /// Whether an update ran.
    started: bool,
    /// The node context, with the Node object's zone.
    node: NodeContext,
    services: BTreeMap<ObjectRef, ServiceState>,
    /// The last snapshot's Services and EndpointSlices (O(1) clones of its
    /// maps): the next snapshot is diffed with them.
    seen_services: ObjectMap<Service>,
    seen_slices: ObjectMap<Slice>,
    /// The Service each EndpointSlice belongs to, as last seen.
    slice_owner: HashMap<ObjectRef, ObjectRef>,
    /// Each Service's slices, in the order `desired` reads them (by key; a
    /// sorted vector: most Services have one slice, and a B-tree map
    /// allocates a node for eleven).
    slices_of: HashMap<ObjectRef, Vec<(ObjectRef, Arc<Slice>)>>,
    service_cidrs: BTreeMap<String, ServiceCIDR>,
    /// The service CIDRs (flags and ServiceCIDR objects): `unserved` drops.
    drop_cidrs: Vec<Cidr>,
    /// What is wrong with the ServiceCIDR objects.
    cidr_errors: Vec<ModelError>,
    /// Every frontend's claims, in order: the first is served.
    claimants: HashMap<Frontend, Vec<ClaimRef>>,
    /// Per Service, how many of its external frontends (other than the
    /// ClusterIP's twin) are served: its health check is, when any is.
    external_served: HashMap<ObjectRef, usize>,
    /// Per ClusterIP, how many internal ClusterIP frontends of it are
    /// served: its `unserved` entry rejects while any is.
    cluster_ips: HashMap<IpAddr, usize>,
    /// ClusterIPs whose count changed in this update.
    cluster_ips_dirty: BTreeSet<IpAddr>,
    /// The health check (or its error) each Service has in the result.
    health_applied: HashMap<ObjectRef, HealthOutcome>,
    /// Services whose health check may have to change.
    health_dirty: BTreeSet<ObjectRef>,
    /// Every error, with how many places report it (`desired` reports
    /// each once).
    errors: BTreeMap<ModelError, usize>,
    errors_dirty: bool,
    desired: Desired,
    /// Services computed since the model was created.
    recomputed: usize,
}

impl Model {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The desired state of the last snapshot given to [`Self::update`].
    #[must_use]
    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// How many Services were computed since the model was created (one
    /// EndpointSlice change computes its one Service).
    #[must_use]
    pub fn recomputed(&self) -> usize {
        self.recomputed
    }

    /// Brings [`Self::desired`] to `objects` and `node`, recomputing the
    /// Services whose object or slices changed (every one when the node
    /// context did), and says what changed.
    pub fn update(&mut self, objects: &Objects, node: &NodeContext) -> Changes {
        let mut changes = Changes { everything: !self.started, ..Changes::default() };
        self.started = true;
        let node = node_with_zone(objects, node);
        let mut dirty: BTreeSet<ObjectRef> = BTreeSet::new();
        let node_changed = node != self.node;
        if node_changed {
            self.node = node;
            dirty.extend(self.services.keys().cloned());
        }
        if node_changed || self.service_cidrs != objects.service_cidrs {
            self.service_cidrs.clone_from(&objects.service_cidrs);
            self.set_drop_cidrs(&mut changes);
        }
        self.diff_slices(objects, &mut dirty);
        dirty.extend(changed_keys(&self.seen_services, &objects.services));
        self.seen_services = objects.services.clone();
        for key in dirty {
            self.recompute(&key, objects.services.get(&key), &mut changes);
        }
        self.refresh_health();
        self.refresh_unserved(&mut changes);
        if std::mem::take(&mut self.errors_dirty) {
            self.desired.errors = self.errors.keys().cloned().collect();
        }
        changes
    }

    /// Follows the slices that were added, replaced or deleted; marks the
    /// Services they belonged and belong to.
    fn diff_slices(&mut self, objects: &Objects, dirty: &mut BTreeSet<ObjectRef>) {
        let changed = changed_keys(&self.seen_slices, &objects.endpoint_slices);
        self.seen_slices = objects.endpoint_slices.clone();
        for key in changed {
            if let Some(service) = self.slice_owner.remove(&key) {
                if let Some(of) = self.slices_of.get_mut(&service) {
                    if let Ok(at) = of.binary_search_by(|(k, _)| k.cmp(&key)) {
                        of.remove(at);
                    }
                    if of.is_empty() {
                        self.slices_of.remove(&service);
                    }
                }
                dirty.insert(service);
            }
            if let Some(slice) = objects.endpoint_slices.get(&key) {
                let service = slice_service(&key, slice);
                if let Some(service) = service {
                    let of = self.slices_of.entry(service.clone()).or_insert_with(|| Vec::with_capacity(1));
                    match of.binary_search_by(|(k, _)| k.cmp(&key)) {
                        Ok(at) => of[at].1 = Arc::clone(slice),
                        Err(at) => of.insert(at, (key.clone(), Arc::clone(slice))),
                    }
                    dirty.insert(service.clone());
                    self.slice_owner.insert(key, service);
                }
            }
        }
    }

    /// The service CIDRs again (the node context or a ServiceCIDR object
    /// changed); `unserved` rebuilt when they differ.
    fn set_drop_cidrs(&mut self, changes: &mut Changes) {
        let mut errors = Vec::new();
        let drops: Vec<Cidr> = self
            .node
            .service_cidrs
            .iter()
            .copied()
            .chain(service_cidr_objects(&self.service_cidrs, &mut errors))
            .collect();
        for e in std::mem::take(&mut self.cidr_errors) {
            self.remove_error(&e);
        }
        for e in &errors {
            self.add_error(e.clone());
        }
        self.cidr_errors = errors;
        if drops == self.drop_cidrs {
            return;
        }
        self.drop_cidrs = drops;
        changes.unserved.extend(self.desired.unserved.keys().copied());
        self.desired.unserved.clear();
        for cidr in &self.drop_cidrs {
            self.desired.unserved.insert(*cidr, WhenEmpty::Drop);
        }
        for addr in self.cluster_ips.keys() {
            self.desired.unserved.insert(Cidr::host(*addr), WhenEmpty::Reject);
        }
        changes.unserved.extend(self.desired.unserved.keys().copied());
    }

    /// Computes Service `key` again (`None`: it is gone) and replaces its
    /// claims, re-deciding the frontends they name.
    fn recompute(&mut self, key: &ObjectRef, service: Option<&Arc<Service>>, changes: &mut Changes) {
        let new = service.map(|service| {
            self.recomputed += 1;
            let slices: Vec<&Slice> =
                self.slices_of.get(key).map(|of| of.iter().map(|(_, s)| s.as_ref()).collect()).unwrap_or_default();
            ServiceState { output: service_frontends(key, service, &slices, &self.node) }
        });
        if let (Some(old), Some(new)) = (self.services.get(key), &new)
            && old.output == new.output
        {
            return;
        }
        let frontends_of = |state: Option<&ServiceState>| -> Vec<Frontend> {
            state.map(|s| s.output.claims.iter().map(|c| c.df.frontend).collect()).unwrap_or_default()
        };
        let old_frontends = frontends_of(self.services.get(key));
        let touched: BTreeSet<Frontend> = old_frontends.iter().copied().chain(frontends_of(new.as_ref())).collect();
        for f in &touched {
            self.withdraw(*f);
        }
        if let Some(old) = self.services.remove(key) {
            for e in &old.output.errors {
                self.remove_error(e);
            }
        }
        for f in &old_frontends {
            if let Some(list) = self.claimants.get_mut(f) {
                list.retain(|c| c.service != *key);
                if list.is_empty() {
                    self.claimants.remove(f);
                }
            }
        }
        if let Some(new) = new {
            for e in &new.output.errors {
                self.add_error(e.clone());
            }
            for (index, claim) in new.output.claims.iter().enumerate() {
                // Most frontends have one claim: no room for four.
                let list = self.claimants.entry(claim.df.frontend).or_insert_with(|| Vec::with_capacity(1));
                let claim = ClaimRef { service: key.clone(), index };
                let at = list.binary_search(&claim).unwrap_or_else(|at| at);
                list.insert(at, claim);
            }
            self.services.insert(key.clone(), new);
        }
        self.health_dirty.insert(key.clone());
        for f in touched {
            self.contribute(f, changes);
        }
    }

    /// The claims of frontend `f`, the served one first.
    fn claims_of(&self, f: &Frontend) -> Vec<&FrontendClaim> {
        let list = self.claimants.get(f).map_or(&[][..], Vec::as_slice);
        list.iter().map(|c| &self.services[&c.service].output.claims[c.index]).collect()
    }

    /// What frontend `f`'s claims add to the result besides the frontend
    /// itself: the errors (the served claim's SCTP one, "already served"
    /// for the others), the Service whose external frontend it is, the
    /// ClusterIP it serves.
    fn derived(&self, f: &Frontend) -> Option<Derived> {
        let claims = self.claims_of(f);
        let (served, others) = claims.split_first()?;
        let mut errors: Vec<ModelError> = served.sctp_error.iter().map(|e| (**e).clone()).collect();
        errors.extend(others.iter().map(|c| c.conflict(&served.df)));
        let df = &served.df;
        Some(Derived {
            errors,
            external_of: served.is_external().then(|| df.service.clone()),
            cluster_ip: (df.kind == FrontendKind::ClusterIp && df.frontend.scope == Scope::Internal)
                .then_some(df.frontend.addr),
        })
    }

    /// Takes what frontend `f`'s claims derived out of the result (before
    /// they change).
    fn withdraw(&mut self, f: Frontend) {
        let Some(derived) = self.derived(&f) else { return };
        for e in &derived.errors {
            self.remove_error(e);
        }
        if let Some(service) = derived.external_of {
            if let Some(n) = self.external_served.get_mut(&service) {
                *n -= 1;
                if *n == 0 {
                    self.external_served.remove(&service);
                }
            }
            self.health_dirty.insert(service);
        }
        if let Some(addr) = derived.cluster_ip {
            self.count_cluster_ip(addr, false);
        }
    }

    /// Serves frontend `f` from its first claim (or removes it) and adds
    /// what its claims derive.
    fn contribute(&mut self, f: Frontend, changes: &mut Changes) {
        changes.frontends.insert(f);
        let Some(derived) = self.derived(&f) else {
            self.desired.frontends.remove(&f);
            return;
        };
        let served = self.claims_of(&f)[0].df.clone();
        self.desired.frontends.insert(f, served);
        for e in derived.errors {
            self.add_error(e);
        }
        if let Some(service) = derived.external_of {
            *self.external_served.entry(service.clone()).or_default() += 1;
            self.health_dirty.insert(service);
        }
        if let Some(addr) = derived.cluster_ip {
            self.count_cluster_ip(addr, true);
        }
    }

    /// One more (`up`) or one fewer internal ClusterIP frontend of `addr`
    /// served.
    fn count_cluster_ip(&mut self, addr: IpAddr, up: bool) {
        let n = self.cluster_ips.entry(addr).or_default();
        *n = if up { *n + 1 } else { n.saturating_sub(1) };
        if *n == 0 {
            self.cluster_ips.remove(&addr);
        }
        self.cluster_ips_dirty.insert(addr);
    }

    /// Gives each ClusterIP whose count changed its `unserved` entry: it
    /// rejects while a frontend of it is served; else a service CIDR of its
    /// own address drops, or it has none.
    fn refresh_unserved(&mut self, changes: &mut Changes) {
        for addr in std::mem::take(&mut self.cluster_ips_dirty) {
            let host = Cidr::host(addr);
            let want = if self.cluster_ips.contains_key(&addr) {
                Some(WhenEmpty::Reject)
            } else {
                self.drop_cidrs.contains(&host).then_some(WhenEmpty::Drop)
            };
            if self.desired.unserved.get(&host) == want.as_ref() {
                continue;
            }
            match want {
                Some(when) => self.desired.unserved.insert(host, when),
                None => self.desired.unserved.remove(&host),
            };
            changes.unserved.insert(host);
        }
    }

    /// Gives each Service marked since the last time the health check it
    /// should have now.
    fn refresh_health(&mut self) {
        for key in std::mem::take(&mut self.health_dirty) {
            let served = self.external_served.contains_key(&key);
            let want = if served { self.services.get(&key).and_then(|s| s.output.health.clone()) } else { None };
            if self.health_applied.get(&key) == want.as_ref() {
                continue;
            }
            match self.health_applied.remove(&key) {
                Some(Ok(_)) => {
                    self.desired.health_checks.remove(&key);
                }
                Some(Err(e)) => self.remove_error(&e),
                None => {}
            }
            match want {
                Some(Ok(check)) => {
                    self.desired.health_checks.insert(key.clone(), check.clone());
                    self.health_applied.insert(key, Ok(check));
                }
                Some(Err(e)) => {
                    self.add_error((*e).clone());
                    self.health_applied.insert(key, Err(e));
                }
                None => {}
            }
        }
    }

    fn add_error(&mut self, e: ModelError) {
        let n = self.errors.entry(e).or_default();
        *n += 1;
        self.errors_dirty |= *n == 1;
    }

    fn remove_error(&mut self, e: &ModelError) {
        if let Some(n) = self.errors.get_mut(e) {
            *n -= 1;
            if *n == 0 {
                self.errors.remove(e);
                self.errors_dirty = true;
            }
        }
    }
}

/// What a frontend's claims add to the result besides the frontend.
struct Derived {
    errors: Vec<ModelError>,
    /// The Service whose external frontend (other than the ClusterIP's
    /// twin) is served.
    external_of: Option<ObjectRef>,
    /// The address of a served internal ClusterIP frontend.
    cluster_ip: Option<IpAddr>,
}

#[cfg(test)]
mod tests;
