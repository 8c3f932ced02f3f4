//! The bench's topology and the ways of giving its pod a fixed source address.
//!
//! node1 is the origin with the measured pod, node2 the gateway that holds the egress IP. Every
//! command here runs inside the lab's namespaces, and each variant is taken down again (checked
//! against a snapshot of the nodes) before the next one is set up.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ipnet::Ipv4Net;
use netlab::objects::{EgressGateway, FailurePolicy, Node, Objects, Pod, match_labels};
use netlab::{AgentHandle, Cluster, LabPod, NodeSnapshot, PodSpec};

pub const EGRESS_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 200);
const NAMESPACE: &str = "bench";
const GATEWAY: &str = "bench-gw";
/// Filler pods and prefixes are named this way so they can be replaced as a group.
const FILL: &str = "fill-";
/// The device node1's filler pods are routed through.
const FILL_DEVICE: &str = "fill0";
/// Table and rule priority of the hand-built and iptables variants (not the agent's 1490).
const HAND_TABLE: &str = "100";
const IPT_TABLE: &str = "101";
const IPT_MARK: &str = "0x1000/0x1000";
const IPSET: &str = "se-bench-pods";
const IPT_CHAIN: &str = "SE-BENCH";
/// The hand-built tunnel: the kernel's VXLAN device on each node (IANA's port, a VNI of its
/// own) and a /30 between the two for the route through it.
const HAND_VXLAN_DEV: &str = "bench-vx";
const HAND_VXLAN_VNI: &str = "4242";
const HAND_VXLAN_PORT: &str = "4789";
const HAND_VXLAN_NODE1: &str = "169.254.42.1";
const HAND_VXLAN_NODE2: &str = "169.254.42.2";
/// Pods this many and beyond go to an objects-only node: one node's pod map holds 65,536.
const PODS_PER_NODE: u32 = 50_000;
const SHADOW_NODE: &str = "shadow";
/// The shadow node's InternalIP, on the nodes' segment.
const SHADOW_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 50);
const APPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// What stands between the pod and the external server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// No egress policy: the CNI masquerades to node1's IP; the pod's traffic skips node2.
    None,
    /// ip rule + route on node1, one nft SNAT rule on node2.
    Hand,
    /// kube-static-egress-ip style: ipset + iptables MARK, ip rule, iptables SNAT on node2.
    Iptables,
    /// static-egress agents on both nodes.
    Ours,
    /// static-egress agents on both nodes, through the tunnel between them (`--tunnel always`).
    Tunnel,
    /// static-egress agents on both nodes with `--fast-path`: node1's programs hand the pod's
    /// packets to node2 and the replies back to the pod, past node1's routing and netfilter.
    Fast,
    /// [`Variant::Hand`] through the kernel's VXLAN devices between node1 and node2, with the
    /// MSS clamped to the devices' MTU: the tunnel's like-for-like baseline.
    HandTunnel,
}

impl Variant {
    pub const ALL: [Self; 7] = [
        Self::None,
        Self::Hand,
        Self::Iptables,
        Self::Ours,
        Self::Tunnel,
        Self::Fast,
        Self::HandTunnel,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Hand => "hand",
            Self::Iptables => "iptables",
            Self::Ours => "static-egress",
            Self::Tunnel => "static-egress-tunnel",
            Self::Fast => "static-egress-fast",
            Self::HandTunnel => "hand-vxlan",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Self::None => "1 no policy (node IP, ceiling)",
            Self::Hand => "2 hand-built ip rule + nft SNAT",
            Self::Iptables => "3 iptables MARK + ipset (kube-static-egress-ip style)",
            Self::Ours => "4 static-egress",
            Self::Tunnel => "5 static-egress through the tunnel (--tunnel always)",
            Self::Fast => "6 static-egress --fast-path",
            Self::HandTunnel => "7 hand-built VXLAN devices + ip rule + nft SNAT",
        }
    }

    /// The agents' flags of our variants.
    fn agent_args(self) -> &'static [&'static str] {
        match self {
            Self::Tunnel => &["--tunnel", "always"],
            Self::Fast => &["--fast-path"],
            _ => &[],
        }
    }

    pub fn path(self) -> &'static str {
        match self {
            Self::None => "pod > node1 > router > ext",
            Self::Tunnel => "pod > node1 > VXLAN > node2 > router > ext",
            Self::HandTunnel => "pod > node1 > VXLAN device > node2 > router > ext",
            Self::Fast => "pod > node1 (tc only) > node2 > router > ext",
            _ => "pod > node1 > node2 > router > ext",
        }
    }
}

/// How much policy a variant carries besides the bench pod's own: selected pod IPs,
/// destination prefixes of its gateway, gateways (each further one with its own egress IP and
/// one selected pod on node1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size {
    pub pods: u32,
    pub dests: u32,
    pub gateways: u32,
}

impl Size {
    /// The bench pod, one prefix (the external segment), one gateway.
    pub const ONE: Self = Self {
        pods: 1,
        dests: 1,
        gateways: 1,
    };
}

/// The lab plus whatever variant is set up on it.
pub struct Bench {
    pub cluster: Cluster,
    pub pod: LabPod,
    agents: Vec<AgentHandle>,
    active: Option<Variant>,
    before: Vec<NodeSnapshot>,
}

impl Bench {
    pub fn new(agent: &Path, probe: &Path) -> Result<Self> {
        // /14 pod CIDRs leave room for 100k filler pods on one node's range.
        let mut cluster = Cluster::builder()
            .tag("bench")
            .nodes(2)
            .with_node("node2", |n| n.label("egress", "true"))
            .pod_supernet(net(Ipv4Addr::new(10, 0, 0, 0), 8)?)
            .pod_prefix_len(14)
            .probe_bin(probe)
            .agent_bin(agent)
            .build()?;
        let pod =
            cluster.add_pod(PodSpec::new(NAMESPACE, "client", "node1").label("app", "api"))?;
        cluster.update_objects(|o| {
            o.namespace(NAMESPACE)
                .labels
                .insert("team".into(), NAMESPACE.into());
        })?;
        // The filler pods on node1 sit behind one bridge-like device, as a bridge CNI's pods
        // do: the agent finds their interface (without it, every filler is a warning in every
        // apply and in the status file, which is not what a node with that many pods costs).
        let n1 = node_ns(&cluster, "node1")?;
        exec(n1, &["ip", "link", "add", FILL_DEVICE, "type", "bridge"])?;
        exec(n1, &["ip", "link", "set", FILL_DEVICE, "up"])?;
        let local_fillers = net(Ipv4Addr::new(10, 5, 0, 0), 16)?.to_string();
        exec(
            n1,
            &["ip", "route", "add", &local_fillers, "dev", FILL_DEVICE],
        )?;
        // The shadow node's address answers ARP (the router's), as a live node's does: node2
        // translates its pods and keeps its link-layer address, and would otherwise apply
        // again and again waiting for it.
        let prefix_len = cluster
            .segments()
            .first()
            .map_or(24, |s| s.subnet.prefix_len());
        let shadow = format!("{SHADOW_IP}/{prefix_len}");
        exec(
            cluster.router_netns(),
            &["ip", "addr", "add", &shadow, "dev", cluster.router_bridge()],
        )?;
        let before = ["node1", "node2"]
            .iter()
            .map(|n| cluster.snapshot(n))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cluster,
            pod,
            agents: Vec::new(),
            active: None,
            before,
        })
    }

    pub fn active(&self) -> Option<Variant> {
        self.active
    }

    pub fn agents(&self) -> &[AgentHandle] {
        &self.agents
    }

    /// Sets up `variant` with `size` (the real pod, the external segment and the bench's gateway
    /// among them) and checks the server sees the expected source.
    pub fn enter(&mut self, variant: Variant, size: Size) -> Result<()> {
        if self.active != Some(variant) {
            self.leave()?;
        }
        match variant {
            Variant::None => {}
            Variant::Hand | Variant::HandTunnel => {
                ensure!(size == Size::ONE, "the hand-built variants are one pod");
                if self.active != Some(variant) {
                    self.hand_up(variant == Variant::HandTunnel)?;
                }
            }
            Variant::Iptables => {
                if self.active == Some(variant) {
                    self.iptables_down()?;
                }
                ensure!(size.gateways == 1, "the iptables variant is one gateway");
                self.iptables_up(size.pods, size.dests)?;
            }
            Variant::Ours | Variant::Tunnel | Variant::Fast => {
                self.set_policy(size)?;
                if self.agents.is_empty() {
                    for node in ["node1", "node2"] {
                        self.agents
                            .push(self.cluster.start_agent(node, variant.agent_args())?);
                    }
                }
                self.wait_agents(APPLY_TIMEOUT)?;
            }
        }
        self.active = Some(variant);
        let want = match variant {
            Variant::None => self.cluster.node("node1")?.ip,
            _ => EGRESS_IP,
        };
        let seen = self.cluster.ask(&self.pod)?;
        ensure!(
            seen == want,
            "with {} the server saw {seen}, not {want}",
            variant.key()
        );
        Ok(())
    }

    /// Takes down the active variant and checks both nodes are as before it.
    pub fn leave(&mut self) -> Result<()> {
        match self.active.take() {
            None | Some(Variant::None) => return Ok(()),
            Some(Variant::Hand) => self.hand_down(false)?,
            Some(Variant::HandTunnel) => self.hand_down(true)?,
            Some(Variant::Iptables) => self.iptables_down()?,
            Some(Variant::Ours | Variant::Tunnel | Variant::Fast) => {
                self.stop_agents()?;
                for node in ["node1", "node2"] {
                    self.cluster.cleanup(node)?;
                }
                self.set_policy_objects(None);
                self.cluster.write_objects()?;
            }
        }
        for (node, before) in ["node1", "node2"].iter().zip(&self.before) {
            // NAT bindings of the last variant would otherwise outlive it.
            exec(node_ns(&self.cluster, node)?, &["conntrack", "-F"])?;
            let differences = before.differences(&self.cluster.snapshot(node)?);
            ensure!(
                differences.is_empty(),
                "taking a variant down left {node} changed:\n  {}",
                differences.join("\n  ")
            );
        }
        Ok(())
    }

    pub fn stop_agents(&mut self) -> Result<()> {
        for mut agent in self.agents.drain(..) {
            agent
                .stop()
                .with_context(|| format!("stopping the agent on {}", agent.node()))?;
        }
        Ok(())
    }

    /// From nothing (no agent, clean nodes) to both agents applying a policy of `pods` pods:
    /// returns how long that took, and leaves the agents running.
    pub fn cold_start(&mut self, pods: u32) -> Result<Duration> {
        self.leave()?;
        self.set_policy(Size { pods, ..Size::ONE })?;
        let started = Instant::now();
        for node in ["node1", "node2"] {
            self.agents
                .push(self.cluster.start_agent(node, std::iter::empty::<&str>())?);
        }
        self.active = Some(Variant::Ours);
        self.wait_agents(APPLY_TIMEOUT)?;
        let took = started.elapsed();
        let seen = self.cluster.ask(&self.pod)?;
        ensure!(
            seen == EGRESS_IP,
            "after a cold start the server saw {seen}"
        );
        Ok(took)
    }

    /// Polls both agents' status files every millisecond until they report the current
    /// objects; the polling interval bounds the resolution of change-to-data-path times.
    pub fn wait_agents(&self, timeout: Duration) -> Result<()> {
        let want = self.cluster.objects_digest()?;
        let deadline = Instant::now() + timeout;
        let mut pending: Vec<&str> = vec!["node1", "node2"];
        while !pending.is_empty() {
            let mut still = Vec::new();
            for node in pending {
                if self.cluster.applied_digest(node)?.as_deref() != Some(want.as_str()) {
                    still.push(node);
                }
            }
            pending = still;
            if pending.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                bail!("agents on {pending:?} did not apply the objects within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// The gateway for the bench pods plus `pods - 1` filler pods, `dests - 1` filler prefixes
    /// and `gateways - 1` filler gateways; written to the objects file.
    fn set_policy(&mut self, size: Size) -> Result<()> {
        self.set_policy_objects(Some(size));
        self.cluster.write_objects()?;
        Ok(())
    }

    fn set_policy_objects(&mut self, policy: Option<Size>) {
        let objects = self.cluster.objects_mut();
        objects.pods.retain(|p| !p.name.starts_with(FILL));
        objects.nodes.retain(|n| n.name != SHADOW_NODE);
        objects.gateways.retain(|g| !g.name.starts_with(FILL));
        objects.remove_gateway(GATEWAY);
        if let Some(Size {
            pods,
            dests,
            gateways,
        }) = policy
        {
            add_fillers(objects, pods);
            add_filler_gateways(objects, gateways);
            let cidrs = destinations(dests);
            objects.set_gateway(
                EgressGateway::new(GATEWAY)
                    .egress_ip(EGRESS_IP)
                    .node_selector(match_labels([("egress", "true")]))
                    .namespace_selector(Some(match_labels([("team", NAMESPACE)])))
                    .pod_selector(Some(match_labels([("app", "api")])))
                    .destination_cidrs(Some(cidrs))
                    .failure_policy(FailurePolicy::FailClosed),
            );
        }
    }

    /// Adds or removes one selected pod on node1, which changes both nodes' data paths.
    pub fn toggle_churn_pod(&mut self, present: bool) -> Result<()> {
        let objects = self.cluster.objects_mut();
        if present {
            objects.set_pod(
                Pod::new(NAMESPACE, "churn")
                    .label("app", "api")
                    .node("node1")
                    .ip(Ipv4Addr::new(10, 7, 255, 254)),
            );
        } else {
            objects.remove_pod(NAMESPACE, "churn");
        }
        self.cluster.write_objects()?;
        Ok(())
    }

    /// node1: a rule for the pod to a table with one route to node2 (through the VXLAN devices
    /// with `tunnel`) and the masquerade exception; node2: the egress IP and one SNAT rule. The
    /// tunnel adds the devices, node2's route back to the pod through them, and on both nodes
    /// the MSS of connections through them clamped to the devices' MTU, as one clamps a tunnel
    /// by hand (the pod's MTU is the uplink's).
    fn hand_up(&self, tunnel: bool) -> Result<()> {
        let (n1, n2) = self.nodes()?;
        let pod = self.pod.ip.to_string();
        let node1_ip = self.cluster.node("node1")?.ip.to_string();
        let node2_ip = self.cluster.node("node2")?.ip.to_string();
        let clamp = if tunnel {
            for (ns, local, remote, addr) in [
                (n1, &node1_ip, &node2_ip, HAND_VXLAN_NODE1),
                (n2, &node2_ip, &node1_ip, HAND_VXLAN_NODE2),
            ] {
                exec(
                    ns,
                    &[
                        "ip",
                        "link",
                        "add",
                        HAND_VXLAN_DEV,
                        "type",
                        "vxlan",
                        "id",
                        HAND_VXLAN_VNI,
                        "local",
                        local,
                        "remote",
                        remote,
                        "dstport",
                        HAND_VXLAN_PORT,
                        "dev",
                        "eth0",
                    ],
                )?;
                exec(
                    ns,
                    &[
                        "ip",
                        "addr",
                        "add",
                        &format!("{addr}/30"),
                        "dev",
                        HAND_VXLAN_DEV,
                    ],
                )?;
                exec(ns, &["ip", "link", "set", HAND_VXLAN_DEV, "up"])?;
            }
            exec(
                n2,
                &[
                    "ip",
                    "route",
                    "add",
                    &pod,
                    "via",
                    HAND_VXLAN_NODE1,
                    "dev",
                    HAND_VXLAN_DEV,
                ],
            )?;
            let clamp = format!(
                "  chain forward {{\n    type filter hook forward priority mangle;\n    oifname \"{HAND_VXLAN_DEV}\" tcp flags syn / syn,rst tcp option maxseg size set rt mtu\n  }}\n"
            );
            nft_file(
                &self.cluster,
                n1,
                &format!("table ip se_bench {{\n{clamp}}}\n"),
            )?;
            clamp
        } else {
            String::new()
        };
        let (via, dev) = if tunnel {
            (HAND_VXLAN_NODE2, HAND_VXLAN_DEV)
        } else {
            (node2_ip.as_str(), "eth0")
        };
        exec(
            n1,
            &[
                "ip", "rule", "add", "from", &pod, "lookup", HAND_TABLE, "priority", HAND_TABLE,
            ],
        )?;
        exec(
            n1,
            &[
                "ip", "route", "add", "default", "via", via, "dev", dev, "table", HAND_TABLE,
            ],
        )?;
        exec(
            n1,
            &[
                "iptables",
                "-w",
                "-t",
                "nat",
                "-I",
                "POSTROUTING",
                "-s",
                &pod,
                "-j",
                "ACCEPT",
            ],
        )?;
        exec(
            n2,
            &[
                "ip",
                "addr",
                "add",
                &format!("{EGRESS_IP}/32"),
                "dev",
                "eth0",
            ],
        )?;
        let ruleset = format!(
            "table ip se_bench {{\n  chain post {{\n    type nat hook postrouting priority srcnat - 10;\n    ip saddr {pod} snat to {EGRESS_IP}\n  }}\n{clamp}}}\n"
        );
        nft_file(&self.cluster, n2, &ruleset)
    }

    fn hand_down(&self, tunnel: bool) -> Result<()> {
        let (n1, n2) = self.nodes()?;
        let pod = self.pod.ip.to_string();
        exec(
            n1,
            &[
                "ip", "rule", "del", "from", &pod, "lookup", HAND_TABLE, "priority", HAND_TABLE,
            ],
        )?;
        exec(n1, &["ip", "route", "flush", "table", HAND_TABLE])?;
        exec(
            n1,
            &[
                "iptables",
                "-w",
                "-t",
                "nat",
                "-D",
                "POSTROUTING",
                "-s",
                &pod,
                "-j",
                "ACCEPT",
            ],
        )?;
        exec(
            n2,
            &[
                "ip",
                "addr",
                "del",
                &format!("{EGRESS_IP}/32"),
                "dev",
                "eth0",
            ],
        )?;
        exec(n2, &["nft", "delete", "table", "ip", "se_bench"])?;
        if tunnel {
            exec(n1, &["nft", "delete", "table", "ip", "se_bench"])?;
            // Its addresses and routes go with it.
            for ns in [n1, n2] {
                exec(ns, &["ip", "link", "del", HAND_VXLAN_DEV])?;
            }
        }
        Ok(())
    }

    /// node1: pods in an ipset, one MARK rule per destination prefix (the matching one last, as
    /// a rule-per-CIDR controller ends up), fwmark rule to a table via node2, and the masquerade
    /// exception; node2: the egress IP and an iptables SNAT for the set.
    fn iptables_up(&self, pods: u32, dests: u32) -> Result<()> {
        let (n1, n2) = self.nodes()?;
        let node2_ip = self.cluster.node("node2")?.ip.to_string();
        let mut set = format!(
            "create {IPSET} hash:ip maxelem 262144\nadd {IPSET} {}\n",
            self.pod.ip
        );
        for ip in filler_ips(pods) {
            let _ = writeln!(set, "add {IPSET} {ip}");
        }
        let set_file = self.cluster.dir().join("ipset.txt");
        std::fs::write(&set_file, &set).context("cannot write the ipset file")?;
        let set_path = set_file.to_string_lossy().into_owned();
        for ns in [n1, n2] {
            exec(ns, &["ipset", "restore", "-file", &set_path])?;
        }

        let mut mangle = format!("*mangle\n:{IPT_CHAIN} - [0:0]\n-A PREROUTING -j {IPT_CHAIN}\n");
        for dest in destinations(dests) {
            let _ = writeln!(
                mangle,
                "-A {IPT_CHAIN} -d {dest} -m set --match-set {IPSET} src -j MARK --set-xmark {IPT_MARK}"
            );
        }
        mangle.push_str("COMMIT\n");
        iptables_file(&self.cluster, n1, "mangle.rules", &mangle)?;
        exec(
            n1,
            &[
                "ip", "rule", "add", "fwmark", IPT_MARK, "lookup", IPT_TABLE, "priority", IPT_TABLE,
            ],
        )?;
        exec(
            n1,
            &[
                "ip", "route", "add", "default", "via", &node2_ip, "dev", "eth0", "table",
                IPT_TABLE,
            ],
        )?;
        exec(n1, &ipt_exception("-I"))?;

        exec(
            n2,
            &[
                "ip",
                "addr",
                "add",
                &format!("{EGRESS_IP}/32"),
                "dev",
                "eth0",
            ],
        )?;
        exec(n2, &ipt_snat("-I"))?;
        Ok(())
    }

    fn iptables_down(&self) -> Result<()> {
        let (n1, n2) = self.nodes()?;
        exec(
            n1,
            &[
                "iptables",
                "-w",
                "-t",
                "mangle",
                "-D",
                "PREROUTING",
                "-j",
                IPT_CHAIN,
            ],
        )?;
        exec(n1, &["iptables", "-w", "-t", "mangle", "-F", IPT_CHAIN])?;
        exec(n1, &["iptables", "-w", "-t", "mangle", "-X", IPT_CHAIN])?;
        exec(
            n1,
            &[
                "ip", "rule", "del", "fwmark", IPT_MARK, "lookup", IPT_TABLE, "priority", IPT_TABLE,
            ],
        )?;
        exec(n1, &["ip", "route", "flush", "table", IPT_TABLE])?;
        exec(n1, &ipt_exception("-D"))?;
        exec(n2, &ipt_snat("-D"))?;
        exec(
            n2,
            &[
                "ip",
                "addr",
                "del",
                &format!("{EGRESS_IP}/32"),
                "dev",
                "eth0",
            ],
        )?;
        for ns in [n1, n2] {
            exec(ns, &["ipset", "destroy", IPSET])?;
        }
        // iptables-nft leaves the emptied mangle table behind, which node1 did not have before.
        exec(n1, &["nft", "delete", "table", "ip", "mangle"])?;
        Ok(())
    }

    fn nodes(&self) -> Result<(&str, &str)> {
        Ok((
            node_ns(&self.cluster, "node1")?,
            node_ns(&self.cluster, "node2")?,
        ))
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        // The cluster's own teardown removes everything; stopping the agents first only keeps
        // them from logging errors while their namespaces go away.
        let _ = self.stop_agents();
    }
}

/// An iptables nat POSTROUTING rule for the pods in our ipset, added (`-A`/`-I`) or deleted
/// (`-D`) by `op`, with target `target`.
fn ipt_set_rule<'a>(op: &'a str, target: &[&'a str]) -> Vec<&'a str> {
    let mut rule = vec![
        "iptables",
        "-w",
        "-t",
        "nat",
        op,
        "POSTROUTING",
        "-m",
        "set",
        "--match-set",
        IPSET,
        "src",
        "-j",
    ];
    rule.extend_from_slice(target);
    rule
}

fn ipt_exception(op: &str) -> Vec<&str> {
    ipt_set_rule(op, &["ACCEPT"])
}

fn ipt_snat(op: &'static str) -> Vec<&'static str> {
    ipt_set_rule(op, &["SNAT", "--to-source", "10.99.0.200"])
}

fn node_ns<'a>(cluster: &'a Cluster, node: &str) -> Result<&'a str> {
    Ok(cluster.node(node)?.netns.as_str())
}

pub fn exec(netns: &str, args: &[&str]) -> Result<String> {
    netlab::exec(netns, args)
}

fn nft_file(cluster: &Cluster, netns: &str, ruleset: &str) -> Result<()> {
    let path = cluster.dir().join("bench.nft");
    std::fs::write(&path, ruleset).context("cannot write the nft file")?;
    exec(netns, &["nft", "-f", &path.to_string_lossy()])?;
    Ok(())
}

fn iptables_file(cluster: &Cluster, netns: &str, name: &str, rules: &str) -> Result<()> {
    let path = cluster.dir().join(name);
    std::fs::write(&path, rules).context("cannot write the iptables file")?;
    exec(
        netns,
        &[
            "iptables-restore",
            "-w",
            "--noflush",
            &path.to_string_lossy(),
        ],
    )?;
    Ok(())
}

fn net(addr: Ipv4Addr, len: u8) -> Result<Ipv4Net> {
    Ipv4Net::new(addr, len).context("bad prefix length")
}

/// `n - 1` filler /24s from 100.64.0.0/10 (nothing routes there), then the external segment, so
/// the real destination is the last one a linear list would reach.
pub fn destinations(n: u32) -> Vec<Ipv4Net> {
    let base = u32::from(Ipv4Addr::new(100, 64, 0, 0));
    let mut out: Vec<Ipv4Net> = (0..n.saturating_sub(1))
        .filter_map(|i| Ipv4Net::new(Ipv4Addr::from(base + (i << 8)), 24).ok())
        .collect();
    out.extend(Ipv4Net::new(Ipv4Addr::new(203, 0, 113, 0), 24).ok());
    out
}

/// Addresses of `n - 1` filler pods: the first [`PODS_PER_NODE`] on node1, from 10.5.0.0 (the
/// real pod is in 10.4.0.0; 10.5.0.0/16 is behind [`FILL_DEVICE`]), the rest on the shadow
/// node, from 10.64.0.0.
fn filler_ips(n: u32) -> impl Iterator<Item = Ipv4Addr> {
    (0..n.saturating_sub(1)).map(|i| {
        if i < PODS_PER_NODE {
            Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 5, 0, 0)) + i)
        } else {
            Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 0)) + i - PODS_PER_NODE)
        }
    })
}

/// `n - 1` gateways besides the bench's (at most 99), each with its own egress IP held by node2
/// (10.99.0.101 on), so its own address, SNAT rule and sets there, and one pod on node1
/// (10.5.255.1 on, behind [`FILL_DEVICE`]).
fn add_filler_gateways(objects: &mut Objects, n: u32) {
    for i in 1..n.min(100) {
        let app = format!("{FILL}gw-{i:03}");
        let Ok(offset) = u8::try_from(i) else {
            continue;
        };
        objects.pods.push(
            Pod::new(NAMESPACE, app.clone())
                .label("app", &app)
                .node("node1")
                .ip(Ipv4Addr::new(10, 5, 255, offset)),
        );
        objects.set_gateway(
            EgressGateway::new(app.clone())
                .egress_ip(Ipv4Addr::new(10, 99, 0, 100 + offset))
                .node_selector(match_labels([("egress", "true")]))
                .namespace_selector(Some(match_labels([("team", NAMESPACE)])))
                .pod_selector(Some(match_labels([("app", app.as_str())])))
                .destination_cidrs(Some(destinations(1)))
                .failure_policy(FailurePolicy::FailClosed),
        );
    }
}

fn add_fillers(objects: &mut Objects, pods: u32) {
    if pods > PODS_PER_NODE {
        let mut shadow = Node::new(SHADOW_NODE).internal_ip(SHADOW_IP);
        if let Ok(cidr) = Ipv4Net::new(Ipv4Addr::new(10, 64, 0, 0), 14) {
            shadow = shadow.pod_cidr(cidr);
        }
        objects.set_node(shadow);
    }
    for (i, ip) in filler_ips(pods).enumerate() {
        let node = if u32::try_from(i).unwrap_or(u32::MAX) < PODS_PER_NODE {
            "node1"
        } else {
            SHADOW_NODE
        };
        // Pushed directly: `set_pod` looks for a duplicate each time, quadratic at 100k.
        objects.pods.push(
            Pod::new(NAMESPACE, format!("{FILL}{i}"))
                .label("app", "api")
                .node(node)
                .ip(ip),
        );
    }
}
