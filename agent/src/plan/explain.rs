//! Why a pod uses the gateway it does, or none, for `static-egress explain`: each gateway's
//! verdict on the pod's namespace and labels, the annotations and what became of them, who
//! won and why, and where the winner sends the pod's traffic. The outcome is read from the
//! same plan the agent applies, so the explanation cannot differ from what the node does.

use std::fmt::{self, Display, Formatter};

use super::display::list;
use super::{NodePlan, PlanConfig, Reason, RejectReason, plan};
use crate::model::{FailurePolicy, Labels, Snapshot};

/// The explanation, printed line by line.
pub struct Explanation(Vec<String>);

impl Display for Explanation {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        for line in &self.0 {
            writeln!(f, "{line}")?;
        }
        Ok(())
    }
}

pub fn explain(
    snapshot: &Snapshot,
    namespace: &str,
    name: &str,
    config: &PlanConfig,
) -> Explanation {
    let mut out = Vec::new();
    let key = (namespace.to_owned(), name.to_owned());
    let Some(pod) = snapshot.pods.get(&key) else {
        out.push(format!("pod {namespace}/{name}: not in the objects"));
        return Explanation(out);
    };
    let node = pod.node.as_deref().unwrap_or_default();
    out.push(format!(
        "pod {namespace}/{name}: {} on {}, labels {}",
        pod.ip
            .map_or("no IPv4 address".to_owned(), |ip| ip.to_string()),
        pod.node.as_deref().unwrap_or("no node yet"),
        labels(&pod.labels)
    ));
    let blocker = if pod.host_network {
        Some("it uses the host's network (hostNetwork): its traffic is the node's own")
    } else if !pod.running {
        Some("it is not Running")
    } else if pod.ip.is_none() {
        Some("it has no IPv4 address")
    } else if pod.node.is_none() {
        Some("it is not scheduled to a node")
    } else {
        None
    };
    let ns = snapshot.namespaces.get(namespace);
    out.push(format!(
        "namespace {namespace}: labels {}{}",
        ns.map_or("(namespace not in the objects)".to_owned(), |n| labels(
            &n.labels
        )),
        ns.and_then(|n| n.gateway_annotation.as_deref())
            .map_or(String::new(), |g| format!(
                ", annotation static-egress.io/gateway={g}"
            ))
    ));
    if let Some(g) = &pod.gateway_annotation {
        out.push(format!("pod annotation static-egress.io/gateway={g}"));
    }

    let plan = plan(snapshot, node, config);
    out.push("gateways, by name:".to_owned());
    if snapshot.gateways.is_empty() {
        out.push("  none".to_owned());
    }
    let ns_labels = ns.map(|n| n.labels.clone()).unwrap_or_default();
    for gateway in snapshot.gateways.values() {
        if let Some(problem) = plan.problems.iter().find(|p| p.gateway() == gateway.name) {
            out.push(format!(
                "  {}: left out of every plan: {problem}",
                gateway.name
            ));
            continue;
        }
        let admits = gateway.namespace_selector.matches(&ns_labels);
        let mut line = format!(
            "  {}: namespaceSelector {} {} namespace {namespace}",
            gateway.name,
            gateway.namespace_selector,
            if admits { "admits" } else { "does not admit" }
        );
        match (&gateway.pod_selector, admits) {
            (_, false) => {}
            (None, true) => line.push_str("; no podSelector: pods opt in by annotation only"),
            (Some(selector), true) => {
                let matches = selector.matches(&pod.labels);
                line.push_str(&format!(
                    "; podSelector {selector} {}",
                    if matches {
                        "matches the pod: it claims the pod"
                    } else {
                        "does not match the pod"
                    }
                ));
            }
        }
        out.push(line);
    }

    let mut refused = false;
    for rejection in plan
        .rejected
        .iter()
        .filter(|r| r.namespace == namespace && r.pod.as_deref().is_none_or(|p| p == name))
    {
        refused = true;
        let on = if rejection.pod.is_some() {
            "the pod's"
        } else {
            "the namespace's"
        };
        out.push(format!(
            "{on} annotation is refused: {}",
            match rejection.why {
                RejectReason::UnknownGateway => format!("no gateway {} exists", rejection.gateway),
                RejectReason::NamespaceNotAdmitted => format!(
                    "gateway {} does not admit namespace {namespace} (its namespaceSelector)",
                    rejection.gateway
                ),
                RejectReason::GatewayDropped =>
                    format!("gateway {} is left out (see above)", rejection.gateway),
                RejectReason::PodMapFull => format!(
                    "node {node}'s kernel map of marked pods is full: the pod is not marked"
                ),
            }
        ));
    }

    if let Some(why) = blocker {
        out.push(format!("result: no gateway, because {why}"));
        return Explanation(out);
    }
    let Some(chosen) = plan
        .pods
        .iter()
        .find(|p| p.namespace == namespace && p.name == name)
    else {
        out.push(format!(
            "result: no gateway: {}, so it leaves with its node's address (or as the CNI sends \
             it)",
            if refused {
                "its annotation is refused (above) and no podSelector claims it"
            } else {
                "none claims it"
            }
        ));
        return Explanation(out);
    };
    let mut result = format!(
        "result: gateway {}, because {}",
        chosen.gateway,
        match chosen.reason {
            Reason::PodAnnotation => "of the pod's annotation",
            Reason::NamespaceAnnotation => "of the namespace's annotation",
            Reason::PodSelector => "its podSelector matches",
        }
    );
    if !chosen.overridden.is_empty() {
        result.push_str(&format!(
            "; it wins over {} (a pod annotation wins over a namespace annotation, which wins \
             over a podSelector; between podSelectors, the first gateway by name)",
            chosen.overridden.join(", ")
        ));
    }
    out.push(result);
    if let Some(gateway) = plan.gateways.iter().find(|g| g.name == chosen.gateway) {
        explain_gateway(&mut out, &plan, gateway, chosen.egress_ip, snapshot);
    }
    Explanation(out)
}

/// Where the winner sends the pod's traffic, and what stays off it.
fn explain_gateway(
    out: &mut Vec<String>,
    plan: &NodePlan,
    gateway: &super::GatewayPlan,
    egress_ip: std::net::Ipv4Addr,
    snapshot: &Snapshot,
) {
    let holder = gateway
        .egress
        .iter()
        .find(|e| e.ip == egress_ip)
        .and_then(|e| e.holder.as_ref());
    out.push(format!(
        "  egress IP {egress_ip} (of {}, chosen by the pod's IP), {}",
        gateway
            .egress
            .iter()
            .map(|e| e.ip.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        match (holder, gateway.failure_policy) {
            (Some(h), _) => format!("held by {} ({})", h.node, h.node_ip),
            (None, FailurePolicy::FailClosed) => {
                "held by no node now: the pod's traffic to its destinations is dropped \
                 (FailClosed)"
                    .to_owned()
            }
            (None, FailurePolicy::FailOpen) => {
                "held by no node now: the pod's traffic leaves from its own node (FailOpen)"
                    .to_owned()
            }
        }
    ));
    out.push(format!(
        "  through the gateway: {}",
        list(&gateway.destinations)
    ));
    let own = snapshot
        .gateways
        .get(&gateway.name)
        .map(|g| g.excluded.clone())
        .unwrap_or_default();
    out.push(format!(
        "  not through it: {} (the gateway's excludedCIDRs); {} (the cluster's own ranges: \
         nodes' addresses, pod CIDRs, --cluster-cidr)",
        list(&own),
        list(&plan.cluster_cidrs)
    ));
}

fn labels(labels: &Labels) -> String {
    if labels.is_empty() {
        return "none".to_owned();
    }
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use proptest::prelude::*;

    use super::*;
    use crate::source::FileSource;
    use crate::testing::arb_cluster;

    fn example(namespace: &str, pod: &str) -> String {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/objects.yaml");
        let (_, loaded) = FileSource::open(&file).unwrap_or_else(|e| panic!("{e}"));
        explain(&loaded.snapshot, namespace, pod, &PlanConfig::default()).to_string()
    }

    #[test]
    fn a_selected_pod_is_told_why_and_where_its_traffic_goes() {
        let text = example("payments", "api-1");
        for line in [
            "corp-fw: namespaceSelector {team=payments} admits namespace payments; podSelector \
             {app=api} matches the pod: it claims the pod",
            "result: gateway corp-fw, because its podSelector matches",
            "egress IP 10.99.0.200 (of 10.99.0.200, chosen by the pod's IP), held by node2",
            "through the gateway: 0.0.0.0/0",
            "not through it: 192.0.2.0/24 (the gateway's excludedCIDRs)",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
    }

    #[test]
    fn a_pod_left_alone_is_told_which_rule_left_it() {
        let refused = example("web", "shop");
        assert!(
            refused.contains(
                "the namespace's annotation is refused: gateway corp-fw does not admit \
                 namespace web"
            ) && refused.contains("result: no gateway: its annotation is refused"),
            "{refused}"
        );
        let unmatched = example("payments", "batch");
        assert!(
            unmatched.contains("podSelector {app=api} does not match the pod")
                && unmatched.contains("result: no gateway: none claims it"),
            "{unmatched}"
        );
        assert_eq!(
            example("payments", "nobody"),
            "pod payments/nobody: not in the objects\n"
        );
    }

    proptest! {
        /// Whatever the cluster, the result names the gateway the plan of the pod's node uses.
        #[test]
        fn the_result_is_the_plans(cluster in arb_cluster()) {
            let snapshot = cluster.snapshot();
            let config = cluster.config();
            for ((namespace, name), pod) in &snapshot.pods {
                let text = explain(&snapshot, namespace, name, &config).to_string();
                let planned = plan(&snapshot, pod.node.as_deref().unwrap_or_default(), &config)
                    .pods
                    .into_iter()
                    .find(|p| &p.namespace == namespace && &p.name == name);
                let result = text.lines().find(|l| l.starts_with("result: ")).unwrap_or_default();
                match planned {
                    Some(p) => prop_assert!(
                        result.starts_with(&format!("result: gateway {},", p.gateway)),
                        "{text}"
                    ),
                    None => prop_assert!(result.starts_with("result: no gateway"), "{text}"),
                }
            }
        }
    }
}
