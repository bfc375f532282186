//! The flow tables of `tests/flows` (format: `tests/flows/FORMAT.md`):
//! loading them, turning a table's node into the model's context, and a
//! flow's expectation into the model's [`Outcome`].

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::Deserialize;
use service_agent::{
    model::{
        NodeContext, Protocol,
        trace::{Entry, Outcome, Probe},
    },
    source::addresses::{self, InterfaceAddr},
    vocabulary::{Cidr, Globs},
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Table {
    pub reference: String,
    pub node: Node,
    #[serde(default)]
    pub flags: Vec<String>,
    pub objects: String,
    pub flows: Vec<Flow>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Node {
    pub name: String,
    /// Both families: IPv6 ones as YAML strings (`"2001:db8::1"`).
    pub addresses: Vec<IpAddr>,
    #[serde(default)]
    pub zone: Option<String>,
    #[serde(default, rename = "clusterCIDR")]
    pub cluster_cidr: Option<String>,
    #[serde(default, rename = "serviceCIDRs")]
    pub service_cidrs: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Flow {
    pub name: String,
    pub source: IpAddr,
    pub destination: SocketAddr,
    #[serde(default)]
    pub protocol: Option<String>,
    pub output: String,
    pub masquerade: bool,
    #[serde(default)]
    pub ours: Option<Ours>,
    #[serde(default)]
    pub skip: Option<String>,
}

/// Where this project deliberately differs: its own expectation, and the
/// row of `docs/semantics.md` saying why.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ours {
    pub output: Option<String>,
    pub masquerade: Option<bool>,
    pub why: String,
}

/// The text of `docs/semantics.md` (both crates that run the tables sit
/// beside `docs/`).
pub fn semantics() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/semantics.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every table under `dir`, sorted by path.
pub fn load(dir: &Path) -> Vec<(PathBuf, Table)> {
    let mut files: Vec<PathBuf> =
        walk(dir).into_iter().filter(|p| p.extension().is_some_and(|e| e == "yaml")).collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let table: Table =
                serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{}: not a flow table: {e}", path.display()));
            (path, table)
        })
        .collect()
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// A flag's value, given as `--name=value` or `--name value`.
fn flag<'a>(flags: &'a [String], name: &str) -> Option<&'a str> {
    flags.iter().enumerate().find_map(|(i, f)| {
        f.strip_prefix(name).and_then(|rest| match rest.strip_prefix('=') {
            Some(v) => Some(v),
            None if rest.is_empty() => flags.get(i + 1).map(String::as_str),
            None => None,
        })
    })
}

impl Table {
    /// kube-proxy's `--iptables-localhost-nodeports`: the table's value,
    /// else kube-proxy's default (on in its iptables mode, which is the only
    /// one that has it).
    fn localhost_nodeports(&self) -> bool {
        match flag(&self.flags, "--iptables-localhost-nodeports") {
            Some(v) => {
                v.parse().unwrap_or_else(|e| panic!("{}: --iptables-localhost-nodeports {v:?}: {e}", self.reference))
            }
            None => flag(&self.flags, "--proxy-mode") == Some("iptables"),
        }
    }

    /// The model's view of the table's node: NodePorts answer where the
    /// agent's own `addresses::select` puts them for the node's addresses
    /// (on its external interface) under the table's
    /// `--nodeport-addresses` and `--iptables-localhost-nodeports`
    /// (`--localhost-nodeports`: 127.0.0.1 too).
    pub fn node_context(&self) -> NodeContext {
        let cidrs: Vec<Cidr> = flag(&self.flags, "--nodeport-addresses")
            .map(|v| v.split(',').filter_map(|c| c.trim().parse().ok()).collect())
            .unwrap_or_default();
        let interfaces: Vec<InterfaceAddr> = std::iter::once(IpAddr::V4(Ipv4Addr::LOCALHOST))
            .map(|addr| InterfaceAddr { ifindex: 1, interface: "lo".into(), addr })
            .chain(self.node.addresses.iter().map(|a| InterfaceAddr { ifindex: 2, interface: "eth0".into(), addr: *a }))
            .collect();
        let selected = addresses::select(&interfaces, &Globs::parse("eth0"), &cidrs, self.localhost_nodeports());
        NodeContext {
            node_name: self.node.name.clone(),
            zone: self.node.zone.clone(),
            nodeport_addresses: selected.nodeport,
            masquerade_all: self.flags.iter().any(|f| f == "--masquerade-all"),
            service_cidrs: self
                .node
                .service_cidrs
                .iter()
                .map(|c| c.parse().unwrap_or_else(|e| panic!("{}: service CIDR {c:?}: {e}", self.reference)))
                .collect(),
        }
    }

    /// Where `flow` enters, or why it cannot be run here.
    pub fn entry(&self, flow: &Flow) -> Result<Entry, String> {
        if let Some(why) = &flow.skip {
            return Err(why.clone());
        }
        if self.node.addresses.contains(&flow.source) || flow.source.is_loopback() {
            return Ok(Entry::Host);
        }
        // The node's `clusterCIDR`, whatever `--cluster-cidr` says: a test
        // that turns kube-proxy's local-traffic detection off still sends
        // from pods, and this dataplane knows pods by their interface.
        let pods: Option<Cidr> = self
            .node
            .cluster_cidr
            .as_deref()
            .map(|c| c.parse().unwrap_or_else(|e| panic!("{}: cluster CIDR {c:?}: {e}", self.reference)));
        Ok(if pods.is_some_and(|c| c.contains(flow.source)) { Entry::Pod } else { Entry::External })
    }
}

impl Flow {
    pub fn protocol(&self) -> Protocol {
        match self.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            "SCTP" => Protocol::Sctp,
            other => panic!("flow {:?}: protocol {other:?}", self.name),
        }
    }

    /// # Panics
    /// When the flow differs deliberately (`ours:`) and `semantics` (the
    /// text of `docs/semantics.md`) has no row with its `why`.
    pub fn assert_documented(&self, table: &str, semantics: &str) {
        if let Some(ours) = &self.ours {
            assert!(
                semantics.contains(&ours.why),
                "{table}: {:?}: docs/semantics.md has no row {:?}",
                self.name,
                ours.why
            );
        }
    }

    pub fn probe(&self, entry: Entry) -> Probe {
        Probe { source: self.source, destination: self.destination, protocol: self.protocol(), entry }
    }

    /// kube-proxy's expectation, or this project's where it deliberately
    /// differs.
    pub fn expected(&self) -> Outcome {
        let output = self.ours.as_ref().and_then(|o| o.output.as_deref()).unwrap_or(&self.output);
        let masquerade = self.ours.as_ref().and_then(|o| o.masquerade).unwrap_or(self.masquerade);
        parse_outcome(output, masquerade).unwrap_or_else(|e| panic!("flow {:?}: {e}", self.name))
    }
}

/// kube-proxy's output string as an outcome. `ACCEPT` (a health check
/// node port let through to the node) is an untouched packet here.
pub fn parse_outcome(output: &str, masquerade: bool) -> Result<Outcome, String> {
    Ok(match output.trim() {
        "" | "ACCEPT" => Outcome::Untouched,
        "REJECT" => Outcome::Reject,
        "DROP" => Outcome::Drop,
        list => {
            let endpoints: BTreeSet<SocketAddr> = list
                .split(',')
                .map(|e| e.trim().parse().map_err(|err| format!("endpoint {e:?}: {err}")))
                .collect::<Result<_, _>>()?;
            Outcome::Forward { endpoints, masquerade }
        }
    })
}

/// The verdict of a run over the tables: flows agreeing with kube-proxy,
/// differing deliberately (each checked to have its row in
/// `docs/semantics.md`), not run (and why), and wrong.
pub struct Tally {
    semantics: String,
    pub agree: usize,
    pub deliberate: usize,
    pub skipped: Vec<String>,
    pub wrong: Vec<String>,
}

impl Tally {
    pub fn new() -> Self {
        Self { semantics: semantics(), agree: 0, deliberate: 0, skipped: Vec::new(), wrong: Vec::new() }
    }

    pub fn skip(&mut self, table: &str, flow: &Flow, why: &str) {
        self.skipped.push(format!("{table}: {}: {why}", flow.name));
    }

    /// Counts `flow` of `table`, entering at `entry`: `got` against what it
    /// expects; `detail` goes into the report of a wrong flow. For the
    /// node's own flows ([`Entry::Host`]) the masquerade bit is not
    /// compared: the backend sees a node address as the source whether
    /// kube-proxy masquerades or not, and under the socket path (the kernel
    /// picks it for the route to the backend) alike.
    pub fn record(&mut self, table: &str, flow: &Flow, entry: Entry, got: &Outcome, detail: &str) {
        let comparable = |o: Outcome| match (entry, o) {
            (Entry::Host, Outcome::Forward { endpoints, .. }) => Outcome::Forward { endpoints, masquerade: false },
            (_, o) => o,
        };
        let expected = comparable(flow.expected());
        if comparable(got.clone()) != expected {
            self.wrong.push(format!(
                "{table}: {:?} ({} → {} {}): expected {expected}, got {got}{detail}",
                flow.name,
                flow.source,
                flow.destination,
                flow.protocol()
            ));
        } else if flow.ours.is_some() {
            flow.assert_documented(table, &self.semantics);
            self.deliberate += 1;
        } else {
            self.agree += 1;
        }
    }

    /// Prints the counts (`what`: what the flows ran through) and fails on
    /// any wrong flow, or when none was run.
    pub fn finish(&self, what: &str, tables: usize) {
        println!(
            "{tables} tables through {what}: {} flows agree with kube-proxy, {} differ deliberately (rows of \
             docs/semantics.md), {} not run here, {} wrong",
            self.agree,
            self.deliberate,
            self.skipped.len(),
            self.wrong.len()
        );
        for s in &self.skipped {
            println!("  not run: {s}");
        }
        assert!(self.agree > 0, "no flow was run");
        assert!(self.wrong.is_empty(), "{} flows disagree:\n{}", self.wrong.len(), self.wrong.join("\n"));
    }
}
