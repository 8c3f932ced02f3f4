//! The Prometheus endpoint (`--metrics-addr`), with `/healthz` and `/readyz` for the
//! DaemonSet's probes. Most values are read at each scrape from the node status the agent last
//! wrote (the one `status.json` gets), with the kernel's counters read from the pinned maps
//! then: one source for the file and the endpoint, and nothing kept up to date between
//! scrapes. What happens between two statuses
//! (applies, their duration and failures, holder changes) is counted as it happens.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::node_status::{GatewayStatus, NodeStatus};
use crate::datapath::bpf::pinned_counters;
use crate::datapath::conntrack::{self, SnatUse};
use crate::plan::NodePlan;

/// A status older than this (the agent writes one every few seconds) makes `/healthz` fail:
/// the agent's loop is stuck.
const LIVE_WITHIN: Duration = Duration::from_secs(60);
/// Share of an egress IP's source ports toward one destination above which a scrape warns.
const PORTS_WARN: f64 = 0.8;

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("listening on {addr} for metrics: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    step: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EgressIpLabels {
    egress_ip: String,
}

/// What the agent tells the endpoint; cheap to clone, shared with the server's task.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// Where the kernel's counters are pinned: read at each scrape.
    bpffs: PathBuf,
    latest: Arc<Mutex<Latest>>,
    applies: Histogram,
    apply_errors: Family<StepLabels, Counter>,
    holder_changes: Family<EgressIpLabels, Counter>,
    registry: Arc<Registry>,
}

/// The last node status, when it was written, and what it does not hold.
#[derive(Debug, Default)]
struct Latest {
    status: Option<(NodeStatus, Instant)>,
    /// Watch failures so far, by what is watched (cluster mode).
    watch_restarts: BTreeMap<&'static str, u64>,
    /// The holder of each egress IP as last applied, to count changes.
    holders: BTreeMap<Ipv4Addr, Option<String>>,
    /// The SNAT use of the egress IPs held here, as counted for the current scrape.
    snat: BTreeMap<Ipv4Addr, SnatUse>,
}

impl Metrics {
    /// `audit_dropped`: the audit log's dropped lines, when it runs.
    pub fn new(bpffs: PathBuf, audit_dropped: Option<Counter>) -> Self {
        let latest = Arc::new(Mutex::new(Latest::default()));
        let applies = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        let apply_errors = Family::<StepLabels, Counter>::default();
        let holder_changes = Family::<EgressIpLabels, Counter>::default();
        let mut registry = Registry::with_prefix("static_egress");
        registry.register(
            "apply_duration_seconds",
            "How long applying a plan to the kernel took (routes, nftables, eBPF maps, addresses)",
            applies.clone(),
        );
        registry.register(
            "apply_errors",
            "Applies that failed, by the step that failed; the previous data path stayed",
            apply_errors.clone(),
        );
        registry.register(
            "holder_changes",
            "Times the holder of an egress IP changed in the plans this node applied",
            holder_changes.clone(),
        );
        if let Some(dropped) = audit_dropped {
            registry.register(
                "audit_lines_dropped",
                "Audit log lines dropped because the log's writer did not keep up",
                dropped,
            );
        }
        registry.register_collector(Box::new(FromStatus(Arc::clone(&latest))));
        Self {
            bpffs,
            latest,
            applies,
            apply_errors,
            holder_changes,
            registry: Arc::new(registry),
        }
    }

    /// A plan went into the kernel in `took`.
    pub fn applied(&self, plan: &NodePlan, took: Duration) {
        self.applies.observe(took.as_secs_f64());
        let holders: BTreeMap<Ipv4Addr, Option<String>> = plan
            .gateways
            .iter()
            .flat_map(|g| &g.egress)
            .map(|e| (e.ip, e.holder.as_ref().map(|h| h.node.clone())))
            .collect();
        let mut latest = lock(&self.latest);
        for (ip, holder) in &holders {
            if latest
                .holders
                .get(ip)
                .is_some_and(|before| before != holder)
            {
                self.holder_changes
                    .get_or_create(&EgressIpLabels {
                        egress_ip: ip.to_string(),
                    })
                    .inc();
            }
        }
        latest.holders = holders;
    }

    /// An apply failed at `step`.
    pub fn apply_failed(&self, step: &'static str) {
        self.apply_errors.get_or_create(&StepLabels { step }).inc();
    }

    /// The status just written, and how often each watch has failed so far.
    pub fn observe(&self, status: NodeStatus, watch_restarts: BTreeMap<&'static str, u64>) {
        let mut latest = lock(&self.latest);
        latest.status = Some((status, Instant::now()));
        latest.watch_restarts = watch_restarts;
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` on `addr` from a task of its own.
    pub async fn serve(self, addr: SocketAddr) -> Result<(), MetricsError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| MetricsError::Listen { addr, source })?;
        tracing::info!(%addr, "serving metrics, /healthz and /readyz");
        tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        tracing::warn!(%error, "accepting a metrics connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let metrics = self.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let metrics = metrics.clone();
                        async move { Ok::<_, std::convert::Infallible>(metrics.answer(&request).await) }
                    });
                    // Clients that shut their side down once they have asked (scripts, nc)
                    // still get their answer.
                    if let Err(error) = hyper::server::conn::http1::Builder::new()
                        .half_close(true)
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                    {
                        tracing::debug!(%error, "a metrics connection ended");
                    }
                });
            }
        });
        Ok(())
    }

    async fn answer(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        if request.method() != Method::GET {
            return reply(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".to_owned());
        }
        match request.uri().path() {
            "/metrics" => {
                // Counting connections reads conntrack, and the counters the pinned maps:
                // off this task's thread.
                let held = self.held_egress_ips();
                let bpffs = self.bpffs.clone();
                let (usage, live) = tokio::task::spawn_blocking(move || {
                    (conntrack::snat_use(&held), pinned_counters(&bpffs).ok())
                })
                .await
                .unwrap_or_default();
                if let Some((counters, guard)) = live
                    && let Some((status, _)) = &mut lock(&self.latest).status
                {
                    status.count_now(&counters, guard);
                }
                let text = self.encode(&usage);
                let mut response = reply(StatusCode::OK, text);
                response.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                response
            }
            "/healthz" => {
                let age = lock(&self.latest)
                    .status
                    .as_ref()
                    .map(|(_, at)| at.elapsed());
                match age {
                    Some(age) if age <= LIVE_WITHIN => reply(
                        StatusCode::OK,
                        format!("live: status written {}s ago\n", age.as_secs()),
                    ),
                    Some(age) => reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!(
                            "the agent wrote no status for {}s: its loop is stuck\n",
                            age.as_secs()
                        ),
                    ),
                    None => reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no status yet\n".to_owned(),
                    ),
                }
            }
            "/readyz" => match &lock(&self.latest).status {
                Some((status, _)) if status.ready => reply(StatusCode::OK, "ready\n".to_owned()),
                Some((status, _)) => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {}\n", status.not_ready.join("; ")),
                ),
                None => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no status yet\n".to_owned(),
                ),
            },
            _ => reply(
                StatusCode::NOT_FOUND,
                "/metrics, /healthz or /readyz\n".to_owned(),
            ),
        }
    }

    fn held_egress_ips(&self) -> Vec<Ipv4Addr> {
        let latest = lock(&self.latest);
        let Some((status, _)) = &latest.status else {
            return Vec::new();
        };
        status
            .gateways
            .iter()
            .flat_map(|g| &g.egress)
            .filter(|(_, holder)| holder.as_deref() == Some(status.node.as_str()))
            .map(|(ip, _)| *ip)
            .collect()
    }

    /// The registry's text, with the SNAT use of the egress IPs held here; warns of an egress
    /// IP close to running out of source ports toward some destination.
    fn encode(&self, usage: &BTreeMap<Ipv4Addr, SnatUse>) -> String {
        let mut text = String::new();
        for (ip, used) in usage {
            let share = used.busiest_share();
            if share >= PORTS_WARN {
                tracing::warn!(
                    egress_ip = %ip,
                    connections = used.busiest,
                    "{:.0}% of the egress IP's source ports toward one destination are in use: \
                     new connections to it will fail when they run out; add egress IPs",
                    share * 100.0
                );
            }
        }
        lock(&self.latest).snat.clone_from(usage);
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
            let _ = writeln!(text, "# encoding the metrics failed\n# EOF");
        }
        text
    }
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

fn lock(latest: &Mutex<Latest>) -> std::sync::MutexGuard<'_, Latest> {
    // A panic elsewhere leaves whole values behind: scrapes go on.
    latest.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the last status says, encoded at each scrape.
#[derive(Debug)]
struct FromStatus(Arc<Mutex<Latest>>);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GatewayLabels {
    gateway: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HolderLabels {
    gateway: String,
    egress_ip: String,
    holder: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WatchLabels {
    watch: &'static str,
}

impl Collector for FromStatus {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let latest = lock(&self.0);
        let e = &mut encoder;
        counters(
            e,
            "watch_restarts",
            "Times a watch of the API server failed and started again",
            latest
                .watch_restarts
                .iter()
                .map(|(watch, n)| (WatchLabels { watch }, *n)),
        )?;
        family(
            e,
            "snat_connections",
            "Connections tracked here translated to the egress IP",
            latest.snat.iter().map(|(ip, used)| {
                let connections = i64::try_from(used.connections).unwrap_or(i64::MAX);
                (egress_ip(*ip), connections)
            }),
            ConstGauge::new,
        )?;
        family(
            e,
            "snat_port_use_ratio",
            "Share of the egress IP's source ports in use toward its busiest destination \
             (address, port and protocol); new connections to it fail at 1",
            latest
                .snat
                .iter()
                .map(|(ip, used)| (egress_ip(*ip), used.busiest_share())),
            ConstGauge::new,
        )?;
        let Some((status, _)) = &latest.status else {
            return Ok(());
        };
        let ready = ConstGauge::new(i64::from(status.ready));
        ready.encode(e.encode_descriptor(
            "ready",
            "1 when the data path matches the objects and every input is current",
            None,
            ready.metric_type(),
        )?)?;
        let held = ConstGauge::new(i64::try_from(status.held.len()).unwrap_or(i64::MAX));
        held.encode(e.encode_descriptor(
            "held_pods",
            "Starting pods whose traffic to outside the cluster is dropped until the agent \
             can program them (CNI plugin)",
            None,
            held.metric_type(),
        )?)?;
        let by_gateway = |value: fn(&GatewayStatus) -> u64| {
            status
                .gateways
                .iter()
                .map(move |g| (gateway(&g.name), value(g)))
        };
        counters(
            e,
            "gateway_packets",
            "Packets of this node's pods marked for the gateway by the kernel programs",
            by_gateway(|g| g.packets),
        )?;
        counters(
            e,
            "gateway_bytes",
            "Bytes of this node's pods marked for the gateway",
            by_gateway(|g| g.bytes),
        )?;
        counters(
            e,
            "gateway_drops",
            "Packets of this node's pods for the gateway dropped while no node held its egress \
             IP (FailClosed)",
            by_gateway(|g| g.dropped),
        )?;
        family(
            e,
            "selected_pods",
            "Pods of this node whose traffic uses the gateway",
            status.gateways.iter().map(|g| {
                let pods = status.pods.iter().filter(|p| p.gateway == g.name).count();
                (gateway(&g.name), i64::try_from(pods).unwrap_or(i64::MAX))
            }),
            ConstGauge::new,
        )?;
        family(
            e,
            "egress_ip_held_here",
            "1 when this node holds the egress IP; the holder label names the node that does \
             (empty: none)",
            status.gateways.iter().flat_map(|g| {
                g.egress.iter().map(|(ip, holder)| {
                    let here = holder.as_deref() == Some(status.node.as_str());
                    let labels = HolderLabels {
                        gateway: g.name.clone(),
                        egress_ip: ip.to_string(),
                        holder: holder.clone().unwrap_or_default(),
                    };
                    (labels, i64::from(here))
                })
            }),
            ConstGauge::new,
        )?;
        let guard = &status.guard;
        for (name, help, value) in [
            (
                "guard_transit_packets",
                "Packets of other nodes' pods marked on their way out through this node",
                guard.transit,
            ),
            (
                "guard_dropped_packets",
                "Marked packets dropped because they would have left with another address",
                guard.dropped,
            ),
            (
                "fenced_packets",
                "Packets and ARP answers of egress IPs held here dropped while the kernel lease \
                 did not let this node serve",
                guard.fenced,
            ),
            (
                "foreign_packets",
                "Packets dropped because they came from a host that is not a cluster node",
                guard.foreign,
            ),
            (
                "probes_answered",
                "Probes from other nodes answered by the kernel",
                guard.probes,
            ),
            (
                "tunnel_out_packets",
                "Packets the programs put into the tunnel themselves",
                guard.tunnel_out,
            ),
            (
                "tunnel_in_packets",
                "Packets the programs took out of the tunnel themselves",
                guard.tunnel_in,
            ),
        ] {
            let value = ConstCounter::new(value);
            value.encode(e.encode_descriptor(name, help, None, value.metric_type())?)?;
        }
        Ok(())
    }
}

fn gateway(name: &str) -> GatewayLabels {
    GatewayLabels {
        gateway: name.to_owned(),
    }
}

fn egress_ip(ip: Ipv4Addr) -> EgressIpLabels {
    EgressIpLabels {
        egress_ip: ip.to_string(),
    }
}

/// One counter family (see [`family`]).
fn counters<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (L, u64)>,
) -> Result<(), std::fmt::Error> {
    family(encoder, name, help, rows, ConstCounter::<u64>::new)
}

/// One family: its description once, then a sample per label set; nothing for no rows.
fn family<L: EncodeLabelSet, V, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (L, V)>,
    metric: impl Fn(V) -> M,
) -> Result<(), std::fmt::Error> {
    let mut rows = rows.into_iter().map(|(l, v)| (l, metric(v))).peekable();
    let Some((_, first)) = rows.peek() else {
        return Ok(());
    };
    let mut descriptor = encoder.encode_descriptor(name, help, None, first.metric_type())?;
    for (labels, value) in rows {
        value.encode(descriptor.encode_family(&labels)?)?;
    }
    Ok(())
}
