//! Properties of the planner over generated clusters (`crate::testing::arb_cluster`), checked
//! against brute-force oracles: which addresses go through a gateway, who may be marked, who
//! holds an egress IP. The clusters are small, the alphabets smaller, so that names, labels,
//! CIDRs and addresses collide often.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use proptest::collection::vec;
use proptest::prelude::*;

use super::compute::{covered, dest_entries};
use super::*;
use crate::model::{Labels, Snapshot};
use crate::testing::{Cluster, arb_addr, arb_cidr, arb_cluster};

/// What the kernel's LPM trie answers for `addr`: the flag of the longest entry containing it,
/// "not through a gateway" when none does.
fn lpm(entries: &[DestEntry], addr: Ipv4Addr) -> bool {
    entries
        .iter()
        .filter(|e| e.cidr.contains(&addr))
        .max_by_key(|e| e.cidr.prefix_len())
        .is_some_and(|e| e.via_gateway)
}

fn inside(nets: &[Ipv4Net], addr: Ipv4Addr) -> bool {
    nets.iter().any(|n| n.contains(&addr))
}

/// The addresses where an answer can change: the first and last address of every network and
/// their neighbours outside it, plus `extra`.
fn probes(nets: &[Ipv4Net], extra: &[Ipv4Addr]) -> Vec<Ipv4Addr> {
    let mut out: Vec<Ipv4Addr> = nets
        .iter()
        .flat_map(|n| {
            let (first, last) = (u32::from(n.network()), u32::from(n.broadcast()));
            [first.wrapping_sub(1), first, last, last.wrapping_add(1)]
        })
        .map(Ipv4Addr::from)
        .chain(extra.iter().copied())
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Whether `net` lies within the union of `nets`, by halving it until each half is inside one
/// of them or outside all (CIDRs are nested or disjoint).
fn within_union(nets: &[Ipv4Net], net: Ipv4Net) -> bool {
    if nets.iter().any(|n| n.contains(&net)) {
        return true;
    }
    if !nets.iter().any(|n| net.contains(n)) {
        return false;
    }
    net.subnets(net.prefix_len() + 1)
        .is_ok_and(|mut halves| halves.all(|half| within_union(nets, half)))
}

/// The ranges that never go through a gateway, computed from the snapshot as the README
/// states them: every node's pod CIDRs and InternalIP, and `--cluster-cidr`.
fn cluster_ranges(snapshot: &Snapshot, config: &PlanConfig) -> Vec<Ipv4Net> {
    let nodes = snapshot.nodes.values().flat_map(|n| {
        let ip = n.internal_ip.map(Ipv4Net::from);
        n.pod_cidrs.iter().copied().chain(ip)
    });
    nodes.chain(config.cluster_cidrs.iter().copied()).collect()
}

/// A plan for every node of the cluster, and for one that does not exist.
fn plans(cluster: &Cluster) -> (Snapshot, Vec<NodePlan>) {
    let snapshot = cluster.snapshot();
    let config = cluster.config();
    let plans = cluster
        .node_names()
        .iter()
        .map(|node| plan(&snapshot, node, &config))
        .collect();
    (snapshot, plans)
}

fn namespace_labels(snapshot: &Snapshot, namespace: &str) -> Labels {
    snapshot
        .namespaces
        .get(namespace)
        .map(|n| n.labels.clone())
        .unwrap_or_default()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// [`covered`] over an aggregated list is containment in the union of the list.
    #[test]
    fn covered_is_containment_in_the_union(
        nets in vec(arb_cidr(), 0..8),
        net in arb_cidr(),
    ) {
        let aggregated = Ipv4Net::aggregate(&nets);
        prop_assert_eq!(covered(&aggregated, &net), within_union(&nets, net));
    }

    /// An address goes through the gateway iff it is inside some destination and inside no
    /// exclusion, as a longest-prefix-match lookup over the entries answers it; the entries are
    /// valid LPM keys (no host bits, each once), and an exclusion only has an entry where it
    /// carves a hole in a destination.
    #[test]
    fn dest_entries_agree_with_the_oracle(
        destinations in vec(arb_cidr(), 1..6),
        excluded in vec(arb_cidr(), 0..6),
        extra in vec(arb_addr(), 0..16),
    ) {
        let entries = dest_entries(&destinations, &excluded);
        let all: Vec<Ipv4Net> = destinations.iter().chain(&excluded).copied().collect();
        for addr in probes(&all, &extra) {
            let expected = inside(&destinations, addr) && !inside(&excluded, addr);
            prop_assert_eq!(lpm(&entries, addr), expected, "{} in {:?}", addr, entries);
        }
        for pair in entries.windows(2) {
            prop_assert!(pair[0].cidr < pair[1].cidr, "sorted, each key once: {:?}", entries);
        }
        for entry in &entries {
            prop_assert_eq!(entry.cidr.trunc(), entry.cidr);
            if !entry.via_gateway {
                prop_assert!(
                    entries.iter().any(|e| e.via_gateway && e.cidr.contains(&entry.cidr)),
                    "hole {} outside every destination: {:?}", entry.cidr, entries
                );
            }
        }
    }

    /// Same input, same plan; and the plan does not depend on the order in which objects were
    /// inserted, nor on the order of CIDR lists, selector expressions and their values.
    #[test]
    fn plan_is_deterministic_and_order_independent(
        cluster in arb_cluster(),
        seed in any::<u64>(),
    ) {
        let permuted = cluster.permuted(seed);
        let (_, first) = plans(&cluster);
        let (_, again) = plans(&cluster.clone());
        prop_assert_eq!(&first, &again);
        let config = permuted.config();
        let snapshot_permuted = permuted.snapshot();
        for expected in &first {
            let reordered = plan(&snapshot_permuted, &expected.node, &config);
            prop_assert_eq!(&reordered, expected);
        }
    }

    /// No dest entry sends an address of an exclusion or of the cluster (every node's pod CIDRs
    /// and InternalIP, `--cluster-cidr`) through a gateway, and every other address of a
    /// destination goes through it.
    #[test]
    fn excluded_and_cluster_ranges_are_never_marked(
        cluster in arb_cluster(),
        extra in vec(arb_addr(), 0..16),
    ) {
        let (snapshot, plans) = plans(&cluster);
        let config = cluster.config();
        let in_cluster = cluster_ranges(&snapshot, &config);
        for node_plan in &plans {
            for gateway in &node_plan.gateways {
                let spec = &snapshot.gateways[&gateway.name];
                let all: Vec<Ipv4Net> = spec
                    .destinations
                    .iter()
                    .chain(&spec.excluded)
                    .chain(&in_cluster)
                    .copied()
                    .collect();
                for addr in probes(&all, &extra) {
                    let never = inside(&spec.excluded, addr) || inside(&in_cluster, addr);
                    let expected = inside(&spec.destinations, addr) && !never;
                    prop_assert_eq!(
                        lpm(&gateway.dest_entries, addr),
                        expected,
                        "{} of gateway {} on {}: {:?}",
                        addr, gateway.name, node_plan.node, gateway.dest_entries
                    );
                }
                // The holder's SNAT leaves out the same ranges.
                for range in spec.excluded.iter().chain(&in_cluster) {
                    prop_assert!(
                        within_union(&gateway.excluded, range.trunc()),
                        "{} not excluded from SNAT for {}", range, gateway.name
                    );
                }
            }
        }
    }

    /// Every marked local pod is running, has an IP, is not hostNetwork, and its namespace is
    /// admitted by its gateway, which claimed it by annotation or selector; a pod whose own
    /// annotation names an admitting gateway gets it; a local pod some admitting gateway selects
    /// is marked.
    #[test]
    fn marked_pods_are_local_running_and_admitted(cluster in arb_cluster()) {
        let (snapshot, plans) = plans(&cluster);
        for node_plan in &plans {
            let accepted: BTreeMap<&str, &GatewayPlan> =
                node_plan.gateways.iter().map(|g| (g.name.as_str(), g)).collect();
            for marked in &node_plan.pods {
                let pod = &snapshot.pods[&(marked.namespace.clone(), marked.name.clone())];
                prop_assert_eq!(pod.node.as_deref(), Some(node_plan.node.as_str()));
                prop_assert!(pod.running && !pod.host_network, "{:?}", pod);
                prop_assert_eq!(pod.ip, Some(marked.ip));
                let gateway = &snapshot.gateways[&marked.gateway];
                let labels = namespace_labels(&snapshot, &pod.namespace);
                prop_assert!(gateway.namespace_selector.matches(&labels), "{:?}", marked);
                let plan = accepted.get(marked.gateway.as_str());
                prop_assert_eq!(plan.map(|g| g.id), Some(marked.gateway_id));
                prop_assert!(gateway.egress_ips.contains(&marked.egress_ip));
                let namespace_annotation = snapshot
                    .namespaces
                    .get(&pod.namespace)
                    .and_then(|n| n.gateway_annotation.as_deref());
                let claimed = match marked.reason {
                    Reason::PodAnnotation => {
                        pod.gateway_annotation.as_deref() == Some(gateway.name.as_str())
                    }
                    Reason::NamespaceAnnotation => {
                        namespace_annotation == Some(gateway.name.as_str())
                    }
                    Reason::PodSelector => {
                        gateway.pod_selector.as_ref().is_some_and(|s| s.matches(&pod.labels))
                    }
                };
                prop_assert!(claimed, "{:?} for {:?}", marked, pod);
            }

            let marked: BTreeMap<(&str, &str), &PodPlan> = node_plan
                .pods
                .iter()
                .map(|p| ((p.namespace.as_str(), p.name.as_str()), p))
                .collect();
            for pod in snapshot.pods.values() {
                let eligible = pod.node.as_deref() == Some(node_plan.node.as_str())
                    && pod.running
                    && !pod.host_network
                    && pod.ip.is_some();
                if !eligible {
                    continue;
                }
                let labels = namespace_labels(&snapshot, &pod.namespace);
                let admits = |name: &str| {
                    accepted.contains_key(name)
                        && snapshot.gateways[name].namespace_selector.matches(&labels)
                };
                let found = marked.get(&(pod.namespace.as_str(), pod.name.as_str()));
                if let Some(name) = pod.gateway_annotation.as_deref().filter(|n| admits(n)) {
                    prop_assert_eq!(found.map(|p| p.gateway.as_str()), Some(name));
                    prop_assert_eq!(found.map(|p| p.reason), Some(Reason::PodAnnotation));
                }
                let selected = accepted.keys().any(|name| {
                    admits(name)
                        && snapshot.gateways[*name]
                            .pod_selector
                            .as_ref()
                            .is_some_and(|s| s.matches(&pod.labels))
                });
                if selected {
                    prop_assert!(found.is_some(), "{:?} not marked on {}", pod, node_plan.node);
                }
            }
        }
    }

    /// Each egress IP is held by at most one node, a Ready one with an InternalIP that matches
    /// the gateway's nodeSelector, and by one whenever such a node exists; every node computes
    /// the same holders and SNATs exactly what it holds; a gateway is either planned or left
    /// out with a problem, and no planned egress IP lies in the cluster.
    #[test]
    fn each_egress_ip_has_at_most_one_eligible_holder(cluster in arb_cluster()) {
        let (snapshot, plans) = plans(&cluster);
        let in_cluster = cluster_ranges(&snapshot, &cluster.config());
        let first = &plans[0];
        for node_plan in &plans {
            prop_assert_eq!(&node_plan.gateways, &first.gateways);
            prop_assert_eq!(&node_plan.problems, &first.problems);
            let held: Vec<Ipv4Addr> = node_plan
                .gateways
                .iter()
                .flat_map(|g| &g.egress)
                .filter(|e| e.holder.as_ref().is_some_and(|h| h.node == node_plan.node))
                .map(|e| e.ip)
                .collect();
            let snat: Vec<Ipv4Addr> = node_plan.snat.iter().map(|s| s.egress_ip).collect();
            prop_assert_eq!(snat, held);
        }

        let mut holders: BTreeMap<Ipv4Addr, &str> = BTreeMap::new();
        for gateway in &first.gateways {
            let spec = &snapshot.gateways[&gateway.name];
            let eligible = snapshot.nodes.values().any(|n| {
                n.ready && n.internal_ip.is_some() && spec.node_selector.matches(&n.labels)
            });
            let ips: Vec<Ipv4Addr> = gateway.egress.iter().map(|e| e.ip).collect();
            prop_assert_eq!(&ips, &spec.egress_ips);
            for egress in &gateway.egress {
                prop_assert!(
                    holders.insert(egress.ip, &gateway.name).is_none(),
                    "{} planned twice", egress.ip
                );
                prop_assert!(!inside(&in_cluster, egress.ip), "{} is in the cluster", egress.ip);
                prop_assert_eq!(egress.holder.is_some(), eligible);
                if let Some(holder) = &egress.holder {
                    let node = &snapshot.nodes[&holder.node];
                    prop_assert!(node.ready);
                    prop_assert_eq!(node.internal_ip, Some(holder.node_ip));
                    prop_assert!(spec.node_selector.matches(&node.labels));
                }
            }
        }
        for name in snapshot.gateways.keys() {
            let planned = first.gateways.iter().any(|g| &g.name == name);
            let left_out = first.problems.iter().any(|p| p.gateway() == name);
            prop_assert!(planned != left_out, "gateway {}: planned {}, left out {}", name, planned, left_out);
        }
    }
}
