//! The planning rules. Work is linear in pods times the gateways their namespace admits:
//! namespace-level decisions are made once per namespace, and pods on other nodes are only
//! looked at when this node holds an egress IP (it then SNATs for them).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use static_egress_common::capacity;

use super::failover::{self, Health};
use super::{
    Budget, DestEntry, GatewayPlan, HeldPod, HoldReason, Holder, NodePlan, PlanConfig, PlanProblem,
    PodPlan, Reason, RejectReason, Rejection, SnatPlan,
};
use crate::model::{Announce, Gateway, NamespaceInfo, PodInfo, Snapshot};

/// FNV-1a, 32 bits: stable across releases and architectures, unlike `std`'s hashers.
fn fnv1a_32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5, |hash, &byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    })
}

/// Ids for the BPF maps: FNV-1a 32 of the name, never 0 (the "no gateway" value). A collision
/// is settled by incrementing, in name order, so an id only moves when its own hash collides.
pub fn gateway_ids<I, S>(names: I) -> BTreeMap<String, u32>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let names: BTreeSet<String> = names.into_iter().map(|n| n.as_ref().to_owned()).collect();
    let mut used = HashSet::with_capacity(names.len());
    let mut ids = BTreeMap::new();
    for name in names {
        let mut id = fnv1a_32(name.as_bytes());
        while id == 0 || used.contains(&id) {
            id = id.wrapping_add(1);
        }
        used.insert(id);
        ids.insert(name, id);
    }
    ids
}

/// Decides what `node` must program. Pure and deterministic: same input, same plan.
pub fn plan(snapshot: &Snapshot, node: &str, config: &PlanConfig) -> NodePlan {
    let cluster_cidrs = cluster_ranges(snapshot, config);
    let Accepted {
        gateways: accepted,
        plans: gateways,
        problems,
    } = accept_gateways(snapshot, &cluster_cidrs, &config.health);
    let mut gateways = gateways;
    for egress in gateways.iter_mut().flat_map(|g| g.egress.iter_mut()) {
        if let Some(old) = config.moving.get(&egress.ip) {
            egress.holder = Some(old.clone());
        }
        if egress.holder.as_ref().is_none_or(|h| h.node != node) {
            continue;
        }
        if let Some(winner) = config.lost.get(&egress.ip) {
            // Its pods' packets follow the node that holds it now.
            egress.holder = snapshot.nodes.get(winner).and_then(|n| {
                Some(Holder {
                    node: winner.clone(),
                    node_ip: n.internal_ip?,
                })
            });
        }
    }

    let held: Vec<(usize, usize)> = gateways
        .iter()
        .enumerate()
        .flat_map(|(g, plan)| {
            plan.egress
                .iter()
                .enumerate()
                .filter(|(_, e)| e.holder.as_ref().is_some_and(|h| h.node == node))
                .map(move |(k, _)| (g, k))
        })
        .collect();
    let held_ips: HashSet<Ipv4Addr> = held
        .iter()
        .map(|&(g, k)| gateways[g].egress[k].ip)
        .collect();

    // The gateways whose egress IPs this node may take over, whatever the probes say now.
    let standby: Vec<bool> = accepted
        .iter()
        .map(|g| failover::could_hold(snapshot, g, node))
        .collect();

    let mut chooser = Chooser::new(snapshot, &accepted, &problems);
    let mut pods = Vec::new();
    let mut rejected = Vec::new();
    let mut rejected_namespaces = HashSet::new();
    let mut snat_pods: HashMap<Ipv4Addr, Vec<Ipv4Addr>> = HashMap::new();
    let mut senders = BTreeSet::new();
    let mut standby_senders = BTreeSet::new();
    let (starting, mut held_pods) = starting_pods(snapshot, node, config);
    if gateways.is_empty() {
        // Nothing could select them.
        held_pods.clear();
    }
    let announced: HashSet<(&str, &str)> = starting
        .iter()
        .map(|p| (p.namespace.as_str(), p.name.as_str()))
        .collect();
    let objects = snapshot
        .pods
        .values()
        .filter(|p| !announced.contains(&(p.namespace.as_str(), p.name.as_str())));
    for pod in objects.chain(&starting) {
        let local = pod.node.as_deref() == Some(node);
        if !local && held.is_empty() && !standby.contains(&true) {
            continue;
        }
        let Some(ip) = pod.ip.filter(|_| pod.running && !pod.host_network) else {
            continue;
        };
        let choice = chooser.choose(pod);
        if local {
            if let Some(why) = choice.pod_rejection {
                rejected.push(Rejection {
                    namespace: pod.namespace.clone(),
                    pod: Some(pod.name.clone()),
                    gateway: pod.gateway_annotation.clone().unwrap_or_default(),
                    why,
                });
            }
            if let Some((gateway, why)) = choice.namespace_rejection
                && rejected_namespaces.insert(pod.namespace.as_str())
            {
                rejected.push(Rejection {
                    namespace: pod.namespace.clone(),
                    pod: None,
                    gateway,
                    why,
                });
            }
        }
        let Some((winner, reason)) = choice.winner else {
            continue;
        };
        let gateway = &accepted[winner];
        let Some(&egress_ip) = gateway
            .egress_ips
            .get(fnv1a_32(&ip.octets()) as usize % gateway.egress_ips.len().max(1))
        else {
            continue;
        };
        let sender = pod
            .node
            .as_ref()
            .filter(|_| !local)
            .and_then(|n| snapshot.nodes.get(n))
            .and_then(|n| n.internal_ip);
        if held_ips.contains(&egress_ip) {
            snat_pods.entry(egress_ip).or_default().push(ip);
            senders.extend(sender);
        } else if standby[winner] {
            standby_senders.extend(sender);
        }
        let elsewhere = gateways[winner]
            .egress
            .iter()
            .find(|e| e.ip == egress_ip)
            .and_then(|e| e.holder.as_ref())
            .filter(|h| h.node != node);
        if let Some(holder) = elsewhere
            && announced.contains(&(pod.namespace.as_str(), pod.name.as_str()))
        {
            held_pods.push(HeldPod {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                ip,
                why: HoldReason::HolderElsewhere {
                    gateway: gateway.name.clone(),
                    egress_ip,
                    holder: holder.node.clone(),
                },
            });
        } else if local {
            pods.push(PodPlan {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                ip,
                gateway: gateway.name.clone(),
                gateway_id: gateways[winner].id,
                egress_ip,
                reason,
                overridden: choice
                    .overridden
                    .iter()
                    .map(|&g| accepted[g].name.clone())
                    .collect(),
            });
        }
    }
    pods.sort_by(|a, b| (a.ip, &a.namespace, &a.name).cmp(&(b.ip, &b.namespace, &b.name)));
    // More than a node can run, but the map is fixed: the lowest addresses keep their place.
    let no_room = pods.split_off(pods.len().min(capacity::PODS as usize));
    rejected.extend(no_room.into_iter().map(|pod| Rejection {
        namespace: pod.namespace,
        pod: Some(pod.name),
        gateway: pod.gateway,
        why: RejectReason::PodMapFull,
    }));
    held_pods.sort_by_key(|p| p.ip);
    held_pods.truncate((capacity::PODS as usize).saturating_sub(pods.len()));
    rejected.sort_by(|a, b| {
        (&a.namespace, &a.pod, &a.gateway).cmp(&(&b.namespace, &b.pod, &b.gateway))
    });

    let snat = held
        .iter()
        .map(|&(g, k)| {
            let plan = &gateways[g];
            let egress_ip = plan.egress[k].ip;
            let mut pods = snat_pods.remove(&egress_ip).unwrap_or_default();
            pods.sort_unstable();
            SnatPlan {
                gateway: plan.name.clone(),
                egress_ip,
                pods,
                destinations: plan.destinations.clone(),
                excluded: plan.excluded.clone(),
                // Leaving in a planned move: translated, no longer answering ARP (the new
                // holder will). A BGP route or an EC2 assignment stays until it lets go: the
                // new holder's replaces it, and without either nothing reaches the IP.
                announce: if config.moving.contains_key(&egress_ip)
                    && plan.announce == Announce::Arp
                {
                    Announce::None
                } else {
                    plan.announce
                },
            }
        })
        .collect();

    NodePlan {
        node: node.to_owned(),
        node_ip: snapshot.nodes.get(node).and_then(|n| n.internal_ip),
        gateways,
        pods,
        held: held_pods,
        rejected,
        snat,
        standby_senders: standby_senders.difference(&senders).copied().collect(),
        senders: senders.into_iter().collect(),
        remote_pod_cidrs: remote_pod_cidrs(snapshot, node),
        peers: peers(snapshot, node),
        cluster_cidrs,
        problems,
    }
}

/// The pods announced as starting here that the objects do not show running with an address
/// yet, as the planner sees them (with the announced address, running, here), and those the
/// objects do not know at all, held. Announcements of pods the objects already show running
/// change nothing: the objects win.
fn starting_pods(
    snapshot: &Snapshot,
    node: &str,
    config: &PlanConfig,
) -> (Vec<PodInfo>, Vec<HeldPod>) {
    let mut starting = Vec::new();
    let mut unknown = Vec::new();
    for ((namespace, name), announced) in &config.starting {
        let ip = announced.ip;
        match snapshot.pods.get(&(namespace.clone(), name.clone())) {
            Some(pod) if pod.host_network || (pod.running && pod.ip.is_some()) => {}
            Some(pod) => starting.push(PodInfo {
                ip: Some(ip),
                running: true,
                node: Some(node.to_owned()),
                ..pod.clone()
            }),
            None if !announced.hold_unknown => {}
            None => unknown.push(HeldPod {
                namespace: namespace.clone(),
                name: name.clone(),
                ip,
                why: HoldReason::Unknown,
            }),
        }
    }
    (starting, unknown)
}

impl PlanProblem {
    /// The gateway left out.
    pub fn gateway(&self) -> &str {
        match self {
            Self::EgressIpConflict { gateway, .. }
            | Self::EgressIpInCluster { gateway, .. }
            | Self::OverCapacity { gateway, .. } => gateway,
        }
    }
}

/// The gateways the planner programs, in name order, with their plans, and why the others are
/// left out. Every node decides the same from the same snapshot.
pub(super) struct Accepted<'a> {
    pub(super) gateways: Vec<&'a Gateway>,
    pub(super) plans: Vec<GatewayPlan>,
    pub(super) problems: Vec<PlanProblem>,
}

/// Leaves out, in name order, the gateways that reuse an egress IP of an earlier one, then those
/// that no longer fit the kernel maps after the earlier ones: a gateway is programmed whole or
/// not at all, and never at the expense of one before it.
pub(super) fn accept_gateways<'a>(
    snapshot: &'a Snapshot,
    cluster: &[Ipv4Net],
    health: &Health,
) -> Accepted<'a> {
    let mut problems = Vec::new();
    let safe: Vec<&Gateway> = snapshot
        .gateways
        .values()
        .filter(|g| match in_cluster(snapshot, cluster, g) {
            Some(problem) => {
                problems.push(problem);
                false
            }
            None => true,
        })
        .collect();
    let (candidates, conflicts) = resolve_conflicts(safe);
    problems.extend(conflicts);
    let ids = gateway_ids(candidates.iter().map(|g| g.name.as_str()));
    let mut free = [
        (Budget::Gateways, capacity::GATEWAYS as usize),
        (Budget::EgressIps, capacity::EGRESS as usize),
        (Budget::Destinations, capacity::DESTS as usize),
    ];
    let mut accepted = Accepted {
        gateways: Vec::with_capacity(candidates.len()),
        plans: Vec::with_capacity(candidates.len()),
        problems: Vec::new(),
    };
    for gateway in candidates {
        let plan = gateway_plan(
            snapshot,
            gateway,
            ids.get(&gateway.name).copied().unwrap_or(0),
            cluster,
            health,
        );
        let needs = |budget| match budget {
            Budget::Gateways => 1,
            Budget::EgressIps => plan.egress.len(),
            Budget::Destinations => plan.dest_entries.len(),
        };
        if let Some(&(budget, left)) = free.iter().find(|(b, left)| needs(*b) > *left) {
            problems.push(PlanProblem::OverCapacity {
                gateway: gateway.name.clone(),
                budget,
                needed: needs(budget),
                free: left,
            });
            continue;
        }
        for (budget, left) in &mut free {
            *left -= needs(*budget);
        }
        accepted.gateways.push(gateway);
        accepted.plans.push(plan);
    }
    accepted.problems = problems;
    accepted
}

fn remote_pod_cidrs(snapshot: &Snapshot, node: &str) -> Vec<Ipv4Net> {
    let mut cidrs: Vec<Ipv4Net> = snapshot
        .nodes
        .values()
        .filter(|n| n.name != node)
        .flat_map(|n| n.pod_cidrs.iter().copied())
        .collect();
    cidrs.sort_unstable();
    cidrs.dedup();
    cidrs
}

fn peers(snapshot: &Snapshot, node: &str) -> Vec<(Ipv4Net, Ipv4Addr)> {
    let mut peers: Vec<(Ipv4Net, Ipv4Addr)> = snapshot
        .nodes
        .values()
        .filter(|n| n.name != node)
        .filter_map(|n| Some((n, n.internal_ip?)))
        .flat_map(|(n, ip)| n.pod_cidrs.iter().map(move |c| (*c, ip)))
        .collect();
    peers.sort_unstable();
    peers.dedup_by_key(|(cidr, _)| *cidr);
    peers
}

fn cluster_ranges(snapshot: &Snapshot, config: &PlanConfig) -> Vec<Ipv4Net> {
    let mut ranges: Vec<Ipv4Net> = snapshot
        .nodes
        .values()
        .flat_map(|n| {
            let ip = n.internal_ip.map(Ipv4Net::from);
            n.pod_cidrs.iter().copied().chain(ip)
        })
        // A `--cluster-cidr` with host bits set would become a wrong LPM key.
        .chain(config.cluster_cidrs.iter().map(Ipv4Net::trunc))
        .collect();
    ranges.sort_unstable();
    ranges.dedup();
    ranges
}

/// An egress IP inside the cluster would take a node's address, or a pod's, or a Service's:
/// the holder would answer ARP for it and break that traffic. The first such IP, as a problem.
fn in_cluster(snapshot: &Snapshot, cluster: &[Ipv4Net], gateway: &Gateway) -> Option<PlanProblem> {
    gateway.egress_ips.iter().find_map(|&ip| {
        let why = snapshot
            .nodes
            .values()
            .find_map(|node| {
                if node.internal_ip == Some(ip) {
                    Some(format!("the InternalIP of node {}", node.name))
                } else {
                    // The narrowest, whatever the order the Node lists its pod CIDRs in.
                    let cidr = (node.pod_cidrs.iter())
                        .filter(|c| c.contains(&ip))
                        .max_by_key(|c| c.prefix_len())?;
                    Some(format!("in node {}'s pod CIDR {cidr}", node.name))
                }
            })
            .or_else(|| {
                let range = cluster.iter().find(|r| r.contains(&ip))?;
                Some(format!("in the cluster range {range}"))
            })?;
        Some(PlanProblem::EgressIpInCluster {
            gateway: gateway.name.clone(),
            ip,
            why,
        })
    })
}

/// Gateways by name; a gateway reusing an egress IP of an earlier one is dropped whole,
/// because half a gateway would route its pods to an address another gateway SNATs.
fn resolve_conflicts(gateways: Vec<&Gateway>) -> (Vec<&Gateway>, Vec<PlanProblem>) {
    let mut owner: HashMap<Ipv4Addr, &str> = HashMap::new();
    let mut accepted = Vec::new();
    let mut problems = Vec::new();
    for gateway in gateways {
        let conflict = gateway
            .egress_ips
            .iter()
            .find_map(|ip| owner.get(ip).map(|kept_by| (*ip, *kept_by)));
        if let Some((ip, kept_by)) = conflict {
            problems.push(PlanProblem::EgressIpConflict {
                gateway: gateway.name.clone(),
                ip,
                kept_by: kept_by.to_owned(),
            });
            continue;
        }
        for ip in &gateway.egress_ips {
            owner.insert(*ip, &gateway.name);
        }
        accepted.push(gateway);
    }
    (accepted, problems)
}

fn gateway_plan(
    snapshot: &Snapshot,
    gateway: &Gateway,
    id: u32,
    cluster: &[Ipv4Net],
    health: &Health,
) -> GatewayPlan {
    let egress = failover::holders(gateway, &failover::eligible(snapshot, gateway, health));

    let mut destinations = gateway.destinations.clone();
    destinations.sort_unstable();
    destinations.dedup();
    let mut excluded: Vec<Ipv4Net> = gateway.excluded.iter().chain(cluster).copied().collect();
    excluded.sort_unstable();
    excluded.dedup();

    GatewayPlan {
        name: gateway.name.clone(),
        id,
        failure_policy: gateway.failure_policy,
        announce: gateway.announce,
        egress,
        dest_entries: dest_entries(&destinations, &excluded),
        destinations,
        excluded,
    }
}

/// LPM entries in which exclusions always win: CIDRs are nested or disjoint, so a destination
/// inside an exclusion is simply left out, and an exclusion only needs an entry where it
/// carves a hole in an included destination. Both lists are aggregated first (a destination
/// inside another adds nothing, and neighbouring node addresses merge), which keeps the map
/// small and each containment test a binary search.
pub(super) fn dest_entries(destinations: &[Ipv4Net], excluded: &[Ipv4Net]) -> Vec<DestEntry> {
    let excluded = Ipv4Net::aggregate(&excluded.to_vec());
    let included: Vec<Ipv4Net> = Ipv4Net::aggregate(&destinations.to_vec())
        .into_iter()
        .filter(|d| !covered(&excluded, d))
        .collect();
    let holes = excluded
        .iter()
        .filter(|e| covered(&included, e))
        .map(|&cidr| DestEntry {
            cidr,
            via_gateway: false,
        });
    let mut entries: Vec<DestEntry> = included
        .iter()
        .map(|&cidr| DestEntry {
            cidr,
            via_gateway: true,
        })
        .chain(holes)
        .collect();
    entries.sort_unstable_by_key(|e| e.cidr);
    entries
}

/// Whether a network of `disjoint` (sorted, as [`Ipv4Net::aggregate`] returns them) contains
/// `net`: only the last one starting at or before `net` can.
pub(super) fn covered(disjoint: &[Ipv4Net], net: &Ipv4Net) -> bool {
    let after = disjoint.partition_point(|n| n.network() <= net.network());
    after > 0 && disjoint[after - 1].contains(net)
}

/// Per-namespace decisions, made once for all the namespace's pods.
pub(super) struct NamespaceChoice {
    /// Indices (name order) of gateways whose namespaceSelector admits the namespace.
    admitted: Vec<usize>,
    /// Admitted gateways that select pods by label.
    by_selector: Vec<usize>,
    pub(super) annotation: Option<Result<usize, (String, RejectReason)>>,
}

pub(super) struct Chooser<'a> {
    snapshot: &'a Snapshot,
    /// Sorted by name, so an index order is a name order.
    pub(super) gateways: &'a [&'a Gateway],
    dropped: HashSet<&'a str>,
    namespaces: HashMap<&'a str, NamespaceChoice>,
}

pub(super) struct PodChoice {
    pub(super) winner: Option<(usize, Reason)>,
    overridden: Vec<usize>,
    pub(super) pod_rejection: Option<RejectReason>,
    namespace_rejection: Option<(String, RejectReason)>,
}

impl<'a> Chooser<'a> {
    /// `gateways` are those [`resolve_conflicts`] accepted, `problems` what it left out.
    pub(super) fn new(
        snapshot: &'a Snapshot,
        gateways: &'a [&'a Gateway],
        problems: &'a [PlanProblem],
    ) -> Self {
        Self {
            snapshot,
            gateways,
            dropped: problems.iter().map(PlanProblem::gateway).collect(),
            namespaces: HashMap::new(),
        }
    }

    /// Decides for `namespace` without caching: for callers that look at each namespace once.
    pub(super) fn namespace(&self, namespace: &str) -> NamespaceChoice {
        namespace_choice(self.snapshot, self.gateways, &self.dropped, namespace)
    }

    pub(super) fn choose(&mut self, pod: &'a PodInfo) -> PodChoice {
        let (gateways, dropped, snapshot) = (self.gateways, &self.dropped, self.snapshot);
        let ns = self
            .namespaces
            .entry(pod.namespace.as_str())
            .or_insert_with(|| namespace_choice(snapshot, gateways, dropped, &pod.namespace));

        let mut claims: Vec<(Reason, usize)> = Vec::new();
        let mut pod_rejection = None;
        if let Some(name) = &pod.gateway_annotation {
            match lookup(gateways, dropped, &ns.admitted, name) {
                Ok(g) => claims.push((Reason::PodAnnotation, g)),
                Err(why) => pod_rejection = Some(why),
            }
        }
        let mut namespace_rejection = None;
        match &ns.annotation {
            Some(Ok(g)) => claims.push((Reason::NamespaceAnnotation, *g)),
            Some(Err(rejection)) => namespace_rejection = Some(rejection.clone()),
            None => {}
        }
        for &g in &ns.by_selector {
            if gateways[g]
                .pod_selector
                .as_ref()
                .is_some_and(|s| s.matches(&pod.labels))
            {
                claims.push((Reason::PodSelector, g));
            }
        }

        let winner = claims.iter().min().map(|&(reason, g)| (g, reason));
        let mut overridden: Vec<usize> = claims
            .iter()
            .map(|&(_, g)| g)
            .filter(|&g| winner.is_none_or(|(w, _)| w != g))
            .collect();
        overridden.sort_unstable();
        overridden.dedup();
        PodChoice {
            winner,
            overridden,
            pod_rejection,
            namespace_rejection,
        }
    }
}

fn namespace_choice(
    snapshot: &Snapshot,
    gateways: &[&Gateway],
    dropped: &HashSet<&str>,
    namespace: &str,
) -> NamespaceChoice {
    let missing = NamespaceInfo::default();
    let info = snapshot.namespaces.get(namespace).unwrap_or(&missing);
    let admitted: Vec<usize> = gateways
        .iter()
        .enumerate()
        .filter(|(_, g)| g.namespace_selector.matches(&info.labels))
        .map(|(i, _)| i)
        .collect();
    let by_selector = admitted
        .iter()
        .copied()
        .filter(|&i| gateways[i].pod_selector.is_some())
        .collect();
    let annotation = info.gateway_annotation.as_deref().map(|name| {
        lookup(gateways, dropped, &admitted, name).map_err(|why| (name.to_owned(), why))
    });
    NamespaceChoice {
        admitted,
        by_selector,
        annotation,
    }
}

fn lookup(
    gateways: &[&Gateway],
    dropped: &HashSet<&str>,
    admitted: &[usize],
    name: &str,
) -> Result<usize, RejectReason> {
    match gateways.binary_search_by(|g| g.name.as_str().cmp(name)) {
        Ok(g) if admitted.contains(&g) => Ok(g),
        Ok(_) => Err(RejectReason::NamespaceNotAdmitted),
        Err(_) if dropped.contains(name) => Err(RejectReason::GatewayDropped),
        Err(_) => Err(RejectReason::UnknownGateway),
    }
}
