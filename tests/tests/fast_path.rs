//! The fast path (`--fast-path`): a selected pod's packets for a holder on another node go from
//! the pod's interface straight to the uplink (or into the tunnel), and the holder's replies
//! straight back to the pod. The origins' conntrack never sees them, yet every connection
//! leaves with the egress IP (every answer the external server gave is counted), transfers
//! larger than a packet cross both ways, datagrams whose headers the programs cannot read
//! directly leave with the egress IP too, and the path has as many hops as without it.

use std::net::Ipv4Addr;

use anyhow::{Context as _, Result, ensure};
use netlab::fixture::{
    EGRESS_IP, Ways, all_leave_with, api_pod, payments_gateway, start_agents, transfers,
    with_agent_logs,
};
use netlab::{Cluster, LabPod, PodStyle, exec, exec_output};

const IPERF_PORT: u16 = 5201;
/// Where the packet socket's datagrams go (counted by the external host, answered by nobody).
const RING_PORT: u16 = 7790;

/// Three nodes, node2 the only one that may hold the egress IP, an `api` pod on each: routed
/// (its own veth) on node1 and node2, behind a bridge on node3.
fn lab(overlay: bool) -> Result<(Cluster, Vec<LabPod>)> {
    let mut cluster = Cluster::builder()
        .probe_bin(env!("CARGO_BIN_EXE_se-probe"))
        .nodes(3)
        .with_node("node2", |n| n.label("egress", "true"))
        .with_node("node3", |n| n.pod_style(PodStyle::Bridged))
        .overlay(overlay)
        .fabric_drops_pod_sources(overlay)
        .build()?;
    payments_gateway(&mut cluster, EGRESS_IP)?;
    let pods = ["node1", "node2", "node3"]
        .iter()
        .enumerate()
        .map(|(i, node)| api_pod(&mut cluster, &format!("api-{}", i + 1), node))
        .collect::<Result<Vec<_>>>()?;
    Ok((cluster, pods))
}

/// Directly to the holder on the segment, and through the tunnel over an overlay whose fabric
/// drops pod sources.
#[test]
fn selected_traffic_skips_the_origins_netfilter_both_ways() -> Result<()> {
    for overlay in [false, true] {
        let (cluster, pods) = lab(overlay)?;
        let agents = start_agents(&cluster, &["--fast-path"])?;
        let result = fast(&cluster, &pods).with_context(|| format!("overlay: {overlay}"));
        with_agent_logs(&agents, result)?;
    }
    Ok(())
}

fn fast(cluster: &Cluster, pods: &[LabPod]) -> Result<()> {
    all_leave_with(cluster, pods, EGRESS_IP)?;
    let origin = &pods[0];
    transfers(cluster, origin, IPERF_PORT, Ways::UpAndDown)?;
    ring_datagrams_leave_with_the_egress_ip(cluster, origin)?;
    // Pod -> origin -> holder -> router -> server: three hops lower the TTL, on the fast path
    // as on the slow one.
    let ext = cluster.ext_ip().to_string();
    let ping = |ttl: &str| {
        exec_output(
            &origin.netns,
            ["ping", "-c", "1", "-W", "2", "-t", ttl, &ext],
        )
        .map(|o| o.status.success())
    };
    ensure!(
        !ping("3")?,
        "a ping with TTL 3 reached the server: the origin did not count as a hop"
    );
    ensure!(ping("4")?, "a ping with TTL 4 did not reach the server");
    // The holder translated all of it; the origins never tracked any of it.
    for pod in pods.iter().filter(|p| p.node != "node2") {
        let tracked = tracked(cluster, &pod.node, pod.ip)?;
        ensure!(
            tracked.is_empty(),
            "{}'s conntrack saw {}'s traffic to the server: {tracked:?}",
            pod.node,
            pod.name
        );
    }
    ensure!(
        !tracked(cluster, "node2", origin.ip)?.is_empty(),
        "the holder tracked none of {}'s connections",
        origin.name
    );
    Ok(())
}

/// Datagrams that trafgen writes into a packet socket's ring reach the programs with their IP
/// and UDP headers outside the part read directly: every one the server sees came from the
/// egress IP (the server counts them by source from its first packet on).
fn ring_datagrams_leave_with_the_egress_ip(cluster: &Cluster, pod: &LabPod) -> Result<()> {
    let ext = cluster.ext_netns();
    exec(
        ext,
        [
            "nft",
            &format!(
                "add table ip ring; add chain ip ring seen {{ type filter hook prerouting priority -300; }}; \
                 add rule ip ring seen udp dport {RING_PORT} ip saddr {EGRESS_IP} counter; \
                 add rule ip ring seen udp dport {RING_PORT} counter"
            ),
        ],
    )?;
    let stream = netlab::trafgen::Stream::start(cluster, pod, RING_PORT)?;
    std::thread::sleep(std::time::Duration::from_secs(1));
    drop(stream);
    let listing = exec(ext, ["nft", "list", "chain", "ip", "ring", "seen"])?;
    exec(ext, ["nft", "delete", "table", "ip", "ring"])?;
    let counts: Vec<u64> = listing
        .split("counter packets ")
        .skip(1)
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect();
    let [from_egress, all] = counts[..] else {
        anyhow::bail!("the server's counters are not what was set up: {listing}");
    };
    ensure!(
        all > 0 && from_egress == all,
        "of {all} datagrams from the packet socket the server saw, {from_egress} came from {EGRESS_IP}"
    );
    Ok(())
}

/// The connections `node`'s conntrack tracks from `ip` to the server.
fn tracked(cluster: &Cluster, node: &str, ip: Ipv4Addr) -> Result<Vec<String>> {
    let listed = exec(
        &cluster.node(node)?.netns,
        [
            "conntrack",
            "-L",
            "-s",
            &ip.to_string(),
            "-d",
            &cluster.ext_ip().to_string(),
        ],
    )?;
    Ok(listed.lines().map(str::to_owned).collect())
}
