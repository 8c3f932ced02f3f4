//! `cargo xtask bench failover`: how long new connections of a selected pod go unanswered when
//! the holder of its egress IP is cut off (unplanned) and when it takes the IP back after its
//! rejoin time (planned), whether a long-lived connection survives both, and what the probes
//! cost. Three nodes (the tests' `three_nodes`): node1 runs the pod, node2 and node3 may hold
//! the egress IP; the agents run with their default failover settings.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use netlab::fixture::{
    EGRESS_IP, api_pod, has_address, holds_alone, three_nodes_from, wait_all_applied,
};
use netlab::{AgentHandle, Answer, Cluster, LabPod, wait_until};

/// The agents' defaults, which the figures are for.
pub const INTERVAL: Duration = Duration::from_millis(50);
pub const MISSES: u32 = 3;
const REJOIN: Duration = Duration::from_secs(2);
/// New connections every 5 ms, one at a time, each given 20 ms (the lab answers in one): a
/// gap is measured to within their sum.
pub const LOOP_INTERVAL: Duration = Duration::from_millis(5);
pub const LOOP_TIMEOUT: Duration = Duration::from_millis(20);
/// Quiet time around each move, so that each gap is one move's.
const QUIET: Duration = Duration::from_millis(600);
const MOVE_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Default)]
pub struct FailoverResults {
    /// Per cut-off, the longest time new connections went unanswered (ms).
    pub unplanned_ms: Vec<f64>,
    /// Per takeback, the same.
    pub planned_ms: Vec<f64>,
    /// Long-lived connections that lived through a round (one cut-off and one takeback each),
    /// of all rounds.
    pub streams_survived: usize,
    pub streams: usize,
    /// Connections seen by the server with another source than the egress IP.
    pub leaked: usize,
    /// Probes node2's kernel answered per second, measured over the run.
    pub answered_pps: f64,
    /// Nodes that probe each candidate in the lab.
    pub probing_nodes: usize,
}

pub fn run(agent: &Path, probe: &Path, rounds: usize) -> Result<FailoverResults> {
    let mut cluster = three_nodes_from(
        Cluster::builder()
            .tag("failover")
            .probe_bin(probe)
            .agent_bin(agent),
    )?;
    let pod = api_pod(&mut cluster, "api-1", "node1")?;
    cluster.write_objects()?;
    let agents = cluster
        .nodes()
        .iter()
        .map(|n| cluster.start_agent(&n.name, ["--resync-interval", "30s"]))
        .collect::<Result<Vec<AgentHandle>>>()?;
    wait_all_applied(&cluster)?;
    wait_until(MOVE_TIMEOUT, || {
        holds_alone(&cluster, "node2", "node3", EGRESS_IP)
    })
    .context("node2 did not take the egress IP")?;
    std::thread::sleep(REJOIN * 2);

    let mut results = FailoverResults {
        probing_nodes: cluster.nodes().len() - 1,
        ..FailoverResults::default()
    };
    let probes_before = answered(&cluster, "node2")?;
    let started = Instant::now();
    for round in 1..=rounds {
        let outcome =
            self::round(&mut cluster, &pod).with_context(|| format!("failover round {round}"))?;
        println!(
            "failover round {round}/{rounds}: cut-off {:.0} ms, takeback {:.0} ms, stream {}",
            outcome.unplanned_ms,
            outcome.planned_ms,
            if outcome.survived { "alive" } else { "broke" }
        );
        results.unplanned_ms.push(outcome.unplanned_ms);
        results.planned_ms.push(outcome.planned_ms);
        results.streams += 1;
        results.streams_survived += usize::from(outcome.survived);
        results.leaked += outcome.leaked;
    }
    // node2 was cut off for part of the run: its answers count over the time it was not.
    let probes = answered(&cluster, "node2")?.saturating_sub(probes_before);
    results.answered_pps = probes as f64 / started.elapsed().as_secs_f64();
    drop(agents);
    Ok(results)
}

struct Round {
    unplanned_ms: f64,
    planned_ms: f64,
    survived: bool,
    leaked: usize,
}

/// One cut-off of node2 (node3 takes over) and its return (node2 takes the IP back once it has
/// served for the rejoin time), under a loop of new connections and one long-lived stream.
fn round(cluster: &mut Cluster, pod: &LabPod) -> Result<Round> {
    // Every round measures a move away from node2: if the egress IP is elsewhere when the round
    // starts (nothing here moves it between rounds), that is worth seeing, and the round waits
    // for node2 to hold it again rather than measure a cut-off of a node that held nothing.
    if !holds_alone(cluster, "node2", "node3", EGRESS_IP) {
        let waited = Instant::now();
        wait_until(MOVE_TIMEOUT, || {
            holds_alone(cluster, "node2", "node3", EGRESS_IP)
        })
        .context("node2 did not hold the egress IP alone at the start of the round")?;
        println!(
            "failover: node2 did not hold the egress IP alone when the round started (waited {:.1} s)",
            waited.elapsed().as_secs_f64()
        );
        std::thread::sleep(QUIET);
    }
    let seconds = (QUIET * 3 + REJOIN * 2).as_secs() + 3;
    let stream =
        cluster.start_stream(pod, Duration::from_millis(10), Duration::from_secs(seconds))?;
    let count =
        u32::try_from(Duration::from_secs(seconds).as_millis() / LOOP_INTERVAL.as_millis())?;
    let loop_ = cluster.start_loop_with_timeout(pod, LOOP_INTERVAL, count, LOOP_TIMEOUT)?;
    let loop_started = Instant::now();
    std::thread::sleep(QUIET);

    cluster.cut_off("node2", true)?;
    wait_until(MOVE_TIMEOUT, || {
        has_address(cluster, "node3", EGRESS_IP).unwrap_or(false)
    })
    .context("node3 did not take over from node2")?;
    std::thread::sleep(QUIET);
    let back_at = loop_started.elapsed();
    cluster.cut_off("node2", false)?;
    wait_until(MOVE_TIMEOUT, || {
        holds_alone(cluster, "node2", "node3", EGRESS_IP)
    })
    .context("node2 did not take the egress IP back")?;
    std::thread::sleep(QUIET);

    let answers = loop_.stop_timed()?;
    let outcome = stream.wait(Duration::from_secs(seconds + 10))?;
    let leaked = answers
        .iter()
        .filter(|(_, a)| a.source().is_some_and(|ip| ip != EGRESS_IP))
        .count();
    let (before, after): (Vec<_>, Vec<_>) = answers.iter().partition(|(at, _)| *at < back_at);
    Ok(Round {
        unplanned_ms: longest_gap(&before)?,
        planned_ms: longest_gap(&after)?,
        survived: outcome.survived,
        leaked,
    })
}

/// The longest time between two answers with the egress IP, in milliseconds.
fn longest_gap(answers: &[&(Duration, Answer)]) -> Result<f64> {
    let good: Vec<Duration> = answers
        .iter()
        .filter(|(_, a)| a.source() == Some(EGRESS_IP))
        .map(|(at, _)| *at)
        .collect();
    ensure!(good.len() > 1, "hardly any connection succeeded");
    Ok(good
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64() * 1e3)
        .fold(0.0, f64::max))
}

/// Probes `node`'s kernel has answered, from its agent's status file.
fn answered(cluster: &Cluster, node: &str) -> Result<u64> {
    let status = netlab::fixture::status(cluster, node)?;
    status["guard"]["probes"]
        .as_u64()
        .context("status.json has no guard.probes")
}

/// Probes per second that `peers` nodes send to one candidate with the default interval (the
/// candidate answers as many, and each node sends as many to `peers` candidates).
pub fn probes_per_second(peers: usize) -> f64 {
    peers as f64 / INTERVAL.as_secs_f64()
}
