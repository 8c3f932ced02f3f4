//! What the kernel maps and `Config` hold for a plan: the one place that puts a plan into
//! `static_egress_common`'s layouts (`bpf` writes them, the programs read them). Pure: no
//! kernel call, so every encoding is unit-tested here.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use static_egress_common::{
    CONFIG_FAST_PATH, DEST_EXCLUDED, DEST_GATEWAY_BITS, DEST_VIA_GATEWAY, DestKey, EGRESS_LOCAL,
    EGRESS_ON_LINK, EGRESS_QUIET, EGRESS_ROUTED, EGRESS_TUNNEL, EgressEntry, GATEWAY_FAIL_CLOSED,
    GATEWAY_HOLD, GatewayEntry, POD_VETH, PodEntry, RANGE_CLUSTER, RANGE_NODE, RANGE_REMOTE_PODS,
};

use super::tunnel;
use crate::model::FailurePolicy;
use crate::plan::NodePlan;

/// Everything the kernel maps must hold, computed from a plan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    pub pods: BTreeMap<u32, PodEntry>,
    /// (prefix length including the gateway bits, key) -> verdict
    pub dests: BTreeMap<(u32, DestKey), u8>,
    pub gateways: BTreeMap<u32, GatewayEntry>,
    pub egress: BTreeMap<u32, EgressEntry>,
    /// (prefix length, address) -> `RANGE_*` bits.
    pub ranges: BTreeMap<(u32, u32), u8>,
    /// (prefix length, address) of another node's pod CIDR -> that node's address.
    pub peers: BTreeMap<(u32, u32), u32>,
}

/// The interface the node routes a pod's address to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodLink {
    pub ifindex: u32,
    /// The node's end of a veth pair (whose other end the pod has, being routed to it).
    pub veth: bool,
}

/// An address as the maps and `Config` hold it: its four bytes in wire order.
pub fn wire(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// `Config::flags` for `plan`: the fast path only while a pod of this node leaves through
/// another node (nothing else can take it, and the uplink's ingress program would look every
/// packet's destination up among the local pods for nothing).
pub fn config_flags(plan: &NodePlan, fast_path: bool) -> u32 {
    let holders = plan.holders();
    let sends_away = plan
        .pods
        .iter()
        .any(|p| holders.get(&p.egress_ip).is_some_and(|h| *h != plan.node));
    if fast_path && sends_away {
        CONFIG_FAST_PATH
    } else {
        0
    }
}

/// The BPF map contents a plan asks for; `routed` is the holder our table routes to, `macs`
/// the holders' link-layer addresses known now, `tunneled` the holders reached through the
/// tunnel (and which of them are on the uplink's subnet).
pub fn map_contents(
    plan: &NodePlan,
    routed: Option<Ipv4Addr>,
    macs: &BTreeMap<Ipv4Addr, [u8; 6]>,
    tunneled: &tunnel::Tunneled,
    pod_links: &HashMap<Ipv4Addr, PodLink>,
) -> MapContents {
    let mut maps = MapContents::default();
    // Per egress IP held here: a gateway's own setting, or quiet while it leaves in a planned
    // move (see `PlanConfig::moving`).
    let quiet: BTreeSet<Ipv4Addr> = plan
        .snat
        .iter()
        .filter(|s| s.announce.quiet())
        .map(|s| s.egress_ip)
        .collect();
    for gw in &plan.gateways {
        let flags = match gw.failure_policy {
            FailurePolicy::FailClosed => GATEWAY_FAIL_CLOSED,
            FailurePolicy::FailOpen => 0,
        };
        maps.gateways.insert(gw.id, GatewayEntry { flags });
        for e in &gw.egress {
            let entry = match &e.holder {
                Some(h) => EgressEntry {
                    holder: wire(h.node_ip),
                    flags: if h.node == plan.node && quiet.contains(&e.ip) {
                        EGRESS_LOCAL | EGRESS_QUIET
                    } else if h.node == plan.node {
                        EGRESS_LOCAL
                    } else if tunneled.on_link.contains(&h.node_ip) {
                        let routed = if routed == Some(h.node_ip) {
                            EGRESS_ROUTED
                        } else {
                            0
                        };
                        EGRESS_TUNNEL | EGRESS_ON_LINK | routed
                    } else if tunneled.contains(&h.node_ip) {
                        EGRESS_TUNNEL
                    } else if routed == Some(h.node_ip) {
                        EGRESS_ROUTED
                    } else {
                        0
                    },
                    holder_mac: macs.get(&h.node_ip).copied().unwrap_or_default(),
                    _reserved: [0; 2],
                },
                None => EgressEntry {
                    holder: 0,
                    flags: 0,
                    holder_mac: [0; 6],
                    _reserved: [0; 2],
                },
            };
            maps.egress.insert(wire(e.ip), entry);
        }
        for d in &gw.dest_entries {
            let key = DestKey {
                gateway: gw.id,
                addr: wire(d.cidr.network()),
            };
            let verdict = if d.via_gateway {
                DEST_VIA_GATEWAY
            } else {
                DEST_EXCLUDED
            };
            maps.dests.insert(
                (DEST_GATEWAY_BITS + u32::from(d.cidr.prefix_len()), key),
                verdict,
            );
        }
    }
    for cidr in &plan.cluster_cidrs {
        let bits = if plan.remote_pod_cidrs.binary_search(cidr).is_ok() {
            RANGE_CLUSTER | RANGE_REMOTE_PODS
        } else {
            RANGE_CLUSTER
        };
        maps.ranges
            .insert((u32::from(cidr.prefix_len()), wire(cidr.network())), bits);
    }
    for pod in &plan.pods {
        let link = pod_links.get(&pod.ip).copied().unwrap_or_default();
        maps.pods.insert(
            wire(pod.ip),
            PodEntry {
                gateway: pod.gateway_id,
                egress_ip: wire(pod.egress_ip),
                ifindex: link.ifindex,
                flags: if link.veth { POD_VETH } else { 0 },
            },
        );
    }
    // The nodes whose tunnel packets the programs take in themselves: the same as nftables'
    // (`nft::Tunnel::peers`).
    for (_, node) in &plan.peers {
        *maps
            .ranges
            .entry((32, wire(*node)))
            .or_insert(RANGE_CLUSTER) |= RANGE_NODE;
    }
    for (cidr, node) in &plan.peers {
        maps.peers.insert(
            (u32::from(cidr.prefix_len()), wire(cidr.network())),
            wire(*node),
        );
    }
    for pod in &plan.held {
        maps.pods.insert(
            wire(pod.ip),
            PodEntry {
                gateway: GATEWAY_HOLD,
                egress_ip: 0,
                ifindex: 0,
                flags: 0,
            },
        );
    }
    maps
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::{routed_holder, single_remote_holder};
    use crate::model::Announce;
    use crate::plan::{EgressPlan, GatewayPlan, Holder, PodPlan, Reason, SnatPlan};

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("address")
    }

    /// node1's plan: gateway `a` (10.99.0.200) and `b` (10.99.0.201) with the given holders,
    /// and one local pod per egress IP listed in `pods`.
    fn plan(holders: [&str; 2], pods: &[&str]) -> NodePlan {
        let egress = |addr: &str, node: &str| EgressPlan {
            ip: ip(addr),
            holder: Some(Holder {
                node: node.into(),
                node_ip: ip(&format!("10.99.0.1{}", &node[4..])),
            }),
        };
        let gateway = |name: &str, id: u32, e: EgressPlan| GatewayPlan {
            name: name.into(),
            id,
            failure_policy: FailurePolicy::FailClosed,
            egress: vec![e],
            dest_entries: vec![],
            destinations: vec![],
            excluded: vec![],
            announce: Default::default(),
        };
        NodePlan {
            node: "node1".into(),
            gateways: vec![
                gateway("a", 1, egress("10.99.0.200", holders[0])),
                gateway("b", 2, egress("10.99.0.201", holders[1])),
            ],
            pods: pods
                .iter()
                .enumerate()
                .map(|(i, e)| PodPlan {
                    namespace: "ns".into(),
                    name: format!("p{i}"),
                    ip: ip(&format!("10.244.1.{}", i + 2)),
                    gateway: "a".into(),
                    gateway_id: 1,
                    egress_ip: ip(e),
                    reason: Reason::PodSelector,
                    overridden: vec![],
                })
                .collect(),
            ..NodePlan::default()
        }
    }

    #[test]
    fn routes_to_the_holder_only_when_every_local_pod_uses_that_one_remote_node() {
        let one = plan(["node2", "node3"], &["10.99.0.200", "10.99.0.200"]);
        assert_eq!(single_remote_holder(&one), Some(ip("10.99.0.12")));
        let routed = map_contents(
            &one,
            single_remote_holder(&one),
            &BTreeMap::new(),
            &tunnel::Tunneled::default(),
            &HashMap::new(),
        );
        assert_eq!(routed.egress[&wire(ip("10.99.0.200"))].flags, EGRESS_ROUTED);
        assert_eq!(routed.egress[&wire(ip("10.99.0.201"))].flags, 0);

        let two = plan(["node2", "node3"], &["10.99.0.200", "10.99.0.201"]);
        assert_eq!(single_remote_holder(&two), None);
        // A pod whose egress IP this node holds needs the table's own default route.
        let local = plan(["node2", "node1"], &["10.99.0.200", "10.99.0.201"]);
        assert_eq!(single_remote_holder(&local), None);
        assert_eq!(
            map_contents(
                &local,
                None,
                &BTreeMap::new(),
                &tunnel::Tunneled::default(),
                &HashMap::new()
            )
            .egress[&wire(ip("10.99.0.201"))]
                .flags,
            EGRESS_LOCAL
        );
        assert_eq!(single_remote_holder(&plan(["node2", "node3"], &[])), None);
    }

    #[test]
    fn the_fast_path_is_on_only_while_a_local_pod_leaves_through_another_node() {
        let away = plan(["node2", "node1"], &["10.99.0.200", "10.99.0.201"]);
        assert_eq!(config_flags(&away, true), CONFIG_FAST_PATH);
        assert_eq!(config_flags(&away, false), 0);
        // Its only pod leaves here, or it has none: nothing for the fast path to take.
        let here = plan(["node2", "node1"], &["10.99.0.201"]);
        assert_eq!(config_flags(&here, true), 0);
        assert_eq!(config_flags(&plan(["node2", "node3"], &[]), true), 0);
    }

    #[test]
    fn an_egress_ip_held_here_is_quiet_as_its_translation_says() {
        let mut local = plan(["node1", "node1"], &[]);
        let snat = |addr: &str, announce: Announce| SnatPlan {
            gateway: "a".into(),
            egress_ip: ip(addr),
            pods: vec![],
            destinations: vec![],
            excluded: vec![],
            announce,
        };
        // Gateway `a` answers ARP, but its IP leaves in a planned move (see
        // `PlanConfig::moving`); `b`'s goes on.
        local.snat = vec![
            snat("10.99.0.200", Announce::None),
            snat("10.99.0.201", Announce::Arp),
        ];
        let maps = map_contents(
            &local,
            None,
            &BTreeMap::new(),
            &tunnel::Tunneled::default(),
            &HashMap::new(),
        );
        assert_eq!(
            maps.egress[&wire(ip("10.99.0.200"))].flags,
            EGRESS_LOCAL | EGRESS_QUIET
        );
        assert_eq!(maps.egress[&wire(ip("10.99.0.201"))].flags, EGRESS_LOCAL);
    }

    #[test]
    fn tunneled_holders_are_flagged_and_the_peers_known() {
        let mut one = plan(["node2", "node3"], &["10.99.0.200", "10.99.0.201"]);
        one.peers = vec![("10.244.2.0/24".parse().expect("net"), ip("10.99.0.12"))];
        let mut tunneled = tunnel::Tunneled {
            holders: BTreeSet::from([ip("10.99.0.13")]),
            on_link: BTreeSet::new(),
        };
        let maps = map_contents(&one, None, &BTreeMap::new(), &tunneled, &HashMap::new());
        assert_eq!(maps.egress[&wire(ip("10.99.0.200"))].flags, 0);
        assert_eq!(maps.egress[&wire(ip("10.99.0.201"))].flags, EGRESS_TUNNEL);
        // On the uplink's subnet, the holder is the outer packet's next hop; our table may
        // route to it.
        tunneled.on_link.insert(ip("10.99.0.13"));
        let maps = map_contents(&one, None, &BTreeMap::new(), &tunneled, &HashMap::new());
        assert_eq!(
            maps.egress[&wire(ip("10.99.0.201"))].flags,
            EGRESS_TUNNEL | EGRESS_ON_LINK
        );
        let via = Some(ip("10.99.0.13"));
        let mine = plan(["node3", "node3"], &["10.99.0.201", "10.99.0.201"]);
        assert_eq!(routed_holder(&mine, &tunneled), via);
        let behind_a_router = tunnel::Tunneled {
            on_link: BTreeSet::new(),
            ..tunneled.clone()
        };
        assert_eq!(routed_holder(&mine, &behind_a_router), None);
        assert_eq!(routed_holder(&mine, &tunnel::Tunneled::default()), via);
        let maps = map_contents(&one, via, &BTreeMap::new(), &tunneled, &HashMap::new());
        assert_eq!(
            maps.egress[&wire(ip("10.99.0.201"))].flags,
            EGRESS_TUNNEL | EGRESS_ON_LINK | EGRESS_ROUTED
        );
        assert_eq!(
            maps.peers,
            BTreeMap::from([((24, wire(ip("10.244.2.0"))), wire(ip("10.99.0.12")))])
        );
        // Its tunnel packets are taken in by the programs.
        assert_eq!(
            maps.ranges[&(32, wire(ip("10.99.0.12")))] & (RANGE_NODE | RANGE_CLUSTER),
            RANGE_NODE | RANGE_CLUSTER
        );
        assert_eq!(
            one.remote_holders(),
            BTreeSet::from([ip("10.99.0.12"), ip("10.99.0.13")])
        );
    }

    #[test]
    fn each_pod_entry_names_the_interface_its_replies_go_to() {
        let links = HashMap::from([
            (
                ip("10.244.1.2"),
                PodLink {
                    ifindex: 7,
                    veth: true,
                },
            ),
            (
                ip("10.244.1.3"),
                PodLink {
                    ifindex: 8,
                    veth: false,
                },
            ),
        ]);
        let two = plan(["node2", "node3"], &["10.99.0.200"; 3]);
        let maps = map_contents(
            &two,
            None,
            &BTreeMap::new(),
            &tunnel::Tunneled::default(),
            &links,
        );
        let entry = |i| maps.pods[&wire(ip(i))];
        assert_eq!(
            (entry("10.244.1.2").ifindex, entry("10.244.1.2").flags),
            (7, POD_VETH)
        );
        // Behind a bridge: its replies go to the bridge.
        assert_eq!(
            (entry("10.244.1.3").ifindex, entry("10.244.1.3").flags),
            (8, 0)
        );
        // A pod no interface routes to: the fast path leaves its replies to the stack.
        assert_eq!(entry("10.244.1.4").ifindex, 0);
    }
}
