#![expect(clippy::unwrap_used, reason = "tests fail loudly")]

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::*;
use crate::model::{FailurePolicy, Gateway, NamespaceInfo, NodeInfo, PodInfo, Selector, Snapshot};
use crate::testing::labels;

fn ip(text: &str) -> Ipv4Addr {
    text.parse().unwrap()
}

fn net(text: &str) -> Ipv4Net {
    text.parse().unwrap()
}

fn nets(list: &[&str]) -> Vec<Ipv4Net> {
    list.iter().map(|n| net(n)).collect()
}

fn selector(yaml: &str) -> Selector {
    Selector::try_from(&serde_saphyr::from_str::<LabelSelector>(yaml).unwrap()).unwrap()
}

fn gateway(name: &str, egress: &[&str]) -> Gateway {
    Gateway {
        name: name.to_owned(),
        egress_ips: egress.iter().map(|i| ip(i)).collect(),
        node_selector: Selector::everything(),
        namespace_selector: Selector::everything(),
        pod_selector: None,
        destinations: nets(&["0.0.0.0/0"]),
        excluded: Vec::new(),
        failure_policy: FailurePolicy::FailClosed,
        announce: Default::default(),
    }
}

/// Builds snapshots tersely; every pod is running with an IP unless a test changes it.
#[derive(Default)]
struct World(Snapshot);

impl World {
    fn namespace(mut self, name: &str, pairs: &[(&str, &str)], annotation: Option<&str>) -> Self {
        self.0.namespaces.insert(
            name.to_owned(),
            NamespaceInfo {
                name: name.to_owned(),
                labels: labels(pairs),
                gateway_annotation: annotation.map(str::to_owned),
            },
        );
        self
    }

    fn node(mut self, name: &str, node_ip: &str, pod_cidr: &str, ready: bool) -> Self {
        self.0.nodes.insert(
            name.to_owned(),
            NodeInfo {
                name: name.to_owned(),
                labels: labels(&[("kubernetes.io/hostname", name)]),
                ready,
                unschedulable: false,
                internal_ip: Some(ip(node_ip)),
                pod_cidrs: nets(&[pod_cidr]),
            },
        );
        self
    }

    fn pod(
        mut self,
        at: &str,
        node: &str,
        pod_ip: &str,
        pairs: &[(&str, &str)],
        annotation: Option<&str>,
    ) -> Self {
        let (namespace, name) = at.split_once('/').unwrap();
        self.0.pods.insert(
            (namespace.to_owned(), name.to_owned()),
            PodInfo {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                labels: labels(pairs),
                gateway_annotation: annotation.map(str::to_owned),
                node: Some(node.to_owned()),
                ip: Some(ip(pod_ip)),
                running: true,
                host_network: false,
            },
        );
        self
    }

    fn gateway(mut self, gateway: Gateway) -> Self {
        self.0.gateways.insert(gateway.name.clone(), gateway);
        self
    }

    fn edit_pod(mut self, at: &str, edit: impl FnOnce(&mut PodInfo)) -> Self {
        let (namespace, name) = at.split_once('/').unwrap();
        edit(
            self.0
                .pods
                .get_mut(&(namespace.to_owned(), name.to_owned()))
                .unwrap(),
        );
        self
    }

    fn edit_node(mut self, name: &str, edit: impl FnOnce(&mut NodeInfo)) -> Self {
        edit(self.0.nodes.get_mut(name).unwrap());
        self
    }

    fn plan(&self, node: &str) -> NodePlan {
        plan(&self.0, node, &PlanConfig::default())
    }
}

/// Three nodes; n1 and n2 Ready. Namespace `shop` (team=payments), `dev` (team=dev).
fn cluster() -> World {
    World::default()
        .node("n1", "10.0.0.1", "10.244.1.0/24", true)
        .node("n2", "10.0.0.2", "10.244.2.0/24", true)
        .node("n3", "10.0.0.3", "10.244.3.0/24", false)
        .namespace("shop", &[("team", "payments")], None)
        .namespace("dev", &[("team", "dev")], None)
}

fn pod_names(plan: &NodePlan) -> Vec<String> {
    plan.pods
        .iter()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect()
}

fn fnv1a_32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

#[test]
fn gateway_ids_are_fnv_of_the_name() {
    let ids = gateway_ids(["corp-fw", "a"]);
    assert_eq!(ids["a"], 0xe40c_292c);
    assert_eq!(ids["corp-fw"], fnv1a_32(b"corp-fw"));
    assert_eq!(ids.len(), 2);
}

#[test]
fn gateway_ids_avoid_zero_and_resolve_collisions_in_name_order() {
    // Found offline: "gw-by4mkvm" hashes to 0; "gw-1192070" and "gw-412191" collide.
    assert_eq!(fnv1a_32(b"gw-by4mkvm"), 0);
    assert_eq!(fnv1a_32(b"gw-1192070"), fnv1a_32(b"gw-412191"));
    let h = fnv1a_32(b"gw-412191");

    let ids = gateway_ids(["gw-412191", "gw-by4mkvm", "gw-1192070"]);
    assert_eq!(ids["gw-by4mkvm"], 1);
    assert_eq!(ids["gw-1192070"], h, "first by name keeps the hash");
    assert_eq!(ids["gw-412191"], h + 1);

    // Without the collision, the other gateway's id is its plain hash again.
    assert_eq!(gateway_ids(["gw-412191"])["gw-412191"], h);
    // Other gateways coming and going leave ids alone.
    assert_eq!(
        gateway_ids(["gw-412191", "gw-1192070", "zzz"])["gw-412191"],
        h + 1
    );
}

#[test]
fn cluster_ranges_are_collected_sorted_and_deduplicated() {
    let world = cluster().edit_node("n3", |n| {
        n.pod_cidrs = nets(&["10.244.3.0/24", "10.244.1.0/24"]);
        n.internal_ip = None;
    });
    let config = PlanConfig {
        cluster_cidrs: nets(&["10.96.0.0/12", "10.244.0.0/16", "10.0.0.1/32"]),
        ..PlanConfig::default()
    };
    let plan = plan(&world.0, "n1", &config);
    assert_eq!(
        plan.cluster_cidrs,
        nets(&[
            "10.0.0.1/32",
            "10.0.0.2/32",
            "10.96.0.0/12",
            "10.244.0.0/16",
            "10.244.1.0/24",
            "10.244.2.0/24",
            "10.244.3.0/24",
        ])
    );
    assert_eq!(plan.node_ip, Some(ip("10.0.0.1")));
}

#[test]
fn default_destination_excludes_the_cluster() {
    let world = cluster().gateway(gateway("g", &["192.0.2.1"]));
    let plan = world.plan("n1");
    let g = &plan.gateways[0];
    assert_eq!(g.destinations, nets(&["0.0.0.0/0"]));
    assert_eq!(g.excluded, plan.cluster_cidrs);
    let entries: Vec<(String, bool)> = g
        .dest_entries
        .iter()
        .map(|e| (e.cidr.to_string(), e.via_gateway))
        .collect();
    // Neighbouring node addresses and pod CIDRs merge into fewer entries.
    let expected: Vec<(String, bool)> = [
        ("0.0.0.0/0", true),
        ("10.0.0.1/32", false),
        ("10.0.0.2/31", false),
        ("10.244.1.0/24", false),
        ("10.244.2.0/23", false),
    ]
    .iter()
    .map(|(c, v)| ((*c).to_owned(), *v))
    .collect();
    assert_eq!(entries, expected);
}

#[test]
fn exclusions_always_win_over_nested_destinations() {
    let mut g = gateway("g", &["192.0.2.1"]);
    g.destinations = nets(&[
        "10.0.0.0/8",
        "10.1.2.0/24",
        "10.2.0.0/16",
        "192.168.1.0/24",
        "203.0.113.0/24",
    ]);
    g.excluded = nets(&[
        "10.1.0.0/16",
        "192.168.0.0/16",
        "172.16.0.0/12",
        "203.0.113.7/32",
    ]);
    let world = World::default().gateway(g);
    let plan = plan(
        &world.0,
        "n1",
        &PlanConfig {
            cluster_cidrs: nets(&["10.96.0.0/12"]),
            ..PlanConfig::default()
        },
    );
    let entries: Vec<(String, bool)> = plan.gateways[0]
        .dest_entries
        .iter()
        .map(|e| (e.cidr.to_string(), e.via_gateway))
        .collect();
    let expected: Vec<(String, bool)> = [
        // 10.1.2.0/24 lies in the exclusion 10.1.0.0/16: left out; 10.2.0.0/16 adds nothing
        // to 10.0.0.0/8.
        ("10.0.0.0/8", true),
        ("10.1.0.0/16", false),
        ("10.96.0.0/12", false),
        // 192.168.1.0/24 lies in 192.168.0.0/16: left out, and so is that exclusion, which no
        // included destination contains; same for 172.16.0.0/12.
        ("203.0.113.0/24", true),
        ("203.0.113.7/32", false),
    ]
    .iter()
    .map(|(c, v)| ((*c).to_owned(), *v))
    .collect();
    assert_eq!(entries, expected);
    assert_eq!(
        plan.gateways[0].excluded,
        nets(&[
            "10.1.0.0/16",
            "10.96.0.0/12",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "203.0.113.7/32"
        ])
    );
}

#[test]
fn a_destination_equal_to_an_exclusion_is_excluded() {
    let mut g = gateway("g", &["192.0.2.1"]);
    g.destinations = nets(&["10.244.1.0/24", "198.51.100.0/24"]);
    let plan = cluster().gateway(g).plan("n1");
    assert_eq!(
        plan.gateways[0].dest_entries,
        [DestEntry {
            cidr: net("198.51.100.0/24"),
            via_gateway: true
        }]
    );
}

#[test]
fn selection_by_pod_selector_namespace_annotation_and_pod_annotation() {
    let mut by_label = gateway("by-label", &["192.0.2.1"]);
    by_label.pod_selector = Some(selector("matchLabels: {egress: corp}"));
    let world = cluster()
        .namespace("ns-annotated", &[], Some("plain"))
        .gateway(by_label)
        .gateway(gateway("plain", &["192.0.2.2"]))
        .pod(
            "shop/labelled",
            "n1",
            "10.244.1.10",
            &[("egress", "corp")],
            None,
        )
        .pod("shop/annotated", "n1", "10.244.1.11", &[], Some("plain"))
        .pod("ns-annotated/inherits", "n1", "10.244.1.12", &[], None)
        .pod(
            "shop/nothing",
            "n1",
            "10.244.1.13",
            &[("egress", "other")],
            None,
        )
        .pod(
            "shop/elsewhere",
            "n2",
            "10.244.2.10",
            &[("egress", "corp")],
            None,
        );
    let plan = world.plan("n1");
    let got: Vec<(String, String, Reason)> = plan
        .pods
        .iter()
        .map(|p| {
            (
                format!("{}/{}", p.namespace, p.name),
                p.gateway.clone(),
                p.reason,
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                "shop/labelled".to_owned(),
                "by-label".to_owned(),
                Reason::PodSelector
            ),
            (
                "shop/annotated".to_owned(),
                "plain".to_owned(),
                Reason::PodAnnotation
            ),
            (
                "ns-annotated/inherits".to_owned(),
                "plain".to_owned(),
                Reason::NamespaceAnnotation
            ),
        ]
    );
    assert_eq!(plan.rejected, []);
    let ids = gateway_ids(["by-label", "plain"]);
    assert_eq!(plan.pods[0].gateway_id, ids["by-label"]);
    assert_eq!(plan.pods[0].egress_ip, ip("192.0.2.1"));
    assert_eq!(plan.pods[1].gateway_id, ids["plain"]);
}

#[test]
fn namespace_selector_gates_every_way_in() {
    let mut g = gateway("g", &["192.0.2.1"]);
    g.namespace_selector = selector("matchLabels: {team: payments}");
    g.pod_selector = Some(selector("{}"));
    let world = cluster()
        .gateway(g)
        .pod("shop/a", "n1", "10.244.1.10", &[], None)
        .pod("dev/b", "n1", "10.244.1.11", &[], None)
        .pod("dev/c", "n1", "10.244.1.12", &[], Some("g"))
        // No Namespace object: it has no labels.
        .pod("ghost/d", "n1", "10.244.1.13", &[], None);
    let plan = world.plan("n1");
    assert_eq!(pod_names(&plan), ["shop/a"]);
    assert_eq!(
        plan.rejected,
        [Rejection {
            namespace: "dev".into(),
            pod: Some("c".into()),
            gateway: "g".into(),
            why: RejectReason::NamespaceNotAdmitted,
        }]
    );
}

#[test]
fn precedence_pod_annotation_then_namespace_annotation_then_selector_then_name() {
    let mut sel_a = gateway("sel-a", &["192.0.2.1"]);
    sel_a.pod_selector = Some(selector("matchLabels: {app: web}"));
    let mut sel_b = gateway("sel-b", &["192.0.2.2"]);
    sel_b.pod_selector = Some(selector("matchExpressions: [{key: app, operator: Exists}]"));
    let world = cluster()
        .namespace("shop", &[("team", "payments")], Some("ns-gw"))
        .gateway(sel_a)
        .gateway(sel_b)
        .gateway(gateway("ns-gw", &["192.0.2.3"]))
        .gateway(gateway("pod-gw", &["192.0.2.4"]))
        .namespace("plain", &[], None)
        .pod(
            "shop/pod-wins",
            "n1",
            "10.244.1.10",
            &[("app", "web")],
            Some("pod-gw"),
        )
        .pod("shop/ns-wins", "n1", "10.244.1.11", &[("app", "web")], None)
        .pod(
            "plain/name-wins",
            "n1",
            "10.244.1.12",
            &[("app", "web")],
            None,
        )
        .pod(
            "plain/annotated-and-selected",
            "n1",
            "10.244.1.13",
            &[("app", "x")],
            Some("sel-b"),
        );
    let plan = world.plan("n1");
    let got: Vec<(&str, &str, Reason, Vec<String>)> = plan
        .pods
        .iter()
        .map(|p| {
            (
                p.name.as_str(),
                p.gateway.as_str(),
                p.reason,
                p.overridden.clone(),
            )
        })
        .collect();
    let strings = |list: &[&str]| -> Vec<String> { list.iter().map(|s| (*s).to_owned()).collect() };
    assert_eq!(
        got,
        [
            (
                "pod-wins",
                "pod-gw",
                Reason::PodAnnotation,
                strings(&["ns-gw", "sel-a", "sel-b"])
            ),
            (
                "ns-wins",
                "ns-gw",
                Reason::NamespaceAnnotation,
                strings(&["sel-a", "sel-b"])
            ),
            (
                "name-wins",
                "sel-a",
                Reason::PodSelector,
                strings(&["sel-b"])
            ),
            // The same gateway by two routes is not an override.
            (
                "annotated-and-selected",
                "sel-b",
                Reason::PodAnnotation,
                strings(&[])
            ),
        ]
    );
}

#[test]
fn rejections_for_local_pods_and_their_namespaces_sorted() {
    let mut narrow = gateway("narrow", &["192.0.2.1"]);
    narrow.namespace_selector = selector("matchLabels: {team: payments}");
    let world = cluster()
        .namespace("dev", &[("team", "dev")], Some("narrow"))
        .namespace("typo", &[], Some("nope"))
        .namespace("remote-only", &[], Some("nope"))
        .gateway(narrow)
        .pod("typo/z", "n1", "10.244.1.20", &[], Some("missing"))
        .pod("typo/a", "n1", "10.244.1.21", &[], None)
        .pod("dev/x", "n1", "10.244.1.22", &[], None)
        .pod("dev/y", "n1", "10.244.1.23", &[], Some("narrow"))
        .pod("remote-only/r", "n2", "10.244.2.20", &[], Some("nope"))
        .pod(
            "typo/pending",
            "n1",
            "10.244.1.24",
            &[],
            Some("missing-too"),
        )
        .edit_pod("typo/pending", |p| p.running = false);
    let plan = world.plan("n1");
    assert_eq!(plan.pods, []);
    let got: Vec<(String, Option<String>, String, RejectReason)> = plan
        .rejected
        .iter()
        .map(|r| {
            (
                r.namespace.clone(),
                r.pod.clone(),
                r.gateway.clone(),
                r.why.clone(),
            )
        })
        .collect();
    let row = |ns: &str, pod: Option<&str>, gw: &str, why| {
        (ns.to_owned(), pod.map(str::to_owned), gw.to_owned(), why)
    };
    assert_eq!(
        got,
        [
            row("dev", None, "narrow", RejectReason::NamespaceNotAdmitted),
            row(
                "dev",
                Some("y"),
                "narrow",
                RejectReason::NamespaceNotAdmitted
            ),
            row("typo", None, "nope", RejectReason::UnknownGateway),
            row("typo", Some("z"), "missing", RejectReason::UnknownGateway),
        ]
    );
}

#[test]
fn a_rejected_annotation_falls_back_to_other_claims() {
    let mut by_label = gateway("by-label", &["192.0.2.1"]);
    by_label.pod_selector = Some(selector("matchLabels: {app: web}"));
    let world = cluster().gateway(by_label).pod(
        "shop/p",
        "n1",
        "10.244.1.10",
        &[("app", "web")],
        Some("nope"),
    );
    let plan = world.plan("n1");
    assert_eq!(pod_names(&plan), ["shop/p"]);
    assert_eq!(plan.pods[0].reason, Reason::PodSelector);
    assert_eq!(plan.rejected.len(), 1);
}

#[test]
fn only_running_pod_network_pods_with_ipv4_count() {
    let mut g = gateway("g", &["192.0.2.1"]);
    g.pod_selector = Some(selector("{}"));
    let world = cluster()
        .gateway(g)
        .pod("shop/ok", "n1", "10.244.1.10", &[], None)
        .pod("shop/pending", "n1", "10.244.1.11", &[], None)
        .pod("shop/host", "n1", "10.0.0.1", &[], None)
        .pod("shop/no-ip", "n1", "10.244.1.12", &[], None)
        .edit_pod("shop/pending", |p| p.running = false)
        .edit_pod("shop/host", |p| p.host_network = true)
        .edit_pod("shop/no-ip", |p| p.ip = None);
    let plan = world.plan("n1");
    assert_eq!(pod_names(&plan), ["shop/ok"]);
    // n1 holds the IP (first Ready node by name): the ignored pods are not SNATed either.
    assert_eq!(plan.snat[0].pods, [ip("10.244.1.10")]);
}

#[test]
fn holders_round_robin_over_ready_matching_nodes_by_name() {
    let mut g = gateway("g", &["192.0.2.1", "192.0.2.2", "192.0.2.3"]);
    g.node_selector = selector(
        "matchExpressions: [{key: kubernetes.io/hostname, operator: NotIn, values: [n0]}]",
    );
    let world = cluster()
        .node("n0", "10.0.0.10", "10.244.10.0/24", true)
        .node("n4", "10.0.0.4", "10.244.4.0/24", true)
        .edit_node("n4", |n| n.internal_ip = None)
        .gateway(g);
    let plan = world.plan("n2");
    let holders: Vec<(Ipv4Addr, Option<String>)> = plan.gateways[0]
        .egress
        .iter()
        .map(|e| (e.ip, e.holder.as_ref().map(|h| h.node.clone())))
        .collect();
    // Eligible: n1, n2 (n0 deselected, n3 NotReady, n4 without InternalIP).
    assert_eq!(
        holders,
        [
            (ip("192.0.2.1"), Some("n1".to_owned())),
            (ip("192.0.2.2"), Some("n2".to_owned())),
            (ip("192.0.2.3"), Some("n1".to_owned())),
        ]
    );
    assert_eq!(
        plan.gateways[0].egress[1].holder,
        Some(Holder {
            node: "n2".into(),
            node_ip: ip("10.0.0.2"),
        })
    );
    let snat: Vec<Ipv4Addr> = plan.snat.iter().map(|s| s.egress_ip).collect();
    assert_eq!(snat, [ip("192.0.2.2")]);
}

#[test]
fn no_eligible_node_leaves_no_holder_and_records_the_policy() {
    let mut closed = gateway("closed", &["192.0.2.1"]);
    closed.node_selector = selector("matchLabels: {egress: 'true'}");
    closed.pod_selector = Some(selector("{}"));
    let mut open = gateway("open", &["192.0.2.2"]);
    open.node_selector = selector("matchLabels: {kubernetes.io/hostname: n3}");
    open.failure_policy = FailurePolicy::FailOpen;
    let world =
        cluster()
            .gateway(closed)
            .gateway(open)
            .pod("shop/a", "n1", "10.244.1.10", &[], None);
    let plan = world.plan("n1");
    assert_eq!(plan.gateways[0].egress[0].holder, None);
    assert_eq!(plan.gateways[0].failure_policy, FailurePolicy::FailClosed);
    assert_eq!(plan.gateways[1].egress[0].holder, None, "n3 is NotReady");
    assert_eq!(plan.gateways[1].failure_policy, FailurePolicy::FailOpen);
    // The pod is still marked: the data path applies the failure policy.
    assert_eq!(pod_names(&plan), ["shop/a"]);
    assert_eq!(plan.snat, []);
}

#[test]
fn pods_spread_over_egress_ips_by_hash_of_their_ip() {
    let mut g = gateway("g", &["192.0.2.1", "192.0.2.2", "192.0.2.3"]);
    g.pod_selector = Some(selector("{}"));
    let mut world = cluster().gateway(g);
    for i in 0..60 {
        world = world.pod(
            &format!("shop/p{i}"),
            "n1",
            &format!("10.244.1.{}", i + 10),
            &[],
            None,
        );
    }
    let plan = world.plan("n1");
    assert_eq!(plan.pods.len(), 60);
    let egress = &world.0.gateways["g"].egress_ips;
    for pod in &plan.pods {
        let expected = egress[fnv1a_32(&pod.ip.octets()) as usize % egress.len()];
        assert_eq!(pod.egress_ip, expected, "{}", pod.name);
    }
    for egress_ip in egress {
        assert!(
            plan.pods.iter().any(|p| p.egress_ip == *egress_ip),
            "{egress_ip} unused"
        );
    }
    // Sorted by IP.
    assert!(plan.pods.windows(2).all(|w| w[0].ip < w[1].ip));
}

#[test]
fn holder_snats_for_pods_on_every_node() {
    let mut g = gateway("g", &["192.0.2.1"]);
    g.namespace_selector = selector("matchLabels: {team: payments}");
    g.pod_selector = Some(selector("matchLabels: {app: web}"));
    g.excluded = nets(&["192.168.0.0/16"]);
    let world = cluster()
        .gateway(g)
        .pod("shop/b", "n2", "10.244.2.10", &[("app", "web")], None)
        .pod("shop/a", "n1", "10.244.1.10", &[("app", "web")], None)
        .pod("shop/c", "n3", "10.244.3.10", &[("app", "web")], None)
        .pod("shop/db", "n2", "10.244.2.11", &[("app", "db")], None)
        .pod("dev/web", "n2", "10.244.2.12", &[("app", "web")], None);

    let holder = world.plan("n1");
    assert_eq!(pod_names(&holder), ["shop/a"]);
    assert_eq!(
        holder.snat,
        [SnatPlan {
            gateway: "g".into(),
            egress_ip: ip("192.0.2.1"),
            pods: vec![ip("10.244.1.10"), ip("10.244.2.10"), ip("10.244.3.10")],
            destinations: nets(&["0.0.0.0/0"]),
            excluded: holder.gateways[0].excluded.clone(),
            announce: Default::default(),
        }]
    );
    assert!(holder.snat[0].excluded.contains(&net("192.168.0.0/16")));
    assert!(holder.snat[0].excluded.contains(&net("10.244.2.0/24")));
    // Packets to translate come from the nodes of those pods (n3 is not Ready, but its pod
    // runs), never from n2's db or from another namespace.
    assert_eq!(holder.senders, [ip("10.0.0.2"), ip("10.0.0.3")]);
    assert!(holder.standby_senders.is_empty());

    let other = world.plan("n2");
    assert_eq!(pod_names(&other), ["shop/b"]);
    assert_eq!(other.snat, []);
    assert!(other.senders.is_empty());
    // n2 may take the egress IP over: it keeps the nodes it would then translate for at
    // hand. n3 is not Ready, so it cannot.
    assert_eq!(other.standby_senders, [ip("10.0.0.1"), ip("10.0.0.3")]);
    assert!(world.plan("n3").standby_senders.is_empty());
    assert_eq!(
        other.gateways, holder.gateways,
        "every node knows every gateway"
    );
}

#[test]
fn egress_ip_conflict_drops_the_later_gateway() {
    let mut b = gateway("b", &["192.0.2.9", "192.0.2.1"]);
    b.pod_selector = Some(selector("{}"));
    let world = cluster()
        .gateway(gateway("a", &["192.0.2.1"]))
        .gateway(b)
        // Conflicts only with the dropped gateway, so it stays.
        .gateway(gateway("c", &["192.0.2.9"]))
        .pod("shop/p", "n1", "10.244.1.10", &[], Some("b"));
    let plan = world.plan("n1");
    let names: Vec<&str> = plan.gateways.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(names, ["a", "c"]);
    assert_eq!(
        plan.problems,
        [PlanProblem::EgressIpConflict {
            gateway: "b".into(),
            ip: ip("192.0.2.1"),
            kept_by: "a".into(),
        }]
    );
    assert_eq!(plan.pods, [], "b's selector no longer applies");
    assert_eq!(
        plan.rejected,
        [Rejection {
            namespace: "shop".into(),
            pod: Some("p".into()),
            gateway: "b".into(),
            why: RejectReason::GatewayDropped,
        }]
    );
    assert_eq!(
        plan.problems[0].to_string(),
        "gateway b left out: egress IP 192.0.2.1 already belongs to gateway a"
    );
}

/// `count` /32 destinations, every other address of 100.64.0.0/10 so that none merge.
fn scattered(count: u32) -> Vec<Ipv4Net> {
    (0..count)
        .map(|i| Ipv4Net::new(Ipv4Addr::from(0x6440_0000 + 2 * i), 32).unwrap())
        .collect()
}

#[test]
fn gateways_that_no_longer_fit_the_maps_are_left_out_in_name_order() {
    use static_egress_common::capacity;
    let mut a = gateway("a", &["192.0.2.1"]);
    // With the 0/0 default gone, the cluster's ranges are no holes: exactly `count` entries.
    a.destinations = scattered(capacity::DESTS - 10);
    let mut b = gateway("b", &["192.0.2.2"]);
    b.destinations = scattered(11);
    b.pod_selector = Some(selector("{}"));
    let mut c = gateway("c", &["192.0.2.3"]);
    c.destinations = scattered(10);
    let world =
        cluster()
            .gateway(a)
            .gateway(b)
            .gateway(c)
            .pod("shop/p", "n1", "10.244.1.10", &[], None);
    let plan = world.plan("n1");
    let names: Vec<&str> = plan.gateways.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(names, ["a", "c"], "b does not fit after a; c still does");
    assert_eq!(
        plan.problems,
        [PlanProblem::OverCapacity {
            gateway: "b".into(),
            budget: Budget::Destinations,
            needed: 11,
            free: 10,
        }]
    );
    assert!(
        plan.problems[0]
            .to_string()
            .starts_with("gateway b left out: it needs 11 destination entries"),
        "{}",
        plan.problems[0]
    );
    assert_eq!(plan.pods, [], "b's selector no longer applies");

    // Egress IPs: the map holds capacity::EGRESS addresses for all gateways together.
    let many: Vec<String> = (0..capacity::EGRESS)
        .map(|i| Ipv4Addr::from(0xc633_0000 + i).to_string())
        .collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let world = cluster()
        .gateway(gateway("a", &many))
        .gateway(gateway("b", &["192.0.2.2"]));
    let plan = world.plan("n1");
    assert_eq!(plan.gateways.len(), 1);
    assert!(matches!(
        plan.problems.as_slice(),
        [PlanProblem::OverCapacity {
            budget: Budget::EgressIps,
            needed: 1,
            free: 0,
            ..
        }]
    ));
}

#[test]
fn pods_beyond_the_pod_map_are_rejected_highest_addresses_first() {
    use static_egress_common::capacity;
    let mut g = gateway("g", &["192.0.2.1"]);
    g.pod_selector = Some(selector("{}"));
    let mut world = cluster().gateway(g);
    for i in 0..=capacity::PODS {
        let pod_ip = Ipv4Addr::from(0x0af0_0000 + i).to_string();
        world = world.pod(&format!("shop/p{i}"), "n1", &pod_ip, &[], None);
    }
    let plan = world.plan("n1");
    assert_eq!(plan.pods.len(), capacity::PODS as usize);
    let last = Ipv4Addr::from(0x0af0_0000 + capacity::PODS);
    assert!(plan.pods.iter().all(|p| p.ip < last));
    assert_eq!(
        plan.rejected,
        [Rejection {
            namespace: "shop".into(),
            pod: Some(format!("p{}", capacity::PODS)),
            gateway: "g".into(),
            why: RejectReason::PodMapFull,
        }]
    );
}

#[test]
fn egress_ips_inside_the_cluster_are_refused() {
    let world = cluster()
        .gateway(gateway("node-ip", &["192.0.2.1", "10.0.0.2"]))
        .gateway(gateway("pod-ip", &["10.244.3.7"]))
        .gateway(gateway("service", &["10.96.0.10"]))
        // Its first IP was claimed by node-ip, which is left out: no conflict.
        .gateway(gateway("z-fine", &["192.0.2.1"]));
    let plan = plan(
        &world.0,
        "n1",
        &PlanConfig {
            cluster_cidrs: nets(&["10.96.0.0/12"]),
            ..PlanConfig::default()
        },
    );
    let names: Vec<&str> = plan.gateways.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(names, ["z-fine"]);
    let problems: Vec<String> = plan.problems.iter().map(ToString::to_string).collect();
    assert_eq!(
        problems,
        [
            "gateway node-ip left out: egress IP 10.0.0.2 is the InternalIP of node n2; holding \
             it would take that address from the cluster",
            "gateway pod-ip left out: egress IP 10.244.3.7 is in node n3's pod CIDR \
             10.244.3.0/24; holding it would take that address from the cluster",
            "gateway service left out: egress IP 10.96.0.10 is in the cluster range \
             10.96.0.0/12; holding it would take that address from the cluster",
        ]
    );
}

#[test]
fn the_reason_names_the_narrowest_pod_cidr_whatever_their_order() {
    for order in [
        ["10.244.0.0/16", "10.244.3.0/24"],
        ["10.244.3.0/24", "10.244.0.0/16"],
    ] {
        let world = cluster()
            .edit_node("n3", |n| n.pod_cidrs = nets(&order))
            .gateway(gateway("pod-ip", &["10.244.3.7"]));
        let plan = world.plan("n1");
        assert_eq!(
            plan.problems,
            [PlanProblem::EgressIpInCluster {
                gateway: "pod-ip".to_owned(),
                ip: ip("10.244.3.7"),
                why: "in node n3's pod CIDR 10.244.3.0/24".to_owned(),
            }],
            "{order:?}"
        );
    }
}

#[test]
fn probes_move_egress_ips_off_nodes_that_are_down_and_rejoining_nodes_wait() {
    let mut g = gateway("g", &["192.0.2.1", "192.0.2.2"]);
    g.node_selector = Selector::everything();
    let world = cluster().gateway(g);
    let holders = |health: Health| -> Vec<Option<String>> {
        plan(
            &world.0,
            "n1",
            &PlanConfig {
                health,
                ..PlanConfig::default()
            },
        )
        .gateways[0]
            .egress
            .iter()
            .map(|e| e.holder.as_ref().map(|h| h.node.clone()))
            .collect()
    };
    let some = |n: &str| Some(n.to_owned());
    // n3 is not Ready: n1 and n2 hold one each.
    assert_eq!(holders(Health::default()), [some("n1"), some("n2")]);
    let n2_down = Health {
        down: [("n2".to_owned(), Down::Silent)].into(),
        ..Health::default()
    };
    assert_eq!(holders(n2_down), [some("n1"), some("n1")]);
    // Back, but not for long enough: it waits while a veteran can hold.
    let n2_back = Health {
        rejoining: ["n2".to_owned()].into(),
        veterans: ["n1".to_owned()].into(),
        ..Health::default()
    };
    assert_eq!(holders(n2_back), [some("n1"), some("n1")]);
    // Nodes that started together (no veteran yet) share at once, even if one settled first.
    let starting = Health {
        rejoining: ["n2".to_owned()].into(),
        ..Health::default()
    };
    assert_eq!(holders(starting), [some("n1"), some("n2")]);
    // Everyone rejoining (the cluster starting): better those than nobody.
    let all_back = Health {
        rejoining: ["n1".to_owned(), "n2".to_owned()].into(),
        ..Health::default()
    };
    assert_eq!(holders(all_back), [some("n1"), some("n2")]);
    // Back from its own isolation, n1 still hears n2 as silent: it waits for the rejoin
    // time or for n2's answers rather than take what n2 may hold.
    let back_alone = Health {
        down: [("n2".to_owned(), Down::Silent)].into(),
        rejoining: ["n1".to_owned()].into(),
        ..Health::default()
    };
    assert_eq!(holders(back_alone), [None, None]);
    let all_down = Health {
        down: [
            ("n1".to_owned(), Down::Fenced),
            ("n2".to_owned(), Down::Draining),
        ]
        .into(),
        ..Health::default()
    };
    assert_eq!(holders(all_down), [None, None]);
    let around = peers(&world.0, "n1");
    assert_eq!(
        around.targets.into_keys().collect::<Vec<_>>(),
        ["n2"],
        "n3 is not Ready"
    );
    assert!(around.candidate);
    assert_eq!(around.addresses.len(), 2, "n3 probes too");
    // A cordoned node keeps its egress IPs until it drains (or its cordon counts without:
    // see `membership`), and stays a candidate to probe, whose drain the others hear.
    let cordoned = world.edit_node("n2", |n| n.unschedulable = true);
    let holders_then = |health: Health| -> Vec<Option<String>> {
        plan(
            &cordoned.0,
            "n1",
            &PlanConfig {
                health,
                ..PlanConfig::default()
            },
        )
        .gateways[0]
            .egress
            .iter()
            .map(|e| e.holder.as_ref().map(|h| h.node.clone()))
            .collect()
    };
    assert_eq!(holders_then(Health::default()), [some("n1"), some("n2")]);
    for down in [Down::Draining, Down::Cordoned] {
        let health = Health {
            down: [("n2".to_owned(), down)].into(),
            ..Health::default()
        };
        assert_eq!(holders_then(health), [some("n1"), some("n1")]);
    }
    assert_eq!(
        peers(&cordoned.0, "n1")
            .targets
            .into_keys()
            .collect::<Vec<_>>(),
        ["n2"]
    );
    assert!(peers(&cordoned.0, "n2").candidate);
}

#[test]
fn missing_node_object() {
    let plan = cluster().plan("n9");
    assert_eq!(plan.node, "n9");
    assert_eq!(plan.node_ip, None);
    assert_eq!(plan, plan.clone());
}

#[test]
fn display_of_a_small_plan() {
    let mut corp = gateway("corp-fw", &["192.0.2.200", "192.0.2.201"]);
    corp.namespace_selector = selector("matchLabels: {team: payments}");
    corp.pod_selector = Some(selector("matchLabels: {app: web}"));
    corp.excluded = nets(&["192.168.0.0/16"]);
    let mut lab = gateway("lab", &["198.51.100.7"]);
    lab.node_selector = selector("matchLabels: {kubernetes.io/hostname: n3}");
    lab.destinations = nets(&["198.51.100.0/24"]);
    lab.failure_policy = FailurePolicy::FailOpen;
    let world = World::default()
        .node("n1", "10.0.0.1", "10.244.1.0/24", true)
        .node("n2", "10.0.0.2", "10.244.2.0/24", true)
        .namespace("shop", &[("team", "payments")], None)
        .namespace("dev", &[], Some("corp-fw"))
        .gateway(corp)
        .gateway(lab)
        .pod(
            "shop/web-1",
            "n1",
            "10.244.1.5",
            &[("app", "web")],
            Some("lab"),
        )
        .pod("shop/web-2", "n1", "10.244.1.6", &[("app", "web")], None)
        .pod("shop/web-3", "n2", "10.244.2.5", &[("app", "web")], None)
        .pod("dev/tool", "n1", "10.244.1.7", &[], Some("nope"));
    let plan = plan(
        &world.0,
        "n1",
        &PlanConfig {
            cluster_cidrs: nets(&["10.96.0.0/12"]),
            ..PlanConfig::default()
        },
    );
    assert_eq!(gateway_ids(["corp-fw", "lab"])["corp-fw"], 2_184_389_983);
    let expected = "\
node n1 (10.0.0.1)
gateway corp-fw (id 2184389983, FailClosed)
  egress 192.0.2.200 held by n1 (10.0.0.1)
  egress 192.0.2.201 held by n2 (10.0.0.2)
  destinations: 0.0.0.0/0
  excluded: 192.168.0.0/16 + cluster ranges
gateway lab (id 1650496244, FailOpen)
  egress 198.51.100.7 has no eligible node: FailOpen leaves from own node
  destinations: 198.51.100.0/24
  excluded: cluster ranges
local pods:
  shop/web-1 10.244.1.5 -> lab (198.51.100.7) because pod annotation, over corp-fw
  shop/web-2 10.244.1.6 -> corp-fw (192.0.2.200) because podSelector
rejected:
  namespace dev asks for corp-fw: its namespaceSelector does not admit namespace dev
  dev/tool asks for nope: no such gateway
snat on this node:
  192.0.2.200 (corp-fw) for 2 pod(s): 10.244.1.6, 10.244.2.5
    destinations: 0.0.0.0/0
    excluded: 192.168.0.0/16 + cluster ranges
  translated only from local pods and from nodes 10.0.0.2
cluster ranges: 10.0.0.1/32, 10.0.0.2/32, 10.96.0.0/12, 10.244.1.0/24, 10.244.2.0/24
";
    assert_eq!(plan.to_string(), expected);
}

#[test]
fn display_of_an_empty_plan_with_problems() {
    let world = World::default()
        .gateway(gateway("a", &["192.0.2.1"]))
        .gateway(gateway("b", &["192.0.2.1"]));
    let text = world.plan("n1").to_string();
    let expected = format!(
        "\
node n1 (no InternalIP: cannot hold egress IPs)
gateway a (id {}, FailClosed)
  egress 192.0.2.1 has no eligible node: FailClosed drops
  destinations: 0.0.0.0/0
  excluded: cluster ranges
local pods: none
snat on this node: none
cluster ranges: none
problems:
  gateway b left out: egress IP 192.0.2.1 already belongs to gateway a
",
        gateway_ids(["a"])["a"]
    );
    assert_eq!(text, expected);
}

/// 1,000 nodes, 10,000 pods, 20 gateways: the holder of every egress IP looks at all pods.
#[test]
fn plans_a_large_cluster() {
    let mut snapshot = Snapshot::default();
    for n in 0..1000_u32 {
        let name = format!("node-{n:04}");
        snapshot.nodes.insert(
            name.clone(),
            NodeInfo {
                name,
                labels: labels(&[("egress", if n % 10 == 0 { "yes" } else { "no" })]),
                ready: n % 7 != 0,
                unschedulable: false,
                internal_ip: Some(Ipv4Addr::from(0x0a00_0000 + n)),
                pod_cidrs: vec![Ipv4Net::new(Ipv4Addr::from(0x0af4_0000 + (n << 8)), 24).unwrap()],
            },
        );
    }
    for ns in 0..100 {
        let name = format!("ns-{ns}");
        snapshot.namespaces.insert(
            name.clone(),
            NamespaceInfo {
                name,
                labels: labels(&[("tier", if ns % 2 == 0 { "a" } else { "b" })]),
                gateway_annotation: (ns % 5 == 0).then(|| format!("gw-{}", ns % 20)),
            },
        );
    }
    for g in 0..20_u32 {
        let mut gw = gateway(&format!("gw-{g}"), &[]);
        gw.egress_ips = vec![
            Ipv4Addr::from(0xc000_0200 + 2 * g),
            Ipv4Addr::from(0xc000_0201 + 2 * g),
        ];
        gw.node_selector = selector("matchLabels: {egress: 'yes'}");
        gw.namespace_selector = selector(if g % 2 == 0 {
            "matchLabels: {tier: a}"
        } else {
            "{}"
        });
        gw.pod_selector = Some(selector(&format!("matchLabels: {{app: app-{}}}", g % 10)));
        snapshot.gateways.insert(gw.name.clone(), gw);
    }
    for p in 0..10_000_u32 {
        let (namespace, name) = (format!("ns-{}", p % 100), format!("pod-{p}"));
        snapshot.pods.insert(
            (namespace.clone(), name.clone()),
            PodInfo {
                namespace,
                name,
                labels: labels(&[("app", &format!("app-{}", p % 13))]),
                gateway_annotation: None,
                node: Some(format!("node-{:04}", p % 1000)),
                ip: Some(Ipv4Addr::from(
                    0x0af4_0000 + ((p % 1000) << 8) + p / 1000 + 2,
                )),
                running: true,
                host_network: false,
            },
        );
    }
    let holder = plan(&snapshot, "node-0010", &PlanConfig::default());
    assert_eq!(holder.gateways.len(), 20);
    assert_eq!(holder.cluster_cidrs.len(), 2000);
    assert!(!holder.snat.is_empty());
    let snat_pods: usize = holder.snat.iter().map(|s| s.pods.len()).sum();
    assert!(snat_pods > 100, "{snat_pods}");
    // node-0010's pods are all in ns-10, whose annotation names gw-10 (which admits it).
    assert_eq!(holder.pods.len(), 10);
    assert!(
        holder
            .pods
            .iter()
            .all(|p| p.gateway == "gw-10" && p.reason == Reason::NamespaceAnnotation)
    );
}

#[test]
fn a_planned_move_waits_for_the_serving_holder_to_let_go() {
    let mut g = gateway("g", &["192.0.2.1"]);
    g.node_selector = Selector::everything();
    let world = cluster().gateway(g);
    let on = |node: &str, health: Health| {
        plan(
            &world.0,
            node,
            &PlanConfig {
                health,
                ..PlanConfig::default()
            },
        )
    };
    let n1_away = Health {
        down: [("n1".to_owned(), Down::Silent)].into(),
        ..Health::default()
    };
    // n2 held the IP while n1 was away; n1 is back and takes it: n2 still serves, so the
    // move waits (on every node: n3 sees the same).
    let applied = on("n3", n1_away.clone());
    let next = on("n3", Health::default());
    let n2 = Holder {
        node: "n2".into(),
        node_ip: ip("10.0.0.2"),
    };
    let moving = BTreeMap::from([(ip("192.0.2.1"), n2.clone())]);
    assert_eq!(handovers(&applied, &next, &Health::default()), moving);
    // From a node that is down, the move is no handover: it has let go already.
    let n2_down = Health {
        down: [("n2".to_owned(), Down::Silent)].into(),
        ..Health::default()
    };
    assert!(handovers(&applied, &next, &n2_down).is_empty());
    // A node cordoned that did not drain may still serve: the move waits as a planned one.
    let n2_cordoned = Health {
        down: [("n2".to_owned(), Down::Cordoned)].into(),
        ..Health::default()
    };
    assert_eq!(handovers(&applied, &next, &n2_cordoned), moving);
    // While it waits, every plan names n2: n1 does not take the IP, n3 sends to n2, and n2
    // translates without announcing it.
    let waiting = |node: &str| {
        plan(
            &world.0,
            node,
            &PlanConfig {
                moving: moving.clone(),
                ..PlanConfig::default()
            },
        )
    };
    for node in ["n1", "n2", "n3"] {
        assert_eq!(
            waiting(node).holders(),
            BTreeMap::from([(ip("192.0.2.1"), "n2".to_owned())])
        );
    }
    assert!(waiting("n1").snat.is_empty());
    let leaving = waiting("n2");
    let [snat] = &leaving.snat[..] else {
        panic!("n2 translates the IP: {:?}", leaving.snat);
    };
    assert_eq!(snat.announce, Announce::None);
}

/// A pod the runtime is starting on n1: the objects know it (labels) but not its address yet.
fn starting_world(holder: &str) -> World {
    let mut gw = gateway("corp", &["192.0.2.10"]);
    gw.node_selector = selector(&format!(
        "matchLabels: {{kubernetes.io/hostname: {holder}}}"
    ));
    cluster()
        .gateway(gw)
        .pod("shop/new", "n1", "10.244.1.9", &[], Some("corp"))
        .edit_pod("shop/new", |p| {
            p.ip = None;
            p.running = false;
        })
}

fn announced(pods: &[(&str, &str, bool)]) -> PlanConfig {
    PlanConfig {
        starting: pods
            .iter()
            .map(|(at, pod_ip, hold_unknown)| {
                let (namespace, name) = at.split_once('/').unwrap();
                (
                    (namespace.to_owned(), name.to_owned()),
                    Starting {
                        ip: ip(pod_ip),
                        hold_unknown: *hold_unknown,
                    },
                )
            })
            .collect(),
        ..PlanConfig::default()
    }
}

#[test]
fn a_starting_pod_is_marked_with_its_announced_address_when_this_node_holds_its_egress_ip() {
    let world = starting_world("n1");
    assert!(world.plan("n1").pods.is_empty(), "no address yet");
    let plan = plan(
        &world.0,
        "n1",
        &announced(&[("shop/new", "10.244.1.9", true)]),
    );
    assert_eq!(plan.pods.len(), 1);
    assert_eq!(plan.pods[0].ip, ip("10.244.1.9"));
    assert_eq!(plan.pods[0].egress_ip, ip("192.0.2.10"));
    assert_eq!(plan.snat[0].pods, vec![ip("10.244.1.9")]);
    assert!(plan.held.is_empty());
}

#[test]
fn a_starting_pod_whose_holder_cannot_know_its_address_yet_is_held() {
    let world = starting_world("n2");
    let plan = plan(
        &world.0,
        "n1",
        &announced(&[("shop/new", "10.244.1.9", true)]),
    );
    assert!(plan.pods.is_empty());
    assert_eq!(
        plan.held,
        vec![HeldPod {
            namespace: "shop".into(),
            name: "new".into(),
            ip: ip("10.244.1.9"),
            why: HoldReason::HolderElsewhere {
                gateway: "corp".into(),
                egress_ip: ip("192.0.2.10"),
                holder: "n2".into(),
            },
        }]
    );
    // Once the objects show it running with its address, they speak for it.
    let shown = world.edit_pod("shop/new", |p| {
        p.ip = Some(ip("10.244.1.9"));
        p.running = true;
    });
    let after = plan_of(&shown, &[("shop/new", "10.244.1.9", true)]);
    assert_eq!(after, shown.plan("n1"));
    assert_eq!(after.pods.len(), 1);
}

#[test]
fn unknown_starting_pods_are_held_when_asked_and_some_gateway_exists() {
    let world = starting_world("n1");
    let plan = plan(
        &world.0,
        "n1",
        &announced(&[("shop/ghost", "10.244.1.7", true)]),
    );
    assert_eq!(plan.held.len(), 1);
    assert_eq!(plan.held[0].why, HoldReason::Unknown);
    let allowed = plan_of(&world, &[("shop/ghost", "10.244.1.7", false)]);
    assert!(allowed.held.is_empty());
    let no_gateways = World(Snapshot {
        gateways: Default::default(),
        ..world.0.clone()
    });
    assert!(
        plan_of(&no_gateways, &[("shop/ghost", "10.244.1.7", true)])
            .held
            .is_empty()
    );
    // A starting pod that no gateway selects leaves as any other.
    let plain = world
        .pod("shop/plain", "n1", "10.244.1.8", &[], None)
        .edit_pod("shop/plain", |p| p.ip = None);
    let plan = plan_of(&plain, &[("shop/plain", "10.244.1.8", true)]);
    assert!(plan.held.is_empty() && plan.pods.is_empty());
}

fn plan_of(world: &World, starting: &[(&str, &str, bool)]) -> NodePlan {
    plan(&world.0, "n1", &announced(starting))
}
