//! The human form of a plan, printed by `static-egress plan`. Every line is in a stable order
//! so two outputs can be diffed.

use std::fmt::{self, Display, Formatter};

use ipnet::Ipv4Net;

use static_egress_common::capacity;

use super::{Budget, HoldReason, NodePlan, PlanProblem, Reason, RejectReason, Rejection};
use crate::model::FailurePolicy;

impl Display for NodePlan {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self.node_ip {
            Some(ip) => writeln!(f, "node {} ({ip})", self.node)?,
            None => writeln!(
                f,
                "node {} (no InternalIP: cannot hold egress IPs)",
                self.node
            )?,
        }

        if self.gateways.is_empty() {
            writeln!(f, "gateways: none")?;
        }
        for gateway in &self.gateways {
            writeln!(
                f,
                "gateway {} (id {}, {:?})",
                gateway.name, gateway.id, gateway.failure_policy
            )?;
            for egress in &gateway.egress {
                match &egress.holder {
                    Some(holder) => writeln!(
                        f,
                        "  egress {} held by {} ({})",
                        egress.ip, holder.node, holder.node_ip
                    )?,
                    None => writeln!(
                        f,
                        "  egress {} has no eligible node: {}",
                        egress.ip,
                        match gateway.failure_policy {
                            FailurePolicy::FailClosed => "FailClosed drops",
                            FailurePolicy::FailOpen => "FailOpen leaves from own node",
                        }
                    )?,
                }
            }
            writeln!(f, "  destinations: {}", list(&gateway.destinations))?;
            writeln!(f, "  excluded: {}", self.excluded(&gateway.excluded))?;
        }

        writeln!(
            f,
            "local pods:{}",
            if self.pods.is_empty() { " none" } else { "" }
        )?;
        for pod in &self.pods {
            write!(
                f,
                "  {}/{} {} -> {} ({}) because {}",
                pod.namespace, pod.name, pod.ip, pod.gateway, pod.egress_ip, pod.reason
            )?;
            if !pod.overridden.is_empty() {
                write!(f, ", over {}", pod.overridden.join(", "))?;
            }
            writeln!(f)?;
        }

        if !self.held.is_empty() {
            writeln!(
                f,
                "held while starting (traffic to outside the cluster dropped):"
            )?;
            for pod in &self.held {
                writeln!(
                    f,
                    "  {}/{} {}: {}",
                    pod.namespace, pod.name, pod.ip, pod.why
                )?;
            }
        }

        if !self.rejected.is_empty() {
            writeln!(f, "rejected:")?;
            for rejection in &self.rejected {
                writeln!(f, "  {rejection}")?;
            }
        }

        writeln!(
            f,
            "snat on this node:{}",
            if self.snat.is_empty() { " none" } else { "" }
        )?;
        for snat in &self.snat {
            writeln!(
                f,
                "  {} ({}) for {} pod(s): {}",
                snat.egress_ip,
                snat.gateway,
                snat.pods.len(),
                list(&snat.pods)
            )?;
            writeln!(f, "    destinations: {}", list(&snat.destinations))?;
            writeln!(f, "    excluded: {}", self.excluded(&snat.excluded))?;
        }
        if !self.snat.is_empty() {
            writeln!(
                f,
                "  translated only from local pods and from nodes {}",
                list(&self.senders)
            )?;
        }

        writeln!(f, "cluster ranges: {}", list(&self.cluster_cidrs))?;

        if !self.problems.is_empty() {
            writeln!(f, "problems:")?;
            for problem in &self.problems {
                writeln!(f, "  {problem}")?;
            }
        }
        Ok(())
    }
}

impl Display for HoldReason {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unknown => f.write_str("the objects do not show this pod yet"),
            Self::HolderElsewhere {
                gateway,
                egress_ip,
                holder,
            } => write!(
                f,
                "gateway {gateway} selects it; {holder}, which holds its egress IP {egress_ip}, \
                 does not know its address yet"
            ),
        }
    }
}

impl NodePlan {
    /// Cluster ranges are in every exclusion list; naming them once keeps the output short.
    fn excluded(&self, excluded: &[Ipv4Net]) -> String {
        let own: Vec<&Ipv4Net> = excluded
            .iter()
            .filter(|cidr| self.cluster_cidrs.binary_search(cidr).is_err())
            .collect();
        if own.is_empty() {
            "cluster ranges".to_owned()
        } else {
            format!("{} + cluster ranges", list(&own))
        }
    }
}

pub(super) fn list<T: Display>(items: &[T]) -> String {
    if items.is_empty() {
        return "none".to_owned();
    }
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl Display for Reason {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::PodAnnotation => "pod annotation",
            Self::NamespaceAnnotation => "namespace annotation",
            Self::PodSelector => "podSelector",
        })
    }
}

impl Display for Rejection {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match &self.pod {
            Some(pod) => write!(f, "{}/{pod}", self.namespace)?,
            None => write!(f, "namespace {}", self.namespace)?,
        }
        write!(f, " asks for {}: ", self.gateway)?;
        match self.why {
            RejectReason::UnknownGateway => write!(f, "no such gateway"),
            RejectReason::NamespaceNotAdmitted => write!(
                f,
                "its namespaceSelector does not admit namespace {}",
                self.namespace
            ),
            RejectReason::GatewayDropped => write!(f, "the gateway is left out (see problems)"),
            RejectReason::PodMapFull => write!(
                f,
                "this node's pod map is full ({} pods); the pod's traffic is not marked",
                static_egress_common::capacity::PODS
            ),
        }
    }
}

impl Display for PlanProblem {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            Self::EgressIpConflict {
                gateway,
                ip,
                kept_by,
            } => write!(
                f,
                "gateway {gateway} left out: egress IP {ip} already belongs to gateway {kept_by}"
            ),
            Self::EgressIpInCluster { gateway, ip, why } => write!(
                f,
                "gateway {gateway} left out: egress IP {ip} is {why}; holding it would take \
                 that address from the cluster"
            ),
            Self::OverCapacity {
                gateway,
                budget,
                needed,
                free,
            } => {
                let (what, capacity) = match budget {
                    Budget::Gateways => ("gateway entries", capacity::GATEWAYS),
                    Budget::EgressIps => ("egress IP entries", capacity::EGRESS),
                    Budget::Destinations => (
                        "destination entries (destinationCIDRs plus the exclusions inside them)",
                        capacity::DESTS,
                    ),
                };
                write!(
                    f,
                    "gateway {gateway} left out: it needs {needed} {what}, and the gateways \
                     before it by name leave {free} of the kernel map's {capacity} free"
                )
            }
        }
    }
}
