//! The cluster most end-to-end tests start from, so that they differ only in what they test.

use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::Result;

use crate::objects::{EgressGateway, match_labels};
use crate::{Cluster, PodStyle};

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
    let mut cluster = Cluster::builder()
        .nodes(3)
        .with_node("node2", |n| {
            n.pod_style(PodStyle::Bridged).label("egress", "true")
        })
        .with_node("node3", |n| n.label("egress", "true"))
        .probe_bin(probe_bin)
        .build()?;
    cluster.update_objects(|o| {
        o.namespace("payments")
            .labels
            .insert("team".into(), "payments".into());
        o.set_gateway(gateway(GATEWAY, EGRESS_IP));
    })?;
    Ok(cluster)
}
