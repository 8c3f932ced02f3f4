//! The NAT audit log (`--audit-log PATH|stdout`): one JSON line per connection translated to
//! an egress IP held here, written when the connection ends, so that a firewall's log line
//! (egress IP and port, destination, time) can be traced back to a pod. Read from conntrack's
//! events (`conntrack -E`), which the kernel sends whether or not anyone keeps up: a slow
//! consumer loses lines (counted, and logged), never packets.

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::sync::{mpsc, watch};

use crate::model::Snapshot;
use crate::plan::NodePlan;

/// Lines waiting for the writer by default (`--audit-queue`); beyond that they are dropped.
pub const QUEUE: usize = 4096;
/// Connections seen starting and not yet ended; beyond that the starts known so far are
/// forgotten (those connections' lines then have no start), which bounds the memory.
const OPEN_MAX: usize = 262_144;
/// Accounting makes conntrack count bytes in each direction (off by default).
const ACCT_SYSCTL: &str = "/proc/sys/net/netfilter/nf_conntrack_acct";

#[derive(Clone, Debug)]
pub enum AuditTarget {
    Stdout,
    File(PathBuf),
}

impl std::str::FromStr for AuditTarget {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(if s == "stdout" {
            Self::Stdout
        } else {
            Self::File(PathBuf::from(s))
        })
    }
}

/// What the log needs to know from the plan: the egress IPs held here, and whose each pod IP
/// is (`namespace/name`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditView {
    pub held: Vec<Ipv4Addr>,
    pub pods: HashMap<Ipv4Addr, String>,
}

impl AuditView {
    /// The egress IPs `plan` holds on this node, and the pods translated to them.
    pub fn of(snapshot: &Snapshot, plan: &NodePlan) -> Self {
        let snat: HashSet<Ipv4Addr> = plan
            .snat
            .iter()
            .flat_map(|s| s.pods.iter().copied())
            .collect();
        Self {
            held: plan.snat.iter().map(|s| s.egress_ip).collect(),
            pods: snapshot
                .pods
                .values()
                .filter_map(|p| {
                    let ip = p.ip.filter(|ip| snat.contains(ip))?;
                    Some((ip, format!("{}/{}", p.namespace, p.name)))
                })
                .collect(),
        }
    }
}

/// One translated connection.
#[derive(Debug, PartialEq, Serialize)]
struct Line {
    /// Unix seconds of the first packet, as conntrack stamped its event; absent for a
    /// connection that started before the log did.
    start: Option<f64>,
    end: f64,
    pod: Option<String>,
    pod_ip: Ipv4Addr,
    pod_port: Option<u16>,
    egress_ip: Ipv4Addr,
    egress_port: Option<u16>,
    destination: Ipv4Addr,
    destination_port: Option<u16>,
    protocol: String,
    /// From the pod, and to it (absent when conntrack does not count bytes).
    bytes_out: Option<u64>,
    bytes_in: Option<u64>,
}

/// Starts the log, with up to `queue` lines waiting for a slow writer (more are dropped and
/// counted in `dropped`); the agent sends it the view after every apply.
pub fn start(target: AuditTarget, queue: usize, dropped: Counter) -> watch::Sender<AuditView> {
    let (view_tx, view) = watch::channel(AuditView::default());
    if let Err(error) = std::fs::write(ACCT_SYSCTL, "1") {
        tracing::warn!(%error, "cannot turn conntrack accounting on ({ACCT_SYSCTL}): audit lines will have no byte counts");
    }
    let (lines_tx, lines) = mpsc::channel::<Line>(queue.max(1));
    tokio::spawn(read_events(view, lines_tx, dropped.clone()));
    tokio::task::spawn_blocking(move || write_lines(target, lines, &dropped));
    view_tx
}

/// Follows conntrack's events, restarting `conntrack -E` if it ends.
async fn read_events(
    view: watch::Receiver<AuditView>,
    lines: mpsc::Sender<Line>,
    dropped: Counter,
) {
    loop {
        let child = tokio::process::Command::new("conntrack")
            .args(["-E", "-e", "NEW,DESTROY", "-o", "timestamp,id"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn();
        let mut child = match child {
            Ok(child) => child,
            Err(error) => {
                tracing::error!(%error, "cannot run conntrack -E: no audit log");
                return;
            }
        };
        let Some(stdout) = child.stdout.take() else {
            return;
        };
        let mut events = BufReader::new(stdout).lines();
        let mut open: HashMap<String, f64> = HashMap::new();
        while let Ok(Some(event)) = events.next_line().await {
            let Some(parsed) = Event::parse(&event) else {
                continue;
            };
            let current = view.borrow();
            if !current.held.contains(&parsed.egress_ip) {
                continue;
            }
            if parsed.new {
                if open.len() >= OPEN_MAX {
                    open.clear();
                }
                open.insert(parsed.id.clone(), parsed.at);
                continue;
            }
            let start = open.remove(&parsed.id);
            let line = parsed.line(start, &current.pods);
            drop(current);
            if lines.try_send(line).is_err() {
                dropped.inc();
            }
        }
        if lines.is_closed() {
            return;
        }
        tracing::warn!("conntrack -E ended; starting it again");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn write_lines(target: AuditTarget, mut lines: mpsc::Receiver<Line>, dropped: &Counter) {
    let mut out: Box<dyn std::io::Write> = match &target {
        AuditTarget::Stdout => Box::new(std::io::stdout()),
        AuditTarget::File(path) => {
            match std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                Ok(file) => Box::new(file),
                Err(error) => {
                    tracing::error!(%error, path = %path.display(), "cannot open the audit log");
                    return;
                }
            }
        }
    };
    let mut reported = 0;
    while let Some(line) = lines.blocking_recv() {
        let written = serde_json::to_writer(&mut out, &line)
            .map_err(std::io::Error::from)
            .and_then(|()| out.write_all(b"\n"))
            .and_then(|()| out.flush());
        if let Err(error) = written {
            tracing::warn!(%error, "writing the audit log");
        }
        let now = dropped.get();
        if now > reported {
            tracing::warn!(
                dropped = now,
                "audit lines dropped: the log's writer did not keep up"
            );
            reported = now;
        }
    }
}

/// One event of `conntrack -E -o timestamp,id`.
#[derive(Debug, PartialEq)]
struct Event {
    at: f64,
    new: bool,
    id: String,
    protocol: String,
    pod_ip: Ipv4Addr,
    pod_port: Option<u16>,
    destination: Ipv4Addr,
    destination_port: Option<u16>,
    egress_ip: Ipv4Addr,
    egress_port: Option<u16>,
    bytes: [Option<u64>; 2],
}

impl Event {
    /// `[1765000000.123456]\t[NEW] tcp 6 120 SYN_SENT src=.. dst=.. sport=.. dport=..
    /// [UNREPLIED] src=.. dst=.. sport=.. dport=.. id=..`; a DESTROY event has no timeout or
    /// state, and `packets=` and `bytes=` after each direction when accounting is on. The
    /// original direction is the pod's; the reply's destination is the egress IP and port.
    fn parse(event: &str) -> Option<Self> {
        let at = event
            .strip_prefix('[')?
            .split(']')
            .next()?
            .trim()
            .parse()
            .ok()?;
        let new = event.contains("[NEW]");
        if !new && !event.contains("[DESTROY]") {
            return None;
        }
        let fields: Vec<&str> = event.split_whitespace().collect();
        let kind = fields
            .iter()
            .position(|f| *f == "[NEW]" || *f == "[DESTROY]")?;
        let protocol = (*fields.get(kind + 1)?).to_owned();
        let values = |key: &str| -> Vec<&str> {
            fields.iter().filter_map(|f| f.strip_prefix(key)).collect()
        };
        let (src, dst) = (values("src="), values("dst="));
        let (sport, dport) = (values("sport="), values("dport="));
        let bytes = values("bytes=");
        let port = |ports: &[&str], i: usize| ports.get(i).and_then(|p| p.parse().ok());
        Some(Self {
            at,
            new,
            // `-o id` puts the connection's id last (ICMP's own id= comes before it).
            id: (*values("id=").last()?).to_owned(),
            protocol,
            pod_ip: src.first()?.parse().ok()?,
            pod_port: port(&sport, 0),
            destination: dst.first()?.parse().ok()?,
            destination_port: port(&dport, 0),
            egress_ip: dst.get(1)?.parse().ok()?,
            egress_port: port(&dport, 1),
            bytes: [0, 1].map(|i| bytes.get(i).and_then(|b| b.parse().ok())),
        })
    }

    fn line(self, start: Option<f64>, pods: &HashMap<Ipv4Addr, String>) -> Line {
        Line {
            start,
            end: self.at,
            pod: pods.get(&self.pod_ip).cloned(),
            pod_ip: self.pod_ip,
            pod_port: self.pod_port,
            egress_ip: self.egress_ip,
            egress_port: self.egress_port,
            destination: self.destination,
            destination_port: self.destination_port,
            protocol: self.protocol,
            bytes_out: self.bytes[0],
            bytes_in: self.bytes[1],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_read_from_its_two_events() {
        let new = "[1765000000.250000]\t    [NEW] tcp      6 120 SYN_SENT src=10.244.1.2 \
                   dst=203.0.113.10 sport=40000 dport=7777 [UNREPLIED] src=203.0.113.10 \
                   dst=10.99.0.200 sport=7777 dport=40001 id=3141592";
        let destroy = "[1765000002.500000]\t[DESTROY] tcp      6 src=10.244.1.2 \
                       dst=203.0.113.10 sport=40000 dport=7777 packets=6 bytes=412 \
                       src=203.0.113.10 dst=10.99.0.200 sport=7777 dport=40001 packets=4 \
                       bytes=290 [ASSURED] id=3141592";
        let started = Event::parse(new).unwrap_or_else(|| panic!("{new}"));
        assert!(started.new);
        assert_eq!(started.id, "3141592");
        let ended = Event::parse(destroy).unwrap_or_else(|| panic!("{destroy}"));
        let pods = HashMap::from([(Ipv4Addr::new(10, 244, 1, 2), "payments/api-1".to_owned())]);
        let line = ended.line(Some(started.at), &pods);
        assert_eq!(
            line,
            Line {
                start: Some(1_765_000_000.25),
                end: 1_765_000_002.5,
                pod: Some("payments/api-1".to_owned()),
                pod_ip: Ipv4Addr::new(10, 244, 1, 2),
                pod_port: Some(40000),
                egress_ip: Ipv4Addr::new(10, 99, 0, 200),
                egress_port: Some(40001),
                destination: Ipv4Addr::new(203, 0, 113, 10),
                destination_port: Some(7777),
                protocol: "tcp".to_owned(),
                bytes_out: Some(412),
                bytes_in: Some(290),
            }
        );
        // ICMP has no ports; other events are not connections ending or starting.
        let ping = "[1765000003.0]\t[DESTROY] icmp     1 src=10.244.1.2 dst=203.0.113.10 type=8 \
                    code=0 id=7 src=203.0.113.10 dst=10.99.0.200 type=0 code=0 id=7 id=99";
        let parsed = Event::parse(ping).unwrap_or_else(|| panic!("{ping}"));
        assert_eq!((parsed.pod_port, parsed.egress_port), (None, None));
        assert!(Event::parse("[1765000003.0]\t [UPDATE] tcp 6 60 SYN_RECV src=1.1.1.1").is_none());
    }
}
