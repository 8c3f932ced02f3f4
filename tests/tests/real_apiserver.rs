//! The real kube-apiserver and etcd that `cargo xtask setup` builds, started in a lab's router
//! namespace: what `kubectl apply -k deploy/` installs is accepted, the CRD is served with its
//! printer columns, and a token of the DaemonSet's ServiceAccount, used from a node's namespace
//! as the agent would, has the access the ClusterRole gives and no more. Also checks the
//! launcher's restart and etcd compaction (a real `410 Gone`).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, Result, ensure};
use netlab::Cluster;
use netlab::fixture::three_nodes;
use netlab::kubeapi::RealApiServer;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
/// The DaemonSet's ServiceAccount (deploy/rbac.yaml).
const AGENT_NAMESPACE: &str = "static-egress";
const AGENT_ACCOUNT: &str = "static-egress";
const CRD: &str = "egressgateways.static-egress.io";

#[test]
fn deploy_manifests_and_the_agents_token_on_a_real_api_server() -> Result<()> {
    let cluster = three_nodes(env!("CARGO_BIN_EXE_se-probe").as_ref())?;
    let started = Instant::now();
    let mut api = RealApiServer::start(cluster.router_netns(), cluster.router_ip(), cluster.dir())?;
    eprintln!(
        "etcd and kube-apiserver ready at {} in {:?}",
        api.url(),
        started.elapsed()
    );
    let result = exercise(&cluster, &mut api);
    if result.is_err() {
        eprintln!(
            "--- kube-apiserver log (end):\n{}",
            tail(&api.apiserver_log().unwrap_or_default(), 60)
        );
    }
    result
}

fn exercise(cluster: &Cluster, api: &mut RealApiServer) -> Result<()> {
    // Everything `kubectl apply -k deploy/` installs, the DaemonSet included (nothing runs it:
    // there is no controller manager, but the server validates it).
    let rendered = kubectl_local(&["kustomize", DEPLOY])?;
    let applied = api.apply(&rendered)?;
    eprintln!("{}", applied.trim());
    for object in [
        "namespace/static-egress",
        "customresourcedefinition.apiextensions.k8s.io/egressgateways.static-egress.io",
        "serviceaccount/static-egress",
        "clusterrole.rbac.authorization.k8s.io/static-egress",
        "clusterrolebinding.rbac.authorization.k8s.io/static-egress",
        "daemonset.apps/static-egress",
    ] {
        ensure!(applied.contains(object), "{object} missing from: {applied}");
    }
    api.kubectl([
        "wait",
        "--for=condition=Established",
        &format!("crd/{CRD}"),
        "--timeout=60s",
    ])?;

    api.apply_path(&Path::new(DEPLOY).join("examples"))?;
    let table = api.kubectl(["get", "egw"])?;
    let header = table.lines().next().unwrap_or("");
    for column in ["NAME", "EGRESS IPS", "NODES", "PODS", "READY", "AGE"] {
        ensure!(
            header.contains(column),
            "column {column} missing from `kubectl get egw`:\n{table}"
        );
    }
    ensure!(
        table.contains("corp-fw") && table.contains("192.0.2.200"),
        "the example gateway is not listed:\n{table}"
    );

    // The agent's credentials: a token of the DaemonSet's ServiceAccount, used from a node.
    let token = api.token_for_service_account(AGENT_NAMESPACE, AGENT_ACCOUNT)?;
    let kubeconfig = cluster.dir().join("agent.kubeconfig");
    api.kubeconfig_for_token(&kubeconfig, &token)?;
    let rules = api.kubectl_as(&kubeconfig, ["auth", "can-i", "--list"])?;
    for (resource, verbs) in [
        ("nodes", "[get list watch]"),
        ("namespaces", "[get list watch]"),
        ("pods", "[get list watch]"),
        ("egressgateways.static-egress.io", "[get list watch]"),
        ("egressgateways.static-egress.io/status", "[patch]"),
        ("events", "[create]"),
    ] {
        ensure!(
            rules
                .lines()
                .any(|l| l.split_whitespace().next() == Some(resource) && l.contains(verbs)),
            "the agent's token lacks {verbs} on {resource}:\n{rules}"
        );
    }
    let node1 = cluster.node("node1")?;
    let from_node = node1.exec([
        "kubectl",
        "--kubeconfig",
        &kubeconfig.to_string_lossy(),
        "--cache-dir",
        &cluster.dir().join("node1-kubectl-cache").to_string_lossy(),
        "get",
        "egw",
        "-o",
        "name",
    ])?;
    ensure!(
        from_node.trim() == "egressgateway.static-egress.io/corp-fw",
        "listing gateways from node1 with the agent's token gave: {from_node}"
    );
    let refused = api
        .kubectl_as(&kubeconfig, ["get", "secrets", "-A"])
        .err()
        .context("the agent's token may list secrets")?;
    ensure!(
        format!("{refused:#}").contains("forbidden"),
        "listing secrets failed otherwise than forbidden: {refused:#}"
    );

    compaction_and_restart(api)
}

/// After a compaction and a restart, a list or watch at an older resourceVersion gets 410 Gone,
/// and everything written before is still there.
fn compaction_and_restart(api: &mut RealApiServer) -> Result<()> {
    let list: serde_json::Value =
        serde_json::from_str(&api.kubectl(["get", "--raw", "/api/v1/namespaces"])?)?;
    let old = list["metadata"]["resourceVersion"]
        .as_str()
        .context("a list without resourceVersion")?
        .to_owned();
    api.apply("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: after-the-list\n")?;
    let compacted = api.compact_etcd()?;
    ensure!(
        compacted > old.trim().parse::<i64>().context("odd resourceVersion")?,
        "compacted at {compacted}, not after {old}"
    );
    // The API server's watch cache still holds the old state; a restart drops it, as a rolling
    // update of the control plane would.
    let started = Instant::now();
    api.restart()?;
    eprintln!("kube-apiserver restarted in {:?}", started.elapsed());
    let old = old.trim();
    for (what, path) in [
        (
            "a list",
            format!("/api/v1/namespaces?resourceVersion={old}&resourceVersionMatch=Exact"),
        ),
        (
            "a watch",
            format!("/api/v1/namespaces?watch=true&resourceVersion={old}&timeoutSeconds=5"),
        ),
    ] {
        let answer = match api.kubectl(["get", "--raw", &path]) {
            Ok(events) => events,
            Err(e) => format!("{e:#}"),
        };
        eprintln!(
            "{what} at compacted resourceVersion {old}: {}",
            answer.trim()
        );
        ensure!(
            answer.contains(r#""code":410"#) || answer.contains("(Expired)"),
            "{what} at a compacted resourceVersion got no 410 Gone: {answer}"
        );
    }
    let names = api.kubectl(["get", "egw,namespaces", "-o", "name"])?;
    for name in [
        "egressgateway.static-egress.io/corp-fw",
        "namespace/after-the-list",
    ] {
        ensure!(
            names.lines().any(|l| l == name),
            "{name} missing after the restart:\n{names}"
        );
    }
    Ok(())
}

/// `kubectl` for what needs no server (rendering the kustomization).
fn kubectl_local(args: &[&str]) -> Result<String> {
    let out = Command::new("kubectl")
        .args(args)
        .output()
        .context("cannot run kubectl: run `cargo xtask setup`, which installs it")?;
    ensure!(
        out.status.success(),
        "kubectl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
