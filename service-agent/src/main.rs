//! `service-agent`: the node agent of the service dataplane.
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use service_agent::{attach::Globs, inspect, maps::MapSizes, run};

#[derive(Parser)]
#[command(name = "service-agent", version, about = "eBPF Kubernetes Service dataplane (kube-proxy replacement)")]
struct Cli {
    /// Log format; the level comes from RUST_LOG (default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Inspect {
    Services,
    Backends,
    Conntrack,
    Affinity,
    Stats,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
#[expect(clippy::large_enum_variant, reason = "parsed once at start; `run`'s flags are most of it")]
enum Command {
    /// Program the dataplane and keep it in sync until SIGINT/SIGTERM.
    Run(RunArgs),
    /// Show the pinned maps: services, backends, conntrack, affinity, stats.
    Inspect {
        #[arg(value_enum)]
        what: Inspect,
        #[arg(long, default_value = "/sys/fs/bpf/service-dataplane", value_name = "PATH")]
        bpffs_root: PathBuf,
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Which Service and backend a flow gets, and why, from the live maps:
    /// `explain 10.244.1.10[:PORT] 10.96.0.10:80/TCP`.
    Explain {
        /// The client: IP, or IP:PORT for the exact hash slot.
        src: String,
        /// The destination: IP:PORT/PROTO.
        dst: String,
        #[arg(long, default_value = "/sys/fs/bpf/service-dataplane", value_name = "PATH")]
        bpffs_root: PathBuf,
    },
    /// Remove every program link and map pin under --bpffs-root, and the
    /// agent's clsact filters from every interface of this network
    /// namespace (what a SIGTERM'd agent does on its way out; for after a
    /// SIGKILL or before uninstalling).
    Cleanup {
        #[arg(long, default_value = "/sys/fs/bpf/service-dataplane", value_name = "PATH")]
        bpffs_root: PathBuf,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Directory of Service / EndpointSlice / Endpoints manifests
    /// (*.yaml, *.yml, *.json), watched for changes. Without it the agent
    /// watches the Kubernetes API server.
    #[arg(long, value_name = "DIR")]
    manifests: Option<PathBuf>,
    /// kubeconfig for the API server (default: the in-cluster service
    /// account). Ignored with --manifests.
    #[arg(long, value_name = "FILE", conflicts_with = "manifests")]
    kubeconfig: Option<PathBuf>,
    /// The API server's URL (kube-proxy's --master): overrides the server
    /// of --kubeconfig or of the in-cluster configuration, keeping their
    /// credentials. In the host network without kube-proxy the in-cluster
    /// address (the `kubernetes` Service's ClusterIP) is not reachable;
    /// give the real one here or in KUBERNETES_SERVICE_HOST/_PORT.
    #[arg(long, value_name = "URL", conflicts_with = "manifests")]
    master: Option<String>,
    /// This node's name, as in EndpointSlice `nodeName` (kube-proxy:
    /// --hostname-override).
    #[arg(long, alias = "hostname-override", env = "NODE_NAME", value_name = "NAME")]
    node_name: String,
    /// Interfaces whose ingress carries pod traffic, as comma-separated globs.
    #[arg(long, default_value = "veth*,cali*,lxc*", value_name = "GLOB,...")]
    pod_interfaces: String,
    /// Interfaces that carry traffic from outside the node (NodePort,
    /// LoadBalancer IPs, externalIPs), as comma-separated names or globs.
    /// Default: the interfaces that carry a default route, followed as
    /// routes change.
    #[arg(long, value_name = "IFACE,...")]
    external_interfaces: Option<String>,
    /// Overlay and tunnel devices that also get the external program, so
    /// replies of cross-node flows that come back decapsulated there
    /// (flannel.1, vxlan.calico, tunl0, wg0, cilium_vxlan, …) are
    /// translated; a flow SNATed out of one gets its address. Comma-
    /// separated globs; `auto` selects every interface whose link kind is
    /// vxlan, geneve, ipip, gre, gretap, sit, ip6tnl, ip6gre, ip6gretap,
    /// wireguard or tun; `none` selects none. Interfaces matching
    /// --pod-interfaces are left out. NodePorts do not answer on them.
    #[arg(long, default_value = "auto", value_name = "auto|none|GLOB,...")]
    tunnel_interfaces: String,
    /// How programs are attached: `tcx` (TCX links, kernel 6.6+), `tc` (a
    /// clsact qdisc and cls_bpf filters, what kernels before 6.6 have), or
    /// `auto` (TCX, falling back to tc). Either way a restarted agent adopts
    /// what it finds attached with its own program and replaces the rest.
    #[arg(long, default_value = "auto", value_name = "auto|tcx|tc")]
    attach_mode: service_agent::attach::AttachMode,
    /// kube-proxy's --nodeport-addresses: NodePorts answer on the node
    /// addresses inside these CIDRs. Default: every address on the external
    /// interfaces.
    #[arg(long, value_name = "CIDR,...", value_delimiter = ',')]
    nodeport_addresses: Vec<service_agent::model::Cidr>,
    /// Where the maps are pinned (a directory on a BPF filesystem).
    #[arg(long, default_value = "/sys/fs/bpf/service-dataplane", value_name = "PATH")]
    bpffs_root: PathBuf,
    /// Capacity of the services map (frontends plus their backend slots).
    #[arg(long, default_value_t = service_common::capacity::SERVICES)]
    map_size_services: u32,
    /// Capacity of the backends and rev_nat maps.
    #[arg(long, default_value_t = service_common::capacity::BACKENDS)]
    map_size_backends: u32,
    /// Capacity of the conntrack map of assured (answered) flows (two
    /// entries per translated flow).
    #[arg(long, default_value_t = service_common::capacity::CONNTRACK)]
    map_size_conntrack: u32,
    /// Capacity of the conntrack_new map of flows not yet assured
    /// (unanswered SYNs, UDP without a reply; two entries per flow): a
    /// flood of them evicts only each other, never an assured flow.
    #[arg(long, default_value_t = service_common::capacity::CONNTRACK_NEW)]
    map_size_conntrack_new: u32,
    /// Capacity of the fragments map (datagrams whose later fragments are
    /// awaited).
    #[arg(long, default_value_t = service_common::capacity::FRAGMENTS)]
    map_size_fragments: u32,
    /// On SIGTERM/SIGINT, leave the programs attached and the maps pinned
    /// for the next agent (a DaemonSet's rolling update) instead of
    /// detaching; `service-agent cleanup` uninstalls.
    #[arg(long)]
    keep_on_exit: bool,
    /// Where `/metrics` is served (kube-proxy's flag and default).
    #[arg(long, default_value = "127.0.0.1:10249", value_name = "IP:PORT")]
    metrics_bind_address: std::net::SocketAddr,
    /// Where `/healthz` and `/livez` are served (kube-proxy's flag and
    /// default).
    #[arg(long, default_value = "0.0.0.0:10256", value_name = "IP:PORT")]
    healthz_bind_address: std::net::SocketAddr,
}

fn json<T: serde::Serialize>(rows: &T) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(rows)? + "\n")
}

#[expect(clippy::too_many_lines, reason = "one table per map, side by side")]
fn inspect_text(what: Inspect, root: &std::path::Path, output: Output) -> anyhow::Result<String> {
    let state = inspect::applied(root)?;
    Ok(match (what, output) {
        (Inspect::Services, Output::Json) => {
            let mut rows = inspect::services(&state);
            inspect::add_counters(&mut rows, &mut [], root)?;
            json(&rows)?
        }
        (Inspect::Services, Output::Text) => {
            let mut rows = inspect::services(&state);
            inspect::add_counters(&mut rows, &mut [], root)?;
            let rows: Vec<Vec<String>> = rows
                .into_iter()
                .map(|s| {
                    let backends: Vec<String> = s
                        .backends
                        .iter()
                        .map(|(b, n)| {
                            format!(
                                "{}:{} ({n}/{}){}",
                                b.address,
                                b.port,
                                s.slots,
                                if b.state == "terminating" { " terminating" } else { "" }
                            )
                        })
                        .collect();
                    let flags = if s.flags.is_empty() { "-".into() } else { s.flags.join(",") };
                    vec![
                        s.frontend,
                        flags,
                        s.packets.to_string(),
                        s.bytes.to_string(),
                        if backends.is_empty() { "<none>".into() } else { backends.join(", ") },
                    ]
                })
                .collect();
            inspect::table(&["FRONTEND", "FLAGS", "PACKETS", "BYTES", "BACKENDS (slots)"], &rows)
        }
        (Inspect::Backends, output) => {
            let mut rows: Vec<inspect::BackendRow> =
                state.backends.iter().map(|(id, b)| inspect::services_backend(*id, b)).collect();
            inspect::add_counters(&mut [], &mut rows, root)?;
            if output == Output::Json {
                json(&rows)?
            } else {
                let rows: Vec<Vec<String>> = rows
                    .into_iter()
                    .map(|b| {
                        vec![
                            b.id.to_string(),
                            format!("{}:{}/{}", b.address, b.port, b.protocol),
                            if b.local { "local".into() } else { "remote".into() },
                            b.state.into(),
                            b.packets.to_string(),
                            b.bytes.to_string(),
                        ]
                    })
                    .collect();
                inspect::table(&["ID", "BACKEND", "NODE", "STATE", "PACKETS", "BYTES"], &rows)
            }
        }
        (Inspect::Conntrack, output) => {
            let rows = inspect::conntrack(root)?;
            if output == Output::Json {
                json(&rows)?
            } else {
                let rows: Vec<Vec<String>> = rows
                    .into_iter()
                    .map(|c| {
                        vec![
                            c.protocol,
                            c.source,
                            c.destination,
                            c.direction.into(),
                            c.translated_to,
                            c.backend_id.to_string(),
                            c.table.into(),
                            if c.state.is_empty() { "-".into() } else { c.state.join(",") },
                            format!("{}s", c.idle_seconds),
                            format!("{}s", c.expires_in_seconds),
                        ]
                    })
                    .collect();
                inspect::table(
                    &[
                        "PROTO",
                        "SOURCE",
                        "DESTINATION",
                        "DIRECTION",
                        "TRANSLATED TO",
                        "BACKEND",
                        "TABLE",
                        "STATE",
                        "IDLE",
                        "EXPIRES IN",
                    ],
                    &rows,
                )
            }
        }
        (Inspect::Affinity, output) => {
            let rows = inspect::affinity(root, &state)?;
            if output == Output::Json {
                json(&rows)?
            } else {
                let rows: Vec<Vec<String>> = rows
                    .into_iter()
                    .map(|a| {
                        vec![
                            a.client,
                            format!("{}/{}", a.frontend, a.protocol),
                            a.backend,
                            format!("{}s", a.idle_seconds),
                        ]
                    })
                    .collect();
                inspect::table(&["CLIENT", "FRONTEND", "BACKEND", "IDLE"], &rows)
            }
        }
        (Inspect::Stats, output) => {
            let rows = inspect::stats(root)?;
            if output == Output::Json {
                json(&rows)?
            } else {
                let rows: Vec<Vec<String>> = rows
                    .into_iter()
                    .map(|s| {
                        vec![
                            s.counter.into(),
                            if s.drop { "drop".into() } else { "pass".into() },
                            s.packets.to_string(),
                        ]
                    })
                    .collect();
                inspect::table(&["COUNTER", "KIND", "PACKETS"], &rows)
            }
        }
    })
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Inspect { what, bpffs_root, output } => {
            print!("{}", inspect_text(what, &bpffs_root, output)?);
            Ok(())
        }
        Command::Explain { src, dst, bpffs_root } => {
            print!("{}", inspect::explain(&bpffs_root, &src, &dst)?);
            Ok(())
        }
        Command::Cleanup { bpffs_root } => {
            let links = service_agent::attach::remove_pinned_links(&run::links_dir(&bpffs_root))?;
            // The clsact fallback's filters are not pinned: found by name
            // on the interfaces of the namespace cleanup runs in.
            let filters = service_agent::attach::remove_filters()?;
            service_agent::maps::remove_pins(&bpffs_root)?;
            tracing::info!(links, filters, bpffs_root = %bpffs_root.display(), "removed the dataplane's links and pins");
            Ok(())
        }
        Command::Run(args) => {
            run::run(run::RunConfig {
                source: match args.manifests {
                    Some(dir) => run::SourceConfig::Manifests(dir),
                    None => run::SourceConfig::Cluster { kubeconfig: args.kubeconfig, master: args.master },
                },
                node_name: args.node_name,
                pod_interfaces: Globs::parse(&args.pod_interfaces),
                external_interfaces: args.external_interfaces.as_deref().map(Globs::parse),
                tunnel_interfaces: service_agent::attach::TunnelInterfaces::parse(&args.tunnel_interfaces),
                attach_mode: args.attach_mode,
                nodeport_addresses: args.nodeport_addresses,
                bpffs_root: args.bpffs_root,
                map_sizes: MapSizes {
                    services: args.map_size_services,
                    backends: args.map_size_backends,
                    conntrack: args.map_size_conntrack,
                    conntrack_new: args.map_size_conntrack_new,
                    fragments: args.map_size_fragments,
                },
                keep_on_exit: args.keep_on_exit,
                metrics_bind_address: args.metrics_bind_address,
                healthz_bind_address: args.healthz_bind_address,
            })
            .await
        }
    }
}
