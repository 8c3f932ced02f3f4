//! A fake Kubernetes API server for the cluster source's tests: each request is answered with
//! the next reply scripted for its route, and checked against what that reply expects (a list
//! page or a watch from a resource version); and the objects and replies it serves.
#![expect(clippy::unwrap_used, reason = "a fake fails loudly")]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch as signal};
use tokio::task::{JoinError, JoinHandle};
use tower_test::mock::{Handle, SendResponse};

use crate::source::Loaded;

/// Generous: the re-list after `410 Gone` waits for kube's backoff (0.8 to 1.6 s).
pub const WITHIN: Duration = Duration::from_secs(10);
/// How long "nothing is published" is watched for; a publication takes well under 1 ms.
const QUIET: Duration = Duration::from_millis(200);

/// The requests the cluster source makes, told apart by path and query.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Route {
    /// `start`'s check that the API serves `EgressGateway`s.
    Probe,
    Namespaces,
    Nodes,
    Gateways,
    LocalPods,
    AllPods,
}

impl Route {
    fn of(request: &Request<Body>) -> Self {
        let query = query(request);
        match request.uri().path() {
            "/api/v1/namespaces" => Self::Namespaces,
            "/api/v1/nodes" => Self::Nodes,
            "/apis/static-egress.io/v1alpha1/egressgateways"
                if query.get("limit").map(String::as_str) == Some("1") =>
            {
                Self::Probe
            }
            "/apis/static-egress.io/v1alpha1/egressgateways" => Self::Gateways,
            "/api/v1/pods" if query.contains_key("fieldSelector") => Self::LocalPods,
            "/api/v1/pods" => Self::AllPods,
            _ => panic!("unexpected request {}", request.uri()),
        }
    }

    fn list_type(self) -> (&'static str, &'static str) {
        match self {
            Self::Namespaces => ("v1", "NamespaceList"),
            Self::Nodes => ("v1", "NodeList"),
            Self::Probe | Self::Gateways => ("static-egress.io/v1alpha1", "EgressGatewayList"),
            Self::LocalPods | Self::AllPods => ("v1", "PodList"),
        }
    }
}

/// The query as sent (still percent-encoded), so assertions show the wire format.
fn query(request: &Request<Body>) -> BTreeMap<String, String> {
    request
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect()
}

enum Expect {
    /// A list request, the continuation of page `continue_` if set.
    List { continue_: Option<&'static str> },
    /// A watch from this resource version.
    Watch { from: &'static str },
}

/// One scripted answer, and what the request it answers must be.
pub struct Reply {
    expect: Expect,
    status: StatusCode,
    body: String,
}

/// A whole list in one page.
pub fn list(route: Route, resource_version: &str, items: Vec<Value>) -> Reply {
    page(route, resource_version, items, None, None)
}

/// One page of a list; `continue_in` is the token the request must carry, `continue_out`
/// the one this page hands out.
pub fn page(
    route: Route,
    resource_version: &str,
    items: Vec<Value>,
    continue_in: Option<&'static str>,
    continue_out: Option<&str>,
) -> Reply {
    let (api_version, kind) = route.list_type();
    // As the API server sends them: list items carry neither apiVersion nor kind.
    let items: Vec<Value> = items
        .into_iter()
        .map(|mut item| {
            let object = item.as_object_mut().unwrap();
            object.remove("apiVersion");
            object.remove("kind");
            item
        })
        .collect();
    let mut metadata = json!({"resourceVersion": resource_version});
    if let Some(token) = continue_out {
        metadata["continue"] = json!(token);
    }
    Reply {
        expect: Expect::List {
            continue_: continue_in,
        },
        status: StatusCode::OK,
        body:
            json!({"apiVersion": api_version, "kind": kind, "metadata": metadata, "items": items})
                .to_string(),
    }
}

/// A watch response: the events, one JSON document per line, then the end of the stream
/// (as when `timeoutSeconds` runs out), after which the watcher watches again.
pub fn events(from: &'static str, events: &[Value]) -> Reply {
    Reply {
        expect: Expect::Watch { from },
        status: StatusCode::OK,
        body: events.iter().map(|event| format!("{event}\n")).collect(),
    }
}

pub fn event(kind: &str, mut object: Value, resource_version: &str) -> Value {
    object["metadata"]["resourceVersion"] = json!(resource_version);
    json!({"type": kind, "object": object})
}

pub fn bookmark(kind: &str, resource_version: &str) -> Value {
    json!({"type": "BOOKMARK", "object": {
        "apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": resource_version}
    }})
}

pub fn gone() -> Value {
    json!({"type": "ERROR", "object": {
        "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
        "message": "too old resource version: 20 (50)", "reason": "Expired", "code": 410
    }})
}

pub fn api_error(code: StatusCode, reason: &str) -> Reply {
    Reply {
        expect: Expect::List { continue_: None },
        status: code,
        body: json!({
            "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
            "message": reason, "reason": reason, "code": code.as_u16()
        })
        .to_string(),
    }
}

pub fn namespace(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "resourceVersion": "1", "labels": labels},
        "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
}

pub fn node(n: u8, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
    "metadata": {"name": format!("node{n}"), "resourceVersion": "1", "labels": labels},
    "spec": {"podCIDR": format!("10.244.{n}.0/24"), "podCIDRs": [format!("10.244.{n}.0/24")]},
    "status": {
        "conditions": [{"type": "Ready", "status": "True"}],
        "addresses": [
            {"type": "InternalIP", "address": format!("10.0.0.{n}")},
            {"type": "Hostname", "address": format!("node{n}")}
        ]
    }})
}

pub fn pod(name: &str, node: u8, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "payments", "resourceVersion": "1",
            "labels": {"app": "api"}},
        "spec": {"nodeName": format!("node{node}"), "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

pub fn gateway(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "static-egress.io/v1alpha1", "kind": "EgressGateway",
        "metadata": {"name": name, "resourceVersion": "1", "generation": 1},
        "spec": spec, "status": {"selectedPods": 1, "activeNodes": "node2"}})
}

pub fn corp_fw() -> Value {
    gateway(
        "corp-fw",
        json!({
            "egressIPs": ["192.0.2.200"],
            "nodeSelector": {"matchLabels": {"egress": "true"}},
            "namespaceSelector": {"matchLabels": {"team": "payments"}},
            "podSelector": {"matchLabels": {"app": "api"}}
        }),
    )
}

/// The API server: answers each request with the next reply scripted for its route, in
/// order, holding requests until there is one (as a quiet watch would), and asserting
/// that each request is what the reply expects.
pub struct Fake {
    script: mpsc::UnboundedSender<(Route, Reply)>,
    arrived: signal::Receiver<BTreeMap<Route, usize>>,
    /// Ends when every client is gone (a panic: a request the script did not expect).
    pub server: JoinHandle<()>,
}

impl Fake {
    fn new(handle: Handle<Request<Body>, Response<Body>>) -> Self {
        let (script, replies) = mpsc::unbounded_channel();
        let (counts, arrived) = signal::channel(BTreeMap::new());
        let server = tokio::spawn(serve(handle, replies, counts));
        Self {
            script,
            arrived,
            server,
        }
    }

    pub fn reply(&self, route: Route, reply: Reply) {
        self.script.send((route, reply)).unwrap();
    }

    pub async fn next(&mut self, rx: &mut mpsc::Receiver<Loaded>) -> Loaded {
        tokio::select! {
            loaded = tokio::time::timeout(WITHIN, rx.recv()) => {
                loaded.expect("no view published in time").expect("the source stopped")
            }
            end = &mut self.server => server_ended(end),
        }
    }

    pub async fn quiet(&mut self, rx: &mut mpsc::Receiver<Loaded>) {
        tokio::select! {
            loaded = tokio::time::timeout(QUIET, rx.recv()) => {
                assert!(loaded.is_err(), "published too early: {loaded:?}");
            }
            end = &mut self.server => server_ended(end),
        }
    }

    /// Waits until `count` requests have come for `route`: a watch request proves that
    /// the list before it was consumed to its end.
    pub async fn arrived(&mut self, route: Route, count: usize) {
        let wait = self
            .arrived
            .wait_for(|counts| counts.get(&route).copied().unwrap_or(0) >= count);
        tokio::select! {
            seen = tokio::time::timeout(WITHIN, wait) => {
                assert!(seen.expect("request did not come").is_ok());
            }
            end = &mut self.server => server_ended(end),
        }
    }

    pub fn count(&self, route: Route) -> usize {
        self.arrived.borrow().get(&route).copied().unwrap_or(0)
    }
}

/// Surfaces the server's failed assertion as the test's own panic.
fn server_ended(end: Result<(), JoinError>) -> ! {
    match end {
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        other => panic!("the fake API server ended: {other:?}"),
    }
}

async fn serve(
    mut handle: Handle<Request<Body>, Response<Body>>,
    mut script: mpsc::UnboundedReceiver<(Route, Reply)>,
    counts: signal::Sender<BTreeMap<Route, usize>>,
) {
    type Pending = (Request<Body>, SendResponse<Response<Body>>);
    let mut replies: HashMap<Route, VecDeque<Reply>> = HashMap::new();
    let mut requests: HashMap<Route, VecDeque<Pending>> = HashMap::new();
    loop {
        tokio::select! {
            request = handle.next_request() => {
                // Every client is gone: the source has stopped.
                let Some((request, send)) = request else { return };
                let route = Route::of(&request);
                requests.entry(route).or_default().push_back((request, send));
                counts.send_modify(|counts| *counts.entry(route).or_default() += 1);
            }
            Some((route, reply)) = script.recv() => {
                replies.entry(route).or_default().push_back(reply);
            }
        }
        for (route, waiting) in &mut requests {
            let scripted = replies.entry(*route).or_default();
            while !waiting.is_empty() && !scripted.is_empty() {
                let (request, send) = waiting.pop_front().unwrap();
                let reply = scripted.pop_front().unwrap();
                send.send_response(answer(*route, &request, reply));
            }
        }
    }
}

fn answer(route: Route, request: &Request<Body>, reply: Reply) -> Response<Body> {
    let uri = request.uri();
    let query = query(request);
    let get = |key: &str| query.get(key).map(String::as_str);
    assert_eq!(request.method(), http::Method::GET, "{uri}");
    let selector = (route == Route::LocalPods).then_some("spec.nodeName%3Dnode1");
    assert_eq!(get("fieldSelector"), selector, "{route:?}: {uri}");
    assert_eq!(get("labelSelector"), None, "{route:?}: {uri}");
    match reply.expect {
        Expect::List { continue_ } => {
            assert_eq!(get("watch"), None, "{route:?}: expected a list: {uri}");
            let limit = if route == Route::Probe { "1" } else { "500" };
            assert_eq!(get("limit"), Some(limit), "{route:?}: {uri}");
            assert_eq!(get("continue"), continue_, "{route:?}: {uri}");
            // A consistent list, never a possibly stale one from resourceVersion=0.
            assert_eq!(get("resourceVersion"), None, "{route:?}: {uri}");
        }
        Expect::Watch { from } => {
            assert_eq!(
                get("watch"),
                Some("true"),
                "{route:?}: expected a watch: {uri}"
            );
            assert_eq!(get("resourceVersion"), Some(from), "{route:?}: {uri}");
            assert_eq!(get("allowWatchBookmarks"), Some("true"), "{route:?}: {uri}");
        }
    }
    Response::builder()
        .status(reply.status)
        .body(Body::from(reply.body.into_bytes()))
        .unwrap()
}

pub fn fake_api() -> (Client, Fake) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), Fake::new(handle))
}
