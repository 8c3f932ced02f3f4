//! The real kube-apiserver and etcd that `cargo xtask setup` builds, started in a lab's router
//! namespace: what `kubectl apply -k deploy/` installs is accepted, the CRD is served with its
//! printer columns and refuses invalid gateways with a message, and a token of the DaemonSet's ServiceAccount, used from a node's namespace
//! as the agent would, has the access the ClusterRole gives and no more. Also checks the
//! launcher's restart and etcd compaction (a real `410 Gone`). Then agents in cluster mode
//! against it: holder Leases under a partial partition, a node made NotReady through the
//! status subresource, what kubectl shows of them (events in `describe`, another writer's
//! condition kept, the holder in `get`) and what `static-egress explain` tells of a pod, a change applied right after a restart that followed
//! a compaction, and ten thousand pods listed in pages.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use netlab::fixture::{
    APPLY, EGRESS_IP, GATEWAY, api_pod, expect_source, has_address, health, holds_alone,
    three_nodes,
};
use netlab::kubeapi::RealApiServer;
use netlab::objects::GATEWAY_ANNOTATION;
use netlab::{AgentHandle, Answer, Cluster, LabPod, PodSpec, expect_all_from, wait_until};

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

    // What the schema and its CEL rule refuse, with the message a user gets from kubectl.
    for (egress_ip, says) in [
        ("127.0.0.1", "egress IPs must be unicast"),
        ("10.99.0.300", "should match"),
    ] {
        let gateway = format!(
            "apiVersion: static-egress.io/v1alpha1\nkind: EgressGateway\nmetadata:\n  name: refused\n\
             spec:\n  egressIPs: [\"{egress_ip}\"]\n  namespaceSelector: {{}}\n"
        );
        let refused = api
            .apply(&gateway)
            .err()
            .with_context(|| format!("a gateway with egress IP {egress_ip} was accepted"))?;
        ensure!(
            format!("{refused:#}").contains(says),
            "egress IP {egress_ip} refused without saying {says:?}: {refused:#}"
        );
    }

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
    Lab::run(|lab| partial_partition(lab))
}

/// Node readiness written through the status subresource, as a kubelet or the node controller
/// would, moves the egress IP; the gateway's status (server-side apply) says where and why.
#[test]
fn a_node_made_not_ready_through_the_status_subresource_hands_its_egress_ip_over() -> Result<()> {
    Lab::run(|lab| not_ready(lab))
}

/// What users see of the agents with kubectl, on a real server: events in `kubectl describe`
/// of the pod and of the gateway (they need the object's uid), another controller's condition
/// kept beside ours (server-side apply, conditions keyed by type), the holder in `kubectl get
/// egw`. Then an etcd compaction and a kube-apiserver restart (the agents' watches come back
/// to a real `410 Gone`): a change made once the server answers is in the data path within 2 s.
#[test]
fn what_kubectl_shows_and_a_restart_after_a_compaction() -> Result<()> {
    Lab::run(kubectl_views_and_restart)
}

/// Ten thousand pods more, on node1 in namespace `crowd`, created before the agents start:
/// each agent lists them in pages of 500 with the server's own `continue` tokens (the audit
/// log shows every page), and pod api-1, in `payments`, comes on the last page, so its
/// traffic leaving with the egress IP says that no page was lost. The agents' memory is
/// reported.
#[test]
fn ten_thousand_pods_are_listed_in_pages_with_the_servers_continue_tokens() -> Result<()> {
    let api_args = |dir: &Path| {
        let policy = dir.join("audit-policy.yaml");
        std::fs::write(&policy, AUDIT_POD_LISTS)?;
        Ok(vec![
            format!("--audit-policy-file={}", policy.display()),
            format!("--audit-log-path={}", dir.join(AUDIT_LOG).display()),
        ])
    };
    Lab::run_with(api_args, |api| crowd(api, CROWD), paged)
}

const AUDIT_LOG: &str = "audit.log";

const CROWD: usize = 10_000;

/// The agents' lists of pods, once each, with the URI that says which page.
const AUDIT_POD_LISTS: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  users: [\"system:serviceaccount:static-egress:static-egress\"]
  verbs: [list]
  resources: [{group: \"\", resources: [pods]}]
- level: None
";

/// `count` pods on node1 in namespace `crowd`, created by four kubectl at once. They never
/// run (no status), as pods waiting for their images: the agents list and keep them all the
/// same.
fn crowd(api: &RealApiServer, count: usize) -> Result<()> {
    api.apply("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: crowd\n")?;
    let started = Instant::now();
    let chunks = 4;
    let files: Vec<std::path::PathBuf> = (0..chunks)
        .map(|chunk| {
            let items: Vec<serde_json::Value> = (chunk * count / chunks
                ..(chunk + 1) * count / chunks)
                .map(|i| {
                    serde_json::json!({
                        "apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": format!("crowd-{i:05}"), "namespace": "crowd",
                            "labels": {"app": "api", "shard": format!("s{}", i % 16)}},
                        "spec": {"nodeName": "node1",
                            "containers": [{"name": "main", "image": "lab.invalid/pod"}]},
                    })
                })
                .collect();
            let path = api.dir().join(format!("crowd-{chunk}.json"));
            std::fs::write(
                &path,
                serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string(),
            )?;
            Ok(path)
        })
        .collect::<Result<_>>()?;
    std::thread::scope(|scope| {
        let creating: Vec<_> = files
            .iter()
            .map(|path| {
                scope.spawn(move || {
                    api.kubectl(["create", "-o", "name", "-f", &path.to_string_lossy()])
                })
            })
            .collect();
        creating.into_iter().try_for_each(|c| {
            c.join()
                .map_err(|_| anyhow::anyhow!("kubectl thread panicked"))?
                .map(drop)
        })
    })?;
    eprintln!("{count} pods created in {:?}", started.elapsed());
    Ok(())
}

fn paged(lab: &mut Lab) -> Result<()> {
    lab.serving()?;
    let audit = std::fs::read_to_string(lab.cluster.dir().join(AUDIT_LOG))?;
    let pages = audit.lines().filter(|l| l.contains("continue=")).count();
    let lists = audit.lines().count();
    eprintln!("the agents listed pods {lists} times, {pages} of them a later page");
    // node1 lists its own pods, node2 and node3 (candidate holders) those of every node: each
    // list is 21 pages of at most 500.
    let expected = 3 * (CROWD + 1).div_ceil(500) - 3;
    let own = audit
        .lines()
        .filter(|l| l.contains("continue=") && l.contains("fieldSelector=spec.nodeName%3Dnode1"))
        .count();
    ensure!(
        own >= expected / 3,
        "node1 listed its own pods in {own} later pages, not {}",
        expected / 3
    );
    ensure!(
        pages >= expected,
        "{pages} lists of a later page, not {expected} (three lists of {} pods in pages of 500):\n{}",
        CROWD + 1,
        tail(&audit, 5)
    );
    for agent in &lab.agents {
        let log = agent.log()?;
        let view = log
            .lines()
            .find(|l| l.contains("first complete view"))
            .unwrap_or_default()
            .to_owned();
        let rss = rss_kib(agent.pid())?;
        eprintln!(
            "agent on {}: {} MiB resident; {view}",
            agent.node(),
            rss / 1024
        );
        ensure!(
            view.contains(&format!("pods={}", CROWD + 1)),
            "the agent on {} did not see every pod: {view}",
            agent.node()
        );
        // A debug build held 59 MiB here when this was written. Far more would mean objects
        // kept whole instead of as the model's few fields.
        ensure!(
            rss < 128 * 1024,
            "the agent on {} holds {} MiB with {} pods",
            agent.node(),
            rss / 1024,
            CROWD + 1
        );
    }
    Ok(())
}

/// VmRSS of a process, in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no VmRSS")?
        .parse()
        .context("odd VmRSS")
}

/// Annotations made through the API change a pod's source; while the API server is away a
/// pod's connections keep leaving with the egress IP, and changes made once it is back apply.
/// Also: a Node's `static-egress.io/kernel-log` annotation turns its kernel log on.
#[test]
fn annotations_through_the_api_and_an_api_server_outage() -> Result<()> {
    // node1 asks its agent's kernel programs to log, as an operator debugging one node would.
    let kernel_log = |api: &RealApiServer| {
        api.kubectl([
            "annotate",
            "node",
            "node1",
            "static-egress.io/kernel-log=debug",
        ])
        .map(drop)
    };
    Lab::run_with(|_| Ok(Vec::new()), kernel_log, annotations_and_outage)
}

/// Agents restarted while the API server is down wait for it without exiting, keep the data
/// path they find pinned (the pod's traffic still leaves with the egress IP), report themselves
/// live but not ready and say why, and become ready once it answers.
#[test]
fn agents_started_without_an_api_server_keep_the_data_path_and_report_not_ready() -> Result<()> {
    Lab::run(started_without_api)
}

fn annotations_and_outage(lab: &mut Lab) -> Result<()> {
    lab.serving()?;
    for agent in &lab.agents {
        let logs = agent
            .log()?
            .contains("the kernel programs log into this log");
        ensure!(
            logs == (agent.node() == "node1"),
            "the kernel programs of {} log: {logs}",
            agent.node()
        );
    }
    let shop = lab.add_pod(PodSpec::new("payments", "shop", "node3"))?;
    let (cluster, pod) = (&lab.cluster, &lab.pod);
    let node3 = cluster.node("node3")?.ip;
    expect_source(cluster, &shop, node3)?;
    let annotation = format!("{GATEWAY_ANNOTATION}={GATEWAY}");
    lab.api
        .kubectl(["annotate", "pod", "-n", "payments", "shop", &annotation])?;
    let took = expect_source(cluster, &shop, EGRESS_IP)?;
    eprintln!("annotation through the API to the data path: {took:?}");

    // Long enough to outlast the server's stop (its grace period), its absence and its start.
    let connections = cluster.start_loop(pod, Duration::from_millis(20), 500)?;
    lab.api.stop_apiserver()?;
    let before = connections.answers()?.len();
    wait_until(APPLY, || {
        connections.answers().is_ok_and(|a| a.len() >= before + 25)
    })?;
    lab.api.start_apiserver()?;
    let (cluster, pod) = (&lab.cluster, &lab.pod);
    lab.api.kubectl([
        "annotate",
        "pod",
        "-n",
        "payments",
        "shop",
        &format!("{GATEWAY_ANNOTATION}-"),
    ])?;
    expect_source(cluster, &shop, node3)?;
    let answers = connections.wait(Duration::from_secs(60))?;
    expect_all_from(&answers, EGRESS_IP)?;
    ensure!(cluster.ask(pod)? == EGRESS_IP);
    Ok(())
}

fn started_without_api(lab: &mut Lab) -> Result<()> {
    lab.serving()?;
    wait_until(APPLY, || health(&lab.cluster, "node1", true).is_ok())?;
    lab.api.stop_apiserver()?;
    for agent in &mut lab.agents {
        agent.stop()?;
    }
    let connections = lab
        .cluster
        .start_loop(&lab.pod, Duration::from_millis(20), 150)?;
    lab.agents = lab.start_agents()?;
    std::thread::sleep(Duration::from_secs(4));
    for agent in &mut lab.agents {
        ensure!(
            agent.is_running(),
            "the agent on {} exited without an API server:\n{}",
            agent.node(),
            agent.log()?
        );
    }
    let cluster = &lab.cluster;
    ensure!(health(cluster, "node1", false).is_ok(), "not even live");
    let not_ready = health(cluster, "node1", true).err().map(|e| e.to_string());
    ensure!(
        not_ready
            .as_deref()
            .is_some_and(|e| e.contains("cannot start watching the cluster")),
        "readiness should fail and say why: {not_ready:?}"
    );
    lab.api.start_apiserver()?;
    let cluster = &lab.cluster;
    wait_until(APPLY, || health(cluster, "node1", true).is_ok())
        .context("the agent did not become ready once the API server answered")?;
    let answers = connections.wait(Duration::from_secs(60))?;
    ensure!(answers.len() == 150, "the probe ended early: {answers:?}");
    expect_all_from(&answers, EGRESS_IP)?;
    Ok(())
}

/// A lab whose agents run in cluster mode against a real API server, with the token of the
/// DaemonSet's ServiceAccount, and pod api-1 on node1 using the gateway.
struct Lab {
    cluster: Cluster,
    api: RealApiServer,
    pod: LabPod,
    agents: Vec<AgentHandle>,
    kubeconfig: std::path::PathBuf,
}

impl Lab {
    fn run(scenario: impl FnOnce(&mut Lab) -> Result<()>) -> Result<()> {
        Self::run_with(|_| Ok(Vec::new()), |_| Ok(()), scenario)
    }

    /// [`Self::run`] with the kube-apiserver arguments that `api_args` gives (from the lab's
    /// directory) and `prepare` done on the server before the agents start.
    fn run_with(
        api_args: impl FnOnce(&Path) -> Result<Vec<String>>,
        prepare: impl FnOnce(&RealApiServer) -> Result<()>,
        scenario: impl FnOnce(&mut Lab) -> Result<()>,
    ) -> Result<()> {
        let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let mut cluster = three_nodes(env!("CARGO_BIN_EXE_se-probe").as_ref())?;
        let pod = api_pod(&mut cluster, "api-1", "node1")?;
        let api = RealApiServer::start_with_args(
            cluster.router_netns(),
            cluster.router_ip(),
            cluster.dir(),
            api_args(cluster.dir())?,
        )?;
        install(&api)?;
        api.create_objects(&cluster.objects().api_objects()?)?;
        prepare(&api)?;
        let token = api.token_for_service_account(AGENT_NAMESPACE, AGENT_ACCOUNT)?;
        let kubeconfig = cluster.dir().join("agent.kubeconfig");
        api.kubeconfig_for_token(&kubeconfig, &token)?;
        let mut lab = Lab {
            cluster,
            api,
            pod,
            agents: Vec::new(),
            kubeconfig,
        };
        lab.agents = lab.start_agents()?;
        let result = scenario(&mut lab);
        if result.is_err() {
            for agent in &lab.agents {
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

    /// An agent on every node, with the ServiceAccount's token.
    fn start_agents(&self) -> Result<Vec<AgentHandle>> {
        let args = ["--lease-namespace", AGENT_NAMESPACE, "--rejoin-after", "1s"];
        self.cluster
            .nodes()
            .iter()
            .map(|n| {
                self.cluster
                    .start_agent_with_kubeconfig(&n.name, &self.kubeconfig, &args)
            })
            .collect()
    }

    /// A pod in the lab and on the API server, as a kubelet would have it running.
    fn add_pod(&mut self, spec: PodSpec) -> Result<LabPod> {
        let pod = self.cluster.add_pod(spec)?;
        let object = self
            .cluster
            .objects()
            .api_objects()?
            .into_iter()
            .find(|o| {
                o["kind"] == "Pod"
                    && o["metadata"]["namespace"] == pod.namespace.as_str()
                    && o["metadata"]["name"] == pod.name.as_str()
            })
            .context("the lab has no object for the pod it added")?;
        self.api.create_objects(&[object])?;
        Ok(pod)
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

fn kubectl_views_and_restart(lab: &mut Lab) -> Result<()> {
    let (cluster, api) = (&lab.cluster, &lab.api);
    lab.serving()?;
    // Another controller's condition on the gateway, under its own field manager.
    let audited = serde_json::json!({
        "apiVersion": "static-egress.io/v1alpha1", "kind": "EgressGateway",
        "metadata": {"name": GATEWAY},
        "status": {"conditions": [{
            "type": "Audited", "status": "True", "reason": "Reviewed",
            "message": "set by another controller", "lastTransitionTime": "2026-01-01T00:00:00Z",
        }]},
    });
    let audit_file = api.dir().join("audited.json");
    std::fs::write(&audit_file, audited.to_string())?;
    api.kubectl([
        "apply",
        "--server-side",
        "--field-manager=auditor",
        "--subresource=status",
        "-f",
        &audit_file.to_string_lossy(),
    ])?;
    // A pod that names a gateway that does not exist: node1 warns on the pod.
    api.create_objects(&[serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "stray-1", "namespace": "payments",
            "annotations": {"static-egress.io/gateway": "no-such-gateway"}},
        "spec": {"nodeName": "node1"},
        "status": {"phase": "Running", "podIP": "10.244.1.250", "podIPs": [{"ip": "10.244.1.250"}]},
    })])?;
    // The egress IP moves, so the status is written again and node3 announces the move.
    lab.set_ready("node2", false)?;
    wait_until(APPLY, || holds_alone(cluster, "node3", "node2", EGRESS_IP))
        .context("node3 did not take the egress IP from the NotReady node2")?;

    let described = |what: &[&str], wanted: &[&str]| {
        let mut last = String::new();
        wait_until(APPLY, || {
            last = api
                .kubectl(["describe"].iter().chain(what))
                .unwrap_or_default();
            let events = last.split("Events:").nth(1).unwrap_or_default();
            wanted.iter().all(|w| events.contains(w))
        })
        .with_context(|| {
            format!(
                "`kubectl describe {}` lacks {wanted:?}:\n{last}",
                what.join(" ")
            )
        })
    };
    described(
        &["pod", "-n", "payments", "stray-1"],
        &["UnknownGateway", "no-such-gateway"],
    )?;
    described(
        &["egw", GATEWAY],
        &["HolderChanged", "moved from node2 to node3"],
    )?;
    // `static-egress explain` against the cluster, with the admin's kubeconfig.
    let explain = |pod: &str| {
        netlab::exec(
            api.netns(),
            [
                "env".to_owned(),
                format!("KUBECONFIG={}", api.admin_kubeconfig().display()),
                cluster.agent_bin()?.display().to_string(),
                "explain".to_owned(),
                pod.to_owned(),
            ],
        )
    };
    for (pod, says) in [
        (
            "payments/stray-1",
            "the pod's annotation is refused: no gateway no-such-gateway exists",
        ),
        (
            "payments/api-1",
            "result: gateway corp-fw, because its podSelector matches",
        ),
    ] {
        let explained = explain(pod)?;
        ensure!(
            explained.contains(says),
            "explain {pod} does not say {says:?}:\n{explained}"
        );
    }
    let conditions = || {
        api.kubectl([
            "get",
            "egw",
            GATEWAY,
            "-o",
            "jsonpath={range .status.conditions[*]}{.type}={.status} {end}",
        ])
        .unwrap_or_default()
    };
    wait_until(APPLY, || {
        let now = conditions();
        now.contains("Ready=True") && now.contains("Audited=True")
    })
    .with_context(|| format!("the gateway's conditions are {:?}", conditions()))?;
    let table = api.kubectl(["get", "egw", GATEWAY])?;
    let row = table.lines().nth(1).unwrap_or_default();
    ensure!(
        row.contains("node3") && row.contains("True"),
        "`kubectl get egw` does not show node3 holding and Ready:\n{table}"
    );
    lab.set_ready("node2", true)?;
    wait_until(APPLY, || holds_alone(cluster, "node2", "node3", EGRESS_IP))
        .context("node2 did not take its egress IP back once Ready")?;

    // Writes after the agents' last watch events, compacted away, then a restart that drops
    // the server's watch cache: the agents' watches resume at a compacted resourceVersion.
    for i in 0..3 {
        api.kubectl([
            "annotate",
            "namespace",
            "default",
            "--overwrite",
            &format!("lab/tick={i}"),
        ])?;
    }
    api.compact_etcd()?;
    lab.api.restart()?;
    let (cluster, api) = (&lab.cluster, &lab.api);
    // Back means serving lists of what the agents watch: `/readyz` answers before the
    // restarted server's watch caches (and its authorizer) have caught up, and lists wait for
    // them (up to a second or two on these 2 cores).
    api.kubectl(["get", "namespaces,nodes,pods,egw", "-A", "-o", "name"])?;
    let answering = Instant::now();
    api.kubectl(["label", "pod", "-n", "payments", &lab.pod.name, "app-"])?;
    let node1 = cluster.node("node1")?.ip;
    wait_until(APPLY, || cluster.ask(&lab.pod).is_ok_and(|ip| ip == node1))
        .context("node1 did not stop using the gateway for the unlabelled pod")?;
    let current = answering.elapsed();
    eprintln!("after the restart, node1 applied a change {current:?} after the server answered");
    // The watches came back to a real 410: their versions were compacted away.
    let node1_log = lab
        .agents
        .iter()
        .find(|a| a.node() == "node1")
        .context("no agent on node1")?
        .log()?;
    ensure!(
        node1_log
            .lines()
            .any(|l| l.contains("pods of this node") && l.contains("too old resource version")),
        "node1's pod watch did not get 410 Gone after the compaction and restart"
    );
    // Usually 0.1 s. Lists answering is not yet watches answering: once in a full run the
    // restarted server's watch of the custom resource came back a second after the others
    // (2.1 s here). The agents' own lag was 10 s and more before their retries were bounded.
    ensure!(
        current < Duration::from_secs(3),
        "node1 was current only {current:?} after the server answered again"
    );
    api.kubectl(["label", "pod", "-n", "payments", &lab.pod.name, "app=api"])?;
    expect_source(cluster, &lab.pod, EGRESS_IP)?;
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
