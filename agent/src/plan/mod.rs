//! Pure planning: a [`Snapshot`] and the node's name in, the node's desired state out, with
//! the reason behind every choice. Nothing here touches the kernel.

mod cluster;
mod compute;
mod display;
mod explain;
mod failover;
#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::model::{Announce, FailurePolicy};

pub use cluster::{GatewayUsage, gateway_usage};
pub use compute::{gateway_ids, plan};
pub use explain::{Explanation, explain};
pub use failover::{Down, Health, Peers, handovers, peers, why_moved};

/// Settings of the agent that shape the plan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlanConfig {
    /// Extra in-cluster ranges (`--cluster-cidr`) that never go through a gateway.
    pub cluster_cidrs: Vec<Ipv4Net>,
    /// What probes say of the nodes that could hold egress IPs (every node serves by default).
    pub health: Health,
    /// Planned moves under way (see [`failover::handovers`]): egress IPs that go to another
    /// node, with the node that holds them and still serves. Until the move is due, every node
    /// plans them with that holder: pods' packets still go there, the new holder does not take
    /// them yet, and the old one translates what reaches it without answering ARP for them,
    /// so that no two nodes answer for one at once.
    pub moving: BTreeMap<Ipv4Addr, Holder>,
    /// Egress IPs whose holder Lease another node claimed after this node (cluster mode, see
    /// [`crate::source::leases`]), by that node: this node does not hold them while the claim
    /// stands, and routes their pods' packets to that node.
    pub lost: BTreeMap<Ipv4Addr, String>,
    /// Pods the container runtime is starting on this node, by (namespace, name), with the
    /// address their CNI plugin announced (see [`crate::source::cni`]): planned with that
    /// address until the objects show the pod running with one.
    pub starting: BTreeMap<(String, String), Starting>,
}

/// What a pod's CNI plugin said of it when the runtime started it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Starting {
    pub ip: Ipv4Addr,
    /// Whether to hold its traffic to outside the cluster while the objects do not know it.
    pub hold_unknown: bool,
}

/// What one node must program.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodePlan {
    pub node: String,
    /// This node's InternalIP; `None` when the Node object is missing or has none.
    pub node_ip: Option<Ipv4Addr>,
    /// Every valid gateway, sorted by name (all nodes know them all: a local pod may use any).
    pub gateways: Vec<GatewayPlan>,
    /// Local pods whose traffic is marked, sorted by IP.
    pub pods: Vec<PodPlan>,
    /// Starting local pods whose traffic to outside the cluster is dropped for now, sorted by
    /// IP (see [`PlanConfig::starting`]).
    pub held: Vec<HeldPod>,
    /// Local pods that asked for a gateway and were not selected, with why.
    pub rejected: Vec<Rejection>,
    /// Egress IPs this node holds: address on the uplink plus SNAT.
    pub snat: Vec<SnatPlan>,
    /// InternalIPs of the other nodes whose pods this node SNATs, sorted: only packets from
    /// them (or from local pods) are translated.
    pub senders: Vec<Ipv4Addr>,
    /// InternalIPs of the other nodes whose pods this node would SNAT if it took over the
    /// egress IPs it may hold, sorted, without `senders`: their link-layer addresses are kept
    /// resolved, so that a takeover does not wait for them.
    pub standby_senders: Vec<Ipv4Addr>,
    /// Ranges that never go through a gateway: node pod CIDRs, node IPs, `--cluster-cidr`.
    pub cluster_cidrs: Vec<Ipv4Net>,
    /// The other nodes' pod CIDRs, sorted: their packets to outside the cluster that reach this
    /// node are on their way to an egress IP it holds (or should, during a handover).
    pub remote_pod_cidrs: Vec<Ipv4Net>,
    /// The other nodes' pod CIDRs with each node's InternalIP, sorted: where the tunnel takes
    /// replies to their pods (see [`crate::datapath::tunnel`]).
    pub peers: Vec<(Ipv4Net, Ipv4Addr)>,
    /// Inconsistencies between gateways that the planner resolved by leaving something out.
    pub problems: Vec<PlanProblem>,
}

/// A finding about the gateways as a whole, to be logged and shown by `static-egress plan`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlanProblem {
    /// `gateway` names an egress IP that `kept_by` (first by name) also names; `gateway` is
    /// left out of the plan entirely, as if it did not exist.
    EgressIpConflict {
        gateway: String,
        ip: Ipv4Addr,
        kept_by: String,
    },
    /// An egress IP of `gateway` is a node's address or lies in a pod CIDR or a cluster range;
    /// `gateway` is left out entirely.
    EgressIpInCluster {
        gateway: String,
        ip: Ipv4Addr,
        /// "the InternalIP of node n1", "in node n1's pod CIDR 10.244.1.0/24", ...
        why: String,
    },
    /// `gateway` needs more entries of a kernel map than the gateways before it by name left
    /// free; it is left out entirely.
    OverCapacity {
        gateway: String,
        budget: Budget,
        needed: usize,
        free: usize,
    },
}

/// What the kernel maps hold for all gateways together (`static_egress_common::capacity`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Budget {
    Gateways,
    EgressIps,
    /// Entries of the destination map: destinations plus the exclusions inside them.
    Destinations,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayPlan {
    pub name: String,
    /// Stable id used as BPF map key; see [`gateway_ids`].
    pub id: u32,
    pub failure_policy: FailurePolicy,
    pub announce: Announce,
    pub egress: Vec<EgressPlan>,
    /// Longest-prefix-match entries: `DestEntry::via_gateway == false` are exclusions nested
    /// in a destination. Destinations inside an exclusion are left out (exclusions win).
    pub dest_entries: Vec<DestEntry>,
    /// The gateway's destinations, for SNAT on the holder.
    pub destinations: Vec<Ipv4Net>,
    /// The gateway's exclusions plus the cluster's ranges, for SNAT on the holder.
    pub excluded: Vec<Ipv4Net>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EgressPlan {
    pub ip: Ipv4Addr,
    /// `None`: no Ready node matches the node selector.
    pub holder: Option<Holder>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub node: String,
    pub node_ip: Ipv4Addr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DestEntry {
    pub cidr: Ipv4Net,
    pub via_gateway: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    PodAnnotation,
    NamespaceAnnotation,
    PodSelector,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPlan {
    pub namespace: String,
    pub name: String,
    pub ip: Ipv4Addr,
    pub gateway: String,
    pub gateway_id: u32,
    /// One of the gateway's egress IPs, chosen from a hash of the pod IP.
    pub egress_ip: Ipv4Addr,
    pub reason: Reason,
    /// Other gateways that also claimed the pod and lost, by name.
    pub overridden: Vec<String>,
}

/// A starting pod held back: leaving now, it would go out with the node's address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldPod {
    pub namespace: String,
    pub name: String,
    pub ip: Ipv4Addr,
    pub why: HoldReason,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HoldReason {
    /// The objects have no such pod yet: nobody can tell whether a gateway selects it.
    Unknown,
    /// `gateway` selects it, and `holder`, which holds its egress IP, translates only pods
    /// whose address the objects show.
    HolderElsewhere {
        gateway: String,
        egress_ip: Ipv4Addr,
        holder: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub namespace: String,
    /// `None` when the annotation is on the namespace.
    pub pod: Option<String>,
    pub gateway: String,
    pub why: RejectReason,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RejectReason {
    UnknownGateway,
    NamespaceNotAdmitted,
    /// The gateway exists but was left out of the plan (see [`NodePlan::problems`]).
    GatewayDropped,
    /// This node already marks as many pods as its kernel map holds.
    PodMapFull,
}

/// SNAT on the holder of one egress IP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnatPlan {
    pub gateway: String,
    pub egress_ip: Ipv4Addr,
    /// Pods anywhere in the cluster that leave with this IP, sorted.
    pub pods: Vec<Ipv4Addr>,
    pub destinations: Vec<Ipv4Net>,
    pub excluded: Vec<Ipv4Net>,
    pub announce: Announce,
}
