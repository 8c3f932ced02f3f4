//! The cluster as the planner sees it: small validated types, converted from the Kubernetes
//! objects (`Namespace`, `Node`, `Pod`, and our `EgressGateway` defined in `crd`) by `objects`.

mod crd;
mod labels;
pub(crate) mod objects;
mod selector;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

pub use crd::{EgressGateway, EgressGatewaySpec, EgressGatewayStatus, EgressIpHolder};
pub use labels::Labels;
pub(crate) use objects::convert;
pub use objects::{
    API_VERSION, FieldProblem, GatewayError, Invalid, ObjectKey, ParsedObject, gateway_from_object,
};
pub use selector::{Selector, SelectorError};

/// Annotation by which a pod or a namespace asks for a gateway by name.
pub const GATEWAY_ANNOTATION: &str = "static-egress.io/gateway";

/// Everything the planner needs, keyed for deterministic iteration.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub namespaces: BTreeMap<String, NamespaceInfo>,
    pub nodes: BTreeMap<String, NodeInfo>,
    /// Keyed by (namespace, name).
    pub pods: BTreeMap<(String, String), PodInfo>,
    pub gateways: BTreeMap<String, Gateway>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceInfo {
    pub name: String,
    pub labels: Labels,
    /// Value of `static-egress.io/gateway`, if set.
    pub gateway_annotation: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub labels: Labels,
    /// `status.conditions[type=Ready].status == "True"`.
    pub ready: bool,
    /// `spec.unschedulable` (cordoned): a node being drained hands its egress IPs over.
    pub unschedulable: bool,
    /// First IPv4 `InternalIP` in `status.addresses`.
    pub internal_ip: Option<Ipv4Addr>,
    /// IPv4 entries of `spec.podCIDRs` (or `spec.podCIDR`).
    pub pod_cidrs: Vec<Ipv4Net>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub gateway_annotation: Option<String>,
    /// `spec.nodeName`.
    pub node: Option<String>,
    /// First IPv4 address of `status.podIPs` (or `status.podIP`).
    pub ip: Option<Ipv4Addr>,
    /// `status.phase == "Running"`.
    pub running: bool,
    /// `spec.hostNetwork`: such pods share the node's address and are never selected.
    pub host_network: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Selected traffic is dropped while no node holds the egress IP.
    #[default]
    FailClosed,
    /// Selected traffic leaves from its own node while no node holds the egress IP.
    FailOpen,
}

/// How the holder makes an egress IP reachable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Announce {
    /// ARP answers and gratuitous ARP on the holder's uplink segment.
    #[default]
    Arp,
    /// A /32 route in the table the node's BGP daemon announces; no ARP.
    Bgp,
    /// Nothing: the operator routes the address; no ARP.
    None,
    /// Assigned to the holder's network interface through the EC2 API, and ARP as for `Arp`.
    Aws,
}

impl Announce {
    /// Whether the holder must not answer ARP for the address: something else brings its
    /// traffic, and ARP would draw it to a second place.
    pub fn quiet(self) -> bool {
        matches!(self, Self::Bgp | Self::None)
    }
}

/// A validated `EgressGateway`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gateway {
    pub name: String,
    /// At least one; no duplicates.
    pub egress_ips: Vec<Ipv4Addr>,
    pub node_selector: Selector,
    pub namespace_selector: Selector,
    /// `None`: pods opt in only by annotation.
    pub pod_selector: Option<Selector>,
    /// Defaults to `0.0.0.0/0`.
    pub destinations: Vec<Ipv4Net>,
    pub excluded: Vec<Ipv4Net>,
    pub failure_policy: FailurePolicy,
    pub announce: Announce,
}
