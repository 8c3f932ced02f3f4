//! End to end in cluster mode against the in-repo test endpoint (`netlab::apiserver`), for
//! what a real kube-apiserver cannot be made to do on demand: objects changed while the server
//! was away *and* every version the agents knew forgotten at once, and every write hanging for
//! 20 s while reads go on. Everything else in cluster mode runs against a real kube-apiserver
//! (`real_apiserver.rs`). Each test asserts the source address the external server saw.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use netlab::apiserver::{ApiServer, default_addr};
use netlab::fixture::{APPLY, EGRESS_IP, GATEWAY, expect_source, has_address, health, three_nodes};
use netlab::objects::GATEWAY_ANNOTATION;
use netlab::{AgentHandle, Cluster, PodSpec, wait_until};

fn sync(api: &ApiServer, cluster: &Cluster) -> Result<()> {
    api.sync(&cluster.objects().api_objects()?)
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
