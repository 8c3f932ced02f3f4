//! `cargo xtask lab`: a three-node cluster in network namespaces, one EgressGateway, and what an
//! external server sees from each pod before and after the agents start.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use netlab::objects::{EgressGateway, FailurePolicy, match_labels};
use netlab::{AgentHandle, Cluster, LabPod, PodSpec, PodStyle};

use crate::{build, setup};

const GATEWAY: &str = "corp-fw";
/// The egress IP on the nodes' segment; the other topologies take one from their own range.
const EGRESS_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 200);
const APPLY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(clap::Args)]
pub struct Options {
    /// Leave the lab running and print how to explore and remove it.
    #[arg(long, conflicts_with = "down")]
    keep: bool,
    /// Remove a kept lab, given its prefix (printed by `--keep`).
    #[arg(long, value_name = "PREFIX")]
    down: Option<String>,
    /// Use optimized builds.
    #[arg(long)]
    release: bool,
    /// The network the nodes sit on (see "Reach" in the README).
    #[arg(long, value_enum, default_value = "segment")]
    topology: Topology,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Topology {
    /// One segment, pods routed between nodes (host-gw): the direct path.
    Segment,
    /// A Flannel-like VXLAN overlay over a fabric that drops pod-sourced packets: the tunnel.
    Overlay,
    /// The holder (node2) on a second subnet behind the router, its egress IP there: the tunnel.
    Subnets,
    /// An egress IP from a range on no link, announced by BGP (BIRD on the router and nodes).
    Bgp,
}

impl Topology {
    fn egress_ip(self) -> Ipv4Addr {
        match self {
            Self::Segment | Self::Overlay => EGRESS_IP,
            Self::Subnets => Ipv4Addr::new(10, 99, 1, 200),
            Self::Bgp => Ipv4Addr::new(10, 99, 2, 200),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Segment => {
                "one segment, pods routed between nodes: marked packets go straight to the holder"
            }
            Self::Overlay => {
                "a VXLAN overlay (flannel.1) over a fabric that drops pod-sourced packets: marked packets go through se-tunnel"
            }
            Self::Subnets => {
                "node2, the holder, on 10.99.1.0/24 behind the router: marked packets go through se-tunnel"
            }
            Self::Bgp => {
                "egress IP 10.99.2.200 on no link, announced by BGP: BIRD on node2 and node3 tells the router's BIRD where it is"
            }
        }
    }
}

/// A pod of the demo, whether the gateway should take it, and why.
struct Case {
    pod: LabPod,
    selected: bool,
    why: &'static str,
    node_ip: Ipv4Addr,
    before: String,
    after: String,
}

pub fn run(options: &Options) -> Result<()> {
    if let Some(prefix) = &options.down {
        netlab::teardown_prefix(prefix)?;
        println!("removed lab {prefix}");
        return Ok(());
    }
    netlab::require_root().context("the lab builds network namespaces")?;
    setup::run(&setup::Options {
        verbose: false,
        no_kube: true,
    })?;
    let artifacts = build::run(&build::Options {
        release: options.release,
    })?;
    let started = Instant::now();

    // node1: routed pods, not eligible; node2: bridged pods, eligible; node3: routed, eligible.
    // Selected pods on all three show the path from a non-holder, from the holder itself and
    // from the other eligible node.
    let topology = options.topology;
    let egress_ip = topology.egress_ip();
    let mut cluster = Cluster::builder()
        .nodes(3)
        .with_node("node2", |n| {
            let n = n.pod_style(PodStyle::Bridged).label("egress", "true");
            if topology == Topology::Subnets {
                n.segment(1)
            } else {
                n
            }
        })
        .with_node("node3", |n| n.label("egress", "true"))
        .overlay(topology == Topology::Overlay)
        .fabric_drops_pod_sources(topology == Topology::Overlay)
        .probe_bin(&artifacts.probe)
        .agent_bin(&artifacts.agent)
        .build()?;
    println!("topology {topology:?}: {}", topology.describe());
    let prefix = cluster.prefix().to_owned();
    println!(
        "lab {prefix} is up; if this gets interrupted, remove it with `cargo xtask lab --down {prefix}`"
    );

    // (namespace, pod, node, app label, annotated, selected, why)
    let pods = [
        (
            "payments",
            "api-1",
            "node1",
            "api",
            false,
            true,
            "podSelector",
        ),
        (
            "payments",
            "api-2",
            "node2",
            "api",
            false,
            true,
            "podSelector",
        ),
        (
            "payments",
            "api-3",
            "node3",
            "api",
            false,
            true,
            "podSelector",
        ),
        (
            "payments",
            "report-1",
            "node3",
            "report",
            true,
            true,
            "annotation",
        ),
        (
            "payments",
            "batch-1",
            "node1",
            "batch",
            false,
            false,
            "podSelector",
        ),
        (
            "default",
            "web-1",
            "node2",
            "api",
            false,
            false,
            "namespace",
        ),
    ];
    let mut cases = Vec::new();
    for (namespace, name, node, app, annotated, selected, why) in pods {
        let mut spec = PodSpec::new(namespace, name, node).label("app", app);
        if annotated {
            spec = spec.gateway(GATEWAY);
        }
        let pod = cluster.add_pod(spec)?;
        let node_ip = cluster.node(&pod.node)?.ip;
        cases.push(Case {
            pod,
            selected,
            why,
            node_ip,
            before: String::new(),
            after: String::new(),
        });
    }
    cluster.update_objects(|objects| {
        objects
            .namespace("payments")
            .labels
            .insert("team".into(), "payments".into());
        let gateway = EgressGateway::new(GATEWAY)
            .egress_ip(egress_ip)
            .node_selector(match_labels([("egress", "true")]))
            .namespace_selector(Some(match_labels([("team", "payments")])))
            .pod_selector(Some(match_labels([("app", "api")])))
            .failure_policy(FailurePolicy::FailClosed);
        objects.set_gateway(if topology == Topology::Bgp {
            gateway.announce("Bgp")
        } else {
            gateway
        });
    })?;
    let bird = if topology == Topology::Bgp {
        Some(netlab::Bird::start(&cluster, &["node2", "node3"])?)
    } else {
        None
    };

    for case in &mut cases {
        case.before = answer(&cluster, &case.pod);
    }
    let node_names: Vec<String> = cluster.nodes().iter().map(|n| n.name.clone()).collect();
    let mut snapshots = Vec::new();
    for node in &node_names {
        snapshots.push(cluster.snapshot(node)?);
    }

    let mut agents = Vec::new();
    for node in &node_names {
        agents.push(cluster.start_agent(node, std::iter::empty::<&str>())?);
    }
    for agent in &agents {
        if let Err(e) = cluster.wait_applied(agent.node(), APPLY_TIMEOUT) {
            print_log_tail(agent);
            return Err(e);
        }
    }
    if topology == Topology::Bgp {
        // The holder's BIRD announces what the agent put in its table; the router's learns it.
        let ip = egress_ip.to_string();
        netlab::wait_until(APPLY_TIMEOUT, || {
            netlab::exec(
                cluster.router_netns(),
                ["ip", "route", "show", "proto", "bird", ip.as_str()],
            )
            .is_ok_and(|r| !r.trim().is_empty())
        })
        .context("the router never learned the egress IP by BGP")?;
    }
    for case in &mut cases {
        case.after = answer(&cluster, &case.pod);
    }
    let holder = holder_of(&cluster, egress_ip)?;
    let wrong = print_table(&cases, holder.as_deref(), egress_ip);
    println!("(the lab took {:.1} s)", started.elapsed().as_secs_f64());

    if options.keep {
        for agent in agents {
            agent.detach();
        }
        if let Some(bird) = bird {
            bird.detach();
        }
        let objects_path = cluster.objects_path().to_owned();
        let dir = cluster.dir().to_owned();
        let kept = cluster.keep()?;
        print_explore(
            &kept,
            &objects_path,
            &dir,
            &artifacts,
            holder.as_deref(),
            egress_ip,
        );
    } else {
        for agent in &mut agents {
            agent
                .stop()
                .with_context(|| format!("stopping the agent on {}", agent.node()))?;
        }
        for (node, before) in node_names.iter().zip(&snapshots) {
            cluster.cleanup(node)?;
            let differences = before.differences(&cluster.snapshot(node)?);
            if !differences.is_empty() {
                bail!(
                    "cleanup left {node} different from before the agent:\n  {}",
                    differences.join("\n  ")
                );
            }
        }
        println!("agents stopped, cleanup restored every node, lab removed");
    }
    if wrong > 0 {
        bail!("{wrong} pod(s) did not leave as expected");
    }
    Ok(())
}

fn answer(cluster: &Cluster, pod: &LabPod) -> String {
    match cluster.ask(pod) {
        Ok(ip) => ip.to_string(),
        Err(_) => "no answer".into(),
    }
}

/// The node whose uplink carries the egress IP, if any.
fn holder_of(cluster: &Cluster, ip: Ipv4Addr) -> Result<Option<String>> {
    let wanted = format!(" {ip}/");
    for node in cluster.nodes() {
        let addrs = node.exec(["ip", "-4", "-o", "addr", "show", "dev", &node.uplink])?;
        if addrs.contains(&wanted) {
            return Ok(Some(node.name.clone()));
        }
    }
    Ok(None)
}

/// Prints the before/after table; returns how many pods did not behave as expected.
fn print_table(cases: &[Case], holder: Option<&str>, egress_ip: Ipv4Addr) -> usize {
    println!();
    println!(
        "EgressGateway {GATEWAY}: egress IP {egress_ip}, held by {}",
        holder.unwrap_or("no node")
    );
    println!("ext (203.0.113.10) sees, per pod:");
    let header = [
        "pod",
        "node",
        "style",
        "selected",
        "before agents",
        "after agents",
        "",
    ];
    let mut rows = vec![header.map(String::from)];
    let mut wrong = 0;
    for case in cases {
        let expected_after = if case.selected {
            egress_ip
        } else {
            case.node_ip
        };
        let ok =
            case.before == case.node_ip.to_string() && case.after == expected_after.to_string();
        if !ok {
            wrong += 1;
        }
        let style = match case.pod.style {
            PodStyle::Routed => "routed",
            PodStyle::Bridged => "bridged",
        };
        rows.push([
            format!("{}/{}", case.pod.namespace, case.pod.name),
            case.pod.node.clone(),
            style.into(),
            format!(
                "{} ({})",
                if case.selected { "yes" } else { "no" },
                case.why
            ),
            case.before.clone(),
            case.after.clone(),
            if ok { "ok" } else { "UNEXPECTED" }.into(),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("  {}", line.join("  ").trim_end());
    }
    println!();
    wrong
}

fn print_log_tail(agent: &AgentHandle) {
    let log = agent.log().unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    eprintln!("last lines of {}:", agent.log_path().display());
    for line in &lines[lines.len().saturating_sub(20)..] {
        eprintln!("  {line}");
    }
}

fn print_explore(
    kept: &netlab::Kept,
    objects: &std::path::Path,
    dir: &std::path::Path,
    artifacts: &build::Artifacts,
    holder: Option<&str>,
    egress_ip: Ipv4Addr,
) {
    let p = &kept.prefix;
    let holder = holder.unwrap_or("node2");
    let agent = artifacts.agent.display();
    let probe = artifacts.probe.display();
    println!(
        "The lab stays up. Explore it as root:
  ip netns list | grep {p}                    # its namespaces
  ip netns exec {p}-{holder} ip -4 addr show eth0   # the holder carries {egress_ip}
  ip netns exec {p}-{holder} nft list ruleset
  ip netns exec {p}-node1 ip rule
  ip netns exec {p}-pod-payments.api-1 {probe} ask 203.0.113.10:7777
  {agent} plan --node node1 --from-file {objects}
Edit {objects} and the agents apply the change; their logs are {dir}/node*/agent.*.log.
Remove the lab with:
  cargo xtask lab --down {p}
  (or without cargo: {command})",
        objects = objects.display(),
        dir = dir.display(),
        command = kept.command()
    );
}
