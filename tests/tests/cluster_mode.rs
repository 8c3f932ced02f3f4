//! End to end in cluster mode: the agents get their objects from an API endpoint that speaks
//! the list/watch protocol (resource versions, watch events, bookmarks, 410 Gone), not from a
//! file. Each test asserts the source address the external server saw.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use netlab::apiserver::{ApiServer, default_addr, wait_for_request};
use netlab::fixture::{APPLY, EGRESS_IP, GATEWAY, expect_source, has_address, three_nodes};
use netlab::objects::GATEWAY_ANNOTATION;
use netlab::{AgentHandle, Cluster, LabPod, PodSpec, expect_all_from, wait_until};

fn sync(api: &ApiServer, cluster: &Cluster) -> Result<()> {
    api.sync(&cluster.objects().api_objects()?)
}

#[test]
fn objects_from_the_api_drive_the_data_path_and_survive_an_api_restart() -> Result<()> {
    let mut cluster = three_nodes(env!("CARGO_BIN_EXE_se-probe").as_ref())?;
    let api_pod =
        cluster.add_pod(PodSpec::new("payments", "api-1", "node1").label("app", "api"))?;
    let shop = cluster.add_pod(PodSpec::new("payments", "shop", "node3"))?;

    let mut api = ApiServer::start(cluster.router_netns(), default_addr(cluster.router_ip()))?;
    sync(&api, &cluster)?;
    let kubeconfig = api.kubeconfig(cluster.dir())?;
    let names: Vec<String> = cluster.nodes().iter().map(|n| n.name.clone()).collect();
    let agents = names
        .iter()
        .map(|n| cluster.start_agent_with_kubeconfig(n, &kubeconfig, &[]))
        .collect::<Result<Vec<AgentHandle>>>()?;
    let result = exercise(&mut cluster, &mut api, &api_pod, &shop);
    if result.is_err() {
        for r in api.requests().iter().filter(|r| !r.contains("events")) {
            eprintln!("REQ {r}");
        }
        for agent in &agents {
            eprintln!(
                "--- agent on {}:\n{}",
                agent.node(),
                agent.log().unwrap_or_default()
            );
        }
    }
    result
}

fn exercise(
    cluster: &mut Cluster,
    api: &mut ApiServer,
    api_pod: &LabPod,
    shop: &LabPod,
) -> Result<()> {
    let node3 = cluster.node("node3")?.ip;

    expect_source(cluster, api_pod, EGRESS_IP)?;
    assert_eq!(cluster.ask(shop)?, node3);
    // Every node lists and watches only its own pods; eligible nodes also all pods.
    wait_for_request(api, APPLY, |r| {
        r.starts_with("GET /api/v1/pods?")
            && r.contains("fieldSelector=spec.nodeName=node1")
            && r.contains("watch=true")
    })?;

    // An annotation added through the API changes the pod's source address.
    cluster
        .objects_mut()
        .pod_mut("payments", "shop")?
        .annotations
        .insert(GATEWAY_ANNOTATION.into(), GATEWAY.into());
    sync(api, cluster)?;
    let took = expect_source(cluster, shop, EGRESS_IP)?;
    eprintln!("API event to data path (as seen by the external server): {took:?}");

    // The holder reports the gateway's status.
    wait_until(APPLY, || {
        api.object("EgressGateway", "", GATEWAY).is_some_and(|g| {
            g["status"]["conditions"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            }) && g["status"]["holders"][0]["node"] == "node2"
        })
    })
    .with_context(|| format!("no Ready status; patches: {:?}", api.status_patches()))?;

    // The endpoint goes away while a pod keeps connecting, and comes back having forgotten
    // its history: watches resume with 410 Gone and list again. Nothing leaks meanwhile.
    let probe = cluster.start_loop(api_pod, Duration::from_millis(20), 150)?;
    api.stop();
    let before = probe.answers()?.len();
    wait_until(APPLY, || {
        probe.answers().is_ok_and(|a| a.len() >= before + 25)
    })?;
    api.restart(true)?;
    cluster
        .objects_mut()
        .pod_mut("payments", "shop")?
        .annotations
        .remove(GATEWAY_ANNOTATION);
    sync(api, cluster)?;
    expect_source(cluster, shop, node3)?;
    let answers = probe.wait(Duration::from_secs(60))?;
    expect_all_from(&answers, EGRESS_IP)?;
    ensure!(cluster.ask(api_pod)? == EGRESS_IP);
    Ok(())
}

/// The test API endpoint in the router's namespace, serving the lab's objects, and a
/// kubeconfig for it.
fn with_api(cluster: &Cluster) -> Result<(ApiServer, std::path::PathBuf)> {
    let api = ApiServer::start(cluster.router_netns(), default_addr(cluster.router_ip()))?;
    sync(&api, cluster)?;
    let kubeconfig = api.kubeconfig(cluster.dir())?;
    Ok((api, kubeconfig))
}

fn start_all(cluster: &Cluster, kubeconfig: &std::path::Path) -> Result<Vec<AgentHandle>> {
    let names: Vec<String> = cluster.nodes().iter().map(|n| n.name.clone()).collect();
    names
        .iter()
        .map(|n| cluster.start_agent_with_kubeconfig(n, kubeconfig, &[]))
        .collect()
}

/// `static-egress health [--ready]` for `node`: its stdout, or its stderr as the error.
fn health(cluster: &Cluster, node: &str, ready: bool) -> Result<String> {
    let node = cluster.node(node)?;
    let bin = cluster.agent_bin()?;
    let mut args = vec![
        bin.display().to_string(),
        "health".into(),
        "--state-dir".into(),
        node.state_dir.display().to_string(),
    ];
    if ready {
        args.push("--ready".into());
    }
    let out = netlab::exec_output(&node.netns, &args)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        anyhow::bail!("{}", String::from_utf8_lossy(&out.stderr).trim())
    }
}

#[test]
fn agents_are_current_within_two_seconds_of_the_api_server_coming_back() -> Result<()> {
    let mut cluster = three_nodes(env!("CARGO_BIN_EXE_se-probe").as_ref())?;
    let pod = cluster.add_pod(PodSpec::new("payments", "api-1", "node1").label("app", "api"))?;
    let (mut api, kubeconfig) = with_api(&cluster)?;
    let _agents = start_all(&cluster, &kubeconfig)?;
    expect_source(&cluster, &pod, EGRESS_IP)?;
    ensure!(has_address(&cluster, "node2", EGRESS_IP)?);

    // Five seconds without an API server, then one that has forgotten every version the
    // agents knew (as after an etcd compaction): their watches get 410 Gone and list again.
    api.stop();
    std::thread::sleep(Duration::from_secs(5));
    cluster.objects_mut().node_mut("node2")?.ready = false;
    api.restart(true)?;
    let back = Instant::now();
    sync(&api, &cluster)?;
    wait_until(APPLY, || {
        has_address(&cluster, "node3", EGRESS_IP).unwrap_or(false)
            && !has_address(&cluster, "node2", EGRESS_IP).unwrap_or(true)
    })?;
    let took = back.elapsed();
    eprintln!("API server back to the egress IP moved: {took:?}");
    ensure!(
        took < Duration::from_secs(2),
        "the agents took {took:?} to catch up with the API server"
    );
    expect_source(&cluster, &pod, EGRESS_IP)?;
    Ok(())
}

#[test]
fn an_unreachable_api_server_at_start_keeps_the_data_path_and_reports_not_ready() -> Result<()> {
    let mut cluster = three_nodes(env!("CARGO_BIN_EXE_se-probe").as_ref())?;
    let pod = cluster.add_pod(PodSpec::new("payments", "api-1", "node1").label("app", "api"))?;
    let (mut api, kubeconfig) = with_api(&cluster)?;
    let mut agents = start_all(&cluster, &kubeconfig)?;
    expect_source(&cluster, &pod, EGRESS_IP)?;
    wait_until(APPLY, || health(&cluster, "node1", true).is_ok())?;

    // Restarted while the API server is down: the agents wait and keep the pinned data path.
    api.stop();
    for agent in &mut agents {
        agent.stop()?;
    }
    let probe = cluster.start_loop(&pod, Duration::from_millis(20), 150)?;
    let mut waiting = start_all(&cluster, &kubeconfig)?;
    std::thread::sleep(Duration::from_secs(4));
    for agent in &mut waiting {
        ensure!(
            agent.is_running(),
            "the agent on {} exited without an API server:\n{}",
            agent.node(),
            agent.log()?
        );
    }
    ensure!(health(&cluster, "node1", false).is_ok(), "not even live");
    let not_ready = health(&cluster, "node1", true).err().map(|e| e.to_string());
    ensure!(
        not_ready
            .as_deref()
            .is_some_and(|e| e.contains("cannot start watching the cluster")),
        "readiness should fail and say why: {not_ready:?}"
    );

    api.restart(false)?;
    wait_until(APPLY, || health(&cluster, "node1", true).is_ok())
        .context("the agent did not become ready once the API server answered")?;
    let answers = probe.wait(Duration::from_secs(60))?;
    ensure!(answers.len() == 150, "the probe ended early: {answers:?}");
    expect_all_from(&answers, EGRESS_IP)?;
    Ok(())
}

#[test]
fn a_slow_api_server_never_delays_the_data_path() -> Result<()> {
    let mut cluster = three_nodes(env!("CARGO_BIN_EXE_se-probe").as_ref())?;
    // On node2, which holds the egress IP and so writes the gateway's status: every change
    // of its selected pods is a status write.
    let shop = cluster.add_pod(PodSpec::new("payments", "shop", "node2"))?;
    let node2 = cluster.node("node2")?.ip;
    let (api, kubeconfig) = with_api(&cluster)?;
    let _agents = start_all(&cluster, &kubeconfig)?;
    expect_source(&cluster, &shop, node2)?;
    // Agents plan once their probes have heard each other: changes count from then on.
    for node in ["node1", "node2", "node3"] {
        wait_until(APPLY, || health(&cluster, node, true).is_ok())
            .with_context(|| format!("the agent on {node} did not become ready"))?;
    }

    // Every status write and event now hangs for 20 s; changes keep reaching the data path.
    api.delay_writes(Duration::from_secs(20));
    for (annotate, want) in [(true, EGRESS_IP), (false, node2), (true, EGRESS_IP)] {
        let annotations = &mut cluster
            .objects_mut()
            .pod_mut("payments", "shop")?
            .annotations;
        if annotate {
            annotations.insert(GATEWAY_ANNOTATION.into(), GATEWAY.into());
        } else {
            annotations.remove(GATEWAY_ANNOTATION);
        }
        sync(&api, &cluster)?;
        let took = expect_source(&cluster, &shop, want)?;
        ensure!(
            took < Duration::from_secs(3),
            "a change took {took:?} to reach the data path while the API server was slow"
        );
    }
    api.delay_writes(Duration::ZERO);
    Ok(())
}
