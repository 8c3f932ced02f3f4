//! What keeps the agent from harming the node it runs on: it owns its rule and table and
//! nothing else, repairs drift of what it owns, keeps serving the gateways it can when one
//! cannot be programmed, and translates only traffic that came from the cluster.

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use netlab::fixture::{
    EGRESS_IP, api_pod, expect_source, has_address, restart_agent, start_agents, three_nodes,
};
use netlab::{Cluster, LabNode, LabPod, expect_all_from, wait_until};

fn cluster() -> Result<Cluster> {
    three_nodes(env!("CARGO_BIN_EXE_se-probe").as_ref())
}

fn rules(cluster: &Cluster, node: &str) -> Result<String> {
    cluster.node(node)?.exec(["ip", "-4", "rule", "show"])
}

fn table(cluster: &Cluster, node: &str, table: u32) -> Result<String> {
    cluster
        .node(node)?
        .exec(["ip", "-4", "route", "show", "table", &table.to_string()])
}

#[test]
fn rules_of_others_stay_and_ours_move_with_the_flags() -> Result<()> {
    let mut cluster = cluster()?;
    let pod = api_pod(&mut cluster, "api-1", "node1")?;
    // Someone else's rules at our priority: one with another selector, one with our mark
    // but another table; and how `ip rule` shows them.
    let foreign = [
        (
            "from 192.0.2.1 lookup main",
            "1490:\tfrom 192.0.2.1 lookup main",
        ),
        (
            "fwmark 0x2000/0x2000 lookup 100",
            "1490:\tfrom all fwmark 0x2000/0x2000 lookup 100",
        ),
    ];
    let node1 = cluster.node("node1")?;
    for (rule, _) in foreign {
        let mut args = vec!["ip", "rule", "add", "priority", "1490"];
        args.extend(rule.split(' '));
        node1.exec(args)?;
    }
    let mut agents = start_agents(&cluster, &[])?;
    expect_source(&cluster, &pod, EGRESS_IP)?;
    let before = rules(&cluster, "node1")?;
    ensure!(
        before.contains("1490:\tfrom all fwmark 0x2000/0x2000 lookup 1490"),
        "our rule is missing:\n{before}"
    );

    // New flags on node1, while the pod keeps connecting: every answer must come from the
    // egress IP, and nothing of the old settings may stay behind.
    let probe = cluster.start_loop(&pod, Duration::from_millis(20), 100)?;
    let moved = [
        "--fwmark",
        "0x10000",
        "--route-table",
        "1500",
        "--rule-priority",
        "1500",
    ];
    let moved_agent = restart_agent(&cluster, &mut agents[0], &moved)?;
    let answers = probe.wait(Duration::from_secs(60))?;
    ensure!(answers.len() == 100, "the probe ended early: {answers:?}");
    expect_all_from(&answers, EGRESS_IP)?;

    let after = rules(&cluster, "node1")?;
    ensure!(
        after.contains("1500:\tfrom all fwmark 0x10000/0x10000 lookup 1500"),
        "the new rule is missing:\n{after}"
    );
    ensure!(
        !after.contains("lookup 1490"),
        "the old rule stayed:\n{after}"
    );
    ensure!(
        table(&cluster, "node1", 1490)?.trim().is_empty(),
        "the old table kept routes"
    );
    ensure!(!table(&cluster, "node1", 1500)?.trim().is_empty());
    // Cleanup removes ours and only ours.
    drop(moved_agent);
    cluster.cleanup("node1")?;
    let cleaned = rules(&cluster, "node1")?;
    ensure!(
        !cleaned.contains("lookup 1500"),
        "cleanup left our rule:\n{cleaned}"
    );
    for (rule, shown) in foreign {
        ensure!(
            after.contains(shown) && cleaned.contains(shown),
            "someone else's rule {rule:?} is gone:\n{after}\nafter cleanup:\n{cleaned}"
        );
    }
    Ok(())
}

/// Waits until `restored` holds, then until the pod leaves with the egress IP again.
fn repaired(
    cluster: &Cluster,
    pod: &LabPod,
    what: &str,
    mut restored: impl FnMut() -> bool,
) -> Result<()> {
    wait_until(Duration::from_secs(10), &mut restored)
        .with_context(|| format!("{what}: not repaired"))?;
    expect_source(cluster, pod, EGRESS_IP).with_context(|| format!("after {what}"))?;
    Ok(())
}

fn nft_table(node: &LabNode) -> String {
    node.exec(["nft", "list", "table", "ip", "static_egress"])
        .unwrap_or_default()
}

fn ifindex(node: &LabNode, interface: &str) -> Result<String> {
    let out = node.exec(["ip", "-o", "link", "show", "dev", interface])?;
    out.split(':')
        .next()
        .map(str::to_owned)
        .context("odd `ip link` output")
}

#[test]
fn drift_of_what_is_ours_is_repaired_at_the_next_resync() -> Result<()> {
    let mut cluster = cluster()?;
    let pod = api_pod(&mut cluster, "api-1", "node1")?;
    let _agents = start_agents(&cluster, &["--resync-interval", "1s"])?;
    expect_source(&cluster, &pod, EGRESS_IP)?;
    let node1 = cluster.node("node1")?;
    let node2 = cluster.node("node2")?;

    node2.exec(["nft", "delete", "table", "ip", "static_egress"])?;
    repaired(&cluster, &pod, "our table deleted on the holder", || {
        nft_table(node2).contains("snat to 10.99.0.200")
    })?;

    node1.exec([
        "nft",
        "flush",
        "chain",
        "ip",
        "static_egress",
        "postrouting",
    ])?;
    repaired(&cluster, &pod, "our chain flushed on the origin", || {
        nft_table(node1).contains("keep source of marked pod traffic")
    })?;

    node1.exec(["ip", "rule", "del", "priority", "1490"])?;
    repaired(&cluster, &pod, "our rule deleted", || {
        rules(&cluster, "node1").is_ok_and(|r| r.contains("lookup 1490"))
    })?;

    node1.exec(["ip", "route", "flush", "table", "1490"])?;
    repaired(&cluster, &pod, "our table's routes flushed", || {
        table(&cluster, "node1", 1490).is_ok_and(|t| t.contains("default via 10.99.0.12"))
    })?;

    node2.exec(["ip", "addr", "del", "10.99.0.200/32", "dev", &node2.uplink])?;
    repaired(&cluster, &pod, "the egress address removed", || {
        has_address(&cluster, "node2", EGRESS_IP).unwrap_or(false)
    })?;

    let link = node1
        .bpffs
        .join("static-egress/links")
        .join(format!("ingress-{}", ifindex(node1, &pod.host_veth)?));
    node1.exec([
        "bpftool",
        "link",
        "detach",
        "pinned",
        &link.display().to_string(),
    ])?;
    // Unmarked, the pod's traffic leaves through the CNI's masquerade with node1's address.
    ensure!(
        cluster.ask(&pod)? == node1.ip,
        "the program still ran after its link was detached"
    );
    repaired(
        &cluster,
        &pod,
        "our program detached from the pod's interface",
        || cluster.ask(&pod).is_ok_and(|ip| ip == EGRESS_IP),
    )?;

    cluster.rewire_pod("payments", "api-1")?;
    repaired(&cluster, &pod, "the pod's interface re-created", || {
        cluster.ask(&pod).is_ok_and(|ip| ip == EGRESS_IP)
    })?;
    Ok(())
}
