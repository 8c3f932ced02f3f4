//! The cluster-wide view of each gateway, for its status: unlike [`super::plan`], which only
//! looks at pods on other nodes when it SNATs for them, this looks at every pod, with the same
//! rules.

use std::collections::BTreeMap;

use ipnet::Ipv4Net;

use super::compute::{Chooser, accept_gateways};
use super::failover::Health;
use super::{RejectReason, Rejection};
use crate::model::Snapshot;

/// How one gateway is used across the cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GatewayUsage {
    /// Pods anywhere that use the gateway: running, with an IPv4 address, not `hostNetwork`.
    pub selected_pods: usize,
    /// Annotations naming the gateway that it refuses (its namespaceSelector does not admit the
    /// namespace, or it is left out for a conflict), sorted by namespace then pod, each
    /// namespace's own annotation first. Pods count only when they could be selected.
    pub refused: Vec<Rejection>,
}

/// The usage of every gateway of `snapshot`, by name, including those the planner leaves out
/// (they select nothing). Annotations naming no gateway are nobody's: the planner logs them.
/// `cluster` are the ranges that never go through a gateway ([`super::NodePlan::cluster_cidrs`]).
pub fn gateway_usage(snapshot: &Snapshot, cluster: &[Ipv4Net]) -> BTreeMap<String, GatewayUsage> {
    // Holders do not matter here: who uses a gateway does not depend on who holds it.
    let accepted = accept_gateways(snapshot, cluster, &Health::default());
    let mut chooser = Chooser::new(snapshot, &accepted.gateways, &accepted.problems);
    let mut usage: BTreeMap<String, GatewayUsage> = snapshot
        .gateways
        .keys()
        .map(|name| (name.clone(), GatewayUsage::default()))
        .collect();

    for namespace in snapshot.namespaces.values() {
        if let Some(Err((gateway, why))) = chooser.namespace(&namespace.name).annotation {
            refuse(&mut usage, &namespace.name, None, &gateway, why);
        }
    }
    for pod in snapshot.pods.values() {
        if pod.ip.is_none() || !pod.running || pod.host_network {
            continue;
        }
        let choice = chooser.choose(pod);
        if let Some((winner, _)) = choice.winner
            && let Some(entry) = usage.get_mut(&chooser.gateways[winner].name)
        {
            entry.selected_pods += 1;
        }
        if let (Some(why), Some(gateway)) = (choice.pod_rejection, &pod.gateway_annotation) {
            refuse(&mut usage, &pod.namespace, Some(&pod.name), gateway, why);
        }
    }

    for entry in usage.values_mut() {
        entry
            .refused
            .sort_by(|a, b| (&a.namespace, &a.pod).cmp(&(&b.namespace, &b.pod)));
    }
    usage
}

fn refuse(
    usage: &mut BTreeMap<String, GatewayUsage>,
    namespace: &str,
    pod: Option<&str>,
    gateway: &str,
    why: RejectReason,
) {
    if let Some(entry) = usage.get_mut(gateway) {
        entry.refused.push(Rejection {
            namespace: namespace.to_owned(),
            pod: pod.map(str::to_owned),
            gateway: gateway.to_owned(),
            why,
        });
    }
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests fail loudly")]

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

    use super::*;
    use crate::model::{FailurePolicy, Gateway, NamespaceInfo, PodInfo, Selector};

    fn selector(key: &str, value: &str) -> Selector {
        Selector::try_from(&LabelSelector {
            match_labels: Some([(key.to_owned(), value.to_owned())].into()),
            ..LabelSelector::default()
        })
        .unwrap()
    }

    fn gateway(snapshot: &mut Snapshot, name: &str, ip: [u8; 4], team: &str) {
        snapshot.gateways.insert(
            name.to_owned(),
            Gateway {
                name: name.to_owned(),
                egress_ips: vec![ip.into()],
                node_selector: Selector::everything(),
                namespace_selector: selector("team", team),
                pod_selector: Some(selector("app", "api")),
                destinations: vec!["0.0.0.0/0".parse().unwrap()],
                excluded: Vec::new(),
                failure_policy: FailurePolicy::FailClosed,
                announce: Default::default(),
            },
        );
    }

    fn namespace(snapshot: &mut Snapshot, name: &str, team: &str, annotation: Option<&str>) {
        snapshot.namespaces.insert(
            name.to_owned(),
            NamespaceInfo {
                name: name.to_owned(),
                labels: [("team".to_owned(), team.to_owned())].into_iter().collect(),
                gateway_annotation: annotation.map(str::to_owned),
            },
        );
    }

    fn pod(snapshot: &mut Snapshot, namespace: &str, name: &str, annotation: Option<&str>) {
        let n = u8::try_from(snapshot.pods.len()).unwrap();
        snapshot.pods.insert(
            (namespace.to_owned(), name.to_owned()),
            PodInfo {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                labels: [("app".to_owned(), "api".to_owned())].into_iter().collect(),
                gateway_annotation: annotation.map(str::to_owned),
                // Nodes do not matter: the view is the same from every node.
                node: Some(format!("node{}", n % 3)),
                ip: Some([10, 244, 0, n + 1].into()),
                running: true,
                host_network: false,
            },
        );
    }

    fn refusal(namespace: &str, pod: Option<&str>, gateway: &str, why: RejectReason) -> Rejection {
        Rejection {
            namespace: namespace.to_owned(),
            pod: pod.map(str::to_owned),
            gateway: gateway.to_owned(),
            why,
        }
    }

    #[test]
    fn counts_selected_pods_on_every_node_with_the_planners_choice() {
        let mut snapshot = Snapshot::default();
        gateway(&mut snapshot, "a", [10, 99, 0, 1], "pay");
        gateway(&mut snapshot, "b", [10, 99, 0, 2], "pay");
        namespace(&mut snapshot, "pay", "pay", None);
        // Both gateways select these by label: the first by name wins, as in the plan.
        for name in ["api-1", "api-2", "api-3"] {
            pod(&mut snapshot, "pay", name, None);
        }
        // The pod annotation beats the selector.
        pod(&mut snapshot, "pay", "api-4", Some("b"));
        pod(&mut snapshot, "pay", "pending", None);
        snapshot
            .pods
            .get_mut(&("pay".to_owned(), "pending".to_owned()))
            .unwrap()
            .running = false;
        pod(&mut snapshot, "pay", "host", None);
        snapshot
            .pods
            .get_mut(&("pay".to_owned(), "host".to_owned()))
            .unwrap()
            .host_network = true;

        let usage = gateway_usage(&snapshot, &[]);
        assert_eq!(usage["a"].selected_pods, 3);
        assert_eq!(usage["b"].selected_pods, 1);
        assert!(usage.values().all(|u| u.refused.is_empty()));
    }

    #[test]
    fn refusals_go_to_the_gateway_named_sorted() {
        let mut snapshot = Snapshot::default();
        gateway(&mut snapshot, "a", [10, 99, 0, 1], "pay");
        // Reuses a's IP: left out, so every annotation naming it is refused.
        gateway(&mut snapshot, "b", [10, 99, 0, 1], "web");
        namespace(&mut snapshot, "pay", "pay", None);
        namespace(&mut snapshot, "web", "web", Some("b"));
        namespace(&mut snapshot, "zoo", "zoo", Some("a"));
        pod(&mut snapshot, "web", "web-2", Some("a"));
        pod(&mut snapshot, "web", "web-1", Some("a"));
        pod(&mut snapshot, "pay", "api-1", Some("nope"));
        pod(&mut snapshot, "web", "web-3", Some("b"));

        let usage = gateway_usage(&snapshot, &[]);
        assert_eq!(
            usage["a"].refused,
            vec![
                refusal(
                    "web",
                    Some("web-1"),
                    "a",
                    RejectReason::NamespaceNotAdmitted
                ),
                refusal(
                    "web",
                    Some("web-2"),
                    "a",
                    RejectReason::NamespaceNotAdmitted
                ),
                refusal("zoo", None, "a", RejectReason::NamespaceNotAdmitted),
            ]
        );
        assert_eq!(
            usage["b"].refused,
            vec![
                refusal("web", None, "b", RejectReason::GatewayDropped),
                refusal("web", Some("web-3"), "b", RejectReason::GatewayDropped),
            ]
        );
        // api-1 is selected by label; its unknown annotation is nobody's refusal.
        assert_eq!(usage["a"].selected_pods, 1);
        assert_eq!(usage["b"].selected_pods, 0);
        assert_eq!(usage.len(), 2);
    }
}
