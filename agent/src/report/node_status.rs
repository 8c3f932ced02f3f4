//! The node's own status file, `<state-dir>/status.json`: what the agent applied and its
//! counters, whether it is ready and, if not, why. Written after every apply and every few
//! seconds, so its age tells a live agent from a stuck one; `static-egress health` reads it
//! for the DaemonSet's probes.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use static_egress_common::{Counters, Guard};

use crate::plan::NodePlan;

const FILE: &str = "status.json";

#[derive(Debug, thiserror::Error)]
pub enum NodeStatusError {
    #[error("status file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("status file {path} is not what an agent writes: {source}")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "status file {path} is {age:?} old (more than {max_age:?}): the agent is not reconciling"
    )]
    Stale {
        path: PathBuf,
        age: Duration,
        max_age: Duration,
    },
    #[error("the agent is not ready: {}", .0.join("; "))]
    NotReady(Vec<String>),
}

#[derive(Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: String,
    /// Every input the data path depends on is current and the last apply succeeded.
    pub ready: bool,
    /// Why not, when not ready.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ready: Vec<String>,
    /// FNV-1a 64 of the objects applied, as 16 hex digits; absent before the first apply.
    pub applied_digest: Option<String>,
    pub applied_at_unix_ms: Option<u128>,
    pub written_at_unix_ms: u128,
    pub gateways: Vec<GatewayStatus>,
    pub pods: Vec<PodStatus>,
    /// What the uplink programs did to keep selected traffic from leaving with another
    /// address than its pod's or an egress IP held here.
    pub guard: GuardStatus,
    pub warnings: Vec<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct GuardStatus {
    /// Packets of other nodes' pods marked on their way out through this node.
    pub transit: u64,
    /// Marked packets dropped because they would have left with another address.
    pub dropped: u64,
    /// Packets and ARP answers of egress IPs held here, dropped while the lease did not let
    /// this node serve (see "Failover" in the README).
    pub fenced: u64,
    /// Probes from other nodes answered by the kernel.
    pub probes: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct GatewayStatus {
    pub name: String,
    pub egress: Vec<(Ipv4Addr, Option<String>)>,
    pub packets: u64,
    pub bytes: u64,
    pub dropped: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PodStatus {
    pub pod: String,
    pub ip: Ipv4Addr,
    pub gateway: String,
    pub egress_ip: Ipv4Addr,
}

/// The last successful apply: its plan, the digest of its objects and when.
pub struct AppliedPlan<'a> {
    pub plan: &'a NodePlan,
    pub digest: u64,
    pub at: SystemTime,
}

fn unix_ms(time: SystemTime) -> u128 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default()
}

impl NodeStatus {
    /// `counters` are this node's, by gateway id; `not_ready` is empty when ready.
    pub fn new(
        node: &str,
        applied: Option<AppliedPlan<'_>>,
        (counters, guard): (&std::collections::BTreeMap<u32, Counters>, Guard),
        warnings: &[String],
        not_ready: Vec<String>,
    ) -> Self {
        let plan = applied.as_ref().map(|a| a.plan);
        let gateways = plan
            .iter()
            .flat_map(|p| &p.gateways)
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
            .collect();
        let pods = plan
            .iter()
            .flat_map(|p| &p.pods)
            .map(|p| PodStatus {
                pod: format!("{}/{}", p.namespace, p.name),
                ip: p.ip,
                gateway: p.gateway.clone(),
                egress_ip: p.egress_ip,
            })
            .collect();
        Self {
            node: node.to_owned(),
            ready: not_ready.is_empty(),
            not_ready,
            applied_digest: applied.as_ref().map(|a| format!("{:016x}", a.digest)),
            applied_at_unix_ms: applied.as_ref().map(|a| unix_ms(a.at)),
            written_at_unix_ms: unix_ms(SystemTime::now()),
            gateways,
            pods,
            guard: GuardStatus {
                transit: guard.transit,
                dropped: guard.dropped,
                fenced: guard.fenced,
                probes: guard.probes,
            },
            warnings: warnings.to_vec(),
        }
    }

    /// Written durably through a temporary file and a rename: a reader, or the node after a
    /// crash, sees the old or the new one, whole.
    pub fn write(&self, dir: &Path) -> Result<(), NodeStatusError> {
        let path = dir.join(FILE);
        let err = |source| NodeStatusError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(err)?;
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| err(std::io::Error::other(e)))?;
        crate::fsutil::write_atomically(&path, &bytes).map_err(err)
    }
}

/// The `health` subcommand: live when the agent wrote its status within `max_age` (it does at
/// least every few seconds, ready or not); ready when, besides, the status says so.
pub fn check(dir: &Path, max_age: Duration, ready: bool) -> Result<String, NodeStatusError> {
    let path = dir.join(FILE);
    let io = |source| NodeStatusError::Io {
        path: path.clone(),
        source,
    };
    let modified = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .map_err(io)?;
    let age = modified.elapsed().unwrap_or_default();
    if age > max_age {
        return Err(NodeStatusError::Stale { path, age, max_age });
    }
    if ready {
        let text = std::fs::read(&path).map_err(io)?;
        let status: NodeStatus =
            serde_json::from_slice(&text).map_err(|source| NodeStatusError::Unreadable {
                path: path.clone(),
                source,
            })?;
        if !status.ready {
            return Err(NodeStatusError::NotReady(status.not_ready));
        }
        return Ok(format!("ready: status written {}s ago", age.as_secs()));
    }
    Ok(format!("live: status written {}s ago", age.as_secs()))
}
