//! No leak at pod start: pods wired by Debian's real CNI plugins (`bridge`, `ptp`, with their
//! own `ipMasq`), with `static-egress-cni` chained after them, invoked as a container runtime
//! invokes a conflist. Each pod connects out the moment its ADD returns (when its containers
//! would start), and every answer the external server gave is counted: not one may carry a
//! node's address. The kubelet's report of the pod's address comes a second later, as in a
//! cluster; a node without the plugin shows the leak that the plugin closes.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use netlab::fixture::{APPLY, with_agent_logs};
use netlab::objects::{EgressGateway, Pod, match_labels};
use netlab::{AgentHandle, Answer, Cluster, CniPlugin, LabPod, PodSpec, expect_none_leaked};
use serde_json::{Value, json};

/// Held by node1, where the chained pods run.
const HERE: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 201);
/// Held by node2.
const THERE: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 202);
/// The kubelet reports a pod's address this long after its containers started.
const REPORT_AFTER: Duration = Duration::from_millis(1500);
const LOOP_INTERVAL: Duration = Duration::from_millis(50);
const LOOP_COUNT: u32 = 60;
const CONNECT_TIMEOUT: Duration = Duration::from_millis(300);

/// node1 (`bridge` plugin, egress=here), node2 (lab pods, egress=there), node3 (`ptp` plugin);
/// gateways `here` and `there`, which pods pick by annotation.
fn lab() -> Result<Cluster> {
    let mut cluster = Cluster::builder()
        .probe_bin(env!("CARGO_BIN_EXE_se-probe"))
        .nodes(3)
        .with_node("node1", |n| {
            n.cni_plugin(CniPlugin::Bridge).label("egress", "here")
        })
        .with_node("node2", |n| n.label("egress", "there"))
        .with_node("node3", |n| n.cni_plugin(CniPlugin::Ptp))
        .build()?;
    cluster.update_objects(|o| {
        o.namespace("shop");
        for (name, ip, nodes) in [("here", HERE, "here"), ("there", THERE, "there")] {
            o.set_gateway(
                EgressGateway::new(name)
                    .egress_ip(ip)
                    .node_selector(match_labels([("egress", nodes)])),
            );
        }
    })?;
    Ok(cluster)
}

/// `static-egress-cni` as the agent installs it, asking `node`'s agent.
fn plugin(cluster: &Cluster, node: &str, unclassified: &str) -> Result<Value> {
    let socket = cluster.node(node)?.state_dir.join("cni.sock");
    Ok(json!({"type": "static-egress-cni", "socket": socket, "unclassified": unclassified}))
}

fn chain(cluster: &mut Cluster, node: &str, unclassified: &str) -> Result<()> {
    let plugin = plugin(cluster, node, unclassified)?;
    cluster.set_chained(node, vec![plugin])
}

fn start_agents(cluster: &Cluster) -> Result<Vec<AgentHandle>> {
    netlab::fixture::start_agents(cluster, &[])
}

/// The Pod object the API server has before the runtime starts the pod: its node and labels,
/// no address.
fn scheduled(cluster: &mut Cluster, name: &str, node: &str, gateway: &str) -> Result<()> {
    cluster.update_objects(|o| {
        o.set_pod(
            Pod::new("shop", name)
                .node(node)
                .annotation("static-egress.io/gateway", gateway),
        );
    })?;
    netlab::fixture::wait_all_applied(cluster)
}

/// Starts the pod through the node's conflist and at once connects out from it.
fn start_pod(cluster: &mut Cluster, name: &str, node: &str, gateway: &str) -> Result<Started> {
    let pod = cluster.add_pod(
        PodSpec::new("shop", name, node)
            .gateway(gateway)
            .unreported(),
    )?;
    let answers =
        cluster.start_loop_with_timeout(&pod, LOOP_INTERVAL, LOOP_COUNT, CONNECT_TIMEOUT)?;
    Ok(Started { pod, answers })
}

struct Started {
    pod: LabPod,
    answers: netlab::ProbeLoop,
}

/// What the external server saw of a pod, in order, each answer with when it came.
fn finish(started: Started) -> Result<(LabPod, Vec<(Duration, Answer)>)> {
    let answers = started.answers.wait_timed(Duration::from_secs(60))?;
    Ok((started.pod, answers))
}

/// A pod selected by a gateway this node holds leaves with its egress IP from its very first
/// connection; one whose egress IP another node holds is held until the kubelet reports its
/// address, then leaves with the egress IP; never with a node's address. On node3, without
/// the plugin, the same pod's first connections leave with node3's address: the window is real.
#[test]
fn a_pod_leaves_with_its_egress_ip_from_its_first_connection() -> Result<()> {
    let mut cluster = lab()?;
    chain(&mut cluster, "node1", "hold")?;
    let agents = start_agents(&cluster)?;
    let result = first_connections(&mut cluster);
    with_agent_logs(&agents, result)
}

fn first_connections(cluster: &mut Cluster) -> Result<()> {
    let pods = [
        ("local", "node1", "here"),
        ("remote", "node1", "there"),
        ("unchained", "node3", "there"),
    ];
    for (name, node, gateway) in pods {
        scheduled(cluster, name, node, gateway)?;
    }
    let mut started = Vec::new();
    for (name, node, gateway) in pods {
        started.push(start_pod(cluster, name, node, gateway)?);
    }
    std::thread::sleep(REPORT_AFTER);
    for (name, ..) in pods {
        cluster.report_pod("shop", name)?;
    }
    cluster.write_objects()?;
    let mut seen = Vec::new();
    for s in started {
        seen.push(finish(s)?);
    }
    let [
        (local, local_seen),
        (remote, remote_seen),
        (_, unchained_seen),
    ] = &seen[..]
    else {
        unreachable!("three pods");
    };
    let only = |answers: &[(Duration, Answer)]| -> Vec<Answer> {
        answers.iter().map(|(_, a)| a.clone()).collect()
    };
    eprintln!("local: {:?}", summary(local_seen));
    eprintln!("remote: {:?}", summary(remote_seen));
    eprintln!("unchained: {:?}", summary(unchained_seen));

    // Every connection of the local pod answered, from the first one, with the egress IP.
    netlab::expect_all_from(&only(local_seen), HERE)
        .with_context(|| format!("pod {} on node1, gateway here", local.name))?;
    // The remote one: none with a node's address; the egress IP once reported.
    let through = expect_none_leaked(&only(remote_seen), THERE)
        .with_context(|| format!("pod {} on node1, gateway there", remote.name))?;
    ensure!(through > 0, "pod remote never left with {THERE}");
    // Without the plugin: the first connections left with node3's address.
    let node3 = cluster.node("node3")?.ip;
    let leaked = unchained_seen
        .iter()
        .filter(|(_, a)| a.source() == Some(node3))
        .count();
    ensure!(
        leaked > 0,
        "the unchained pod never left with node3's address {node3}: the lab shows no window"
    );
    Ok(())
}

/// Answers by source, in the order they first came, with their count.
fn summary(answers: &[(Duration, Answer)]) -> Vec<(String, usize)> {
    let mut out: Vec<(String, usize)> = Vec::new();
    for (_, answer) in answers {
        let key = match answer {
            Answer::From(ip) => ip.to_string(),
            Answer::Failed(_) => "failed".to_owned(),
        };
        match out.last_mut() {
            Some((last, n)) if *last == key => *n += 1,
            _ => out.push((key, 1)),
        }
    }
    out
}

/// A pod the agent does not know yet (its watch is behind) is held until it does; while the
/// agent does not answer, the ADD fails so that the runtime tries again (`hold`), or the pod
/// starts unclassified (`allow`).
#[test]
fn unknown_pods_are_held_and_pods_wait_for_an_agent_that_does_not_answer() -> Result<()> {
    let mut cluster = lab()?;
    chain(&mut cluster, "node1", "hold")?;
    let mut agents = start_agents(&cluster)?;
    let result = unknown_and_unanswered(&mut cluster, &mut agents);
    with_agent_logs(&agents, result)
}

fn unknown_and_unanswered(cluster: &mut Cluster, agents: &mut [AgentHandle]) -> Result<()> {
    // Not in the objects the agent has: its traffic out is dropped, not sent with node1's
    // address.
    let ghost = start_pod(cluster, "ghost", "node1", "here")?;
    // Held, it still reaches the cluster (here, another node's address).
    let node2 = cluster.node("node2")?.ip.to_string();
    ghost
        .pod
        .exec(["ping", "-c", "1", "-W", "1", node2.as_str()])
        .context("a held pod cannot reach the cluster")?;
    std::thread::sleep(REPORT_AFTER);
    let status = netlab::fixture::status(cluster, "node1")?;
    ensure!(
        status["held"][0]["pod"] == "shop/ghost",
        "node1's status does not show the held pod: {status}"
    );
    cluster.report_pod("shop", "ghost")?;
    cluster.write_objects()?;
    let (_, seen) = finish(ghost)?;
    eprintln!("ghost: {:?}", summary(&seen));
    let answers: Vec<Answer> = seen.into_iter().map(|(_, a)| a).collect();
    let through = expect_none_leaked(&answers, HERE)?;
    ensure!(through > 0, "the held pod never left with {HERE}");

    // The agent stops: the runtime's ADD fails and the pod does not start.
    let node1 = agents
        .iter_mut()
        .find(|a| a.node() == "node1")
        .context("node1's agent")?;
    node1.stop()?;
    let error = match cluster.add_pod(PodSpec::new("shop", "late", "node1").gateway("here")) {
        Ok(_) => anyhow::bail!("a pod started while node1's agent did not answer"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        error.contains("could not program pod shop/late"),
        "unexpected error: {error}"
    );
    // With `allow`, it starts, unclassified.
    chain(cluster, "node1", "allow")?;
    let allowed = cluster.add_pod(PodSpec::new("shop", "late", "node1").gateway("here"))?;
    ensure!(allowed.node == "node1");
    Ok(())
}

/// The agent chains the plugin into the node's first conflist once it has programmed the node,
/// copies the plugin's binary, puts the entry back when the CNI rewrites its list, and the
/// runtime's ADD through the installed entry works; `cleanup` with the same flags takes both
/// out.
#[test]
fn the_agent_installs_the_plugin_and_cleanup_takes_it_out() -> Result<()> {
    let mut cluster = lab()?;
    let conf_dir = cluster.dir().join("net.d");
    let bin_dir = cluster.dir().join("cni-bin");
    std::fs::create_dir_all(&conf_dir)?;
    std::fs::create_dir_all(&bin_dir)?;
    let list = conf_dir.join("10-lab.conflist");
    let original = json!({"cniVersion": "1.0.0", "name": "lab",
        "plugins": [{"type": "bridge"}, {"type": "portmap"}]});
    std::fs::write(&list, original.to_string())?;
    std::fs::write(conf_dir.join("99-later.conflist"), original.to_string())?;
    cluster.write_objects()?;
    let flags = cni_flags(&conf_dir, &bin_dir);
    let mut args = flags.clone();
    args.extend(["--resync-interval".into(), "500ms".into()]);
    let agent = cluster.start_agent("node1", &args)?;
    cluster.wait_applied("node1", APPLY)?;
    let result = installed(&mut cluster, &list, &original, &bin_dir);
    let mut agents = vec![agent];
    let result = with_agent_logs(&agents, result);
    agents[0].stop()?;
    result?;
    let said = cluster.cleanup_with("node1", &flags)?;
    ensure!(said.contains("removed"), "cleanup: {said}");
    let left: Value = serde_json::from_slice(&std::fs::read(&list)?)?;
    ensure!(left == original, "after cleanup: {left}");
    ensure!(!bin_dir.join("static-egress-cni").exists());
    Ok(())
}

fn cni_flags(conf_dir: &Path, bin_dir: &Path) -> Vec<String> {
    vec![
        "--cni-conf-dir".into(),
        conf_dir.display().to_string(),
        "--cni-bin-dir".into(),
        bin_dir.display().to_string(),
    ]
}

fn installed(cluster: &mut Cluster, list: &Path, original: &Value, bin_dir: &Path) -> Result<()> {
    let ours = |list: &Path| -> Result<Option<Value>> {
        let value: Value = serde_json::from_slice(&std::fs::read(list)?)?;
        Ok(value["plugins"]
            .as_array()
            .and_then(|p| p.last())
            .filter(|p| p["type"] == "static-egress-cni")
            .cloned())
    };
    netlab::wait_until(APPLY, || ours(list).ok().flatten().is_some())
        .context("the plugin was never chained")?;
    let entry = ours(list)?.context("chained")?;
    let binary: PathBuf = bin_dir.join("static-egress-cni");
    ensure!(
        binary.is_file(),
        "no plugin binary in {}",
        bin_dir.display()
    );
    let later: Value =
        serde_json::from_slice(&std::fs::read(list.with_file_name("99-later.conflist"))?)?;
    ensure!(
        &later == original,
        "a list the runtime does not use changed"
    );

    // The CNI rewrote its list: the entry is back at the next resync.
    std::fs::write(list, original.to_string())?;
    netlab::wait_until(Duration::from_secs(5), || {
        ours(list).ok().flatten().is_some()
    })
    .context("the entry did not come back")?;

    // The entry the agent wrote, run by the runtime: the pod starts programmed.
    cluster.update_objects(|o| {
        o.set_pod(
            Pod::new("shop", "installed")
                .node("node1")
                .annotation("static-egress.io/gateway", "here"),
        );
    })?;
    cluster.wait_applied("node1", APPLY)?;
    cluster.set_chained("node1", vec![entry])?;
    let started = start_pod(cluster, "installed", "node1", "here")?;
    let (_, seen) = finish(started)?;
    let answers: Vec<Answer> = seen.into_iter().map(|(_, a)| a).collect();
    netlab::expect_all_from(&answers, HERE)
}
