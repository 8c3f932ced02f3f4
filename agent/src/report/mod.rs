//! What the agent tells: the node's own status file ([`node_status`]), and the cluster each
//! `EgressGateway`'s status (written by one node per gateway, through server-side apply) and
//! events on refused pods and gateways and on holder changes. Nothing here is fatal: the data
//! path matters more than what we say about it, so failures are logged and retried on the next
//! publish. The cluster is told from a task of its own ([`spawn`]), with a timeout on every
//! call, so a slow API server never delays the data path.

pub mod audit;
pub mod changes;
mod events;
pub mod metrics;
pub mod node_status;
pub mod outputs;
mod status;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, Resource};
use serde_json::{Map, Value};
use tokio::sync::watch;

use crate::model::{EgressGateway, EgressGatewayStatus, Snapshot};
use crate::plan::{Health, NodePlan, why_moved};
use events::PodWarning;

/// How long one write to the API server may take before it counts as failed (and is tried
/// again on the next publish).
const API_TIMEOUT: Duration = Duration::from_secs(10);

/// Field manager of every status write: all nodes use the same one, so the node that takes
/// over a gateway's status replaces what the previous writer set instead of merging with it.
const FIELD_MANAGER: &str = "static-egress";

#[derive(Debug, thiserror::Error)]
enum ReportError {
    #[error("encoding the status of EgressGateway {gateway}: {source}")]
    Encode {
        gateway: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("writing the status of EgressGateway {gateway}: {source}")]
    Status {
        gateway: String,
        #[source]
        source: kube::Error,
    },
    #[error("creating event {reason} in namespace {namespace}: {source}")]
    Event {
        namespace: String,
        reason: String,
        #[source]
        source: kube::Error,
    },
    #[error("{what}: the API server did not answer within {API_TIMEOUT:?}")]
    Timeout { what: String },
}

/// One applied plan, what it was planned from, and the gateways this node could not program.
pub struct Report {
    pub snapshot: Arc<Snapshot>,
    pub plan: NodePlan,
    /// What the probes said when the plan was made: why holders moved.
    pub health: Health,
    pub refused: BTreeMap<String, String>,
    /// Egress IPs this node lost to a later Lease claim, by the node that claimed them.
    pub lost: BTreeMap<Ipv4Addr, String>,
}

/// Runs `reporter` on a task of its own and returns where to send it the latest [`Report`]:
/// a report not yet published when the next one comes is replaced by it (only the latest
/// state is worth saying), so a slow API server costs the agent nothing.
pub fn spawn(mut reporter: Reporter) -> watch::Sender<Option<Arc<Report>>> {
    let (tx, mut rx) = watch::channel::<Option<Arc<Report>>>(None);
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let latest = rx.borrow_and_update().clone();
            if let Some(report) = latest {
                reporter.publish(&report).await;
            }
        }
    });
    tx
}

/// `call` unless it takes longer than [`API_TIMEOUT`].
async fn within<T>(
    what: impl FnOnce() -> String,
    call: impl Future<Output = Result<T, ReportError>>,
) -> Result<T, ReportError> {
    tokio::time::timeout(API_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| Err(ReportError::Timeout { what: what() }))
}

/// What one [`Reporter::publish`] sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Published {
    /// Gateway statuses written.
    pub statuses: usize,
    /// Events created.
    pub events: usize,
    /// Writes that failed (logged; they are tried again on the next publish).
    pub failures: usize,
}

impl Published {
    fn failed(&mut self, error: &ReportError) {
        tracing::warn!(%error, "reporting to the cluster; will retry");
        self.failures += 1;
    }
}

/// Publishes the gateways' status and events for one node. It remembers what it wrote, so a
/// publish after every resync costs nothing when nothing changed.
pub struct Reporter {
    client: Client,
    node: String,
    /// The last conditions computed for each gateway, written or not, for their transition
    /// times: when this node becomes a gateway's writer it keeps the times it has seen.
    conditions: BTreeMap<String, Vec<Condition>>,
    /// The status last written for each gateway this node still writes; forgotten when
    /// another node takes over, since that node may have written something else since.
    written: BTreeMap<String, EgressGatewayStatus>,
    /// The holder of each egress IP at the last publish, per gateway.
    holders: BTreeMap<(String, Ipv4Addr), Option<String>>,
    /// When and why each egress IP moved last, for the statuses.
    moves: status::Moves,
    /// Whether `moves` started from what the statuses said (read once, at the first publish).
    seeded: bool,
    /// Warnings on local pods already published that still hold.
    warned: BTreeSet<PodWarning>,
    /// Warnings on gateways already published that still hold: (gateway, reason, message).
    gateways_warned: BTreeSet<(String, &'static str, String)>,
}

impl Reporter {
    pub fn new(client: Client, node: String) -> Self {
        Self {
            client,
            node,
            conditions: BTreeMap::new(),
            written: BTreeMap::new(),
            holders: BTreeMap::new(),
            moves: status::Moves::new(),
            seeded: false,
            warned: BTreeSet::new(),
            gateways_warned: BTreeSet::new(),
        }
    }

    /// Reports on an applied plan.
    pub async fn publish(&mut self, report: &Report) -> Published {
        let (snapshot, plan, health) = (&*report.snapshot, &report.plan, &report.health);
        let (refused, lost) = (&report.refused, &report.lost);
        let now = Timestamp::now();
        let mut published = Published::default();
        if !self.seeded {
            self.seeded = true;
            self.seed_moves().await;
        }
        status::track_moves(&mut self.moves, snapshot, plan, health, now);
        let writes = self
            .publish_statuses(snapshot, plan, now, &mut published)
            .await;
        self.warn_pods(plan, now, &mut published).await;
        self.warn_gateways(plan, &writes, refused, lost, now, &mut published)
            .await;
        self.announce_holders(snapshot, plan, health, now, &mut published)
            .await;
        published
    }

    /// Writes the statuses this node writes; returns the names of those gateways.
    async fn publish_statuses(
        &mut self,
        snapshot: &Snapshot,
        plan: &NodePlan,
        now: Timestamp,
        published: &mut Published,
    ) -> BTreeSet<String> {
        let mut conditions = BTreeMap::new();
        let mut writes_for = BTreeSet::new();
        for desired in status::desired(snapshot, plan, &self.moves) {
            let gateway = desired.gateway.clone();
            let writes = desired.writer.as_deref() == Some(self.node.as_str());
            let previous = self.conditions.get(&gateway).map_or(&[][..], Vec::as_slice);
            let status = desired.status(previous, now);
            conditions.insert(gateway.clone(), status.conditions.clone());
            if !writes {
                self.written.remove(&gateway);
                continue;
            }
            writes_for.insert(gateway.clone());
            match self.write_status(&gateway, status).await {
                Ok(true) => published.statuses += 1,
                Ok(false) => {}
                Err(error) => published.failed(&error),
            }
        }
        self.written
            .retain(|gateway, _| conditions.contains_key(gateway));
        self.conditions = conditions;
        writes_for
    }

    /// A Warning event on a gateway when it is left out of every plan (sent by the node that
    /// writes its status, the one node sure to say it once), when this node could not
    /// program its SNAT, or when it lost one of its egress IPs to another node's later Lease
    /// claim (the probes disagreed: that node counted this one out while others did not);
    /// once per situation while it lasts.
    async fn warn_gateways(
        &mut self,
        plan: &NodePlan,
        writes: &BTreeSet<String>,
        refused: &BTreeMap<String, String>,
        lost: &BTreeMap<Ipv4Addr, String>,
        now: Timestamp,
        published: &mut Published,
    ) {
        let left_out = plan
            .problems
            .iter()
            .filter(|p| writes.contains(p.gateway()))
            .map(|p| (p.gateway().to_owned(), "GatewayLeftOut", p.to_string()));
        let not_programmed = refused
            .iter()
            .map(|(g, why)| (g.clone(), "SNATRefused", format!("on {}: {why}", self.node)));
        let lease_lost = plan.gateways.iter().flat_map(|g| {
            g.egress.iter().filter_map(|e| {
                let winner = lost.get(&e.ip)?;
                Some((
                    g.name.clone(),
                    "LeaseLost",
                    format!(
                        "{} moved from {} to {winner}: lease lost ({winner} claimed its Lease \
                         after {}, which let it go)",
                        e.ip, self.node, self.node
                    ),
                ))
            })
        });
        let now_warned: BTreeSet<(String, &'static str, String)> =
            left_out.chain(not_programmed).chain(lease_lost).collect();
        self.gateways_warned.retain(|w| now_warned.contains(w));
        for warning in now_warned {
            if self.gateways_warned.contains(&warning) {
                continue;
            }
            let (gateway, reason, message) = &warning;
            let event = events::on_gateway(&self.node, gateway, "Warning", reason, message, now);
            match self.create_event(event).await {
                Ok(()) => {
                    published.events += 1;
                    self.gateways_warned.insert(warning);
                }
                Err(error) => published.failed(&error),
            }
        }
    }

    async fn warn_pods(&mut self, plan: &NodePlan, now: Timestamp, published: &mut Published) {
        let warnings = events::pod_warnings(plan);
        self.warned.retain(|w| warnings.binary_search(w).is_ok());
        for warning in warnings {
            if self.warned.contains(&warning) {
                continue;
            }
            match self.create_event(warning.event(&self.node, now)).await {
                Ok(()) => {
                    published.events += 1;
                    self.warned.insert(warning);
                }
                Err(error) => published.failed(&error),
            }
        }
    }

    /// Only the new holder speaks: it is the one node sure to see the change, and only once.
    async fn announce_holders(
        &mut self,
        snapshot: &Snapshot,
        plan: &NodePlan,
        health: &Health,
        now: Timestamp,
        published: &mut Published,
    ) {
        let mut holders = BTreeMap::new();
        for gateway in &plan.gateways {
            for egress in &gateway.egress {
                let key = (gateway.name.clone(), egress.ip);
                let holder = egress.holder.as_ref().map(|h| h.node.clone());
                let mut seen = holder.clone();
                if let Some(before) = self.holders.get(&key)
                    && *before != holder
                    && holder.as_deref() == Some(self.node.as_str())
                {
                    let why = before
                        .as_deref()
                        .map(|b| (b, why_moved(snapshot, &gateway.name, b, health)));
                    let event = events::holder_changed(
                        &self.node,
                        &gateway.name,
                        egress.ip,
                        why.as_ref().map(|(b, w)| (*b, w.as_str())),
                        now,
                    );
                    match self.create_event(event).await {
                        Ok(()) => published.events += 1,
                        Err(error) => {
                            published.failed(&error);
                            // Remembering the old holder makes the next publish try again.
                            seen.clone_from(before);
                        }
                    }
                }
                holders.insert(key, seen);
            }
        }
        self.holders = holders;
    }

    /// Starts the record of moves from the gateways' statuses; without them (the API server
    /// does not answer) the moves seen from now on are all the statuses will say.
    async fn seed_moves(&mut self) {
        let api = Api::<EgressGateway>::all(self.client.clone());
        let list = async {
            api.list(&ListParams::default())
                .await
                .map_err(|source| ReportError::Status {
                    gateway: "(all)".to_owned(),
                    source,
                })
        };
        match within(|| "reading the gateways' statuses".to_owned(), list).await {
            Ok(gateways) => status::seed_moves(&mut self.moves, &gateways.items),
            Err(error) => {
                tracing::warn!(%error, "the gateways' statuses will not say when and why their IPs moved before this agent started")
            }
        }
    }

    /// Applies `status` unless it is what this node last wrote; `Ok(true)` when it wrote.
    async fn write_status(
        &mut self,
        gateway: &str,
        status: EgressGatewayStatus,
    ) -> Result<bool, ReportError> {
        if self.written.get(gateway) == Some(&status) {
            return Ok(false);
        }
        let encoded = serde_json::to_value(&status).map_err(|source| ReportError::Encode {
            gateway: gateway.to_owned(),
            source,
        })?;
        let mut body = Map::new();
        body.insert(
            "apiVersion".to_owned(),
            EgressGateway::api_version(&()).into(),
        );
        body.insert("kind".to_owned(), EgressGateway::kind(&()).into());
        let mut metadata = Map::new();
        metadata.insert("name".to_owned(), gateway.into());
        body.insert("metadata".to_owned(), metadata.into());
        body.insert("status".to_owned(), encoded);
        let api = Api::<EgressGateway>::all(self.client.clone());
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let patch = Patch::Apply(Value::Object(body));
        let write = async {
            api.patch_status(gateway, &params, &patch)
                .await
                .map_err(|source| ReportError::Status {
                    gateway: gateway.to_owned(),
                    source,
                })
        };
        within(
            || format!("writing the status of EgressGateway {gateway}"),
            write,
        )
        .await?;
        tracing::info!(gateway, "EgressGateway status written");
        self.written.insert(gateway.to_owned(), status);
        Ok(true)
    }

    async fn create_event(&self, mut event: Event) -> Result<(), ReportError> {
        if event.involved_object.uid.is_none() {
            event.involved_object.uid = self.uid_of(&event.involved_object).await;
        }
        let namespace = event.metadata.namespace.clone().unwrap_or_default();
        let reason = event.reason.clone().unwrap_or_default();
        let api = Api::<Event>::namespaced(self.client.clone(), &namespace);
        let create = async {
            api.create(&PostParams::default(), &event)
                .await
                .map_err(|source| ReportError::Event {
                    namespace: namespace.clone(),
                    reason: reason.clone(),
                    source,
                })
        };
        within(|| format!("creating event {reason}"), create).await?;
        tracing::debug!(namespace, reason, "event created");
        Ok(())
    }

    /// The uid of the object an event is about, which `kubectl describe` looks events up by.
    /// Asked for when an event is made (they are few) rather than kept for every pod in the
    /// snapshot; an event about an object that cannot be read goes without it.
    async fn uid_of(&self, object: &ObjectReference) -> Option<String> {
        let name = object.name.as_deref()?;
        let read = async {
            let uid = match object.kind.as_deref()? {
                "Pod" => Api::<Pod>::namespaced(self.client.clone(), object.namespace.as_deref()?)
                    .get_metadata(name)
                    .await
                    .map(|m| m.metadata.uid),
                "EgressGateway" => Api::<EgressGateway>::all(self.client.clone())
                    .get_metadata(name)
                    .await
                    .map(|m| m.metadata.uid),
                _ => return None,
            };
            uid.map_err(|error| tracing::debug!(%error, name, "reading the uid for an event"))
                .ok()
                .flatten()
        };
        tokio::time::timeout(API_TIMEOUT, read).await.ok().flatten()
    }
}
