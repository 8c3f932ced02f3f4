//! Fixtures and builders shared by the unit tests of every layer, the generators (proptest
//! strategies) of the property tests, and a fake API server ([`api_server`]).

pub mod api_server;

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::sample::select;

use crate::model::{
    FailurePolicy, Gateway, Labels, NamespaceInfo, NodeInfo, ParsedObject, PodInfo, Selector,
    Snapshot,
};
use crate::plan::PlanConfig;

/// Labels from pairs.
pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Abridged from `kubectl get pod -o yaml` on a dual-stack cluster, fields we ignore kept.
pub const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  annotations:
    kubectl.kubernetes.io/restartedAt: "2026-11-02T10:00:00Z"
    static-egress.io/gateway: corp-fw
  creationTimestamp: "2026-11-02T10:00:03Z"
  generateName: web-7d9f8b6c5-
  labels:
    app: web
    pod-template-hash: 7d9f8b6c5
  name: web-7d9f8b6c5-x2k4p
  namespace: shop
  ownerReferences:
  - apiVersion: apps/v1
    blockOwnerDeletion: true
    controller: true
    kind: ReplicaSet
    name: web-7d9f8b6c5
    uid: 3c1b2a10-0000-4000-8000-000000000001
  resourceVersion: "48213"
  uid: 9a8b7c6d-0000-4000-8000-000000000002
spec:
  containers:
  - image: nginx:1.27
    imagePullPolicy: IfNotPresent
    name: web
    ports:
    - containerPort: 80
      protocol: TCP
    resources:
      limits: {memory: 128Mi}
      requests: {cpu: 100m, memory: 64Mi}
  dnsPolicy: ClusterFirst
  nodeName: worker-1
  restartPolicy: Always
  schedulerName: default-scheduler
  terminationGracePeriodSeconds: 30
  tolerations:
  - effect: NoExecute
    key: node.kubernetes.io/not-ready
    operator: Exists
    tolerationSeconds: 300
  someFutureField: {nested: true}
status:
  conditions:
  - lastProbeTime: null
    lastTransitionTime: "2026-11-02T10:00:05Z"
    status: "True"
    type: Ready
  containerStatuses:
  - containerID: containerd://abc
    image: docker.io/library/nginx:1.27
    imageID: docker.io/library/nginx@sha256:0123
    lastState: {}
    name: web
    ready: true
    restartCount: 0
    started: true
    state:
      running:
        startedAt: "2026-11-02T10:00:04Z"
  hostIP: 10.0.0.11
  hostIPs:
  - ip: 10.0.0.11
  phase: Running
  podIP: fd00:10:244:1::5
  podIPs:
  - ip: fd00:10:244:1::5
  - ip: 10.244.1.5
  qosClass: Burstable
  startTime: "2026-11-02T10:00:03Z"
"#;

/// `kubectl get node -o yaml`, abridged.
pub const NODE: &str = r#"
apiVersion: v1
kind: Node
metadata:
  annotations:
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    kubernetes.io/hostname: worker-1
    kubernetes.io/os: linux
    egress: "true"
  name: worker-1
  resourceVersion: "50000"
spec:
  podCIDR: fd00:10:244:1::/64
  podCIDRs:
  - fd00:10:244:1::/64
  - 10.244.1.0/24
  providerID: kind://docker/kind/worker-1
status:
  addresses:
  - address: fc00:f853:ccd:e793::3
    type: InternalIP
  - address: 10.0.0.11
    type: InternalIP
  - address: 10.0.0.99
    type: InternalIP
  - address: worker-1
    type: Hostname
  allocatable: {cpu: "4", memory: 8Gi, pods: "110"}
  conditions:
  - lastHeartbeatTime: "2026-11-02T10:00:00Z"
    lastTransitionTime: "2026-11-01T10:00:00Z"
    message: kubelet has sufficient memory available
    reason: KubeletHasSufficientMemory
    status: "False"
    type: MemoryPressure
  - lastHeartbeatTime: "2026-11-02T10:00:00Z"
    lastTransitionTime: "2026-11-01T10:00:00Z"
    message: kubelet is posting ready status
    reason: KubeletReady
    status: "True"
    type: Ready
  nodeInfo:
    architecture: amd64
    kubeletVersion: v1.34.1
"#;

/// `kubectl get namespace -o yaml`.
pub const NAMESPACE: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  annotations:
    static-egress.io/gateway: corp-fw
  creationTimestamp: "2026-11-01T10:00:00Z"
  labels:
    kubernetes.io/metadata.name: shop
    team: payments
  name: shop
spec:
  finalizers: [kubernetes]
status:
  phase: Active
"#;

/// An `EgressGateway` with every field set.
pub const GATEWAY: &str = r#"
apiVersion: static-egress.io/v1alpha1
kind: EgressGateway
metadata: {name: corp-fw, uid: 3c1b2a10-0000-4000-8000-000000000003}
spec:
  egressIPs: [192.0.2.200, 192.0.2.201]
  nodeSelector: {matchLabels: {egress: "true"}}
  namespaceSelector: {matchLabels: {team: payments}}
  podSelector:
    matchExpressions: [{key: app, operator: In, values: [web]}]
  destinationCIDRs: [203.0.113.0/24, 198.51.100.0/24, 203.0.113.0/24]
  excludedCIDRs: [203.0.113.128/25]
  failurePolicy: FailOpen
  announce: Bgp
  notYetKnown: 1
status: {holders: []}
"#;

// Generators for the property tests. Their alphabets are small on purpose: labels, selectors,
// CIDRs and addresses drawn from them collide, nest, touch and overlap often, which is where
// selection and longest-prefix-match bugs hide.

/// The label keys the generators use (one with a prefix, as Kubernetes writes them).
pub const LABEL_KEYS: [&str; 4] = ["app", "team", "egress", "example.com/tier"];
/// The label values the generators use (the empty value is a valid one).
pub const LABEL_VALUES: [&str; 4] = ["", "api", "pay", "true"];

pub fn label_key() -> impl Strategy<Value = String> {
    select(&LABEL_KEYS[..]).prop_map(str::to_owned)
}

pub fn label_value() -> impl Strategy<Value = String> {
    select(&LABEL_VALUES[..]).prop_map(str::to_owned)
}

pub fn arb_labels() -> impl Strategy<Value = Labels> {
    btree_map(label_key(), label_value(), 0..=LABEL_KEYS.len()).prop_map(Labels::from)
}

/// A `matchExpressions` entry as it may be written: values unsorted and repeated, an operator
/// without values written with `values: []` or without the field.
pub fn arb_expression() -> impl Strategy<Value = LabelSelectorRequirement> {
    let operators = &["In", "NotIn", "Exists", "DoesNotExist"][..];
    (
        select(operators),
        label_key(),
        vec(label_value(), 1..=3),
        any::<bool>(),
    )
        .prop_map(|(operator, key, values, empty)| {
            let values = match operator {
                "In" | "NotIn" => Some(values),
                _ => empty.then(Vec::new),
            };
            LabelSelectorRequirement {
                key,
                operator: operator.to_owned(),
                values,
            }
        })
}

/// A valid label selector, `{}` included.
pub fn arb_label_selector() -> impl Strategy<Value = LabelSelector> {
    (
        proptest::option::of(btree_map(label_key(), label_value(), 0..=2)),
        proptest::option::of(vec(arb_expression(), 0..=3)),
    )
        .prop_map(|(match_labels, match_expressions)| LabelSelector {
            match_labels,
            match_expressions,
        })
}

/// A selector for a generated gateway: `{}` a third of the time, so that gateways admit and
/// select often enough for the properties to see marked pods and held addresses.
fn arb_gateway_selector() -> impl Strategy<Value = LabelSelector> {
    prop_oneof![1 => Just(LabelSelector::default()), 2 => arb_label_selector()]
}

/// The validated form of a selector from [`arb_label_selector`].
pub fn selector(raw: &LabelSelector) -> Selector {
    Selector::try_from(raw).unwrap_or_else(|e| panic!("generated selector {raw:?}: {e}"))
}

/// The generators' address space: 10.0.0.0/22, where everything they draw overlaps.
const SPACE: u32 = 0x0a00_0000;
const SPACE_SIZE: u32 = 1024;

/// Mostly an address of 10.0.0.0/22, sometimes any address.
pub fn arb_addr() -> impl Strategy<Value = Ipv4Addr> {
    prop_oneof![
        8 => (0..SPACE_SIZE).prop_map(|n| Ipv4Addr::from(SPACE + n)),
        1 => any::<u32>().prop_map(Ipv4Addr::from),
    ]
}

/// A CIDR without host bits: mostly small networks of 10.0.0.0/22, sometimes wide ones
/// (`0.0.0.0/0` and `10.0.0.0/8` among them) that contain the others.
pub fn arb_cidr() -> impl Strategy<Value = Ipv4Net> {
    let net = |addr: Ipv4Addr, len: u8| {
        Ipv4Net::new(addr, len)
            .unwrap_or_else(|e| panic!("{addr}/{len}: {e}"))
            .trunc()
    };
    prop_oneof![
        8 => (arb_addr(), 21u8..=32).prop_map(move |(addr, len)| net(addr, len)),
        1 => (arb_addr(), 0u8..=20).prop_map(move |(addr, len)| net(addr, len)),
        1 => Just(net(Ipv4Addr::UNSPECIFIED, 0)),
        1 => Just(net(Ipv4Addr::from(SPACE), 8)),
    ]
}

/// An `EgressGateway` before its selectors are validated, so that a test can reorder what the
/// model says is unordered.
#[derive(Clone, Debug)]
pub struct RawGateway {
    pub name: String,
    pub egress_ips: Vec<Ipv4Addr>,
    pub node_selector: LabelSelector,
    pub namespace_selector: LabelSelector,
    pub pod_selector: Option<LabelSelector>,
    pub destinations: Vec<Ipv4Net>,
    pub excluded: Vec<Ipv4Net>,
    pub failure_policy: FailurePolicy,
}

impl RawGateway {
    pub fn build(&self) -> Gateway {
        Gateway {
            name: self.name.clone(),
            egress_ips: self.egress_ips.clone(),
            node_selector: selector(&self.node_selector),
            namespace_selector: selector(&self.namespace_selector),
            pod_selector: self.pod_selector.as_ref().map(selector),
            destinations: self.destinations.clone(),
            excluded: self.excluded.clone(),
            failure_policy: self.failure_policy,
            announce: Default::default(),
        }
    }
}

/// A generated cluster: the objects of a snapshot, in the order they are inserted, and the
/// planner's `--cluster-cidr`s.
#[derive(Clone, Debug)]
pub struct Cluster {
    pub namespaces: Vec<NamespaceInfo>,
    pub nodes: Vec<NodeInfo>,
    pub pods: Vec<PodInfo>,
    pub gateways: Vec<RawGateway>,
    /// Host bits allowed: the planner truncates them.
    pub cluster_cidrs: Vec<Ipv4Net>,
}

/// Names of the generated objects: `ns0`.., `n0`.., `p0`.., `g0`... Pods and annotations may
/// name one more of each, which does not exist.
pub const MAX_NAMESPACES: usize = 3;
pub const MAX_NODES: usize = 4;
pub const MAX_PODS: usize = 14;
pub const MAX_GATEWAYS: usize = 3;

fn arb_namespace() -> impl Strategy<Value = (Labels, Option<String>)> {
    (arb_labels(), arb_annotation())
}

fn arb_annotation() -> impl Strategy<Value = Option<String>> {
    proptest::option::weighted(0.3, (0..=MAX_GATEWAYS).prop_map(|g| format!("g{g}")))
}

fn arb_node() -> impl Strategy<Value = (Labels, bool, Option<Ipv4Addr>, Vec<Ipv4Net>)> {
    (
        arb_labels(),
        proptest::bool::weighted(0.8),
        proptest::option::weighted(0.9, (0..SPACE_SIZE).prop_map(|n| Ipv4Addr::from(SPACE + n))),
        // Narrow, as pod CIDRs are: a wide one would hold every egress IP.
        vec(
            (0..SPACE_SIZE, 22u8..=30).prop_map(|(n, len)| {
                Ipv4Net::new(Ipv4Addr::from(SPACE + n), len)
                    .unwrap_or_else(|e| panic!("{n}/{len}: {e}"))
                    .trunc()
            }),
            0..=2,
        ),
    )
}

#[derive(Clone, Debug)]
struct PodFields {
    namespace: usize,
    node: Option<usize>,
    ip: Option<Ipv4Addr>,
    running: bool,
    host_network: bool,
    labels: Labels,
    annotation: Option<String>,
}

fn arb_pod() -> impl Strategy<Value = PodFields> {
    (
        0..=MAX_NAMESPACES,
        proptest::option::weighted(0.9, 0..=MAX_NODES),
        proptest::option::weighted(0.9, arb_addr()),
        proptest::bool::weighted(0.85),
        proptest::bool::weighted(0.1),
        arb_labels(),
        arb_annotation(),
    )
        .prop_map(
            |(namespace, node, ip, running, host_network, labels, annotation)| PodFields {
                namespace,
                node,
                ip,
                running,
                host_network,
                labels,
                annotation,
            },
        )
}

/// Egress IPs from a pool small enough for gateways to share some, and sometimes inside the
/// cluster's ranges (the generators' space), which the planner must refuse.
fn arb_egress_ip() -> impl Strategy<Value = Ipv4Addr> {
    prop_oneof![
        4 => (1u8..=5).prop_map(|n| Ipv4Addr::new(192, 0, 2, n)),
        1 => (0..SPACE_SIZE).prop_map(|n| Ipv4Addr::from(SPACE + n)),
    ]
}

fn arb_gateway() -> impl Strategy<Value = RawGateway> {
    (
        vec(arb_egress_ip(), 1..=3),
        arb_gateway_selector(),
        arb_gateway_selector(),
        proptest::option::weighted(0.8, arb_gateway_selector()),
        vec(arb_cidr(), 1..=4),
        vec(arb_cidr(), 0..=3),
        any::<bool>(),
    )
        .prop_map(
            |(
                ips,
                node_selector,
                namespace_selector,
                pod_selector,
                destinations,
                excluded,
                open,
            )| {
                // Validation refuses repeated egress IPs; their order is the model's.
                let mut egress_ips = Vec::new();
                for ip in ips {
                    if !egress_ips.contains(&ip) {
                        egress_ips.push(ip);
                    }
                }
                RawGateway {
                    name: String::new(),
                    egress_ips,
                    node_selector,
                    namespace_selector,
                    pod_selector,
                    destinations,
                    excluded,
                    failure_policy: if open {
                        FailurePolicy::FailOpen
                    } else {
                        FailurePolicy::FailClosed
                    },
                }
            },
        )
}

/// A small cluster: up to [`MAX_NODES`] nodes, [`MAX_NAMESPACES`] namespaces,
/// [`MAX_PODS`] pods and [`MAX_GATEWAYS`] gateways, all drawn from the same small alphabets.
pub fn arb_cluster() -> impl Strategy<Value = Cluster> {
    (
        vec(arb_namespace(), 0..=MAX_NAMESPACES),
        vec(arb_node(), 0..=MAX_NODES),
        vec(arb_pod(), 0..=MAX_PODS),
        vec(arb_gateway(), 0..=MAX_GATEWAYS),
        // Host bits set, as an operator may write them.
        vec((arb_addr(), 16u8..=32), 0..=2),
    )
        .prop_map(
            |(namespaces, nodes, pods, gateways, cluster_cidrs)| Cluster {
                namespaces: namespaces
                    .into_iter()
                    .enumerate()
                    .map(|(i, (labels, gateway_annotation))| NamespaceInfo {
                        name: format!("ns{i}"),
                        labels,
                        gateway_annotation,
                    })
                    .collect(),
                nodes: nodes
                    .into_iter()
                    .enumerate()
                    .map(|(i, (labels, ready, internal_ip, pod_cidrs))| NodeInfo {
                        name: format!("n{i}"),
                        labels,
                        ready,
                        unschedulable: false,
                        internal_ip,
                        pod_cidrs,
                    })
                    .collect(),
                pods: pods
                    .into_iter()
                    .enumerate()
                    .map(|(i, pod)| PodInfo {
                        namespace: format!("ns{}", pod.namespace),
                        name: format!("p{i}"),
                        labels: pod.labels,
                        gateway_annotation: pod.annotation,
                        node: pod.node.map(|n| format!("n{n}")),
                        ip: pod.ip,
                        running: pod.running,
                        host_network: pod.host_network,
                    })
                    .collect(),
                gateways: gateways
                    .into_iter()
                    .enumerate()
                    .map(|(i, gateway)| RawGateway {
                        name: format!("g{i}"),
                        ..gateway
                    })
                    .collect(),
                cluster_cidrs: cluster_cidrs
                    .into_iter()
                    .map(|(addr, len)| {
                        Ipv4Net::new(addr, len).unwrap_or_else(|e| panic!("{addr}/{len}: {e}"))
                    })
                    .collect(),
            },
        )
}

impl Cluster {
    /// The snapshot, its objects inserted in the order of the lists.
    pub fn snapshot(&self) -> Snapshot {
        let namespaces = self.namespaces.iter().cloned().map(ParsedObject::Namespace);
        let nodes = self.nodes.iter().cloned().map(ParsedObject::Node);
        let pods = self.pods.iter().cloned().map(ParsedObject::Pod);
        let gateways = self
            .gateways
            .iter()
            .map(|g| ParsedObject::Gateway(g.build()));
        pods.chain(gateways)
            .chain(nodes)
            .chain(namespaces)
            .collect()
    }

    pub fn config(&self) -> PlanConfig {
        PlanConfig {
            cluster_cidrs: self.cluster_cidrs.clone(),
            ..PlanConfig::default()
        }
    }

    /// Node names to plan for: every node, and one that does not exist.
    pub fn node_names(&self) -> Vec<String> {
        (0..=self.nodes.len()).map(|i| format!("n{i}")).collect()
    }

    /// The same cluster with every list whose order the model ignores shuffled (`seed` picks
    /// the permutation), repeated selector values doubled, and the objects inserted in
    /// another order. Egress IPs keep their order: it decides which node holds which.
    pub fn permuted(&self, seed: u64) -> Self {
        let mut rng = Shuffler(seed | 1);
        let mut cluster = self.clone();
        rng.shuffle(&mut cluster.namespaces);
        rng.shuffle(&mut cluster.nodes);
        rng.shuffle(&mut cluster.pods);
        rng.shuffle(&mut cluster.gateways);
        rng.shuffle(&mut cluster.cluster_cidrs);
        for node in &mut cluster.nodes {
            rng.shuffle(&mut node.pod_cidrs);
        }
        for gateway in &mut cluster.gateways {
            rng.shuffle(&mut gateway.destinations);
            rng.shuffle(&mut gateway.excluded);
            let selectors = [
                Some(&mut gateway.node_selector),
                Some(&mut gateway.namespace_selector),
                gateway.pod_selector.as_mut(),
            ];
            for selector in selectors.into_iter().flatten() {
                rng.permute_selector(selector);
            }
        }
        cluster
    }
}

/// Xorshift64: a permutation from a seed, the same on every run.
pub struct Shuffler(pub u64);

impl Shuffler {
    pub fn next(&mut self, bound: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % bound.max(1) as u64) as usize
    }

    /// Fisher-Yates.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.next(i + 1);
            items.swap(i, j);
        }
    }

    /// Reorders the expressions and their values and repeats a value: the same selector.
    pub fn permute_selector(&mut self, selector: &mut LabelSelector) {
        for expression in selector.match_expressions.iter_mut().flatten() {
            if let Some(values) = expression.values.as_mut().filter(|v| !v.is_empty()) {
                let again = values[self.next(values.len())].clone();
                values.push(again);
                self.shuffle(values);
            }
        }
        if let Some(expressions) = selector.match_expressions.as_mut() {
            self.shuffle(expressions);
        }
    }
}
