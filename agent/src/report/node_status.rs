//! The node's own status file, `<state-dir>/status.json`: what the agent applied and its
//! counters, whether it is ready and, if not, why. Written after every apply and every few
//! seconds, so its age tells a live agent from a stuck one; `static-egress health` reads it
//! for the DaemonSet's probes.

use std::collections::BTreeMap;
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
    /// Starting pods whose traffic to outside the cluster is dropped for now (see the CNI
    /// plugin in the README).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held: Vec<HeldStatus>,
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
    /// Packets dropped because they came from a host that is not a cluster node (a host on
    /// the segment sending as a pod; a tunnel packet from an address that is no node's).
    #[serde(default)]
    pub foreign: u64,
    /// Packets the programs put into the tunnel, and took out of it, themselves (the rest
    /// went through the kernel's tunnel device: see "Reach" in the README).
    #[serde(default)]
    pub tunnel_out: u64,
    #[serde(default)]
    pub tunnel_in: u64,
}

impl From<Guard> for GuardStatus {
    fn from(guard: Guard) -> Self {
        Self {
            transit: guard.transit,
            dropped: guard.dropped,
            fenced: guard.fenced,
            probes: guard.probes,
            foreign: guard.foreign,
            tunnel_out: guard.tunnel_out,
            tunnel_in: guard.tunnel_in,
        }
    }
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

#[derive(Debug, Serialize, Deserialize)]
pub struct HeldStatus {
    pub pod: String,
    pub ip: Ipv4Addr,
    pub why: String,
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
        (counters, guard): (&BTreeMap<u32, Counters>, Guard),
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
        let held = plan
            .iter()
            .flat_map(|p| &p.held)
            .map(|p| HeldStatus {
                pod: format!("{}/{}", p.namespace, p.name),
                ip: p.ip,
                why: p.why.to_string(),
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
            held,
            guard: guard.into(),
            warnings: warnings.to_vec(),
        }
    }

    /// Replaces the counters with `counters` (by gateway id) and `guard`, read from the
    /// kernel now: they count on between two statuses, and while no agent runs.
    pub fn count_now(&mut self, counters: &BTreeMap<u32, Counters>, guard: Guard) {
        let ids = crate::plan::gateway_ids(self.gateways.iter().map(|g| g.name.as_str()));
        for gateway in &mut self.gateways {
            let now = ids
                .get(&gateway.name)
                .and_then(|id| counters.get(id))
                .copied()
                .unwrap_or_default();
            (gateway.packets, gateway.bytes, gateway.dropped) =
                (now.packets, now.bytes, now.dropped);
        }
        self.guard = guard.into();
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
        // Streamed into the file: at 10,000 pods the document is megabytes, and a buffer that
        // size every few seconds is what the agent's heap would grow to keep.
        crate::fsutil::write_atomically(&path, |w| {
            serde_json::to_writer_pretty(w, self).map_err(std::io::Error::other)
        })
        .map_err(err)
    }
}

/// How old a status may be for `status` to call its agent running: it writes one every 5 s.
const RUNNING_WITHIN: Duration = Duration::from_secs(15);

/// What `static-egress status` shows: the node's last status, with the kernel's counters
/// instead of the status's when the maps are pinned (they count on while no agent runs).
#[derive(Debug, Serialize)]
pub struct Shown {
    #[serde(flatten)]
    pub status: NodeStatus,
    /// Seconds since the agent last wrote the status.
    pub status_age_seconds: u64,
    /// An agent wrote the status within the last 15 s.
    pub agent_running: bool,
    /// `kernel` (the pinned maps, now) or `status file` (as of its writing).
    pub counters_from: &'static str,
}

/// The `status` subcommand: the last status in `dir`, with `live` counters when the maps could
/// be read, as a table or as JSON.
pub fn show(
    dir: &Path,
    live: Option<(BTreeMap<u32, Counters>, Guard)>,
    json: bool,
) -> Result<String, NodeStatusError> {
    let path = dir.join(FILE);
    let age = age(&path)?;
    let mut status = parse(&path)?;
    let counters_from = match live {
        Some((counters, guard)) => {
            status.count_now(&counters, guard);
            "kernel"
        }
        None => "status file",
    };
    let shown = Shown {
        status,
        status_age_seconds: age.as_secs(),
        agent_running: age <= RUNNING_WITHIN,
        counters_from,
    };
    if json {
        let mut out = serde_json::to_string_pretty(&shown)
            .map_err(|source| NodeStatusError::Unreadable { path, source })?;
        out.push('\n');
        return Ok(out);
    }
    Ok(shown.to_string())
}

impl std::fmt::Display for Shown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = &self.status;
        writeln!(
            f,
            "node {}: agent {} (status written {}s ago), {}",
            status.node,
            if self.agent_running {
                "running"
            } else {
                "not running, or stuck"
            },
            self.status_age_seconds,
            if status.ready {
                "ready".to_owned()
            } else {
                format!("not ready: {}", status.not_ready.join("; "))
            }
        )?;
        let mut gateways = vec![[
            "GATEWAY".to_owned(),
            "EGRESS IP".to_owned(),
            "HOLDER".to_owned(),
            "PACKETS".to_owned(),
            "BYTES".to_owned(),
            "DROPPED".to_owned(),
        ]];
        for gateway in &status.gateways {
            for (i, (ip, holder)) in gateway.egress.iter().enumerate() {
                let counters = if i == 0 {
                    [gateway.packets, gateway.bytes, gateway.dropped].map(|n| n.to_string())
                } else {
                    Default::default()
                };
                let [packets, bytes, dropped] = counters;
                gateways.push([
                    if i == 0 {
                        gateway.name.clone()
                    } else {
                        String::new()
                    },
                    ip.to_string(),
                    holder.clone().unwrap_or_else(|| "(none)".to_owned()),
                    packets,
                    bytes,
                    dropped,
                ]);
            }
        }
        table(f, &gateways)?;
        let mut pods = vec![[
            "POD".to_owned(),
            "IP".to_owned(),
            "GATEWAY".to_owned(),
            "EGRESS IP".to_owned(),
        ]];
        pods.extend(status.pods.iter().map(|p| {
            [
                p.pod.clone(),
                p.ip.to_string(),
                p.gateway.clone(),
                p.egress_ip.to_string(),
            ]
        }));
        writeln!(f)?;
        if pods.len() == 1 {
            writeln!(f, "no selected pods on this node")?;
        } else {
            table(f, &pods)?;
        }
        for held in &status.held {
            writeln!(
                f,
                "held while starting: {} {} ({})",
                held.pod, held.ip, held.why
            )?;
        }
        let guard = &status.guard;
        writeln!(
            f,
            "\ncounters from the {}; guard: {} transit, {} dropped, {} fenced, {} from non-nodes \
             dropped, {} probes answered; tunnel: {} packets in, {} out",
            self.counters_from,
            guard.transit,
            guard.dropped,
            guard.fenced,
            guard.foreign,
            guard.probes,
            guard.tunnel_in,
            guard.tunnel_out
        )?;
        for warning in &status.warnings {
            writeln!(f, "warning: {warning}")?;
        }
        Ok(())
    }
}

/// Rows in columns as wide as their widest cell.
fn table<const N: usize>(
    f: &mut std::fmt::Formatter<'_>,
    rows: &[[String; N]],
) -> std::fmt::Result {
    let widths: Vec<usize> = (0..N)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or_default())
        .collect();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:width$}"))
            .collect();
        writeln!(f, "{}", cells.join("  ").trim_end())?;
    }
    Ok(())
}

/// The `health` subcommand: live when the agent wrote its status within `max_age` (it does at
/// least every few seconds, ready or not); ready when, besides, the status says so.
pub fn check(dir: &Path, max_age: Duration, ready: bool) -> Result<String, NodeStatusError> {
    let path = dir.join(FILE);
    let age = age(&path)?;
    if age > max_age {
        return Err(NodeStatusError::Stale { path, age, max_age });
    }
    if ready {
        let status = parse(&path)?;
        if !status.ready {
            return Err(NodeStatusError::NotReady(status.not_ready));
        }
        return Ok(format!("ready: status written {}s ago", age.as_secs()));
    }
    Ok(format!("live: status written {}s ago", age.as_secs()))
}

/// How long ago the status file at `path` was written.
fn age(path: &Path) -> Result<Duration, NodeStatusError> {
    let modified = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .map_err(|source| NodeStatusError::Io {
            path: path.to_owned(),
            source,
        })?;
    Ok(modified.elapsed().unwrap_or_default())
}

fn parse(path: &Path) -> Result<NodeStatus, NodeStatusError> {
    let text = std::fs::read(path).map_err(|source| NodeStatusError::Io {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_slice(&text).map_err(|source| NodeStatusError::Unreadable {
        path: path.to_owned(),
        source,
    })
}
