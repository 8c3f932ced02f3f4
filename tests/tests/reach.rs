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

/// The BGP side of the router and of each node that may hold: BIRD (Debian's `bird2`), as an
/// operator runs it. Nodes announce what the agent puts in `--announce-table` (1491); the router
/// takes it into its main table. Short timers, so that a move shows within a second or two.
struct Bird {
    daemons: Vec<std::process::Child>,
}

impl Drop for Bird {
    fn drop(&mut self) {
        for daemon in &mut self.daemons {
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
    }
}

const ROUTER_AS: u32 = 65000;
const NODES_AS: u32 = 65001;
const BGP_TIMERS: &str = "hold time 3; keepalive time 1; connect retry time 1;";

impl Bird {
    fn start(cluster: &Cluster, nodes: &[&str]) -> Result<Self> {
        let router = cluster.router_ip();
        let mut neighbours = String::new();
        for node in nodes {
            let ip = cluster.node(node)?.ip;
            neighbours.push_str(&format!(
                "protocol bgp {node} {{ local as {ROUTER_AS}; neighbor {ip} as {NODES_AS}; \
                 {BGP_TIMERS} ipv4 {{ import all; export none; }}; }}\n"
            ));
        }
        let router_conf = format!(
            "router id {router};\nprotocol device {{ scan time 1; }}\n\
             protocol kernel {{ ipv4 {{ import none; export all; }}; }}\n{neighbours}"
        );
        let mut bird = Self {
            daemons: Vec::new(),
        };
        bird.spawn(cluster, cluster.router_netns(), "router", &router_conf)?;
        for node in nodes {
            let lab_node = cluster.node(node)?;
            let conf = format!(
                "router id {ip};\nprotocol device {{ scan time 1; }}\n\
                 protocol kernel {{ kernel table 1491; learn; scan time 1; \
                 ipv4 {{ import all; export none; }}; }}\n\
                 protocol bgp fabric {{ local as {NODES_AS}; neighbor {router} as {ROUTER_AS}; \
                 {BGP_TIMERS} ipv4 {{ import none; export all; }}; }}\n",
                ip = lab_node.ip
            );
            bird.spawn(cluster, &lab_node.netns, node, &conf)?;
        }
        Ok(bird)
    }

    fn spawn(&mut self, cluster: &Cluster, netns: &str, name: &str, conf: &str) -> Result<()> {
        let dir = cluster.dir();
        let conf_path = dir.join(format!("bird-{name}.conf"));
        std::fs::write(&conf_path, conf)?;
        let daemon = std::process::Command::new("ip")
            .args(["netns", "exec", netns, "bird", "-f", "-c"])
            .arg(&conf_path)
            .arg("-s")
            .arg(dir.join(format!("bird-{name}.ctl")))
            .arg("-P")
            .arg(dir.join(format!("bird-{name}.pid")))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("bird-{name}.log")))?)
            .spawn()
            .context("running bird (Debian's bird2; `cargo xtask setup` installs it)")?;
        self.daemons.push(daemon);
        Ok(())
    }
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
    let _bird = Bird::start(&cluster, &["node2", "node3"])?;
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
