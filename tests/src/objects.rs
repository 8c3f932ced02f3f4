//! A model of the Kubernetes objects the agent reads, rendered to the multi-document YAML file
//! given to `static-egress agent --from-file`.
//!
//! Tests hold an [`Objects`], change it like a cluster would change (a label here, a Node going
//! NotReady there) and write it again; the lab's nodes and pods keep their own objects in it.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, anyhow};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use serde::Serialize;

use crate::digest::digest;

/// Annotation by which a pod or a namespace asks for a gateway by name.
pub const GATEWAY_ANNOTATION: &str = "static-egress.io/gateway";
pub const GATEWAY_API_VERSION: &str = "static-egress.io/v1alpha1";

pub type Labels = BTreeMap<String, String>;

/// A selector with only `matchLabels`; an empty list gives `{}`, which selects everything.
pub fn match_labels<K: Into<String>, V: Into<String>>(
    pairs: impl IntoIterator<Item = (K, V)>,
) -> LabelSelector {
    LabelSelector {
        match_labels: Some(
            pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        ),
        match_expressions: None,
    }
}

/// Every object of the (pretend) cluster, in the order they are written.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Objects {
    pub namespaces: Vec<Namespace>,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    pub gateways: Vec<EgressGateway>,
    /// YAML documents written verbatim after the others: objects this model does not cover, or
    /// deliberately broken input.
    pub raw: Vec<String>,
}

impl Objects {
    /// The namespace called `name`, added without labels if it is not there yet.
    pub fn namespace(&mut self, name: &str) -> &mut Namespace {
        let index = match self.namespaces.iter().position(|n| n.name == name) {
            Some(i) => i,
            None => {
                self.namespaces.push(Namespace::new(name));
                self.namespaces.len() - 1
            }
        };
        &mut self.namespaces[index]
    }

    pub fn node_mut(&mut self, name: &str) -> Result<&mut Node> {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .ok_or_else(|| anyhow!("no Node {name} in the objects"))
    }

    pub fn pod_mut(&mut self, namespace: &str, name: &str) -> Result<&mut Pod> {
        self.pods
            .iter_mut()
            .find(|p| p.namespace == namespace && p.name == name)
            .ok_or_else(|| anyhow!("no Pod {namespace}/{name} in the objects"))
    }

    pub fn gateway_mut(&mut self, name: &str) -> Result<&mut EgressGateway> {
        self.gateways
            .iter_mut()
            .find(|g| g.name == name)
            .ok_or_else(|| anyhow!("no EgressGateway {name} in the objects"))
    }

    /// Adds `node`, or replaces the Node of the same name.
    pub fn set_node(&mut self, node: Node) {
        match self.nodes.iter_mut().find(|n| n.name == node.name) {
            Some(existing) => *existing = node,
            None => self.nodes.push(node),
        }
    }

    /// Adds `pod`, or replaces the Pod of the same namespace and name; also adds its namespace
    /// if missing, as Kubernetes has no pod without one.
    pub fn set_pod(&mut self, pod: Pod) {
        self.namespace(&pod.namespace);
        match self
            .pods
            .iter_mut()
            .find(|p| p.namespace == pod.namespace && p.name == pod.name)
        {
            Some(existing) => *existing = pod,
            None => self.pods.push(pod),
        }
    }

    pub fn remove_pod(&mut self, namespace: &str, name: &str) -> Option<Pod> {
        let index = self
            .pods
            .iter()
            .position(|p| p.namespace == namespace && p.name == name)?;
        Some(self.pods.remove(index))
    }

    /// Adds `gateway`, or replaces the EgressGateway of the same name.
    pub fn set_gateway(&mut self, gateway: EgressGateway) {
        match self.gateways.iter_mut().find(|g| g.name == gateway.name) {
            Some(existing) => *existing = gateway,
            None => self.gateways.push(gateway),
        }
    }

    pub fn remove_gateway(&mut self, name: &str) -> Option<EgressGateway> {
        let index = self.gateways.iter().position(|g| g.name == name)?;
        Some(self.gateways.remove(index))
    }

    /// The file's text: one YAML document per object, separated by `---`.
    pub fn render(&self) -> Result<String> {
        let mut documents = Vec::new();
        for namespace in &self.namespaces {
            documents.push(yaml(&namespace.to_k8s())?);
        }
        for node in &self.nodes {
            documents.push(yaml(&node.to_k8s())?);
        }
        for pod in &self.pods {
            documents.push(yaml(&pod.to_k8s())?);
        }
        for gateway in &self.gateways {
            documents.push(yaml(&gateway.to_document())?);
        }
        for raw in &self.raw {
            let mut raw = raw.clone();
            if !raw.ends_with('\n') {
                raw.push('\n');
            }
            documents.push(raw);
        }
        Ok(documents.join("---\n"))
    }

    /// Every object as the JSON an API server stores (raw documents included when they parse).
    pub fn api_objects(&self) -> Result<Vec<serde_json::Value>> {
        let mut out = Vec::new();
        for namespace in &self.namespaces {
            out.push(serde_json::to_value(namespace.to_k8s())?);
        }
        for node in &self.nodes {
            out.push(serde_json::to_value(node.to_k8s())?);
        }
        for pod in &self.pods {
            out.push(serde_json::to_value(pod.to_k8s())?);
        }
        for gateway in &self.gateways {
            out.push(serde_json::to_value(gateway.to_document())?);
        }
        for raw in &self.raw {
            if let Ok(value) = serde_saphyr::from_str::<serde_json::Value>(raw) {
                out.push(value);
            }
        }
        Ok(out)
    }

    /// Renders and writes the file atomically; returns the digest of what was written.
    pub fn write(&self, path: &Path) -> Result<String> {
        let text = self.render()?;
        write_atomically(path, text.as_bytes())?;
        Ok(digest(text.as_bytes()))
    }
}

fn yaml<T: Serialize>(value: &T) -> Result<String> {
    serde_saphyr::to_string(value).context("cannot render an object as YAML")
}

/// Writes through a temporary file in the same directory and a rename, so a reader (the agent
/// watching the file) sees either the old or the new content, never a half-written file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("{} has no file name", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| -> Result<()> {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        Ok(())
    })();
    if result.is_err() {
        // Best effort: the write already failed, and that error is the one worth reporting.
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

fn metadata(
    name: &str,
    namespace: Option<&str>,
    labels: &Labels,
    annotations: &Labels,
) -> ObjectMeta {
    let non_empty = |map: &Labels| (!map.is_empty()).then(|| map.clone());
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: namespace.map(str::to_owned),
        labels: non_empty(labels),
        annotations: non_empty(annotations),
        ..ObjectMeta::default()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
    pub annotations: Labels,
}

impl Namespace {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }

    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    pub fn annotation(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.annotations.insert(key.into(), value.into());
        self
    }

    /// Opts the whole namespace in to the gateway `name`.
    pub fn gateway(self, name: impl Into<String>) -> Self {
        self.annotation(GATEWAY_ANNOTATION, name)
    }

    fn to_k8s(&self) -> core::Namespace {
        core::Namespace {
            metadata: metadata(&self.name, None, &self.labels, &self.annotations),
            ..core::Namespace::default()
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub labels: Labels,
    pub annotations: Labels,
    /// The `Ready` condition's status, `True` or `False`.
    pub ready: bool,
    /// `spec.unschedulable`: cordoned.
    pub unschedulable: bool,
    pub internal_ip: Option<Ipv4Addr>,
    /// Written as `spec.podCIDRs`, with the first also as `spec.podCIDR`, as Kubernetes does.
    pub pod_cidrs: Vec<Ipv4Net>,
}

impl Node {
    /// A Ready node without address or pod CIDR.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            labels: Labels::new(),
            annotations: Labels::new(),
            ready: true,
            unschedulable: false,
            internal_ip: None,
            pod_cidrs: Vec::new(),
        }
    }

    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    pub fn ready(mut self, ready: bool) -> Self {
        self.ready = ready;
        self
    }

    pub fn internal_ip(mut self, ip: Ipv4Addr) -> Self {
        self.internal_ip = Some(ip);
        self
    }

    pub fn pod_cidr(mut self, cidr: Ipv4Net) -> Self {
        self.pod_cidrs.push(cidr);
        self
    }

    fn to_k8s(&self) -> core::Node {
        let cidrs: Vec<String> = self.pod_cidrs.iter().map(ToString::to_string).collect();
        core::Node {
            metadata: metadata(&self.name, None, &self.labels, &self.annotations),
            spec: Some(core::NodeSpec {
                pod_cidr: cidrs.first().cloned(),
                pod_cidrs: (!cidrs.is_empty()).then_some(cidrs),
                unschedulable: self.unschedulable.then_some(true),
                ..core::NodeSpec::default()
            }),
            status: Some(core::NodeStatus {
                addresses: self.internal_ip.map(|ip| {
                    vec![core::NodeAddress {
                        address: ip.to_string(),
                        type_: "InternalIP".into(),
                    }]
                }),
                conditions: Some(vec![core::NodeCondition {
                    type_: "Ready".into(),
                    status: if self.ready { "True" } else { "False" }.into(),
                    ..core::NodeCondition::default()
                }]),
                ..core::NodeStatus::default()
            }),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub annotations: Labels,
    /// `spec.nodeName`.
    pub node: Option<String>,
    /// `status.phase`, `Running` unless changed.
    pub phase: String,
    /// Written as `status.podIP` and `status.podIPs`.
    pub ip: Option<Ipv4Addr>,
    pub host_network: bool,
}

impl Pod {
    /// A Running pod, not yet on a node and without address.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            labels: Labels::new(),
            annotations: Labels::new(),
            node: None,
            phase: "Running".into(),
            ip: None,
            host_network: false,
        }
    }

    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    pub fn annotation(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.annotations.insert(key.into(), value.into());
        self
    }

    /// Opts the pod in to the gateway `name`.
    pub fn gateway(self, name: impl Into<String>) -> Self {
        self.annotation(GATEWAY_ANNOTATION, name)
    }

    pub fn node(mut self, node: impl Into<String>) -> Self {
        self.node = Some(node.into());
        self
    }

    pub fn ip(mut self, ip: Ipv4Addr) -> Self {
        self.ip = Some(ip);
        self
    }

    pub fn phase(mut self, phase: impl Into<String>) -> Self {
        self.phase = phase.into();
        self
    }

    pub fn host_network(mut self, host_network: bool) -> Self {
        self.host_network = host_network;
        self
    }

    fn to_k8s(&self) -> core::Pod {
        core::Pod {
            metadata: metadata(
                &self.name,
                Some(&self.namespace),
                &self.labels,
                &self.annotations,
            ),
            spec: Some(core::PodSpec {
                node_name: self.node.clone(),
                host_network: self.host_network.then_some(true),
                containers: vec![core::Container {
                    name: "app".into(),
                    image: Some("registry.k8s.io/pause:3.10".into()),
                    ..core::Container::default()
                }],
                ..core::PodSpec::default()
            }),
            status: Some(core::PodStatus {
                phase: Some(self.phase.clone()),
                pod_ip: self.ip.map(|ip| ip.to_string()),
                pod_ips: self.ip.map(|ip| vec![core::PodIP { ip: ip.to_string() }]),
                ..core::PodStatus::default()
            }),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailurePolicy {
    FailClosed,
    FailOpen,
}

impl FailurePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FailClosed => "FailClosed",
            Self::FailOpen => "FailOpen",
        }
    }
}

/// Our cluster-scoped `EgressGateway`; `None` and empty optional fields are left out.
#[derive(Clone, Debug, PartialEq)]
pub struct EgressGateway {
    pub name: String,
    pub egress_ips: Vec<Ipv4Addr>,
    pub node_selector: LabelSelector,
    pub namespace_selector: Option<LabelSelector>,
    pub pod_selector: Option<LabelSelector>,
    pub destination_cidrs: Option<Vec<Ipv4Net>>,
    pub excluded_cidrs: Vec<Ipv4Net>,
    pub failure_policy: Option<FailurePolicy>,
    /// `Arp`, `Bgp` or `None`; absent: the agent's default (`Arp`).
    pub announce: Option<&'static str>,
}

impl EgressGateway {
    /// A gateway without egress IPs whose selectors match everything (`{}`).
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            egress_ips: Vec::new(),
            node_selector: LabelSelector::default(),
            namespace_selector: Some(LabelSelector::default()),
            pod_selector: None,
            destination_cidrs: None,
            excluded_cidrs: Vec::new(),
            failure_policy: None,
            announce: None,
        }
    }

    pub fn egress_ip(mut self, ip: Ipv4Addr) -> Self {
        self.egress_ips.push(ip);
        self
    }

    pub fn node_selector(mut self, selector: LabelSelector) -> Self {
        self.node_selector = selector;
        self
    }

    pub fn namespace_selector(mut self, selector: Option<LabelSelector>) -> Self {
        self.namespace_selector = selector;
        self
    }

    pub fn pod_selector(mut self, selector: Option<LabelSelector>) -> Self {
        self.pod_selector = selector;
        self
    }

    pub fn destination_cidrs(mut self, cidrs: Option<Vec<Ipv4Net>>) -> Self {
        self.destination_cidrs = cidrs;
        self
    }

    pub fn excluded_cidrs(mut self, cidrs: Vec<Ipv4Net>) -> Self {
        self.excluded_cidrs = cidrs;
        self
    }

    pub fn failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.failure_policy = Some(policy);
        self
    }

    pub fn announce(mut self, how: &'static str) -> Self {
        self.announce = Some(how);
        self
    }

    fn to_document(&self) -> GatewayDocument<'_> {
        let strings = |cidrs: &[Ipv4Net]| cidrs.iter().map(ToString::to_string).collect();
        GatewayDocument {
            api_version: GATEWAY_API_VERSION,
            kind: "EgressGateway",
            metadata: GatewayMetadata { name: &self.name },
            spec: GatewaySpec {
                egress_ips: self.egress_ips.iter().map(ToString::to_string).collect(),
                node_selector: &self.node_selector,
                namespace_selector: self.namespace_selector.as_ref(),
                pod_selector: self.pod_selector.as_ref(),
                destination_cidrs: self.destination_cidrs.as_deref().map(strings),
                excluded_cidrs: strings(&self.excluded_cidrs),
                failure_policy: self.failure_policy.map(FailurePolicy::as_str),
                announce: self.announce,
            },
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GatewayDocument<'a> {
    api_version: &'static str,
    kind: &'static str,
    metadata: GatewayMetadata<'a>,
    spec: GatewaySpec<'a>,
}

#[derive(Serialize)]
struct GatewayMetadata<'a> {
    name: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GatewaySpec<'a> {
    #[serde(rename = "egressIPs")]
    egress_ips: Vec<String>,
    node_selector: &'a LabelSelector,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace_selector: Option<&'a LabelSelector>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pod_selector: Option<&'a LabelSelector>,
    #[serde(rename = "destinationCIDRs", skip_serializing_if = "Option::is_none")]
    destination_cidrs: Option<Vec<String>>,
    #[serde(rename = "excludedCIDRs", skip_serializing_if = "Vec::is_empty")]
    excluded_cidrs: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    failure_policy: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    announce: Option<&'static str>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn documents(text: &str) -> Vec<Value> {
        serde_saphyr::from_multiple(text).expect("valid YAML documents")
    }

    fn sample() -> Objects {
        let mut objects = Objects::default();
        objects.namespaces.push(
            Namespace::new("payments")
                .label("team", "payments")
                .gateway("corp-fw"),
        );
        objects.set_node(
            Node::new("node2")
                .label("egress", "true")
                .internal_ip(Ipv4Addr::new(10, 99, 0, 12))
                .pod_cidr("10.244.2.0/24".parse().expect("cidr"))
                .ready(false),
        );
        objects.set_pod(
            Pod::new("payments", "api-1")
                .label("app", "api")
                .node("node1")
                .ip(Ipv4Addr::new(10, 244, 1, 2)),
        );
        objects.set_gateway(
            EgressGateway::new("corp-fw")
                .egress_ip(Ipv4Addr::new(10, 99, 0, 200))
                .node_selector(match_labels([("egress", "true")]))
                .namespace_selector(Some(match_labels([("team", "payments")])))
                .pod_selector(Some(match_labels([("app", "api")])))
                .destination_cidrs(Some(vec!["0.0.0.0/0".parse().expect("cidr")]))
                .failure_policy(FailurePolicy::FailOpen),
        );
        objects
    }

    #[test]
    fn renders_one_document_per_object() {
        let docs = documents(&sample().render().expect("renders"));
        let kinds: Vec<&str> = docs
            .iter()
            .map(|d| d["kind"].as_str().expect("kind"))
            .collect();
        assert_eq!(kinds, ["Namespace", "Node", "Pod", "EgressGateway"]);
    }

    #[test]
    fn namespace_carries_labels_and_gateway_annotation() {
        let docs = documents(&sample().render().expect("renders"));
        assert_eq!(docs[0]["apiVersion"], "v1");
        assert_eq!(docs[0]["metadata"]["labels"], json!({"team": "payments"}));
        assert_eq!(
            docs[0]["metadata"]["annotations"],
            json!({"static-egress.io/gateway": "corp-fw"})
        );
    }

    #[test]
    fn node_has_address_condition_and_both_cidr_fields() {
        let docs = documents(&sample().render().expect("renders"));
        let node = &docs[1];
        assert_eq!(node["metadata"]["name"], "node2");
        assert_eq!(
            node["status"]["addresses"],
            json!([{"type": "InternalIP", "address": "10.99.0.12"}])
        );
        assert_eq!(
            node["status"]["conditions"],
            json!([{"type": "Ready", "status": "False"}])
        );
        assert_eq!(node["spec"]["podCIDR"], "10.244.2.0/24");
        assert_eq!(node["spec"]["podCIDRs"], json!(["10.244.2.0/24"]));
    }

    #[test]
    fn pod_has_node_phase_and_addresses() {
        let docs = documents(&sample().render().expect("renders"));
        let pod = &docs[2];
        assert_eq!(pod["metadata"]["namespace"], "payments");
        assert_eq!(pod["metadata"]["labels"], json!({"app": "api"}));
        assert_eq!(pod["spec"]["nodeName"], "node1");
        assert_eq!(pod["status"]["phase"], "Running");
        assert_eq!(pod["status"]["podIP"], "10.244.1.2");
        assert_eq!(pod["status"]["podIPs"], json!([{"ip": "10.244.1.2"}]));
        assert!(pod["spec"].get("hostNetwork").is_none());
    }

    #[test]
    fn gateway_uses_the_documented_field_names() {
        let docs = documents(&sample().render().expect("renders"));
        assert_eq!(
            docs[3],
            json!({
                "apiVersion": "static-egress.io/v1alpha1",
                "kind": "EgressGateway",
                "metadata": {"name": "corp-fw"},
                "spec": {
                    "egressIPs": ["10.99.0.200"],
                    "nodeSelector": {"matchLabels": {"egress": "true"}},
                    "namespaceSelector": {"matchLabels": {"team": "payments"}},
                    "podSelector": {"matchLabels": {"app": "api"}},
                    "destinationCIDRs": ["0.0.0.0/0"],
                    "failurePolicy": "FailOpen",
                }
            })
        );
    }

    #[test]
    fn optional_gateway_fields_are_left_out() {
        let mut objects = Objects::default();
        objects.set_gateway(EgressGateway::new("gw").egress_ip(Ipv4Addr::new(192, 0, 2, 1)));
        let docs = documents(&objects.render().expect("renders"));
        assert_eq!(
            docs[0]["spec"],
            json!({"egressIPs": ["192.0.2.1"], "nodeSelector": {}, "namespaceSelector": {}})
        );
    }

    #[test]
    fn set_pod_replaces_and_adds_the_namespace() {
        let mut objects = Objects::default();
        objects.set_pod(Pod::new("web", "a"));
        objects.set_pod(Pod::new("web", "a").phase("Pending"));
        assert_eq!(objects.pods.len(), 1);
        assert_eq!(objects.pods[0].phase, "Pending");
        assert_eq!(objects.namespaces, vec![Namespace::new("web")]);
        assert!(objects.remove_pod("web", "a").is_some());
        assert!(objects.pod_mut("web", "a").is_err());
    }

    #[test]
    fn raw_documents_are_appended_verbatim() {
        let mut objects = Objects::default();
        objects.namespace("a");
        objects.raw.push("kind: Nonsense\nmetadata: 7".into());
        let text = objects.render().expect("renders");
        assert!(
            text.ends_with("---\nkind: Nonsense\nmetadata: 7\n"),
            "{text}"
        );
    }

    #[test]
    fn write_is_atomic_and_returns_the_file_digest() {
        let dir = std::env::temp_dir().join(format!("netlab-objects-test-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("objects.yaml");
        let written = sample().write(&path).expect("writes");
        let bytes = fs::read(&path).expect("reads back");
        assert_eq!(written, digest(&bytes));
        let entries: Vec<_> = fs::read_dir(&dir).expect("lists").collect();
        assert_eq!(entries.len(), 1, "temporary file left behind");
        fs::remove_dir_all(&dir).expect("cleans up");
    }
}
