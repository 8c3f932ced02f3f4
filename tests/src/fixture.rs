//! The cluster most end-to-end tests start from, so that they differ only in what they test.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use crate::objects::{EgressGateway, Objects, match_labels};
use crate::{AgentHandle, Cluster, ClusterBuilder, LabPod, PodSpec, PodStyle, wait_until};

/// How long the tests give the agents to apply a change.
pub const APPLY: Duration = Duration::from_secs(20);

pub const GATEWAY: &str = "corp-fw";
pub const EGRESS_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 200);

/// A gateway for pods labelled `app=api` in namespaces labelled `team=payments`, held by nodes
/// labelled `egress=true`.
pub fn gateway(name: &str, ip: Ipv4Addr) -> EgressGateway {
    EgressGateway::new(name)
        .egress_ip(ip)
        .node_selector(match_labels([("egress", "true")]))
        .namespace_selector(Some(match_labels([("team", "payments")])))
        .pod_selector(Some(match_labels([("app", "api")])))
}

/// Three nodes: node1 (routed pods, not eligible), node2 (bridged pods, eligible: the holder),
/// node3 (routed pods, eligible); namespace `payments` admitted by [`GATEWAY`].
pub fn three_nodes(probe_bin: &Path) -> Result<Cluster> {
    three_nodes_from(Cluster::builder().probe_bin(probe_bin))
}

/// [`three_nodes`] from a builder that says where the binaries are and how the lab is named.
pub fn three_nodes_from(builder: ClusterBuilder) -> Result<Cluster> {
    let mut cluster = builder
        .nodes(3)
        .with_node("node2", |n| {
            n.pod_style(PodStyle::Bridged).label("egress", "true")
        })
        .with_node("node3", |n| n.label("egress", "true"))
        .build()?;
    payments_gateway(&mut cluster, EGRESS_IP)?;
    Ok(cluster)
}

/// Namespace `payments` admitted by [`GATEWAY`], which leaves with `egress_ip`.
pub fn payments_gateway(cluster: &mut Cluster, egress_ip: Ipv4Addr) -> Result<()> {
    cluster.update_objects(|o| {
        o.namespace("payments")
            .labels
            .insert("team".into(), "payments".into());
        o.set_gateway(gateway(GATEWAY, egress_ip));
    })?;
    Ok(())
}

/// 30 connections from each of `pods`, 20 ms apart, all at once: every one answered, with
/// `egress_ip`.
pub fn all_leave_with(cluster: &Cluster, pods: &[LabPod], egress_ip: Ipv4Addr) -> Result<()> {
    let loops = pods
        .iter()
        .map(|p| cluster.start_loop(p, Duration::from_millis(20), 30))
        .collect::<Result<Vec<_>>>()?;
    for (pod, answers) in pods.iter().zip(loops) {
        let answers = answers.wait(Duration::from_secs(60))?;
        crate::expect_all_from(&answers, egress_ip)
            .with_context(|| format!("pod {} on {}", pod.name, pod.node))?;
    }
    Ok(())
}

/// A pod labelled `app=api` in namespace `payments` (selected by [`GATEWAY`]).
pub fn api_pod(cluster: &mut Cluster, name: &str, node: &str) -> Result<LabPod> {
    cluster.add_pod(PodSpec::new("payments", name, node).label("app", "api"))
}

/// Writes the objects (pods added so far included), starts an agent with `extra_args` on every
/// node and waits until each has applied them.
pub fn start_agents(cluster: &Cluster, extra_args: &[&str]) -> Result<Vec<AgentHandle>> {
    cluster.write_objects()?;
    let names: Vec<String> = cluster.nodes().iter().map(|n| n.name.clone()).collect();
    let agents = names
        .iter()
        .map(|n| cluster.start_agent(n, extra_args))
        .collect::<Result<Vec<_>>>()?;
    wait_all_applied(cluster)?;
    Ok(agents)
}

/// Changes the objects and waits until every agent has applied them.
pub fn change(cluster: &mut Cluster, edit: impl FnOnce(&mut Objects)) -> Result<()> {
    cluster.update_objects(edit)?;
    wait_all_applied(cluster)
}

/// Passes `result` on; when it is a failure (or `SE_SHOW_LOGS` is set, to see where the time
/// goes), the agents' last words go with it: a failure in CI is all there is to go by.
pub fn with_agent_logs<T>(agents: &[AgentHandle], result: Result<T>) -> Result<T> {
    if result.is_err() || std::env::var_os("SE_SHOW_LOGS").is_some() {
        for agent in agents {
            let log = agent
                .log()
                .unwrap_or_else(|e| format!("(cannot read its log: {e:#})"));
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- agent on {} ---", agent.node());
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
    result
}

pub fn wait_all_applied(cluster: &Cluster) -> Result<()> {
    for node in cluster.nodes() {
        cluster.wait_applied(&node.name, APPLY)?;
    }
    Ok(())
}

/// Asks until the answer is `want` (other nodes may still be catching up) and returns how long
/// that took. Only for waiting: a test that must rule out a leak counts every answer instead.
pub fn expect_source(cluster: &Cluster, pod: &LabPod, want: Ipv4Addr) -> Result<Duration> {
    let started = Instant::now();
    let mut last = None;
    wait_until(APPLY, || {
        last = Some(
            cluster
                .ask_timeout(pod, Duration::from_millis(500))
                .map_err(|e| e.to_string()),
        );
        matches!(&last, Some(Ok(ip)) if *ip == want)
    })
    .with_context(|| {
        format!(
            "pod {}/{}: wanted {want}, last answer {last:?}",
            pod.namespace, pod.name
        )
    })?;
    Ok(started.elapsed())
}

/// Whether `ip` is a /32 on `node`'s uplink.
pub fn has_address(cluster: &Cluster, node: &str, ip: Ipv4Addr) -> Result<bool> {
    let node = cluster.node(node)?;
    let out = node.exec(["ip", "-o", "-4", "addr", "show", "dev", &node.uplink])?;
    Ok(out.contains(&format!(" {ip}/32 ")))
}

/// Whether `node` has `ip` on its uplink and `other` has not (an error counts as not).
pub fn holds_alone(cluster: &Cluster, node: &str, other: &str, ip: Ipv4Addr) -> bool {
    has_address(cluster, node, ip).unwrap_or(false)
        && !has_address(cluster, other, ip).unwrap_or(true)
}

/// The agent's `status.json` on `node`.
pub fn status(cluster: &Cluster, node: &str) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(cluster.node(node)?.status_path())?;
    Ok(serde_json::from_str(&text)?)
}

/// `static-egress status --output <output>` on `node`, in its namespace: the counters read
/// from the kernel now.
pub fn live_status(cluster: &Cluster, node: &str, output: &str) -> Result<String> {
    let lab_node = cluster.node(node)?;
    let bin = cluster.agent_bin()?;
    lab_node.exec([
        bin.display().to_string(),
        "status".to_owned(),
        "--state-dir".to_owned(),
        lab_node.state_dir.display().to_string(),
        "--bpffs".to_owned(),
        lab_node.bpffs.display().to_string(),
        "--output".to_owned(),
        output.to_owned(),
    ])
}

/// Packets `node`'s programs took out of the tunnel and put into it themselves.
pub fn tunnel_counts(cluster: &Cluster, node: &str) -> Result<(u64, u64)> {
    let status: serde_json::Value = serde_json::from_str(&live_status(cluster, node, "json")?)?;
    let count = |field: &str| {
        status["guard"][field]
            .as_u64()
            .with_context(|| format!("no guard.{field} in {status}"))
    };
    Ok((count("tunnel_in")?, count("tunnel_out")?))
}

/// Stops `agent` (SIGTERM), starts a new one on its node with `args` and waits until it has
/// applied the objects itself (its predecessor's status does not count).
pub fn restart_agent(
    cluster: &Cluster,
    agent: &mut AgentHandle,
    args: &[&str],
) -> Result<AgentHandle> {
    agent.stop()?;
    let node = agent.node().to_owned();
    let status = cluster.node(&node)?.status_path();
    match std::fs::remove_file(&status) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", status.display()));
        }
        _ => {}
    }
    let again = cluster.start_agent(&node, args)?;
    cluster.wait_applied(&node, APPLY)?;
    Ok(again)
}

/// `static-egress health [--ready]` for `node`: its stdout, or its stderr as the error.
pub fn health(cluster: &Cluster, node: &str, ready: bool) -> Result<String> {
    let node = cluster.node(node)?;
    let bin = cluster.agent_bin()?;
    let mut args = vec![
        bin.display().to_string(),
        "health".into(),
        "--state-dir".into(),
        node.state_dir.display().to_string(),
    ];
    if ready {
        args.push("--ready".into());
    }
    let out = crate::exec_output(&node.netns, &args)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        anyhow::bail!("{}", String::from_utf8_lossy(&out.stderr).trim())
    }
}

/// Which ways [`transfers`] moves its 4 MB.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Ways {
    /// From the pod to the external server.
    Up,
    /// Up, then from the server back to the pod.
    UpAndDown,
}

/// 4 MB from `pod` to the external server, and with [`Ways::UpAndDown`] 4 MB back, with iperf3
/// on `port` (segmentation offload on, as a pod's TCP stack sends): each completes, and the
/// server saw every connection come from the egress IP.
pub fn transfers(cluster: &Cluster, pod: &LabPod, port: u16, ways: Ways) -> Result<()> {
    let log = cluster.dir().join("iperf3.log");
    let port = port.to_string();
    crate::exec(
        cluster.ext_netns(),
        ["iperf3", "-s", "-D", "-p", &port, "--logfile"]
            .iter()
            .map(std::ffi::OsStr::new)
            .chain([log.as_os_str()]),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let ext = cluster.ext_ip().to_string();
    let directions: &[bool] = match ways {
        Ways::Up => &[false],
        Ways::UpAndDown => &[false, true],
    };
    for &reverse in directions {
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
    anyhow::ensure!(
        from.len() == directions.len() && from.iter().all(|l| l.contains(&EGRESS_IP.to_string())),
        "the server saw: {from:?}"
    );
    Ok(())
}
