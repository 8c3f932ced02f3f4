//! State you can trust: one agent (or cleanup) per state dir, records written durably, a
//! corrupt or missing record that blocks neither the agent nor `cleanup` (what is ours by name
//! is removed instead), the uninstall DaemonSet's cleanup restoring every node, and the
//! DaemonSet's capabilities being enough for the agent.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use netlab::fixture::{
    APPLY, EGRESS_IP, GATEWAY, api_pod, expect_source, gateway, has_address, start_agents,
    three_nodes, wait_all_applied,
};
use netlab::{AgentHandle, Cluster, NodeSnapshot, PodStyle, exec_output, wait_until};

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
/// The host paths of the DaemonSets, as the manifests name them.
const HOST_STATE_DIR: &str = "/var/lib/static-egress";
const HOST_BPFFS: &str = "/sys/fs/bpf";
const HOST_CNI_CONF: &str = "/host/etc/cni/net.d";
const HOST_CNI_BIN: &str = "/host/opt/cni/bin";

fn cluster() -> Result<Cluster> {
    three_nodes(env!("CARGO_BIN_EXE_se-probe").as_ref())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn node_ip(cluster: &Cluster, node: &str) -> Result<Ipv4Addr> {
    Ok(cluster.node(node)?.ip)
}

fn snapshots(cluster: &Cluster) -> Result<BTreeMap<String, NodeSnapshot>> {
    cluster
        .nodes()
        .iter()
        .map(|n| Ok((n.name.clone(), cluster.snapshot(&n.name)?)))
        .collect()
}

/// `static-egress cleanup` on `node` with exactly `args` (no lab paths added).
fn cleanup_with(cluster: &Cluster, node: &str, args: &[OsString]) -> Result<Output> {
    let bin = cluster.agent_bin()?;
    let mut argv = vec![bin.into_os_string(), "cleanup".into()];
    argv.extend(args.iter().cloned());
    exec_output(&cluster.node(node)?.netns, argv)
}

/// `--state-dir` and `--bpffs` of `node`, the only flags the uninstall DaemonSet gives.
fn lab_paths(cluster: &Cluster, node: &str) -> Result<Vec<OsString>> {
    let node = cluster.node(node)?;
    Ok(vec![
        "--state-dir".into(),
        node.state_dir.clone().into(),
        "--bpffs".into(),
        node.bpffs.clone().into(),
    ])
}

fn expect_success(output: &Output, what: &str) -> Result<String> {
    ensure!(
        output.status.success(),
        "{what} failed ({}): {}{}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    );
    Ok(text(&output.stdout))
}

/// Removes the node's status file and starts an agent there: [`Cluster::wait_applied`] then
/// waits for this agent's own apply.
fn start_fresh(cluster: &Cluster, node: &str, args: &[&str]) -> Result<AgentHandle> {
    let status = cluster.node(node)?.status_path();
    match fs::remove_file(&status) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", status.display()));
        }
        _ => {}
    }
    cluster.start_agent(node, args)
}

#[test]
fn a_second_agent_and_cleanup_are_refused_while_an_agent_runs() -> Result<()> {
    let mut cluster = cluster()?;
    let pod = api_pod(&mut cluster, "api-1", "node1")?;
    let mut agents = start_agents(&cluster, &[])?;
    expect_source(&cluster, &pod, EGRESS_IP)?;
    let running = agents[0].pid();
    let node1 = cluster.snapshot("node1")?;

    let mut second = cluster.start_agent("node1", std::iter::empty::<&str>())?;
    let status = second.wait_exit(Duration::from_secs(5))?;
    let log = second.log()?;
    eprintln!("second agent: {status}: {log}");
    ensure!(status.code() == Some(1), "second agent: {status}: {log}");
    let lines: Vec<&str> = log.lines().collect();
    ensure!(
        lines.len() == 1
            && lines[0].contains("agent.lock")
            && lines[0].contains(&format!("(pid {running})")),
        "wanted one line naming the lock and pid {running}: {log}"
    );
    ensure!(agents[0].is_running(), "the first agent stopped");

    let refused = cleanup_with(&cluster, "node1", &lab_paths(&cluster, "node1")?)?;
    let stderr = text(&refused.stderr);
    eprintln!("cleanup while the agent runs: {}: {stderr}", refused.status);
    ensure!(
        refused.status.code() == Some(1) && stderr.contains(&format!("(pid {running})")),
        "cleanup while an agent runs: {}: {stderr}",
        refused.status
    );
    let differences = node1.differences(&cluster.snapshot("node1")?);
    ensure!(
        differences.is_empty(),
        "a refused cleanup changed node1:\n{}",
        differences.join("\n")
    );
    expect_source(&cluster, &pod, EGRESS_IP)?;

    // The kernel drops the lock with the process, however it dies.
    agents[0].kill()?;
    let mut again = start_fresh(&cluster, "node1", &[])?;
    cluster.wait_applied("node1", APPLY)?;
    ensure!(again.is_running(), "the next agent: {}", again.log()?);
    expect_source(&cluster, &pod, EGRESS_IP)?;
    Ok(())
}

/// strace, attached to a running process, recording the calls that make a write durable.
struct Trace {
    child: std::process::Child,
    output: PathBuf,
}

impl Trace {
    fn attach(pid: u32, output: PathBuf) -> Result<Self> {
        let log = output.with_extension("stderr");
        let child = Command::new("strace")
            .args(["-f", "-y", "-qq", "-e"])
            .arg("trace=openat,fsync,fdatasync,rename,renameat,renameat2")
            .arg("-o")
            .arg(&output)
            .arg("-p")
            .arg(pid.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()
            .context("cannot run strace (`cargo xtask setup` installs it)")?;
        let mut trace = Self { child, output };
        // strace writes its output file once it has attached.
        wait_until(Duration::from_secs(5), || trace.output.exists())
            .context("strace did not attach")?;
        if let Some(status) = trace.child.try_wait()? {
            bail!("strace exited: {status}: {}", fs::read_to_string(&log)?);
        }
        Ok(trace)
    }

    /// Detaches and returns what was traced.
    fn finish(mut self) -> Result<String> {
        let pid = libc::pid_t::try_from(self.child.id())?;
        // SAFETY: plain syscall on our own child, not reaped yet.
        unsafe { libc::kill(pid, libc::SIGINT) };
        self.child.wait()?;
        Ok(fs::read_to_string(&self.output)?)
    }
}

/// Fails unless every replacement of `file` in `trace` (strace -f -y output) was preceded by an
/// fsync of the temporary file and followed by an fsync of its directory; returns how many.
fn durable_replacements(trace: &str, dir: &Path, file: &str) -> Result<usize> {
    let dir = dir.display().to_string();
    let tmp = format!("{dir}/{file}.tmp");
    let target = format!("{dir}/{file}");
    let lines: Vec<&str> = trace.lines().collect();
    let mut replaced = 0;
    let mut tmp_synced = false;
    for (i, line) in lines.iter().enumerate() {
        // `<path>` closes the descriptor's name: followed by `)`, or by ` <unfinished ...>`
        // where another thread's call came in between (`strace -f`).
        if line.contains("fsync(") && line.contains(&format!("<{tmp}>")) {
            tmp_synced = true;
        }
        let is_rename = line.contains("rename") && line.contains(&format!("\"{tmp}\""));
        if !is_rename || !line.contains(&format!("\"{target}\"")) {
            continue;
        }
        // The trace stopped in the middle of this one (a status written every few seconds
        // may be on its way when the test detaches): what follows was not traced.
        if line.contains("<detached") {
            break;
        }
        ensure!(
            tmp_synced,
            "{file} replaced without an fsync of {tmp} first:\n{trace}"
        );
        tmp_synced = false;
        let dir_synced = lines[i + 1..]
            .iter()
            .take_while(|l| !(l.contains("rename") && l.contains(&format!("\"{tmp}\""))))
            .any(|l| l.contains("fsync(") && l.contains(&format!("<{dir}>")));
        ensure!(
            dir_synced,
            "{file} replaced without an fsync of {dir} after the rename:\n{trace}"
        );
        replaced += 1;
    }
    Ok(replaced)
}

#[test]
fn the_record_is_flushed_to_disk_before_and_after_its_rename() -> Result<()> {
    let mut cluster = cluster()?;
    let pod = api_pod(&mut cluster, "api-1", "node1")?;
    let agents = start_agents(&cluster, &[])?;
    expect_source(&cluster, &pod, EGRESS_IP)?;
    let holder = &agents[1];
    ensure!(holder.node() == "node2");
    let state_dir = fs::canonicalize(&cluster.node("node2")?.state_dir)?;
    let trace = Trace::attach(holder.pid(), cluster.dir().join("node2-strace.txt"))?;

    // A new egress IP: node2 records it before adding it, and forgets the old one after.
    let moved = Ipv4Addr::new(10, 99, 0, 201);
    cluster.update_objects(|o| o.set_gateway(gateway(GATEWAY, moved)))?;
    wait_all_applied(&cluster)?;
    expect_source(&cluster, &pod, moved)?;
    let trace = trace.finish()?;

    let replaced = durable_replacements(&trace, &state_dir, "state.json")?;
    eprintln!("state.json replaced {replaced} times, each flushed before and after");
    ensure!(
        replaced >= 2,
        "wanted two new records, saw {replaced}:\n{trace}"
    );
    let statuses = durable_replacements(&trace, &state_dir, "status.json")?;
    ensure!(statuses >= 1, "no status written durably:\n{trace}");
    let record: serde_json::Value =
        serde_json::from_slice(&fs::read(state_dir.join("state.json"))?)?;
    ensure!(
        record["addresses"] == serde_json::json!([moved.to_string()]),
        "{record}"
    );
    Ok(())
}

#[test]
fn the_checker_of_durable_writes_tells_the_difference() -> Result<()> {
    let dir = Path::new("/x/state");
    let good = "1 fsync(9</x/state/state.json.tmp>) = 0\n\
                1 rename(\"/x/state/state.json.tmp\", \"/x/state/state.json\") = 0\n\
                1 openat(AT_FDCWD</>, \"/x/state\", O_RDONLY|O_CLOEXEC) = 9</x/state>\n\
                1 fsync(9</x/state>) = 0\n";
    assert_eq!(durable_replacements(good, dir, "state.json")?, 1);
    // What `fs::write` and `fs::rename` alone do.
    let plain = "1 rename(\"/x/state/state.json.tmp\", \"/x/state/state.json\") = 0\n";
    assert!(durable_replacements(plain, dir, "state.json").is_err());
    let no_dir = "1 fsync(9</x/state/state.json.tmp>) = 0\n\
                  1 rename(\"/x/state/state.json.tmp\", \"/x/state/state.json\") = 0\n";
    assert!(durable_replacements(no_dir, dir, "state.json").is_err());
    // The same calls split by another thread's (CI saw this).
    let split = "1 fsync(9</x/state/state.json.tmp> <unfinished ...>\n\
                 2 openat(AT_FDCWD</>, \"/x/objects.yaml\", O_RDONLY) = 10</x/objects.yaml>\n\
                 1 <... fsync resumed>) = 0\n\
                 1 rename(\"/x/state/state.json.tmp\", \"/x/state/state.json\" <unfinished ...>\n\
                 1 <... rename resumed>) = 0\n\
                 1 fsync(9</x/state> <unfinished ...>\n\
                 1 <... fsync resumed>) = 0\n";
    assert_eq!(durable_replacements(split, dir, "state.json")?, 1);
    Ok(())
}

/// node1's agent runs with other flags than the defaults, so that what `cleanup` removes by
/// name comes from its flags.
const NODE1_FLAGS: [&str; 6] = [
    "--fwmark",
    "0x10000",
    "--route-table",
    "1500",
    "--rule-priority",
    "1500",
];

#[test]
fn a_corrupt_or_missing_record_blocks_neither_the_agent_nor_cleanup() -> Result<()> {
    let mut cluster = cluster()?;
    let pod = api_pod(&mut cluster, "api-1", "node1")?;
    let node1 = cluster.node("node1")?.clone();
    let before = snapshots(&cluster)?;
    cluster.write_objects()?;
    let mut agents = vec![cluster.start_agent("node1", NODE1_FLAGS)?];
    for node in ["node2", "node3"] {
        agents.push(cluster.start_agent(node, std::iter::empty::<&str>())?);
    }
    wait_all_applied(&cluster).with_context(|| agents[0].log().unwrap_or_default())?;
    expect_source(&cluster, &pod, EGRESS_IP)?;
    // Someone else's rule at node1's priority with its mark and table, and one more selector
    // (listed after ours): not ours, with or without a record.
    let foreign = "1500:\tfrom all fwmark 0x10000/0x10000 iif lo lookup 1500";
    let foreign_args = [
        "priority",
        "1500",
        "iif",
        "lo",
        "fwmark",
        "0x10000/0x10000",
        "lookup",
        "1500",
    ];
    node1.exec(["ip", "rule", "add"].into_iter().chain(foreign_args))?;

    // The agent: a record cut short does not stop it; it is set aside and the agent starts
    // with an empty one, without a moment of unmarked traffic.
    let probe = cluster.start_loop(&pod, Duration::from_millis(20), 1000)?;
    agents[0].stop()?;
    let record = node1.state_dir.join("state.json");
    fs::write(&record, b"{\"uplink\": \"eth")?;
    agents[0] = start_fresh(&cluster, "node1", &NODE1_FLAGS)?;
    cluster
        .wait_applied("node1", APPLY)
        .with_context(|| agents[0].log().unwrap_or_default())?;
    std::thread::sleep(Duration::from_millis(500));
    let answers = probe.stop()?;
    ensure!(answers.len() > 10, "too few answers: {answers:?}");
    netlab::expect_all_from(&answers, EGRESS_IP)?;
    expect_source(&cluster, &pod, EGRESS_IP)?;
    let log = agents[0].log()?;
    ensure!(
        log.contains("unreadable") && log.contains("state.json.corrupt-"),
        "no warning about the corrupt record:\n{log}"
    );
    let aside: Vec<PathBuf> = fs::read_dir(&node1.state_dir)?
        .map(|e| Ok(e?.path()))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("state.json.corrupt-"))
        .collect();
    ensure!(aside.len() == 1, "set aside: {aside:?}");
    ensure!(fs::read(&aside[0])? == b"{\"uplink\": \"eth");
    let fresh: serde_json::Value = serde_json::from_slice(&fs::read(&record)?)?;
    ensure!(
        fresh["route_table"] == 1500
            && fresh["neighbours"]
                .as_array()
                .is_some_and(|n| !n.is_empty()),
        "the new record: {fresh}"
    );

    // Cleanup: node1 with a corrupt record (and the agent's flags), node2 (the holder) with
    // none at all, node3 with its record.
    for agent in &mut agents {
        agent.stop()?;
    }
    fs::write(&record, b"\0\0\0")?;
    fs::remove_file(cluster.node("node2")?.state_dir.join("state.json"))?;
    // What an agent holding an egress IP with `announce: Bgp` leaves in its announce table:
    // ours by name too.
    let node2 = cluster.node("node2")?;
    node2.exec([
        "ip",
        "route",
        "add",
        &format!("{EGRESS_IP}/32"),
        "dev",
        &node2.uplink,
        "table",
        "1491",
        "proto",
        "static",
    ])?;
    let mut node1_args = lab_paths(&cluster, "node1")?;
    node1_args.extend(NODE1_FLAGS.map(OsString::from));
    for (node, args) in [
        ("node1", node1_args.clone()),
        ("node2", lab_paths(&cluster, "node2")?),
        ("node3", lab_paths(&cluster, "node3")?),
    ] {
        let output = cleanup_with(&cluster, node, &args)?;
        let said = expect_success(&output, &format!("cleanup on {node}"))?;
        eprintln!("{node}: {said}{}", text(&output.stderr));
        ensure!(said.contains("removed"), "{node}: {said}");
        if node == "node1" {
            let rules = node1.exec(["ip", "rule"])?;
            ensure!(
                rules.contains(foreign),
                "someone else's rule is gone:\n{rules}"
            );
            node1.exec(["ip", "rule", "del"].into_iter().chain(foreign_args))?;
        }
        let differences = before[node].differences(&cluster.snapshot(node)?);
        if node == "node2" {
            // Egress addresses carry nothing that says they are ours: without the record,
            // the address stays (and the README says so).
            ensure!(
                !differences.is_empty()
                    && differences.iter().all(|d| {
                        d.starts_with("+ addr: ")
                            || (d.starts_with("+ route: local ")
                                && d.contains(&EGRESS_IP.to_string()))
                    })
                    && differences
                        .iter()
                        .any(|d| d.contains(&format!("{EGRESS_IP}/32"))),
                "node2 after cleanup without a record:\n{}",
                differences.join("\n")
            );
            let uplink = &cluster.node(node)?.uplink;
            cluster.node(node)?.exec([
                "ip",
                "addr",
                "del",
                &format!("{EGRESS_IP}/32"),
                "dev",
                uplink,
            ])?;
            assert_eq!(cluster.snapshot(node)?, before[node]);
        } else {
            ensure!(
                differences.is_empty(),
                "{node} after cleanup:\n{}",
                differences.join("\n")
            );
        }
        let again = expect_success(&cleanup_with(&cluster, node, &args)?, "second cleanup")?;
        ensure!(again.contains("nothing to remove"), "{node}: {again}");
        assert_eq!(cluster.snapshot(node)?, before[node]);
        let left: Vec<String> = fs::read_dir(&cluster.node(node)?.state_dir)?
            .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .filter(|n| !n.starts_with("state.json.corrupt-"))
            .collect();
        ensure!(left.is_empty(), "{node}: left in the state dir: {left:?}");
    }
    ensure!(!has_address(&cluster, "node2", EGRESS_IP)?);
    assert_eq!(cluster.ask(&pod)?, node_ip(&cluster, "node1")?);
    Ok(())
}

/// The uninstall DaemonSet's cleanup container, as `deploy/uninstall` renders it.
struct UninstallCleanup {
    args: Vec<String>,
    capabilities: Vec<String>,
}

fn kustomize(dir: &str) -> Result<Vec<serde_json::Value>> {
    let out = Command::new("kubectl")
        .args(["kustomize", dir])
        .output()
        .context("cannot run kubectl (`cargo xtask setup` installs it)")?;
    ensure!(
        out.status.success(),
        "kubectl kustomize {dir}: {}",
        text(&out.stderr)
    );
    Ok(serde_saphyr::from_multiple(&text(&out.stdout))?)
}

fn daemonset(documents: &[serde_json::Value]) -> Result<&serde_json::Value> {
    documents
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .context("no DaemonSet")
}

fn strings(value: &serde_json::Value) -> Vec<String> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect()
}

fn uninstall_cleanup() -> Result<UninstallCleanup> {
    let documents = kustomize(&format!("{DEPLOY}/uninstall"))?;
    let pod = &daemonset(&documents)?["spec"]["template"]["spec"];
    let [container] = pod["initContainers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    else {
        bail!("one init container expected: {pod}");
    };
    Ok(UninstallCleanup {
        args: strings(&container["args"]),
        capabilities: strings(&container["securityContext"]["capabilities"]["add"]),
    })
}

/// The capabilities `deploy/daemonset.yaml` gives the agent.
fn agent_capabilities() -> Result<Vec<String>> {
    let documents = kustomize(DEPLOY)?;
    let pod = &daemonset(&documents)?["spec"]["template"]["spec"];
    Ok(strings(
        &pod["containers"][0]["securityContext"]["capabilities"]["add"],
    ))
}

/// `setpriv` options that leave a root process exactly `capabilities` after it execs, as a
/// container runtime does for `capabilities: {drop: [ALL], add: [...]}` with
/// `allowPrivilegeEscalation: false`.
fn setpriv_args(capabilities: &[String]) -> Vec<String> {
    let keep: String = capabilities
        .iter()
        .map(|c| format!(",+{}", c.to_lowercase()))
        .collect();
    vec![
        "--no-new-privs".into(),
        "--inh-caps=-all".into(),
        format!("--bounding-set=-all{keep}"),
        "--".into(),
    ]
}

#[test]
fn uninstall_cleanup_restores_every_node_after_the_agents_got_sigterm() -> Result<()> {
    let mut cluster = Cluster::builder()
        .nodes(3)
        .with_node("node2", |n| {
            n.pod_style(PodStyle::Bridged).label("egress", "true")
        })
        .with_node("node3", |n| n.label("egress", "true"))
        .probe_bin(env!("CARGO_BIN_EXE_se-probe"))
        .build()?;
    let second_ip = Ipv4Addr::new(10, 99, 0, 201);
    cluster.update_objects(|o| {
        o.namespace("payments")
            .labels
            .insert("team".into(), "payments".into());
        // Two egress IPs: node2 holds one, node3 the other.
        o.set_gateway(gateway(GATEWAY, EGRESS_IP).egress_ip(second_ip));
    })?;
    let pods = [
        api_pod(&mut cluster, "api-1", "node1")?,
        api_pod(&mut cluster, "api-2", "node1")?,
        api_pod(&mut cluster, "api-3", "node3")?,
    ];
    let before = snapshots(&cluster)?;
    let mut agents = start_agents(&cluster, &[])?;
    ensure!(has_address(&cluster, "node2", EGRESS_IP)?);
    ensure!(has_address(&cluster, "node3", second_ip)?);
    for pod in &pods {
        let seen = cluster.ask(pod)?;
        ensure!(
            seen == EGRESS_IP || seen == second_ip,
            "{}: {seen}",
            pod.name
        );
    }

    // `kubectl delete -k deploy/`: the agents get SIGTERM and leave the data path in place.
    for agent in &mut agents {
        let status = agent.stop()?;
        ensure!(status.success(), "{}: {status}", agent.node());
    }
    for pod in &pods {
        let seen = cluster.ask(pod)?;
        ensure!(
            seen == EGRESS_IP || seen == second_ip,
            "{}: {seen}",
            pod.name
        );
    }

    // `kubectl apply -k deploy/uninstall`: on every node, the cleanup container's own
    // arguments (its host paths mapped to the lab's) with its own capabilities.
    let uninstall = uninstall_cleanup()?;
    eprintln!(
        "uninstall runs `static-egress {}` with {:?}",
        uninstall.args.join(" "),
        uninstall.capabilities
    );
    ensure!(uninstall.args.first().map(String::as_str) == Some("cleanup"));
    let bin = cluster.agent_bin()?;
    for node in cluster.nodes() {
        // The node's CNI config with the plugin chained, as an agent with --cni-conf-dir
        // leaves it.
        let cni_conf = cluster.dir().join(format!("{}-net.d", node.name));
        let cni_bin = cluster.dir().join(format!("{}-cni-bin", node.name));
        fs::create_dir_all(&cni_conf)?;
        fs::create_dir_all(&cni_bin)?;
        let list = |plugins: &str| {
            format!(
                r#"{{"cniVersion":"1.0.0","name":"k8s","plugins":[{{"type":"ptp"}}{plugins}]}}"#
            )
        };
        fs::write(
            cni_conf.join("10-k8s.conflist"),
            list(r#",{"type":"static-egress-cni","socket":"/x"}"#),
        )?;
        fs::write(cni_bin.join("static-egress-cni"), "")?;
        let mut argv: Vec<OsString> = vec!["setpriv".into()];
        argv.extend(
            setpriv_args(&uninstall.capabilities)
                .into_iter()
                .map(Into::into),
        );
        argv.push(bin.clone().into());
        for arg in &uninstall.args {
            argv.push(match arg.as_str() {
                HOST_STATE_DIR => node.state_dir.clone().into(),
                HOST_BPFFS => node.bpffs.clone().into(),
                HOST_CNI_CONF => cni_conf.clone().into(),
                HOST_CNI_BIN => cni_bin.clone().into(),
                other => other.into(),
            });
        }
        let output = exec_output(&node.netns, &argv)?;
        let said = expect_success(&output, &format!("cleanup on {}", node.name))?;
        ensure!(said.contains("removed"), "{}: {said}", node.name);
        let differences = before[&node.name].differences(&cluster.snapshot(&node.name)?);
        ensure!(
            differences.is_empty(),
            "{} after the uninstall cleanup:\n{}",
            node.name,
            differences.join("\n")
        );
        let again = expect_success(&exec_output(&node.netns, &argv)?, "second cleanup")?;
        ensure!(
            again.contains("nothing to remove"),
            "{}: {again}",
            node.name
        );
        ensure!(
            fs::read_dir(&node.state_dir)?.next().is_none(),
            "{}: the state dir is not empty",
            node.name
        );
        let left: serde_json::Value =
            serde_json::from_slice(&fs::read(cni_conf.join("10-k8s.conflist"))?)?;
        let want: serde_json::Value = serde_json::from_str(&list(""))?;
        ensure!(
            left == want,
            "{}: CNI config after cleanup: {left}",
            node.name
        );
        ensure!(
            !cni_bin.join("static-egress-cni").exists(),
            "{}: the plugin's binary is still there",
            node.name
        );
    }
    for pod in &pods {
        assert_eq!(cluster.ask(pod)?, node_ip(&cluster, &pod.node)?);
    }
    Ok(())
}

/// A `static-egress` that runs `real` under `setpriv` with the capabilities in `$SE_CAPS`
/// (comma-separated, e.g. `net_admin,bpf`) when it is set, as the agent's container would; a
/// temporary file, removed when dropped.
struct CapabilityWrapper(PathBuf);

impl CapabilityWrapper {
    fn new(real: &Path) -> Result<Self> {
        let path =
            std::env::temp_dir().join(format!("static-egress-with-caps-{}", std::process::id()));
        fs::write(
            &path,
            format!(
                "#!/bin/sh\n\
                 [ -z \"$SE_CAPS\" ] && exec '{real}' \"$@\"\n\
                 exec setpriv --no-new-privs --inh-caps=-all \
                 --bounding-set=-all,$(echo \"$SE_CAPS\" | sed 's/[^,]*/+&/g') -- '{real}' \"$@\"\n",
                real = real.display()
            ),
        )?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
        Ok(Self(path))
    }
}

impl Drop for CapabilityWrapper {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// The capability bits of `names` (`NET_ADMIN`...), as `/proc/<pid>/status` shows them.
fn capability_mask(names: &[String]) -> Result<u64> {
    names.iter().try_fold(0, |mask, name| {
        let bit = match name.as_str() {
            "NET_ADMIN" => 12,
            "NET_RAW" => 13,
            "SYS_ADMIN" => 21,
            "PERFMON" => 38,
            "BPF" => 39,
            other => bail!("unknown capability {other}"),
        };
        Ok(mask | 1 << bit)
    })
}

fn effective_capabilities(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .context("no CapEff")?;
    Ok(u64::from_str_radix(hex.trim(), 16)?)
}

fn caps_env(capabilities: &[String]) -> String {
    capabilities
        .iter()
        .map(|c| c.to_lowercase())
        .collect::<Vec<_>>()
        .join(",")
}

/// Loads, attaches, marks, holds an egress IP, repairs drift and adopts its predecessor's
/// pins with exactly the capabilities `deploy/daemonset.yaml` gives it, and fails to start
/// with one fewer (so the harness does restrict).
#[test]
fn the_agent_runs_with_exactly_the_daemonsets_capabilities() -> Result<()> {
    let real = std::env::var_os("STATIC_EGRESS_BIN").map_or_else(
        || {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/debug/static-egress"
            ))
        },
        PathBuf::from,
    );
    let wrapper = CapabilityWrapper::new(&real)?;
    let mut cluster = Cluster::builder()
        .nodes(3)
        .with_node("node2", |n| {
            n.pod_style(PodStyle::Bridged).label("egress", "true")
        })
        .with_node("node3", |n| n.label("egress", "true").label("site", "b"))
        .probe_bin(env!("CARGO_BIN_EXE_se-probe"))
        .agent_bin(&wrapper.0)
        .build()?;
    let second_ip = Ipv4Addr::new(10, 99, 0, 201);
    cluster.update_objects(|o| {
        o.namespace("payments")
            .labels
            .insert("team".into(), "payments".into());
        o.set_gateway(gateway(GATEWAY, EGRESS_IP));
        // A second holder for node1's pods: the uplink program redirects to each.
        o.set_gateway(
            gateway("partner-api", second_ip)
                .node_selector(netlab::objects::match_labels([("site", "b")]))
                .pod_selector(Some(netlab::objects::match_labels([("app", "partner")]))),
        );
    })?;
    let pod = api_pod(&mut cluster, "api-1", "node1")?;
    let partner = cluster
        .add_pod(netlab::PodSpec::new("payments", "partner-1", "node1").label("app", "partner"))?;
    let bridged = api_pod(&mut cluster, "api-2", "node2")?;
    cluster.write_objects()?;

    let capabilities = agent_capabilities()?;
    eprintln!("deploy/daemonset.yaml gives the agent {capabilities:?}");
    let env = caps_env(&capabilities);
    let flags = ["--resync-interval", "1s"];
    let start =
        |node: &str| cluster.start_agent_with_env(node, flags, &[("SE_CAPS", OsStr::new(&env))]);
    // One capability fewer: the agent must not start, or the harness restricts nothing.
    for missing in &capabilities {
        let fewer: Vec<String> = capabilities
            .iter()
            .filter(|c| *c != missing)
            .cloned()
            .collect();
        let env = caps_env(&fewer);
        let mut agent =
            cluster.start_agent_with_env("node1", flags, &[("SE_CAPS", OsStr::new(&env))])?;
        // Some are only needed by a later step: give it the time to get there.
        let exited = agent.wait_exit(Duration::from_secs(3)).ok();
        let log = agent.log()?;
        eprintln!("without {missing}: {exited:?}: {}", log.trim());
        if missing == "BPF" {
            ensure!(
                exited.is_some_and(|s| !s.success()),
                "the agent started without CAP_BPF: the capabilities are not restricted\n{log}"
            );
        }
        drop(agent);
        let output = cleanup_with(&cluster, "node1", &lab_paths(&cluster, "node1")?)?;
        expect_success(&output, "cleanup")?;
    }

    let mut agents = Vec::new();
    for node in ["node1", "node2", "node3"] {
        agents.push(start(node)?);
    }
    wait_all_applied(&cluster)?;
    for agent in &agents {
        let have = effective_capabilities(agent.pid())?;
        ensure!(
            have == capability_mask(&capabilities)?,
            "{}: CapEff {have:#x}, wanted exactly {capabilities:?}",
            agent.node()
        );
    }
    expect_source(&cluster, &pod, EGRESS_IP)?;
    expect_source(&cluster, &partner, second_ip)?;
    expect_source(&cluster, &bridged, EGRESS_IP)?;
    ensure!(has_address(&cluster, "node2", EGRESS_IP)?);

    // Drift repair: our table deleted on the holder comes back.
    let node2 = cluster.node("node2")?.clone();
    node2.exec(["nft", "delete", "table", "ip", "static_egress"])?;
    wait_until(Duration::from_secs(10), || {
        node2
            .exec(["nft", "list", "table", "ip", "static_egress"])
            .is_ok()
    })
    .context("our nftables table was not restored")?;
    // A few resyncs without drift: nothing to repair, nothing failing.
    std::thread::sleep(Duration::from_secs(3));
    // Adoption of the pinned links and maps by a new agent.
    agents[0].stop()?;
    agents[0] = start_fresh_with_env(&cluster, "node1", &flags, &env)?;
    cluster.wait_applied("node1", APPLY)?;
    std::thread::sleep(Duration::from_secs(2));
    expect_source(&cluster, &pod, EGRESS_IP)?;
    expect_source(&cluster, &partner, second_ip)?;
    for agent in &mut agents {
        let log = agent.log()?;
        ensure!(agent.is_running(), "{} exited:\n{log}", agent.node());
        // "was detached" would say the resync cannot see our own programs with these
        // capabilities, and swaps them in again each time.
        for bad in ["ERROR", "applying the plan failed", "was detached"] {
            ensure!(
                !log.contains(bad),
                "{}: {bad:?} in the log:\n{log}",
                agent.node()
            );
        }
    }
    Ok(())
}

fn start_fresh_with_env(
    cluster: &Cluster,
    node: &str,
    args: &[&str],
    caps: &str,
) -> Result<AgentHandle> {
    let status = cluster.node(node)?.status_path();
    let _ = fs::remove_file(&status);
    cluster.start_agent_with_env(node, args, &[("SE_CAPS", OsStr::new(caps))])
}

/// An interface named like the tunnel device that is not one of ours (a bridge here) is never
/// taken over nor deleted: the agent's apply fails and says why, and `cleanup`, whose record
/// says the agent meant to make the tunnel, leaves the bridge where it was. The same cleanup
/// without a record (by name) leaves it too.
#[test]
fn an_interface_with_the_tunnels_name_is_never_taken_over() -> Result<()> {
    let cluster = cluster()?;
    let node1 = cluster.node("node1")?.clone();
    node1.exec(["ip", "link", "add", "se-tunnel", "type", "bridge"])?;
    cluster.write_objects()?;
    let agent = start_fresh(&cluster, "node1", &[])?;
    let said = "interface se-tunnel exists and is not a VXLAN device of ours";
    wait_until(Duration::from_secs(10), || {
        agent.log().is_ok_and(|l| l.contains(said))
    })
    .with_context(|| agent.log().unwrap_or_default())?;
    drop(agent);
    let bridge = || -> Result<()> {
        let link = node1.exec(["ip", "-d", "link", "show", "se-tunnel"])?;
        ensure!(
            link.contains("bridge"),
            "se-tunnel is no longer the bridge: {link}"
        );
        Ok(())
    };
    for _ in 0..2 {
        expect_success(
            &cleanup_with(&cluster, "node1", &lab_paths(&cluster, "node1")?)?,
            "cleanup",
        )?;
        bridge()?;
    }
    Ok(())
}
