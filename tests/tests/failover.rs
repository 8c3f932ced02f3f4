//! Failover: a holder that dies, is cut off, freezes or loses its agent hands its egress IPs to
//! the next eligible node within a few probe intervals; a draining one hands them over with no
//! gap, and so does one that an edit or a NotReady Node moves them from; agents that start or
//! restart together hold each egress IP once. Throughout, no connection of a selected pod is seen with a node address, never do two
//! nodes answer ARP for one egress IP, and a long-lived TCP connection keeps flowing.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use netlab::fixture::{
    APPLY, EGRESS_IP, api_pod, expect_source, has_address, holds_alone, three_nodes,
    wait_all_applied, with_agent_logs,
};
use netlab::objects::Pod;
use netlab::{AgentHandle, Answer, ArpSeen, Cluster, LabPod, ProbeLoop, Stream, wait_until};

/// Probes every 50 ms, down after 3 misses: detection within 200 ms, as the defaults. A short
/// lease and rejoin time keep the tests short.
const FAILOVER_ARGS: [&str; 6] = [
    "--lease",
    "2s",
    "--rejoin-after",
    "1s",
    "--resync-interval",
    "30s",
];

fn start_agents(cluster: &Cluster) -> Result<Vec<AgentHandle>> {
    netlab::fixture::start_agents(cluster, &FAILOVER_ARGS)
}

/// Checks what the ARP watch saw: answers all along, never two answerers for one request.
fn one_answerer(seen: &ArpSeen) -> Result<()> {
    eprintln!("ARP: {seen:?}");
    ensure!(
        seen.requests > 20 && !seen.answerers.is_empty(),
        "the ARP watch saw too little: {seen:?}"
    );
    ensure!(
        seen.most_answerers <= 1,
        "two nodes answered ARP for {EGRESS_IP} at once: {seen:?}"
    );
    Ok(())
}

/// New connections every 5 ms, each given 50 ms (the lab answers in one): the traffic the
/// gap is measured on, to within about 55 ms.
fn probe(cluster: &Cluster, pod: &LabPod, seconds: u32) -> Result<ProbeLoop> {
    cluster.start_loop_with_timeout(
        pod,
        Duration::from_millis(5),
        seconds * 1000 / 7,
        Duration::from_millis(50),
    )
}

/// The longest time without a successful connection between the first and the last success
/// (the takeover seen by new connections), after checking that none left with another
/// address than the egress IP.
fn longest_gap(answers: &[(Duration, Answer)]) -> Result<Duration> {
    let (at, gap) = gap_at(answers)?;
    eprintln!("longest gap {gap:?} from {at:?}");
    Ok(gap)
}

/// When the longest gap started, and how long it was.
fn gap_at(answers: &[(Duration, Answer)]) -> Result<(Duration, Duration)> {
    let leaked: Vec<&(Duration, Answer)> = answers
        .iter()
        .filter(|(_, a)| a.source().is_some_and(|ip| ip != EGRESS_IP))
        .collect();
    ensure!(
        leaked.is_empty(),
        "{} connections left with another address than {EGRESS_IP}: {leaked:?}",
        leaked.len()
    );
    let good: Vec<Duration> = answers
        .iter()
        .filter(|(_, a)| a.source() == Some(EGRESS_IP))
        .map(|(at, _)| *at)
        .collect();
    ensure!(
        good.len() > 1,
        "hardly any connection succeeded: {answers:?}"
    );
    let failed: Vec<Duration> = answers
        .iter()
        .filter(|(_, a)| a.source().is_none())
        .map(|(at, _)| *at)
        .collect();
    if let (Some(first), Some(last)) = (failed.first(), failed.last()) {
        eprintln!(
            "{} of {} connections failed, from {first:?} to {last:?}",
            failed.len(),
            answers.len()
        );
    }
    Ok(good
        .windows(2)
        .map(|w| (w[0], w[1] - w[0]))
        .max_by_key(|(_, gap)| *gap)
        .unwrap_or_default())
}

/// A holder and the scene around it: pod api-1 on node1 connecting, a stream from it.
struct Scene {
    cluster: Cluster,
    pod: LabPod,
    agents: Vec<AgentHandle>,
}

/// One scenario at a time: each measures gaps of a few probe intervals, which two labs
/// sharing two cores would blur.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Scene {
    fn new() -> Result<Self> {
        let mut cluster = three_nodes(env!("CARGO_BIN_EXE_se-probe").as_ref())?;
        let pod = api_pod(&mut cluster, "api-1", "node1")?;
        let agents = start_agents(&cluster)?;
        expect_source(&cluster, &pod, EGRESS_IP)?;
        ensure!(has_address(&cluster, "node2", EGRESS_IP)?);
        Ok(Self {
            cluster,
            pod,
            agents,
        })
    }

    /// Stops every agent (SIGTERM, the data path stays), then starts them all at once.
    fn restart_all(&mut self) -> Result<()> {
        for agent in &mut self.agents {
            agent.stop()?;
        }
        self.agents = self
            .cluster
            .nodes()
            .iter()
            .map(|n| self.cluster.start_agent(&n.name, FAILOVER_ARGS))
            .collect::<Result<_>>()?;
        Ok(())
    }

    fn stream(&mut self, seconds: u64) -> Result<Stream> {
        self.cluster.start_stream(
            &self.pod,
            Duration::from_millis(10),
            Duration::from_secs(seconds),
        )
    }

    fn holds(&self, node: &str) -> bool {
        has_address(&self.cluster, node, EGRESS_IP).unwrap_or(false)
    }

    /// Runs a scenario; when it fails, the agents' last words go with the error.
    fn run(scenario: impl FnOnce(&mut Self) -> Result<()>) -> Result<()> {
        let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let mut scene = Self::new()?;
        let result = scenario(&mut scene);
        scene.show_logs_if(result)
    }

    /// Passes `result` on; when it is a failure (or `SE_SHOW_LOGS` is set, to see where the
    /// time goes), the agents' last words go with it.
    fn show_logs_if(self, result: Result<()>) -> Result<()> {
        let result = with_agent_logs(&self.agents, result);
        if result.is_err() && std::env::var_os("SE_KEEP_FAILED").is_some() {
            let kept = self.cluster.keep()?;
            eprintln!("lab kept: {kept:?}");
            for agent in self.agents {
                agent.detach();
            }
        }
        result
    }

    /// Waits until `node` holds the egress IP; returns how long that took.
    fn until_holds(&self, node: &str) -> Result<Duration> {
        let started = Instant::now();
        wait_until(APPLY, || self.holds(node))
            .with_context(|| format!("{node} did not take the egress IP"))?;
        Ok(started.elapsed())
    }

    /// Waits until `node` holds the egress IP alone; returns how long that took.
    fn until_held_by(&self, node: &str, other: &str) -> Result<Duration> {
        let started = Instant::now();
        wait_until(APPLY, || holds_alone(&self.cluster, node, other, EGRESS_IP))
            .with_context(|| format!("{node} did not take the egress IP from {other}"))?;
        Ok(started.elapsed())
    }
}

#[test]
fn a_holder_cut_off_hands_over_within_300_ms_and_streams_survive() -> Result<()> {
    Scene::run(|scene| {
        let stream = scene.stream(4)?;
        let loop_ = probe(&scene.cluster, &scene.pod, 8)?;
        let started = Instant::now();
        let arp = scene.cluster.watch_arp(EGRESS_IP)?;
        std::thread::sleep(Duration::from_millis(1500));

        eprintln!("cutting node2 off at {:?}", started.elapsed());
        scene.cluster.cut_off("node2", true)?;
        // node2 may keep its address while cut off: nobody hears it.
        let took = scene.until_holds("node3")?;
        eprintln!("node2 cut off: node3 holds the egress IP after {took:?}");
        let outcome = stream.wait(Duration::from_secs(30))?;
        eprintln!("stream across the takeover: {outcome:?}");
        ensure!(
            outcome.survived,
            "the long-lived connection broke: {outcome:?}"
        );

        // Back: node2 rejoins after the rejoin time (1 s) and takes its egress IP back.
        eprintln!("connecting node2 again at {:?}", started.elapsed());
        scene.cluster.cut_off("node2", false)?;
        let back = scene.until_held_by("node2", "node3")?;
        eprintln!("node2 back: holds the egress IP again after {back:?}");
        ensure!(
            back > Duration::from_millis(900),
            "node2 took its egress IP back before the rejoin time ({back:?})"
        );

        let answers = loop_.wait_timed(Duration::from_secs(30))?;
        let gap = longest_gap(&answers)?;
        let arp = arp.finish()?;
        // 300 ms, the loop's resolution (a connection attempt lost in the takeover is given
        // up on after 50 ms) and room for a loaded machine: 289-345 ms were measured here.
        ensure!(
            gap < Duration::from_millis(400),
            "new connections went unanswered for {gap:?}"
        );
        one_answerer(&arp)?;
        announced_while_held(&scene.cluster, &arp)?;
        Ok(())
    })
}

/// Two pods' connections from one source port to one server: the holder's SNAT gives one of
/// them another port, which node3 cannot guess when it takes over. node2 tells it (every
/// second, `--flow-sync-interval`), node3 restores that translation before its SNAT goes in,
/// and both connections keep flowing across the takeover, and across the planned move back
/// to node2 once it is reachable again.
#[test]
fn connections_snat_gave_another_port_survive_a_takeover_and_the_move_back() -> Result<()> {
    const PORT: u16 = 40_123;
    Scene::run(|scene| {
        let other = api_pod(&mut scene.cluster, "api-2", "node1")?;
        scene.cluster.write_objects()?;
        wait_all_applied(&scene.cluster)?;
        expect_source(&scene.cluster, &other, EGRESS_IP)?;
        let streams = [&scene.pod, &other]
            .into_iter()
            .map(|pod| {
                scene.cluster.start_stream_from(
                    pod,
                    PORT,
                    Duration::from_millis(10),
                    Duration::from_secs(9),
                )
            })
            .collect::<Result<Vec<Stream>>>()?;
        // node2 lists its remapped connections every second, or less often when a listing was
        // slow (a loaded machine): let it tell node3 at least once.
        std::thread::sleep(Duration::from_millis(2500));
        // What makes this test: on node2, one of the two left with another port.
        let translated = translated_ports(&scene.cluster, "node2")?;
        ensure!(
            translated.len() == 2 && translated.iter().any(|p| *p != PORT),
            "expected two connections on node2, one translated to another port than {PORT}: {translated:?}"
        );

        scene.cluster.cut_off("node2", true)?;
        let took = scene.until_holds("node3")?;
        eprintln!(
            "node2 cut off: node3 holds the egress IP after {took:?}; ports on node2 {translated:?}"
        );
        // Once both connections sent again (every 10 ms).
        std::thread::sleep(Duration::from_millis(300));
        let on_node3 = translated_ports(&scene.cluster, "node3")?;
        ensure!(
            on_node3 == translated,
            "node3 translated the connections to {on_node3:?}, node2 to {translated:?}"
        );
        // node3 tells node2 in turn, which takes its egress IP back after the rejoin time.
        scene.cluster.cut_off("node2", false)?;
        let back = scene.until_held_by("node2", "node3")?;
        eprintln!("node2 back: holds the egress IP again after {back:?}");
        std::thread::sleep(Duration::from_millis(300));
        let back_on_node2 = translated_ports(&scene.cluster, "node2")?;
        for stream in streams {
            let outcome = stream.wait(Duration::from_secs(30))?;
            eprintln!("stream across the takeover: {outcome:?}");
            ensure!(
                outcome.survived,
                "a long-lived connection broke: {outcome:?}"
            );
        }
        ensure!(
            back_on_node2 == translated,
            "back on node2, the connections are translated to {back_on_node2:?}, before to {translated:?}"
        );
        Ok(())
    })
}

/// The source ports `node` translates the pods' connections to the echo server to, sorted.
fn translated_ports(cluster: &Cluster, node: &str) -> Result<Vec<u16>> {
    let listed = netlab::exec(
        &cluster.node(node)?.netns,
        [
            "conntrack",
            "-L",
            "-p",
            "tcp",
            "--state",
            "ESTABLISHED",
            "--reply-dst",
            &EGRESS_IP.to_string(),
        ],
    )?;
    let mut ports: Vec<u16> = listed
        .lines()
        .filter_map(|line| {
            line.split_whitespace()
                .filter_map(|f| f.strip_prefix("dport="))
                .nth(1)?
                .parse()
                .ok()
        })
        .collect();
    ports.sort_unstable();
    Ok(ports)
}

/// node3 announced the egress IP when it took it and again a few times (upstream caches miss
/// single announcements), and never once node2 had taken it back.
fn announced_while_held(cluster: &Cluster, arp: &ArpSeen) -> Result<()> {
    let mac = |node: &str| -> Result<String> {
        let node = cluster.node(node)?;
        let shown = node.exec(["ip", "-br", "link", "show", &node.uplink])?;
        shown
            .split_whitespace()
            .nth(2)
            .map(str::to_owned)
            .context("no link-layer address")
    };
    let (node2, node3) = (mac("node2")?, mac("node3")?);
    eprintln!(
        "announcements: {:?} (node2 {node2}, node3 {node3})",
        arp.announcers
    );
    let taken = arp
        .announcers
        .iter()
        .position(|m| *m == node3)
        .context("node3 never announced the egress IP it took")?;
    let back = arp.announcers[taken..]
        .iter()
        .position(|m| *m == node2)
        .map_or(arp.announcers.len(), |i| taken + i);
    let by_node3 = arp.announcers[taken..back].len();
    ensure!(
        by_node3 >= 4,
        "node3 announced the egress IP {by_node3} times while it held it, not 4"
    );
    ensure!(
        !arp.announcers[back..].contains(&node3),
        "node3 announced the egress IP after node2 took it back: {:?}",
        arp.announcers
    );
    Ok(())
}

/// The holder is cut off while the agent of the node next in line restarts: until that agent
/// is back, the pod's packets reach a node that does not translate them and are dropped there
/// (never sent with a node address); once back, it waits for its probes to settle, then takes
/// the egress IP, alone.
#[test]
fn a_takeover_due_while_the_takers_agent_restarts_happens_when_it_is_back() -> Result<()> {
    Scene::run(|scene| {
        let loop_ = probe(&scene.cluster, &scene.pod, 8)?;
        let arp = scene.cluster.watch_arp(EGRESS_IP)?;
        std::thread::sleep(Duration::from_millis(800));

        scene.agents[2].stop()?;
        let cut = Instant::now();
        scene.cluster.cut_off("node2", true)?;
        std::thread::sleep(Duration::from_millis(500));
        ensure!(
            !scene.holds("node3"),
            "node3 took the egress IP with no agent"
        );
        scene.agents[2] = scene.cluster.start_agent("node3", FAILOVER_ARGS)?;
        wait_until(APPLY, || scene.holds("node3")).context("node3 did not take over")?;
        eprintln!(
            "restarted node3 holds the egress IP {:?} after the cut",
            cut.elapsed()
        );

        scene.cluster.cut_off("node2", false)?;
        let back = scene.until_held_by("node2", "node3")?;
        eprintln!("node2 back: holds the egress IP again after {back:?}");
        let answers = loop_.wait_timed(Duration::from_secs(30))?;
        let gap = longest_gap(&answers)?;
        one_answerer(&arp.finish()?)?;
        // The restart (half a second here), the new agent's start and its wait for the probes
        // to settle (the rejoin time, 1 s, since node2 never answers it).
        ensure!(
            gap < Duration::from_secs(4),
            "new connections went unanswered for {gap:?}"
        );
        Ok(())
    })
}

#[test]
fn a_killed_agent_moves_nothing_within_its_lease_and_is_fenced_after() -> Result<()> {
    Scene::run(|scene| {
        let stream = scene.stream(8)?;
        let loop_ = probe(&scene.cluster, &scene.pod, 10)?;
        let arp = scene.cluster.watch_arp(EGRESS_IP)?;
        std::thread::sleep(Duration::from_millis(500));

        // Away for less than the lease (2 s): the kernel keeps serving, nothing moves.
        scene.agents[1].kill()?;
        std::thread::sleep(Duration::from_millis(1200));
        ensure!(
            !scene.holds("node3"),
            "node3 took over from a live data path"
        );
        scene.agents[1] = scene.cluster.start_agent("node2", FAILOVER_ARGS)?;
        std::thread::sleep(Duration::from_millis(1500));
        ensure!(scene.holds("node2") && !scene.holds("node3"));

        // Away for longer: at the end of the lease node2's data path stops serving on its own,
        // its probe answers say so, and node3 takes over, with no agent on node2.
        scene.agents[1].kill()?;
        let killed = Instant::now();
        scene.until_holds("node3")?;
        let took = killed.elapsed();
        eprintln!("agent killed: node3 holds the egress IP {took:?} later (lease 2 s)");
        ensure!(
            took > Duration::from_millis(1500),
            "node3 took over before node2's lease ran out ({took:?})"
        );
        std::thread::sleep(Duration::from_millis(1000));
        let answers = loop_.stop_timed()?;
        let gap = longest_gap(&answers)?;
        let arp = arp.finish()?;
        let outcome = stream.wait(Duration::from_secs(30))?;
        eprintln!("longest gap {gap:?}; stream {outcome:?}");
        one_answerer(&arp)?;
        ensure!(
            gap < Duration::from_millis(600),
            "new connections went unanswered for {gap:?}"
        );
        ensure!(
            outcome.survived,
            "the long-lived connection broke: {outcome:?}"
        );
        Ok(())
    })
}

/// Reading a large objects file takes the agents seconds (10,000 more pods, in a debug build:
/// about 6 s, longer than the 2 s lease; 20,000 outgrew the 20 s the test gives an apply
/// while the other failover tests ran beside it): their loops go on renewing the lease meanwhile, so the holder
/// is not fenced for it, nothing moves, and new connections keep leaving with the egress IP.
#[test]
fn a_large_objects_file_is_read_without_fencing_the_holder() -> Result<()> {
    Scene::run(|scene| {
        let loop_ = probe(&scene.cluster, &scene.pod, 20)?;
        std::thread::sleep(Duration::from_millis(300));
        let written = Instant::now();
        scene.cluster.update_objects(|o| {
            let base = u32::from(std::net::Ipv4Addr::new(10, 200, 0, 0));
            for i in 0..10_000 {
                o.pods.push(
                    Pod::new("payments", format!("bulk-{i}"))
                        .label("app", "batch")
                        .node("elsewhere")
                        .ip(std::net::Ipv4Addr::from(base + i)),
                );
            }
        })?;
        wait_all_applied(&scene.cluster)?;
        let took = written.elapsed();
        std::thread::sleep(Duration::from_millis(300));
        let answers = loop_.stop_timed()?;
        let gap = longest_gap(&answers)?;
        eprintln!("10,000 pods more read and applied in {took:?}; longest gap {gap:?}");
        ensure!(
            scene.holds("node2") && !scene.holds("node3"),
            "the egress IP moved while the agents read the file"
        );
        ensure!(
            gap < Duration::from_millis(300),
            "new connections went unanswered for {gap:?} while the agents read the file"
        );
        Ok(())
    })
}

#[test]
fn a_draining_holder_hands_over_with_no_gap() -> Result<()> {
    Scene::run(|scene| {
        scene.agents[1].stop()?;
        let mut args: Vec<&str> = FAILOVER_ARGS.to_vec();
        args.push("--drain-on-stop");
        scene.agents[1] = scene.cluster.start_agent("node2", &args)?;
        std::thread::sleep(Duration::from_millis(1500));
        let stream = scene.stream(5)?;
        let loop_ = probe(&scene.cluster, &scene.pod, 5)?;
        let arp = scene.cluster.watch_arp(EGRESS_IP)?;
        std::thread::sleep(Duration::from_millis(1000));

        scene.agents[1].stop()?;
        ensure!(scene.holds("node3") && !scene.holds("node2"));
        handed_over_without_a_gap("drain", loop_, stream, arp)
    })
}

/// A cordoned holder drains as one told to by SIGTERM: the others take its egress IP within
/// an interval of hearing it drain, while it translates what still reaches it.
#[test]
fn a_cordoned_holder_hands_over_with_no_gap() -> Result<()> {
    Scene::run(|scene| {
        let stream = scene.stream(5)?;
        let loop_ = probe(&scene.cluster, &scene.pod, 5)?;
        let arp = scene.cluster.watch_arp(EGRESS_IP)?;
        std::thread::sleep(Duration::from_millis(1000));

        let mut cordoned = Ok(());
        scene.cluster.update_objects(|o| {
            cordoned = o.node_mut("node2").map(|n| n.unschedulable = true);
        })?;
        cordoned?;
        let took = scene.until_held_by("node3", "node2")?;
        eprintln!("cordon: node3 holds the egress IP alone after {took:?}");
        handed_over_without_a_gap("cordon", loop_, stream, arp)?;

        // Uncordoned, node2 serves again and takes its egress IP back.
        scene.cluster.update_objects(|o| {
            if let Ok(node) = o.node_mut("node2") {
                node.unschedulable = false;
            }
        })?;
        let back = scene.until_held_by("node2", "node3")?;
        eprintln!("uncordoned: node2 holds the egress IP again after {back:?}");
        Ok(())
    })
}

/// What a handover without a gap leaves: at most 2 failed new connections and no gap over
/// 150 ms, the long-lived stream alive, one node answering ARP throughout. The nodes switch
/// each at its own probe tick: a connection opened between the first and the last of them to
/// act may take the old path out and meet the new ARP answer on its way back (README,
/// "Failover").
fn handed_over_without_a_gap(
    what: &str,
    loop_: ProbeLoop,
    stream: Stream,
    arp: netlab::ArpWatch,
) -> Result<()> {
    let answers = loop_.wait_timed(Duration::from_secs(30))?;
    let failed = answers.iter().filter(|(_, a)| a.source().is_none()).count();
    let gap = longest_gap(&answers)?;
    let outcome = stream.wait(Duration::from_secs(30))?;
    let arp = arp.finish()?;
    eprintln!("{what}: {failed} failed connections, longest gap {gap:?}; stream {outcome:?}");
    ensure!(
        failed <= 2 && gap < Duration::from_millis(150),
        "{what}: {failed} connections failed, the longest gap {gap:?}"
    );
    ensure!(
        outcome.survived,
        "{what}: the long-lived connection broke: {outcome:?}"
    );
    one_answerer(&arp)
}

/// Sends `signal` to the agent's process.
fn signal(agent: &AgentHandle, signal: libc::c_int) -> Result<()> {
    let pid = libc::pid_t::try_from(agent.pid())?;
    // SAFETY: plain syscall on a child we have not reaped.
    ensure!(
        unsafe { libc::kill(pid, signal) } == 0,
        "cannot signal the agent: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

#[test]
fn a_frozen_agent_is_fenced_at_the_end_of_its_lease_and_rejoins_after_it_thaws() -> Result<()> {
    Scene::run(|scene| {
        let stream = scene.stream(7)?;
        let loop_ = probe(&scene.cluster, &scene.pod, 9)?;
        let arp = scene.cluster.watch_arp(EGRESS_IP)?;
        std::thread::sleep(Duration::from_millis(500));

        // Frozen (SIGSTOP): nothing renews the lease; the kernel keeps serving until it runs
        // out (2 s), then answers fenced and node3 takes over.
        signal(&scene.agents[1], libc::SIGSTOP)?;
        let frozen = Instant::now();
        scene.until_holds("node3")?;
        let took = frozen.elapsed();
        eprintln!("agent frozen: node3 holds the egress IP {took:?} later (lease 2 s)");
        ensure!(
            took > Duration::from_millis(1500),
            "node3 took over before node2's lease ran out ({took:?})"
        );
        std::thread::sleep(Duration::from_millis(500));

        // Thawed: its plan is from before the break; it must not serve with it, and takes
        // the egress IP back only after the rejoin time.
        signal(&scene.agents[1], libc::SIGCONT)?;
        let back = scene.until_held_by("node2", "node3")?;
        eprintln!("agent thawed: node2 holds the egress IP again after {back:?}");
        ensure!(
            back > Duration::from_millis(900),
            "node2 took its egress IP back before the rejoin time ({back:?})"
        );
        let answers = loop_.wait_timed(Duration::from_secs(30))?;
        longest_gap(&answers)?;
        one_answerer(&arp.finish()?)?;
        // Across the fencing and the move back.
        let outcome = stream.wait(Duration::from_secs(30))?;
        eprintln!("stream {outcome:?}");
        ensure!(
            outcome.survived,
            "the long-lived connection broke: {outcome:?}"
        );
        Ok(())
    })
}

#[test]
fn an_edit_that_moves_the_egress_ip_has_one_holder_at_a_time_and_streams_survive() -> Result<()> {
    // Only node3 may hold it now.
    objects_move_the_egress_ip("edit", |objects| {
        let mut moved = netlab::fixture::gateway(netlab::fixture::GATEWAY, EGRESS_IP);
        moved.node_selector = netlab::objects::match_labels([("kubernetes.io/hostname", "node3")]);
        objects.set_gateway(moved);
        Ok(())
    })
}

#[test]
fn a_holder_turning_not_ready_hands_over_with_one_holder_at_a_time_and_streams_survive()
-> Result<()> {
    // Its Node says NotReady (the kubelet stopped reporting) while its data path still serves.
    objects_move_the_egress_ip("NotReady", |objects| {
        objects.node_mut("node2")?.ready = false;
        Ok(())
    })
}

/// A change of the objects moves the egress IP from node2, which still serves, to node3: for
/// four probe intervals every node keeps sending to node2, which translates without announcing
/// the IP any more; then node3 takes it and the others follow, while node2 translates what
/// still reaches it for two intervals more. No gap, and never two nodes answering ARP.
fn objects_move_the_egress_ip(
    what: &str,
    edit: impl FnOnce(&mut netlab::objects::Objects) -> Result<()>,
) -> Result<()> {
    Scene::run(|scene| {
        let stream = scene.stream(4)?;
        let loop_ = probe(&scene.cluster, &scene.pod, 4)?;
        let arp = scene.cluster.watch_arp(EGRESS_IP)?;
        std::thread::sleep(Duration::from_millis(1000));

        let mut edited = Ok(());
        scene.cluster.update_objects(|o| edited = edit(o))?;
        edited?;
        let took = scene.until_held_by("node3", "node2")?;
        eprintln!("{what}: node3 holds the egress IP alone after {took:?}");
        handed_over_without_a_gap(what, loop_, stream, arp)
    })
}

#[test]
fn agents_that_start_together_have_one_holder_and_restart_together_without_a_leak() -> Result<()> {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut cluster = three_nodes(env!("CARGO_BIN_EXE_se-probe").as_ref())?;
    let pod = api_pod(&mut cluster, "api-1", "node1")?;
    cluster.write_objects()?;
    // Watched from before the first agent starts: each node must hear the others before it
    // takes anything, or all would hold the egress IP for a moment.
    let arp = cluster.watch_arp(EGRESS_IP)?;
    let agents = cluster
        .nodes()
        .iter()
        .map(|n| cluster.start_agent(&n.name, FAILOVER_ARGS))
        .collect::<Result<_>>()?;
    let mut scene = Scene {
        cluster,
        pod,
        agents,
    };
    let result = start_and_restart_together(&mut scene, arp);
    scene.show_logs_if(result)
}

fn start_and_restart_together(scene: &mut Scene, arp: netlab::ArpWatch) -> Result<()> {
    netlab::fixture::wait_all_applied(&scene.cluster)?;
    expect_source(&scene.cluster, &scene.pod, EGRESS_IP)?;
    let took = scene.until_held_by("node2", "node3")?;
    eprintln!("started together: node2 holds the egress IP alone {took:?} after all applied");
    std::thread::sleep(Duration::from_millis(500));

    // All agents restart at once (a DaemonSet rolled out in one go): the data path serves on
    // its lease meanwhile, and the new agents take it over as it is.
    let stream = scene.stream(5)?;
    let loop_ = probe(&scene.cluster, &scene.pod, 5)?;
    std::thread::sleep(Duration::from_millis(500));
    scene.restart_all()?;
    netlab::fixture::wait_all_applied(&scene.cluster)?;
    ensure!(
        scene.holds("node2") && !scene.holds("node3"),
        "the egress IP moved when the agents restarted"
    );
    let answers = loop_.wait_timed(Duration::from_secs(30))?;
    let failed = answers.iter().filter(|(_, a)| a.source().is_none()).count();
    let gap = longest_gap(&answers)?;
    let outcome = stream.wait(Duration::from_secs(30))?;
    eprintln!("restart: {failed} failed connections, longest gap {gap:?}; stream {outcome:?}");
    // Three agents loading and verifying their programs at once on two cores starve the
    // loop now and then: 11-23 ms gaps in most runs, up to 2 failed connections and 119 ms
    // in one. A leak or a move would show above; this bounds the rest.
    ensure!(
        failed <= 3 && gap < Duration::from_millis(300),
        "{failed} connections failed while the agents restarted, the longest gap {gap:?}"
    );
    ensure!(
        outcome.survived,
        "the long-lived connection broke: {outcome:?}"
    );
    one_answerer(&arp.finish()?)
}
