//! What keeps the agent from harming the node it runs on: it owns its rule and table and
//! nothing else, repairs drift of what it owns, keeps serving the gateways it can when one
//! cannot be programmed, and translates only traffic that came from the cluster.

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use ipnet::Ipv4Net;
use netlab::fixture::{
    EGRESS_IP, GATEWAY, api_pod, change, expect_source, gateway, has_address, live_status,
    restart_agent, start_agents, status, three_nodes, wait_all_applied, with_agent_logs,
};
use netlab::objects::match_labels;
use netlab::{Cluster, LabNode, LabPod, PodSpec, expect_all_from, expect_none_leaked, wait_until};

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

/// The id of the BPF link pinned at `path` (an attachment made again is a new link).
fn link_id(node: &LabNode, path: &str) -> Result<String> {
    let out = node.exec(["bpftool", "link", "show", "pinned", path])?;
    out.split(':')
        .next()
        .map(|id| id.trim().to_owned())
        .context("odd `bpftool link` output")
}

#[test]
fn drift_of_what_is_ours_is_repaired_at_the_next_resync() -> Result<()> {
    let mut cluster = cluster()?;
    let pod = api_pod(&mut cluster, "api-1", "node1")?;
    // Pins of an earlier version's maps: replaced, then removed.
    let old_maps = cluster.node("node1")?.bpffs.join("static-egress/maps");
    std::fs::create_dir_all(&old_maps)?;
    let _agents = start_agents(&cluster, &["--resync-interval", "1s"])?;
    ensure!(!old_maps.exists(), "the maps of an earlier layout stayed");
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
    // Unmarked, the pod's traffic leaves through the CNI's masquerade with node1's address.
    // A resync between the detach and the question attaches the program again (a new link,
    // pinned at the same path): then the detach is repeated, so that the repair below is one.
    let link = link.display().to_string();
    let mut unmarked = false;
    for _ in 0..5 {
        let detached = link_id(node1, &link)?;
        node1.exec(["bpftool", "link", "detach", "pinned", &link])?;
        if cluster.ask(&pod)? == node1.ip {
            unmarked = true;
            break;
        }
        ensure!(
            link_id(node1, &link)? != detached,
            "the program still ran after its link was detached"
        );
    }
    ensure!(
        unmarked,
        "every detach was repaired before the pod's next connection"
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

/// A stand-in for `nft` first on the agents' PATH: it refuses every script that mentions
/// `poison`, and hands everything else to the real one.
fn refusing_nft(cluster: &Cluster, poison: &str) -> Result<OsString> {
    let dir = cluster.dir().join("refusing-nft");
    std::fs::create_dir_all(&dir)?;
    let real = ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
        .context("nft is not installed")?;
    let script = format!(
        "#!/bin/sh\n\
         # Refuses any ruleset that mentions {poison}, as nftables would refuse a bad one.\n\
         case \"$*\" in *-f*) input=$(cat);; *) exec {real} \"$@\";; esac\n\
         case \"$input\" in *{poison}*) echo 'Error: refused by the test' >&2; exit 1;; esac\n\
         printf '%s\\n' \"$input\" | exec {real} \"$@\"\n"
    );
    let path = dir.join("nft");
    std::fs::write(&path, script)?;
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&path)
        .status()?;
    let mut search = OsString::from(dir.as_os_str());
    search.push(":");
    search.push(std::env::var_os("PATH").unwrap_or_default());
    Ok(search)
}

/// `count` /32 prefixes, every other address of 100.64.0.0/10 so that none merge.
fn scattered(count: u32) -> Vec<Ipv4Net> {
    (0..count)
        .filter_map(|i| Ipv4Net::new(Ipv4Addr::from(0x6440_0000 + 2 * i), 32).ok())
        .collect()
}

#[test]
fn a_gateway_that_cannot_be_programmed_leaves_the_others_working() -> Result<()> {
    let partner_ip = Ipv4Addr::new(10, 99, 0, 201);
    let mut cluster = Cluster::builder()
        .nodes(3)
        .with_node("node2", |n| n.label("egress", "true").label("site", "a"))
        .with_node("node3", |n| n.label("egress", "true").label("site", "b"))
        .probe_bin(env!("CARGO_BIN_EXE_se-probe"))
        .build()?;
    // A name as long as Kubernetes allows: four labels of 60 characters.
    let long_name = ["partner", "b", "c", "d"]
        .map(|label| format!("{label:-<60}"))
        .join(".");
    cluster.update_objects(|o| {
        o.namespace("payments")
            .labels
            .insert("team".into(), "payments".into());
        o.set_gateway(gateway(GATEWAY, EGRESS_IP).node_selector(match_labels([("site", "a")])));
        o.set_gateway(
            gateway(&long_name, partner_ip)
                .node_selector(match_labels([("site", "b")]))
                .pod_selector(Some(match_labels([("app", "partner")]))),
        );
    })?;
    let api = api_pod(&mut cluster, "api-1", "node1")?;
    let partner =
        cluster.add_pod(PodSpec::new("payments", "partner-1", "node1").label("app", "partner"))?;
    cluster.write_objects()?;
    let path = refusing_nft(&cluster, "198.18.0.0/15")?;
    let agents = ["node1", "node2", "node3"]
        .into_iter()
        .map(|node| {
            cluster.start_agent_with_env(node, std::iter::empty::<&str>(), &[("PATH", &path)])
        })
        .collect::<Result<Vec<_>>>()?;
    wait_all_applied(&cluster)?;
    expect_source(&cluster, &api, EGRESS_IP)?;
    expect_source(&cluster, &partner, partner_ip).context("a gateway with a 243-character name")?;

    // A gateway with more destinations than the kernel map holds is left out, and everything
    // else keeps working through the change: every answer counts.
    let probe = cluster.start_loop(&api, Duration::from_millis(20), 100)?;
    change(&mut cluster, |o| {
        let mut huge = gateway("huge", Ipv4Addr::new(10, 99, 0, 202));
        huge.destination_cidrs = Some(scattered(65_537));
        o.set_gateway(huge);
    })?;
    expect_source(&cluster, &partner, partner_ip)?;
    let answers = probe.wait(Duration::from_secs(60))?;
    ensure!(answers.len() == 100, "the probe ended early: {answers:?}");
    expect_all_from(&answers, EGRESS_IP)?;
    for agent in &agents {
        let log = agent.log()?;
        ensure!(
            log.contains("gateway huge left out: it needs 65537 destination entries"),
            "{} does not say why huge is left out:\n{log}",
            agent.node()
        );
    }

    // nftables refuses the long-named gateway's new version on its holder: the holder keeps
    // its last accepted SNAT, and the other gateway is not disturbed.
    let probe = cluster.start_loop(&api, Duration::from_millis(20), 50)?;
    change(&mut cluster, |o| {
        if let Ok(g) = o.gateway_mut(&long_name) {
            g.destination_cidrs = Some(vec![
                Ipv4Net::new(Ipv4Addr::UNSPECIFIED, 0).unwrap_or_default(),
                Ipv4Net::new(Ipv4Addr::new(198, 18, 0, 0), 15).unwrap_or_default(),
            ]);
        }
    })?;
    let answers = probe.wait(Duration::from_secs(60))?;
    expect_all_from(&answers, EGRESS_IP)?;
    for _ in 0..5 {
        ensure!(
            cluster.ask(&partner)? == partner_ip,
            "the refused gateway lost its last accepted SNAT"
        );
    }
    let log = agents[2].log()?;
    ensure!(
        log.contains("nftables refused the SNAT for 10.99.0.201")
            && log.contains("keeping its last accepted SNAT"),
        "node3 does not say what it refused:\n{log}"
    );
    Ok(())
}

#[test]
fn egress_ips_that_belong_to_others_are_never_taken() -> Result<()> {
    let mut cluster = cluster()?;
    let api = api_pod(&mut cluster, "api-1", "node1")?;
    let plain1 = cluster.add_pod(PodSpec::new("payments", "batch-1", "node1"))?;
    let plain3 = cluster.add_pod(PodSpec::new("payments", "batch-3", "node3"))?;
    let router = cluster.router_ip();
    let node3_ip = cluster.node("node3")?.ip;
    cluster.update_objects(|o| {
        // node2, first eligible by name, would hold both.
        for (name, ip) in [("node3-ip", node3_ip), ("router-ip", router)] {
            o.set_gateway(gateway(name, ip).pod_selector(Some(match_labels([("app", "nothing")]))));
        }
    })?;
    let agents = start_agents(&cluster, &[])?;
    expect_source(&cluster, &api, EGRESS_IP)?;

    for ip in [router, node3_ip] {
        for node in ["node2", "node3"] {
            ensure!(
                !has_address(&cluster, node, ip)? || (node == "node3" && ip == node3_ip),
                "{node} took {ip}"
            );
        }
    }
    // The segment still works: the router and node3 answer for their own addresses.
    ensure!(cluster.ask(&plain1)? == cluster.node("node1")?.ip);
    ensure!(cluster.ask(&plain3)? == node3_ip);
    let node2_log = agents[1].log()?;
    ensure!(
        node2_log.contains(&format!(
            "egress IP {router} is a next hop of this node's routes (its gateway); this node \
             does not take it"
        )),
        "node2 does not say why it refuses the router's address:\n{node2_log}"
    );
    ensure!(
        node2_log.contains(&format!(
            "gateway node3-ip left out: egress IP {node3_ip} is the InternalIP of node node3"
        )),
        "node2 does not say why node3-ip is left out:\n{node2_log}"
    );
    Ok(())
}

/// Echo requests `ext` has received from `source` so far (an nftables counter of the test's
/// own, in ext's namespace).
fn echo_requests_from(cluster: &Cluster, source: Ipv4Addr) -> Result<u64> {
    let listing = netlab::exec(
        cluster.ext_netns(),
        ["nft", "list", "chain", "ip", "seen", "input"],
    )?;
    let marker = format!("ip saddr {source} icmp type echo-request counter packets ");
    let line = listing
        .lines()
        .find(|l| l.contains(&marker))
        .with_context(|| format!("no counter for {source}:\n{listing}"))?;
    let count = line
        .split(&marker)
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .context("odd counter line")?;
    Ok(count.parse()?)
}

/// The holder (node2) counted `want` packets dropped for coming from a host that is no node.
fn foreign_dropped(cluster: &Cluster, want: u64) -> Result<()> {
    let status: serde_json::Value = serde_json::from_str(&live_status(cluster, "node2", "json")?)?;
    ensure!(
        status["guard"]["foreign"] == want,
        "the holder did not count the {want} spoofed packets it dropped: {}",
        status["guard"]
    );
    Ok(())
}

#[test]
fn the_holder_translates_only_traffic_from_cluster_nodes() -> Result<()> {
    let mut cluster = cluster()?;
    let api = api_pod(&mut cluster, "api-1", "node1")?;
    let agents = start_agents(&cluster, &[])?;
    with_agent_logs(&agents, spoofed_and_real(&cluster, &api))
}

fn spoofed_and_real(cluster: &Cluster, api: &LabPod) -> Result<()> {
    expect_source(cluster, api, EGRESS_IP)?;
    netlab::exec(
        cluster.ext_netns(),
        [
            "nft",
            &format!(
                "add table ip seen; add chain ip seen input {{ type filter hook input priority 0; }}; \
                 add rule ip seen input ip saddr {EGRESS_IP} icmp type echo-request counter"
            ),
        ],
    )?;

    // A host on the nodes' segment sends as api-1, through the holder.
    let node2 = cluster.node("node2")?.ip;
    let spoofer = cluster.add_segment_host("spoofer", Ipv4Addr::new(10, 99, 0, 66))?;
    let ext = cluster.ext_ip().to_string();
    netlab::exec(
        &spoofer,
        [
            "ip",
            "addr",
            "add",
            &format!("{}/32", api.ip),
            "dev",
            "eth0",
        ],
    )?;
    netlab::exec(
        &spoofer,
        [
            "ip",
            "route",
            "add",
            &format!("{ext}/32"),
            "via",
            &node2.to_string(),
            "src",
            &api.ip.to_string(),
        ],
    )?;
    let _unanswered = netlab::exec_output(
        &spoofer,
        ["ping", "-q", "-c", "10", "-i", "0.05", "-W", "1", &ext],
    )?;
    ensure!(
        echo_requests_from(cluster, EGRESS_IP)? == 0,
        "the spoofer's packets left with the egress IP"
    );
    foreign_dropped(cluster, 10)?;

    // The same spoofer sends as api-1 through the tunnel: VXLAN to the holder's tunnel port,
    // the inner frame addressed as a node's would be. Only nodes may send into the tunnel.
    let node = |cmd: &str| -> Result<String> {
        netlab::exec(&spoofer, cmd.split_whitespace().collect::<Vec<_>>())
    };
    let mac = |bytes: [u8; 6]| {
        bytes
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    node(&format!(
        "ip link add spoof type vxlan id {} dstport {} remote {node2} local 10.99.0.66 dev eth0",
        static_egress_common::tunnel::VNI,
        static_egress_common::tunnel::DEFAULT_PORT
    ))?;
    node(&format!(
        "ip link set spoof address {} up",
        mac(static_egress_common::tunnel::SOURCE_MAC)
    ))?;
    node(&format!(
        "ip route replace {ext}/32 dev spoof src {}",
        api.ip
    ))?;
    node(&format!(
        "ip neigh replace {ext} lladdr {} dev spoof nud permanent",
        mac(static_egress_common::tunnel::MAC)
    ))?;
    let _unanswered = netlab::exec_output(
        &spoofer,
        ["ping", "-q", "-c", "10", "-i", "0.05", "-W", "1", &ext],
    )?;
    ensure!(
        echo_requests_from(cluster, EGRESS_IP)? == 0,
        "the spoofer's tunnel packets left with the egress IP"
    );
    foreign_dropped(cluster, 20)?;

    // The real pod still leaves with it.
    let pinged = netlab::exec_output(
        &api.netns,
        ["ping", "-c", "10", "-i", "0.05", "-W", "1", &ext],
    )?;
    let seen = echo_requests_from(cluster, EGRESS_IP)?;
    ensure!(
        seen == 10,
        "the server saw {seen} of the pod's 10 echo requests with the egress IP:\n{}",
        String::from_utf8_lossy(&pinged.stdout)
    );
    expect_source(cluster, api, EGRESS_IP)?;
    Ok(())
}

#[test]
fn selected_traffic_never_leaves_with_another_address_without_our_rule_or_table() -> Result<()> {
    let mut cluster = cluster()?;
    let on_origin = api_pod(&mut cluster, "api-1", "node1")?;
    let on_holder = api_pod(&mut cluster, "api-2", "node2")?;
    // No repair during the test: the kernel programs alone must hold the line.
    let mut agents = start_agents(&cluster, &["--resync-interval", "300s"])?;
    expect_source(&cluster, &on_origin, EGRESS_IP)?;
    expect_source(&cluster, &on_holder, EGRESS_IP)?;

    let loops = [
        cluster.start_loop(&on_origin, Duration::from_millis(20), 200)?,
        cluster.start_loop(&on_holder, Duration::from_millis(20), 200)?,
    ];
    std::thread::sleep(Duration::from_millis(300));
    // The origin loses its rule: its table no longer takes its pod's packets to the holder,
    // and the main table would send them, with the pod's address, to the router.
    cluster
        .node("node1")?
        .exec(["ip", "rule", "del", "priority", "1490"])?;
    std::thread::sleep(Duration::from_millis(1500));
    expect_source(&cluster, &on_origin, EGRESS_IP).context("without the rule")?;
    // The holder loses its SNAT: node1's pod's packets and its own pod's would be
    // masqueraded to node2's address.
    cluster
        .node("node2")?
        .exec(["nft", "delete", "table", "ip", "static_egress"])?;
    // Long enough for connections that time out (2 s) to be tried again.
    std::thread::sleep(Duration::from_millis(2500));
    // The origin loses its identity SNAT too: its pod's packets would leave masqueraded to
    // node1's address before reaching the holder.
    cluster
        .node("node1")?
        .exec(["nft", "delete", "table", "ip", "static_egress"])?;
    std::thread::sleep(Duration::from_millis(2500));
    for (node, agent) in [("node1", 0), ("node2", 1)] {
        let again = restart_agent(&cluster, &mut agents[agent], &[])?;
        agents[agent] = again;
        ensure!(nft_table(cluster.node(node)?).contains("static_egress"));
    }
    for probe in loops {
        let answers = probe.wait(Duration::from_secs(60))?;
        ensure!(answers.len() == 200, "the probe ended early: {answers:?}");
        let good = expect_none_leaked(&answers, EGRESS_IP)?;
        ensure!(good > 0, "no connection succeeded: {answers:?}");
    }
    for node in ["node1", "node2"] {
        let dropped = status(&cluster, node)?["guard"]["dropped"]
            .as_u64()
            .unwrap_or(0);
        ensure!(dropped > 0, "{node} counted no dropped packet");
    }
    Ok(())
}

#[test]
fn a_lookalike_rule_of_someone_else_neither_stops_the_agent_nor_is_deleted() -> Result<()> {
    let mut cluster = cluster()?;
    let pod = api_pod(&mut cluster, "api-1", "node1")?;
    // Our mark and table, plus a selector of theirs, at our priority, before ours.
    let theirs = "1490:\tfrom all fwmark 0x2000/0x2000 iif lo lookup 1490";
    cluster.node("node1")?.exec([
        "ip",
        "rule",
        "add",
        "priority",
        "1490",
        "iif",
        "lo",
        "fwmark",
        "0x2000/0x2000",
        "lookup",
        "1490",
    ])?;
    let mut agents = start_agents(&cluster, &[])?;
    expect_source(&cluster, &pod, EGRESS_IP)?;
    let both = rules(&cluster, "node1")?;
    ensure!(
        both.contains(theirs) && both.contains("1490:\tfrom all fwmark 0x2000/0x2000 lookup 1490"),
        "ours and theirs should both be there:\n{both}"
    );

    // Deleting ours would delete theirs, listed first: cleanup refuses and says whose it is.
    agents[0].stop()?;
    let refused = cluster.cleanup("node1").err().map(|e| format!("{e:#}"));
    ensure!(
        refused.as_deref().is_some_and(|e| e.contains("iif lo")),
        "cleanup should refuse and name the rule in the way: {refused:?}"
    );
    ensure!(
        rules(&cluster, "node1")?.contains(theirs),
        "their rule is gone"
    );
    Ok(())
}
