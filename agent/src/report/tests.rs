#![expect(clippy::unwrap_used, reason = "tests fail loudly")]

use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::{Request, Response, StatusCode};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
use kube::client::Body;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tower_test::mock;

use super::*;
use crate::model::{FailurePolicy, Gateway, NamespaceInfo, NodeInfo, PodInfo, Selector};
use crate::plan::{Holder, PlanConfig, plan};
use crate::testing::labels;

/// One request as the API server saw it.
#[derive(Debug)]
struct Seen {
    method: String,
    path: String,
    query: String,
    content_type: String,
    body: Value,
}

/// An API server that records every request and answers it as a real one would; with
/// `fail` set it answers 500 instead.
struct Server {
    seen: mpsc::UnboundedReceiver<Seen>,
    fail: Arc<AtomicBool>,
}

impl Server {
    /// The requests made since the last call; a publish has had all its answers when it
    /// returns, so they are all here.
    /// The writes since the last call (reads are left out).
    fn take(&mut self) -> Vec<Seen> {
        std::iter::from_fn(|| self.seen.try_recv().ok())
            .filter(|s| s.method != "GET")
            .collect()
    }
}

fn reporter(node: &str) -> (Reporter, Server) {
    reporter_with(node, Vec::new())
}

/// A reporter whose API server lists `gateways` (with their statuses) when asked.
fn reporter_with(node: &str, gateways: Vec<Value>) -> (Reporter, Server) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let (tx, seen) = mpsc::unbounded_channel();
    let fail = Arc::new(AtomicBool::new(false));
    let failing = fail.clone();
    tokio::spawn(async move {
        let mut handle = pin!(handle);
        while let Some((request, send)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.unwrap();
            let seen = Seen {
                method: parts.method.to_string(),
                path: parts.uri.path().to_owned(),
                query: parts.uri.query().unwrap_or_default().to_owned(),
                content_type: parts
                    .headers
                    .get(http::header::CONTENT_TYPE)
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default(),
                body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            };
            let response = if failing.load(Ordering::SeqCst) {
                let status = json!({
                    "kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "message": "etcdserver: request timed out", "reason": "InternalError",
                    "code": 500,
                });
                Response::builder()
                    .status(StatusCode::INTERNAL_SERVER_ERROR)
                    .body(Body::from(serde_json::to_vec(&status).unwrap()))
                    .unwrap()
            } else if seen.method == "GET" && !seen.path.ends_with("/egressgateways") {
                // One object, read for its uid.
                let name = seen.path.rsplit('/').next().unwrap();
                let object = json!({"metadata": {"name": name, "uid": uid_of(name)}});
                Response::new(Body::from(serde_json::to_vec(&object).unwrap()))
            } else if seen.method == "GET" {
                let list = json!({
                    "apiVersion": "static-egress.io/v1alpha1", "kind": "EgressGatewayList",
                    "metadata": {"resourceVersion": "1"}, "items": gateways,
                });
                Response::new(Body::from(serde_json::to_vec(&list).unwrap()))
            } else {
                Response::new(Body::from(serde_json::to_vec(&answer(&seen)).unwrap()))
            };
            tx.send(seen).unwrap();
            send.send_response(response);
        }
    });
    (
        Reporter::new(kube::Client::new(service, "default"), node.to_owned()),
        Server { seen, fail },
    )
}

/// The uid the server gives the object named `name`.
fn uid_of(name: &str) -> String {
    format!("uid-of-{name}")
}

/// What the API server returns: the object as stored after the request.
fn answer(seen: &Seen) -> Value {
    let mut object = seen.body.clone();
    if seen.method == "PATCH" {
        object["spec"] = json!({
            "egressIPs": ["10.99.0.200"],
            "namespaceSelector": {"matchLabels": {"team": "payments"}},
        });
        object["metadata"]["uid"] = json!("6b1b5c9e-0000-4000-8000-000000000001");
    } else {
        object["metadata"]["name"] = json!("generated.18c3a7f1e2d4b5a6");
    }
    object
}

fn selector(pairs: &[(&str, &str)]) -> Selector {
    Selector::try_from(&LabelSelector {
        match_labels: Some(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        ),
        ..LabelSelector::default()
    })
    .unwrap()
}

/// The README's lab: node2 and node3 may hold `corp-fw`'s IP, namespace `payments` may use
/// it, pods labelled `app=api` do; `default/web-1` on node1 asks for it and is refused, and so
/// is namespace `other`.
fn lab() -> Snapshot {
    let mut snapshot = Snapshot::default();
    for (name, ip, egress) in [
        ("node1", [10, 0, 0, 1], false),
        ("node2", [10, 0, 0, 2], true),
        ("node3", [10, 0, 0, 3], true),
    ] {
        let node_labels = if egress {
            labels(&[("kubernetes.io/hostname", name), ("egress", "true")])
        } else {
            labels(&[("kubernetes.io/hostname", name)])
        };
        snapshot.nodes.insert(
            name.to_owned(),
            NodeInfo {
                name: name.to_owned(),
                labels: node_labels,
                ready: true,
                unschedulable: false,
                internal_ip: Some(ip.into()),
                pod_cidrs: Vec::new(),
            },
        );
    }
    for (name, pairs, annotation) in [
        ("payments", &[("team", "payments")][..], None),
        ("default", &[][..], None),
        ("other", &[][..], Some("corp-fw")),
    ] {
        snapshot.namespaces.insert(
            name.to_owned(),
            NamespaceInfo {
                name: name.to_owned(),
                labels: labels(pairs),
                gateway_annotation: annotation.map(str::to_owned),
            },
        );
    }
    snapshot.gateways.insert(
        "corp-fw".to_owned(),
        Gateway {
            name: "corp-fw".to_owned(),
            egress_ips: vec![[10, 99, 0, 200].into()],
            node_selector: selector(&[("egress", "true")]),
            namespace_selector: selector(&[("team", "payments")]),
            pod_selector: Some(selector(&[("app", "api")])),
            destinations: vec!["0.0.0.0/0".parse().unwrap()],
            excluded: Vec::new(),
            failure_policy: FailurePolicy::FailClosed,
            announce: Default::default(),
        },
    );
    pod(&mut snapshot, "payments/api-1", "node1", None);
    pod(&mut snapshot, "payments/api-2", "node3", None);
    pod(&mut snapshot, "default/web-1", "node1", Some("corp-fw"));
    snapshot
}

/// A running pod, named `namespace/name`; labelled `app=api` unless it asks for a gateway.
fn pod(snapshot: &mut Snapshot, path: &str, node: &str, annotation: Option<&str>) {
    let (namespace, name) = path.split_once('/').unwrap();
    let app = if annotation.is_some() { "web" } else { "api" };
    let ip = [10, 244, 0, u8::try_from(snapshot.pods.len() + 1).unwrap()];
    snapshot.pods.insert(
        (namespace.to_owned(), name.to_owned()),
        PodInfo {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            labels: labels(&[("app", app)]),
            gateway_annotation: annotation.map(str::to_owned),
            node: Some(node.to_owned()),
            ip: Some(ip.into()),
            running: true,
            host_network: false,
        },
    );
}

/// A report of `plan`, made from `snapshot` with every node serving.
fn report_of(snapshot: &Snapshot, plan: NodePlan) -> Report {
    Report {
        snapshot: Arc::new(snapshot.clone()),
        plan,
        health: Health::default(),
        refused: BTreeMap::new(),
        lost: BTreeMap::new(),
    }
}

async fn publish(reporter: &mut Reporter, snapshot: &Snapshot) -> Published {
    let node = reporter.node.clone();
    let plan = plan(snapshot, &node, &PlanConfig::default());
    reporter.publish(&report_of(snapshot, plan)).await
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap()
}

#[tokio::test]
async fn holder_applies_the_whole_status_once() {
    let (mut reporter, mut server) = reporter("node2");
    let snapshot = lab();

    let published = publish(&mut reporter, &snapshot).await;
    let seen = server.take();
    assert_eq!(
        published,
        Published {
            statuses: 1,
            events: 0,
            failures: 0
        }
    );
    let [patch] = &seen[..] else {
        panic!("expected one request, got {seen:#?}");
    };
    assert_eq!(patch.method, "PATCH");
    assert_eq!(
        patch.path,
        "/apis/static-egress.io/v1alpha1/egressgateways/corp-fw/status"
    );
    // kube writes `?&force=true&fieldManager=...`: the order and the empty pair mean nothing.
    let mut query: Vec<&str> = patch.query.split('&').filter(|p| !p.is_empty()).collect();
    query.sort_unstable();
    assert_eq!(query, ["fieldManager=static-egress", "force=true"]);
    assert_eq!(patch.content_type, "application/apply-patch+yaml");

    let mut body = patch.body.clone();
    let status = body["status"].take();
    assert_eq!(
        body,
        json!({
            "apiVersion": "static-egress.io/v1alpha1",
            "kind": "EgressGateway",
            "metadata": {"name": "corp-fw"},
            "status": null,
        })
    );
    assert_eq!(
        status["holders"],
        json!([{"ip": "10.99.0.200", "node": "node2"}])
    );
    assert_eq!(status["activeNodes"], "node2");
    assert_eq!(status["selectedPods"], 2);
    assert_eq!(
        status["rejectedPods"],
        json!([
            "default/web-1: namespace not admitted by namespaceSelector",
            "namespace other: namespace not admitted by namespaceSelector",
        ])
    );
    let ready = condition(&status, "Ready");
    assert_eq!(ready["status"], "True");
    assert_eq!(ready["reason"], "Held");
    assert_eq!(ready["message"], "10.99.0.200 on node2");
    let since = ready["lastTransitionTime"].as_str().unwrap();
    assert!(since.parse::<Timestamp>().is_ok(), "{since}");
    let conflicts = condition(&status, "Conflicts");
    assert_eq!(conflicts["status"], "True");
    assert_eq!(conflicts["reason"], "AnnotationsRefused");
    assert_eq!(
        conflicts["message"],
        "2 annotation(s) naming this gateway refused, see rejectedPods"
    );

    assert_eq!(
        publish(&mut reporter, &snapshot).await,
        Published::default()
    );
    assert!(server.take().is_empty(), "same state, no write");
}

#[tokio::test]
async fn only_the_writer_patches() {
    let snapshot = lab();
    for node in ["node1", "node3"] {
        let (mut reporter, mut server) = reporter(node);
        publish(&mut reporter, &snapshot).await;
        assert!(
            server.take().iter().all(|s| s.method != "PATCH"),
            "{node} does not hold 10.99.0.200"
        );
    }
}

#[tokio::test]
async fn first_ready_node_reports_a_gateway_nobody_holds() {
    let mut snapshot = lab();
    for node in ["node2", "node3"] {
        snapshot.nodes.get_mut(node).unwrap().ready = false;
    }

    let (mut node2, mut node2_server) = reporter("node2");
    publish(&mut node2, &snapshot).await;
    assert!(node2_server.take().is_empty());

    let (mut node1, mut node1_server) = reporter("node1");
    publish(&mut node1, &snapshot).await;
    let written = patches(node1_server.take());
    let [patch] = &written[..] else {
        panic!("expected one status patch, got {written:#?}");
    };
    let status = &patch.body["status"];
    assert_eq!(status["holders"], json!([{"ip": "10.99.0.200"}]));
    assert!(status.get("activeNodes").is_none(), "{status}");
    let ready = condition(status, "Ready");
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "NoEligibleNode");
    assert_eq!(
        ready["message"],
        "no Ready node with an InternalIP matches nodeSelector; unheld: 10.99.0.200"
    );

    // node2 cannot hold the IP without an InternalIP, but it matches the nodeSelector, so it
    // watches every pod: it reports rather than node1, which only knows its own pods.
    let node2_info = snapshot.nodes.get_mut("node2").unwrap();
    node2_info.ready = true;
    node2_info.internal_ip = None;
    publish(&mut node1, &snapshot).await;
    assert!(patches(node1_server.take()).is_empty());
    publish(&mut node2, &snapshot).await;
    let written = patches(node2_server.take());
    let [patch] = &written[..] else {
        panic!("expected one status patch, got {written:#?}");
    };
    assert_eq!(
        condition(&patch.body["status"], "Ready")["reason"],
        "NoEligibleNode"
    );
}

fn patches(seen: Vec<Seen>) -> Vec<Seen> {
    seen.into_iter().filter(|s| s.method == "PATCH").collect()
}

#[tokio::test]
async fn transition_time_stays_while_the_condition_does() {
    let (mut reporter, mut server) = reporter("node2");
    let long_ago: Timestamp = "2020-01-01T00:00:00Z".parse().unwrap();
    reporter.conditions.insert(
        "corp-fw".to_owned(),
        vec![Condition {
            type_: "Ready".to_owned(),
            status: "True".to_owned(),
            reason: "Held".to_owned(),
            message: "10.99.0.200 on node3".to_owned(),
            last_transition_time: Time(long_ago),
            observed_generation: None,
        }],
    );

    publish(&mut reporter, &lab()).await;
    let seen = server.take();
    let status = &seen[0].body["status"];
    let ready = condition(status, "Ready");
    assert_eq!(ready["lastTransitionTime"], "2020-01-01T00:00:00Z");
    assert_eq!(ready["message"], "10.99.0.200 on node2");
    let conflicts = condition(status, "Conflicts");
    assert_ne!(conflicts["lastTransitionTime"], "2020-01-01T00:00:00Z");

    // A change elsewhere in the status is written, with the same times.
    let mut snapshot = lab();
    pod(&mut snapshot, "payments/api-3", "node3", None);
    publish(&mut reporter, &snapshot).await;
    let seen = server.take();
    let [patch] = &seen[..] else {
        panic!("expected one request, got {seen:#?}");
    };
    assert_eq!(patch.body["status"]["selectedPods"], 3);
    assert_eq!(
        patch.body["status"]["conditions"], status["conditions"],
        "no condition changed"
    );
}

#[tokio::test]
async fn failed_write_is_retried() {
    let (mut reporter, mut server) = reporter("node2");
    server.fail.store(true, Ordering::SeqCst);
    let published = publish(&mut reporter, &lab()).await;
    assert_eq!(published.failures, 1);
    assert_eq!(server.take().len(), 1);

    server.fail.store(false, Ordering::SeqCst);
    let published = publish(&mut reporter, &lab()).await;
    assert_eq!((published.statuses, published.failures), (1, 0));
    assert_eq!(server.take().len(), 1);
}

#[tokio::test]
async fn refused_local_pods_are_warned_once_while_refused() {
    let mut snapshot = lab();
    pod(&mut snapshot, "payments/report-1", "node1", Some("nope"));
    // Not this node's: node3 warns about it, not node1.
    pod(&mut snapshot, "default/web-2", "node3", Some("corp-fw"));
    let (mut reporter, mut server) = reporter("node1");

    let published = publish(&mut reporter, &snapshot).await;
    assert_eq!((published.statuses, published.events), (0, 2));
    let seen = server.take();
    let [web, report] = &seen[..] else {
        panic!("expected two events, got {seen:#?}");
    };
    assert_eq!(
        (web.method.as_str(), web.path.as_str()),
        ("POST", "/api/v1/namespaces/default/events")
    );
    assert_eq!(web.content_type, "application/json");
    assert_eq!(
        web.body["involvedObject"],
        json!({
            "apiVersion": "v1", "kind": "Pod", "namespace": "default", "name": "web-1",
            "uid": uid_of("web-1"),
        })
    );
    assert_eq!(web.body["metadata"]["namespace"], "default");
    assert_eq!(web.body["metadata"]["generateName"], "web-1.");
    assert_eq!(web.body["type"], "Warning");
    assert_eq!(web.body["reason"], "GatewayNotAdmitted");
    assert_eq!(
        web.body["message"],
        "static-egress.io/gateway names gateway corp-fw, whose namespaceSelector does not \
         admit namespace default: the pod's traffic does not use it"
    );
    assert_eq!(
        web.body["source"],
        json!({"component": "static-egress", "host": "node1"})
    );
    assert_eq!(web.body["reportingComponent"], "static-egress.io/agent");
    assert_eq!(web.body["reportingInstance"], "node1");
    assert_eq!(web.body["count"], 1);
    assert_eq!(web.body["firstTimestamp"], web.body["lastTimestamp"]);

    assert_eq!(report.path, "/api/v1/namespaces/payments/events");
    assert_eq!(report.body["involvedObject"]["name"], "report-1");
    assert_eq!(report.body["reason"], "UnknownGateway");
    assert_eq!(report.body["type"], "Warning");

    assert_eq!(
        publish(&mut reporter, &snapshot).await,
        Published::default()
    );
    assert!(server.take().is_empty(), "warned already");

    // Fixed, then broken again: a new warning.
    let mut fixed = snapshot.clone();
    fixed
        .pods
        .get_mut(&("default".to_owned(), "web-1".to_owned()))
        .unwrap()
        .gateway_annotation = None;
    publish(&mut reporter, &fixed).await;
    assert!(server.take().is_empty());
    publish(&mut reporter, &snapshot).await;
    let seen = server.take();
    let [again] = &seen[..] else {
        panic!("expected one event, got {seen:#?}");
    };
    assert_eq!(again.body["involvedObject"]["name"], "web-1");
}

#[tokio::test]
async fn new_holder_announces_the_move() {
    let before = lab();
    let mut after = lab();
    after.nodes.get_mut("node2").unwrap().ready = false;
    let (mut node2, mut node2_server) = reporter("node2");
    let (mut node3, mut node3_server) = reporter("node3");
    publish(&mut node2, &before).await;
    publish(&mut node3, &before).await;
    node2_server.take();
    assert!(node3_server.take().is_empty(), "no event at start-up");

    publish(&mut node2, &after).await;
    assert!(
        node2_server.take().is_empty(),
        "the old holder says nothing"
    );

    // While the move is under way, node3's plan still names node2: not a move, and no event
    // yet.
    let ip: Ipv4Addr = "10.99.0.200".parse().unwrap();
    let node2_ip = after.nodes["node2"].internal_ip.unwrap();
    let waiting = PlanConfig {
        moving: BTreeMap::from([(
            ip,
            Holder {
                node: "node2".into(),
                node_ip: node2_ip,
            },
        )]),
        ..PlanConfig::default()
    };
    node3
        .publish(&report_of(&after, plan(&after, "node3", &waiting)))
        .await;
    assert!(
        node3_server.take().iter().all(|s| s.method != "POST"),
        "an event before the move"
    );

    let published = publish(&mut node3, &after).await;
    assert_eq!((published.statuses, published.events), (1, 1));
    let seen = node3_server.take();
    let event = seen.iter().find(|s| s.method == "POST").unwrap();
    assert_eq!(event.path, "/api/v1/namespaces/default/events");
    assert_eq!(
        event.body["involvedObject"],
        json!({
            "apiVersion": "static-egress.io/v1alpha1", "kind": "EgressGateway", "name": "corp-fw",
            "uid": uid_of("corp-fw"),
        })
    );
    assert_eq!(event.body["metadata"]["namespace"], "default");
    assert_eq!(event.body["type"], "Normal");
    assert_eq!(event.body["reason"], "HolderChanged");
    assert_eq!(
        event.body["message"],
        "10.99.0.200 moved from node2 to node3: it is not Ready"
    );
    assert_eq!(event.body["reportingInstance"], "node3");
    let patch = seen.iter().find(|s| s.method == "PATCH").unwrap();
    assert_eq!(patch.body["status"]["activeNodes"], "node3");
    // The status says when and why too, as every node saw it (here node3, the new writer).
    let holder = &patch.body["status"]["holders"][0];
    assert_eq!(holder["node"], "node3");
    assert_eq!(holder["reason"], "from node2: it is not Ready");
    assert!(holder["since"].is_string(), "{holder}");

    assert_eq!(publish(&mut node3, &after).await, Published::default());
    assert!(node3_server.take().is_empty());
}

#[tokio::test]
async fn publish_can_run_on_any_worker_thread() {
    fn send<T: Send>(_: &T) {}
    let (mut reporter, _server) = reporter("node1");
    let snapshot = lab();
    let plan = plan(&snapshot, "node1", &PlanConfig::default());
    send(&reporter.publish(&report_of(&snapshot, plan)));
}

#[tokio::test]
async fn egress_ip_conflict_shows_on_both_gateways() {
    let mut snapshot = lab();
    let mut dup = snapshot.gateways["corp-fw"].clone();
    dup.name = "dup".to_owned();
    dup.pod_selector = None;
    snapshot.gateways.insert("dup".to_owned(), dup);
    let (mut reporter, mut server) = reporter("node2");

    publish(&mut reporter, &snapshot).await;
    let seen = server.take();
    let [kept, left_out, event] = &seen[..] else {
        panic!("expected two status patches and an event, got {seen:#?}");
    };
    let conflict = "gateway dup left out: egress IP 10.99.0.200 already belongs to gateway corp-fw";
    assert_eq!(kept.body["metadata"]["name"], "corp-fw");
    let conflicts = condition(&kept.body["status"], "Conflicts");
    assert_eq!(conflicts["reason"], "EgressIPConflict");
    assert_eq!(
        conflicts["message"],
        format!("{conflict}; 2 annotation(s) naming this gateway refused, see rejectedPods")
    );
    assert_eq!(condition(&kept.body["status"], "Ready")["status"], "True");

    // Nobody holds dup's IP for it: node2, Ready and watching every pod, reports it.
    assert_eq!(left_out.body["metadata"]["name"], "dup");
    let status = &left_out.body["status"];
    let ready = condition(status, "Ready");
    assert_eq!(
        (&ready["status"], &ready["reason"], &ready["message"]),
        (
            &json!("False"),
            &json!("EgressIPConflict"),
            &json!(conflict)
        )
    );
    assert_eq!(condition(status, "Conflicts")["message"], conflict);
    assert_eq!(status["selectedPods"], 0);

    // The writer of dup's status also says it on dup, once.
    assert_eq!(event.body["involvedObject"]["name"], "dup");
    assert_eq!(
        (
            &event.body["type"],
            &event.body["reason"],
            &event.body["message"]
        ),
        (
            &json!("Warning"),
            &json!("GatewayLeftOut"),
            &json!(conflict)
        )
    );
    publish(&mut reporter, &snapshot).await;
    assert!(server.take().is_empty(), "said twice");
}

#[tokio::test]
async fn a_gateway_nftables_refused_here_is_warned_about_once() {
    let snapshot = lab();
    let (mut reporter, mut server) = reporter("node2");
    let plan = plan(&snapshot, "node2", &PlanConfig::default());
    let refused = BTreeMap::from([(
        "corp-fw".to_owned(),
        "nftables refused the SNAT for 10.99.0.200 (no); it has no SNAT on this node".to_owned(),
    )]);
    let report = Report {
        refused,
        ..report_of(&snapshot, plan)
    };
    reporter.publish(&report).await;
    let events: Vec<Seen> = server
        .take()
        .into_iter()
        .filter(|s| s.method == "POST")
        .collect();
    let [event] = &events[..] else {
        panic!("expected one event, got {events:#?}");
    };
    assert_eq!(event.body["involvedObject"]["name"], "corp-fw");
    assert_eq!(event.body["reason"], "SNATRefused");
    assert_eq!(
        event.body["message"],
        "on node2: nftables refused the SNAT for 10.99.0.200 (no); it has no SNAT on this node"
    );
    reporter.publish(&report).await;
    assert!(server.take().is_empty(), "said twice");
}

#[tokio::test]
async fn an_egress_ip_lost_to_a_later_lease_claim_is_warned_about_once_by_the_loser() {
    let snapshot = lab();
    let (mut reporter, mut server) = reporter("node2");
    let lost = BTreeMap::from([("10.99.0.200".parse().unwrap(), "node3".to_owned())]);
    let config = PlanConfig {
        lost: lost.clone(),
        ..PlanConfig::default()
    };
    let plan = plan(&snapshot, "node2", &config);
    // The loser neither holds it nor sends its pods elsewhere than to the winner.
    assert!(plan.snat.is_empty());
    assert_eq!(
        plan.holders()
            .get(&"10.99.0.200".parse().unwrap())
            .map(String::as_str),
        Some("node3")
    );
    let report = Report {
        lost,
        ..report_of(&snapshot, plan)
    };
    reporter.publish(&report).await;
    let events: Vec<Seen> = server
        .take()
        .into_iter()
        .filter(|s| s.method == "POST" && s.body["reason"] == "LeaseLost")
        .collect();
    let [event] = &events[..] else {
        panic!("expected one event, got {events:#?}");
    };
    assert_eq!(event.body["involvedObject"]["name"], "corp-fw");
    assert_eq!(
        event.body["message"],
        "10.99.0.200 moved from node2 to node3: lease lost (node3 claimed its Lease after \
         node2, which let it go)"
    );
    reporter.publish(&report).await;
    assert!(
        server
            .take()
            .iter()
            .all(|s| s.body["reason"] != "LeaseLost"),
        "said twice"
    );
}

#[tokio::test]
async fn an_agent_that_starts_keeps_what_the_status_said_of_the_last_move() {
    let mut snapshot = lab();
    snapshot.nodes.get_mut("node2").unwrap().ready = false;
    let written = json!({
        "apiVersion": "static-egress.io/v1alpha1", "kind": "EgressGateway",
        "metadata": {"name": "corp-fw"},
        "spec": {"egressIPs": ["10.99.0.200"]},
        "status": {"holders": [{
            "ip": "10.99.0.200", "node": "node3", "since": "2026-12-02T10:00:00Z",
            "reason": "from node2: it is not Ready",
        }]},
    });
    // Every agent restarted: node3, which holds the IP and writes the status, starts afresh.
    let (mut node3, mut server) = reporter_with("node3", vec![written]);
    publish(&mut node3, &snapshot).await;
    let seen = server.take();
    let patch = seen.iter().find(|s| s.method == "PATCH").unwrap();
    let holder = &patch.body["status"]["holders"][0];
    assert_eq!(holder["node"], "node3");
    assert_eq!(holder["since"], "2026-12-02T10:00:00Z");
    assert_eq!(holder["reason"], "from node2: it is not Ready");
}
