//! The lab without any agent: pods of both styles, and pods wired by real CNI plugins, reach
//! `ext` through the CNI's masquerade (so `ext` sees node addresses), and removing the lab
//! leaves nothing behind.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, ensure};
use netlab::{Cluster, CniPlugin, LabNode, LabPod, PodSpec, PodStyle};

fn leftovers(prefix: &str, dir: &Path) -> Result<Vec<String>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/run/netns")? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!("{prefix}-")) {
            found.push(format!("namespace {name}"));
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    let dir_text = dir.to_string_lossy();
    found.extend(
        mounts
            .lines()
            .filter(|l| l.contains(dir_text.as_ref()))
            .map(|l| format!("mount {l}")),
    );
    if dir.exists() {
        found.push(format!("directory {}", dir.display()));
    }
    Ok(found)
}

#[test]
fn pods_leave_with_their_node_address_and_drop_removes_everything() -> Result<()> {
    let mut cluster = Cluster::builder()
        .nodes(3)
        .with_node("node2", |n| n.pod_style(PodStyle::Bridged))
        .probe_bin(env!("CARGO_BIN_EXE_se-probe"))
        .build()?;
    let (prefix, dir) = (cluster.prefix().to_owned(), cluster.dir().to_owned());

    let routed = cluster.add_pod(PodSpec::new("default", "routed", "node1"))?;
    let bridged = cluster.add_pod(PodSpec::new("default", "bridged", "node2").label("app", "x"))?;
    assert!(routed.host_veth.starts_with("cali") && routed.host_veth.len() == 15);
    assert_eq!(routed.ip.to_string(), "10.244.1.2");
    assert_eq!(bridged.ip.to_string(), "10.244.2.2");

    let node1 = cluster.node("node1")?.ip;
    let node2 = cluster.node("node2")?.ip;
    assert_eq!(cluster.ask(&routed)?, node1);
    assert_eq!(cluster.ask(&bridged)?, node2);
    assert_eq!(cluster.ext_seen()?, vec![node1, node2]);

    // host-gw routes carry pod-to-pod traffic between nodes, unmasqueraded.
    routed.exec(["ping", "-c", "1", "-W", "2", &bridged.ip.to_string()])?;

    let rp_filter = cluster
        .node("node3")?
        .exec(["cat", "/proc/sys/net/ipv4/conf/eth0/rp_filter"])?;
    assert_eq!(rp_filter.trim(), "1");

    // A pod can go and come back under the same name, as a restarted pod would.
    cluster.remove_pod("default", "routed")?;
    let again = cluster.add_pod(PodSpec::new("default", "routed", "node1"))?;
    assert_eq!(cluster.ask(&again)?, node1);

    let loop_run = cluster.start_loop(&bridged, std::time::Duration::from_millis(10), 3)?;
    let answers = loop_run.wait(std::time::Duration::from_secs(10))?;
    assert_eq!(
        answers
            .iter()
            .filter_map(netlab::Answer::source)
            .collect::<Vec<_>>(),
        vec![node2; 3]
    );

    let digest = cluster.write_objects()?;
    assert_eq!(digest, cluster.objects_digest()?);
    let text = std::fs::read_to_string(cluster.objects_path())?;
    ensure!(
        text.contains("kind: Node") && text.contains("kind: Pod"),
        "{text}"
    );

    drop(cluster);
    assert_eq!(leftovers(&prefix, &dir)?, Vec::<String>::new());
    Ok(())
}

#[test]
fn a_kept_lab_is_removed_by_its_script() -> Result<()> {
    let cluster = Cluster::builder()
        .node(netlab::NodeSpec::new("solo"))
        .probe_bin(env!("CARGO_BIN_EXE_se-probe"))
        .build()?;
    let kept = cluster.keep()?;
    assert!(
        !leftovers(&kept.prefix, &kept.dir)?.is_empty(),
        "keep removed the lab"
    );
    let out = std::process::Command::new("bash")
        .arg(&kept.script)
        .output()?;
    ensure!(
        out.status.success(),
        "{} failed ({}): {}",
        kept.command(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(leftovers(&kept.prefix, &kept.dir)?, Vec::<String>::new());
    Ok(())
}

#[test]
fn a_build_that_fails_halfway_leaves_nothing_behind() -> Result<()> {
    // `false` exits at once instead of serving, so the build fails after the whole topology
    // exists, at the last step.
    let err = Cluster::builder()
        .tag("nlfail")
        .nodes(2)
        .probe_bin("/bin/false")
        .build()
        .err()
        .ok_or_else(|| anyhow::anyhow!("build succeeded without a probe server"))?;
    ensure!(format!("{err:#}").contains("did not get ready"), "{err:#}");
    let mut left = Vec::new();
    for entry in std::fs::read_dir("/run/netns")? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with("nlfail-") {
            left.push(name);
        }
    }
    for entry in std::fs::read_dir(std::env::temp_dir())? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with("nlfail-") {
            left.push(name);
        }
    }
    assert_eq!(left, Vec::<String>::new());
    Ok(())
}

/// The node's interfaces, by name.
fn links(node: &LabNode) -> Result<Vec<String>> {
    Ok(node
        .exec(["ip", "-o", "link", "show"])?
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_owned())
        .collect())
}

/// `se-probe serve` in a pod, ready for connections; killed with the pod's namespace.
fn serve_in(cluster: &Cluster, pod: &LabPod, port: u16) -> Result<(Child, SocketAddrV4)> {
    let listen = SocketAddrV4::new(pod.ip, port);
    let mut child = Command::new("ip")
        .args(["netns", "exec", &pod.netns])
        .arg(cluster.probe_bin())
        .args(["serve", "--listen", &listen.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("no stdout")?).read_line(&mut line)?;
    ensure!(
        line.trim() == "ready",
        "se-probe serve in {}: {line:?}",
        pod.name
    );
    Ok((child, listen))
}

fn ask_from(cluster: &Cluster, pod: &LabPod, server: SocketAddrV4) -> Result<Ipv4Addr> {
    let probe = cluster.probe_bin().to_owned();
    let answer = pod.exec([
        probe.as_os_str(),
        "ask".as_ref(),
        server.to_string().as_ref(),
    ])?;
    Ok(answer.trim().parse()?)
}

/// node1's pods are wired by `plugin`, node2's by the lab; node1's pod CIDR is a /29 so that
/// host-local runs out of its five pod addresses (.2 to .6) within the test.
fn plugin_node_wires_its_pods(plugin: CniPlugin) -> Result<()> {
    let mut cluster = Cluster::builder()
        .nodes(2)
        .with_node("node1", |n| {
            n.cni_plugin(plugin)
                .pod_cidr("10.244.1.0/29".parse().expect("cidr"))
        })
        .probe_bin(env!("CARGO_BIN_EXE_se-probe"))
        .build()?;
    let (prefix, dir) = (cluster.prefix().to_owned(), cluster.dir().to_owned());
    let node1 = cluster.node("node1")?.clone();
    assert_eq!(node1.pod_style, plugin.pod_style());

    let a = cluster.add_pod(PodSpec::new("default", "a", "node1"))?;
    let b = cluster.add_pod(PodSpec::new("default", "b", "node1").unreported())?;
    let c = cluster.add_pod(PodSpec::new("default", "c", "node2"))?;
    assert_eq!(
        (a.ip.to_string(), b.ip.to_string()),
        ("10.244.1.2".into(), "10.244.1.3".into())
    );
    assert_eq!(a.style, plugin.pod_style());
    let ours = links(&node1)?;
    ensure!(
        ours.contains(&a.host_veth) && ours.contains(&b.host_veth),
        "{ours:?} lacks {} or {}",
        a.host_veth,
        b.host_veth
    );
    ensure!(
        ours.iter().any(|l| l == CniPlugin::BRIDGE) == (plugin == CniPlugin::Bridge),
        "{ours:?}"
    );

    // Between the CNI ADD and the kubelet's report the Pod object has no address yet.
    let object = |cluster: &Cluster| {
        let pod = cluster
            .objects()
            .pods
            .iter()
            .find(|p| p.name == "b")
            .cloned();
        pod.map(|p| (p.ip, p.phase))
    };
    assert_eq!(object(&cluster), Some((None, "Pending".into())));
    cluster.report_pod("default", "b")?;
    assert_eq!(object(&cluster), Some((Some(b.ip), "Running".into())));

    // The plugin's own masquerade, not the lab's rule.
    assert_eq!(cluster.ask(&a)?, node1.ip);
    assert_eq!(cluster.ask(&b)?, node1.ip);
    let nat = node1.exec(["iptables", "-w", "-t", "nat", "-S", "POSTROUTING"])?;
    ensure!(
        nat.contains("-j CNI-") && !nat.contains("10.244.0.0/16"),
        "node1's POSTROUTING: {nat}"
    );

    // Pod to pod, on the node and across nodes by host-gw routes. Into the plugin's pods the
    // source stays the pod's; out of them, ipMasq spares only the node's own pod CIDR, so a pod
    // on another node sees node1's address (as with these plugins on a real cluster).
    a.exec(["ping", "-c", "1", "-W", "2", &b.ip.to_string()])?;
    let (_in_a, server_a) = serve_in(&cluster, &a, 7000)?;
    let (_in_c, server_c) = serve_in(&cluster, &c, 7000)?;
    assert_eq!(ask_from(&cluster, &c, server_a)?, c.ip);
    assert_eq!(ask_from(&cluster, &b, server_a)?, b.ip);
    assert_eq!(ask_from(&cluster, &a, server_c)?, node1.ip);

    // Fill the range: host-local's refusal comes back through the plugin, and the failed ADD
    // leaves neither namespace nor veth behind.
    for name in ["d", "e", "f"] {
        cluster.add_pod(PodSpec::new("default", name, "node1"))?;
    }
    let veths = links(&node1)?.len();
    let err = cluster
        .add_pod(PodSpec::new("default", "g", "node1"))
        .err()
        .context("a sixth pod got an address out of five")?;
    let text = format!("{err:#}");
    ensure!(
        text.contains(plugin.type_name()) && text.contains("no IP addresses available"),
        "{text}"
    );
    ensure!(
        cluster.pod("default", "g").is_err(),
        "the failed pod stayed"
    );
    ensure!(
        !Path::new("/run/netns")
            .join(format!("{prefix}-pod-default.g"))
            .exists(),
        "the failed pod's namespace stayed"
    );
    assert_eq!(links(&node1)?.len(), veths);

    // Removing a pod deletes its veth and gives its address back to host-local.
    cluster.remove_pod("default", "a")?;
    ensure!(
        !links(&node1)?.contains(&a.host_veth),
        "{} stayed",
        a.host_veth
    );
    let lease = node1.ipam_dir().join("netlab").join(a.ip.to_string());
    ensure!(!lease.exists(), "{} stayed", lease.display());
    let g = cluster.add_pod(PodSpec::new("default", "g", "node1"))?;
    assert_eq!(g.ip, a.ip);
    assert_eq!(cluster.ask(&g)?, node1.ip);

    // A restarted sandbox: new container id, same pod UID.
    cluster.rewire_pod("default", "b")?;
    let again = cluster.pod("default", "b")?.clone();
    let (old, new) = (
        b.attachment.as_ref().context("no attachment")?,
        again.attachment.as_ref().context("no attachment")?,
    );
    assert_ne!(old.sandbox.container_id, new.sandbox.container_id);
    assert_eq!(old.sandbox.pod_uid, new.sandbox.pod_uid);
    ensure!(
        links(&node1)?.contains(&again.host_veth),
        "no {}",
        again.host_veth
    );
    assert_eq!(cluster.ask(&again)?, node1.ip);

    drop(cluster);
    assert_eq!(leftovers(&prefix, &dir)?, Vec::<String>::new());
    Ok(())
}

#[test]
fn the_bridge_plugin_wires_and_masquerades_a_nodes_pods() -> Result<()> {
    plugin_node_wires_its_pods(CniPlugin::Bridge)
}

#[test]
fn the_ptp_plugin_wires_and_masquerades_a_nodes_pods() -> Result<()> {
    plugin_node_wires_its_pods(CniPlugin::Ptp)
}

/// A plugin chained after `bridge` gets what a runtime gives it: a clean environment with the
/// CNI variables, `bridge`'s result as `prevResult`, and a DEL after its failed ADD that takes
/// back what `bridge` had done. Chains can change after the build.
#[test]
fn a_chained_plugin_gets_what_a_runtime_gives_it() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;

    // Records every call next to its link in the lab's CNI_PATH, and refuses every ADD.
    let script = std::env::temp_dir().join(format!("netlab-refuse-{}", std::process::id()));
    std::fs::write(
        &script,
        r#"#!/bin/sh
log="$(dirname "$0")/refuse.log"
{ echo "== $CNI_COMMAND"; env; cat; echo; } >> "$log"
if [ "$CNI_COMMAND" = ADD ]; then
    echo '{"cniVersion": "1.0.0", "code": 100, "msg": "refused by the test", "details": "as asked"}'
    echo "stand-in says no" >&2
    exit 1
fi
"#,
    )?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    let built = Cluster::builder()
        .nodes(1)
        .with_node("node1", |n| {
            n.cni_plugin(CniPlugin::Bridge)
                .chained(serde_json::json!({"type": "refuse", "mode": "strict"}))
        })
        .cni_plugin_bin("refuse", &script)
        .probe_bin(env!("CARGO_BIN_EXE_se-probe"))
        .build();
    let outcome = built.and_then(|mut cluster| {
        let node1 = cluster.node("node1")?.clone();
        let err = cluster
            .add_pod(PodSpec::new("web", "a", "node1"))
            .err()
            .context("the refusing plugin let the pod through")?;
        let text = format!("{err:#}");
        for part in [
            "refuse",
            "refused by the test",
            "as asked",
            "stand-in says no",
        ] {
            ensure!(text.contains(part), "{part:?} missing from {text}");
        }
        let log = std::fs::read_to_string(cluster.cni_bin_dir().join("refuse.log"))?;
        let (add, del) = log
            .split_once("== DEL")
            .context("no DEL after the failed ADD")?;
        for part in [
            "CNI_COMMAND=ADD",
            "CNI_IFNAME=eth0",
            "CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=web;K8S_POD_NAME=a;",
            "\"mode\":\"strict\"",
            "\"name\":\"netlab\"",
            "\"prevResult\":{",
            "\"address\":\"10.244.1.2/24\"",
        ] {
            ensure!(
                add.contains(part),
                "{part:?} missing from the ADD call:\n{add}"
            );
        }
        ensure!(
            !log.contains("CARGO"),
            "the test's environment leaked:\n{log}"
        );
        let id = |call: &str| {
            call.lines()
                .find_map(|l| l.strip_prefix("CNI_CONTAINERID="))
                .map(str::to_owned)
        };
        ensure!(id(add).is_some() && id(add) == id(del), "{log}");
        // The DEL took back bridge's veth and host-local's lease.
        ensure!(
            !links(&node1)?.iter().any(|l| l.starts_with("veth")),
            "{:?}",
            links(&node1)?
        );
        let leases: Vec<String> = std::fs::read_dir(node1.ipam_dir().join("netlab"))?
            .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_>>()?;
        ensure!(
            leases.iter().all(|l| l.parse::<Ipv4Addr>().is_err()),
            "{leases:?}"
        );

        // A system plugin chained after the build: `tuning` changes the pod's sysctls.
        let tuning = serde_json::json!({
            "type": "tuning",
            "sysctl": {"net.ipv4.conf.eth0.rp_filter": "2"},
        });
        cluster.set_chained("node1", vec![tuning])?;
        let a = cluster.add_pod(PodSpec::new("web", "a", "node1"))?;
        let rp_filter = a.exec(["cat", "/proc/sys/net/ipv4/conf/eth0/rp_filter"])?;
        assert_eq!(rp_filter.trim(), "2");
        assert_eq!(cluster.ask(&a)?, node1.ip);
        cluster.remove_pod("web", "a")?;
        Ok(())
    });
    std::fs::remove_file(&script)?;
    outcome
}
