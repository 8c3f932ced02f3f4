//! The loop that wires source, planner and data path: load, plan, apply, and again on every
//! change of the objects (from the file or the cluster) and now and then to repair drift such
//! as a re-created pod interface. Errors are logged and the last applied data path stays.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::Ipv4Net;
use serde::Serialize;
use tokio::signal::unix::{SignalKind, signal};

use crate::datapath::{Check, Datapath, DatapathConfig, DatapathError};
use crate::plan::{self, NodePlan, PlanConfig};
use crate::report::Reporter;
use crate::source::{FileSource, FileWatcher, Loaded, SourceError};

/// Counters in the status file are refreshed this often; a failed apply is retried as often.
const REFRESH: Duration = Duration::from_secs(5);

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
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("connecting to the Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("the cluster source stopped")]
    SourceClosed,
    #[error("installing signal handlers: {0}")]
    Signal(#[source] std::io::Error),
    #[error(
        "status file {path} is {age:?} old (more than {max_age:?}): the agent is not reconciling"
    )]
    Stale {
        path: PathBuf,
        age: Duration,
        max_age: Duration,
    },
    #[error("status file {path}: {source}")]
    Status {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl AgentError {
    /// Errors the user fixes by changing the command line or the objects file.
    pub fn is_input_error(&self) -> bool {
        matches!(self, AgentError::Source(_))
    }
}

/// Prints the plan for `node` (the `plan` subcommand).
pub fn print_plan(node: &str, file: &Path, cluster_cidrs: Vec<Ipv4Net>) -> Result<(), AgentError> {
    let (_, loaded) = FileSource::open(file)?;
    for problem in &loaded.problems {
        eprintln!("warning: {problem}");
    }
    print!(
        "{}",
        plan::plan(&loaded.snapshot, node, &PlanConfig { cluster_cidrs })
    );
    Ok(())
}

/// The `health` subcommand: the agent rewrites its status at least every `REFRESH`, so an old
/// file means a stuck or dead agent.
pub fn health(state_dir: &Path, max_age: Duration) -> Result<(), AgentError> {
    let path = state_dir.join("status.json");
    let err = |source| AgentError::Status {
        path: path.clone(),
        source,
    };
    let modified = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .map_err(err)?;
    let age = modified.elapsed().unwrap_or_default();
    if age > max_age {
        return Err(AgentError::Stale { path, age, max_age });
    }
    println!("ok: status written {}s ago", age.as_secs());
    Ok(())
}

/// Where the objects come from.
enum Objects {
    File {
        source: FileSource,
        changes: tokio::sync::mpsc::Receiver<()>,
        _watcher: FileWatcher,
    },
    Cluster {
        updates: tokio::sync::mpsc::Receiver<Loaded>,
    },
}

impl Objects {
    /// The next view of the objects; `None` when the source has stopped for good.
    async fn next(&mut self) -> Option<Loaded> {
        match self {
            Objects::File {
                source, changes, ..
            } => {
                changes.recv().await?;
                Some(source.reload())
            }
            Objects::Cluster { updates } => updates.recv().await,
        }
    }
}

pub async fn run(options: AgentOptions) -> Result<(), AgentError> {
    let mut datapath = Datapath::open(options.datapath.clone()).await?;
    let (mut objects, mut loaded, mut reporter) = match &options.from_file {
        Some(path) => {
            let (source, loaded) = FileSource::open(path)?;
            let (watcher, changes) = crate::source::watch(path)?;
            tracing::info!(node = %options.node, file = %path.display(), "agent started");
            (
                Objects::File {
                    source,
                    changes,
                    _watcher: watcher,
                },
                loaded,
                None,
            )
        }
        None => {
            let client = kube::Client::try_default().await?;
            let mut updates =
                crate::source::kube::start(client.clone(), options.node.clone()).await?;
            tracing::info!(node = %options.node, "agent started; waiting for the cluster's objects");
            // The first view arrives once every watch has listed: nothing half-synced is applied.
            let loaded = updates.recv().await.ok_or(AgentError::SourceClosed)?;
            let reporter = Reporter::new(client, options.node.clone());
            (Objects::Cluster { updates }, loaded, Some(reporter))
        }
    };
    let mut terminate = signal(SignalKind::terminate()).map_err(AgentError::Signal)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(AgentError::Signal)?;
    let mut resync =
        tokio::time::interval_at(tokio::time::Instant::now() + options.resync, options.resync);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut refresh = tokio::time::interval_at(tokio::time::Instant::now() + REFRESH, REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let config = PlanConfig {
        cluster_cidrs: options.cluster_cidrs.clone(),
    };
    let mut agent = Agent {
        node: options.node.clone(),
        state_dir: options.datapath.state_dir.clone(),
        planned: None,
        applied: None,
        failed: false,
        problems: Vec::new(),
        warnings: Vec::new(),
    };
    agent.report_problems(&loaded);
    // The first apply compares everything: an earlier agent's data path may have drifted
    // while none ran.
    agent
        .reconcile(
            &mut datapath,
            &loaded,
            &config,
            reporter.as_mut(),
            Check::Everything,
        )
        .await?;
    loop {
        tokio::select! {
            next = objects.next() => {
                loaded = next.ok_or(AgentError::SourceClosed)?;
                agent.report_problems(&loaded);
                agent.reconcile(&mut datapath, &loaded, &config, reporter.as_mut(), Check::Changes).await?;
            }
            _ = resync.tick() => agent.reconcile(&mut datapath, &loaded, &config, reporter.as_mut(), Check::Everything).await?,
            _ = refresh.tick() => {
                if agent.failed {
                    agent.reconcile(&mut datapath, &loaded, &config, reporter.as_mut(), Check::Everything).await?;
                } else {
                    agent.write_status(&datapath)?;
                }
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    tracing::info!("exiting; the data path stays in place (`static-egress cleanup` removes it)");
    Ok(())
}

/// Reports what it has not reported yet: an editor's save may deliver the same file twice,
/// and the periodic resync must not repeat every warning.
fn report_new(seen: &mut Vec<String>, now: Vec<String>, report: impl Fn(&str)) {
    for message in now.iter().filter(|m| !seen.contains(m)) {
        report(message);
    }
    *seen = now;
}

struct Agent {
    node: String,
    state_dir: PathBuf,
    planned: Option<NodePlan>,
    /// The last plan applied successfully and the digest of the file it came from.
    applied: Option<(NodePlan, u64)>,
    failed: bool,
    problems: Vec<String>,
    warnings: Vec<String>,
}

impl Agent {
    fn report_problems(&mut self, loaded: &Loaded) {
        let now = loaded.problems.iter().map(ToString::to_string).collect();
        report_new(&mut self.problems, now, |m| tracing::warn!("{m}"));
    }

    async fn reconcile(
        &mut self,
        datapath: &mut Datapath,
        loaded: &Loaded,
        config: &PlanConfig,
        reporter: Option<&mut Reporter>,
        check: Check,
    ) -> Result<(), AgentError> {
        let plan = plan::plan(&loaded.snapshot, &self.node, config);
        if self.planned.as_ref() != Some(&plan) {
            log_changes(self.planned.as_ref(), &plan);
        }
        match datapath.apply(&plan, check).await {
            Ok(applied) => {
                report_new(&mut self.warnings, applied.warnings, |m| {
                    tracing::warn!("{m}")
                });
                self.applied = Some((plan.clone(), loaded.digest));
                self.failed = false;
                self.write_status(datapath)?;
                if let Some(reporter) = reporter {
                    reporter
                        .publish(&loaded.snapshot, &plan, &applied.refused)
                        .await;
                }
            }
            Err(e) => {
                tracing::error!("applying the plan failed, the previous data path stays: {e}");
                self.failed = true;
            }
        }
        self.planned = Some(plan);
        Ok(())
    }

    fn write_status(&self, datapath: &Datapath) -> Result<(), AgentError> {
        match &self.applied {
            Some((plan, digest)) => write_status(
                &self.state_dir,
                &Status::new(plan, *digest, datapath, &self.warnings),
            ),
            None => Ok(()),
        }
    }
}

fn log_changes(old: Option<&NodePlan>, new: &NodePlan) {
    let holders = |p: &NodePlan| -> BTreeMap<Ipv4Addr, Option<String>> {
        p.gateways
            .iter()
            .flat_map(|g| {
                g.egress
                    .iter()
                    .map(|e| (e.ip, e.holder.as_ref().map(|h| h.node.clone())))
            })
            .collect()
    };
    let before = old.map(holders).unwrap_or_default();
    for (ip, holder) in holders(new) {
        if before.get(&ip) != Some(&holder) {
            match holder {
                Some(node) => tracing::info!(egress_ip = %ip, holder = %node, "egress IP holder"),
                None => tracing::warn!(egress_ip = %ip, "no eligible node holds the egress IP"),
            }
        }
    }
    let pods = |p: &NodePlan| -> BTreeMap<Ipv4Addr, String> {
        p.pods.iter().map(|x| (x.ip, x.gateway.clone())).collect()
    };
    let (before, after) = (old.map(pods).unwrap_or_default(), pods(new));
    for pod in &new.pods {
        if before.get(&pod.ip) != Some(&pod.gateway) {
            tracing::info!(pod = %format!("{}/{}", pod.namespace, pod.name), ip = %pod.ip, gateway = %pod.gateway, egress_ip = %pod.egress_ip, reason = ?pod.reason, "pod selected");
        }
    }
    for (ip, gateway) in before.iter().filter(|(ip, _)| !after.contains_key(ip)) {
        tracing::info!(ip = %ip, gateway = %gateway, "pod no longer selected");
    }
    let old_rejected = old.map(|p| p.rejected.as_slice()).unwrap_or_default();
    for r in new.rejected.iter().filter(|r| !old_rejected.contains(r)) {
        tracing::warn!("gateway annotation ignored: {r}");
    }
    let old_problems = old.map(|p| p.problems.as_slice()).unwrap_or_default();
    for p in new.problems.iter().filter(|p| !old_problems.contains(p)) {
        tracing::warn!("{p}");
    }
}

#[derive(Serialize)]
struct Status {
    node: String,
    /// FNV-1a 64 of the objects file applied, as 16 hex digits.
    applied_digest: String,
    applied_at_unix_ms: u128,
    gateways: Vec<GatewayStatus>,
    pods: Vec<PodStatus>,
    warnings: Vec<String>,
}

#[derive(Serialize)]
struct GatewayStatus {
    name: String,
    egress: Vec<(Ipv4Addr, Option<String>)>,
    packets: u64,
    bytes: u64,
    dropped: u64,
}

#[derive(Serialize)]
struct PodStatus {
    pod: String,
    ip: Ipv4Addr,
    gateway: String,
    egress_ip: Ipv4Addr,
}

impl Status {
    fn new(plan: &NodePlan, digest: u64, datapath: &Datapath, warnings: &[String]) -> Self {
        let counters = datapath.counters();
        Status {
            node: plan.node.clone(),
            applied_digest: format!("{digest:016x}"),
            applied_at_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or_default(),
            gateways: plan
                .gateways
                .iter()
                .map(|g| {
                    let c = counters.get(&g.id).copied().unwrap_or_default();
                    GatewayStatus {
                        name: g.name.clone(),
                        egress: g
                            .egress
                            .iter()
                            .map(|e| (e.ip, e.holder.as_ref().map(|h| h.node.clone())))
                            .collect(),
                        packets: c.packets,
                        bytes: c.bytes,
                        dropped: c.dropped,
                    }
                })
                .collect(),
            pods: plan
                .pods
                .iter()
                .map(|p| PodStatus {
                    pod: format!("{}/{}", p.namespace, p.name),
                    ip: p.ip,
                    gateway: p.gateway.clone(),
                    egress_ip: p.egress_ip,
                })
                .collect(),
            warnings: warnings.to_vec(),
        }
    }
}

fn write_status(dir: &Path, status: &Status) -> Result<(), AgentError> {
    let path = dir.join("status.json");
    let tmp = dir.join("status.json.tmp");
    let err = |source| AgentError::Status {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    let bytes = serde_json::to_vec_pretty(status).map_err(|e| err(std::io::Error::other(e)))?;
    std::fs::write(&tmp, bytes).map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)
}
