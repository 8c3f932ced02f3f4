//! End to end in cluster mode: the agents get their objects from an API endpoint that speaks
//! the list/watch protocol (resource versions, watch events, bookmarks, 410 Gone), not from a
//! file. Each test asserts the source address the external server saw.

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use netlab::apiserver::{ApiServer, default_addr, wait_for_request};
use netlab::fixture::{APPLY, EGRESS_IP, GATEWAY, expect_source, three_nodes};
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
        .map(|n| cluster.start_agent_with_kubeconfig(n, &kubeconfig))
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
