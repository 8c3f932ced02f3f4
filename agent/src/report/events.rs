//! Which events this node owes and what they look like. Core `v1` events, not
//! `events.k8s.io` ones through kube's `Recorder`: the recorder has no `source.component` and
//! repeats an event as a series while we want one event per situation.

use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Resource;

use crate::model::{EgressGateway, GATEWAY_ANNOTATION};
use crate::plan::{NodePlan, RejectReason};

const COMPONENT: &str = "static-egress";
const CONTROLLER: &str = "static-egress.io/agent";
/// Events about cluster-scoped objects live here, as kubectl and client-go expect.
const CLUSTER_EVENTS_NAMESPACE: &str = "default";

/// A local pod whose annotation is refused; warned about once while it stays so.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct PodWarning {
    pub(super) namespace: String,
    pub(super) pod: String,
    pub(super) gateway: String,
    pub(super) refusal: Refusal,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Refusal {
    NotAdmitted,
    UnknownGateway,
    LeftOut,
    PodMapFull,
}

impl Refusal {
    fn reason(self) -> &'static str {
        match self {
            Self::NotAdmitted => "GatewayNotAdmitted",
            Self::UnknownGateway => "UnknownGateway",
            Self::LeftOut => "GatewayLeftOut",
            Self::PodMapFull => "PodMapFull",
        }
    }
}

/// The warnings this node's pods deserve now, sorted. Namespace annotations are left to the
/// gateway's status: every node with a pod there would repeat the same event.
pub(super) fn pod_warnings(plan: &NodePlan) -> Vec<PodWarning> {
    let mut warnings: Vec<PodWarning> = plan
        .rejected
        .iter()
        .filter_map(|rejection| {
            Some(PodWarning {
                namespace: rejection.namespace.clone(),
                pod: rejection.pod.clone()?,
                gateway: rejection.gateway.clone(),
                refusal: match rejection.why {
                    RejectReason::NamespaceNotAdmitted => Refusal::NotAdmitted,
                    RejectReason::UnknownGateway => Refusal::UnknownGateway,
                    RejectReason::GatewayDropped => Refusal::LeftOut,
                    RejectReason::PodMapFull => Refusal::PodMapFull,
                },
            })
        })
        .collect();
    warnings.sort_unstable();
    warnings
}

impl PodWarning {
    pub(super) fn event(&self, node: &str, now: Timestamp) -> Event {
        let message = match self.refusal {
            Refusal::NotAdmitted => format!(
                "{GATEWAY_ANNOTATION} names gateway {}, whose namespaceSelector does not admit \
                 namespace {}: the pod's traffic does not use it",
                self.gateway, self.namespace
            ),
            Refusal::UnknownGateway => format!(
                "{GATEWAY_ANNOTATION} names gateway {}, which does not exist",
                self.gateway
            ),
            Refusal::PodMapFull => format!(
                "this node already marks as many pods as its kernel map holds ({}): the pod's \
                 traffic does not use gateway {}",
                static_egress_common::capacity::PODS,
                self.gateway
            ),
            Refusal::LeftOut => format!(
                "{GATEWAY_ANNOTATION} names gateway {}, which is left out (see its Ready \
                 condition)",
                self.gateway
            ),
        };
        let pod = ObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("Pod".to_owned()),
            namespace: Some(self.namespace.clone()),
            name: Some(self.pod.clone()),
            ..ObjectReference::default()
        };
        event(node, pod, "Warning", self.refusal.reason(), message, now)
    }
}

/// `HolderChanged` on the gateway, from its new holder `node`; `from` is `None` when the IP
/// had no holder.
pub(super) fn holder_changed(
    node: &str,
    gateway: &str,
    ip: Ipv4Addr,
    from: Option<(&str, &str)>,
    now: Timestamp,
) -> Event {
    let message = match from {
        Some((from, why)) => format!("{ip} moved from {from} to {node}: {why}"),
        None => format!("{ip} is now held by {node} (it had no holder)"),
    };
    on_gateway(node, gateway, "Normal", "HolderChanged", &message, now)
}

/// An event on an `EgressGateway`, from `node`.
pub(super) fn on_gateway(
    node: &str,
    gateway: &str,
    type_: &str,
    reason: &str,
    message: &str,
    now: Timestamp,
) -> Event {
    let reference = ObjectReference {
        api_version: Some(EgressGateway::api_version(&()).into_owned()),
        kind: Some(EgressGateway::kind(&()).into_owned()),
        name: Some(gateway.to_owned()),
        ..ObjectReference::default()
    };
    event(node, reference, type_, reason, message.to_owned(), now)
}

/// A core event the way client-go's recorder makes one (no `eventTime`, so the API server
/// validates it as a classic event and needs no `action`).
fn event(
    node: &str,
    regarding: ObjectReference,
    type_: &str,
    reason: &str,
    message: String,
    now: Timestamp,
) -> Event {
    let namespace = regarding
        .namespace
        .clone()
        .unwrap_or_else(|| CLUSTER_EVENTS_NAMESPACE.to_owned());
    Event {
        metadata: ObjectMeta {
            generate_name: Some(format!(
                "{}.",
                regarding.name.as_deref().unwrap_or(COMPONENT)
            )),
            namespace: Some(namespace),
            ..ObjectMeta::default()
        },
        involved_object: regarding,
        type_: Some(type_.to_owned()),
        reason: Some(reason.to_owned()),
        message: Some(message),
        source: Some(EventSource {
            component: Some(COMPONENT.to_owned()),
            host: Some(node.to_owned()),
        }),
        reporting_component: Some(CONTROLLER.to_owned()),
        reporting_instance: Some(node.to_owned()),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        count: Some(1),
        ..Event::default()
    }
}
