//! BGP for labs: BIRD (Debian's `bird2`) on the router and on the nodes that may hold egress
//! IPs, as an operator runs it beside the agent. Each node announces what the agent puts in its
//! `--announce-table` (1491, the default); the router takes what it learns into its main table.
//! Short timers, so that a move shows within a second or two.

use std::fmt::Write as _;
use std::process::{Child, Command, Stdio};

use anyhow::{Context as _, Result};

use crate::Cluster;

/// The daemons, stopped when dropped.
pub struct Bird {
    daemons: Vec<Child>,
}

impl Drop for Bird {
    fn drop(&mut self) {
        for daemon in &mut self.daemons {
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
    }
}

const ROUTER_AS: u32 = 65000;
const NODES_AS: u32 = 65001;
/// The agent's default `--announce-table`.
const ANNOUNCE_TABLE: u32 = 1491;
const TIMERS: &str = "hold time 3; keepalive time 1; connect retry time 1;";

impl Bird {
    /// BIRD on the router (AS 65000), peering with `nodes` (AS 65001), and on each of them.
    pub fn start(cluster: &Cluster, nodes: &[&str]) -> Result<Self> {
        let router = cluster.router_ip();
        let mut router_conf = format!(
            "router id {router};\nprotocol device {{ scan time 1; }}\n\
             protocol kernel {{ ipv4 {{ import none; export all; }}; }}\n"
        );
        for node in nodes {
            let ip = cluster.node(node)?.ip;
            let _ = writeln!(
                router_conf,
                "protocol bgp {node} {{ local as {ROUTER_AS}; neighbor {ip} as {NODES_AS}; \
                 {TIMERS} ipv4 {{ import all; export none; }}; }}"
            );
        }
        let mut bird = Self {
            daemons: Vec::new(),
        };
        bird.spawn(cluster, cluster.router_netns(), "router", &router_conf)?;
        for node in nodes {
            let lab_node = cluster.node(node)?;
            // BIRD takes in routes others put in a kernel table only with `learn` (and skips
            // routes of no protocol: the agent marks its own as static).
            let conf = format!(
                "router id {ip};\nprotocol device {{ scan time 1; }}\n\
                 protocol kernel {{ kernel table {ANNOUNCE_TABLE}; learn; scan time 1; \
                 ipv4 {{ import all; export none; }}; }}\n\
                 protocol bgp fabric {{ local as {NODES_AS}; neighbor {router} as {ROUTER_AS}; \
                 {TIMERS} ipv4 {{ import none; export all; }}; }}\n",
                ip = lab_node.ip
            );
            bird.spawn(cluster, &lab_node.netns, node, &conf)?;
        }
        Ok(bird)
    }

    fn spawn(&mut self, cluster: &Cluster, netns: &str, name: &str, conf: &str) -> Result<()> {
        let dir = cluster.dir();
        let conf_path = dir.join(format!("bird-{name}.conf"));
        std::fs::write(&conf_path, conf)?;
        let daemon = Command::new("ip")
            .args(["netns", "exec", netns, "bird", "-f", "-c"])
            .arg(&conf_path)
            .arg("-s")
            .arg(dir.join(format!("bird-{name}.ctl")))
            .arg("-P")
            .arg(dir.join(format!("bird-{name}.pid")))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("bird-{name}.log")))?)
            .spawn()
            .context("running bird (Debian's bird2; `cargo xtask setup` installs it)")?;
        self.daemons.push(daemon);
        Ok(())
    }

    /// Leaves the daemons running (a kept lab's teardown stops them with the namespaces).
    pub fn detach(mut self) {
        self.daemons.clear();
    }
}
