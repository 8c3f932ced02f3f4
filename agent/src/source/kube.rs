//! The cluster as the source: the agent watches the API server and publishes a new
//! [`Loaded`] whenever its view changes.
//!
//! What each agent watches, and why:
//!
//! - **`Node`: all.** Holder election needs every node's readiness, labels and InternalIP, and
//!   the cluster ranges that never go through a gateway include every node's pod CIDRs. Each
//!   Node is converted to the model's small `NodeInfo` as it arrives, so a 1,000-node cluster
//!   costs kilobytes, not the megabytes of full Node objects.
//! - **`Namespace`: all.** Gateways select namespaces by label and namespaces opt in by
//!   annotation. Namespaces are small and few.
//! - **`EgressGateway`: all.** Cluster-scoped and few. They are watched as untyped objects and
//!   validated one by one, so that one object the agent cannot read (say a `status` written by
//!   another agent version) is reported alone instead of failing the whole list and with it
//!   every update.
//! - **`Pod`: this node's, always** (`fieldSelector=spec.nodeName=<node>`): marking happens at
//!   the pod's interface, so only local pods matter for it. **All pods, only while this node may
//!   hold an egress IP** (its labels match some gateway's `nodeSelector`): the holder SNATs the
//!   pods of every node. That cluster-wide watch starts and stops as eligibility changes, so the
//!   API server streams every pod only to the few nodes that may need them. Eligibility ignores
//!   readiness on purpose: a node flapping Ready would otherwise re-list every pod each time,
//!   and a node that becomes Ready must be able to take over at once.
//!
//! Consistency: nothing is published until every active watch has finished its initial list
//! (including the cluster-wide pod watch when it starts), so the planner never sees a cluster
//! without, say, its gateways. A re-list (after `410 Gone` or a restarted watch) is buffered and
//! swapped in when complete, deleting what it no longer lists; until then that kind keeps its
//! previous view. Watch errors are logged and retried at once, then after at most a second (see
//! [`Retry`]), so an agent is current again within a second or two of the API server answering
//! after a restart; the data path stays as last programmed meanwhile, and [`WatchHealth`] says
//! which watches fail, since when, for the agent's readiness.
//!
//! Like the file source, an object that turns invalid keeps its last valid version and a new
//! invalid one is skipped; both are reported in [`Loaded::problems`] for as long as they last.
//! Updates that leave the model unchanged (a Node's heartbeat, a pod's container status) are
//! not published at all.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::stream::{BoxStream, StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, ApiResource, DynamicObject, ListParams};

use crate::datapath::KernelLog;
use kube::runtime::watcher::{self, Event};
use kube::{Client, Resource, ResourceExt as _};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch as latest};

use super::{Loaded, Problem, SourceError, fnv1a_64};
use crate::model::objects;
use crate::model::{
    EgressGateway, Gateway, Invalid, NamespaceInfo, NodeInfo, ObjectKey, PodInfo, Snapshot,
    gateway_from_object,
};

/// Checks that the API server answers and serves `EgressGateway`s, then starts watching it for
/// `node` and returns the views as they change.
///
/// The first [`Loaded`] arrives once every initial list is in; later ones whenever the view
/// changes, coalesced while the receiver has not taken the previous one (the channel holds at
/// most one, always the latest). Only this first check fails: a cluster without the CRD, or an
/// agent without access, is a deployment error worth one clear line; later API errors are
/// logged and retried, and the receiver simply waits. The watches stop when the receiver is
/// dropped.
pub async fn start(client: Client, node: String) -> Result<ClusterSource, SourceError> {
    let gateways = Api::<DynamicObject>::all_with(client.clone(), &gateway_resource());
    gateways
        .list(&ListParams::default().limit(1))
        .await
        .map_err(|error| match error {
            ::kube::Error::Api(status) if status.is_not_found() => SourceError::CrdMissing,
            error => SourceError::Cluster(error),
        })?;
    let (tx, updates) = mpsc::channel(1);
    let (health_tx, health) = latest::channel(WatchHealth::default());
    tokio::spawn(run(client, node, tx, health_tx));
    Ok(ClusterSource { updates, health })
}

/// The views of a started cluster source, and how its watches fare.
#[derive(Debug)]
pub struct ClusterSource {
    pub updates: mpsc::Receiver<Loaded>,
    pub health: latest::Receiver<WatchHealth>,
}

/// The watches that fail now: by what they watch, since when and the last error.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchHealth {
    pub failing: BTreeMap<&'static str, Failing>,
    /// Failures so far, by what is watched: each one starts the watch again.
    pub restarts: BTreeMap<&'static str, u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failing {
    pub since: SystemTime,
    pub error: String,
}

/// How long the API server may keep a watch open, and how long a watch may stay silent before
/// the client gives up on it: a server that hangs without closing the connection is noticed
/// within this time. API servers send bookmarks more often than this.
const WATCH_TIMEOUT_SECONDS: u32 = 60;

/// How watches retry after an error: after 100 ms, then doubling up to half a second, plus up
/// to half as much again so that a thousand agents do not retry in step; reset by every event
/// that arrives. A `410 Gone` lists again at once. kube's default grows to 30 s during an
/// outage and waits again after a 410, which left agents more than ten seconds behind an API
/// server that had long come back.
#[derive(Clone, Debug)]
pub struct Retry {
    next: Duration,
    /// Spreads the agents' retries; from the node's name, so it needs no randomness.
    spread: u64,
}

impl Retry {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_millis(500);

    pub fn new(node: &str) -> Self {
        Self {
            next: Self::FIRST,
            spread: fnv1a_64(node.as_bytes()),
        }
    }
}

impl Retry {
    /// How long to wait after the next error.
    fn after_error(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        self.spread = self
            .spread
            .wrapping_mul(0x0000_0100_0000_01b3)
            .rotate_left(17);
        base + base.mul_f64((self.spread % 512) as f64 / 1024.0)
    }

    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// `stream` with [`Retry`] applied: the error is handed on after the wait, so the watch is
/// polled again (and reconnects) only then.
pub(super) fn retrying<T: Send + 'static>(
    stream: BoxStream<'static, Result<T, watcher::Error>>,
    retry: Retry,
) -> BoxStream<'static, Result<T, watcher::Error>> {
    futures_util::stream::unfold((stream, retry), |(mut stream, mut retry)| async move {
        let item = stream.next().await?;
        match &item {
            Ok(_) => retry.reset(),
            // The watcher lists again on its next poll: the sooner the better.
            Err(watcher::Error::WatchError(status)) if status.code == 410 => {}
            Err(_) => tokio::time::sleep(retry.after_error()).await,
        }
        Some((item, (stream, retry)))
    })
    .boxed()
}

fn gateway_resource() -> ApiResource {
    ApiResource::erase::<EgressGateway>(&())
}

type Watch<T> = BoxStream<'static, Result<Event<Item<T>>, watcher::Error>>;

async fn run(
    client: Client,
    node: String,
    tx: mpsc::Sender<Loaded>,
    health: latest::Sender<WatchHealth>,
) {
    // kube's defaults but the timeout: consistent lists (served from the API server's watch
    // cache since Kubernetes 1.31, so 1,000 agents starting at once do not each read etcd) in
    // pages of 500, which bounds what one response holds before it is converted.
    let config = || watcher::Config::default().timeout(WATCH_TIMEOUT_SECONDS);
    let first_retry = Retry::new(&node);
    let retry = || first_retry.clone();
    let mut namespaces = watch(Api::all(client.clone()), config(), retry(), namespace_item);
    let mut nodes = watch(Api::all(client.clone()), config(), retry(), node_item);
    let gateway_api = Api::<DynamicObject>::all_with(client.clone(), &gateway_resource());
    let mut gateways = watch(gateway_api, config(), retry(), gateway_item);
    let local = config().fields(&format!("spec.nodeName={node}"));
    let mut local_pods = watch(Api::all(client.clone()), local, retry(), pod_item);
    let mut cluster_pods: Option<Watch<PodInfo>> = None;
    let health = &health;

    let mut view = View::new(node);
    let mut dirty = false;
    let mut published_once = false;
    loop {
        // Biased: events already received are applied before publishing, so a burst (or an
        // initial list) ends in one publication rather than one per object.
        tokio::select! {
            biased;
            () = tx.closed() => break,
            Some(event) = namespaces.next() => {
                dirty |= handle(&mut view.namespaces, event, "namespaces", health);
            }
            Some(event) = nodes.next() => dirty |= handle(&mut view.nodes, event, "nodes", health),
            Some(event) = gateways.next() => {
                dirty |= handle(&mut view.gateways, event, "egressgateways", health);
            }
            Some(event) = local_pods.next() => {
                dirty |= handle(&mut view.local_pods, event, "pods of this node", health);
            }
            Some(event) = next_event(&mut cluster_pods) => {
                if let Some(store) = &mut view.cluster_pods {
                    dirty |= handle(store, event, "pods of every node", health);
                }
            }
            permit = tx.reserve(), if dirty && view.synced() => {
                let Ok(permit) = permit else { break };
                let loaded = view.loaded();
                if !published_once {
                    published_once = true;
                    tracing::info!(
                        nodes = loaded.snapshot.nodes.len(),
                        namespaces = loaded.snapshot.namespaces.len(),
                        pods = loaded.snapshot.pods.len(),
                        gateways = loaded.snapshot.gateways.len(),
                        "first complete view from the API server"
                    );
                }
                tracing::debug!(digest = format_args!("{:016x}", loaded.digest), "view changed");
                permit.send(loaded);
                dirty = false;
            }
        }

        match (view.may_hold_egress_ip(), cluster_pods.is_some()) {
            (true, false) => {
                tracing::info!("this node may hold an egress IP: watching the pods of every node");
                cluster_pods = Some(watch(Api::all(client.clone()), config(), retry(), pod_item));
                view.cluster_pods = Some(Store::default());
            }
            (false, true) => {
                tracing::info!(
                    "this node may no longer hold an egress IP: watching only its own pods"
                );
                cluster_pods = None;
                view.cluster_pods = None;
                health.send_if_modified(|h| h.failing.remove("pods of every node").is_some());
                dirty = true;
            }
            _ => {}
        }
    }
    tracing::debug!("nobody listens to the cluster view any more; watches stopped");
}

/// A watch whose objects are converted as they arrive, so only the model's types are kept.
fn watch<K, T>(
    api: Api<K>,
    config: watcher::Config,
    retry: Retry,
    convert: fn(K) -> Item<T>,
) -> Watch<T>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    T: Send + 'static,
{
    let events = watcher::watcher(api, config)
        .map_ok(move |event| match event {
            Event::Apply(object) => Event::Apply(convert(object)),
            Event::Delete(object) => Event::Delete(convert(object)),
            Event::Init => Event::Init,
            Event::InitApply(object) => Event::InitApply(convert(object)),
            Event::InitDone => Event::InitDone,
        })
        .boxed();
    retrying(events, retry)
}

/// The cluster-wide pod watch's next event; never, while it is not running.
async fn next_event<T>(
    watch: &mut Option<Watch<T>>,
) -> Option<Result<Event<Item<T>>, watcher::Error>> {
    match watch {
        Some(watch) => watch.next().await,
        None => future::pending().await,
    }
}

fn handle<T: Model>(
    store: &mut Store<T>,
    event: Result<Event<Item<T>>, watcher::Error>,
    watched: &'static str,
    health: &latest::Sender<WatchHealth>,
) -> bool {
    match event {
        Ok(event) => {
            health.send_if_modified(|h| h.failing.remove(watched).is_some());
            store.handle(event)
        }
        Err(error) => {
            tracing::warn!(
                watch = watched,
                %error,
                "watching the API server failed; retrying, the last view stays"
            );
            health.send_modify(|h| {
                *h.restarts.entry(watched).or_default() += 1;
                let failing = h.failing.entry(watched).or_insert_with(|| Failing {
                    since: SystemTime::now(),
                    error: String::new(),
                });
                failing.error = error.to_string();
            });
            false
        }
    }
}

/// One object as converted on arrival: its identity and its model value, or why it has none.
struct Item<T> {
    id: ObjectKey,
    value: Result<T, Vec<Invalid>>,
}

fn cluster_id(kind: &str, name: String) -> ObjectKey {
    ObjectKey {
        kind: kind.to_owned(),
        namespace: None,
        name,
    }
}

/// The annotation by which a Node asks its agent's kernel programs to log (`debug`, ...).
pub const KERNEL_LOG_ANNOTATION: &str = "static-egress.io/kernel-log";

/// What `node`'s [`KERNEL_LOG_ANNOTATION`] asks for: off when it is absent or unreadable, or
/// when the API server does not answer within 2 s (the agent must not wait to start).
pub async fn kernel_log_asked(client: &Client, node: &str) -> KernelLog {
    let nodes = Api::<Node>::all(client.clone());
    let asked =
        match tokio::time::timeout(Duration::from_secs(2), nodes.get_metadata_opt(node)).await {
            Ok(Ok(Some(meta))) => meta
                .metadata
                .annotations
                .and_then(|a| a.get(KERNEL_LOG_ANNOTATION).cloned()),
            _ => None,
        };
    let Some(asked) = asked else {
        return KernelLog::Off;
    };
    <KernelLog as clap::ValueEnum>::from_str(&asked, true).unwrap_or_else(|_| {
        tracing::warn!(
            annotation = KERNEL_LOG_ANNOTATION,
            value = asked,
            "not a kernel log level (off, error, warn, info, debug, trace): off"
        );
        KernelLog::Off
    })
}

/// What `static-egress explain` needs to know of one pod, read once: the namespaces, nodes and
/// gateways, and the pod itself (not the other pods: a cluster may have a hundred thousand).
pub async fn view_of_pod(
    client: Client,
    namespace: &str,
    pod: &str,
) -> Result<Loaded, kube::Error> {
    let mut view = View::new(String::new());
    let all = ListParams::default();
    for raw in Api::<Namespace>::all(client.clone())
        .list(&all)
        .await?
        .items
    {
        view.namespaces.handle(Event::Apply(namespace_item(raw)));
    }
    for raw in Api::<Node>::all(client.clone()).list(&all).await?.items {
        view.nodes.handle(Event::Apply(node_item(raw)));
    }
    let gateways = Api::<DynamicObject>::all_with(client.clone(), &gateway_resource());
    for raw in gateways.list(&all).await?.items {
        view.gateways.handle(Event::Apply(gateway_item(raw)));
    }
    if let Some(raw) = Api::<Pod>::namespaced(client, namespace)
        .get_opt(pod)
        .await?
    {
        view.local_pods.handle(Event::Apply(pod_item(raw)));
    }
    Ok(view.loaded())
}

fn namespace_item(raw: Namespace) -> Item<NamespaceInfo> {
    let id = cluster_id(NamespaceInfo::KIND, raw.name_any());
    let value = Ok(objects::namespace(&id, raw));
    Item { id, value }
}

fn node_item(raw: Node) -> Item<NodeInfo> {
    let id = cluster_id(NodeInfo::KIND, raw.name_any());
    let value = objects::node(&id, raw);
    Item { id, value }
}

fn pod_item(raw: Pod) -> Item<PodInfo> {
    let id = ObjectKey {
        kind: PodInfo::KIND.to_owned(),
        namespace: Some(raw.namespace().unwrap_or_default()),
        name: raw.name_any(),
    };
    let value = objects::pod(&id, raw);
    Item { id, value }
}

fn gateway_item(raw: DynamicObject) -> Item<Gateway> {
    let id = cluster_id(Gateway::KIND, raw.name_any());
    let schema = |error: serde_json::Error| {
        vec![Invalid::Schema {
            kind: Gateway::KIND.to_owned(),
            message: error.to_string(),
        }]
    };
    let value = serde_json::to_value(raw)
        .and_then(|mut value| {
            // Agents write the status and never act on it, so it must not spoil the spec.
            if let Some(object) = value.as_object_mut() {
                object.remove("status");
            }
            serde_json::from_value::<EgressGateway>(value)
        })
        .map_err(schema)
        .and_then(|object| gateway_from_object(&object).map_err(|error| error.problems));
    Item { id, value }
}

/// A model type as kept by a [`Store`], keyed as in [`Snapshot`].
trait Model: Clone + Debug + PartialEq {
    const KIND: &'static str;
    type Key: Ord + Clone;
    fn key(id: &ObjectKey) -> Self::Key;
}

impl Model for NamespaceInfo {
    const KIND: &'static str = "Namespace";
    type Key = String;
    fn key(id: &ObjectKey) -> String {
        id.name.clone()
    }
}

impl Model for NodeInfo {
    const KIND: &'static str = "Node";
    type Key = String;
    fn key(id: &ObjectKey) -> String {
        id.name.clone()
    }
}

impl Model for Gateway {
    const KIND: &'static str = "EgressGateway";
    type Key = String;
    fn key(id: &ObjectKey) -> String {
        id.name.clone()
    }
}

impl Model for PodInfo {
    const KIND: &'static str = "Pod";
    type Key = (String, String);
    fn key(id: &ObjectKey) -> (String, String) {
        (id.namespace.clone().unwrap_or_default(), id.name.clone())
    }
}

#[derive(Clone, Debug, PartialEq)]
struct Kept<T> {
    value: T,
    /// Of the value's `Debug` text, which is deterministic for the model's types (ordered
    /// maps, vectors); the digest needs no more than that.
    hash: u64,
}

impl<T: Debug> Kept<T> {
    fn new(value: T) -> Self {
        let hash = fnv1a_64(format!("{value:?}").as_bytes());
        Self { value, hash }
    }
}

/// One kind's view: the last valid version of each object, and what is wrong with the others.
struct Store<T: Model> {
    objects: BTreeMap<T::Key, Kept<T>>,
    problems: BTreeMap<T::Key, Vec<Problem>>,
    /// Wrapping sum of the objects' hashes: kept up to date per event, so a publication does
    /// not rehash thousands of pods.
    digest: u64,
    /// Between `Init` and `InitDone`: the (re)list so far, swapped in whole at `InitDone`.
    listing: Option<Vec<Item<T>>>,
    /// The first list is complete.
    synced: bool,
}

impl<T: Model> Default for Store<T> {
    fn default() -> Self {
        Self {
            objects: BTreeMap::new(),
            problems: BTreeMap::new(),
            digest: 0,
            listing: None,
            synced: false,
        }
    }
}

impl<T: Model> Store<T> {
    /// Applies one event; `true` when the view (objects or problems) changed.
    fn handle(&mut self, event: Event<Item<T>>) -> bool {
        match event {
            Event::Init => {
                self.listing = Some(Vec::new());
                false
            }
            Event::InitApply(item) => {
                self.listing.get_or_insert_with(Vec::new).push(item);
                false
            }
            Event::InitDone => self.swap_in_listing(),
            Event::Apply(item) => self.apply(item),
            Event::Delete(item) => {
                let key = T::key(&item.id);
                let problems = self.problems.remove(&key).is_some();
                let object = self.objects.remove(&key);
                if let Some(old) = &object {
                    self.digest = self.digest.wrapping_sub(old.hash);
                }
                problems || object.is_some()
            }
        }
    }

    fn apply(&mut self, item: Item<T>) -> bool {
        let key = T::key(&item.id);
        match item.value {
            Ok(value) => {
                let problems = self.problems.remove(&key).is_some();
                if self.objects.get(&key).is_some_and(|old| old.value == value) {
                    return problems;
                }
                let new = Kept::new(value);
                self.digest = self.digest.wrapping_add(new.hash);
                if let Some(old) = self.objects.insert(key, new) {
                    self.digest = self.digest.wrapping_sub(old.hash);
                }
                true
            }
            Err(invalid) => {
                let problems = report(&item.id, &invalid, self.objects.contains_key(&key));
                self.problems.insert(key, problems.clone()) != Some(problems)
            }
        }
    }

    fn swap_in_listing(&mut self) -> bool {
        let mut objects = BTreeMap::new();
        let mut problems = BTreeMap::new();
        for item in self.listing.take().unwrap_or_default() {
            let key = T::key(&item.id);
            match item.value {
                Ok(value) => {
                    let kept = match self.objects.get(&key) {
                        // Keeps the hash instead of formatting the value again.
                        Some(old) if old.value == value => old.clone(),
                        _ => Kept::new(value),
                    };
                    objects.insert(key, kept);
                }
                Err(invalid) => {
                    let previous = self.objects.get(&key).cloned();
                    problems.insert(key.clone(), report(&item.id, &invalid, previous.is_some()));
                    if let Some(previous) = previous {
                        objects.insert(key, previous);
                    }
                }
            }
        }
        let changed = !self.synced || objects != self.objects || problems != self.problems;
        self.digest = objects
            .values()
            .fold(0, |sum: u64, kept| sum.wrapping_add(kept.hash));
        self.objects = objects;
        self.problems = problems;
        self.synced = true;
        changed
    }

    fn values(&self) -> BTreeMap<T::Key, T> {
        self.objects
            .iter()
            .map(|(key, kept)| (key.clone(), kept.value.clone()))
            .collect()
    }
}

fn report(id: &ObjectKey, invalid: &[Invalid], kept: bool) -> Vec<Problem> {
    let outcome = if kept {
        "keeping its last valid version"
    } else {
        "skipped"
    };
    invalid
        .iter()
        .map(|problem| Problem {
            object: Some(id.clone()),
            message: format!("{id}: {problem}; {outcome}"),
        })
        .collect()
}

struct View {
    node: String,
    namespaces: Store<NamespaceInfo>,
    nodes: Store<NodeInfo>,
    gateways: Store<Gateway>,
    local_pods: Store<PodInfo>,
    /// Pods of every node, while this node may hold an egress IP; replaces `local_pods` then.
    cluster_pods: Option<Store<PodInfo>>,
}

impl View {
    fn new(node: String) -> Self {
        Self {
            node,
            namespaces: Store::default(),
            nodes: Store::default(),
            gateways: Store::default(),
            local_pods: Store::default(),
            cluster_pods: None,
        }
    }

    fn synced(&self) -> bool {
        self.namespaces.synced
            && self.nodes.synced
            && self.gateways.synced
            && self.local_pods.synced
            && self.cluster_pods.as_ref().is_none_or(|pods| pods.synced)
    }

    /// Undecided (`false`) until nodes and gateways are listed; the first publication waits
    /// for the cluster-wide pods when the answer turns out `true`.
    fn may_hold_egress_ip(&self) -> bool {
        if !(self.nodes.synced && self.gateways.synced) {
            return false;
        }
        self.nodes.objects.get(&self.node).is_some_and(|node| {
            self.gateways
                .objects
                .values()
                .any(|gateway| gateway.value.node_selector.matches(&node.value.labels))
        })
    }

    fn pods(&self) -> &Store<PodInfo> {
        self.cluster_pods.as_ref().unwrap_or(&self.local_pods)
    }

    fn loaded(&self) -> Loaded {
        let pods = self.pods();
        let mut problems = Vec::new();
        problems.extend(self.namespaces.problems.values().flatten().cloned());
        problems.extend(self.nodes.problems.values().flatten().cloned());
        problems.extend(pods.problems.values().flatten().cloned());
        problems.extend(self.gateways.problems.values().flatten().cloned());
        let digests = [
            self.namespaces.digest,
            self.nodes.digest,
            pods.digest,
            self.gateways.digest,
        ];
        Loaded {
            snapshot: Arc::new(Snapshot {
                namespaces: self.namespaces.values(),
                nodes: self.nodes.values(),
                pods: pods.values(),
                gateways: self.gateways.values(),
            }),
            problems,
            digest: fnv1a_64(&digests.map(u64::to_le_bytes).concat()),
        }
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use std::net::Ipv4Addr;

    use http::StatusCode;
    use serde_json::{Value, json};

    use super::*;
    use crate::testing::api_server::{
        Fake, Route, WITHIN, api_error, bookmark, corp_fw, event, events, fake_api, gateway, gone,
        list, namespace, node, page, pod,
    };
    use crate::testing::labels;

    fn node_info(n: u8, node_labels: &[(&str, &str)]) -> NodeInfo {
        NodeInfo {
            name: format!("node{n}"),
            labels: labels(node_labels),
            ready: true,
            unschedulable: false,
            internal_ip: Some(Ipv4Addr::new(10, 0, 0, n)),
            pod_cidrs: vec![format!("10.244.{n}.0/24").parse().unwrap()],
        }
    }

    fn pod_names(loaded: &Loaded) -> Vec<&str> {
        loaded
            .snapshot
            .pods
            .keys()
            .map(|(_, name)| name.as_str())
            .collect()
    }

    fn messages(loaded: &Loaded) -> Vec<&str> {
        loaded
            .problems
            .iter()
            .map(|problem| problem.message.as_str())
            .collect()
    }

    async fn started() -> (mpsc::Receiver<Loaded>, Fake) {
        let (client, fake) = fake_api();
        fake.reply(Route::Probe, list(Route::Probe, "40", vec![corp_fw()]));
        let rx = start(client, "node1".to_owned()).await.unwrap().updates;
        (rx, fake)
    }

    /// Namespaces at 10, nodes at 20 (node1 with `node1_labels`, node2 eligible), this node's
    /// pods at 30; the gateways' list (at 40) is left to the caller.
    fn initial_lists(fake: &Fake, node1_labels: Value) {
        fake.reply(
            Route::Namespaces,
            list(
                Route::Namespaces,
                "10",
                vec![
                    namespace("payments", json!({"team": "payments"})),
                    namespace("default", json!({})),
                ],
            ),
        );
        fake.reply(
            Route::Nodes,
            list(
                Route::Nodes,
                "20",
                vec![node(1, node1_labels), node(2, json!({"egress": "true"}))],
            ),
        );
        fake.reply(
            Route::LocalPods,
            list(Route::LocalPods, "30", vec![pod("api-1", 1, "10.244.1.5")]),
        );
    }

    fn gateway_list(fake: &Fake) {
        fake.reply(
            Route::Gateways,
            list(Route::Gateways, "40", vec![corp_fw()]),
        );
    }

    /// Started and synced with node1 not eligible.
    async fn synced() -> (mpsc::Receiver<Loaded>, Fake, Loaded) {
        let (mut rx, mut fake) = started().await;
        initial_lists(&fake, json!({}));
        gateway_list(&fake);
        let first = fake.next(&mut rx).await;
        (rx, fake, first)
    }

    #[tokio::test]
    async fn first_view_waits_for_every_list() {
        let (mut rx, mut fake) = started().await;
        initial_lists(&fake, json!({}));
        // The second request of each is its watch: those three lists are in.
        for route in [Route::Namespaces, Route::Nodes, Route::LocalPods] {
            fake.arrived(route, 2).await;
        }
        fake.quiet(&mut rx).await;

        gateway_list(&fake);
        let first = fake.next(&mut rx).await;
        let snapshot = &first.snapshot;
        assert_eq!(first.problems, []);
        assert_eq!(
            snapshot.nodes.values().cloned().collect::<Vec<_>>(),
            [node_info(1, &[]), node_info(2, &[("egress", "true")])]
        );
        assert_eq!(
            snapshot.namespaces["payments"],
            NamespaceInfo {
                name: "payments".into(),
                labels: labels(&[("team", "payments")]),
                gateway_annotation: None,
            }
        );
        assert_eq!(snapshot.namespaces.len(), 2);
        assert_eq!(
            snapshot.pods.values().cloned().collect::<Vec<_>>(),
            [PodInfo {
                namespace: "payments".into(),
                name: "api-1".into(),
                labels: labels(&[("app", "api")]),
                gateway_annotation: None,
                node: Some("node1".into()),
                ip: Some(Ipv4Addr::new(10, 244, 1, 5)),
                running: true,
                host_network: false,
            }]
        );
        let gateway = &snapshot.gateways["corp-fw"];
        assert_eq!(gateway.egress_ips, [Ipv4Addr::new(192, 0, 2, 200)]);
        assert!(
            gateway
                .node_selector
                .matches(&labels(&[("egress", "true")]))
        );
        // node1 cannot hold the egress IP: pods of other nodes are none of its business.
        fake.arrived(Route::Gateways, 2).await;
        assert_eq!(fake.count(Route::AllPods), 0);
    }

    #[tokio::test]
    async fn watch_events_update_the_view_and_no_op_updates_are_not_published() {
        let (mut rx, mut fake, first) = synced().await;

        // A new pod, then a bookmark the next watch must resume from.
        let added = event("ADDED", pod("api-2", 1, "10.244.1.6"), "31");
        fake.reply(
            Route::LocalPods,
            events("30", &[added, bookmark("Pod", "35")]),
        );
        let second = fake.next(&mut rx).await;
        assert_eq!(pod_names(&second), ["api-1", "api-2"]);
        assert_ne!(second.digest, first.digest);

        // A Node update that changes nothing the model keeps (an annotation) is not published:
        // once its watch is back (the event was consumed), the next view is the next change.
        let mut touched = node(2, json!({"egress": "true"}));
        touched["metadata"]["annotations"] = json!({"heartbeat": "now"});
        fake.reply(
            Route::Nodes,
            events("20", &[event("MODIFIED", touched, "21")]),
        );
        fake.arrived(Route::Nodes, 3).await;
        let default = namespace("default", json!({}));
        fake.reply(
            Route::Namespaces,
            events("10", &[event("DELETED", default.clone(), "11")]),
        );
        let third = fake.next(&mut rx).await;
        assert_eq!(third.snapshot.nodes, first.snapshot.nodes);
        assert_eq!(
            third.snapshot.namespaces.keys().collect::<Vec<_>>(),
            ["payments"]
        );

        // A pod's address changes.
        let moved = event("MODIFIED", pod("api-2", 1, "10.244.1.7"), "36");
        fake.reply(Route::LocalPods, events("35", &[moved]));
        let fourth = fake.next(&mut rx).await;
        let api_2 = &fourth.snapshot.pods[&("payments".to_owned(), "api-2".to_owned())];
        assert_eq!(api_2.ip, Some(Ipv4Addr::new(10, 244, 1, 7)));

        // Back to the first view: the digest depends on the content only.
        fake.reply(
            Route::Namespaces,
            events("11", &[event("ADDED", default, "12")]),
        );
        fake.next(&mut rx).await;
        let deleted = event("DELETED", pod("api-2", 1, "10.244.1.7"), "37");
        fake.reply(Route::LocalPods, events("36", &[deleted]));
        let back = fake.next(&mut rx).await;
        assert_eq!(back.snapshot, first.snapshot);
        assert_eq!(back.digest, first.digest);
    }

    #[tokio::test]
    async fn invalid_objects_keep_their_last_valid_version() {
        let (mut rx, mut fake, first) = synced().await;
        let good = first.snapshot.gateways["corp-fw"].clone();

        let mut broken = corp_fw();
        broken["spec"]
            .as_object_mut()
            .unwrap()
            .remove("namespaceSelector");
        fake.reply(
            Route::Gateways,
            events("40", &[event("MODIFIED", broken, "41")]),
        );
        let kept = fake.next(&mut rx).await;
        assert_eq!(kept.snapshot.gateways["corp-fw"], good);
        assert_eq!(
            messages(&kept),
            [
                "EgressGateway corp-fw: spec.namespaceSelector: is required (use {} to admit every namespace); keeping its last valid version"
            ]
        );
        assert_eq!(
            kept.problems[0].object.as_ref().map(ToString::to_string),
            Some("EgressGateway corp-fw".to_owned())
        );

        // New and invalid: skipped. Problems come namespaces, nodes, pods, gateways.
        let bad_pod = event("ADDED", pod("bad", 1, "nope"), "31");
        fake.reply(Route::LocalPods, events("30", &[bad_pod]));
        let skipped = fake.next(&mut rx).await;
        assert_eq!(pod_names(&skipped), ["api-1"]);
        assert_eq!(
            messages(&skipped),
            [
                r#"Pod payments/bad: status.podIPs[0].ip: "nope" is not an IP address; skipped"#,
                "EgressGateway corp-fw: spec.namespaceSelector: is required (use {} to admit every namespace); keeping its last valid version",
            ]
        );

        // A gateway the agent cannot even read is reported alone; the watch goes on.
        let unreadable = gateway(
            "typo",
            json!({"egressIPs": "192.0.2.9", "namespaceSelector": {}}),
        );
        fake.reply(
            Route::Gateways,
            events("41", &[event("ADDED", unreadable, "42")]),
        );
        let unread = fake.next(&mut rx).await;
        assert!(!unread.snapshot.gateways.contains_key("typo"));
        let message = messages(&unread)[2];
        assert!(
            message.starts_with(
                "EgressGateway typo: does not match the EgressGateway schema: invalid type: string"
            ) && message.ends_with("; skipped"),
            "{message}"
        );

        // Deleting an object deletes its kept version and its problems.
        let deleted = [
            event("DELETED", corp_fw(), "43"),
            event("DELETED", gateway("typo", json!({})), "44"),
        ];
        fake.reply(Route::Gateways, events("42", &deleted));
        let mut gone = fake.next(&mut rx).await;
        // The two deletions may be published apart.
        while !gone.snapshot.gateways.is_empty() || gone.problems.len() != 1 {
            gone = fake.next(&mut rx).await;
        }
        assert_eq!(
            messages(&gone),
            [r#"Pod payments/bad: status.podIPs[0].ip: "nope" is not an IP address; skipped"#]
        );
    }

    #[tokio::test]
    async fn gone_relists_without_publishing_half_a_view() {
        let (mut rx, mut fake, first) = synced().await;

        // 410 Gone: the watcher backs off and lists again, here in two pages.
        fake.reply(Route::Nodes, events("20", &[gone()]));
        let relabelled = node(1, json!({"zone": "b"}));
        fake.reply(
            Route::Nodes,
            page(Route::Nodes, "50", vec![relabelled], None, Some("page-2")),
        );
        // list, watch, page 1, page 2: page 1 has been consumed, page 2 is held back.
        fake.arrived(Route::Nodes, 4).await;

        // Other kinds still publish, with the nodes as they were before the re-list.
        fake.reply(
            Route::Namespaces,
            events("10", &[event("ADDED", namespace("extra", json!({})), "12")]),
        );
        let meanwhile = fake.next(&mut rx).await;
        assert_eq!(meanwhile.snapshot.nodes, first.snapshot.nodes);
        assert!(meanwhile.snapshot.namespaces.contains_key("extra"));

        // The last page completes the re-list: node2, not listed again, is deleted.
        fake.reply(
            Route::Nodes,
            page(
                Route::Nodes,
                "50",
                vec![node(3, json!({}))],
                Some("page-2"),
                None,
            ),
        );
        let relisted = fake.next(&mut rx).await;
        assert_eq!(
            relisted
                .snapshot
                .nodes
                .values()
                .cloned()
                .collect::<Vec<_>>(),
            [node_info(1, &[("zone", "b")]), node_info(3, &[])]
        );
        // And the watch resumes from the new list.
        fake.reply(Route::Nodes, events("50", &[]));
        fake.arrived(Route::Nodes, 6).await;
    }

    #[tokio::test]
    async fn pods_of_every_node_are_watched_while_this_node_may_hold_an_egress_ip() {
        let (mut rx, mut fake, first) = synced().await;
        assert_eq!(pod_names(&first), ["api-1"]);

        // node1 becomes eligible: the view waits for every pod before it is published.
        let eligible = node(1, json!({"egress": "true"}));
        fake.reply(
            Route::Nodes,
            events("20", &[event("MODIFIED", eligible, "21")]),
        );
        fake.arrived(Route::AllPods, 1).await;
        fake.quiet(&mut rx).await;
        let everywhere = vec![pod("api-1", 1, "10.244.1.5"), pod("api-3", 2, "10.244.2.5")];
        fake.reply(Route::AllPods, list(Route::AllPods, "60", everywhere));
        let holder = fake.next(&mut rx).await;
        assert_eq!(
            holder.snapshot.nodes["node1"].labels,
            labels(&[("egress", "true")])
        );
        assert_eq!(pod_names(&holder), ["api-1", "api-3"]);
        assert_eq!(holder.snapshot.pods.len(), 2);

        // A pod elsewhere changes: seen through the cluster-wide watch.
        let scaled = event("ADDED", pod("api-4", 2, "10.244.2.6"), "61");
        fake.reply(Route::AllPods, events("60", &[scaled]));
        let more = fake.next(&mut rx).await;
        assert_eq!(pod_names(&more), ["api-1", "api-3", "api-4"]);

        // No longer eligible: back to this node's pods, without waiting for anything.
        let plain = node(1, json!({}));
        fake.reply(
            Route::Nodes,
            events("21", &[event("MODIFIED", plain, "22")]),
        );
        let local = fake.next(&mut rx).await;
        assert_eq!(pod_names(&local), ["api-1"]);
        assert_eq!(local.snapshot, first.snapshot);
        assert_eq!(local.digest, first.digest);
    }

    #[tokio::test]
    async fn an_eligible_node_starts_with_every_pod() {
        let (mut rx, mut fake) = started().await;
        initial_lists(&fake, json!({"egress": "true"}));
        gateway_list(&fake);
        fake.arrived(Route::AllPods, 1).await;
        fake.quiet(&mut rx).await;
        let everywhere = vec![pod("api-1", 1, "10.244.1.5"), pod("api-3", 2, "10.244.2.5")];
        fake.reply(Route::AllPods, list(Route::AllPods, "60", everywhere));
        let first = fake.next(&mut rx).await;
        assert_eq!(pod_names(&first), ["api-1", "api-3"]);
    }

    #[tokio::test]
    async fn start_fails_without_the_crd_or_access() {
        let (client, fake) = fake_api();
        fake.reply(Route::Probe, api_error(StatusCode::NOT_FOUND, "NotFound"));
        let error = start(client, "node1".to_owned()).await.unwrap_err();
        assert!(matches!(error, SourceError::CrdMissing), "{error:?}");
        assert_eq!(
            error.to_string(),
            "the EgressGateway CustomResourceDefinition is not installed (`static-egress crd | kubectl apply -f -`)"
        );

        let (client, fake) = fake_api();
        fake.reply(Route::Probe, api_error(StatusCode::FORBIDDEN, "Forbidden"));
        let error = start(client, "node1".to_owned()).await.unwrap_err();
        assert!(matches!(error, SourceError::Cluster(_)), "{error:?}");
        assert!(
            error
                .to_string()
                .starts_with("cannot list EgressGateways from the Kubernetes API: "),
            "{error}"
        );
    }

    #[test]
    fn retries_come_fast_and_spread_and_start_over_after_success() {
        let mut retry = Retry::new("node1");
        let waits: Vec<Duration> = (0..6).map(|_| retry.after_error()).collect();
        let bounds = [100, 200, 400, 500, 500, 500].map(Duration::from_millis);
        for (wait, base) in waits.iter().zip(bounds) {
            assert!(*wait >= base && *wait < base * 3 / 2, "{waits:?}");
        }
        retry.reset();
        assert!(retry.after_error() < Duration::from_millis(150));
        // Another node waits differently.
        let mut other = Retry::new("node2");
        let theirs: Vec<Duration> = (0..6).map(|_| other.after_error()).collect();
        assert_ne!(waits, theirs);
    }

    #[tokio::test]
    async fn watches_stop_with_the_receiver() {
        let (rx, fake, _) = synced().await;
        drop(rx);
        // The server ends once the last client, held by the watches, is gone.
        tokio::time::timeout(WITHIN, fake.server)
            .await
            .expect("the watches are still running")
            .unwrap();
    }
}
