//! trafgen (Debian's `netsniff-ng`) in a pod: 64-byte UDP datagrams written straight into a
//! packet socket's ring, as fast as one CPU sends them. The kernel builds such packets with only
//! the Ethernet header in the part programs read directly (the rest stays in the ring's pages):
//! the bench's small-packet stream, and a test that our programs handle headers there.

use std::fs::File;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{Cluster, LabPod};

/// trafgen sending from the pod to the external host's UDP `port`, from half a second after
/// [`Stream::start`] until dropped.
pub struct Stream {
    sender: Child,
    log: PathBuf,
}

impl Stream {
    pub fn start(cluster: &Cluster, pod: &LabPod, port: u16) -> Result<Self> {
        let config = cluster.dir().join(format!("small-{port}.trafgen"));
        std::fs::write(&config, config_text(cluster, pod, port)?)?;
        let log = cluster.dir().join(format!("trafgen-{port}.out"));
        let out = File::create(&log)?;
        // Its own process group: trafgen sends from a child per CPU, which must stop with it
        // (a sender left behind would send on through whatever comes next).
        let sender = Command::new("ip")
            .args([
                "netns", "exec", &pod.netns, "trafgen", "--dev", "eth0", "--cpus", "1",
            ])
            .arg("--conf")
            .arg(&config)
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .context("cannot start trafgen in the pod")?;
        std::thread::sleep(Duration::from_millis(500));
        Ok(Self { sender, log })
    }

    /// What trafgen printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .trim()
            .to_owned()
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if let Ok(group) = i32::try_from(self.sender.id()) {
            // SAFETY: signals the process group `start` made; no memory is involved.
            unsafe { libc::kill(-group, libc::SIGKILL) };
        }
        let _ = self.sender.wait();
    }
}

/// One 64-byte UDP datagram from the pod to the external host's `port`, Ethernet header
/// included (to the pod's next hop, which must be resolved already).
fn config_text(cluster: &Cluster, pod: &LabPod, port: u16) -> Result<String> {
    let ext = cluster.ext_ip();
    let json = |args: &[&str]| -> Result<Value> {
        serde_json::from_str(&pod.exec(args)?).context("ip printed no JSON")
    };
    let route = json(&["ip", "-j", "route", "get", &ext.to_string()])?;
    let hop = route[0]["gateway"]
        .as_str()
        .map_or(ext.to_string(), str::to_owned);
    let neighbour = json(&["ip", "-j", "neigh", "show", &hop, "dev", "eth0"])?;
    let link = json(&["ip", "-j", "link", "show", "eth0"])?;
    let (Some(da), Some(sa)) = (neighbour[0]["lladdr"].as_str(), link[0]["address"].as_str())
    else {
        bail!("no link-layer address for the pod's next hop {hop}: {neighbour}");
    };
    Ok(format!(
        "{{ eth(da={da}, sa={sa}), ipv4(saddr={}, daddr={ext}, ttl=64), udp(sport=40000, dport={port}), fill(0x41, 64) }}\n",
        pod.ip
    ))
}
