//! Reach: selected pods leave with their egress IP on the clusters people run, where
//! pod-sourced packets cannot cross the fabric to the holder: an overlay pod network (VXLAN
//! between nodes, as Flannel builds it) over a fabric that drops pod sources, and a holder on
//! another subnet behind the router. With `--tunnel auto` (the default) the origin sends such
//! packets through the tunnel between nodes; every answer the external server gave is counted.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use netlab::fixture::{EGRESS_IP, GATEWAY, api_pod, gateway, start_agents, with_agent_logs};
use netlab::{Answer, Cluster, ClusterBuilder, LabPod, exec, expect_all_from};

const LOOP_INTERVAL: Duration = Duration::from_millis(20);
const LOOP_COUNT: u32 = 30;
const IPERF_PORT: u16 = 5201;

fn builder() -> ClusterBuilder {
    Cluster::builder()
        .probe_bin(env!("CARGO_BIN_EXE_se-probe"))
        .nodes(3)
        .with_node("node2", |n| n.label("egress", "true"))
}

/// The gateway of the fixture, held by node2 (the only node labelled `egress=true`), and an
/// `api` pod on each node.
fn pods(cluster: &mut Cluster, egress_ip: Ipv4Addr) -> Result<Vec<LabPod>> {
    cluster.update_objects(|o| {
        o.namespace("payments")
            .labels
            .insert("team".into(), "payments".into());
        o.set_gateway(gateway(GATEWAY, egress_ip));
    })?;
    ["node1", "node2", "node3"]
        .iter()
        .enumerate()
        .map(|(i, node)| api_pod(cluster, &format!("api-{}", i + 1), node))
        .collect()
}

/// Every connection of every pod answered, with the egress IP.
fn all_leave_with(cluster: &Cluster, pods: &[LabPod], egress_ip: Ipv4Addr) -> Result<()> {
    let loops = pods
        .iter()
        .map(|p| cluster.start_loop(p, LOOP_INTERVAL, LOOP_COUNT))
        .collect::<Result<Vec<_>>>()?;
    for (pod, answers) in pods.iter().zip(loops) {
        let answers = answers.wait(Duration::from_secs(60))?;
        expect_all_from(&answers, egress_ip)
            .with_context(|| format!("pod {} on {}", pod.name, pod.node))?;
    }
    Ok(())
}

/// Flannel-like overlay over a fabric that drops every packet with a pod source: the direct
/// path cannot work (`--tunnel never` shows it: dropped, never leaked), the tunnel does, and
/// the fabric never sees a pod source.
#[test]
fn an_overlay_over_a_fabric_that_drops_pod_sources_goes_through_the_tunnel() -> Result<()> {
    let mut cluster = builder()
        .overlay(true)
        .fabric_drops_pod_sources(true)
        .build()?;
    let pods = pods(&mut cluster, EGRESS_IP)?;
    // Without the tunnel: nothing gets through, and nothing leaks.
    let agents = start_agents(&cluster, &["--tunnel", "never"])?;
    let result = never_leaks(&cluster, &pods[0]);
    with_agent_logs(&agents, result)?;
    drop(agents);
    // The stopped agents' status says their objects were applied: gone, the new agents' first
    // apply is waited for.
    for node in cluster.nodes() {
        std::fs::remove_file(node.status_path())?;
    }
    let agents = start_agents(&cluster, &[])?;
    let before = cluster.fabric_drops()?;
    let result = all_leave_with(&cluster, &pods, EGRESS_IP).and_then(|()| {
        let drops = cluster.fabric_drops()? - before;
        ensure!(drops == 0, "the fabric dropped {drops} pod-sourced packets");
        Ok(())
    });
    with_agent_logs(&agents, result)
}

fn never_leaks(cluster: &Cluster, pod: &LabPod) -> Result<()> {
    let before = cluster.fabric_drops()?;
    let answers = cluster
        .start_loop_with_timeout(pod, LOOP_INTERVAL, 5, Duration::from_millis(300))?
        .wait(Duration::from_secs(30))?;
    ensure!(
        answers.iter().all(|a| matches!(a, Answer::Failed(_))),
        "with --tunnel never, over a fabric that drops pod sources: {answers:?}"
    );
    ensure!(
        cluster.fabric_drops()? > before,
        "the fabric dropped nothing"
    );
    Ok(())
}

/// The holder on another subnet behind the router, its egress IP on that subnet: reached
/// through the tunnel (it is not on-link), with or without an overlay.
#[test]
fn a_holder_on_another_subnet_is_reached_through_the_tunnel() -> Result<()> {
    for overlay in [false, true] {
        let mut cluster = builder()
            .with_node("node2", |n| n.segment(1))
            .overlay(overlay)
            .fabric_drops_pod_sources(true)
            .build()?;
        let subnet = cluster.node_segment("node2")?.subnet;
        let egress_ip = Ipv4Addr::from(u32::from(subnet.network()) + 200);
        let pods = pods(&mut cluster, egress_ip)?;
        let agents = start_agents(&cluster, &[])?;
        let result = all_leave_with(&cluster, &pods, egress_ip)
            .with_context(|| format!("overlay: {overlay}"));
        with_agent_logs(&agents, result)?;
    }
    Ok(())
}

/// Transfers larger than one packet, both ways, through the tunnel, with the fabric's MTU at
/// 1500 and at 9000, to a server that drops ICMP errors: nothing is black-holed (the holder
/// clamps the tunneled connections' MSS to what fits the tunnel).
#[test]
fn large_transfers_cross_the_tunnel_both_ways() -> Result<()> {
    for mtu in [1500, 9000] {
        let mut cluster = builder()
            .overlay(true)
            .fabric_drops_pod_sources(true)
            .fabric_mtu(mtu)
            .build()?;
        let pods = pods(&mut cluster, EGRESS_IP)?;
        let agents = start_agents(&cluster, &[])?;
        let result = transfers(&cluster, &pods[0]).with_context(|| format!("fabric MTU {mtu}"));
        with_agent_logs(&agents, result)?;
    }
    Ok(())
}

fn transfers(cluster: &Cluster, pod: &LabPod) -> Result<()> {
    // The server's firewall drops ICMP errors, as many do: path MTU discovery cannot tell it
    // that its packets are too large for the tunnel, and only the clamped MSS keeps them small.
    exec(
        cluster.ext_netns(),
        [
            "nft",
            "add table ip lab; add chain ip lab input { type filter hook input priority 0; }; \
             add rule ip lab input icmp type destination-unreachable drop",
        ],
    )?;
    let log = cluster.dir().join("iperf3.log");
    let port = IPERF_PORT.to_string();
    exec(
        cluster.ext_netns(),
        ["iperf3", "-s", "-D", "-p", &port, "--logfile"]
            .iter()
            .map(std::ffi::OsStr::new)
            .chain([log.as_os_str()]),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let ext = cluster.ext_ip().to_string();
    for reverse in [false, true] {
        let mut args = vec![
            "timeout",
            "30",
            "iperf3",
            "-c",
            &ext,
            "-p",
            &port,
            "-n",
            "4M",
            "--connect-timeout",
            "3000",
        ];
        if reverse {
            args.push("-R");
        }
        pod.exec(&args)
            .with_context(|| format!("iperf3 {}", if reverse { "-R" } else { "" }))?;
    }
    let said = std::fs::read_to_string(&log)?;
    let from = said
        .lines()
        .filter(|l| l.contains("Accepted connection from"))
        .collect::<Vec<_>>();
    ensure!(
        from.len() == 2 && from.iter().all(|l| l.contains(&EGRESS_IP.to_string())),
        "the server saw: {from:?}"
    );
    Ok(())
}
