//! The loop that wires sources, planner, data path and reports: load, plan, apply, report, and
//! again on every change of the objects (from the file or the cluster) and now and then to
//! repair drift. Errors are logged and the last applied data path stays; nothing here waits
//! on the API server.

use std::collections::{BTreeSet, HashSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ipnet::Ipv4Net;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::cni::install::{CniInstall, Installer};
use crate::datapath::{Check, Datapath, DatapathConfig, DatapathError, KernelLog};
pub use crate::membership::FailoverOptions;
use crate::membership::Membership;
use crate::plan::{self, NodePlan, PlanConfig};
use crate::report::audit::AuditTarget;
use crate::report::metrics::MetricsError;
use crate::report::node_status::{AppliedPlan, NodeStatus, NodeStatusError};
use crate::report::outputs::Outputs;
use crate::report::{Report, Reporter};
use crate::source::cni::{self, Announcements};
use crate::source::flows::FlowSync;
use crate::source::kube::ClusterSource;
use crate::source::leases::{self, LeaseOptions, Lost};
use crate::source::objects::Objects;
use crate::source::probes::Asks;
use crate::source::{Loaded, SourceError};

/// The status file is rewritten this often, ready or not; a failed apply is retried as often.
const REFRESH: Duration = Duration::from_secs(5);
/// A watch may fail this long (an API server restarting) before the agent stops saying it is
/// ready: its view may be missing changes by then.
const WATCH_GRACE: Duration = Duration::from_secs(30);
/// Between attempts to reach the API server at start.
const CONNECT_RETRY: Duration = Duration::from_secs(2);

pub struct AgentOptions {
    pub node: String,
    /// `None`: the cluster (in-cluster config or KUBECONFIG) is the source of truth.
    pub from_file: Option<PathBuf>,
    pub cluster_cidrs: Vec<Ipv4Net>,
    pub datapath: DatapathConfig,
    /// How often everything of ours is compared with the kernel and repaired (a deleted
    /// table or rule, a detached program, a re-created pod interface). It costs a route
    /// lookup per local pod and a listing of our nftables table.
    pub resync: Duration,
    pub failover: FailoverOptions,
    /// Holder Leases in cluster mode (see [`crate::source::leases`]): how long a claim stands,
    /// and the namespace (`None`: the client's, the ServiceAccount's in a pod).
    pub holder_lease: Duration,
    pub lease_namespace: Option<String>,
    /// Where to serve Prometheus metrics, `/healthz` and `/readyz` (`None`: nowhere).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Where to log each translated connection (`None`: nowhere), and how many lines may
    /// wait for a slow writer.
    pub audit_log: Option<(AuditTarget, usize)>,
    /// Where to install the CNI plugin (`None`: the operator does, or nobody).
    pub cni: Option<CniInstall>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("Kubernetes client configuration: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("the cluster source stopped")]
    SourceClosed,
    #[error("installing signal handlers: {0}")]
    Signal(#[source] std::io::Error),
    #[error(transparent)]
    Status(#[from] NodeStatusError),
    #[error("opening the probe socket: {0}")]
    Probes(#[source] std::io::Error),
    /// `cleanup --cni-conf-dir` could not take the plugin out.
    #[error("CNI plugin: {0}")]
    Cni(#[from] crate::cni::install::InstallError),
}

impl AgentError {
    /// Errors the user fixes by changing the command line or the objects file.
    pub fn is_input_error(&self) -> bool {
        matches!(self, AgentError::Source(_))
    }
}

/// Where the agent takes its objects from.
enum Mode {
    File(PathBuf),
    Cluster(kube::Client),
}

struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self, AgentError> {
        Ok(Self {
            terminate: signal(SignalKind::terminate()).map_err(AgentError::Signal)?,
            interrupt: signal(SignalKind::interrupt()).map_err(AgentError::Signal)?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}

pub async fn run(options: AgentOptions) -> Result<(), AgentError> {
    // In cluster mode the client comes first: the Node may ask the kernel programs to log,
    // which is settled when they load.
    let mode = match &options.from_file {
        Some(path) => Mode::File(path.clone()),
        None => Mode::Cluster(kube::Client::try_default().await?),
    };
    let mut datapath_config = options.datapath.clone();
    if datapath_config.kernel_log == KernelLog::Off
        && let Mode::Cluster(client) = &mode
    {
        datapath_config.kernel_log =
            crate::source::kube::kernel_log_asked(client, &options.node).await;
    }
    let mut datapath = Datapath::open(datapath_config).await?;
    let mut signals = Signals::new()?;
    let failover = options.failover.clone();
    let (asks, probe_asks) = watch::channel(Asks::default());
    let sync = FlowSync::new(&failover, datapath.mark());
    let handed_over = crate::source::flows::start(sync, datapath.held(), probe_asks.clone());
    datapath.restore_from(handed_over);
    let mut liveness = crate::source::probes::start(failover.probes.clone(), probe_asks)
        .map_err(AgentError::Probes)?;
    let mut agent = Agent {
        node: options.node.clone(),
        config: PlanConfig {
            cluster_cidrs: options.cluster_cidrs.clone(),
            ..PlanConfig::default()
        },
        membership: Membership::new(failover.clone(), asks),
        loaded: None,
        planned: None,
        applied: None,
        failure: None,
        again_soon: false,
        problems: Vec::new(),
        warnings: Vec::new(),
        reports: None,
        held: None,
        announced: Announcements::load(&options.datapath.state_dir),
        cni: options.cni.clone().map(Installer::new),
        outputs: Outputs::start(
            options.datapath.state_dir.clone(),
            options.datapath.bpffs.clone(),
            options.metrics_addr,
            options.audit_log.clone(),
        )
        .await?,
    };
    let mut lost: Option<watch::Receiver<Lost>> = None;
    let mut cni_calls = cni::listen(&options.datapath.state_dir);
    let mut objects = match mode {
        Mode::File(path) => {
            let (objects, loaded) = Objects::file(&path)?;
            tracing::info!(node = %options.node, file = %path.display(), "agent started");
            agent.loaded = Some(loaded);
            objects
        }
        Mode::Cluster(client) => {
            let Some(cluster) = connect(&client, &mut agent, &datapath, &mut signals).await? else {
                stopped();
                return Ok(());
            };
            tracing::info!(node = %options.node, "agent started; waiting for the cluster's objects");
            let leases = crate::source::leases::start(
                client.clone(),
                options.node.clone(),
                LeaseOptions::new(
                    options.lease_namespace.clone(),
                    &client,
                    options.holder_lease,
                ),
            );
            agent.held = Some(leases.held);
            lost = Some(leases.lost);
            agent.reports = Some(crate::report::spawn(Reporter::new(
                client,
                options.node.clone(),
            )));
            Objects::Cluster(cluster)
        }
    };
    let mut resync =
        tokio::time::interval_at(tokio::time::Instant::now() + options.resync, options.resync);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut refresh = tokio::time::interval_at(tokio::time::Instant::now() + REFRESH, REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Every probe interval: the node's own standing is as fresh as its peers'.
    let mut renew = tokio::time::interval(failover.probes.interval);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    // The first apply compares everything: an earlier agent's data path may have drifted
    // while none ran. It waits for the probes to settle (see `Membership::settled`).
    agent.membership.renew(&mut datapath)?;
    agent
        .reconcile(&mut datapath, &objects, Check::Everything)
        .await?;
    loop {
        tokio::select! {
            next = objects.next() => {
                agent.loaded = Some(next.ok_or(AgentError::SourceClosed)?);
                agent.reconcile(&mut datapath, &objects, Check::Changes).await?;
            }
            now_lost = leases::next_lost(&mut lost) => {
                let Some(now_lost) = now_lost else {
                    return Err(AgentError::SourceClosed);
                };
                agent.config.lost = now_lost;
                agent.reconcile(&mut datapath, &objects, Check::Changes).await?;
            }
            changed = liveness.changed() => {
                if changed.is_err() {
                    return Err(AgentError::SourceClosed);
                }
                let now = liveness.borrow_and_update().clone();
                if agent.membership.heard(now) {
                    agent.reconcile(&mut datapath, &objects, Check::Changes).await?;
                }
            }
            _ = renew.tick() => {
                if agent.membership.renew(&mut datapath)?
                    || agent.membership.due(&agent.node, &agent.config.health)
                {
                    agent.reconcile(&mut datapath, &objects, Check::Changes).await?;
                }
            }
            Some(call) = cni_calls.next() => {
                if agent.announced.take(&call.request) {
                    agent.reconcile(&mut datapath, &objects, Check::Changes).await?;
                }
                let applied = agent.applied.as_ref().map(|(plan, ..)| plan);
                let reply = cni::verdict(&call.request, applied, agent.failure.as_deref());
                call.answer(reply);
            }
            _ = resync.tick() => agent.reconcile(&mut datapath, &objects, Check::Everything).await?,
            _ = refresh.tick() => {
                if agent.failure.is_some() || agent.again_soon {
                    agent.reconcile(&mut datapath, &objects, Check::Everything).await?;
                } else {
                    agent.write_status(&datapath, &objects)?;
                }
            }
            () = signals.recv() => break,
        }
    }
    if failover.drain_on_stop {
        agent.drain(&mut datapath, &objects).await?;
    } else {
        agent.membership.stop(&mut datapath)?;
    }
    stopped();
    Ok(())
}

fn stopped() {
    tracing::info!("exiting; the data path stays in place (`static-egress cleanup` removes it)");
}

/// Starts the cluster source, retrying while the API server cannot be reached or does not
/// serve our resource yet: the pinned data path keeps working meanwhile and the status file
/// says why the agent is not ready (a crash loop would say less and help nothing). `None`
/// when told to stop first.
async fn connect(
    client: &kube::Client,
    agent: &mut Agent,
    datapath: &Datapath,
    signals: &mut Signals,
) -> Result<Option<ClusterSource>, AgentError> {
    loop {
        match crate::source::kube::start(client.clone(), agent.node.clone()).await {
            Ok(cluster) => return Ok(Some(cluster)),
            Err(error) => {
                tracing::warn!(%error, "cannot start watching the cluster; retrying");
                agent.failure = Some(error.to_string());
                agent.outputs.status(
                    NodeStatus::new(
                        &agent.node,
                        None,
                        (&datapath.counters(), datapath.guard()),
                        &[],
                        vec![format!("cannot start watching the cluster: {error}")],
                    ),
                    None,
                )?;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(CONNECT_RETRY) => {}
            () = signals.recv() => return Ok(None),
        }
    }
}

/// Reports what it has not reported yet: an editor's save may deliver the same file twice,
/// and the periodic resync must not repeat every warning.
fn report_new(seen: &mut Vec<String>, now: Vec<String>, report: impl Fn(&str)) {
    // A set: a node with thousands of pods may have thousands of messages.
    let before: HashSet<&str> = seen.iter().map(String::as_str).collect();
    for message in now.iter().filter(|m| !before.contains(m.as_str())) {
        report(message);
    }
    *seen = now;
}

struct Agent {
    node: String,
    config: PlanConfig,
    membership: Membership,
    /// The latest view of the objects; `None` until the cluster's first complete one.
    loaded: Option<Loaded>,
    planned: Option<NodePlan>,
    /// The last plan applied successfully, the digest of its objects and when.
    applied: Option<(NodePlan, u64, SystemTime)>,
    /// Why the last apply (or start) failed; cleared by a successful apply.
    failure: Option<String>,
    /// The last apply succeeded but left something to settle: apply again at the next refresh.
    again_soon: bool,
    problems: Vec<String>,
    warnings: Vec<String>,
    /// Where applied plans go to be reported to the cluster, off this loop.
    reports: Option<watch::Sender<Option<Arc<Report>>>>,
    /// In cluster mode, the egress IPs this node serves, for the Lease keeper.
    held: Option<watch::Sender<BTreeSet<Ipv4Addr>>>,
    /// What the CNI plugin said of the pods starting here.
    announced: Announcements,
    /// Keeps the CNI plugin installed, when asked to.
    cni: Option<Installer>,
    /// The status file, metrics and audit log.
    outputs: Outputs,
}

impl Agent {
    async fn reconcile(
        &mut self,
        datapath: &mut Datapath,
        objects: &Objects,
        check: Check,
    ) -> Result<(), AgentError> {
        let Some(loaded) = &self.loaded else {
            return self.write_status(datapath, objects);
        };
        self.membership
            .set_peers(plan::peers(&loaded.snapshot, &self.node));
        if self.membership.set_cordoned(&self.node, &loaded.snapshot) {
            // The kernel answers draining (or serving again) from now, not the next renewal.
            self.membership.renew(datapath)?;
        }
        if !self.membership.settled() {
            // Nothing is applied before the probes have had their chance: a starting node
            // would take its peers' egress IPs, or send to a node whose agent never ran. But
            // it answers theirs meanwhile.
            let node_ip = loaded
                .snapshot
                .nodes
                .get(&self.node)
                .and_then(|n| n.internal_ip);
            if let Some(ip) = node_ip
                && let Err(error) = datapath.answer_probes(ip).await
            {
                tracing::warn!(%error, "cannot answer probes yet");
            }
            return self.write_status(datapath, objects);
        }
        let now = loaded.problems.iter().map(ToString::to_string).collect();
        report_new(&mut self.problems, now, |m| tracing::warn!("{m}"));
        self.config.health = self.membership.health(&self.node);
        self.config.starting = self.announced.starting(&loaded.snapshot);
        self.config.moving.clear();
        let mut plan = plan::plan(&loaded.snapshot, &self.node, &self.config);
        if let Some((applied, ..)) = &self.applied {
            self.config.moving =
                self.membership
                    .moving(applied, &plan, &self.node, &self.config.health);
            if !self.config.moving.is_empty() {
                plan = plan::plan(&loaded.snapshot, &self.node, &self.config);
            }
        }
        if self.planned.as_ref() != Some(&plan) {
            crate::report::changes::log(self.planned.as_ref(), &plan, &self.config.health);
        }
        let started = std::time::Instant::now();
        match datapath.apply(&plan, check).await {
            Ok(applied) => {
                let moved =
                    self.applied.as_ref().map(|(a, ..)| a.holders()) != Some(plan.holders());
                if moved {
                    // How long a takeover took here, beyond the probes' detection time.
                    tracing::info!(took_ms = started.elapsed().as_millis(), "holders applied");
                }
                self.outputs
                    .applied(&loaded.snapshot, &plan, started.elapsed());
                report_new(&mut self.warnings, applied.warnings, |m| {
                    tracing::warn!("{m}")
                });
                if let Some(reports) = &self.reports {
                    // Replaces a report not yet sent: only the latest state matters.
                    reports.send_replace(Some(Arc::new(Report {
                        snapshot: Arc::clone(&loaded.snapshot),
                        plan: plan.clone(),
                        health: self.config.health.clone(),
                        refused: applied.refused,
                        lost: self.config.lost.clone(),
                    })));
                }
                if let Some(held) = &self.held {
                    leases::tell_held(held, plan.held_by(&self.node));
                }
                self.applied = Some((plan.clone(), loaded.digest, SystemTime::now()));
                self.membership.applied(datapath)?;
                self.failure = None;
                self.again_soon = applied.incomplete;
                if let Some(installer) = &mut self.cni {
                    installer.applied(check == Check::Everything);
                }
            }
            Err(e) => {
                tracing::error!("applying the plan failed, the previous data path stays: {e}");
                self.outputs.apply_failed(&e);
                self.failure = Some(format!("the last apply failed: {e}"));
            }
        }
        self.planned = Some(plan);
        self.write_status(datapath, objects)
    }

    /// Hands this node's egress IPs over: the kernel answers probes as draining at once, so
    /// the other nodes take them; this node serves on until they have, then lets go.
    async fn drain(
        &mut self,
        datapath: &mut Datapath,
        objects: &Objects,
    ) -> Result<(), AgentError> {
        tracing::info!("draining: handing the egress IPs of this node over");
        self.membership.drain(datapath)?;
        tokio::time::sleep(self.membership.options.handover()).await;
        self.reconcile(datapath, objects, Check::Changes).await
    }

    /// Why the agent is not ready; empty when it is.
    fn not_ready(&self, objects: &Objects) -> Vec<String> {
        let mut reasons = Vec::new();
        if self.loaded.is_none() {
            reasons.push("waiting for the first complete view of the cluster".to_owned());
        } else if !self.membership.settled() {
            reasons.push("waiting for the first answers to probes".to_owned());
        }
        reasons.extend(self.failure.clone());
        let now = SystemTime::now();
        for (watched, failing) in objects.watch_health().unwrap_or_default().failing {
            let failed_for = now.duration_since(failing.since).unwrap_or_default();
            if failed_for > WATCH_GRACE {
                reasons.push(format!(
                    "the watch of {watched} has failed for {}s: {}",
                    failed_for.as_secs(),
                    failing.error
                ));
            }
        }
        reasons
    }

    fn write_status(&self, datapath: &Datapath, objects: &Objects) -> Result<(), AgentError> {
        let applied = self.applied.as_ref().map(|(plan, digest, at)| AppliedPlan {
            plan,
            digest: *digest,
            at: *at,
        });
        let status = NodeStatus::new(
            &self.node,
            applied,
            (&datapath.counters(), datapath.guard()),
            &self.warnings,
            self.not_ready(objects),
        );
        Ok(self.outputs.status(status, objects.watch_health())?)
    }
}
