//! What each gateway's status says and which node writes it. Every node computes the same
//! thing from the same snapshot, so exactly one of them writes each gateway's status.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::model::{EgressGateway, EgressGatewayStatus, EgressIpHolder, NodeInfo, Snapshot};
use crate::plan::{
    GatewayUsage, Health, NodePlan, PlanProblem, RejectReason, Rejection, gateway_usage, why_moved,
};

const READY: &str = "Ready";
const CONFLICTS: &str = "Conflicts";
/// An object must stay well under etcd's 1.5 MiB; the count is in the condition anyway.
const MAX_REJECTED: usize = 100;

/// A condition before its `lastTransitionTime` is settled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Verdict {
    pub(super) type_: &'static str,
    pub(super) status: bool,
    pub(super) reason: &'static str,
    pub(super) message: String,
}

impl Verdict {
    /// The transition time moves only when the status does, as Kubernetes conventions want:
    /// a new message (another holder, one more refused pod) is not a transition.
    fn settle(self, previous: &[Condition], now: Timestamp) -> Condition {
        let status = if self.status { "True" } else { "False" };
        let since = previous
            .iter()
            .find(|c| c.type_ == self.type_ && c.status == status)
            .map_or(Time(now), |c| c.last_transition_time.clone());
        Condition {
            type_: self.type_.to_owned(),
            status: status.to_owned(),
            reason: self.reason.to_owned(),
            message: self.message,
            last_transition_time: since,
            observed_generation: None,
        }
    }
}

/// Where each egress IP (by gateway) went last, as this node saw it.
pub(super) type Moves = BTreeMap<(String, Ipv4Addr), Moved>;

/// The holder of an egress IP, and when and why it became the holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Moved {
    pub(super) node: Option<String>,
    /// `None` for the holders found at start: the agent did not see them move.
    pub(super) since: Option<Timestamp>,
    pub(super) reason: Option<String>,
}

/// What the gateways' statuses say of the last moves, for an agent that just started: every
/// agent keeps its record in memory, and after all have restarted the statuses are all that
/// is left of it. [`track_moves`] keeps an entry while its holder stays the same.
pub(super) fn seed_moves(moves: &mut Moves, gateways: &[EgressGateway]) {
    for gateway in gateways {
        let name = gateway.metadata.name.clone().unwrap_or_default();
        for holder in gateway.status.iter().flat_map(|s| &s.holders) {
            let (Ok(ip), Some(since)) = (holder.ip.parse::<Ipv4Addr>(), &holder.since) else {
                continue;
            };
            moves.entry((name.clone(), ip)).or_insert_with(|| Moved {
                node: holder.node.clone(),
                since: Some(since.0),
                reason: holder.reason.clone(),
            });
        }
    }
}

/// Notes the egress IPs of `plan` that moved since the last call. Every node keeps its own
/// record, so that whichever writes a gateway's status can say when and why its IPs moved.
/// A planned move under way is not one yet: the plan still names the old holder.
pub(super) fn track_moves(
    moves: &mut Moves,
    snapshot: &Snapshot,
    plan: &NodePlan,
    health: &Health,
    now: Timestamp,
) {
    let mut next = Moves::new();
    for gateway in &plan.gateways {
        for egress in &gateway.egress {
            let key = (gateway.name.clone(), egress.ip);
            let node = egress.holder.as_ref().map(|h| h.node.clone());
            let moved = match moves.remove(&key) {
                Some(before) if before.node == node => before,
                Some(before) => Moved {
                    since: Some(now),
                    reason: Some(match &before.node {
                        Some(from) => format!(
                            "from {from}: {}",
                            why_moved(snapshot, &gateway.name, from, health)
                        ),
                        None => "it had no holder".to_owned(),
                    }),
                    node,
                },
                None => Moved {
                    node,
                    since: None,
                    reason: None,
                },
            };
            next.insert(key, moved);
        }
    }
    *moves = next;
}

/// One gateway's status as every node computes it.
pub(super) struct Desired {
    pub(super) gateway: String,
    /// The holder of the first egress IP, else the first Ready node by name, preferring those
    /// that see every pod; `None` when no node is Ready, and then nobody can say anything.
    pub(super) writer: Option<String>,
    pub(super) ready: Verdict,
    pub(super) conflicts: Verdict,
    pub(super) holders: Vec<EgressIpHolder>,
    pub(super) selected_pods: u32,
    pub(super) rejected_pods: Vec<String>,
}

impl Desired {
    /// The status to write, keeping the transition times of `previous` where nothing changed.
    pub(super) fn status(self, previous: &[Condition], now: Timestamp) -> EgressGatewayStatus {
        let mut nodes: Vec<&str> = self
            .holders
            .iter()
            .filter_map(|h| h.node.as_deref())
            .collect();
        nodes.sort_unstable();
        nodes.dedup();
        let active_nodes = (!nodes.is_empty()).then(|| nodes.join(","));
        EgressGatewayStatus {
            conditions: vec![
                self.ready.settle(previous, now),
                self.conflicts.settle(previous, now),
            ],
            active_nodes,
            holders: self.holders,
            selected_pods: self.selected_pods,
            rejected_pods: self.rejected_pods,
        }
    }
}

/// The status of every gateway in `snapshot`, by name; `plan` is this node's plan of the same
/// snapshot (holders and conflicts are the same in every node's plan).
pub(super) fn desired(snapshot: &Snapshot, plan: &NodePlan, moves: &Moves) -> Vec<Desired> {
    let mut usage = gateway_usage(snapshot, &plan.cluster_cidrs);
    // A node that some gateway's nodeSelector matches watches every pod (see `source::kube`),
    // so its counts are cluster-wide; any other node only knows its own pods.
    let sees_every_pod = |node: &&NodeInfo| {
        snapshot
            .gateways
            .values()
            .any(|g| g.node_selector.matches(&node.labels))
    };
    let ready_nodes = || snapshot.nodes.values().filter(|n| n.ready);
    let first_ready = ready_nodes()
        .find(sees_every_pod)
        .or_else(|| ready_nodes().next())
        .map(|n| &n.name);
    snapshot
        .gateways
        .values()
        .map(|gateway| {
            let planned = plan.gateways.iter().find(|g| g.name == gateway.name);
            let holders: Vec<EgressIpHolder> = gateway
                .egress_ips
                .iter()
                .map(|ip| {
                    let moved = moves.get(&(gateway.name.clone(), *ip));
                    EgressIpHolder {
                        ip: ip.to_string(),
                        node: planned
                            .and_then(|g| g.egress.iter().find(|e| e.ip == *ip))
                            .and_then(|e| e.holder.as_ref())
                            .map(|h| h.node.clone()),
                        since: moved.and_then(|m| m.since).map(Time),
                        reason: moved.and_then(|m| m.reason.clone()),
                    }
                })
                .collect();
            let writer = holders
                .first()
                .and_then(|h| h.node.clone())
                .or_else(|| first_ready.cloned());
            let problems: Vec<&PlanProblem> = plan
                .problems
                .iter()
                .filter(|p| involves(p, &gateway.name))
                .collect();
            let usage = usage.remove(&gateway.name).unwrap_or_default();
            Desired {
                gateway: gateway.name.clone(),
                writer,
                ready: ready(&holders, planned.is_none(), &problems),
                conflicts: conflicts(&problems, usage.refused.len()),
                holders,
                selected_pods: u32::try_from(usage.selected_pods).unwrap_or(u32::MAX),
                rejected_pods: rejected_pods(&usage),
            }
        })
        .collect()
}

/// Both sides of a conflict hear of it: the one left out, and the one whose IP it reused.
fn involves(problem: &PlanProblem, gateway: &str) -> bool {
    match problem {
        PlanProblem::EgressIpConflict {
            gateway: left_out,
            kept_by,
            ..
        } => left_out == gateway || kept_by == gateway,
        PlanProblem::OverCapacity {
            gateway: left_out, ..
        }
        | PlanProblem::EgressIpInCluster {
            gateway: left_out, ..
        } => left_out == gateway,
    }
}

fn reason(problem: &PlanProblem) -> &'static str {
    match problem {
        PlanProblem::EgressIpConflict { .. } => "EgressIPConflict",
        PlanProblem::OverCapacity { .. } => "OverCapacity",
        PlanProblem::EgressIpInCluster { .. } => "EgressIPInCluster",
    }
}

fn ready(holders: &[EgressIpHolder], left_out: bool, problems: &[&PlanProblem]) -> Verdict {
    let unheld: Vec<&str> = holders
        .iter()
        .filter(|h| h.node.is_none())
        .map(|h| h.ip.as_str())
        .collect();
    let (status, reason, message) = if left_out {
        let reason = problems.first().map_or("LeftOut", |p| reason(p));
        (false, reason, join(problems))
    } else if unheld.is_empty() {
        let held: Vec<String> = holders
            .iter()
            .map(|h| format!("{} on {}", h.ip, h.node.as_deref().unwrap_or_default()))
            .collect();
        (true, "Held", held.join(", "))
    } else {
        let message = format!(
            "no Ready node with an InternalIP matches nodeSelector; unheld: {}",
            unheld.join(", ")
        );
        (false, "NoEligibleNode", message)
    };
    Verdict {
        type_: READY,
        status,
        reason,
        message,
    }
}

fn conflicts(problems: &[&PlanProblem], refused: usize) -> Verdict {
    let problems: Vec<&PlanProblem> = problems
        .iter()
        .copied()
        .filter(|p| matches!(p, PlanProblem::EgressIpConflict { .. }))
        .collect();
    let problems = problems.as_slice();
    let refused_note =
        format!("{refused} annotation(s) naming this gateway refused, see rejectedPods");
    let (status, reason, message) = match (problems.is_empty(), refused) {
        (true, 0) => (false, "NoConflicts", String::new()),
        (true, _) => (true, "AnnotationsRefused", refused_note),
        (false, 0) => (true, "EgressIPConflict", join(problems)),
        (false, _) => (
            true,
            "EgressIPConflict",
            format!("{}; {refused_note}", join(problems)),
        ),
    };
    Verdict {
        type_: CONFLICTS,
        status,
        reason,
        message,
    }
}

fn join(problems: &[&PlanProblem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

fn rejected_pods(usage: &GatewayUsage) -> Vec<String> {
    let mut rejected: Vec<String> = usage
        .refused
        .iter()
        .take(MAX_REJECTED)
        .map(rejected_pod)
        .collect();
    if usage.refused.len() > MAX_REJECTED {
        rejected.push(format!("and {} more", usage.refused.len() - MAX_REJECTED));
    }
    rejected
}

fn rejected_pod(rejection: &Rejection) -> String {
    let why = match rejection.why {
        RejectReason::NamespaceNotAdmitted => "namespace not admitted by namespaceSelector",
        RejectReason::GatewayDropped => "gateway left out, see its Ready condition",
        RejectReason::PodMapFull => "its node's pod map is full",
        RejectReason::UnknownGateway => "no such gateway",
    };
    match &rejection.pod {
        Some(pod) => format!("{}/{pod}: {why}", rejection.namespace),
        None => format!("namespace {}: {why}", rejection.namespace),
    }
}
