//! `service-agent`: the node agent of the service dataplane.
use std::path::PathBuf;

use clap::{CommandFactory as _, Parser, Subcommand, ValueEnum};
use service_agent::{
    attach::socket::SocketLb,
    inspect,
    maps::{DEFAULT_BPFFS_ROOT, MapSizes},
    run,
    vocabulary::Globs,
};

#[derive(Parser)]
#[command(name = "service-agent", version, about = "eBPF Kubernetes Service dataplane (kube-proxy replacement)")]
struct Cli {
    /// Log format; the level comes from RUST_LOG (default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// Where an explained packet enters the node.
#[derive(Clone, Copy, ValueEnum)]
enum EntrySide {
    /// From the node's routes: a client routed out of a pod interface is a
    /// local pod, an address of the node itself is a host socket, any
    /// other comes from outside.
    Auto,
    /// A local pod (the pod program, internal frontends).
    Pod,
    /// Outside the node (the external program, external frontends).
    External,
    /// A socket of the node itself: a host process or hostNetwork pod (the
    /// socket-level programs, internal frontends).
    Host,
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
    /// Show the pinned maps (services, backends, conntrack, affinity, stats) or
    /// which programs are attached to which interfaces (interfaces).
    Inspect {
        #[arg(value_enum)]
        what: inspect::View,
        #[arg(long, default_value = DEFAULT_BPFFS_ROOT, value_name = "PATH")]
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
        /// Where the packet enters the node.
        #[arg(long, value_enum, default_value_t = EntrySide::Auto)]
        from: EntrySide,
        #[arg(long, default_value = DEFAULT_BPFFS_ROOT, value_name = "PATH")]
        bpffs_root: PathBuf,
    },
    /// Remove every program link and map pin under --bpffs-root, and the
    /// agent's clsact filters from every interface of this network
    /// namespace (what a SIGTERM'd agent does on its way out; for after a
    /// SIGKILL or before uninstalling).
    Cleanup {
        #[arg(long, default_value = DEFAULT_BPFFS_ROOT, value_name = "PATH")]
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
    nodeport_addresses: Vec<service_agent::vocabulary::Cidr>,
    /// kube-proxy's --masquerade-all: pod traffic to ClusterIPs is
    /// masqueraded to the node's address too (external frontends are
    /// masqueraded under externalTrafficPolicy: Cluster regardless).
    #[arg(long)]
    masquerade_all: bool,
    /// The ranges ClusterIPs are allocated from (the API server's
    /// --service-cluster-ip-range), plus every ServiceCIDR object's: a new
    /// flow to an address of them that no Service has is dropped, as
    /// kube-proxy's nftables mode does. A ClusterIP's unserved port is
    /// rejected whether or not this is set.
    #[arg(long, value_name = "CIDR,...", value_delimiter = ',')]
    service_cluster_ip_range: Vec<service_agent::vocabulary::Cidr>,
    /// Socket-level load balancing (cgroup connect/sendmsg/recvmsg/
    /// getpeername hooks): `host` translates the sockets of the node's own
    /// network namespace (host processes, hostNetwork pods), which the
    /// packet path cannot see; `all` every socket under --cgroup-root,
    /// pods' too; `off` attaches nothing. `host` is the default because it
    /// adds only what kube-proxy gives (the node's own traffic) and leaves
    /// pods' packets as they are: with `all` a pod's connect() to a
    /// ClusterIP is rewritten inside the pod, so a sidecar proxy or
    /// in-pod redirect that routes by Service address (Istio-style, the
    /// reason for Cilium's socketLB.hostNamespaceOnly) sees the backend
    /// instead, whatever the CNI. `all` is the opt-in that spares pods'
    /// established packets the translation (docs/benchmarks.md, 4).
    #[arg(long, default_value = "host", value_name = "host|all|off")]
    socket_lb: SocketLb,
    /// NodePorts also answer on 127.0.0.1 for the node's own sockets
    /// (kube-proxy's --iptables-localhost-nodeports), through the socket
    /// path only: never for packets, so a neighbour's packet to 127.0.0.1
    /// (CVE-2020-8558, which kube-proxy's iptables mode must open
    /// route_localnet for) meets no NodePort, and a pod's 127.0.0.1 stays
    /// its own. Off by default, as kube-proxy's nftables mode, which does
    /// not offer it at all. Taken only when --nodeport-addresses is unset
    /// or contains 127.0.0.1 (kube-proxy's rule); needs --socket-lb host
    /// or all.
    #[arg(long)]
    localhost_nodeports: bool,
    /// The cgroup (v2) the socket-level programs are attached to; nothing
    /// outside it is touched. Default: the host's cgroup2 mount (one is
    /// mounted at /run/service-dataplane/cgroup2 when there is none).
    #[arg(long, value_name = "PATH")]
    cgroup_root: Option<PathBuf>,
    /// Where the maps are pinned (a directory on a BPF filesystem).
    #[arg(long, default_value = DEFAULT_BPFFS_ROOT, value_name = "PATH")]
    bpffs_root: PathBuf,
    /// Capacity of the services map: frontends (a Service port's ClusterIP,
    /// each NodePort address, LoadBalancer IP and external IP, each from
    /// pods and from outside).
    #[arg(long, default_value_t = service_common::capacity::SERVICES)]
    map_size_services: u32,
    /// Capacity of the backend_slots map, in backend ids: every backend
    /// table's Maglev slots and member list together (a table per distinct
    /// backend set, shared by the frontends that have it; about 9 ids per
    /// endpoint of each set, e.g. 137 for 10 endpoints), with room for the
    /// tables written while old ones are still in use. Rounded up to a
    /// multiple of 16.
    #[arg(long, default_value_t = service_common::capacity::BACKEND_SLOT_BLOCKS * service_common::backend_slots::PER_BLOCK)]
    map_size_backend_slots: u32,
    /// Capacity of the backends and rev_nat maps, and of the packet and byte
    /// counters kept per backend and per rev-NAT row.
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
            print!("{}", inspect::show(what, &bpffs_root, output == Output::Json)?);
            Ok(())
        }
        Command::Explain { src, dst, from, bpffs_root } => {
            let entry = match from {
                EntrySide::Auto => inspect::Entry::Auto,
                EntrySide::Pod => inspect::Entry::Pod,
                EntrySide::External => inspect::Entry::External,
                EntrySide::Host => inspect::Entry::Host,
            };
            print!("{}", inspect::explain(&bpffs_root, &src, &dst, entry)?);
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
            if args.localhost_nodeports && args.socket_lb == SocketLb::Off {
                // Localhost NodePorts exist only on the socket path.
                Cli::command()
                    .error(
                        clap::error::ErrorKind::ArgumentConflict,
                        "--localhost-nodeports needs the socket path: it cannot be used with --socket-lb off",
                    )
                    .exit();
            }
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
                masquerade_all: args.masquerade_all,
                service_cidrs: args.service_cluster_ip_range,
                socket_lb: args.socket_lb,
                localhost_nodeports: args.localhost_nodeports,
                cgroup_root: args.cgroup_root,
                bpffs_root: args.bpffs_root,
                map_sizes: MapSizes {
                    services: args.map_size_services,
                    backend_slots: args.map_size_backend_slots,
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
