//! The lab without any agent: pods of both styles reach `ext` through the CNI's masquerade (so
//! `ext` sees node addresses), and removing the lab leaves nothing behind.

use std::path::Path;

use anyhow::{Result, ensure};
use netlab::{Cluster, PodSpec, PodStyle};

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
