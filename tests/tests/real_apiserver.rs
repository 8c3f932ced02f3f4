//! The real kube-apiserver and etcd that `cargo xtask setup` builds, started in a lab's router
//! namespace: what `kubectl apply -k deploy/` installs is accepted, the CRD is served with its
//! printer columns, and a token of the DaemonSet's ServiceAccount, used from a node's namespace
//! as the agent would, has the access the ClusterRole gives and no more. Also checks the
//! launcher's restart and etcd compaction (a real `410 Gone`). Then agents in cluster mode
//! against it: holder Leases under a partial partition, and a node made NotReady through the
//! status subresource.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use netlab::fixture::{
    APPLY, EGRESS_IP, GATEWAY, api_pod, expect_source, has_address, holds_alone, three_nodes,
};
use netlab::kubeapi::RealApiServer;
use netlab::{AgentHandle, Answer, Cluster, LabPod, wait_until};

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
/// The DaemonSet's ServiceAccount (deploy/rbac.yaml).
const AGENT_NAMESPACE: &str = "static-egress";
const AGENT_ACCOUNT: &str = "static-egress";
const CRD: &str = "egressgateways.static-egress.io";

/// One lab with its API server at a time: each starts etcd and kube-apiserver, and the Lease
/// test measures times that two of them on two cores would blur.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn deploy_manifests_and_the_agents_token_on_a_real_api_server() -> Result<()> {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
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
    let applied = install(api)?;
    eprintln!("{}", applied.trim());
    for object in [
        "namespace/static-egress",
        "customresourcedefinition.apiextensions.k8s.io/egressgateways.static-egress.io",
        "serviceaccount/static-egress",
        "clusterrole.rbac.authorization.k8s.io/static-egress",
        "clusterrolebinding.rbac.authorization.k8s.io/static-egress",
        "role.rbac.authorization.k8s.io/static-egress-leases",
        "rolebinding.rbac.authorization.k8s.io/static-egress-leases",
        "daemonset.apps/static-egress",
    ] {
        ensure!(applied.contains(object), "{object} missing from: {applied}");
    }

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

/// A partial partition: node3 no longer hears node2 (its probes to node2 are dropped), while
/// node1 still does and node2 still hears node1. Probes alone leave two holders: node3 counts
/// node2 out and takes the egress IP, node2 serves on. In cluster mode node3 claims the egress
/// IP's Lease, node2 sees the later claim and lets go, and stays away while the claim stands;
/// once the partition heals, node2 takes its egress IP back and node3 lets go. The agents run
/// with the DaemonSet's ServiceAccount, so a verb missing from the Leases' Role fails here.
#[test]
fn holder_leases_leave_one_holder_when_the_probes_disagree() -> Result<()> {
    Lab::run(partial_partition)
}

/// Node readiness written through the status subresource, as a kubelet or the node controller
/// would, moves the egress IP; the gateway's status (server-side apply) says where and why.
#[test]
fn a_node_made_not_ready_through_the_status_subresource_hands_its_egress_ip_over() -> Result<()> {
    Lab::run(not_ready)
}

/// A lab whose agents run in cluster mode against a real API server, with the token of the
/// DaemonSet's ServiceAccount, and pod api-1 on node1 using the gateway.
struct Lab {
    cluster: Cluster,
    api: RealApiServer,
    pod: LabPod,
}

impl Lab {
    fn run(scenario: impl FnOnce(&Lab) -> Result<()>) -> Result<()> {
        let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let mut cluster = three_nodes(env!("CARGO_BIN_EXE_se-probe").as_ref())?;
        let pod = api_pod(&mut cluster, "api-1", "node1")?;
        let api = RealApiServer::start(cluster.router_netns(), cluster.router_ip(), cluster.dir())?;
        install(&api)?;
        api.create_objects(&cluster.objects().api_objects()?)?;
        let token = api.token_for_service_account(AGENT_NAMESPACE, AGENT_ACCOUNT)?;
        let kubeconfig = cluster.dir().join("agent.kubeconfig");
        api.kubeconfig_for_token(&kubeconfig, &token)?;
        let args = ["--lease-namespace", AGENT_NAMESPACE, "--rejoin-after", "1s"];
        let agents = cluster
            .nodes()
            .iter()
            .map(|n| cluster.start_agent_with_kubeconfig(&n.name, &kubeconfig, &args))
            .collect::<Result<Vec<AgentHandle>>>()?;
        let lab = Lab { cluster, api, pod };
        let result = scenario(&lab);
        if result.is_err() {
            for agent in &agents {
                eprintln!(
                    "--- agent on {}:\n{}",
                    agent.node(),
                    agent.log().unwrap_or_default()
                );
            }
            eprintln!(
                "--- kube-apiserver log (end):\n{}",
                tail(&lab.api.apiserver_log().unwrap_or_default(), 30)
            );
        }
        result
    }

    /// Who the egress IP's Lease names (empty when none or unreadable).
    fn lease_holder(&self) -> String {
        self.api
            .kubectl([
                "get",
                "lease",
                "-n",
                AGENT_NAMESPACE,
                "egress-10-99-0-200",
                "-o",
                "jsonpath={.spec.holderIdentity}",
            ])
            .unwrap_or_default()
    }

    /// The agents serve: the pod leaves with the egress IP, held by node2, whose Lease it is.
    fn serving(&self) -> Result<()> {
        expect_source(&self.cluster, &self.pod, EGRESS_IP)?;
        ensure!(
            has_address(&self.cluster, "node2", EGRESS_IP)?,
            "node2 does not hold the egress IP"
        );
        wait_until(APPLY, || self.lease_holder() == "node2")
            .context("node2 did not claim the Lease")
    }

    fn set_ready(&self, node: &str, ready: bool) -> Result<()> {
        let status = if ready { "True" } else { "False" };
        let patch = serde_json::json!({"status": {"conditions": [{
            "type": "Ready", "status": status, "reason": "Lab",
            "message": "set by the test", "lastHeartbeatTime": null,
        }]}});
        self.api.kubectl([
            "patch",
            "node",
            node,
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch.to_string(),
        ])?;
        Ok(())
    }
}

fn not_ready(lab: &Lab) -> Result<()> {
    let cluster = &lab.cluster;
    lab.serving()?;
    let connections = cluster.start_loop_with_timeout(
        &lab.pod,
        Duration::from_millis(20),
        300,
        Duration::from_millis(100),
    )?;
    let started = Instant::now();
    lab.set_ready("node2", false)?;
    wait_until(APPLY, || holds_alone(cluster, "node3", "node2", EGRESS_IP))
        .context("node3 did not take the egress IP from the NotReady node2")?;
    eprintln!(
        "NotReady: node3 holds the egress IP alone {:?} after the patch",
        started.elapsed()
    );
    wait_until(APPLY, || lab.lease_holder() == "node3").context("node3 did not claim the Lease")?;
    // The gateway's status, written by server-side apply, says where the IP went and why.
    let holder = || {
        lab.api
            .kubectl([
                "get",
                "egw",
                GATEWAY,
                "-o",
                "jsonpath={.status.holders[0].node}|{.status.holders[0].reason}",
            ])
            .unwrap_or_default()
    };
    wait_until(APPLY, || holder() == "node3|from node2: it is not Ready")
        .with_context(|| format!("the gateway's status says {:?}", holder()))?;
    let managers = lab.api.kubectl([
        "get",
        "egw",
        GATEWAY,
        "--show-managed-fields",
        "-o",
        "jsonpath={.metadata.managedFields[*].manager}",
    ])?;
    ensure!(
        managers.split_whitespace().any(|m| m == "static-egress"),
        "no field manager static-egress on the gateway: {managers}"
    );

    lab.set_ready("node2", true)?;
    wait_until(APPLY, || holds_alone(cluster, "node2", "node3", EGRESS_IP))
        .context("node2 did not take its egress IP back once Ready")?;
    wait_until(APPLY, || lab.lease_holder() == "node2")
        .context("node2 did not claim the Lease again")?;
    let answers = connections.wait(Duration::from_secs(60))?;
    no_leak(&answers, "across both moves")?;
    Ok(())
}

fn partial_partition(lab: &Lab) -> Result<()> {
    let (cluster, pod) = (&lab.cluster, &lab.pod);
    let lease_holder = || lab.lease_holder();
    lab.serving()?;
    // Connections from the pod all along: none may leave with another address.
    let connections = cluster.start_loop_with_timeout(
        pod,
        Duration::from_millis(20),
        600,
        Duration::from_millis(100),
    )?;

    let node2 = cluster.node("node2")?.ip.to_string();
    let node3 = cluster.node("node3")?;
    node3.exec(["nft", "add", "table", "ip", "lab_partition"])?;
    node3.exec([
        "nft",
        "add",
        "chain",
        "ip",
        "lab_partition",
        "out",
        "{ type filter hook output priority 0 ; }",
    ])?;
    node3.exec([
        "nft",
        "add",
        "rule",
        "ip",
        "lab_partition",
        "out",
        "ip",
        "daddr",
        &node2,
        "udp",
        "dport",
        "7947",
        "drop",
    ])?;
    let cut = Instant::now();
    wait_until(APPLY, || {
        has_address(cluster, "node3", EGRESS_IP).unwrap_or(false)
    })
    .context("node3 did not take the egress IP from the node it cannot hear")?;
    let taken = cut.elapsed();
    wait_until(APPLY, || {
        !has_address(cluster, "node2", EGRESS_IP).unwrap_or(true)
    })
    .context("node2 kept the egress IP that node3 claimed")?;
    let both = cut.elapsed() - taken;
    eprintln!("partition: node3 took the egress IP after {taken:?}, node2 let go {both:?} later");
    ensure!(
        both < Duration::from_secs(2),
        "two nodes held the egress IP for {both:?}"
    );
    ensure!(
        lease_holder() == "node3",
        "the Lease names {}",
        lease_holder()
    );
    // The loser stays away while the winner's claim stands: no back and forth.
    let steady = Instant::now();
    while steady.elapsed() < Duration::from_secs(3) {
        ensure!(
            holds_alone(cluster, "node3", "node2", EGRESS_IP),
            "the egress IP went back to node2 while node3's claim stands"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_until(APPLY, || {
        lab.api
            .kubectl([
                "get",
                "events",
                "-n",
                "default",
                "--field-selector",
                "reason=LeaseLost",
                "-o",
                "name",
            ])
            .is_ok_and(|names| !names.trim().is_empty())
    })
    .context("no LeaseLost event on the gateway")?;

    node3.exec(["nft", "delete", "table", "ip", "lab_partition"])?;
    let healed = Instant::now();
    wait_until(APPLY, || holds_alone(cluster, "node2", "node3", EGRESS_IP))
        .context("node2 did not take its egress IP back after the partition")?;
    eprintln!(
        "healed: node2 holds the egress IP alone after {:?}",
        healed.elapsed()
    );
    wait_until(APPLY, || lease_holder() == "node2")
        .context("node2 did not claim the Lease again")?;
    expect_source(cluster, pod, EGRESS_IP)?;

    let answers = connections.wait(Duration::from_secs(60))?;
    no_leak(&answers, "during the partition")?;
    Ok(())
}

/// Every connection the pod made left with the egress IP or failed (counted, `during` what).
fn no_leak(answers: &[Answer], during: &str) -> Result<()> {
    let leaked: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.source().is_some_and(|ip| ip != EGRESS_IP))
        .collect();
    let failed = answers.iter().filter(|a| a.source().is_none()).count();
    eprintln!("{failed} of {} connections failed {during}", answers.len());
    ensure!(
        leaked.is_empty(),
        "connections left with another address: {leaked:?}"
    );
    Ok(())
}

/// Everything `kubectl apply -k deploy/` installs, and the CRD established.
fn install(api: &RealApiServer) -> Result<String> {
    let applied = api.apply(&kubectl_local(&["kustomize", DEPLOY])?)?;
    api.kubectl([
        "wait",
        "--for=condition=Established",
        &format!("crd/{CRD}"),
        "--timeout=60s",
    ])?;
    Ok(applied)
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
