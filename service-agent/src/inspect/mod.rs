//! `service-agent inspect` and `explain`: readable views straight from the
//! pinned maps, in the spirit of `cilium bpf lb list` and `kubectl get
//! endpoints`. [`Pins`] opens every map once and reads the views from it;
//! how the rows look is `rows::render`'s. The JSON output (`-o json`) is the
//! same data, with field names that are kept stable (documented in
//! README.md).

mod explain;

use std::path::Path;

use service_common::{CtKey, CtValue, FAMILY_IPV4};

pub use self::explain::{Entry, explain};
use crate::{
    attach,
    maps::{self, LoadError, MapError, MapIo as _, MapSizes, MapState, PinnedMaps, Readers},
    rows::render::{
        self, AffinityRow, BackendRow, ConntrackRow, ServiceRow, StatRow, backend_row, endpoint, ip, proto_name,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("reading the pinned maps: {0}")]
    Load(#[from] LoadError),
    #[error("reading the pinned maps: {0}")]
    Map(#[from] MapError),
    #[error("{0}")]
    Usage(String),
}

/// What `inspect` shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum View {
    Services,
    Backends,
    Conntrack,
    Affinity,
    Stats,
    /// Which programs are attached to which interfaces (run it in the
    /// node's network namespace).
    Interfaces,
    /// The socket path: `--socket-lb`, its cgroup hooks, the calls it
    /// translated per frontend, and the sockets it translated.
    Sockets,
}

/// The pinned maps of one node, opened once, and the rows the agent
/// programmed, read once.
pub struct Pins {
    /// The reconciler's rows (frontends, backends, rev-NAT, source ranges).
    pub programmed: MapState,
    readers: Readers,
}

impl Pins {
    /// Opens the maps pinned under `root`.
    ///
    /// # Errors
    /// When a pin is missing or unreadable.
    pub fn open(root: &Path) -> Result<Self, InspectError> {
        Ok(Self { programmed: PinnedMaps::open(root, MapSizes::default())?.dump()?, readers: Readers::open(root)? })
    }

    /// The frontends with their backends and packet counts.
    ///
    /// # Errors
    /// When the counters cannot be read.
    pub fn services(&self) -> Result<Vec<ServiceRow>, InspectError> {
        let mut rows = render::services(&self.programmed);
        let (svc, be) = (self.readers.service_counters()?, self.readers.backend_counters()?);
        for r in &mut rows {
            let c = svc.get(&r.rev_nat_id).copied().unwrap_or_default();
            (r.packets, r.bytes) = (c.packets, c.bytes);
            for (b, _) in &mut r.backends {
                let c = be.get(&b.id).copied().unwrap_or_default();
                (b.packets, b.bytes) = (c.packets, c.bytes);
            }
        }
        Ok(rows)
    }

    /// The backends with their packet counts.
    ///
    /// # Errors
    /// When the counters cannot be read.
    pub fn backends(&self) -> Result<Vec<BackendRow>, InspectError> {
        let be = self.readers.backend_counters()?;
        Ok(self
            .programmed
            .backends
            .iter()
            .map(|(id, b)| {
                let mut row = backend_row(*id, b);
                let c = be.get(id).copied().unwrap_or_default();
                (row.packets, row.bytes) = (c.packets, c.bytes);
                row
            })
            .collect())
    }

    /// Both conntrack maps' entries, each with the name of its table
    /// ("assured": `conntrack`, "new": `conntrack_new`).
    ///
    /// # Errors
    /// When a map cannot be read.
    pub fn conntrack_entries(&self) -> Result<Vec<(&'static str, CtKey, CtValue)>, InspectError> {
        let mut out: Vec<_> = self.readers.conntrack()?.into_iter().map(|(k, v)| ("assured", k, v)).collect();
        out.extend(self.readers.conntrack_new()?.into_iter().map(|(k, v)| ("new", k, v)));
        Ok(out)
    }

    /// Conntrack entries of both tables (assured flows, then new ones).
    ///
    /// # Errors
    /// When a map cannot be read.
    pub fn conntrack(&self) -> Result<Vec<ConntrackRow>, InspectError> {
        let now = maps::monotonic_ns();
        Ok(self
            .conntrack_entries()?
            .into_iter()
            .map(|(table, k, v)| render::conntrack_row(table, &k, &v, now))
            .collect())
    }

    /// ClientIP affinity entries.
    ///
    /// # Errors
    /// When the map cannot be read.
    pub fn affinity(&self) -> Result<Vec<AffinityRow>, InspectError> {
        let now = maps::monotonic_ns();
        let state = &self.programmed;
        Ok(self
            .readers
            .affinity()?
            .into_iter()
            .map(|(k, v)| AffinityRow {
                // The key has no family: the client's is the Service
                // port's, that of its scope's rev-NAT row.
                client: ip(state.rev_nat.get(&k.scope).map_or(FAMILY_IPV4, |r| r.family), &k.client).to_string(),
                scope: k.scope,
                service_port: state
                    .rev_nat
                    .get(&k.scope)
                    .map_or_else(|| "?".into(), |r| endpoint(r.family, &r.addr, r.port)),
                protocol: proto_name(k.proto),
                backend_id: v.backend_id,
                backend: state
                    .backends
                    .get(&v.backend_id)
                    .map_or_else(|| "(gone)".into(), |b| endpoint(b.family, &b.addr, b.port)),
                idle_seconds: now.saturating_sub(v.last_used_ns) / 1_000_000_000,
            })
            .collect())
    }

    /// The socket path: its mode, the hooks pinned under `links`, the
    /// translated calls per frontend, and the translated sockets.
    ///
    /// # Errors
    /// When a map cannot be read.
    pub fn sockets(&self, links_dir: &Path) -> Result<render::SocketsView, InspectError> {
        let config = self.readers.socket_lb()?;
        // The socket path translates through the internal-scope frontends
        // (an external one shares its rev-NAT id).
        let label = |id: u32| {
            self.programmed
                .services
                .iter()
                .find(|(k, v)| k.scope == service_common::SCOPE_INTERNAL && v.rev_nat_id == id)
                .map(|(k, _)| render::frontend(k))
                .or_else(|| self.programmed.rev_nat.get(&id).map(|r| endpoint(r.family, &r.addr, r.port)))
                .unwrap_or_else(|| format!("rev_nat {id} (gone)"))
        };
        Ok(render::SocketsView {
            mode: render::socket_lb_name(config.mode),
            host_netns_cookie: config.host_netns_cookie,
            hooks: attach::socket::pinned_hooks(links_dir),
            frontends: self
                .readers
                .sock_counters()?
                .into_iter()
                .filter(|(_, c)| c.connects + c.sendmsgs > 0)
                .map(|(id, c)| render::SocketFrontendRow {
                    frontend: label(id),
                    rev_nat_id: id,
                    connects: c.connects,
                    sendmsgs: c.sendmsgs,
                })
                .collect(),
            sockets: self.readers.sock_rev_nat()?.iter().map(|(k, v)| render::socket_row(k, v)).collect(),
        })
    }

    /// The verdict and drop counters, summed over CPUs.
    ///
    /// # Errors
    /// When the map cannot be read.
    pub fn stats(&self) -> Result<Vec<StatRow>, InspectError> {
        let per_interface = self.readers.interface_stats()?;
        let names: std::collections::BTreeMap<u32, String> =
            attach::links().into_iter().map(|l| (l.ifindex, l.name)).collect();
        Ok(self
            .readers
            .stats()?
            .into_iter()
            .enumerate()
            .map(|(id, (counter, packets))| {
                let id = u32::try_from(id).unwrap_or(u32::MAX);
                StatRow {
                    counter,
                    drop: service_common::stats::is_drop(id),
                    packets,
                    interfaces: per_interface
                        .iter()
                        .filter(|((_, c), n)| *c == id && **n > 0)
                        .map(|((ifindex, _), n)| render::InterfacePackets {
                            interface: names.get(ifindex).cloned().unwrap_or_else(|| format!("ifindex {ifindex}")),
                            ifindex: *ifindex,
                            packets: *n,
                        })
                        .collect(),
                }
            })
            .collect())
    }
}

fn json<T: serde::Serialize>(rows: &T) -> Result<String, InspectError> {
    serde_json::to_string_pretty(rows).map(|s| s + "\n").map_err(|e| InspectError::Usage(e.to_string()))
}

/// `inspect VIEW`: the view as a text table, or as JSON.
///
/// # Errors
/// When the maps cannot be read.
pub fn show(view: View, root: &Path, as_json: bool) -> Result<String, InspectError> {
    let pins = Pins::open(root)?;
    match view {
        View::Services if as_json => json(&pins.services()?),
        View::Services => Ok(render::services_table(pins.services()?)),
        View::Backends if as_json => json(&pins.backends()?),
        View::Backends => Ok(render::backends_table(pins.backends()?)),
        View::Conntrack if as_json => json(&pins.conntrack()?),
        View::Conntrack => Ok(render::conntrack_table(pins.conntrack()?)),
        View::Affinity if as_json => json(&pins.affinity()?),
        View::Affinity => Ok(render::affinity_table(pins.affinity()?)),
        View::Stats if as_json => json(&pins.stats()?),
        View::Stats => Ok(render::stats_table(pins.stats()?)),
        View::Interfaces if as_json => json(&attach::attached_programs(&root.join("links"))),
        View::Interfaces => Ok(render::interfaces_table(attach::attached_programs(&root.join("links")))),
        View::Sockets if as_json => json(&pins.sockets(&root.join("links"))?),
        View::Sockets => Ok(render::sockets_text(&pins.sockets(&root.join("links"))?)),
    }
}
