//! The agent shares the kernel hooks it uses: a program attached after ours on a pod interface
//! or on the uplink (both ways), as a TCX link or as a legacy tc filter, still sees every packet
//! that ours neither drops nor redirects.

use std::net::Ipv4Addr;

use anyhow::{Result, ensure};
use netlab::counter::{Counted, TcCounter, TcHook, TcMode};
use netlab::fixture::{
    EGRESS_IP, GATEWAY, api_pod, expect_source, gateway, has_address, payments_gateway,
    start_agents, tunnel_counts, with_agent_logs,
};
use netlab::objects::match_labels;
use netlab::{Cluster, LabPod, PodSpec};

const PINGS: u64 = 20;

fn ping(cluster: &Cluster, pod: &LabPod) -> Result<()> {
    let ext = cluster.ext_ip().to_string();
    let count = PINGS.to_string();
    // Every request must be answered: then the counters below must show each one exactly.
    pod.exec(["ping", "-q", "-c", &count, "-i", "0.02", "-W", "2", &ext])?;
    Ok(())
}

#[test]
fn programs_after_ours_see_every_packet_we_neither_drop_nor_redirect() -> Result<()> {
    // Two gateways held by different nodes serve pods of node1: its uplink program then
    // redirects every marked packet to the holder of the pod's egress IP.
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
    ensure!(
        has_address(&cluster, "node2", EGRESS_IP)? && has_address(&cluster, "node3", second_ip)?
    );

    let node1 = cluster.node("node1")?;
    let sources = [first.ip, second.ip];
    let mut counters = Vec::new();
    for mode in [TcMode::Tcx, TcMode::Legacy] {
        for pod in [&first, &second] {
            let counter =
                TcCounter::attach(node1, &pod.host_veth, TcHook::Ingress, mode, &sources)?;
            counters.push((
                format!("{mode:?} ingress of {}", pod.host_veth),
                counter,
                Some(pod.ip),
            ));
        }
        let counter = TcCounter::attach(node1, &node1.uplink, TcHook::Egress, mode, &sources)?;
        counters.push((
            format!("{mode:?} egress of {}", node1.uplink),
            counter,
            None,
        ));
    }

    // On the holder, ours marks what other nodes' pods send out through it, then hands it on.
    let node2 = cluster.node("node2")?;
    let mut on_holder = Vec::new();
    for mode in [TcMode::Tcx, TcMode::Legacy] {
        let counter = TcCounter::attach(node2, &node2.uplink, TcHook::Ingress, mode, &[first.ip])?;
        on_holder.push((
            format!("{mode:?} ingress of node2's {}", node2.uplink),
            counter,
        ));
    }

    for pod in [&first, &second] {
        ping(&cluster, pod)?;
    }
    for (place, counter) in &on_holder {
        seen_once_marked(counter, first.ip, place)?;
    }
    for (place, counter, only) in &counters {
        for pod in [&first, &second] {
            let seen = counter.read(pod.ip)?;
            let want = match only {
                // A pod interface carries only its own pod's packets, each marked by ours.
                Some(ip) if *ip == pod.ip => Counted {
                    packets: PINGS,
                    marked: PINGS,
                    wrapped: 0,
                },
                Some(_) => Counted::default(),
                // On the uplink, ours took the bit off before handing the packet to the holder.
                None => Counted {
                    packets: PINGS,
                    marked: 0,
                    wrapped: 0,
                },
            };
            ensure!(
                seen == want,
                "{place}: {}'s echo requests counted {seen:?}, wanted {want:?}",
                pod.name
            );
        }
    }
    // Still leaving with their egress IPs, with the counters in place.
    expect_source(&cluster, &first, EGRESS_IP)?;
    expect_source(&cluster, &second, second_ip)?;
    Ok(())
}

/// Two nodes, node2 holding the egress IP of node1's pod.
fn one_holder() -> Result<(Cluster, LabPod)> {
    let mut cluster = Cluster::builder()
        .nodes(2)
        .with_node("node2", |n| n.label("egress", "true"))
        .probe_bin(env!("CARGO_BIN_EXE_se-probe"))
        .build()?;
    payments_gateway(&mut cluster, EGRESS_IP)?;
    let pod = api_pod(&mut cluster, "api-1", "node1")?;
    Ok((cluster, pod))
}

/// The counter saw each request of the pings from `src` once, as the pod sent it, with our bit.
fn seen_once_marked(counter: &TcCounter, src: Ipv4Addr, place: &str) -> Result<()> {
    let seen = counter.read(src)?;
    let want = Counted {
        packets: PINGS,
        marked: PINGS,
        wrapped: 0,
    };
    ensure!(seen == want, "{place}: counted {seen:?}, wanted {want:?}");
    Ok(())
}

#[test]
fn a_single_holder_is_reached_by_routing_from_the_start() -> Result<()> {
    // One node holds the egress IP of all of node1's selected pods: our table routes their
    // packets to it, and the uplink program leaves them be once it sees them addressed to
    // the holder's link-layer address (a redirect would take each packet through the
    // uplink's hook twice, and the programs after ours would see it without our bit).
    let (cluster, pod) = one_holder()?;
    let node1 = cluster.node("node1")?;
    let counter = TcCounter::attach(node1, &node1.uplink, TcHook::Egress, TcMode::Tcx, &[pod.ip])?;
    let agents = start_agents(&cluster, &[])?;
    let result = (|| {
        ping(&cluster, &pod)?;
        // Routed, not redirected: each request leaves with our bit still on it.
        seen_once_marked(&counter, pod.ip, "node1's uplink")?;
        expect_source(&cluster, &pod, EGRESS_IP)?;
        Ok(())
    })();
    with_agent_logs(&agents, result)
}

#[test]
fn a_single_holder_through_the_tunnel_gets_each_packet_wrapped_in_one_pass() -> Result<()> {
    // The same through the tunnel, the holder on the uplink's subnet: our table routes to it,
    // and the uplink program wraps each packet addressed to it and lets it go on, where a
    // redirect would take it through the uplink's hook a second time, wrapped. A counter in
    // front of ours sees the packet as it comes, and would see that second pass too.
    let (cluster, pod) = one_holder()?;
    let agents = start_agents(&cluster, &["--tunnel", "always"])?;
    let result = (|| {
        expect_source(&cluster, &pod, EGRESS_IP)?;
        let node1 = cluster.node("node1")?;
        let first = TcMode::TcxFirst;
        let counter = TcCounter::attach(node1, &node1.uplink, TcHook::Egress, first, &[pod.ip])?;
        ping(&cluster, &pod)?;
        seen_once_marked(&counter, pod.ip, "node1's uplink, in front of our program")?;
        // Wrapped all the same: the holder unwrapped each one.
        let (unwrapped, _) = tunnel_counts(&cluster, "node2")?;
        ensure!(
            unwrapped >= PINGS,
            "node2 unwrapped {unwrapped} packets, wanted at least {PINGS}"
        );
        Ok(())
    })();
    with_agent_logs(&agents, result)
}
