//! What keeps the agent from harming the node it runs on: it owns its rule and table and
//! nothing else, repairs drift of what it owns, keeps serving the gateways it can when one
//! cannot be programmed, and translates only traffic that came from the cluster.

use std::time::Duration;

use anyhow::{Result, ensure};
use netlab::fixture::{
    EGRESS_IP, api_pod, expect_source, restart_agent, start_agents, three_nodes,
};
use netlab::{Cluster, expect_all_from};

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
