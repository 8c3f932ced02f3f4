//! What operators see of the agents: the Prometheus endpoint (`--metrics-addr`) and its
//! `/healthz` and `/readyz`, scraped from inside each node's namespace, `static-egress status`
//! on a node, the NAT audit log and the kernel programs' log, while selected pods make real
//! connections.

use std::io::Write as _;
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail, ensure};
use netlab::fixture::{
    APPLY, EGRESS_IP, api_pod, expect_source, live_status, start_agents, three_nodes,
    with_agent_logs,
};
use netlab::{AgentHandle, Cluster, LabPod, wait_until};

const METRICS_PORT: u16 = 9547;

/// With `--kernel-log debug` the kernel programs say what they drop and why; without it (the
/// default) they say nothing.
#[test]
fn the_kernel_programs_log_their_drops_only_when_asked() -> Result<()> {
    let mut cluster = three_nodes(env!("CARGO_BIN_EXE_se-probe").as_ref())?;
    let asked = api_pod(&mut cluster, "api-1", "node1")?;
    let quiet = api_pod(&mut cluster, "api-3", "node3")?;
    cluster.write_objects()?;
    let agents = vec![
        cluster.start_agent("node1", ["--kernel-log", "debug"])?,
        cluster.start_agent("node2", ["--kernel-log", "debug"])?,
        cluster.start_agent("node3", Vec::<String>::new())?,
    ];
    let result = netlab::fixture::wait_all_applied(&cluster)
        .and_then(|()| kernel_log(&mut cluster, &agents, [&asked, &quiet]));
    with_agent_logs(&agents, result)
}

fn kernel_log(cluster: &mut Cluster, agents: &[AgentHandle], pods: [&LabPod; 2]) -> Result<()> {
    for pod in pods {
        expect_source(cluster, pod, EGRESS_IP)?;
    }
    // No node may hold the egress IP any more: FailClosed drops the pods' traffic.
    netlab::fixture::change(cluster, |objects| {
        objects.set_gateway(
            netlab::fixture::gateway(netlab::fixture::GATEWAY, EGRESS_IP)
                .node_selector(netlab::objects::match_labels([("egress", "nowhere")])),
        );
    })?;
    for pod in pods {
        ensure!(
            cluster.ask(pod).is_err(),
            "{} got an answer without a holder",
            pod.name
        );
    }
    let said = format!(
        "no node holds egress IP {EGRESS_IP}: dropped {} -> {} (FailClosed)",
        pods[0].ip,
        cluster.ext_ip()
    );
    let log = |node: &str| {
        agents
            .iter()
            .find(|a| a.node() == node)
            .map(|a| a.log().unwrap_or_default())
            .unwrap_or_default()
    };
    wait_until(APPLY, || log("node1").contains(&said))
        .with_context(|| format!("node1 did not log {said:?}"))?;
    let node3 = log("node3");
    ensure!(
        !node3.contains("static_egress_ebpf"),
        "the kernel programs of node3 logged without --kernel-log:\n{node3}"
    );
    Ok(())
}

#[test]
fn the_audit_log_has_a_line_for_each_connection_the_holder_translated() -> Result<()> {
    let mut cluster = three_nodes(env!("CARGO_BIN_EXE_se-probe").as_ref())?;
    let pod = api_pod(&mut cluster, "api-1", "node1")?;
    cluster.write_objects()?;
    let log = cluster.node("node2")?.state_dir.join("audit.jsonl");
    let mut agents = Vec::new();
    for node in ["node1", "node2", "node3"] {
        let path = cluster.node(node)?.state_dir.join("audit.jsonl");
        agents.push(cluster.start_agent(node, ["--audit-log", &path.to_string_lossy()])?);
    }
    netlab::fixture::wait_all_applied(&cluster)?;
    with_agent_logs(&agents, audited(&cluster, &pod, &log))
}

/// Has `holder`'s conntrack forget its TCP connections translated to the egress IP, which ends
/// them for the audit log; how many there were.
fn forget_translated(cluster: &Cluster, holder: &str) -> Result<usize> {
    let holder = cluster.node(holder)?;
    let forgotten = netlab::exec_output(
        &holder.netns,
        [
            "conntrack",
            "-D",
            "-p",
            "tcp",
            "--reply-dst",
            &EGRESS_IP.to_string(),
        ],
    )?;
    let forgotten = String::from_utf8_lossy(&forgotten.stderr).into_owned();
    eprintln!("{}", forgotten.trim());
    // "conntrack v1.4.7 (conntrack-tools): 6 flow entries have been deleted."
    forgotten
        .split_whitespace()
        .rev()
        .nth(5)
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no count in {forgotten:?}"))
}

fn audited(cluster: &Cluster, pod: &LabPod, log: &std::path::Path) -> Result<()> {
    expect_source(cluster, pod, EGRESS_IP)?;
    let connections = 5;
    for _ in 0..connections {
        ensure!(cluster.ask(pod)? == EGRESS_IP);
    }
    // conntrack says a connection ended when it forgets it: a closed TCP connection after
    // TIME_WAIT (2 min by default) and its next garbage collection (up to a minute more).
    // Here it forgets them now.
    let tracked = forget_translated(cluster, "node2")?;
    ensure!(
        tracked >= connections,
        "only {tracked} connections were tracked"
    );
    let lines = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|l: &serde_json::Value| l["protocol"] == "tcp")
            .collect()
    };
    // One line for each connection conntrack tracked, no more, no less.
    wait_until(APPLY, || lines().len() >= tracked)
        .with_context(|| format!("fewer than {tracked} TCP lines: {:?}", lines()))?;
    ensure!(
        lines().len() == tracked,
        "{} lines for {tracked} connections",
        lines().len()
    );
    let ext = cluster.ext_ip().to_string();
    for line in lines() {
        eprintln!("{line}");
        ensure!(
            line["pod"] == "payments/api-1"
                && line["pod_ip"] == pod.ip.to_string()
                && line["egress_ip"] == EGRESS_IP.to_string()
                && line["destination"] == ext
                && line["egress_port"].is_u64()
                && line["destination_port"].is_u64()
                && line["bytes_out"].as_u64().is_some_and(|b| b > 0)
                && line["bytes_in"].as_u64().is_some_and(|b| b > 0)
                && line["start"].as_f64() < line["end"].as_f64(),
            "an audit line lacks what a translated connection of api-1 has: {line}"
        );
    }
    // Only the holder translates, so only it logs.
    let node1 = cluster.node("node1")?.state_dir.join("audit.jsonl");
    let elsewhere = std::fs::read_to_string(&node1).unwrap_or_default();
    ensure!(elsewhere.is_empty(), "node1 logged: {elsewhere}");
    Ok(())
}

#[test]
fn status_shows_a_node_while_its_agent_runs_and_after_it_stopped() -> Result<()> {
    let mut cluster = three_nodes(env!("CARGO_BIN_EXE_se-probe").as_ref())?;
    let pod = api_pod(&mut cluster, "api-1", "node1")?;
    let mut agents = start_agents(&cluster, &[])?;
    let result = node_status(&cluster, &pod, &mut agents);
    with_agent_logs(&agents, result)
}

fn node_status(cluster: &Cluster, pod: &LabPod, agents: &mut [AgentHandle]) -> Result<()> {
    expect_source(cluster, pod, EGRESS_IP)?;
    for _ in 0..10 {
        ensure!(cluster.ask(pod)? == EGRESS_IP);
    }
    let table = live_status(cluster, "node1", "table")?;
    eprintln!("{table}");
    // Columns are padded: compare with single spaces.
    let words = |text: &str| text.split_whitespace().collect::<Vec<_>>().join(" ");
    for line in [
        "node node1: agent running",
        "corp-fw 10.99.0.200 node2",
        "payments/api-1 10.244.1.2 corp-fw 10.99.0.200",
        "counters from the kernel",
    ] {
        ensure!(
            table.lines().any(|l| words(l).contains(line)),
            "{line:?} missing from:\n{table}"
        );
    }
    let packets = |json: &str| -> Result<u64> {
        let value: serde_json::Value = serde_json::from_str(json)?;
        ensure!(value["counters_from"] == "kernel", "{json}");
        value["gateways"][0]["packets"]
            .as_u64()
            .with_context(|| format!("no packets in {json}"))
    };
    let running = packets(&live_status(cluster, "node1", "json")?)?;
    ensure!(
        running >= 30,
        "{running} packets counted for 10 connections"
    );

    // The agent stops (SIGTERM leaves the data path): the pod's traffic goes on, and so do
    // the counters that status reads from the pinned maps.
    let node1 = agents
        .iter_mut()
        .find(|a| a.node() == "node1")
        .context("no agent on node1")?;
    node1.stop()?;
    for _ in 0..10 {
        ensure!(cluster.ask(pod)? == EGRESS_IP);
    }
    let stopped = packets(&live_status(cluster, "node1", "json")?)?;
    ensure!(
        stopped >= running + 30,
        "the counters went from {running} to {stopped} packets over 10 connections without the agent"
    );
    Ok(())
}

#[test]
fn metrics_count_a_pods_traffic_and_say_who_holds_its_egress_ip() -> Result<()> {
    let mut cluster = three_nodes(env!("CARGO_BIN_EXE_se-probe").as_ref())?;
    let pod = api_pod(&mut cluster, "api-1", "node1")?;
    let addr = format!("0.0.0.0:{METRICS_PORT}");
    let agents = start_agents(&cluster, &["--metrics-addr", &addr])?;
    with_agent_logs(&agents, scrapes(&cluster, &pod))
}

fn scrapes(cluster: &Cluster, pod: &LabPod) -> Result<()> {
    expect_source(cluster, pod, EGRESS_IP)?;
    for node in ["node1", "node2", "node3"] {
        wait_until(APPLY, || {
            get(cluster, node, "/readyz").is_ok_and(|(code, _)| code == 200)
        })
        .with_context(|| format!("/readyz on {node} did not answer 200"))?;
        let (code, body) = get(cluster, node, "/healthz")?;
        ensure!(code == 200, "/healthz on {node}: {code} {body}");
    }
    let packets = r#"static_egress_gateway_packets_total{gateway="corp-fw"}"#;
    let before = sample(&metrics(cluster, "node1")?, packets)?;
    let connections = 20;
    for _ in 0..connections {
        ensure!(cluster.ask(pod)? == EGRESS_IP);
    }
    // Read from the kernel at each scrape; the last answers may still be on their way.
    let mut text = String::new();
    wait_until(APPLY, || {
        text = metrics(cluster, "node1").unwrap_or_default();
        sample(&text, packets).is_ok_and(|after| after >= before + f64::from(connections) * 3.0)
    })
    .with_context(|| format!("node1's packet counter did not rise by 3 per connection:\n{text}"))?;
    eprintln!("node1:\n{text}");
    for (name, at_least) in [
        (r#"static_egress_selected_pods{gateway="corp-fw"}"#, 1.0),
        ("static_egress_ready", 1.0),
        ("static_egress_apply_duration_seconds_count", 1.0),
    ] {
        ensure!(
            sample(&text, name)? >= at_least,
            "{name} is below {at_least} on node1"
        );
    }
    ensure!(
        sample(
            &text,
            r#"static_egress_egress_ip_held_here{gateway="corp-fw",egress_ip="10.99.0.200",holder="node2"}"#
        )? == 0.0,
        "node1 says it holds the egress IP"
    );

    let holder = metrics(cluster, "node2")?;
    eprintln!("node2:\n{holder}");
    ensure!(
        sample(
            &holder,
            r#"static_egress_egress_ip_held_here{gateway="corp-fw",egress_ip="10.99.0.200",holder="node2"}"#
        )? == 1.0,
        "node2 does not say it holds the egress IP"
    );
    let tracked = sample(
        &holder,
        r#"static_egress_snat_connections{egress_ip="10.99.0.200"}"#,
    )?;
    ensure!(
        tracked >= f64::from(connections),
        "node2 tracks {tracked} connections translated to the egress IP, not {connections}"
    );
    let share = sample(
        &holder,
        r#"static_egress_snat_port_use_ratio{egress_ip="10.99.0.200"}"#,
    )?;
    ensure!(
        share > 0.0 && share < 0.01,
        "the busiest destination's share of source ports is {share}"
    );
    let (code, _) = get(cluster, "node1", "/nothing")?;
    ensure!(code == 404, "an unknown path answered {code}");
    Ok(())
}

fn metrics(cluster: &Cluster, node: &str) -> Result<String> {
    let (code, body) = get(cluster, node, "/metrics")?;
    ensure!(code == 200, "/metrics on {node}: {code} {body}");
    ensure!(body.ends_with("# EOF\n"), "no OpenMetrics end: {body}");
    Ok(body)
}

/// The value of the sample `name` (with its labels, as the text shows them).
fn sample(text: &str, name: &str) -> Result<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .with_context(|| format!("no sample {name} in:\n{text}"))?
        .trim()
        .parse()
        .with_context(|| format!("{name} is not a number"))
}

/// An HTTP GET of `path` on the agent's endpoint, from inside the node's namespace: the status
/// code and the body.
fn get(cluster: &Cluster, node: &str, path: &str) -> Result<(u16, String)> {
    let netns = &cluster.node(node)?.netns;
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, "socat", "-t", "5", "-"])
        .arg(format!("TCP:127.0.0.1:{METRICS_PORT}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run socat")?;
    child
        .stdin
        .take()
        .context("no stdin")?
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {node}\r\n\r\n").as_bytes())?;
    let out = child.wait_with_output()?;
    let answer = String::from_utf8_lossy(&out.stdout).into_owned();
    let Some((head, body)) = answer.split_once("\r\n\r\n") else {
        bail!(
            "no HTTP answer from {node}: {answer}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let code = head
        .split_whitespace()
        .nth(1)
        .context("no status code")?
        .parse()?;
    Ok((code, body.to_owned()))
}

/// A reader that does not keep up with the audit log costs lines, never connections: the holder
/// logs into a pipe (4 KiB, a dozen lines) whose reader waits while 40 connections end at once,
/// with 4 lines allowed to queue (`--audit-queue 4`). Every connection is answered with the
/// egress IP; every line the reader gets later plus every line the agent says it dropped make
/// exactly the connections conntrack tracked.
#[test]
fn a_slow_audit_reader_loses_lines_never_connections() -> Result<()> {
    let mut cluster = three_nodes(env!("CARGO_BIN_EXE_se-probe").as_ref())?;
    let pod = api_pod(&mut cluster, "api-1", "node1")?;
    cluster.write_objects()?;
    let dir = cluster.dir().to_owned();
    let fifo = dir.join("audit.fifo");
    let go = dir.join("audit.go");
    let out = dir.join("audit.read");
    netlab::exec(cluster.router_netns(), ["mkfifo", &fifo.to_string_lossy()])?;
    let mut reader = Command::new("python3")
        .args(["-c", SLOW_READER])
        .args([&fifo, &go, &out])
        .spawn()?;
    let queue = "4";
    let agents = vec![
        cluster.start_agent("node1", Vec::<String>::new())?,
        cluster.start_agent(
            "node2",
            [
                "--audit-log",
                &fifo.to_string_lossy(),
                "--audit-queue",
                queue,
            ],
        )?,
        cluster.start_agent("node3", Vec::<String>::new())?,
    ];
    let result = netlab::fixture::wait_all_applied(&cluster)
        .and_then(|()| slow_reader(&cluster, &pod, &agents[1], (&go, &out), &mut reader));
    let _ = reader.kill();
    with_agent_logs(&agents, result)
}

/// Opens the pipe, shrinks it to one page, reads nothing until the second file exists, then
/// reads until nothing came for 2 s and writes what it read to the third file.
const SLOW_READER: &str = r#"
import fcntl, os, sys, time
path, go, out = sys.argv[1:4]
fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
fcntl.fcntl(fd, 1031, 4096)  # F_SETPIPE_SZ
while not os.path.exists(go):
    time.sleep(0.05)
data, idle = b"", time.time()
while time.time() - idle < 2:
    try:
        chunk = os.read(fd, 65536)
    except BlockingIOError:
        chunk = b""
    if chunk:
        data, idle = data + chunk, time.time()
    else:
        time.sleep(0.05)
open(out, "wb").write(data)
"#;

fn slow_reader(
    cluster: &Cluster,
    pod: &LabPod,
    holder_agent: &AgentHandle,
    (go, out): (&std::path::Path, &std::path::Path),
    reader: &mut std::process::Child,
) -> Result<()> {
    ensure!(
        netlab::fixture::has_address(cluster, "node2", EGRESS_IP)?,
        "the test expects node2 to hold {EGRESS_IP}"
    );
    expect_source(cluster, pod, EGRESS_IP)?;
    let connections = 40;
    for _ in 0..connections {
        ensure!(
            cluster.ask(pod)? == EGRESS_IP,
            "a connection left otherwise"
        );
    }
    let tracked = forget_translated(cluster, "node2")? as u64;
    ensure!(
        tracked >= connections,
        "only {tracked} connections were tracked"
    );
    // The events are read and the pipe and queue fill while the reader waits.
    std::thread::sleep(std::time::Duration::from_secs(2));
    // The connections still work meanwhile.
    ensure!(
        cluster.ask(pod)? == EGRESS_IP,
        "a connection failed while the log was stuck"
    );
    std::fs::write(go, "")?;
    reader.wait()?;
    let read = std::fs::read_to_string(out)?;
    let lines = read
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["protocol"] == "tcp")
        .count() as u64;
    let dropped = || -> Option<u64> {
        let log = holder_agent.log().ok()?;
        log.lines()
            .filter(|l| l.contains("audit lines dropped"))
            .filter_map(|l| {
                l.split("dropped=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .max()
    };
    wait_until(APPLY, || dropped().is_some()).context("the agent never said it dropped lines")?;
    let dropped = dropped().unwrap_or_default();
    eprintln!("{tracked} connections: {lines} lines read, {dropped} dropped");
    ensure!(dropped > 0 && lines > 0, "{lines} read, {dropped} dropped");
    ensure!(
        lines + dropped == tracked,
        "{lines} lines read and {dropped} dropped for {tracked} connections"
    );
    Ok(())
}
