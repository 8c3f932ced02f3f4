//! The log lines that say what a new plan changed: holders, selected pods, refusals.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use crate::plan::{Health, NodePlan};

/// More changed pods than this in one plan are counted in one line instead of one line each.
const PODS_LOGGED_ONE_BY_ONE: usize = 100;

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
    let selected: Vec<_> = new
        .pods
        .iter()
        .filter(|pod| before.get(&pod.ip) != Some(&pod.gateway))
        .collect();
    let unselected: Vec<_> = before
        .iter()
        .filter(|(ip, _)| !after.contains_key(ip))
        .collect();
    // A line per pod while they are few; a start or a change of thousands (a gateway's
    // selector edited) would otherwise write megabytes of log: counts, the pods in debug.
    let each = selected.len() + unselected.len() <= PODS_LOGGED_ONE_BY_ONE;
    for pod in &selected {
        let name = format!("{}/{}", pod.namespace, pod.name);
        if each {
            tracing::info!(pod = %name, ip = %pod.ip, gateway = %pod.gateway, egress_ip = %pod.egress_ip, reason = ?pod.reason, "pod selected");
        } else {
            tracing::debug!(pod = %name, ip = %pod.ip, gateway = %pod.gateway, egress_ip = %pod.egress_ip, reason = ?pod.reason, "pod selected");
        }
    }
    for (ip, gateway) in &unselected {
        if each {
            tracing::info!(ip = %ip, gateway = %gateway, "pod no longer selected");
        } else {
            tracing::debug!(ip = %ip, gateway = %gateway, "pod no longer selected");
        }
    }
    if !each {
        tracing::info!(
            selected = selected.len(),
            no_longer_selected = unselected.len(),
            "pods selected or no longer selected (each in the debug log)"
        );
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
