//! `static-egress`: the node agent, its planner and its cleanup, as subcommands.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ipnet::Ipv4Net;
use kube::CustomResourceExt as _;
use static_egress::agent::{self, AgentOptions, FailoverOptions};
use static_egress::cni::Unclassified;
use static_egress::cni::install::CniInstall;
use static_egress::commands;
use static_egress::datapath::aws::AwsConfig;
use static_egress::datapath::tunnel::TunnelMode;
use static_egress::datapath::{self, DatapathConfig, KernelLog};
use static_egress::model::EgressGateway;
use static_egress::source::probes::ProbeConfig;

#[derive(Parser)]
#[command(
    version,
    about = "Gives selected Kubernetes pods a fixed source IP for traffic leaving the cluster"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent until SIGTERM/SIGINT; the data path stays in place when it exits.
    Agent(Box<AgentArgs>),
    /// Print what the agent would program on a node, without touching the kernel.
    Plan(PlanArgs),
    /// Explain which gateway a pod uses and why, or why none.
    Explain(ExplainArgs),
    /// Show this node's gateways, holders, selected pods and counters (agent running or not).
    Status(StatusArgs),
    /// Remove everything the agent created on this host.
    Cleanup(CleanupArgs),
    /// Exit 0 when the agent is alive (`--ready`: and ready), for exec probes.
    Health(HealthArgs),
    /// Print the EgressGateway CustomResourceDefinition (YAML) for `kubectl apply -f -`.
    Crd,
}

#[derive(Args)]
struct HealthArgs {
    #[arg(long, default_value = "/var/lib/static-egress")]
    state_dir: PathBuf,
    /// Also require the agent to be ready: its objects current (watches live), its last apply
    /// successful (the readiness probe); without it, only that the agent is alive.
    #[arg(long)]
    ready: bool,
    /// How old the status file may be (`60`, `60s` or `500ms`).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    max_age: Duration,
}

#[derive(Args)]
struct StatusArgs {
    #[arg(long, default_value = "/var/lib/static-egress")]
    state_dir: PathBuf,
    /// The agent's bpffs mount, whose pinned maps hold the live counters.
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    #[arg(long, value_enum, default_value = "table")]
    output: Output,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Table,
    Json,
}

/// Seconds (`30`, `30s`) or milliseconds (`500ms`).
fn parse_duration(s: &str) -> Result<Duration, String> {
    match s.strip_suffix("ms") {
        Some(ms) => ms.parse().map(Duration::from_millis),
        None => s
            .strip_suffix('s')
            .unwrap_or(s)
            .parse()
            .map(Duration::from_secs),
    }
    .map_err(|e| format!("{s:?} is not a duration such as 30s or 500ms: {e}"))
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        Duration::ZERO => Err("the interval must be longer than 0".into()),
        d => Ok(d),
    }
}

#[derive(Args)]
struct Common {
    /// This node's name, as in its Node object.
    #[arg(long, env = "NODE_NAME")]
    node: String,
    /// In-cluster ranges (besides the nodes' pod CIDRs) that never go through a gateway.
    #[arg(long = "cluster-cidr", value_name = "CIDR")]
    cluster_cidrs: Vec<Ipv4Net>,
}

#[derive(Args)]
struct AgentArgs {
    #[command(flatten)]
    common: Common,
    /// File of Kubernetes-style objects (YAML documents or JSON). Without it the agent watches
    /// the cluster (in-cluster service account, or KUBECONFIG).
    #[arg(long)]
    from_file: Option<PathBuf>,
    /// Where the agent records what it created (read by `cleanup`).
    #[arg(long, default_value = "/var/lib/static-egress")]
    state_dir: PathBuf,
    /// A bpffs mount; programs, links and maps are pinned under `<DIR>/static-egress`.
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// The fwmark bit selected packets carry (one bit, e.g. 0x2000); other bits are untouched.
    #[arg(long, default_value = "0x2000", value_parser = parse_mark_bit)]
    fwmark: u32,
    /// Routing table for marked packets; ours alone (not 0, 253, 254 or 255).
    #[arg(long, default_value = "1490", value_parser = datapath::check_route_table)]
    route_table: u32,
    /// What the kernel programs log into the agent's log: `debug` tells each packet they drop
    /// and why (a pod's traffic without a holder, the guard, fencing). Off by default.
    #[arg(long, value_enum, default_value = "off")]
    kernel_log: KernelLog,
    /// UDP port on which nodes probe each other (answered by our kernel program).
    #[arg(long, default_value_t = 7947)]
    probe_port: u16,
    /// When selected packets go to their holder through the tunnel between nodes (VXLAN):
    /// `auto` when the holder is on another subnet or the pod network is not routed over the
    /// uplink (an overlay), `always`, or `never`.
    #[arg(long, value_enum, default_value = "auto")]
    tunnel: TunnelMode,
    /// The tunnel's UDP port, the same on every node (not the CNI's own VXLAN port: flannel
    /// and Cilium use 8472, Calico 4789).
    #[arg(long, default_value_t = static_egress_common::tunnel::DEFAULT_PORT)]
    tunnel_port: u16,
    /// Hand selected pods' packets for a holder on another node straight from the pod's
    /// interface to the uplink (or the tunnel), and the holder's replies straight back to the
    /// pod: faster, but the origin's routing, netfilter and conntrack never see them, so a
    /// NetworkPolicy enforced there (iptables or nftables rules, or a CNI's own tc programs on
    /// the pod's interface, which run after ours) does not apply to that traffic. Off by
    /// default; for nodes whose pods' egress is not policed on the node.
    #[arg(long)]
    fast_path: bool,
    /// Routing table (ours alone) that holds a route to each egress IP this node holds for a
    /// gateway with `announce: Bgp`: the node's BGP daemon announces what it finds there (BIRD's
    /// `protocol kernel { kernel table N; learn; }`, FRR's `ip import-table N`).
    #[arg(long, default_value = "1491", value_parser = datapath::check_route_table)]
    announce_table: u32,
    #[command(flatten)]
    aws: AwsArgs,
    /// How often each node probes the nodes that may hold egress IPs.
    #[arg(long, default_value = "50ms", value_parser = parse_interval)]
    probe_interval: Duration,
    /// Unanswered probes after which a node counts as down (with the interval: detection time),
    /// 3 as BFD's detection multiplier. At least 2: a node counts itself cut off one interval
    /// earlier than the others count it out, so that it has stopped serving when they take over.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(2..))]
    probe_misses: u32,
    /// How long a node that came back must serve before it takes egress IPs again.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    rejoin_after: Duration,
    /// How long the kernel lets this node serve its egress IPs after the agent last renewed
    /// its lease: an agent away longer (killed, stuck, frozen) is fenced, and others take over.
    #[arg(long, default_value = "10s", value_parser = parse_interval)]
    lease: Duration,
    /// On SIGTERM, hand this node's egress IPs to others before stopping, instead of leaving
    /// the data path in place for a restart.
    #[arg(long)]
    drain_on_stop: bool,
    /// How often a holder tells the nodes that may take its egress IPs over which connections
    /// SNAT gave another source port than their own, so that those survive a takeover too
    /// (the others keep their port anyway); `0s` turns it off. Sent to the probe port.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    flow_sync_interval: Duration,
    /// In cluster mode, how long a holder's claim on an egress IP's Lease stands after its
    /// last renewal (renewed every fifth of it): a node that lost an egress IP to a later
    /// claim stays away from it that long after the claim's last renewal.
    #[arg(long, default_value = "15s", value_parser = parse_interval)]
    holder_lease: Duration,
    /// The namespace of the holder Leases (default: the agent's own, from its ServiceAccount
    /// or kubeconfig context).
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Serve Prometheus metrics at `/metrics`, and `/healthz` and `/readyz` for probes, on this
    /// address (e.g. `0.0.0.0:9547`); off when absent.
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Log each connection translated to an egress IP held here, as one JSON line when it
    /// ends, to this file (appended) or to `stdout`; turns conntrack's byte accounting on.
    #[arg(long, value_name = "PATH|stdout")]
    audit_log: Option<static_egress::report::audit::AuditTarget>,
    /// How many audit lines may wait for a slow writer (a reader of a pipe, a full disk);
    /// more are dropped and counted (`static_egress_audit_lines_dropped_total`, and a warning
    /// once the writer catches up), never packets.
    #[arg(long, default_value_t = static_egress::report::audit::QUEUE)]
    audit_queue: usize,
    /// How often everything of ours is compared with the kernel and repaired (`30s`, `500ms`).
    #[arg(long, default_value = "30s", value_parser = parse_interval)]
    resync_interval: Duration,
    /// Priority of our `ip rule` (not 0, 32766 or 32767); other rules there are left alone.
    #[arg(long, default_value = "1490", value_parser = datapath::check_rule_priority)]
    rule_priority: u32,
    #[command(flatten)]
    cni: CniArgs,
    /// What the CNI plugin does with a pod the agent cannot classify before it starts: `hold`
    /// its traffic to outside the cluster until the agent knows it (and, while the agent does
    /// not answer, keep it from starting), or `allow` it to start unclassified.
    #[arg(long, value_enum, default_value = "hold")]
    cni_unclassified: Unclassified,
}

/// `announce: Aws` (see "Objects" in the README): off unless `--aws-interface` is given.
#[derive(Args)]
struct AwsArgs {
    /// This node's network interface in its VPC (`eni-...`): the holder assigns its egress IPs
    /// of `announce: Aws` gateways to it. Credentials from `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`.
    #[arg(long)]
    aws_interface: Option<String>,
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    aws_region: String,
    /// The EC2 endpoint (default `https://ec2.<region>.amazonaws.com`).
    #[arg(long)]
    aws_endpoint: Option<String>,
    /// `EGRESS_IP=eipalloc-...`: the Elastic IP to associate with that egress IP wherever it is
    /// held (repeat for each).
    #[arg(long = "aws-elastic-ip", value_name = "IP=ALLOCATION", value_parser = parse_elastic_ip)]
    aws_elastic_ips: Vec<(std::net::Ipv4Addr, String)>,
}

fn parse_elastic_ip(s: &str) -> Result<(std::net::Ipv4Addr, String), String> {
    let (ip, allocation) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not EGRESS_IP=ALLOCATION_ID"))?;
    let ip = ip
        .parse()
        .map_err(|e| format!("{ip:?} is not an IPv4 address: {e}"))?;
    if !allocation.starts_with("eipalloc-") {
        return Err(format!(
            "{allocation:?} is not an allocation id (eipalloc-...)"
        ));
    }
    Ok((ip, allocation.to_owned()))
}

#[derive(Args)]
struct CniArgs {
    /// Chain the CNI plugin `static-egress-cni` into the first network config list of this
    /// directory (e.g. `/etc/cni/net.d`), so that pods are programmed before they run; off
    /// when absent. `cleanup` with the same flag takes it out again.
    #[arg(long)]
    cni_conf_dir: Option<PathBuf>,
    /// Where the container runtime looks for CNI plugins; the plugin's binary goes there.
    #[arg(long, default_value = "/opt/cni/bin")]
    cni_bin_dir: PathBuf,
}

#[derive(Args)]
struct PlanArgs {
    #[command(flatten)]
    common: Common,
    /// File of Kubernetes-style objects (YAML documents or JSON).
    #[arg(long)]
    from_file: PathBuf,
}

#[derive(Args)]
struct ExplainArgs {
    /// The pod, as NAMESPACE/NAME.
    #[arg(value_name = "NAMESPACE/POD")]
    pod: String,
    /// File of Kubernetes-style objects (YAML documents or JSON). Without it, the cluster
    /// (KUBECONFIG, or the in-cluster service account).
    #[arg(long)]
    from_file: Option<PathBuf>,
    /// In-cluster ranges (besides the nodes' pod CIDRs) that never go through a gateway.
    #[arg(long = "cluster-cidr", value_name = "CIDR")]
    cluster_cidrs: Vec<Ipv4Net>,
}

/// Without a readable record in the state dir, `cleanup` removes what is ours by name: give it
/// the agent's `--bpffs`, `--fwmark`, `--route-table`, `--rule-priority` and `--announce-table`
/// if they were not the defaults.
#[derive(Args)]
struct CleanupArgs {
    /// The agent's state dir (its record of what it created, and its lock).
    #[arg(long, default_value = "/var/lib/static-egress")]
    state_dir: PathBuf,
    /// The agent's bpffs: our pins under `<DIR>/static-egress` are removed, which detaches our
    /// programs.
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// The agent's fwmark bit (used only without a readable record).
    #[arg(long, default_value = "0x2000", value_parser = parse_mark_bit)]
    fwmark: u32,
    /// The agent's routing table, flushed (used only without a readable record).
    #[arg(long, default_value = "1490", value_parser = datapath::check_route_table)]
    route_table: u32,
    /// The agent's rule priority (used only without a readable record).
    #[arg(long, default_value = "1490", value_parser = datapath::check_rule_priority)]
    rule_priority: u32,
    /// The agent's `--announce-table`, flushed (used only without a readable record).
    #[arg(long, default_value = "1491", value_parser = datapath::check_route_table)]
    announce_table: u32,
    #[command(flatten)]
    cni: CniArgs,
}

fn parse_mark_bit(s: &str) -> Result<u32, String> {
    let value = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("{s:?} is not a number: {e}"))?;
    if value.count_ones() != 1 {
        return Err(format!("{s} must have exactly one bit set, e.g. 0x2000"));
    }
    Ok(value)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if let Command::Agent(_) = &cli.command
        && let Ok(kernel) = "static_egress_ebpf=trace".parse()
    {
        // The kernel programs' records are filtered by their own level (`--kernel-log`, or the
        // Node's annotation) before they are sent: all that come are wanted.
        filter = filter.add_directive(kernel);
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Agent(args) => {
            let args = *args;
            runtime.block_on(agent::run(AgentOptions {
                cni: args.cni.cni_conf_dir.clone().map(|conf_dir| CniInstall {
                    conf_dir,
                    bin_dir: args.cni.cni_bin_dir.clone(),
                    socket: args.state_dir.join(static_egress::cni::SOCKET),
                    unclassified: args.cni_unclassified,
                }),
                node: args.common.node,
                from_file: args.from_file,
                cluster_cidrs: args.common.cluster_cidrs,
                resync: args.resync_interval,
                holder_lease: args.holder_lease,
                lease_namespace: args.lease_namespace,
                metrics_addr: args.metrics_addr,
                audit_log: args.audit_log.map(|target| (target, args.audit_queue)),
                failover: FailoverOptions {
                    probes: ProbeConfig {
                        port: args.probe_port,
                        interval: args.probe_interval,
                        misses: args.probe_misses,
                        rejoin: args.rejoin_after,
                    },
                    lease: args.lease,
                    drain_on_stop: args.drain_on_stop,
                    flow_sync: args.flow_sync_interval,
                },
                datapath: DatapathConfig {
                    bpffs: args.bpffs,
                    state_dir: args.state_dir,
                    fwmark: args.fwmark,
                    route_table: args.route_table,
                    rule_priority: args.rule_priority,
                    probe_port: args.probe_port,
                    kernel_log: args.kernel_log,
                    tunnel: args.tunnel,
                    tunnel_port: args.tunnel_port,
                    fast_path: args.fast_path,
                    announce_table: args.announce_table,
                    aws: args.aws.aws_interface.map(|interface| AwsConfig {
                        region: args.aws.aws_region,
                        endpoint: args.aws.aws_endpoint,
                        interface,
                        elastic_ips: args.aws.aws_elastic_ips.into_iter().collect(),
                    }),
                },
            }))
        }
        Command::Plan(args) => commands::print_plan(
            &args.common.node,
            &args.from_file,
            args.common.cluster_cidrs,
        ),
        Command::Explain(args) => match args.pod.split_once('/') {
            Some((namespace, pod)) if !namespace.is_empty() && !pod.is_empty() => {
                runtime.block_on(commands::explain(
                    namespace,
                    pod,
                    args.from_file.as_deref(),
                    args.cluster_cidrs,
                ))
            }
            _ => {
                eprintln!("error: name the pod as NAMESPACE/POD, not {:?}", args.pod);
                return ExitCode::from(2);
            }
        },
        Command::Status(args) => {
            commands::status(&args.state_dir, &args.bpffs, args.output == Output::Json)
        }
        Command::Health(args) => commands::health(&args.state_dir, args.max_age, args.ready),
        Command::Crd => return print_crd(),
        Command::Cleanup(args) => runtime.block_on(async {
            let by_name = datapath::ByName {
                rule: datapath::RuleSpec {
                    priority: args.rule_priority,
                    mark: args.fwmark,
                    table: args.route_table,
                },
                announce_table: args.announce_table,
            };
            let mut removed = datapath::cleanup(&args.state_dir, &args.bpffs, by_name).await?;
            if let Some(conf_dir) = &args.cni.cni_conf_dir {
                removed |= static_egress::cni::install::remove(conf_dir, &args.cni.cni_bin_dir)?;
            }
            println!(
                "{}",
                if removed {
                    "removed static-egress state"
                } else {
                    "nothing to remove"
                }
            );
            Ok(())
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(if e.is_input_error() { 2 } else { 1 })
        }
    }
}

/// The definition comes from the same types the agent reads, so the API server accepts exactly
/// what the agent can validate; `deploy/crd.yaml` is this output, checked by a test.
fn print_crd() -> ExitCode {
    match serde_saphyr::to_string(&EgressGateway::crd()) {
        Ok(yaml) => {
            print!("# Generated by `static-egress crd`; do not edit.\n{yaml}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: writing the CRD as YAML: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_must_be_one_bit() {
        assert_eq!(parse_mark_bit("0x2000"), Ok(0x2000));
        assert_eq!(parse_mark_bit("16"), Ok(16));
        assert!(parse_mark_bit("0x3000").is_err());
        assert!(parse_mark_bit("0").is_err());
        assert!(parse_mark_bit("zz").is_err());
    }

    #[test]
    fn durations_in_seconds_or_milliseconds() {
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("1m").is_err());
        assert!(parse_interval("0s").is_err());
    }

    #[test]
    fn cleanup_defaults_to_the_agents_settings() {
        let Ok(Cli {
            command: Command::Cleanup(args),
        }) = Cli::try_parse_from(["static-egress", "cleanup"])
        else {
            panic!("cleanup parses without flags");
        };
        assert_eq!(args.state_dir, PathBuf::from("/var/lib/static-egress"));
        assert_eq!(args.bpffs, PathBuf::from("/sys/fs/bpf"));
        assert_eq!(
            (
                args.fwmark,
                args.route_table,
                args.rule_priority,
                args.announce_table
            ),
            (0x2000, 1490, 1490, 1491)
        );
        for flags in [
            ["--fwmark", "0x3000"],
            ["--route-table", "254"],
            ["--rule-priority", "32766"],
        ] {
            let argv = ["static-egress", "cleanup"].into_iter().chain(flags);
            assert!(Cli::try_parse_from(argv).is_err(), "{flags:?}");
        }
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }
}
