//! Objects as `kubectl get -o yaml` prints them (plus our `EgressGateway`) turned into the
//! model's validated types, with every problem named by its field. Reading them from a stream
//! is the source's business (`source::documents`).

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::crd::{EgressGateway, EgressGatewaySpec};
use super::{
    Announce, FailurePolicy, GATEWAY_ANNOTATION, Gateway, NamespaceInfo, NodeInfo, PodInfo,
    Selector, SelectorError, Snapshot,
};

/// `apiVersion` of our own kinds.
pub const API_VERSION: &str = "static-egress.io/v1alpha1";

/// Identity of an object across versions of the input. `namespace` is set for pods only.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(namespace) => write!(f, "{} {namespace}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// A valid object of a supported kind.
#[derive(Clone, Debug, PartialEq)]
pub enum ParsedObject {
    Namespace(NamespaceInfo),
    Node(NodeInfo),
    Pod(PodInfo),
    Gateway(Gateway),
}

impl ParsedObject {
    pub fn key(&self) -> ObjectKey {
        let (kind, namespace, name) = match self {
            Self::Namespace(ns) => ("Namespace", None, &ns.name),
            Self::Node(node) => ("Node", None, &node.name),
            Self::Pod(pod) => ("Pod", Some(pod.namespace.clone()), &pod.name),
            Self::Gateway(gw) => ("EgressGateway", None, &gw.name),
        };
        ObjectKey {
            kind: kind.to_owned(),
            namespace,
            name: name.clone(),
        }
    }
}

impl Snapshot {
    /// Adds `object`, replacing the one of the same kind and name.
    pub fn insert(&mut self, object: ParsedObject) {
        match object {
            ParsedObject::Namespace(ns) => {
                self.namespaces.insert(ns.name.clone(), ns);
            }
            ParsedObject::Node(node) => {
                self.nodes.insert(node.name.clone(), node);
            }
            ParsedObject::Pod(pod) => {
                self.pods
                    .insert((pod.namespace.clone(), pod.name.clone()), pod);
            }
            ParsedObject::Gateway(gw) => {
                self.gateways.insert(gw.name.clone(), gw);
            }
        }
    }

    /// A copy of the object `key` names, if the snapshot holds it.
    pub fn object(&self, key: &ObjectKey) -> Option<ParsedObject> {
        match (key.kind.as_str(), &key.namespace) {
            ("Namespace", None) => self
                .namespaces
                .get(&key.name)
                .cloned()
                .map(ParsedObject::Namespace),
            ("Node", None) => self.nodes.get(&key.name).cloned().map(ParsedObject::Node),
            ("Pod", Some(namespace)) => self
                .pods
                .get(&(namespace.clone(), key.name.clone()))
                .cloned()
                .map(ParsedObject::Pod),
            ("EgressGateway", None) => self
                .gateways
                .get(&key.name)
                .cloned()
                .map(ParsedObject::Gateway),
            _ => None,
        }
    }
}

impl FromIterator<ParsedObject> for Snapshot {
    fn from_iter<I: IntoIterator<Item = ParsedObject>>(objects: I) -> Self {
        let mut snapshot = Self::default();
        for object in objects {
            snapshot.insert(object);
        }
        snapshot
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("not a Kubernetes object (a mapping with apiVersion and kind)")]
    NotAnObject,
    #[error("kind {kind:?} of apiVersion {api_version:?} is not supported; skipped")]
    UnsupportedKind { api_version: String, kind: String },
    #[error("{kind} without metadata.name")]
    MissingName { kind: String },
    #[error("does not match the {kind} schema: {message}")]
    Schema { kind: String, message: String },
    #[error("{field}: {problem}")]
    Field {
        field: String,
        problem: FieldProblem,
    },
    #[error("{field}.{error}")]
    Selector {
        field: &'static str,
        error: SelectorError,
    },
    #[error("already defined by document {first}; this copy is ignored")]
    Duplicate { first: usize },
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FieldProblem {
    #[error("is required ({hint})")]
    Missing { hint: &'static str },
    #[error("must list at least one {what}")]
    Empty { what: &'static str },
    #[error("{0:?} is not an IPv4 address")]
    NotIpv4(String),
    #[error("{0:?} is not an IP address")]
    NotIp(String),
    #[error("{0} is not a unicast address")]
    NotUnicast(Ipv4Addr),
    #[error("{ip} is in {range}, which never leaves a node: it cannot be an egress IP")]
    Reserved { ip: Ipv4Addr, range: &'static str },
    #[error("{ip} is already listed as spec.egressIPs[{first}]")]
    DuplicateIp { ip: Ipv4Addr, first: usize },
    #[error("{0:?} is not an IPv4 CIDR")]
    NotIpv4Cidr(String),
    #[error("{0:?} is not a CIDR")]
    NotCidr(String),
    #[error("{value:?} has host bits set (did you mean {suggested}?)")]
    HostBitsSet { value: String, suggested: Ipv4Net },
    #[error("{0:?} is not one of FailClosed, FailOpen")]
    UnknownFailurePolicy(String),
    #[error("{0:?} is not one of Arp, Bgp, None, Aws")]
    UnknownAnnounce(String),
}

/// The model's value of one identified object; every problem found, each naming its field,
/// otherwise.
pub(crate) fn convert(key: &ObjectKey, value: Value) -> Result<ParsedObject, Vec<Invalid>> {
    match key.kind.as_str() {
        "Namespace" => Ok(ParsedObject::Namespace(namespace(key, typed(key, value)?))),
        "Node" => node(key, typed(key, value)?).map(ParsedObject::Node),
        "Pod" => pod(key, typed(key, value)?).map(ParsedObject::Pod),
        // The document parser lets through no other kind.
        _ => {
            let object: EgressGateway = typed(key, gateway_input(value))?;
            validate_gateway(&key.name, &object.spec).map(ParsedObject::Gateway)
        }
    }
}

/// Deserialises with the path to the offending field in the message: users need it to find
/// the field.
fn typed<T: DeserializeOwned>(key: &ObjectKey, value: Value) -> Result<T, Vec<Invalid>> {
    serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        let message = if path == "." {
            inner.to_string()
        } else {
            format!("{path}: {inner}")
        };
        vec![Invalid::Schema {
            kind: key.kind.clone(),
            message,
        }]
    })
}

fn field(field: impl Into<String>, problem: FieldProblem) -> Invalid {
    Invalid::Field {
        field: field.into(),
        problem,
    }
}

/// An empty annotation is how users unset it without deleting the key.
fn gateway_annotation(annotations: Option<BTreeMap<String, String>>) -> Option<String> {
    annotations?
        .remove(GATEWAY_ANNOTATION)
        .filter(|gateway| !gateway.is_empty())
}

pub(crate) fn namespace(key: &ObjectKey, raw: Namespace) -> NamespaceInfo {
    NamespaceInfo {
        name: key.name.clone(),
        labels: raw.metadata.labels.unwrap_or_default().into(),
        gateway_annotation: gateway_annotation(raw.metadata.annotations),
    }
}

pub(crate) fn node(key: &ObjectKey, raw: Node) -> Result<NodeInfo, Vec<Invalid>> {
    let mut problems = Vec::new();
    let status = raw.status.unwrap_or_default();
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");

    let mut internal_ip = None;
    for (i, address) in status.addresses.iter().flatten().enumerate() {
        if address.type_ != "InternalIP" {
            continue;
        }
        match address.address.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => {
                internal_ip.get_or_insert(ip);
            }
            Ok(IpAddr::V6(_)) => {}
            Err(_) => problems.push(field(
                format!("status.addresses[{i}].address"),
                FieldProblem::NotIp(address.address.clone()),
            )),
        }
    }

    let spec = raw.spec.unwrap_or_default();
    let (path, cidrs) = match spec.pod_cidrs.filter(|cidrs| !cidrs.is_empty()) {
        Some(cidrs) => ("spec.podCIDRs", cidrs),
        None => ("spec.podCIDR", spec.pod_cidr.into_iter().collect()),
    };
    let mut pod_cidrs = Vec::new();
    for (i, text) in cidrs.iter().enumerate() {
        let at = if path == "spec.podCIDR" {
            path.to_owned()
        } else {
            format!("{path}[{i}]")
        };
        match text.parse::<IpNet>() {
            Ok(IpNet::V4(net)) if net.trunc() == net => pod_cidrs.push(net),
            Ok(IpNet::V4(net)) => problems.push(field(
                at,
                FieldProblem::HostBitsSet {
                    value: text.clone(),
                    suggested: net.trunc(),
                },
            )),
            Ok(IpNet::V6(_)) => {}
            Err(_) => problems.push(field(at, FieldProblem::NotCidr(text.clone()))),
        }
    }

    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(NodeInfo {
        name: key.name.clone(),
        labels: raw.metadata.labels.unwrap_or_default().into(),
        ready,
        unschedulable: spec.unschedulable.unwrap_or(false),
        internal_ip,
        pod_cidrs,
    })
}

pub(crate) fn pod(key: &ObjectKey, raw: Pod) -> Result<PodInfo, Vec<Invalid>> {
    let mut problems = Vec::new();
    let spec = raw.spec.unwrap_or_default();
    let status = raw.status.unwrap_or_default();
    let pod_ips = status.pod_ips.unwrap_or_default();
    let candidates: Vec<(String, &str)> = if pod_ips.is_empty() {
        status
            .pod_ip
            .as_deref()
            .map(|ip| ("status.podIP".to_owned(), ip))
            .into_iter()
            .collect()
    } else {
        pod_ips
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("status.podIPs[{i}].ip"), p.ip.as_str()))
            .collect()
    };
    let mut ip = None;
    for (at, text) in candidates {
        match text.parse::<IpAddr>() {
            Ok(IpAddr::V4(v4)) => {
                ip.get_or_insert(v4);
            }
            Ok(IpAddr::V6(_)) => {}
            Err(_) => problems.push(field(at, FieldProblem::NotIp(text.to_owned()))),
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(PodInfo {
        namespace: key.namespace.clone().unwrap_or_default(),
        name: key.name.clone(),
        labels: raw.metadata.labels.unwrap_or_default().into(),
        gateway_annotation: gateway_annotation(raw.metadata.annotations),
        node: spec.node_name.filter(|n| !n.is_empty()),
        ip,
        running: status.phase.as_deref() == Some("Running"),
        host_network: spec.host_network.unwrap_or(false),
    })
}

/// Files predate the resource's `status` and the agent never acts on one, so a file's status
/// (as `kubectl get -o yaml` prints it) must not spoil its gateway. A missing `spec` is
/// reported field by field, like an empty one.
fn gateway_input(mut value: Value) -> Value {
    if let Value::Object(map) = &mut value {
        map.remove("status");
        map.entry("spec")
            .or_insert_with(|| Value::Object(serde_json::Map::new()));
    }
    value
}

/// An `EgressGateway` from the API server that does not validate.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}{}", gateway_prefix(.name), join_problems(.problems))]
pub struct GatewayError {
    /// Empty only when the object has no name, which the API server never lets happen.
    pub name: String,
    /// Every problem found, each naming its field.
    pub problems: Vec<Invalid>,
}

fn gateway_prefix(name: &str) -> String {
    if name.is_empty() {
        String::new()
    } else {
        format!("EgressGateway {name}: ")
    }
}

fn join_problems(problems: &[Invalid]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Validates a watched `EgressGateway` exactly as the file source does.
pub fn gateway_from_object(object: &EgressGateway) -> Result<Gateway, GatewayError> {
    let name = object.metadata.name.clone().unwrap_or_default();
    if name.is_empty() {
        return Err(GatewayError {
            name,
            problems: vec![Invalid::MissingName {
                kind: "EgressGateway".to_owned(),
            }],
        });
    }
    validate_gateway(&name, &object.spec).map_err(|problems| GatewayError { name, problems })
}

fn validate_gateway(name: &str, spec: &EgressGatewaySpec) -> Result<Gateway, Vec<Invalid>> {
    let mut problems = Vec::new();

    if spec.egress_ips.is_empty() {
        problems.push(field(
            "spec.egressIPs",
            FieldProblem::Empty {
                what: "IPv4 address",
            },
        ));
    }
    let mut egress_ips: Vec<Ipv4Addr> = Vec::new();
    let mut first_index: HashMap<Ipv4Addr, usize> = HashMap::new();
    for (i, text) in spec.egress_ips.iter().enumerate() {
        let at = format!("spec.egressIPs[{i}]");
        match text.parse::<Ipv4Addr>() {
            Err(_) => problems.push(field(at, FieldProblem::NotIpv4(text.clone()))),
            Ok(ip) if ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() => {
                problems.push(field(at, FieldProblem::NotUnicast(ip)));
            }
            Ok(ip) if ip.is_loopback() => problems.push(field(
                at,
                FieldProblem::Reserved {
                    ip,
                    range: "127.0.0.0/8 (loopback)",
                },
            )),
            // 169.254.0.0/16 holds the clouds' metadata and DNS services.
            Ok(ip) if ip.is_link_local() => problems.push(field(
                at,
                FieldProblem::Reserved {
                    ip,
                    range: "169.254.0.0/16 (link-local, where clouds serve metadata)",
                },
            )),
            Ok(ip) => match first_index.entry(ip) {
                Entry::Occupied(first) => problems.push(field(
                    at,
                    FieldProblem::DuplicateIp {
                        ip,
                        first: *first.get(),
                    },
                )),
                Entry::Vacant(slot) => {
                    slot.insert(i);
                    egress_ips.push(ip);
                }
            },
        }
    }

    let mut selector = |path: &'static str, raw: Option<&LabelSelector>| {
        raw.map(|raw| {
            Selector::try_from(raw).unwrap_or_else(|error| {
                problems.push(Invalid::Selector { field: path, error });
                Selector::everything()
            })
        })
    };
    let node_selector = selector("spec.nodeSelector", spec.node_selector.as_ref());
    let namespace_selector = selector("spec.namespaceSelector", spec.namespace_selector.as_ref());
    let pod_selector = selector("spec.podSelector", spec.pod_selector.as_ref());
    if namespace_selector.is_none() {
        problems.push(field(
            "spec.namespaceSelector",
            FieldProblem::Missing {
                hint: "use {} to admit every namespace",
            },
        ));
    }

    let destinations = match &spec.destination_cidrs {
        None => vec![Ipv4Net::default()],
        Some(list) if list.is_empty() => {
            problems.push(field(
                "spec.destinationCIDRs",
                FieldProblem::Empty {
                    what: "CIDR (omit the field for 0.0.0.0/0)",
                },
            ));
            Vec::new()
        }
        Some(list) => cidrs("spec.destinationCIDRs", list, &mut problems),
    };
    let excluded = cidrs("spec.excludedCIDRs", &spec.excluded_cidrs, &mut problems);

    let failure_policy = match spec.failure_policy.as_deref() {
        None | Some("FailClosed") => FailurePolicy::FailClosed,
        Some("FailOpen") => FailurePolicy::FailOpen,
        Some(other) => {
            problems.push(field(
                "spec.failurePolicy",
                FieldProblem::UnknownFailurePolicy(other.to_owned()),
            ));
            FailurePolicy::FailClosed
        }
    };

    let announce = match spec.announce.as_deref() {
        None | Some("Arp") => Announce::Arp,
        Some("Bgp") => Announce::Bgp,
        Some("None") => Announce::None,
        Some("Aws") => Announce::Aws,
        Some(other) => {
            problems.push(field(
                "spec.announce",
                FieldProblem::UnknownAnnounce(other.to_owned()),
            ));
            Announce::Arp
        }
    };

    match namespace_selector {
        Some(namespace_selector) if problems.is_empty() => Ok(Gateway {
            name: name.to_owned(),
            egress_ips,
            node_selector: node_selector.unwrap_or_default(),
            namespace_selector,
            pod_selector,
            destinations,
            excluded,
            failure_policy,
            announce,
        }),
        _ => Err(problems),
    }
}

/// Parses a CIDR list, dropping repeats (harmless) and reporting everything else.
fn cidrs(path: &str, list: &[String], problems: &mut Vec<Invalid>) -> Vec<Ipv4Net> {
    let mut out = Vec::new();
    let mut seen = HashSet::with_capacity(list.len());
    for (i, text) in list.iter().enumerate() {
        let at = format!("{path}[{i}]");
        match text.parse::<Ipv4Net>() {
            Err(_) => problems.push(field(at, FieldProblem::NotIpv4Cidr(text.clone()))),
            Ok(net) if net.trunc() != net => problems.push(field(
                at,
                FieldProblem::HostBitsSet {
                    value: text.clone(),
                    suggested: net.trunc(),
                },
            )),
            Ok(net) => {
                if seen.insert(net) {
                    out.push(net);
                }
            }
        }
    }
    out
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;
    use crate::source::documents::{Documents, parse_documents};
    use crate::testing::{GATEWAY, NAMESPACE, NODE, POD, labels};

    /// Conversion is tested through the document parser, as objects reach it.
    fn parse(text: &str) -> Documents {
        parse_documents(text).unwrap()
    }

    fn messages(docs: &Documents) -> Vec<String> {
        docs.errors.iter().map(ToString::to_string).collect()
    }

    fn only_gateway_error(spec: &str) -> String {
        let docs = parse(&format!(
            "apiVersion: static-egress.io/v1alpha1\nkind: EgressGateway\nmetadata: {{name: corp-fw}}\nspec:\n{spec}"
        ));
        assert!(docs.objects.is_empty(), "{docs:?}");
        let errors = messages(&docs);
        assert_eq!(errors.len(), 1, "{errors:?}");
        errors.into_iter().next().unwrap()
    }

    #[test]
    fn kubectl_pod() {
        let docs = parse(POD);
        assert_eq!(docs.errors, []);
        assert_eq!(
            docs.objects,
            [ParsedObject::Pod(PodInfo {
                namespace: "shop".into(),
                name: "web-7d9f8b6c5-x2k4p".into(),
                labels: labels(&[("app", "web"), ("pod-template-hash", "7d9f8b6c5")]),
                gateway_annotation: Some("corp-fw".into()),
                node: Some("worker-1".into()),
                ip: Some(Ipv4Addr::new(10, 244, 1, 5)),
                running: true,
                host_network: false,
            })]
        );
        assert_eq!(
            docs.objects[0].key().to_string(),
            "Pod shop/web-7d9f8b6c5-x2k4p"
        );
    }

    #[test]
    fn pod_fallbacks_and_flags() {
        let docs = parse(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {hostNetwork: true, containers: []}\nstatus: {phase: Pending, podIP: 10.0.0.5}",
        );
        assert_eq!(docs.errors, []);
        let ParsedObject::Pod(pod) = &docs.objects[0] else {
            panic!("not a pod: {docs:?}");
        };
        assert_eq!(pod.namespace, "default");
        assert_eq!(pod.ip, Some(Ipv4Addr::new(10, 0, 0, 5)));
        assert!(!pod.running);
        assert!(pod.host_network);
        assert_eq!(pod.node, None);

        // An IPv6-only pod has no address we can use; a pending pod has none at all.
        let docs = parse(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: v6, namespace: a, annotations: {static-egress.io/gateway: ''}}\nstatus: {phase: Running, podIPs: [{ip: 'fd00::1'}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: new, namespace: a}",
        );
        assert_eq!(docs.errors, []);
        for object in &docs.objects {
            let ParsedObject::Pod(pod) = object else {
                panic!("not a pod: {object:?}");
            };
            assert_eq!(pod.ip, None);
            assert_eq!(
                pod.gateway_annotation, None,
                "an empty annotation means unset"
            );
        }
    }

    #[test]
    fn kubectl_node() {
        let docs = parse(NODE);
        assert_eq!(docs.errors, []);
        assert_eq!(
            docs.objects,
            [ParsedObject::Node(NodeInfo {
                name: "worker-1".into(),
                labels: labels(&[
                    ("egress", "true"),
                    ("kubernetes.io/hostname", "worker-1"),
                    ("kubernetes.io/os", "linux"),
                ]),
                ready: true,
                unschedulable: false,
                internal_ip: Some(Ipv4Addr::new(10, 0, 0, 11)),
                pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
            })]
        );
    }

    #[test]
    fn node_fallbacks() {
        let docs = parse(
            "apiVersion: v1\nkind: Node\nmetadata: {name: nx}\nspec: {podCIDR: 10.244.7.0/24}\nstatus:\n  conditions: [{type: Ready, status: Unknown}]\n  addresses: [{type: ExternalIP, address: 1.2.3.4}]",
        );
        assert_eq!(docs.errors, []);
        assert_eq!(
            docs.objects,
            [ParsedObject::Node(NodeInfo {
                name: "nx".into(),
                pod_cidrs: vec!["10.244.7.0/24".parse().unwrap()],
                ..NodeInfo::default()
            })]
        );
        let docs = parse("apiVersion: v1\nkind: Node\nmetadata: {name: bare}");
        assert_eq!(
            docs.objects,
            [ParsedObject::Node(NodeInfo {
                name: "bare".into(),
                ..NodeInfo::default()
            })]
        );
    }

    #[test]
    fn node_and_pod_field_errors() {
        let docs = parse(
            "apiVersion: v1\nkind: Node\nmetadata: {name: nx}\nspec: {podCIDRs: [10.244.1.1/24, nonsense]}\nstatus: {addresses: [{type: InternalIP, address: 10.0.0.300}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: a}\nstatus: {podIPs: [{ip: 10.1.1}]}",
        );
        assert!(docs.objects.is_empty());
        assert_eq!(
            messages(&docs),
            [
                r#"document 1: Node nx: status.addresses[0].address: "10.0.0.300" is not an IP address"#,
                r#"document 1: Node nx: spec.podCIDRs[0]: "10.244.1.1/24" has host bits set (did you mean 10.244.1.0/24?)"#,
                r#"document 1: Node nx: spec.podCIDRs[1]: "nonsense" is not a CIDR"#,
                r#"document 2: Pod a/p: status.podIPs[0].ip: "10.1.1" is not an IP address"#,
            ]
        );
    }

    #[test]
    fn kubectl_namespace() {
        let docs = parse(NAMESPACE);
        assert_eq!(docs.errors, []);
        assert_eq!(
            docs.objects,
            [ParsedObject::Namespace(NamespaceInfo {
                name: "shop".into(),
                labels: labels(&[
                    ("kubernetes.io/metadata.name", "shop"),
                    ("team", "payments")
                ]),
                gateway_annotation: Some("corp-fw".into()),
            })]
        );
    }

    #[test]
    fn egress_gateway_full() {
        let docs = parse(GATEWAY);
        assert_eq!(docs.errors, []);
        let ParsedObject::Gateway(gw) = &docs.objects[0] else {
            panic!("not a gateway: {docs:?}");
        };
        assert_eq!(gw.name, "corp-fw");
        assert_eq!(
            gw.egress_ips,
            [Ipv4Addr::new(192, 0, 2, 200), Ipv4Addr::new(192, 0, 2, 201)]
        );
        assert!(gw.node_selector.matches(&labels(&[("egress", "true")])));
        assert!(!gw.node_selector.matches(&labels(&[])));
        assert!(
            gw.namespace_selector
                .matches(&labels(&[("team", "payments")]))
        );
        let pods = gw.pod_selector.as_ref().unwrap();
        assert!(pods.matches(&labels(&[("app", "web")])));
        assert!(!pods.matches(&labels(&[("app", "db")])));
        let nets =
            |list: &[&str]| -> Vec<Ipv4Net> { list.iter().map(|n| n.parse().unwrap()).collect() };
        assert_eq!(
            gw.destinations,
            nets(&["203.0.113.0/24", "198.51.100.0/24"])
        );
        assert_eq!(gw.excluded, nets(&["203.0.113.128/25"]));
        assert_eq!(gw.failure_policy, FailurePolicy::FailOpen);
        assert_eq!(gw.announce, Announce::Bgp);
        assert_eq!(docs.objects[0].key().to_string(), "EgressGateway corp-fw");
    }

    #[test]
    fn watched_gateway_validates_like_a_file_one() {
        let ParsedObject::Gateway(from_file) = &parse(GATEWAY).objects[0] else {
            panic!("not a gateway");
        };
        // As the API server sends it: unknown fields pruned, a status written by the agents.
        let object: EgressGateway = serde_saphyr::from_str(
            &GATEWAY
                .replace("  notYetKnown: 1\n", "")
                .replace(
                    "status: {holders: []}",
                    "status: {holders: [{ip: 192.0.2.200, node: n1}, {ip: 192.0.2.201}], selectedPods: 3}",
                ),
        )
        .unwrap();
        assert_eq!(object.status.as_ref().unwrap().selected_pods, 3);
        assert_eq!(&gateway_from_object(&object).unwrap(), from_file);

        let mut bad = object.clone();
        bad.spec.egress_ips = vec!["x".into()];
        bad.spec.namespace_selector = None;
        let error = gateway_from_object(&bad).unwrap_err();
        assert_eq!(error.name, "corp-fw");
        assert_eq!(
            error.to_string(),
            r#"EgressGateway corp-fw: spec.egressIPs[0]: "x" is not an IPv4 address; spec.namespaceSelector: is required (use {} to admit every namespace)"#
        );

        bad.metadata.name = None;
        assert_eq!(
            gateway_from_object(&bad).unwrap_err().to_string(),
            "EgressGateway without metadata.name"
        );
    }

    #[test]
    fn file_gateway_ignores_status_and_reports_a_missing_spec_per_field() {
        let docs = parse(&GATEWAY.replace(
            "status: {holders: []}",
            "status: {holders: 7, conditions: [{type: Ready}]}",
        ));
        assert_eq!(docs.errors, []);
        assert_eq!(docs.objects.len(), 1);

        let docs = parse(
            "apiVersion: static-egress.io/v1alpha1\nkind: EgressGateway\nmetadata: {name: empty}",
        );
        assert_eq!(
            messages(&docs),
            [
                "document 1: EgressGateway empty: spec.egressIPs: must list at least one IPv4 address",
                "document 1: EgressGateway empty: spec.namespaceSelector: is required (use {} to admit every namespace)",
            ]
        );
    }

    #[test]
    fn egress_gateway_defaults() {
        let docs = parse(
            "apiVersion: static-egress.io/v1alpha1\nkind: EgressGateway\nmetadata: {name: g}\nspec: {egressIPs: [192.0.2.1], namespaceSelector: {}}",
        );
        assert_eq!(docs.errors, []);
        assert_eq!(
            docs.objects,
            [ParsedObject::Gateway(Gateway {
                name: "g".into(),
                egress_ips: vec![Ipv4Addr::new(192, 0, 2, 1)],
                node_selector: Selector::everything(),
                namespace_selector: Selector::everything(),
                pod_selector: None,
                destinations: vec![Ipv4Net::default()],
                excluded: vec![],
                failure_policy: FailurePolicy::FailClosed,
                announce: Default::default(),
            })]
        );
    }

    #[test]
    fn egress_gateway_validation_messages() {
        let base = "  namespaceSelector: {}\n";
        let cases = [
            (
                format!("  egressIPs: [192.0.2.1]\n{base}  destinationCIDRs: [10.0.0.0/8, 10.0.0.1/8]"),
                r#"document 1: EgressGateway corp-fw: spec.destinationCIDRs[1]: "10.0.0.1/8" has host bits set (did you mean 10.0.0.0/8?)"#,
            ),
            (
                format!("  egressIPs: [192.0.2.1]\n{base}  excludedCIDRs: [fd00::/8]"),
                r#"document 1: EgressGateway corp-fw: spec.excludedCIDRs[0]: "fd00::/8" is not an IPv4 CIDR"#,
            ),
            (
                format!("  egressIPs: [192.0.2.1]\n{base}  destinationCIDRs: []"),
                "document 1: EgressGateway corp-fw: spec.destinationCIDRs: must list at least one CIDR (omit the field for 0.0.0.0/0)",
            ),
            (
                format!("  egressIPs: [192.0.2.1, 192.0.2.300]\n{base}"),
                r#"document 1: EgressGateway corp-fw: spec.egressIPs[1]: "192.0.2.300" is not an IPv4 address"#,
            ),
            (
                format!("  egressIPs: ['2001:db8::1']\n{base}"),
                r#"document 1: EgressGateway corp-fw: spec.egressIPs[0]: "2001:db8::1" is not an IPv4 address"#,
            ),
            (
                format!("  egressIPs: [224.0.0.1]\n{base}"),
                "document 1: EgressGateway corp-fw: spec.egressIPs[0]: 224.0.0.1 is not a unicast address",
            ),
            (
                format!("  egressIPs: [169.254.169.254]\n{base}"),
                "document 1: EgressGateway corp-fw: spec.egressIPs[0]: 169.254.169.254 is in 169.254.0.0/16 (link-local, where clouds serve metadata), which never leaves a node: it cannot be an egress IP",
            ),
            (
                format!("  egressIPs: [127.0.0.2]\n{base}"),
                "document 1: EgressGateway corp-fw: spec.egressIPs[0]: 127.0.0.2 is in 127.0.0.0/8 (loopback), which never leaves a node: it cannot be an egress IP",
            ),
            (
                format!("  egressIPs: []\n{base}"),
                "document 1: EgressGateway corp-fw: spec.egressIPs: must list at least one IPv4 address",
            ),
            (
                base.to_owned(),
                "document 1: EgressGateway corp-fw: spec.egressIPs: must list at least one IPv4 address",
            ),
            (
                format!("  egressIPs: [192.0.2.1, 192.0.2.2, 192.0.2.1]\n{base}"),
                "document 1: EgressGateway corp-fw: spec.egressIPs[2]: 192.0.2.1 is already listed as spec.egressIPs[0]",
            ),
            (
                "  egressIPs: [192.0.2.1]\n".to_owned(),
                "document 1: EgressGateway corp-fw: spec.namespaceSelector: is required (use {} to admit every namespace)",
            ),
            (
                format!("  egressIPs: [192.0.2.1]\n{base}  podSelector: {{matchExpressions: [{{key: app, operator: Equals, values: [web]}}]}}"),
                r#"document 1: EgressGateway corp-fw: spec.podSelector.matchExpressions[0].operator: "Equals" is not one of In, NotIn, Exists, DoesNotExist"#,
            ),
            (
                "  egressIPs: [192.0.2.1]\n  namespaceSelector: {matchExpressions: [{key: team, operator: In}]}".to_owned(),
                "document 1: EgressGateway corp-fw: spec.namespaceSelector.matchExpressions[0].values: operator In needs at least one value",
            ),
            (
                format!("  egressIPs: [192.0.2.1]\n{base}  nodeSelector: {{matchExpressions: [{{key: egress, operator: Exists, values: [x]}}]}}"),
                "document 1: EgressGateway corp-fw: spec.nodeSelector.matchExpressions[0].values: operator Exists takes no values",
            ),
            (
                format!("  egressIPs: [192.0.2.1]\n{base}  failurePolicy: Ignore"),
                r#"document 1: EgressGateway corp-fw: spec.failurePolicy: "Ignore" is not one of FailClosed, FailOpen"#,
            ),
            (
                format!("  egressIPs: [192.0.2.1]\n{base}  announce: Ospf"),
                r#"document 1: EgressGateway corp-fw: spec.announce: "Ospf" is not one of Arp, Bgp, None, Aws"#,
            ),
            (
                format!("  egressIPs: 192.0.2.1\n{base}"),
                "document 1: EgressGateway corp-fw: does not match the EgressGateway schema: spec.egressIPs: invalid type: string \"192.0.2.1\", expected a sequence",
            ),
        ];
        for (spec, message) in cases {
            assert_eq!(only_gateway_error(&spec), message, "{spec}");
        }
    }

    #[test]
    fn every_problem_of_an_object_is_reported() {
        let docs = parse(
            "apiVersion: static-egress.io/v1alpha1\nkind: EgressGateway\nmetadata: {name: bad}\nspec: {egressIPs: [x], destinationCIDRs: [10.0.0.1/8]}",
        );
        assert_eq!(
            messages(&docs),
            [
                r#"document 1: EgressGateway bad: spec.egressIPs[0]: "x" is not an IPv4 address"#,
                "document 1: EgressGateway bad: spec.namespaceSelector: is required (use {} to admit every namespace)",
                r#"document 1: EgressGateway bad: spec.destinationCIDRs[0]: "10.0.0.1/8" has host bits set (did you mean 10.0.0.0/8?)"#,
            ]
        );
        let key = ObjectKey {
            kind: "EgressGateway".into(),
            namespace: None,
            name: "bad".into(),
        };
        assert!(docs.errors.iter().all(|e| e.object.as_ref() == Some(&key)));
    }
}
