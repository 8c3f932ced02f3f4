//! Holder election, the failover policy: the nodes that may hold a gateway's egress IPs are
//! those that are Ready, have an InternalIP, match its `nodeSelector` and, as far as this
//! node's probes tell, serve now (a cordoned node drains: see [`crate::membership`]); they take the egress IPs in turn, in name order.
//! Nodes that came back less than the rejoin time ago take part only when no other can and
//! none is silent, so that a node that flaps does not pull the IPs back and forth. Every node decides alone, from
//! the same objects and from probes that every node sees alike within an interval or two.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use super::{EgressPlan, Holder, NodePlan};
use crate::model::{Gateway, NodeInfo, Snapshot};

/// What probes say of the nodes that could hold egress IPs, beyond their Node objects. The
/// default: every node serves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Health {
    /// Nodes that cannot hold now, and why.
    pub down: BTreeMap<String, Down>,
    /// Nodes that came back less than the rejoin time ago.
    pub rejoining: BTreeSet<String>,
    /// Nodes that have served for twice the rejoin time: while one of them can hold an
    /// egress IP, rejoining nodes wait. Nodes that all started together have none, and share
    /// the egress IPs from the start instead of passing them on as each one settles.
    pub veterans: BTreeSet<String>,
}

/// Why a node cannot hold egress IPs now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Down {
    /// Its probes went unanswered (the node, its uplink or its kernel programs are gone).
    Silent,
    /// It answers that it does not serve: its lease ran out (its agent has been away too
    /// long), or it was cut off and its agent has not planned since.
    Fenced,
    /// This node itself: a peer counted it out, or its lease ran out, since it last planned.
    CutOff,
    /// It is handing its egress IPs over (before it stops, or because it is cordoned).
    Draining,
    /// It is cordoned and did not drain: it may still serve, so its egress IPs move as in a
    /// planned move.
    Cordoned,
}

impl Down {
    /// The node no longer serves (or hands over): its egress IPs are taken at once.
    fn let_go(self) -> bool {
        self != Self::Cordoned
    }
}

impl fmt::Display for Down {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Silent => "its probes went unanswered",
            Self::Fenced => "it answers that it is fenced",
            Self::CutOff => "it was counted out by another node, or its lease ran out",
            Self::Draining => "it is draining",
            Self::Cordoned => "it is cordoned",
        })
    }
}

/// Who a node is among the others.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peers {
    /// The nodes to probe: those that may hold egress IPs.
    pub targets: BTreeMap<String, Ipv4Addr>,
    /// Every other node's address: those that may probe this one.
    pub addresses: BTreeSet<Ipv4Addr>,
    /// This node may hold egress IPs, so others probe it.
    pub candidate: bool,
}

/// Whether `node` may hold egress IPs of any gateway as far as its Node object goes. A cordon
/// is not enough to count it out (see [`Down::Cordoned`]).
fn may_hold(node: &NodeInfo) -> bool {
    node.ready && node.internal_ip.is_some()
}

/// Whether `node` may hold `gateway`'s egress IPs by its Node object, whatever the probes say.
pub(super) fn could_hold(snapshot: &Snapshot, gateway: &Gateway, node: &str) -> bool {
    snapshot
        .nodes
        .get(node)
        .is_some_and(|n| may_hold(n) && gateway.node_selector.matches(&n.labels))
}

/// The nodes that hold `gateway`'s egress IPs, in the order they take them.
pub(super) fn eligible(snapshot: &Snapshot, gateway: &Gateway, health: &Health) -> Vec<Holder> {
    let candidates: Vec<&NodeInfo> = snapshot
        .nodes
        .values()
        .filter(|n| may_hold(n) && gateway.node_selector.matches(&n.labels))
        .collect();
    let serving: Vec<&NodeInfo> = candidates
        .iter()
        .copied()
        .filter(|n| !health.down.contains_key(&n.name))
        .collect();
    let settled: Vec<&NodeInfo> = serving
        .iter()
        .copied()
        .filter(|n| !health.rejoining.contains(&n.name))
        .collect();
    // Nodes that all came back together (a cluster starting: no veteran) share the egress
    // IPs at once. Not while a candidate is silent: a node just back from its own isolation
    // still counts every peer silent, and would take what a settled peer holds.
    let silent = candidates
        .iter()
        .any(|n| health.down.get(&n.name) == Some(&Down::Silent));
    let veteran = serving.iter().any(|n| health.veterans.contains(&n.name));
    let chosen = if veteran || silent { settled } else { serving };
    chosen
        .into_iter()
        .filter_map(|n| {
            Some(Holder {
                node: n.name.clone(),
                node_ip: n.internal_ip?,
            })
        })
        .collect()
}

/// The first egress IP goes to the first eligible node, the second to the second, and so on
/// round robin; with none eligible, no egress IP has a holder.
pub(super) fn holders(gateway: &Gateway, eligible: &[Holder]) -> Vec<EgressPlan> {
    gateway
        .egress_ips
        .iter()
        .enumerate()
        .map(|(k, &ip)| EgressPlan {
            ip,
            holder: eligible.get(k % eligible.len().max(1)).cloned(),
        })
        .collect()
}

/// Whether `node` may hold some gateway's egress IPs by its Node object: every node probes it
/// (probes then say whether it serves).
fn candidate(snapshot: &Snapshot, node: &NodeInfo) -> bool {
    may_hold(node)
        && snapshot
            .gateways
            .values()
            .any(|g| g.node_selector.matches(&node.labels))
}

/// The nodes around `node`: the candidates it probes, every other node's address (those that
/// probe it) and whether it is a candidate itself.
pub fn peers(snapshot: &Snapshot, node: &str) -> Peers {
    let others = || snapshot.nodes.values().filter(|n| n.name != node);
    Peers {
        targets: others()
            .filter(|n| candidate(snapshot, n))
            .filter_map(|n| Some((n.name.clone(), n.internal_ip?)))
            .collect(),
        addresses: others().filter_map(|n| n.internal_ip).collect(),
        candidate: snapshot
            .nodes
            .get(node)
            .is_some_and(|n| candidate(snapshot, n)),
    }
}

/// The planned moves between `applied` and `next`: the egress IPs that `next` gives another
/// node than `applied` did, where that node still serves (not down in `health`, or only
/// cordoned), with that node. It lets go at its own probe tick, the others hear of the move
/// within moments of each other: they all wait before they act on it (see
/// [`PlanConfig::moving`](super::PlanConfig::moving)). From a node that is down, the move
/// happens at once: it has let go already.
pub fn handovers(
    applied: &NodePlan,
    next: &NodePlan,
    health: &Health,
) -> BTreeMap<Ipv4Addr, Holder> {
    let after = next.holders();
    applied
        .gateways
        .iter()
        .flat_map(|g| &g.egress)
        .filter_map(|e| Some((e.ip, e.holder.clone()?)))
        .filter(|(ip, old)| {
            after.get(ip).is_some_and(|new| *new != old.node)
                && !health.down.get(&old.node).is_some_and(|d| d.let_go())
        })
        .collect()
}

impl NodePlan {
    /// Each egress IP with a holder, and its holder's name.
    pub fn holders(&self) -> BTreeMap<Ipv4Addr, String> {
        self.gateways
            .iter()
            .flat_map(|g| &g.egress)
            .filter_map(|e| Some((e.ip, e.holder.as_ref()?.node.clone())))
            .collect()
    }

    /// The InternalIPs of the other nodes that hold egress IPs.
    pub fn remote_holders(&self) -> BTreeSet<Ipv4Addr> {
        self.gateways
            .iter()
            .flat_map(|g| g.egress.iter().filter_map(|e| e.holder.as_ref()))
            .filter(|h| h.node != self.node)
            .map(|h| h.node_ip)
            .collect()
    }

    /// The egress IPs `node` holds.
    pub fn held_by(&self, node: &str) -> BTreeSet<Ipv4Addr> {
        self.holders()
            .into_iter()
            .filter(|(_, holder)| holder == node)
            .map(|(ip, _)| ip)
            .collect()
    }
}

/// Why `node` no longer holds an egress IP of `gateway`, for the event that says it moved.
pub fn why_moved(snapshot: &Snapshot, gateway: &str, node: &str, health: &Health) -> String {
    let info = snapshot.nodes.get(node);
    if let Some(down) = health.down.get(node) {
        return if *down == Down::Draining && info.is_some_and(|n| n.unschedulable) {
            "it is cordoned (it drained)".into()
        } else {
            down.to_string()
        };
    }
    let Some(info) = info else {
        return "its Node is gone".into();
    };
    if !info.ready {
        "it is not Ready".into()
    } else if info.unschedulable {
        "it is cordoned".into()
    } else if info.internal_ip.is_none() {
        "it has no InternalIP".into()
    } else if snapshot
        .gateways
        .get(gateway)
        .is_some_and(|g| !g.node_selector.matches(&info.labels))
    {
        "it no longer matches the nodeSelector".into()
    } else {
        "planned: the egress IPs were shared out again (a node came back, or the gateway \
         changed)"
            .into()
    }
}
