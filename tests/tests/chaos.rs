//! Chaos under steady traffic: while selected pods on every node keep connecting, agents are
//! killed, nodes turn NotReady and back, invalid objects come and go, our nftables table and
//! rule are deleted by hand and the API endpoint restarts. No connection of a selected pod may
//! ever be seen with another address than the egress IP, the right state must come back, and
//! an agent that lives through it all must not grow in memory or open files.
//!
//! `CHAOS_SECONDS` sets how long (CI: 40 s; `CHAOS_SECONDS=300` for a few minutes) and
//! `CHAOS_SEED` replays a run (each run prints its seed).

use std::net::Ipv4Addr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, ensure};
use netlab::apiserver::{ApiServer, default_addr};
use netlab::fixture::{APPLY, EGRESS_IP, expect_source, has_address, three_nodes};
use netlab::objects::match_labels;
use netlab::{AgentHandle, Cluster, PodSpec, expect_none_leaked, wait_until};

/// A small deterministic generator (xorshift), so that a seed replays a run.
struct Dice(u64);

impl Dice {
    fn roll(&mut self, sides: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % sides
    }

    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.roll(to - from))
    }
}

/// VmRSS in KiB and open file descriptors of a process.
fn footprint(pid: u32) -> Result<(u64, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no VmRSS")?
        .parse()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    Ok((rss, fds))
}

fn sync(api: &ApiServer, cluster: &Cluster) -> Result<()> {
    api.sync(&cluster.objects().api_objects()?)
}

#[test]
fn chaos_never_lets_selected_traffic_out_with_another_address() -> Result<()> {
    let seconds: u64 = std::env::var("CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let seed: u64 = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    eprintln!("chaos: {seconds} s, CHAOS_SEED={seed}");
    let mut dice = Dice(seed);

    let mut cluster = three_nodes(env!("CARGO_BIN_EXE_se-probe").as_ref())?;
    let pods = [("api-1", "node1"), ("api-2", "node2"), ("api-3", "node3")].map(|(name, node)| {
        cluster.add_pod(PodSpec::new("payments", name, node).label("app", "api"))
    });
    let pods = pods.into_iter().collect::<Result<Vec<_>>>()?;
    let mut api = ApiServer::start(cluster.router_netns(), default_addr(cluster.router_ip()))?;
    sync(&api, &cluster)?;
    let kubeconfig = api.kubeconfig(cluster.dir())?;
    let nodes = ["node1", "node2", "node3"];
    let args = ["--resync-interval", "2s"];
    let mut agents: Vec<AgentHandle> = nodes
        .iter()
        .map(|n| cluster.start_agent_with_kubeconfig(n, &kubeconfig, &args))
        .collect::<Result<_>>()?;
    for pod in &pods {
        expect_source(&cluster, pod, EGRESS_IP)?;
    }

    // node1's agent is never killed: it is the one whose footprint must not grow.
    std::thread::sleep(Duration::from_secs(3));
    let witness = agents[0].pid();
    let before = footprint(witness)?;

    let count = u32::try_from(seconds * 1000 / 50 + 200)?;
    let loops = pods
        .iter()
        .map(|pod| cluster.start_loop(pod, Duration::from_millis(50), count))
        .collect::<Result<Vec<_>>>()?;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut actions = Vec::new();
    let mut broken = false;
    while Instant::now() < deadline {
        std::thread::sleep(dice.millis(500, 2500));
        let action = match dice.roll(6) {
            0 => {
                let i = 1 + dice.roll(2) as usize;
                agents[i].kill()?;
                std::thread::sleep(dice.millis(200, 2000));
                agents[i] = cluster.start_agent_with_kubeconfig(nodes[i], &kubeconfig, &args)?;
                format!("killed and restarted the agent on {}", nodes[i])
            }
            1 => {
                let node = nodes[1 + dice.roll(2) as usize];
                let object = cluster.objects_mut().node_mut(node)?;
                object.ready = !object.ready;
                let ready = object.ready;
                sync(&api, &cluster)?;
                format!("{node} Ready={ready}")
            }
            2 => {
                broken = !broken;
                cluster.update_objects(|o| {
                    if broken {
                        o.set_gateway(
                            netlab::fixture::gateway("broken", Ipv4Addr::new(127, 0, 0, 9))
                                .node_selector(match_labels([("egress", "true")])),
                        );
                    } else {
                        o.remove_gateway("broken");
                    }
                })?;
                sync(&api, &cluster)?;
                format!("invalid gateway present: {broken}")
            }
            3 => {
                let node = nodes[dice.roll(3) as usize];
                // Gone already when the dice chose it twice within a resync.
                let _ = cluster
                    .node(node)?
                    .exec(["nft", "delete", "table", "ip", "static_egress"]);
                format!("deleted our table on {node}")
            }
            4 => {
                let node = nodes[dice.roll(3) as usize];
                let _ = cluster
                    .node(node)?
                    .exec(["ip", "rule", "del", "priority", "1490"]);
                format!("deleted our rule on {node}")
            }
            _ => {
                api.stop();
                std::thread::sleep(dice.millis(300, 2000));
                let forget = dice.roll(2) == 0;
                api.restart(forget)?;
                sync(&api, &cluster)?;
                format!("restarted the API endpoint (history forgotten: {forget})")
            }
        };
        actions.push(action);
    }
    eprintln!("chaos: {} actions: {actions:?}", actions.len());

    // Back to the plain state: everything comes back as it was.
    for node in ["node2", "node3"] {
        cluster.objects_mut().node_mut(node)?.ready = true;
    }
    cluster.update_objects(|o| {
        o.remove_gateway("broken");
    })?;
    sync(&api, &cluster)?;
    wait_until(APPLY, || {
        has_address(&cluster, "node2", EGRESS_IP).unwrap_or(false)
            && !has_address(&cluster, "node3", EGRESS_IP).unwrap_or(true)
    })
    .context("node2 did not get its egress IP back alone")?;
    for pod in &pods {
        expect_source(&cluster, pod, EGRESS_IP)?;
    }
    for (pod, probe) in pods.iter().zip(loops) {
        let answers = probe.stop()?;
        let good =
            expect_none_leaked(&answers, EGRESS_IP).with_context(|| format!("pod {}", pod.name))?;
        eprintln!(
            "chaos: {}: {good} of {} connections left with the egress IP, the rest failed",
            pod.name,
            answers.len()
        );
    }

    let after = footprint(witness)?;
    eprintln!("chaos: node1's agent: {before:?} -> {after:?} (KiB of RSS, open files)");
    ensure!(
        after.0 <= before.0 + 8 * 1024,
        "node1's agent grew from {} to {} KiB",
        before.0,
        after.0
    );
    ensure!(
        after.1 <= before.1 + 4,
        "node1's agent went from {} to {} open files",
        before.1,
        after.1
    );
    Ok(())
}
