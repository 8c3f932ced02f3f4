//! Reach: selected pods leave with their egress IP on the clusters people run, where
//! pod-sourced packets cannot cross the fabric to the holder: an overlay pod network (VXLAN
//! between nodes, as Flannel builds it) over a fabric that drops pod sources, and a holder on
//! another subnet behind the router. With `--tunnel auto` (the default) the origin sends such
//! packets through the tunnel between nodes; every answer the external server gave is counted.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use ipnet::Ipv4Net;
use netlab::fixture::{
    EGRESS_IP, GATEWAY, Ways, all_leave_with, api_pod, change, gateway, payments_gateway,
    start_agents, tunnel_counts, with_agent_logs,
};
use netlab::objects::Node;
use netlab::{
    AgentHandle, Answer, Cluster, ClusterBuilder, CniPlugin, LabPod, exec, expect_none_leaked,
};

const LOOP_INTERVAL: Duration = Duration::from_millis(20);
const IPERF_PORT: u16 = 5201;

fn builder() -> ClusterBuilder {
    Cluster::builder()
        .probe_bin(env!("CARGO_BIN_EXE_se-probe"))
        .nodes(3)
        .with_node("node2", |n| n.label("egress", "true"))
}

/// The nodes on a Flannel-like overlay over a fabric that drops every packet with a pod source.
fn overlay() -> ClusterBuilder {
    builder().overlay(true).fabric_drops_pod_sources(true)
}

/// The gateway of the fixture, held by node2 (the only node labelled `egress=true`), and an
/// `api` pod on each node.
fn pods(cluster: &mut Cluster, egress_ip: Ipv4Addr) -> Result<Vec<LabPod>> {
    payments_gateway(cluster, egress_ip)?;
    ["node1", "node2", "node3"]
        .iter()
        .enumerate()
        .map(|(i, node)| api_pod(cluster, &format!("api-{}", i + 1), node))
        .collect()
}

/// Flannel-like overlay over a fabric that drops every packet with a pod source: the direct
/// path cannot work (`--tunnel never` shows it: dropped, never leaked), the tunnel does, and
/// the fabric never sees a pod source.
#[test]
fn an_overlay_over_a_fabric_that_drops_pod_sources_goes_through_the_tunnel() -> Result<()> {
    let mut cluster = overlay().build()?;
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
        // The programs wrapped and unwrapped the packets themselves, both ways, on the origins
        // and on the holder.
        for node in ["node1", "node2", "node3"] {
            let (tunnel_in, tunnel_out) = tunnel_counts(&cluster, node)?;
            ensure!(
                tunnel_in > 0 && tunnel_out > 0,
                "{node}: {tunnel_in} packets out of the tunnel, {tunnel_out} into it by the programs"
            );
        }
        Ok(())
    });
    with_agent_logs(&agents, result)
}

/// Pods wired by Debian's CNI plugins (`bridge` on node1, `ptp` on node3, each with its own
/// `ipMasq`) on the overlay over a fabric that drops pod sources: the plugins' masquerade does
/// not take the selected pods' packets before the tunnel does, and every answer comes from
/// the egress IP; the fabric never sees a pod source.
#[test]
fn pods_wired_by_cni_plugins_on_an_overlay_go_through_the_tunnel() -> Result<()> {
    let mut cluster = overlay()
        .with_node("node1", |n| n.cni_plugin(CniPlugin::Bridge))
        .with_node("node3", |n| n.cni_plugin(CniPlugin::Ptp))
        .build()?;
    let pods = pods(&mut cluster, EGRESS_IP)?;
    let agents = start_agents(&cluster, &[])?;
    let before = cluster.fabric_drops()?;
    let result = all_leave_with(&cluster, &pods, EGRESS_IP).and_then(|()| {
        let drops = cluster.fabric_drops()? - before;
        ensure!(drops == 0, "the fabric dropped {drops} pod-sourced packets");
        for node in ["node1", "node3"] {
            let (_, wrapped) = tunnel_counts(&cluster, node)?;
            ensure!(wrapped > 0, "{node} wrapped nothing for the tunnel");
        }
        Ok(())
    });
    with_agent_logs(&agents, result)
}

/// Agents restarted with another `--tunnel-port`: the tunnel device, left by the first run,
/// is made again on the new port, so what the kernel's side of the tunnel takes (the GRO
/// aggregates of a transfer, fragments of a large datagram) is still received: 4 MB each way
/// cross, and a ping as large as the pod's MTU. Before, the device kept the old port and a
/// transfer crawled at a few hundred kbit/s. A port another VXLAN device holds is refused
/// before anything is taken down.
#[test]
fn another_tunnel_port_after_a_restart_moves_the_device_too() -> Result<()> {
    const PORT: &str = "9475";
    let mut cluster = overlay().build()?;
    let pods = pods(&mut cluster, EGRESS_IP)?;
    let agents = start_agents(&cluster, &[])?;
    let result = all_leave_with(&cluster, &pods, EGRESS_IP);
    with_agent_logs(&agents, result)?;
    drop(agents);
    // The overlay's own port (Flannel's 8472): refused with a clear error, and the device and
    // the data path the first run left stay.
    let taken = cluster
        .nodes()
        .iter()
        .map(|n| cluster.start_agent(&n.name, ["--tunnel-port", "8472"]))
        .collect::<Result<Vec<_>>>()?;
    let result = netlab::wait_until(Duration::from_secs(10), || {
        taken.iter().all(|a| {
            a.log()
                .is_ok_and(|l| l.contains("the tunnel's UDP port 8472 is taken on this node"))
        })
    })
    .context("the agents did not refuse the CNI's port")
    .and_then(|()| all_leave_with(&cluster, &pods, EGRESS_IP));
    with_agent_logs(&taken, result)?;
    drop(taken);
    for node in cluster.nodes() {
        std::fs::remove_file(node.status_path())?;
    }
    let agents = start_agents(&cluster, &["--tunnel-port", PORT])?;
    let result = (|| {
        for node in ["node1", "node2"] {
            let device = cluster
                .node(node)?
                .exec(["ip", "-d", "link", "show", "se-tunnel"])?;
            ensure!(
                device.contains(&format!("dstport {PORT}")),
                "{node}: {device}"
            );
        }
        netlab::fixture::transfers(&cluster, &pods[0], IPERF_PORT, Ways::UpAndDown)?;
        large_pings(&cluster, &pods[0])
    })();
    with_agent_logs(&agents, result)
}

/// Two thousand nodes more in the objects (no agents: their addresses and pod CIDRs are what
/// counts here): every node's table routes each one's pods through the tunnel, and applies stay
/// quick: a change is in force on every node within 5 s in this debug build (comparing every
/// route of the table with every wanted one took 1.5 s per apply in a release build), while
/// connections keep leaving with the egress IP.
#[test]
fn two_thousand_nodes_more_keep_applies_quick() -> Result<()> {
    const MORE: u32 = 2_000;
    let mut cluster = overlay().build()?;
    let pods = pods(&mut cluster, EGRESS_IP)?;
    let far = |i: u32| -> Result<Node> {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 98, 0, 1)) + i);
        let cidr = Ipv4Net::new(
            Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + (i << 8)),
            24,
        )?;
        Ok(Node::new(format!("far-{i}")).internal_ip(ip).pod_cidr(cidr))
    };
    let nodes = (0..MORE).map(far).collect::<Result<Vec<_>>>()?;
    cluster.update_objects(|o| nodes.into_iter().for_each(|n| o.set_node(n)))?;
    let agents = start_agents(&cluster, &[])?;
    let result = (|| {
        let routes = cluster.node("node1")?.exec([
            "ip",
            "route",
            "show",
            "table",
            "all",
            "dev",
            "se-tunnel",
        ])?;
        let through = routes.lines().filter(|l| l.starts_with("10.")).count();
        ensure!(
            through >= MORE as usize,
            "{through} routes through the tunnel on node1, not one per other node"
        );
        let moved = far(0)?.label("moved", "yes");
        let started = Instant::now();
        change(&mut cluster, |o| o.set_node(moved))?;
        let took = started.elapsed();
        eprintln!("with {MORE} nodes more, a change was in force on every node in {took:?}");
        ensure!(
            took < Duration::from_secs(5),
            "a change took {took:?} to be in force on every node"
        );
        all_leave_with(&cluster, &pods, EGRESS_IP)
    })();
    with_agent_logs(&agents, result)
}

/// `--tunnel always` where the nodes also route pods over the uplink (main's table has a route
/// to each other node's pods through it): our table's route to those pods goes through the
/// tunnel after every apply and every re-check, not only after the first. Every connection
/// over several re-checks is answered with the egress IP.
#[test]
fn the_tunnel_route_to_other_nodes_pods_holds_across_rechecks() -> Result<()> {
    let mut cluster = builder().build()?;
    let pods = pods(&mut cluster, EGRESS_IP)?;
    let agents = start_agents(
        &cluster,
        &["--tunnel", "always", "--resync-interval", "500ms"],
    )?;
    let result = (0..4).try_for_each(|_| all_leave_with(&cluster, &pods, EGRESS_IP));
    with_agent_logs(&agents, result)
}

/// The gateway moves from one holder to another while a pod's connections go through the
/// tunnel over a fabric that drops pod sources (both holders on the uplink's subnet, so each in
/// turn is where the origin's table routes): no connection leaves with another address during
/// the move, every one does with the egress IP after it, and the new holder unwraps them.
#[test]
fn a_gateway_moving_to_another_holder_through_the_tunnel_leaks_nothing() -> Result<()> {
    let mut cluster = overlay()
        .with_node("node3", |n| n.label("egress", "true"))
        .build()?;
    let mut pods = pods(&mut cluster, EGRESS_IP)?;
    pods.truncate(1);
    let on = |node: &str| {
        gateway(GATEWAY, EGRESS_IP).node_selector(netlab::objects::match_labels([(
            "kubernetes.io/hostname",
            node,
        )]))
    };
    cluster.update_objects(|o| o.set_gateway(on("node2")))?;
    let agents = start_agents(&cluster, &[])?;
    let result = (|| {
        all_leave_with(&cluster, &pods, EGRESS_IP)?;
        let (before, _) = tunnel_counts(&cluster, "node3")?;
        let during = cluster.start_loop_with_timeout(
            &pods[0],
            LOOP_INTERVAL,
            150,
            Duration::from_millis(300),
        )?;
        std::thread::sleep(Duration::from_millis(500));
        netlab::fixture::change(&mut cluster, |o| o.set_gateway(on("node3")))?;
        let answers = during.wait(Duration::from_secs(60))?;
        let answered = expect_none_leaked(&answers, EGRESS_IP)?;
        ensure!(
            answered > 0,
            "no connection was answered during the move: {answers:?}"
        );
        all_leave_with(&cluster, &pods, EGRESS_IP)?;
        let (after, _) = tunnel_counts(&cluster, "node3")?;
        ensure!(
            after > before,
            "node3 unwrapped nothing after the move ({before} packets before, {after} after)"
        );
        Ok(())
    })();
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
/// through the tunnel (it is not on-link), with or without an overlay. The holder does not ask
/// its own segment for the other nodes' link-layer addresses (they are behind the router: no
/// neighbour entry, no warning that they do not answer, no apply again for them).
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
            .and_then(|()| no_neighbours_behind_the_router(&cluster, &agents[1]))
            .with_context(|| format!("overlay: {overlay}"));
        with_agent_logs(&agents, result)?;
    }
    Ok(())
}

/// node2 (`holder`'s node, on its own subnet) has no neighbour entry for node1 or node3 and
/// has not warned about them.
fn no_neighbours_behind_the_router(cluster: &Cluster, holder: &AgentHandle) -> Result<()> {
    let node2 = cluster.node("node2")?;
    let neighbours = node2.exec(["ip", "-4", "neigh", "show"])?;
    for other in ["node1", "node3"] {
        let ip = cluster.node(other)?.ip.to_string();
        ensure!(
            !neighbours.lines().any(|l| l.starts_with(&format!("{ip} "))),
            "node2 asks its segment for {other} ({ip}), which is behind the router: {neighbours}"
        );
    }
    let log = holder.log()?;
    ensure!(
        !log.contains("does not answer ARP"),
        "node2 warned about nodes behind the router"
    );
    Ok(())
}

/// Transfers larger than one packet, both ways, through the tunnel, with the fabric's MTU at
/// 1500 and at 9000, to a server that drops ICMP errors: nothing is black-holed (the holder
/// clamps the tunneled connections' MSS to what fits the tunnel).
#[test]
fn large_transfers_cross_the_tunnel_both_ways() -> Result<()> {
    for mtu in [1500, 9000] {
        let mut cluster = overlay().fabric_mtu(mtu).build()?;
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
    netlab::fixture::transfers(cluster, pod, IPERF_PORT, Ways::UpAndDown)
}

/// A link beyond the holder narrower than the tunnel's clamped segments (the router's to the
/// outside, 1,300 bytes): the router's "fragmentation needed" to the egress IP comes back to the
/// pod through the tunnel, the pod learns the path's MTU and its upload completes, with the
/// fast path and without. Lost, the pod would resend full-size segments until it gave up.
#[test]
fn a_narrower_link_beyond_the_holder_is_learned_through_the_tunnel() -> Result<()> {
    const NARROW: u32 = 1300;
    for options in [&[][..], &["--fast-path"][..]] {
        let mut cluster = overlay().build()?;
        let pods = pods(&mut cluster, EGRESS_IP)?;
        cluster.narrow_outside_link(NARROW)?;
        let agents = start_agents(&cluster, options)?;
        let result = upload_learns_mtu(&cluster, &pods[0], NARROW)
            .with_context(|| format!("agents with {options:?}"));
        with_agent_logs(&agents, result)?;
    }
    Ok(())
}

fn upload_learns_mtu(cluster: &Cluster, pod: &LabPod, mtu: u32) -> Result<()> {
    // Only up: the external host's own link stays at 1,500 bytes, the router's side of it does
    // not, and a full-size segment from the host would not cross it.
    netlab::fixture::transfers(cluster, pod, IPERF_PORT, Ways::Up)?;
    let ext = cluster.ext_ip().to_string();
    let route = pod.exec(["ip", "route", "get", &ext])?;
    ensure!(
        route.contains(&format!("mtu {mtu}")),
        "the pod did not learn the path's MTU of {mtu}: {route}"
    );
    Ok(())
}

/// A datagram that does not fit the uplink once wrapped (as large as the pod's interface takes,
/// with DF): the kernel's device fragments the outer packet and the holder puts it together
/// again; the reply, as large, comes back the same way. Every one is answered, and the server
/// saw each from the egress IP and none from another address.
#[test]
fn a_datagram_too_large_to_wrap_whole_crosses_in_fragments() -> Result<()> {
    let mut cluster = overlay().build()?;
    let pods = pods(&mut cluster, EGRESS_IP)?;
    let agents = start_agents(&cluster, &[])?;
    let result = large_pings(&cluster, &pods[0]);
    with_agent_logs(&agents, result)
}

fn large_pings(cluster: &Cluster, pod: &LabPod) -> Result<()> {
    const PINGS: u64 = 5;
    exec(
        cluster.ext_netns(),
        [
            "nft",
            &format!(
                "add table ip lab; add chain ip lab input {{ type filter hook input priority 0; }}; \
                 add rule ip lab input icmp type echo-request ip saddr {EGRESS_IP} counter; \
                 add rule ip lab input icmp type echo-request ip saddr != {EGRESS_IP} counter"
            ),
        ],
    )?;
    // Small ones first, every answer counted: the pod's first packet waits for its gateway's
    // link-layer address (a proxy ARP answer comes up to 0.8 s late), and large ones queued
    // behind it would not all be kept.
    all_leave_with(cluster, std::slice::from_ref(pod), EGRESS_IP)?;
    let mtu: u32 = pod
        .exec(["cat", "/sys/class/net/eth0/mtu"])?
        .trim()
        .parse()?;
    // The pod's node puts the replies together, the holder the requests.
    let nodes = [cluster.node(&pod.node)?, cluster.node("node2")?];
    let reassembled = || -> Result<Vec<u64>> {
        nodes
            .iter()
            .map(|n| ip_counter(&n.netns, "ReasmOKs"))
            .collect()
    };
    let before = reassembled()?;
    let ext = cluster.ext_ip().to_string();
    let size = (mtu - 28).to_string();
    let count = PINGS.to_string();
    let said = pod.exec([
        "ping", "-c", &count, "-i", "0.2", "-W", "2", "-M", "do", "-s", &size, &ext,
    ])?;
    ensure!(
        said.contains(&format!("{PINGS} received")),
        "not every ping of {mtu} bytes was answered: {said}"
    );
    let counters = exec(
        cluster.ext_netns(),
        ["nft", "list", "chain", "ip", "lab", "input"],
    )?;
    let counts: Vec<u64> = counters
        .split("packets ")
        .skip(1)
        .map(|rest| rest.split_whitespace().next().unwrap_or("").parse())
        .collect::<Result<_, _>>()?;
    ensure!(
        counts == [PINGS, 0],
        "the server saw {counts:?} pings from the egress IP and from other addresses"
    );
    let after = reassembled()?;
    for ((node, before), after) in nodes.iter().zip(before).zip(after) {
        ensure!(
            after - before >= PINGS,
            "{} put {} packets together again, not each of the {PINGS}",
            node.name,
            after - before
        );
    }
    Ok(())
}

/// A field of the `Ip:` lines of `/proc/net/snmp` in `netns`.
fn ip_counter(netns: &str, field: &str) -> Result<u64> {
    let snmp = exec(netns, ["cat", "/proc/net/snmp"])?;
    let mut ip = snmp.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (ip.next(), ip.next());
    let (Some(names), Some(values)) = (names, values) else {
        anyhow::bail!("no Ip: lines in /proc/net/snmp");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == field)
        .with_context(|| format!("no {field} in /proc/net/snmp"))?
        .1
        .parse()
        .context("odd counter")
}

/// The router's route to `ip`, if BIRD put one there.
fn router_route(cluster: &Cluster, ip: Ipv4Addr) -> Result<String> {
    Ok(exec(
        cluster.router_netns(),
        ["ip", "route", "show", "proto", "bird", &ip.to_string()],
    )?
    .trim()
    .to_owned())
}

/// An egress IP from a range that is on no link, announced by BGP: the holder puts it in the
/// table its BIRD announces, the router learns the route and sends the replies there; when the
/// gateway moves to another node, the route moves with it (withdrawn by the first, announced
/// by the second) and traffic follows. The holders answer no ARP for it.
#[test]
fn an_egress_ip_from_a_third_range_follows_its_bgp_announcement() -> Result<()> {
    let mut cluster = builder()
        .with_node("node3", |n| n.label("egress", "true"))
        .build()?;
    let egress_ip = Ipv4Addr::new(10, 99, 2, 200);
    let mut pods = pods(&mut cluster, egress_ip)?;
    pods.truncate(1);
    cluster.update_objects(|o| o.set_gateway(gateway(GATEWAY, egress_ip).announce("Bgp")))?;
    let _bird = netlab::Bird::start(&cluster, &["node2", "node3"])?;
    let agents = start_agents(&cluster, &[])?;
    let result = bgp_moves(&mut cluster, &pods, egress_ip);
    with_agent_logs(&agents, result)
}

fn bgp_moves(cluster: &mut Cluster, pods: &[LabPod], egress_ip: Ipv4Addr) -> Result<()> {
    let via = |node: &str| -> Result<String> { Ok(format!("via {}", cluster.node(node)?.ip)) };
    let (node2, node3) = (via("node2")?, via("node3")?);
    netlab::wait_until(Duration::from_secs(20), || {
        router_route(cluster, egress_ip).is_ok_and(|r| r.contains(&node2))
    })
    .with_context(|| format!("the router never learned {egress_ip} via node2"))?;
    all_leave_with(cluster, pods, egress_ip)?;
    // Only node3 may hold it now.
    netlab::fixture::change(cluster, |o| {
        o.set_gateway(gateway(GATEWAY, egress_ip).announce("Bgp").node_selector(
            netlab::objects::match_labels([("kubernetes.io/hostname", "node3")]),
        ));
    })?;
    netlab::wait_until(Duration::from_secs(20), || {
        router_route(cluster, egress_ip).is_ok_and(|r| r.contains(&node3) && !r.contains(&node2))
    })
    .with_context(|| {
        format!(
            "the router's route did not move to node3: {:?}",
            router_route(cluster, egress_ip)
        )
    })?;
    let left = exec(
        &cluster.node("node2")?.netns,
        ["ip", "route", "show", "table", "1491"],
    )?;
    ensure!(left.trim().is_empty(), "node2 still announces: {left}");
    all_leave_with(cluster, pods, egress_ip)?;
    // Nobody answers ARP for it: it is routed, not on a link.
    let neighbours = exec(
        cluster.router_netns(),
        ["ip", "neigh", "show", &egress_ip.to_string()],
    )?;
    ensure!(
        neighbours.trim().is_empty(),
        "the router resolved {egress_ip} by ARP: {neighbours}"
    );
    Ok(())
}

/// `announce: None`: the holder answers no ARP for the egress IP, even inside its segment (the
/// router cannot resolve it, nothing comes back), until the operator routes the address to the
/// holder; then every connection leaves with it.
#[test]
fn an_egress_ip_announced_by_nobody_needs_the_operators_route() -> Result<()> {
    let mut cluster = builder().build()?;
    let egress_ip = Ipv4Addr::new(10, 99, 0, 210);
    let mut pods = pods(&mut cluster, egress_ip)?;
    pods.truncate(1);
    cluster.update_objects(|o| o.set_gateway(gateway(GATEWAY, egress_ip).announce("None")))?;
    let agents = start_agents(&cluster, &[])?;
    let result = operator_routes(&cluster, &pods, egress_ip);
    with_agent_logs(&agents, result)
}

fn operator_routes(cluster: &Cluster, pods: &[LabPod], egress_ip: Ipv4Addr) -> Result<()> {
    let holder = cluster.node("node2")?;
    ensure!(
        netlab::fixture::has_address(cluster, "node2", egress_ip)?,
        "node2 does not hold {egress_ip}"
    );
    let ip = egress_ip.to_string();
    let pinged = netlab::exec_output(
        cluster.router_netns(),
        ["ping", "-c", "2", "-W", "1", ip.as_str()],
    )?;
    ensure!(
        !pinged.status.success(),
        "the router reached {egress_ip} by ARP: the holder answered for it"
    );
    let answers = cluster
        .start_loop_with_timeout(&pods[0], LOOP_INTERVAL, 5, Duration::from_millis(300))?
        .wait(Duration::from_secs(30))?;
    ensure!(
        answers.iter().all(|a| matches!(a, Answer::Failed(_))),
        "answers came back without a route to {egress_ip}: {answers:?}"
    );
    exec(
        cluster.router_netns(),
        [
            "ip",
            "route",
            "add",
            ip.as_str(),
            "via",
            &holder.ip.to_string(),
        ],
    )?;
    all_leave_with(cluster, pods, egress_ip)
}

/// A local EC2 API (moto in server mode, PyPI's `moto[server]`) on the external host: the
/// VPC, one network interface per node that may hold (its private IP the node's address) and
/// an Elastic IP; `ask` runs a boto3 snippet against it and returns what it printed.
struct Ec2Api {
    server: std::process::Child,
    endpoint: String,
    netns: String,
}

const AWS_ENV: [(&str, &str); 3] = [
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
    ("AWS_REGION", "us-east-1"),
];

impl Ec2Api {
    fn start(cluster: &Cluster) -> Result<Self> {
        let host = cluster.ext_ip().to_string();
        let server = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                cluster.ext_netns(),
                "moto_server",
                "-H",
                &host,
                "-p",
                "5000",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(cluster.dir().join("moto.log"))?)
            .spawn()
            .context("running moto_server (`cargo xtask setup` installs moto[server])")?;
        let api = Self {
            server,
            endpoint: format!("http://{host}:5000"),
            netns: cluster.ext_netns().to_owned(),
        };
        netlab::wait_until(Duration::from_secs(20), || {
            api.ask("print(len(ec2.describe_regions()['Regions']))")
                .is_ok()
        })
        .context("moto_server did not answer")?;
        Ok(api)
    }

    fn ask(&self, snippet: &str) -> Result<String> {
        let script = format!(
            "import boto3, json\nec2 = boto3.client('ec2', endpoint_url='{}', region_name='us-east-1')\n{snippet}\n",
            self.endpoint
        );
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.netns, "python3", "-c", &script])
            .envs(AWS_ENV);
        let out = cmd.output()?;
        ensure!(
            out.status.success(),
            "boto3: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// The secondary private IPs of `eni`.
    fn secondary(&self, eni: &str) -> Result<String> {
        self.ask(&format!(
            "eni = ec2.describe_network_interfaces(NetworkInterfaceIds=['{eni}'])['NetworkInterfaces'][0]\n\
             print(sorted(a['PrivateIpAddress'] for a in eni['PrivateIpAddresses'] if not a['Primary']))"
        ))
    }

    /// The interface the Elastic IP `allocation` is associated with. (moto records the
    /// interface's primary address as the association's private IP whatever the request
    /// names, so only the interface is compared; the request names the egress IP.)
    fn association(&self, allocation: &str) -> Result<String> {
        self.ask(&format!(
            "a = ec2.describe_addresses(AllocationIds=['{allocation}'])['Addresses'][0]\n\
             print(a.get('NetworkInterfaceId'))"
        ))
    }
}

impl Drop for Ec2Api {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// `announce: Aws`: the holder assigns the egress IP to its network interface through the EC2
/// API and associates the gateway's Elastic IP with it; when the gateway moves to another node,
/// that node takes both over and the first gives the address up. Traffic keeps leaving with the
/// egress IP (the lab's segment still carries it by ARP, as the VPC would by the assignment).
#[test]
fn an_egress_ip_in_aws_moves_with_its_holder_through_the_ec2_api() -> Result<()> {
    let mut cluster = builder()
        .with_node("node3", |n| n.label("egress", "true"))
        .build()?;
    let api = Ec2Api::start(&cluster)?;
    let node_ip = |n: &str| -> Result<String> { Ok(cluster.node(n)?.ip.to_string()) };
    let created = api.ask(&format!(
        "vpc = ec2.create_vpc(CidrBlock='10.99.0.0/16')['Vpc']['VpcId']\n\
         subnet = ec2.create_subnet(VpcId=vpc, CidrBlock='10.99.0.0/24')['Subnet']['SubnetId']\n\
         enis = [ec2.create_network_interface(SubnetId=subnet, PrivateIpAddress=ip)['NetworkInterface']['NetworkInterfaceId'] for ip in ['{}', '{}']]\n\
         alloc = ec2.allocate_address(Domain='vpc')['AllocationId']\n\
         print(json.dumps({{'enis': enis, 'alloc': alloc}}))",
        node_ip("node2")?,
        node_ip("node3")?
    ))?;
    let created: serde_json::Value = serde_json::from_str(&created)?;
    let eni = |i: usize| created["enis"][i].as_str().unwrap_or_default().to_owned();
    let (eni2, eni3) = (eni(0), eni(1));
    let alloc = created["alloc"].as_str().unwrap_or_default().to_owned();

    let mut pods = pods(&mut cluster, EGRESS_IP)?;
    pods.truncate(1);
    cluster.update_objects(|o| o.set_gateway(gateway(GATEWAY, EGRESS_IP).announce("Aws")))?;
    let elastic = format!("{EGRESS_IP}={alloc}");
    let mut agents = Vec::new();
    for (node, interface) in [
        ("node1", None),
        ("node2", Some(&eni2)),
        ("node3", Some(&eni3)),
    ] {
        let mut args = vec![
            "--aws-endpoint".to_owned(),
            api.endpoint.clone(),
            "--aws-elastic-ip".to_owned(),
            elastic.clone(),
        ];
        if let Some(interface) = interface {
            args.extend(["--aws-interface".to_owned(), interface.clone()]);
        }
        let env: Vec<(&str, &std::ffi::OsStr)> = AWS_ENV
            .iter()
            .map(|(k, v)| (*k, std::ffi::OsStr::new(*v)))
            .collect();
        agents.push(cluster.start_agent_with_env(node, &args, &env)?);
    }
    netlab::fixture::wait_all_applied(&cluster)?;
    let result = aws_moves(&mut cluster, &api, &pods, (&eni2, &eni3), &alloc);
    with_agent_logs(&agents, result)
}

fn aws_moves(
    cluster: &mut Cluster,
    api: &Ec2Api,
    pods: &[LabPod],
    (eni2, eni3): (&str, &str),
    alloc: &str,
) -> Result<()> {
    let ip = EGRESS_IP.to_string();
    let listed = format!("['{ip}']");
    netlab::wait_until(Duration::from_secs(20), || {
        api.secondary(eni2).is_ok_and(|s| s == listed)
            && api.association(alloc).is_ok_and(|a| a == eni2)
    })
    .with_context(|| {
        format!(
            "node2's interface never got {ip} and its Elastic IP: {:?} {:?}",
            api.secondary(eni2),
            api.association(alloc)
        )
    })?;
    all_leave_with(cluster, pods, EGRESS_IP)?;
    netlab::fixture::change(cluster, |o| {
        o.set_gateway(gateway(GATEWAY, EGRESS_IP).announce("Aws").node_selector(
            netlab::objects::match_labels([("kubernetes.io/hostname", "node3")]),
        ));
    })?;
    netlab::wait_until(Duration::from_secs(20), || {
        api.secondary(eni3).is_ok_and(|s| s == listed)
            && api.secondary(eni2).is_ok_and(|s| s == "[]")
            && api.association(alloc).is_ok_and(|a| a == eni3)
    })
    .with_context(|| {
        format!(
            "{ip} did not move to node3's interface: node2 {:?}, node3 {:?}, Elastic IP {:?}",
            api.secondary(eni2),
            api.secondary(eni3),
            api.association(alloc)
        )
    })?;
    all_leave_with(cluster, pods, EGRESS_IP)
}
