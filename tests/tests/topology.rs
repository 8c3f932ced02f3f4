//! The lab without any agent: pods of both styles, and pods wired by real CNI plugins, reach
//! `ext` through the CNI's masquerade (so `ext` sees node addresses), and removing the lab
//! leaves nothing behind. The fabric's options do what they say: the VXLAN overlay carries pods
//! past a router that drops pod sources, nodes on another segment are reached through the
//! router, and the fabric MTU decides whether jumbo frames cross.

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

// ---- the fabric: overlay, pod-source filter, segments, MTU ----------------------------------

/// Runs `args` in `netns`, expecting it to fail; returns what it printed, so the test can check
/// it failed for the expected reason.
fn fails(netns: &str, args: &[&str]) -> Result<String> {
    let out = netlab::exec_output(netns, args)?;
    ensure!(
        !out.status.success(),
        "`{}` in {netns} succeeded: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

fn ping(netns: &str, to: Ipv4Addr) -> Result<()> {
    netlab::exec(netns, ["ping", "-c", "1", "-W", "2", &to.to_string()])?;
    Ok(())
}

fn ping_fails(netns: &str, to: Ipv4Addr) -> Result<()> {
    fails(netns, &["ping", "-c", "1", "-W", "1", &to.to_string()])?;
    Ok(())
}

fn addr(text: &str) -> Ipv4Addr {
    text.parse().expect("address")
}

/// The MTU of `device` in `netns`.
fn mtu(netns: &str, device: &str) -> Result<u32> {
    let shown = netlab::exec(netns, ["ip", "-o", "link", "show", "dev", device])?;
    let mut words = shown.split_whitespace();
    words
        .by_ref()
        .find(|w| *w == "mtu")
        .context("no mtu shown")?;
    Ok(words.next().context("no mtu value")?.parse()?)
}

/// Flannel's VXLAN overlay carries pods across a fabric that drops pod sources: the pod's own
/// address arrives at the other pod, the filter never sees it, and the same packet sent
/// unwrapped over the uplink is dropped and counted.
#[test]
fn an_overlay_carries_pods_across_a_fabric_that_drops_pod_sources() -> Result<()> {
    let mut cluster = Cluster::builder()
        .nodes(2)
        .with_node("node2", |n| n.pod_style(PodStyle::Bridged))
        .overlay(true)
        .fabric_drops_pod_sources(true)
        .probe_bin(env!("CARGO_BIN_EXE_se-probe"))
        .build()?;
    let node1 = cluster.node("node1")?.clone();
    let node2 = cluster.node("node2")?.clone();
    let (vtep1, vtep2) = (
        node1.vtep.clone().context("node1 has no VXLAN device")?,
        node2.vtep.clone().context("node2 has no VXLAN device")?,
    );
    assert_eq!(
        (vtep1.device.as_str(), vtep1.address, vtep1.mtu),
        ("flannel.1", addr("10.244.1.0"), 1450)
    );
    assert_eq!(vtep2.mac, "0e:fe:0a:63:00:0c");

    // What Flannel leaves on a node, peer by peer.
    let device = node1.exec(["ip", "-d", "-o", "link", "show", "dev", "flannel.1"])?;
    for part in [
        "mtu 1450",
        "link/ether 0e:fe:0a:63:00:0b",
        "vxlan id 1 local 10.99.0.11 dev eth0",
        "dstport 8472",
        "nolearning",
    ] {
        ensure!(device.contains(part), "{part:?} missing from {device}");
    }
    let addresses = node1.exec(["ip", "-o", "-4", "addr", "show", "dev", "flannel.1"])?;
    ensure!(addresses.contains("inet 10.244.1.0/32"), "{addresses}");
    let route = node1.exec(["ip", "route", "show", "10.244.2.0/24"])?;
    assert_eq!(
        route.trim(),
        "10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink"
    );
    let neigh = node1.exec(["ip", "neigh", "show", "dev", "flannel.1"])?;
    ensure!(
        neigh.contains("10.244.2.0 lladdr 0e:fe:0a:63:00:0c PERMANENT"),
        "{neigh}"
    );
    let fdb = node1.exec(["bridge", "fdb", "show", "dev", "flannel.1"])?;
    ensure!(
        fdb.contains("0e:fe:0a:63:00:0c dst 10.99.0.12 self permanent"),
        "{fdb}"
    );

    let a = cluster.add_pod(PodSpec::new("default", "a", "node1"))?;
    let b = cluster.add_pod(PodSpec::new("default", "b", "node2"))?;
    ping(&a.netns, b.ip)?;
    let (_in_b, server_b) = serve_in(&cluster, &b, 7000)?;
    assert_eq!(ask_from(&cluster, &a, server_b)?, a.ip);
    // The nodes talk to each other's pods over the overlay too, from their VXLAN address.
    ping(&node1.netns, b.ip)?;
    assert_eq!(cluster.ask(&a)?, node1.ip);
    assert_eq!(cluster.ask(&b)?, node2.ip);
    assert_eq!(cluster.fabric_drops()?, 0);

    // A more specific host-gw route takes b out of the overlay: a's packets now cross the
    // fabric with a's address, and the router's bridge drops them.
    let detour = ["ip", "route", "add", "10.244.2.2/32", "via", "10.99.0.12"];
    node1.exec(detour)?;
    ping_fails(&a.netns, b.ip)?;
    let dropped = cluster.fabric_drops()?;
    ensure!(dropped >= 1, "the fabric dropped {dropped} packets");
    node1.exec(["ip", "route", "del", "10.244.2.2/32"])?;
    ping(&a.netns, b.ip)?;
    assert_eq!(cluster.fabric_drops()?, dropped);
    Ok(())
}

/// Without an overlay, host-gw routes put pod sources on the fabric, and a fabric that drops
/// them stops pod-to-pod traffic across nodes, on one segment (the router's bridge) as between
/// segments (its forwarding); masqueraded traffic and the nodes themselves pass.
#[test]
fn a_fabric_that_drops_pod_sources_stops_host_gw_pod_traffic() -> Result<()> {
    let mut cluster = Cluster::builder()
        .nodes(3)
        .with_node("node3", |n| n.segment(1))
        .fabric_drops_pod_sources(true)
        .probe_bin(env!("CARGO_BIN_EXE_se-probe"))
        .build()?;
    let node1 = cluster.node("node1")?.clone();
    let a = cluster.add_pod(PodSpec::new("default", "a", "node1"))?;
    let b = cluster.add_pod(PodSpec::new("default", "b", "node2"))?;
    let c = cluster.add_pod(PodSpec::new("default", "c", "node3"))?;
    assert_eq!(cluster.fabric_drops()?, 0);

    ping_fails(&a.netns, b.ip)?;
    let on_the_bridge = cluster.fabric_drops()?;
    ensure!(
        on_the_bridge >= 1,
        "nothing dropped between node1 and node2"
    );
    ping_fails(&a.netns, c.ip)?;
    let routed = cluster.fabric_drops()?;
    ensure!(
        routed > on_the_bridge,
        "nothing dropped between the segments ({routed} in all)"
    );

    assert_eq!(cluster.ask(&a)?, node1.ip);
    assert_eq!(cluster.ask(&c)?, cluster.node("node3")?.ip);
    ping(&node1.netns, cluster.node("node2")?.ip)?;
    ping(&node1.netns, cluster.node("node3")?.ip)?;
    assert_eq!(cluster.fabric_drops()?, routed);
    Ok(())
}

/// node3 sits on a subnet of its own behind the router. Nodes, pods to pods (with their own
/// addresses) and pods to `ext` all get through; host-gw routes to its pods go via the router,
/// which routes pod CIDRs as a routed fabric does, while an overlay needs none of that.
fn a_node_on_another_segment_is_reached_through_the_router(overlay: bool) -> Result<()> {
    let mut cluster = Cluster::builder()
        .nodes(3)
        .with_node("node2", |n| n.pod_style(PodStyle::Bridged))
        .with_node("node3", |n| n.segment(1))
        .overlay(overlay)
        // With the overlay, pod sources never cross the fabric unwrapped, routed hop or not.
        .fabric_drops_pod_sources(overlay)
        .probe_bin(env!("CARGO_BIN_EXE_se-probe"))
        .build()?;
    let node1 = cluster.node("node1")?.clone();
    let node3 = cluster.node("node3")?.clone();
    let segment = cluster.node_segment("node3")?.clone();
    assert_eq!(
        (
            segment.number,
            segment.subnet.to_string(),
            segment.router_ip,
            segment.bridge.as_str()
        ),
        (1, "10.99.1.0/24".to_owned(), addr("10.99.1.1"), "seg1")
    );
    assert_eq!(
        (node3.ip, node3.gateway),
        (addr("10.99.1.13"), segment.router_ip)
    );
    assert_eq!(
        cluster.node_segment("node1")?.bridge,
        cluster.router_bridge()
    );
    assert_eq!(cluster.segments().len(), 2);
    let object = cluster
        .objects()
        .nodes
        .iter()
        .find(|n| n.name == "node3")
        .context("no Node object for node3")?;
    assert_eq!(object.internal_ip, Some(node3.ip));

    ping(&node3.netns, node1.ip)?;
    let path = node3.exec(["ip", "route", "get", &node1.ip.to_string()])?;
    ensure!(path.contains("via 10.99.1.1 dev eth0"), "{path}");

    let a = cluster.add_pod(PodSpec::new("default", "a", "node1"))?;
    let b = cluster.add_pod(PodSpec::new("default", "b", "node2"))?;
    let c = cluster.add_pod(PodSpec::new("default", "c", "node3"))?;
    assert_eq!(c.ip, addr("10.244.3.2"));
    assert_eq!(cluster.ask(&c)?, node3.ip);
    ping(&c.netns, a.ip)?;
    ping(&c.netns, b.ip)?;
    ping(&b.netns, c.ip)?;
    let (_in_a, server_a) = serve_in(&cluster, &a, 7000)?;
    let (_in_c, server_c) = serve_in(&cluster, &c, 7000)?;
    assert_eq!(ask_from(&cluster, &c, server_a)?, c.ip);
    assert_eq!(ask_from(&cluster, &b, server_c)?, b.ip);

    let router_routes = netlab::exec(cluster.router_netns(), ["ip", "route", "show"])?;
    let to_node3_pods = node1.exec(["ip", "route", "show", "10.244.3.0/24"])?;
    if overlay {
        let fdb = node1.exec(["bridge", "fdb", "show", "dev", "flannel.1"])?;
        ensure!(fdb.contains("dst 10.99.1.13 self permanent"), "{fdb}");
        ensure!(
            to_node3_pods.contains("dev flannel.1 onlink"),
            "{to_node3_pods}"
        );
        ensure!(!router_routes.contains("10.244."), "{router_routes}");
        assert_eq!(cluster.fabric_drops()?, 0);
    } else {
        assert_eq!(to_node3_pods.trim(), "10.244.3.0/24 via 10.99.0.1 dev eth0");
        let to_node2_pods = node1.exec(["ip", "route", "show", "10.244.2.0/24"])?;
        assert_eq!(
            to_node2_pods.trim(),
            "10.244.2.0/24 via 10.99.0.12 dev eth0"
        );
        for route in [
            "10.244.1.0/24 via 10.99.0.11 dev br0",
            "10.244.3.0/24 via 10.99.1.13 dev seg1",
        ] {
            ensure!(
                router_routes.contains(route),
                "{route:?} missing from {router_routes}"
            );
        }
    }
    Ok(())
}

#[test]
fn a_node_on_another_segment_is_reached_through_the_router_by_host_gw_routes() -> Result<()> {
    a_node_on_another_segment_is_reached_through_the_router(false)
}

#[test]
fn a_node_on_another_segment_is_reached_through_the_router_by_the_overlay() -> Result<()> {
    a_node_on_another_segment_is_reached_through_the_router(true)
}

/// Every link of the fabric takes the fabric's MTU, and the VXLAN devices 50 bytes less: an
/// 8000-byte ping that may not be fragmented crosses a 9000 fabric (on a segment, through the
/// router, to ext, and inside the overlay) and is refused by a 1500 one, where the overlay
/// carries at most 1450.
#[test]
fn the_fabric_mtu_decides_whether_jumbo_frames_cross() -> Result<()> {
    let jumbo = |mtu: u32| {
        Cluster::builder()
            .nodes(3)
            .with_node("node3", |n| n.segment(1))
            .overlay(true)
            .fabric_mtu(mtu)
            .probe_bin(env!("CARGO_BIN_EXE_se-probe"))
            .build()
    };
    let big = ["ping", "-M", "do", "-s", "8000", "-c", "1", "-W", "2"];

    let cluster = jumbo(9000)?;
    let node1 = cluster.node("node1")?.clone();
    let router = cluster.router_netns();
    let mut mtus = vec![
        mtu(&node1.netns, &node1.uplink)?,
        mtu(router, &node1.router_port)?,
        mtu(router, cluster.router_bridge())?,
        mtu(router, "seg1")?,
        mtu(router, "ext0")?,
        mtu(cluster.ext_netns(), "eth0")?,
    ];
    mtus.dedup();
    assert_eq!(mtus, [9000]);
    assert_eq!(mtu(&node1.netns, "flannel.1")?, 8950);
    for to in [
        cluster.node("node2")?.ip,
        cluster.node("node3")?.ip,
        cluster.ext_ip(),
        addr("10.244.2.0"),
        addr("10.244.3.0"),
    ] {
        let target = to.to_string();
        node1
            .exec(big.iter().copied().chain([target.as_str()]))
            .with_context(|| format!("8000 bytes to {to} on a 9000 fabric"))?;
    }
    drop(cluster);

    let cluster = jumbo(1500)?;
    let node1 = cluster.node("node1")?.clone();
    assert_eq!(mtu(&node1.netns, &node1.uplink)?, 1500);
    assert_eq!(mtu(&node1.netns, "flannel.1")?, 1450);
    let node2 = cluster.node("node2")?.ip.to_string();
    let refused = fails(
        &node1.netns,
        &big.iter()
            .copied()
            .chain([node2.as_str()])
            .collect::<Vec<_>>(),
    )?;
    ensure!(refused.contains("message too long"), "{refused}");
    // The largest ICMP payload flannel.1 carries whole is 1450 - 28 bytes of IPv4 and ICMP.
    let fits = [
        "ping",
        "-M",
        "do",
        "-c",
        "1",
        "-W",
        "2",
        "-s",
        "1422",
        "10.244.2.0",
    ];
    node1.exec(fits)?;
    let too_big = [
        "ping",
        "-M",
        "do",
        "-c",
        "1",
        "-W",
        "2",
        "-s",
        "1423",
        "10.244.2.0",
    ];
    let refused = fails(&node1.netns, &too_big)?;
    ensure!(refused.contains("message too long"), "{refused}");
    Ok(())
}
