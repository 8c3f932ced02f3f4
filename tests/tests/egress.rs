//! End to end: the real agent binary, real eBPF, nftables and routes, in a cluster of network
//! namespaces; each test asserts the source address the external server saw.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use ipnet::Ipv4Net;
use netlab::fixture::{
    APPLY, EGRESS_IP, GATEWAY, api_pod, change, expect_source, gateway, has_address, start_agents,
    status, three_nodes, wait_all_applied,
};
use netlab::objects::{FailurePolicy, match_labels};
use netlab::{AgentHandle, Cluster, PodSpec, PodStyle, expect_all_from, wait_until};

fn cluster() -> Result<Cluster> {
    three_nodes(env!("CARGO_BIN_EXE_se-probe").as_ref())
}

fn node_ip(cluster: &Cluster, node: &str) -> Result<Ipv4Addr> {
    Ok(cluster.node(node)?.ip)
}

#[test]
fn selected_pods_leave_with_the_egress_ip_from_every_node() -> Result<()> {
    let mut cluster = cluster()?;
    let on_other = api_pod(&mut cluster, "api-1", "node1")?;
    let on_gateway = api_pod(&mut cluster, "api-2", "node2")?;
    let on_third = api_pod(&mut cluster, "api-3", "node3")?;
    let unselected = cluster.add_pod(PodSpec::new("payments", "batch", "node1"))?;
    let _agents = start_agents(&cluster, &[])?;

    for pod in [&on_other, &on_gateway, &on_third] {
        expect_source(&cluster, pod, EGRESS_IP)?;
    }
    assert_eq!(cluster.ask(&unselected)?, node_ip(&cluster, "node1")?);
    assert!(has_address(&cluster, "node2", EGRESS_IP)?);
    assert!(!has_address(&cluster, "node3", EGRESS_IP)?);

    // Excluding the server's address sends the same pods out through their own nodes.
    let server = Ipv4Net::new(cluster.ext_ip(), 32)?;
    change(&mut cluster, |o| {
        if let Ok(g) = o.gateway_mut(GATEWAY) {
            g.excluded_cidrs = vec![server];
        }
    })?;
    assert_eq!(cluster.ask(&on_other)?, node_ip(&cluster, "node1")?);
    assert_eq!(cluster.ask(&on_gateway)?, node_ip(&cluster, "node2")?);
    assert_eq!(cluster.ask(&on_third)?, node_ip(&cluster, "node3")?);

    // So does a destination list that does not contain the server.
    change(&mut cluster, |o| {
        if let Ok(g) = o.gateway_mut(GATEWAY) {
            g.excluded_cidrs = vec![];
            g.destination_cidrs = Some(vec![
                Ipv4Net::new(Ipv4Addr::new(198, 51, 100, 0), 24).unwrap_or_default(),
            ]);
        }
    })?;
    assert_eq!(cluster.ask(&on_other)?, node_ip(&cluster, "node1")?);

    // Back to every destination; then a pod that leaves the objects is no longer selected.
    change(&mut cluster, |o| {
        if let Ok(g) = o.gateway_mut(GATEWAY) {
            g.destination_cidrs = None;
        }
    })?;
    expect_source(&cluster, &on_third, EGRESS_IP)?;
    change(&mut cluster, |o| {
        o.remove_pod("payments", "api-3");
    })?;
    assert_eq!(cluster.ask(&on_third)?, node_ip(&cluster, "node3")?);
    expect_source(&cluster, &on_other, EGRESS_IP)?;
    Ok(())
}

#[test]
fn annotation_from_a_namespace_not_admitted_is_ignored_until_admitted() -> Result<()> {
    let mut cluster = cluster()?;
    cluster.update_objects(|o| {
        o.namespace("web");
    })?;
    let pod = cluster.add_pod(PodSpec::new("web", "shop", "node1").gateway(GATEWAY))?;
    let agents = start_agents(&cluster, &[])?;
    assert_eq!(cluster.ask(&pod)?, node_ip(&cluster, "node1")?);
    let log = agents[0].log()?;
    ensure!(
        log.contains("gateway annotation ignored") && log.contains("web"),
        "no report of the ignored annotation:\n{log}"
    );

    change(&mut cluster, |o| {
        o.namespace("web")
            .labels
            .insert("team".into(), "payments".into());
    })?;
    expect_source(&cluster, &pod, EGRESS_IP)?;

    // A namespace annotation opts in every pod of an admitted namespace.
    let other = cluster.add_pod(PodSpec::new("web", "cart", "node3"))?;
    change(&mut cluster, |o| {
        o.namespace("web")
            .annotations
            .insert(netlab::objects::GATEWAY_ANNOTATION.into(), GATEWAY.into());
    })?;
    expect_source(&cluster, &other, EGRESS_IP)?;
    Ok(())
}

#[test]
fn next_eligible_node_takes_over_when_the_holder_is_not_ready() -> Result<()> {
    let mut cluster = cluster()?;
    let pod = api_pod(&mut cluster, "api-1", "node1")?;
    let _agents = start_agents(&cluster, &[])?;
    expect_source(&cluster, &pod, EGRESS_IP)?;
    assert!(has_address(&cluster, "node2", EGRESS_IP)?);

    change(&mut cluster, |o| {
        if let Ok(n) = o.node_mut("node2") {
            n.ready = false;
        }
    })?;
    // node2 still answers its probes: a planned move, which node3 makes four probe intervals
    // later, and node2 lets go two after that.
    wait_until(APPLY, || {
        netlab::fixture::holds_alone(&cluster, "node3", "node2", EGRESS_IP)
    })
    .context("node3 did not take the egress IP from node2")?;
    expect_source(&cluster, &pod, EGRESS_IP)?;
    let seen_from_node3 = status(&cluster, "node1")?["gateways"][0]["egress"][0][1].clone();
    assert_eq!(seen_from_node3, "node3");
    Ok(())
}

#[test]
fn restarting_agents_never_lets_a_pod_leave_with_its_node_address() -> Result<()> {
    let mut cluster = cluster()?;
    let on_other = api_pod(&mut cluster, "api-1", "node1")?;
    let on_gateway = api_pod(&mut cluster, "api-2", "node2")?;
    let mut agents = start_agents(&cluster, &[])?;
    expect_source(&cluster, &on_other, EGRESS_IP)?;
    expect_source(&cluster, &on_gateway, EGRESS_IP)?;

    let loops = [
        cluster.start_loop(&on_other, Duration::from_millis(20), 150)?,
        cluster.start_loop(&on_gateway, Duration::from_millis(20), 150)?,
    ];
    // A graceful stop of the origin node's agent and a crash of the gateway's; both pods keep
    // connecting while no agent runs on either node, then new agents adopt the data path.
    agents[0].stop()?;
    agents[1].kill()?;
    let done = |l: &netlab::ProbeLoop| l.answers().map(|a| a.len()).unwrap_or(0);
    let before: Vec<usize> = loops.iter().map(done).collect();
    wait_until(APPLY, || {
        loops.iter().zip(&before).all(|(l, b)| done(l) >= b + 20)
    })
    .context("the pods stopped connecting while the agents were down")?;
    let again = [
        cluster.start_agent("node1", std::iter::empty::<&str>())?,
        cluster.start_agent("node2", std::iter::empty::<&str>())?,
    ];
    wait_all_applied(&cluster)?;
    for probe in loops {
        let answers = probe.wait(Duration::from_secs(60))?;
        ensure!(
            answers.len() == 150,
            "the probe loop ended early: {} answers",
            answers.len()
        );
        expect_all_from(&answers, EGRESS_IP)?;
    }
    drop(again);
    Ok(())
}

#[test]
fn with_no_eligible_node_fail_closed_drops_and_fail_open_leaves_from_the_node() -> Result<()> {
    let mut cluster = cluster()?;
    let pod = api_pod(&mut cluster, "api-1", "node1")?;
    let _agents = start_agents(&cluster, &[])?;
    expect_source(&cluster, &pod, EGRESS_IP)?;

    change(&mut cluster, |o| {
        if let Ok(g) = o.gateway_mut(GATEWAY) {
            g.node_selector = match_labels([("egress", "nowhere")]);
            g.failure_policy = Some(FailurePolicy::FailClosed);
        }
    })?;
    assert!(!has_address(&cluster, "node2", EGRESS_IP)?);
    let refused = cluster.ask_timeout(&pod, Duration::from_millis(500));
    ensure!(refused.is_err(), "FailClosed let the pod out: {refused:?}");
    wait_until(APPLY, || {
        status(&cluster, "node1")
            .is_ok_and(|s| s["gateways"][0]["dropped"].as_u64().unwrap_or(0) > 0)
    })
    .context("the drops were not counted")?;

    change(&mut cluster, |o| {
        if let Ok(g) = o.gateway_mut(GATEWAY) {
            g.failure_policy = Some(FailurePolicy::FailOpen);
        }
    })?;
    assert_eq!(cluster.ask(&pod)?, node_ip(&cluster, "node1")?);

    // An eligible node again: back to the egress IP.
    change(&mut cluster, |o| {
        if let Ok(g) = o.gateway_mut(GATEWAY) {
            g.node_selector = match_labels([("egress", "true")]);
        }
    })?;
    expect_source(&cluster, &pod, EGRESS_IP)?;
    Ok(())
}

#[test]
fn bad_input_is_reported_and_the_last_good_state_stays() -> Result<()> {
    let mut cluster = cluster()?;
    let pod = api_pod(&mut cluster, "api-1", "node1")?;
    let mut agents = start_agents(&cluster, &[])?;
    expect_source(&cluster, &pod, EGRESS_IP)?;
    let log_has =
        |agents: &[AgentHandle], text: &str| agents[0].log().is_ok_and(|l| l.contains(text));

    // A file that is not YAML at all keeps everything as it was.
    cluster.update_objects(|o| o.raw.push("kind: [unclosed\n  : :".into()))?;
    wait_until(APPLY, || log_has(&agents, "keeping the last good snapshot"))
        .context("no report of the broken file")?;
    assert_eq!(cluster.ask(&pod)?, EGRESS_IP);

    // A gateway turned invalid keeps its last good version; a new invalid one is skipped.
    cluster.update_objects(|o| {
        o.raw.clear();
        o.remove_gateway(GATEWAY);
        o.raw.push(
            "apiVersion: static-egress.io/v1alpha1\nkind: EgressGateway\nmetadata: {name: corp-fw}\nspec:\n  egressIPs: [10.99.0.200]\n  nodeSelector: {matchLabels: {egress: 'true'}}\n  namespaceSelector: {matchLabels: {team: payments}}\n  podSelector: {matchLabels: {app: api}}\n  destinationCIDRs: [10.0.0.1/8]\n".into(),
        );
        o.raw.push(
            "apiVersion: static-egress.io/v1alpha1\nkind: EgressGateway\nmetadata: {name: broken}\nspec:\n  egressIPs: [10.99.0.300]\n  namespaceSelector: {}\n".into(),
        );
    })?;
    wait_until(APPLY, || {
        log_has(&agents, "keeping its last valid version") && log_has(&agents, "10.99.0.300")
    })
    .context("no report naming the bad gateways")?;
    assert_eq!(cluster.ask(&pod)?, EGRESS_IP);
    // An unknown gateway named by annotation and a pod whose address no interface routes.
    let stray =
        cluster.add_pod(PodSpec::new("payments", "stray", "node1").gateway("no-such-gateway"))?;
    change(&mut cluster, |o| {
        o.set_pod(
            netlab::objects::Pod::new("payments", "ghost")
                .label("app", "api")
                .node("node1")
                .ip(Ipv4Addr::new(10, 244, 1, 250)),
        );
    })?;
    wait_until(APPLY, || {
        log_has(&agents, "asks for no-such-gateway: no such gateway")
            && log_has(&agents, "Pod payments/ghost: no local interface")
    })
    .context("no report of the unknown gateway or the missing interface")?;
    assert_eq!(cluster.ask(&pod)?, EGRESS_IP);
    assert_eq!(cluster.ask(&stray)?, node_ip(&cluster, "node1")?);
    for agent in &mut agents {
        ensure!(agent.is_running(), "agent on {} died", agent.node());
    }
    Ok(())
}

#[test]
fn cleanup_restores_every_node_exactly_twice_in_a_row() -> Result<()> {
    let mut cluster = cluster()?;
    let pod = api_pod(&mut cluster, "api-1", "node1")?;
    let names: Vec<String> = cluster.nodes().iter().map(|n| n.name.clone()).collect();
    let before = names
        .iter()
        .map(|n| cluster.snapshot(n))
        .collect::<Result<Vec<_>>>()?;
    let mut agents = start_agents(&cluster, &[])?;
    expect_source(&cluster, &pod, EGRESS_IP)?;
    for agent in &mut agents {
        agent.stop()?;
    }
    for (name, before) in names.iter().zip(&before) {
        let first = cluster.cleanup(name)?;
        ensure!(
            first.contains("removed"),
            "{name}: first cleanup said {first:?}"
        );
        assert_eq!(
            &cluster.snapshot(name)?,
            before,
            "{name} differs after cleanup"
        );
        let second = cluster.cleanup(name)?;
        ensure!(
            second.contains("nothing to remove"),
            "{name}: second cleanup said {second:?}"
        );
        assert_eq!(
            &cluster.snapshot(name)?,
            before,
            "{name} differs after a second cleanup"
        );
    }
    assert_eq!(cluster.ask(&pod)?, node_ip(&cluster, "node1")?);
    Ok(())
}

#[test]
fn gateways_held_by_different_nodes_serve_pods_of_one_node() -> Result<()> {
    let second_ip = Ipv4Addr::new(10, 99, 0, 201);
    let mut cluster = Cluster::builder()
        .nodes(3)
        .with_node("node2", |n| n.label("egress", "true").label("site", "a"))
        .with_node("node3", |n| n.label("egress", "true").label("site", "b"))
        .probe_bin(env!("CARGO_BIN_EXE_se-probe"))
        .build()?;
    cluster.update_objects(|o| {
        o.namespace("payments")
            .labels
            .insert("team".into(), "payments".into());
        o.set_gateway(gateway(GATEWAY, EGRESS_IP).node_selector(match_labels([("site", "a")])));
        o.set_gateway(
            gateway("partner-api", second_ip)
                .node_selector(match_labels([("site", "b")]))
                .pod_selector(Some(match_labels([("app", "partner")]))),
        );
    })?;
    let first = api_pod(&mut cluster, "api-1", "node1")?;
    let second =
        cluster.add_pod(PodSpec::new("payments", "partner-1", "node1").label("app", "partner"))?;
    let _agents = start_agents(&cluster, &[])?;
    expect_source(&cluster, &first, EGRESS_IP)?;
    expect_source(&cluster, &second, second_ip)?;
    assert!(has_address(&cluster, "node2", EGRESS_IP)?);
    assert!(has_address(&cluster, "node3", second_ip)?);
    Ok(())
}

#[test]
fn other_names_addresses_and_loose_rp_filter() -> Result<()> {
    let egress_ip = Ipv4Addr::new(172, 31, 5, 250);
    let mut cluster = Cluster::builder()
        .tag("alt")
        .nodes(2)
        .uplink_name("ens5")
        .node_subnet(Ipv4Net::new(Ipv4Addr::new(172, 31, 5, 0), 24)?)
        .pod_supernet(Ipv4Net::new(Ipv4Addr::new(10, 50, 0, 0), 16)?)
        .rp_filter(2)
        .with_node("node2", |n| {
            n.label("egress", "true").pod_style(PodStyle::Bridged)
        })
        .probe_bin(env!("CARGO_BIN_EXE_se-probe"))
        .build()?;
    cluster.update_objects(|o| {
        o.namespace("payments")
            .labels
            .insert("team".into(), "payments".into());
        o.set_gateway(gateway(GATEWAY, egress_ip));
    })?;
    let remote = api_pod(&mut cluster, "api-1", "node1")?;
    let local = api_pod(&mut cluster, "api-2", "node2")?;
    // Another fwmark bit, table and rule priority, as on a node where the defaults are taken.
    cluster.write_objects()?;
    let flags = [
        "--fwmark",
        "0x40000",
        "--route-table",
        "77",
        "--rule-priority",
        "2000",
    ];
    let _agents = ["node1", "node2"]
        .iter()
        .map(|n| cluster.start_agent(n, flags))
        .collect::<Result<Vec<_>>>()?;
    wait_all_applied(&cluster)?;
    let rules = cluster.node("node1")?.exec(["ip", "rule"])?;
    ensure!(
        rules.contains("2000:\tfrom all fwmark 0x40000/0x40000 lookup 77"),
        "{rules}"
    );

    expect_source(&cluster, &remote, egress_ip)?;
    expect_source(&cluster, &local, egress_ip)?;
    Ok(())
}

#[test]
fn file_changes_reach_the_data_path_quickly() -> Result<()> {
    let mut cluster = cluster()?;
    let pod = api_pod(&mut cluster, "api-1", "node1")?;
    // The gateway nodes first, so that what is measured is this node's agent alone.
    cluster.write_objects()?;
    let mut agents = ["node2", "node3"]
        .iter()
        .map(|n| cluster.start_agent(n, std::iter::empty::<&str>()))
        .collect::<Result<Vec<_>>>()?;
    cluster.wait_applied("node2", APPLY)?;
    cluster.wait_applied("node3", APPLY)?;
    assert_eq!(cluster.ask(&pod)?, node_ip(&cluster, "node1")?);
    let probe = cluster.start_loop(&pod, Duration::from_millis(2), 5000)?;
    let started = Instant::now();
    agents.push(cluster.start_agent("node1", std::iter::empty::<&str>())?);
    let first_marked = loop {
        if probe
            .answers()?
            .iter()
            .any(|a| a.source() == Some(EGRESS_IP))
        {
            break started.elapsed();
        }
        ensure!(
            started.elapsed() < APPLY,
            "no connection left with the egress IP"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    let answers = probe.stop()?;
    let lost = answers.iter().filter(|a| a.source().is_none()).count();
    ensure!(
        lost == 0,
        "{lost} connections failed while the agent started: {answers:?}"
    );
    // Once marking starts, every connection leaves with the egress IP.
    let sources: Vec<_> = answers.iter().filter_map(netlab::Answer::source).collect();
    let first = sources
        .iter()
        .position(|ip| *ip == EGRESS_IP)
        .unwrap_or(sources.len());
    ensure!(
        sources[first..].iter().all(|ip| *ip == EGRESS_IP),
        "connections left with other addresses after the first marked one: {sources:?}"
    );

    let mut latencies = Vec::new();
    for i in 0..40 {
        let t = Instant::now();
        cluster.update_objects(|o| {
            if let Ok(p) = o.pod_mut("payments", "api-1") {
                p.labels.insert("round".into(), i.to_string());
            }
        })?;
        cluster.wait_applied("node1", APPLY)?;
        latencies.push(t.elapsed());
    }
    latencies.sort();
    let p50 = latencies[latencies.len() / 2];
    let p99 = latencies[latencies.len() * 99 / 100];
    eprintln!(
        "agent start to first connection with the egress IP: {first_marked:?}; file change to applied on node1: p50 {p50:?}, p99 {p99:?} over {} changes",
        latencies.len()
    );
    ensure!(
        p99 < Duration::from_secs(1),
        "file change took {p99:?} at p99"
    );
    Ok(())
}

#[test]
fn several_egress_ips_spread_over_eligible_nodes_and_pods() -> Result<()> {
    let second = Ipv4Addr::new(10, 99, 0, 201);
    let mut cluster = cluster()?;
    cluster.update_objects(|o| {
        if let Ok(g) = o.gateway_mut(GATEWAY) {
            g.egress_ips.push(second);
        }
    })?;
    let pods = (1..=6)
        .map(|i| api_pod(&mut cluster, &format!("api-{i}"), "node1"))
        .collect::<Result<Vec<_>>>()?;
    let _agents = start_agents(&cluster, &[])?;
    // The first IP goes to the first eligible node, the second to the next one.
    assert!(has_address(&cluster, "node2", EGRESS_IP)?);
    assert!(has_address(&cluster, "node3", second)?);
    let status = status(&cluster, "node1")?;
    let mut used = std::collections::BTreeSet::new();
    for pod in &pods {
        let want: Ipv4Addr = status["pods"]
            .as_array()
            .and_then(|all| all.iter().find(|p| p["ip"] == pod.ip.to_string()))
            .and_then(|p| p["egress_ip"].as_str())
            .context("pod missing from status.json")?
            .parse()?;
        expect_source(&cluster, pod, want)?;
        used.insert(want);
    }
    ensure!(used.len() == 2, "six pods all hashed to {used:?}");
    Ok(())
}
