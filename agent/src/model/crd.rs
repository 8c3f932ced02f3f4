//! The `EgressGateway` custom resource, defined once for both sources: the file source reads it
//! from YAML, the cluster source watches it, and `static-egress crd` prints its definition.
//! Fields the agent validates itself stay strings, so its errors can quote what was written;
//! the schema's patterns only spare users a round trip through the agent's logs.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One IPv4 octet without leading zeros, which `Ipv4Addr` rejects too.
macro_rules! octet {
    () => {
        "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
    };
}

macro_rules! ipv4 {
    () => {
        concat!("(", octet!(), "\\.){3}", octet!())
    };
}

const IPV4_PATTERN: &str = concat!("^", ipv4!(), "$");
const IPV4_CIDR_PATTERN: &str = concat!("^", ipv4!(), "/([0-9]|[12][0-9]|3[0-2])$");

/// Gives the pods it selects a fixed source address for traffic leaving the cluster.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[expect(
    clippy::duplicated_attributes,
    reason = "each printcolumn(...) repeats keys such as type_, which clippy takes for repeats"
)]
#[kube(
    group = "static-egress.io",
    version = "v1alpha1",
    kind = "EgressGateway",
    shortname = "egw",
    status = "EgressGatewayStatus",
    derive = "Default",
    derive = "PartialEq",
    doc = "A fixed source IP for selected pods' traffic leaving the cluster.",
    printcolumn(name = "Egress IPs", type_ = "string", json_path = ".spec.egressIPs"),
    printcolumn(name = "Nodes", type_ = "string", json_path = ".status.activeNodes"),
    printcolumn(name = "Pods", type_ = "integer", json_path = ".status.selectedPods"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].status"#
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
// By hand: both deserialize when absent (a serde default, an Option) so that the agent can say
// what is missing, which schemars would take for optional.
#[schemars(extend("required" = ["egressIPs", "namespaceSelector"]))]
pub struct EgressGatewaySpec {
    /// The fixed source addresses (IPv4). The first is held by the first eligible node by
    /// name, the second by the second, and so on; each pod uses one of them.
    #[serde(default, rename = "egressIPs")]
    #[schemars(
        length(min = 1, max = 4096),
        inner(pattern(IPV4_PATTERN), length(max = 15)),
        transform = without_default,
        // What the API server can check alone; addresses of nodes, pods and Services, and the
        // nodes' gateways, are refused by the agents (they need the cluster's objects).
        extend("x-kubernetes-validations" = [{
            "rule": "self.all(a, !isIP(a) || ip(a).isGlobalUnicast())",
            "message": "egress IPs must be unicast: not 0.0.0.0, 127.0.0.0/8 (loopback), 169.254.0.0/16 (link-local, cloud metadata), 224.0.0.0/4 (multicast) or 255.255.255.255"
        }])
    )]
    pub egress_ips: Vec<String>,
    /// Nodes allowed to hold the egress IPs; absent or empty: every Ready node.
    pub node_selector: Option<LabelSelector>,
    /// Namespaces whose pods may use this gateway; `{}` admits every namespace.
    #[schemars(required)]
    pub namespace_selector: Option<LabelSelector>,
    /// Pods (in admitted namespaces) that use this gateway; absent: only pods or namespaces
    /// annotated `static-egress.io/gateway: <name>`.
    pub pod_selector: Option<LabelSelector>,
    /// Destinations reached through the gateway; absent: 0.0.0.0/0. Cluster ranges never are.
    #[serde(rename = "destinationCIDRs")]
    #[schemars(inner(pattern(IPV4_CIDR_PATTERN)))]
    pub destination_cidrs: Option<Vec<String>>,
    /// Destinations never reached through the gateway; they win over destinationCIDRs.
    #[serde(default, rename = "excludedCIDRs")]
    #[schemars(inner(pattern(IPV4_CIDR_PATTERN)))]
    pub excluded_cidrs: Vec<String>,
    /// What selected traffic does while no node holds its egress IP: FailClosed (default)
    /// drops it, FailOpen lets it leave from its own node.
    #[schemars(extend("enum" = ["FailClosed", "FailOpen"]))]
    pub failure_policy: Option<String>,
    /// How the holder makes an egress IP reachable: Arp (default) answers ARP for it and
    /// announces it by gratuitous ARP on its uplink's segment; Bgp puts it into the routing
    /// table the node's BGP daemon announces (the agents' --announce-table) and answers no ARP;
    /// None answers no ARP and leaves it to the operator (a cloud's or a router's route); Aws
    /// assigns it to the holder's network interface through the EC2 API (with its Elastic IP,
    /// when the agents map it to one) and announces it by ARP as well.
    #[schemars(extend("enum" = ["Arp", "Bgp", "None", "Aws"]))]
    pub announce: Option<String>,
}

/// The serde default of `egressIPs` only lets the agent report it missing. As a schema default
/// it would make the field never missing, and the API server refuses a CRD whose default breaks
/// the field's own `minItems`.
fn without_default(schema: &mut schemars::Schema) {
    schema.remove("default");
}

/// What the agents observed; users never write it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressGatewayStatus {
    /// `Ready` (a holder serves every egress IP) and `Conflicts` (some pod/namespace annotation or egress IP was refused).
    // Keyed by type: a condition another controller adds is its own, and the agents'
    // server-side apply leaves it be.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// One entry per egress IP; node absent when no eligible node holds it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["ip"]))]
    pub holders: Vec<EgressIpHolder>,
    /// Comma-separated holder nodes, for the printer column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_nodes: Option<String>,
    /// Running pods, on any node, that use this gateway.
    #[serde(default)]
    pub selected_pods: u32,
    /// "namespace/name: why" for pods (or "namespace ns: why") whose annotation names this gateway and was refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected_pods: Vec<String>,
}

/// Which node holds one egress IP.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressIpHolder {
    pub ip: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// When the IP last moved (to `node`, or to no node), as the agents saw it; absent until
    /// they have seen it move since they started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
    /// Why it last moved: from which node, and what happened to that node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use kube::{CustomResourceExt as _, Resource as _};
    use serde_json::{Value, json};

    use super::*;
    use crate::model::API_VERSION;

    fn spec_schema() -> Value {
        let crd = serde_json::to_value(EgressGateway::crd()).unwrap();
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"].clone()
    }

    #[test]
    fn resource_identity() {
        assert_eq!(EgressGateway::api_version(&()), API_VERSION);
        let crd = EgressGateway::crd();
        assert_eq!(crd.spec.scope, "Cluster");
        assert_eq!(crd.spec.names.plural, "egressgateways");
        assert_eq!(crd.spec.names.short_names, Some(vec!["egw".to_owned()]));
        let version = &crd.spec.versions[0];
        assert!(version.subresources.as_ref().unwrap().status.is_some());
        let columns: Vec<(&str, &str)> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| (c.name.as_str(), c.json_path.as_str()))
            .collect();
        assert_eq!(
            columns,
            [
                ("Egress IPs", ".spec.egressIPs"),
                ("Nodes", ".status.activeNodes"),
                ("Pods", ".status.selectedPods"),
                ("Ready", r#".status.conditions[?(@.type=="Ready")].status"#),
                ("Age", ".metadata.creationTimestamp"),
            ]
        );
    }

    #[test]
    fn schema_checks_what_it_can() {
        let spec = spec_schema();
        assert_eq!(spec["required"], json!(["egressIPs", "namespaceSelector"]));
        let fields = &spec["properties"];
        assert_eq!(fields["egressIPs"]["minItems"], 1);
        assert_eq!(fields["egressIPs"].get("default"), None);
        assert_eq!(fields["egressIPs"]["items"]["pattern"], IPV4_PATTERN);
        for cidrs in ["destinationCIDRs", "excludedCIDRs"] {
            assert_eq!(fields[cidrs]["items"]["pattern"], IPV4_CIDR_PATTERN);
        }
        assert_eq!(
            fields["failurePolicy"]["enum"],
            json!(["FailClosed", "FailOpen"])
        );
        for selector in ["nodeSelector", "namespaceSelector", "podSelector"] {
            let properties = &fields[selector]["properties"];
            assert!(
                properties["matchLabels"].is_object() && properties["matchExpressions"].is_object(),
                "{selector}: {properties}"
            );
        }
        // A required field that may be null would let `namespaceSelector: null` through.
        assert_eq!(fields["namespaceSelector"].get("nullable"), None);
    }

    #[test]
    fn status_wire_format() {
        assert_eq!(
            serde_json::to_value(EgressGatewayStatus::default()).unwrap(),
            json!({"selectedPods": 0})
        );
        let status = EgressGatewayStatus {
            holders: vec![
                EgressIpHolder {
                    ip: "192.0.2.1".into(),
                    node: Some("n1".into()),
                    since: Some(Time("2026-12-02T10:00:00Z".parse().unwrap())),
                    reason: Some("from n2: its probes went unanswered".into()),
                },
                EgressIpHolder {
                    ip: "192.0.2.2".into(),
                    node: None,
                    ..EgressIpHolder::default()
                },
            ],
            active_nodes: Some("n1".into()),
            selected_pods: 2,
            rejected_pods: vec!["shop/web: not admitted".into()],
            conditions: Vec::new(),
        };
        let value = serde_json::to_value(&status).unwrap();
        assert_eq!(
            value,
            json!({
                "holders": [
                    {
                        "ip": "192.0.2.1",
                        "node": "n1",
                        "since": "2026-12-02T10:00:00Z",
                        "reason": "from n2: its probes went unanswered",
                    },
                    {"ip": "192.0.2.2"},
                ],
                "activeNodes": "n1",
                "selectedPods": 2,
                "rejectedPods": ["shop/web: not admitted"],
            })
        );
        assert_eq!(
            serde_json::from_value::<EgressGatewayStatus>(value).unwrap(),
            status
        );
    }

    #[test]
    fn object_wire_format() {
        let mut object = EgressGateway::new(
            "corp-fw",
            EgressGatewaySpec {
                egress_ips: vec!["192.0.2.1".into()],
                namespace_selector: Some(LabelSelector::default()),
                ..EgressGatewaySpec::default()
            },
        );
        object.status = Some(EgressGatewayStatus::default());
        let value = serde_json::to_value(&object).unwrap();
        assert_eq!(value["apiVersion"], API_VERSION);
        assert_eq!(value["kind"], "EgressGateway");
        assert_eq!(value["spec"]["egressIPs"], json!(["192.0.2.1"]));
        assert_eq!(value["status"], json!({"selectedPods": 0}));
        assert_eq!(
            serde_json::from_value::<EgressGateway>(value).unwrap(),
            object
        );
    }
}
