//! The log lines that say what a new plan changed: holders, selected pods, refusals.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use crate::plan::{Health, NodePlan};

/// Logs what `new` changes from `old` (everything, at the first plan).
pub fn log(old: Option<&NodePlan>, new: &NodePlan, health: &Health) {
    let holders = |p: &NodePlan| -> BTreeMap<Ipv4Addr, Option<String>> {
        p.gateways
            .iter()
            .flat_map(|g| {
                g.egress
                    .iter()
                    .map(|e| (e.ip, e.holder.as_ref().map(|h| h.node.clone())))
            })
            .collect()
    };
    let before = old.map(holders).unwrap_or_default();
    for (ip, holder) in holders(new) {
        if before.get(&ip) != Some(&holder) {
            match holder {
                // What the probes said is why a holder changes when the objects did not.
                Some(node) => tracing::info!(
                    egress_ip = %ip, holder = %node, down = ?health.down,
                    rejoining = ?health.rejoining, "egress IP holder"
                ),
                None => tracing::warn!(
                    egress_ip = %ip, down = ?health.down, rejoining = ?health.rejoining,
                    "no eligible node holds the egress IP"
                ),
            }
        }
    }
    let pods = |p: &NodePlan| -> BTreeMap<Ipv4Addr, String> {
        p.pods.iter().map(|x| (x.ip, x.gateway.clone())).collect()
    };
    let (before, after) = (old.map(pods).unwrap_or_default(), pods(new));
    for pod in &new.pods {
        if before.get(&pod.ip) != Some(&pod.gateway) {
            tracing::info!(pod = %format!("{}/{}", pod.namespace, pod.name), ip = %pod.ip, gateway = %pod.gateway, egress_ip = %pod.egress_ip, reason = ?pod.reason, "pod selected");
        }
    }
    for (ip, gateway) in before.iter().filter(|(ip, _)| !after.contains_key(ip)) {
        tracing::info!(ip = %ip, gateway = %gateway, "pod no longer selected");
    }
    let old_rejected = old.map(|p| p.rejected.as_slice()).unwrap_or_default();
    for r in new.rejected.iter().filter(|r| !old_rejected.contains(r)) {
        tracing::warn!("gateway annotation ignored: {r}");
    }
    let old_problems = old.map(|p| p.problems.as_slice()).unwrap_or_default();
    for p in new.problems.iter().filter(|p| !old_problems.contains(p)) {
        tracing::warn!("{p}");
    }
}
