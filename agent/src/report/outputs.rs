//! This node's own outputs, told of every apply and every status: the status file, and when
//! asked for, the metrics endpoint and the NAT audit log. The loop hands them what happened;
//! each output decides what it keeps.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::watch;

use super::audit::{self, AuditTarget, AuditView};
use super::metrics::{Metrics, MetricsError};
use super::node_status::{NodeStatus, NodeStatusError};
use crate::datapath::DatapathError;
use crate::model::Snapshot;
use crate::plan::NodePlan;
use crate::source::kube::WatchHealth;

pub struct Outputs {
    state_dir: PathBuf,
    metrics: Option<Metrics>,
    audit: Option<watch::Sender<AuditView>>,
}

impl Outputs {
    /// The status file in `state_dir`; metrics served on `metrics_addr` (the kernel's
    /// counters read from the maps pinned under `bpffs`) and the audit log (with up to its
    /// `queue` of lines waiting for a slow writer), when asked for.
    pub async fn start(
        state_dir: PathBuf,
        bpffs: PathBuf,
        metrics_addr: Option<SocketAddr>,
        audit_log: Option<(AuditTarget, usize)>,
    ) -> Result<Self, MetricsError> {
        let audit_dropped = audit_log.as_ref().map(|_| Counter::default());
        let metrics = match metrics_addr {
            Some(addr) => {
                let metrics = Metrics::new(bpffs, audit_dropped.clone());
                metrics.clone().serve(addr).await?;
                Some(metrics)
            }
            None => None,
        };
        let audit = audit_log
            .zip(audit_dropped)
            .map(|((target, queue), dropped)| audit::start(target, queue, dropped));
        Ok(Self {
            state_dir,
            metrics,
            audit,
        })
    }

    /// `plan`, made from `snapshot`, went into the kernel in `took`.
    pub fn applied(&self, snapshot: &Snapshot, plan: &NodePlan, took: Duration) {
        if let Some(metrics) = &self.metrics {
            metrics.applied(plan, took);
        }
        if let Some(audit) = &self.audit {
            let view = AuditView::of(snapshot, plan);
            audit.send_if_modified(|old| std::mem::replace(old, view) != *old);
        }
    }

    pub fn apply_failed(&self, error: &DatapathError) {
        if let Some(metrics) = &self.metrics {
            metrics.apply_failed(error.step());
        }
    }

    /// Writes the status file, and hands the status to the metrics endpoint.
    pub fn status(
        &self,
        status: NodeStatus,
        watches: Option<WatchHealth>,
    ) -> Result<(), NodeStatusError> {
        status.write(&self.state_dir)?;
        if let Some(metrics) = &self.metrics {
            let restarts = watches.map(|w| w.restarts).unwrap_or_default();
            metrics.observe(status, restarts);
        }
        Ok(())
    }
}
