//! Settings of a lab and their defaults, checked before anything is created.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, anyhow, bail, ensure};
use ipnet::Ipv4Net;
use serde_json::{Value, json};

use crate::cluster::Cluster;
use crate::names::{check_dns_label, check_ifname, check_tag, instance_prefix};
use crate::objects::Labels;
use crate::require_root;
use crate::teardown::{lab_dir, lab_namespaces};

/// How a node wires its pods, after the two families of CNIs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PodStyle {
    /// Calico-like: pod `eth0` holds a /32, default route via 169.254.1.1 `onlink`; the node side
    /// (`cali…`) answers ARP by proxy and the node routes the /32 to it.
    #[default]
    Routed,
    /// flannel/kubenet-like: pods on the node bridge (`cni0` by default), which holds the first
    /// address of the pod CIDR and is their default gateway.
    Bridged,
}

impl PodStyle {
    pub(crate) fn veth_prefix(self) -> &'static str {
        match self {
            Self::Routed => "cali",
            Self::Bridged => "veth",
        }
    }
}

/// A real plugin of Debian's `containernetworking-plugins` that wires a node's pods instead of
/// the lab (see [`NodeSpec::cni_plugin`]): the pods' addresses come from `host-local` and the
/// masquerade towards the outside is the plugin's own `ipMasq`, so whatever is chained after it
/// sees what it would see behind the same plugin on a real node.
///
/// It is a node setting beside [`PodStyle`] rather than a third style, because each plugin
/// builds one of the two shapes the styles describe, and code that looks at a pod's style
/// (routed or bridged) stays right for plugin pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CniPlugin {
    /// `bridge` on [`CniPlugin::BRIDGE`] with `isGateway`: the bridge holds the pod CIDR's
    /// first address and is the pods' default gateway. The plugin sets the bridge's MAC itself,
    /// so pods coming and going do not change the gateway's address under the others.
    Bridge,
    /// `ptp`: a veth per pod, the node side holding the pod CIDR's first address as a /32 and a
    /// /32 route to the pod.
    Ptp,
}

impl CniPlugin {
    /// The `bridge` plugin's bridge: not the lab's own `cni0`, so a look at a node tells who
    /// made it.
    pub const BRIDGE: &'static str = "cnibr0";

    /// The plugin's `type` in a conflist.
    pub fn type_name(self) -> &'static str {
        match self {
            Self::Bridge => "bridge",
            Self::Ptp => "ptp",
        }
    }

    /// The lab style whose shape the plugin builds.
    pub fn pod_style(self) -> PodStyle {
        match self {
            Self::Bridge => PodStyle::Bridged,
            Self::Ptp => PodStyle::Routed,
        }
    }

    /// The plugin's entry in a node's conflist, addresses from `host-local` keeping its leases
    /// in `ipam_dir`.
    pub(crate) fn config(self, pod_cidr: Ipv4Net, ipam_dir: &Path) -> Value {
        let ipam = json!({
            "type": "host-local",
            "dataDir": ipam_dir,
            "ranges": [[{"subnet": pod_cidr.to_string()}]],
            "routes": [{"dst": "0.0.0.0/0"}],
        });
        match self {
            Self::Bridge => json!({
                "type": "bridge",
                "bridge": Self::BRIDGE,
                "isGateway": true,
                "ipMasq": true,
                "ipam": ipam,
            }),
            Self::Ptp => json!({"type": "ptp", "ipMasq": true, "ipam": ipam}),
        }
    }
}

/// A plugin object to append to a conflist must at least name its binary.
pub(crate) fn check_chained(plugin: &Value) -> Result<()> {
    ensure!(
        plugin
            .get("type")
            .and_then(Value::as_str)
            .is_some_and(|t| check_plugin_type(t).is_ok()),
        "a chained CNI plugin needs a \"type\" naming its binary: {plugin}"
    );
    Ok(())
}

/// A plugin type is a file name in the lab's CNI_PATH directory.
fn check_plugin_type(name: &str) -> Result<()> {
    ensure!(
        !name.is_empty() && name != "." && name != ".." && !name.contains('/'),
        "CNI plugin type {name:?} is not a file name"
    );
    Ok(())
}

/// One node of the lab; unset fields take the cluster's defaults.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub(crate) name: String,
    pub(crate) pod_style: Option<PodStyle>,
    pub(crate) uplink: Option<String>,
    pub(crate) rp_filter: Option<u8>,
    pub(crate) ip: Option<Ipv4Addr>,
    pub(crate) pod_cidr: Option<Ipv4Net>,
    pub(crate) labels: Labels,
    pub(crate) ready: bool,
    pub(crate) plugin: Option<CniPlugin>,
    pub(crate) chained: Vec<Value>,
    pub(crate) segment: u8,
}

impl NodeSpec {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            pod_style: None,
            uplink: None,
            rp_filter: None,
            ip: None,
            pod_cidr: None,
            labels: Labels::new(),
            ready: true,
            plugin: None,
            chained: Vec::new(),
            segment: 0,
        }
    }

    pub fn pod_style(mut self, style: PodStyle) -> Self {
        self.pod_style = Some(style);
        self
    }

    pub fn uplink(mut self, name: impl Into<String>) -> Self {
        self.uplink = Some(name.into());
        self
    }

    pub fn rp_filter(mut self, value: u8) -> Self {
        self.rp_filter = Some(value);
        self
    }

    pub fn ip(mut self, ip: Ipv4Addr) -> Self {
        self.ip = Some(ip);
        self
    }

    pub fn pod_cidr(mut self, cidr: Ipv4Net) -> Self {
        self.pod_cidr = Some(cidr);
        self
    }

    /// A label of the node's Node object.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// The node's Node object's `Ready` condition (the network is built either way).
    pub fn ready(mut self, ready: bool) -> Self {
        self.ready = ready;
        self
    }

    /// Pods on this node are wired by a real CNI plugin run as a runtime runs it (see
    /// [`crate::cni`]), not by the lab; the node then has no lab bridge and no lab masquerade
    /// rule, and its pod style is the plugin's [`CniPlugin::pod_style`].
    pub fn cni_plugin(mut self, plugin: CniPlugin) -> Self {
        self.plugin = Some(plugin);
        self
    }

    /// Puts the node on segment `n` of the fabric instead of the main one (0): a subnet of its
    /// own behind the router (see [`Segment`]), so that the node reaches the others only
    /// through a routed hop, as nodes in different racks or zones do. Its default address is
    /// taken in that subnet as on the main one, and an explicit [`ip`](Self::ip) must lie in
    /// it.
    pub fn segment(mut self, n: u8) -> Self {
        self.segment = n;
        self
    }

    /// Appends a plugin object (`{"type": ..., ...}`) to the node's conflist, after the
    /// [`cni_plugin`](Self::cni_plugin) and any plugin chained before; see also
    /// [`Cluster::set_chained`].
    pub fn chained(mut self, plugin: Value) -> Self {
        self.chained.push(plugin);
        self
    }
}

/// Settings of a lab; see [`Cluster::builder`].
#[derive(Clone, Debug)]
pub struct ClusterBuilder {
    pub(crate) tag: String,
    pub(crate) nodes: Vec<NodeSpec>,
    pub(crate) problems: Vec<String>,
    pub(crate) node_subnet: Ipv4Net,
    pub(crate) router_ip: Option<Ipv4Addr>,
    pub(crate) node_ip_offset: u32,
    pub(crate) ext_subnet: Ipv4Net,
    pub(crate) router_ext_ip: Option<Ipv4Addr>,
    pub(crate) ext_ip: Option<Ipv4Addr>,
    pub(crate) probe_port: u16,
    pub(crate) pod_supernet: Ipv4Net,
    pub(crate) pod_prefix_len: u8,
    pub(crate) uplink: String,
    pub(crate) rp_filter: u8,
    pub(crate) pod_style: PodStyle,
    pub(crate) ipv6: bool,
    pub(crate) router_bridge: String,
    pub(crate) pod_bridge: String,
    pub(crate) masquerade: bool,
    pub(crate) probe_bin: Option<PathBuf>,
    pub(crate) agent_bin: Option<PathBuf>,
    pub(crate) cni_plugin_bins: Vec<(String, PathBuf)>,
    pub(crate) overlay: bool,
    pub(crate) fabric_drops_pod_sources: bool,
    pub(crate) fabric_mtu: u32,
}

impl Default for ClusterBuilder {
    fn default() -> Self {
        Self {
            tag: "nl".into(),
            nodes: Vec::new(),
            problems: Vec::new(),
            node_subnet: net(Ipv4Addr::new(10, 99, 0, 0), 24),
            router_ip: None,
            node_ip_offset: 10,
            ext_subnet: net(Ipv4Addr::new(203, 0, 113, 0), 24),
            router_ext_ip: None,
            ext_ip: None,
            probe_port: 7777,
            pod_supernet: net(Ipv4Addr::new(10, 244, 0, 0), 16),
            pod_prefix_len: 24,
            uplink: "eth0".into(),
            rp_filter: 1,
            pod_style: PodStyle::Routed,
            ipv6: false,
            router_bridge: "br0".into(),
            pod_bridge: "cni0".into(),
            masquerade: true,
            probe_bin: None,
            agent_bin: None,
            cni_plugin_bins: Vec::new(),
            overlay: false,
            fabric_drops_pod_sources: false,
            fabric_mtu: DEFAULT_FABRIC_MTU,
        }
    }
}

/// The Ethernet MTU most fabrics (and veth pairs) start with.
const DEFAULT_FABRIC_MTU: u32 = 1500;
/// Bounds of [`ClusterBuilder::fabric_mtu`]: IPv6's minimum link MTU below, and above, the
/// largest MTU a veth pair takes (`ETH_MAX_MTU`).
const FABRIC_MTU_RANGE: std::ops::RangeInclusive<u32> = 1280..=65535;

fn net(addr: Ipv4Addr, len: u8) -> Ipv4Net {
    Ipv4Net::new(addr, len).unwrap_or_default()
}

impl ClusterBuilder {
    /// First part of every namespace and directory name (default `nl`); the lab appends its pid
    /// and a counter.
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tag = tag.into();
        self
    }

    /// `n` nodes named `node1`..`node<n>` with default settings, replacing any nodes set before.
    pub fn nodes(mut self, n: usize) -> Self {
        self.nodes = (1..=n).map(|i| NodeSpec::new(format!("node{i}"))).collect();
        self
    }

    /// Adds a node.
    pub fn node(mut self, spec: NodeSpec) -> Self {
        self.nodes.push(spec);
        self
    }

    /// Changes the node called `name`, e.g. `.with_node("node2", |n| n.pod_style(PodStyle::Bridged))`.
    pub fn with_node(mut self, name: &str, change: impl FnOnce(NodeSpec) -> NodeSpec) -> Self {
        match self.nodes.iter().position(|n| n.name == name) {
            Some(i) => self.nodes[i] = change(self.nodes[i].clone()),
            None => self
                .problems
                .push(format!("with_node: no node called {name:?}")),
        }
        self
    }

    /// The segment of the nodes' uplinks (default 10.99.0.0/24).
    pub fn node_subnet(mut self, subnet: Ipv4Net) -> Self {
        self.node_subnet = subnet;
        self
    }

    /// The router's address on the node segment (default: the segment's first address).
    pub fn router_ip(mut self, ip: Ipv4Addr) -> Self {
        self.router_ip = Some(ip);
        self
    }

    /// Node `i` (from 1) gets the segment's address number `offset + i` (default offset 10).
    pub fn node_ip_offset(mut self, offset: u32) -> Self {
        self.node_ip_offset = offset;
        self
    }

    /// The external segment (default 203.0.113.0/24).
    pub fn ext_subnet(mut self, subnet: Ipv4Net) -> Self {
        self.ext_subnet = subnet;
        self
    }

    /// The router's address on the external segment (default: its first address).
    pub fn router_ext_ip(mut self, ip: Ipv4Addr) -> Self {
        self.router_ext_ip = Some(ip);
        self
    }

    /// The external host's address (default: the external segment's address number 10).
    pub fn ext_ip(mut self, ip: Ipv4Addr) -> Self {
        self.ext_ip = Some(ip);
        self
    }

    pub fn probe_port(mut self, port: u16) -> Self {
        self.probe_port = port;
        self
    }

    /// The cluster's pod range (default 10.244.0.0/16); node `i` gets its `i`-th subnet of
    /// [`pod_prefix_len`](Self::pod_prefix_len) unless its spec says otherwise.
    pub fn pod_supernet(mut self, supernet: Ipv4Net) -> Self {
        self.pod_supernet = supernet;
        self
    }

    pub fn pod_prefix_len(mut self, len: u8) -> Self {
        self.pod_prefix_len = len;
        self
    }

    /// Default uplink name of the nodes (default `eth0`).
    pub fn uplink_name(mut self, name: impl Into<String>) -> Self {
        self.uplink = name.into();
        self
    }

    /// Default `rp_filter` of the nodes (all, default and uplink), 0, 1 or 2 (default 1).
    pub fn rp_filter(mut self, value: u8) -> Self {
        self.rp_filter = value;
        self
    }

    /// Default pod style of the nodes.
    pub fn pod_style(mut self, style: PodStyle) -> Self {
        self.pod_style = style;
        self
    }

    /// Keeps IPv6 enabled in the lab's namespaces. Off by default: link-local addresses going
    /// through duplicate address detection would make [`NodeSnapshot`](crate::NodeSnapshot)s differ over time.
    pub fn ipv6(mut self, enabled: bool) -> Self {
        self.ipv6 = enabled;
        self
    }

    /// Name of the router's bridge for the node segment (default `br0`).
    pub fn router_bridge(mut self, name: impl Into<String>) -> Self {
        self.router_bridge = name.into();
        self
    }

    /// Name of the pod bridge on bridged-style nodes (default `cni0`).
    pub fn pod_bridge(mut self, name: impl Into<String>) -> Self {
        self.pod_bridge = name.into();
        self
    }

    /// Whether nodes get the CNI-like masquerade rule (default yes; never on a node with a
    /// [`CniPlugin`], which masquerades itself).
    pub fn masquerade(mut self, enabled: bool) -> Self {
        self.masquerade = enabled;
        self
    }

    /// `se-probe` to run; default: `$SE_PROBE_BIN`, else next to the running executable, else
    /// the workspace's `target/debug`.
    pub fn probe_bin(mut self, path: impl Into<PathBuf>) -> Self {
        self.probe_bin = Some(path.into());
        self
    }

    /// `static-egress` to run; default: `$STATIC_EGRESS_BIN`, else next to the running
    /// executable, else the workspace's `target/debug`.
    pub fn agent_bin(mut self, path: impl Into<PathBuf>) -> Self {
        self.agent_bin = Some(path.into());
        self
    }

    /// A plugin binary for conflists to name as `type_name`, beside (or instead of) the one of
    /// that name in `/usr/lib/cni`. Without it, `static-egress-cni` comes from
    /// `$STATIC_EGRESS_CNI_BIN`, else next to the running executable, else the workspace's
    /// `target/debug`, looked up when a conflist first names it.
    pub fn cni_plugin_bin(
        mut self,
        type_name: impl Into<String>,
        path: impl Into<PathBuf>,
    ) -> Self {
        self.cni_plugin_bins.push((type_name.into(), path.into()));
        self
    }

    /// Pod traffic between nodes goes through a VXLAN overlay built as Flannel's `vxlan`
    /// backend builds it (see [`Vtep`](crate::Vtep)) instead of host-gw routes (default off).
    ///
    /// Pod-to-pod packets then cross the fabric inside UDP between node addresses, so a fabric
    /// that knows nothing of pod addresses (one that [drops
    /// them](Self::fabric_drops_pod_sources), or routes between [segments](NodeSpec::segment)
    /// without routes to the pod CIDRs) still carries them. Traffic to `ext` still leaves
    /// through the node's masquerade, outside the overlay.
    pub fn overlay(mut self, enabled: bool) -> Self {
        self.overlay = enabled;
        self
    }

    /// The fabric drops every IPv4 packet whose source lies in the pod supernet (default off),
    /// as clouds and firewalled underlays do with addresses they did not hand out: in the
    /// router's forwarding path (between segments and towards `ext`) and on its bridges
    /// (between nodes of one segment). Each drop is counted; see [`Cluster::fabric_drops`].
    ///
    /// This is what makes a lab prove that traffic left a node with a node address, or inside
    /// a tunnel: with host-gw routes, pod-to-pod traffic across nodes stops.
    pub fn fabric_drops_pod_sources(mut self, enabled: bool) -> Self {
        self.fabric_drops_pod_sources = enabled;
        self
    }

    /// The MTU of every link of the fabric (default 1500): node uplinks and their router
    /// ports, the router's bridges, and the link between the router and `ext`. Pods keep 1500;
    /// with [`overlay`](Self::overlay) the VXLAN devices get this minus the 50 bytes VXLAN over
    /// IPv4 adds, as Flannel sets them. For jumbo-frame fabrics (9000) against ordinary ones.
    pub fn fabric_mtu(mut self, mtu: u32) -> Self {
        self.fabric_mtu = mtu;
        self
    }

    /// Resolves every default and checks the settings; pure, so it needs no root.
    fn resolve(&self) -> Result<Plan> {
        if let Some(problem) = self.problems.first() {
            bail!("{problem}");
        }
        check_tag(&self.tag)?;
        check_ifname(&self.router_bridge)?;
        check_ifname(&self.pod_bridge)?;
        for (type_name, _) in &self.cni_plugin_bins {
            check_plugin_type(type_name)?;
        }
        let specs = if self.nodes.is_empty() {
            Self::default().nodes(3).nodes
        } else {
            self.nodes.clone()
        };
        let router_ip = match self.router_ip {
            Some(ip) => ip,
            None => nth_host(self.node_subnet, 1)?,
        };
        let router_ext_ip = match self.router_ext_ip {
            Some(ip) => ip,
            None => nth_host(self.ext_subnet, 1)?,
        };
        let ext_ip = match self.ext_ip {
            Some(ip) => ip,
            None => nth_host(self.ext_subnet, 10)?,
        };
        ensure!(
            self.node_subnet.contains(&router_ip),
            "router IP {router_ip} is outside the node subnet {}",
            self.node_subnet
        );
        ensure!(
            self.ext_subnet.contains(&router_ext_ip)
                && self.ext_subnet.contains(&ext_ip)
                && router_ext_ip != ext_ip,
            "router and ext addresses must differ and be inside {}",
            self.ext_subnet
        );
        ensure!(
            FABRIC_MTU_RANGE.contains(&self.fabric_mtu),
            "fabric MTU {} is outside {FABRIC_MTU_RANGE:?}",
            self.fabric_mtu
        );
        let segments = self.segments(&specs, router_ip)?;
        let mut nodes = Vec::new();
        for (index, spec) in specs.iter().enumerate() {
            let number = u32::try_from(index + 1)?;
            check_node_name(&spec.name)?;
            let uplink = spec.uplink.clone().unwrap_or_else(|| self.uplink.clone());
            check_ifname(&uplink)?;
            let rp_filter = spec.rp_filter.unwrap_or(self.rp_filter);
            ensure!(
                rp_filter <= 2,
                "rp_filter {rp_filter} of {} is not 0, 1 or 2",
                spec.name
            );
            let segment = segments
                .iter()
                .find(|s| s.number == spec.segment)
                .ok_or_else(|| anyhow!("no segment {} for {}", spec.segment, spec.name))?;
            let ip = match spec.ip {
                Some(ip) => ip,
                None => nth_host(segment.subnet, self.node_ip_offset.saturating_add(number))?,
            };
            ensure!(
                segment.subnet.contains(&ip) && ip != segment.router_ip,
                "node {} address {ip} must be in {} and not the router's",
                spec.name,
                segment.subnet
            );
            let pod_cidr = match spec.pod_cidr {
                Some(cidr) => cidr,
                // Node i gets subnet number i, so node1 has 10.244.1.0/24 as in the docs.
                None => self
                    .pod_supernet
                    .subnets(self.pod_prefix_len)
                    .with_context(|| {
                        format!(
                            "pod prefix length /{} does not fit in {}",
                            self.pod_prefix_len, self.pod_supernet
                        )
                    })?
                    .nth(usize::try_from(number)?)
                    .ok_or_else(|| {
                        anyhow!(
                            "{} has no room for the pod CIDR of {}",
                            self.pod_supernet,
                            spec.name
                        )
                    })?,
            };
            let pod_style = match (spec.plugin, spec.pod_style) {
                (Some(plugin), Some(style)) => {
                    ensure!(
                        plugin.pod_style() == style,
                        "node {}: CNI plugin {} builds {:?} pods, not {style:?}",
                        spec.name,
                        plugin.type_name(),
                        plugin.pod_style()
                    );
                    style
                }
                (Some(plugin), None) => plugin.pod_style(),
                (None, style) => {
                    ensure!(
                        spec.chained.is_empty(),
                        "node {}: chained CNI plugins need a cni_plugin to follow",
                        spec.name
                    );
                    style.unwrap_or(self.pod_style)
                }
            };
            for plugin in &spec.chained {
                check_chained(plugin)?;
            }
            nodes.push(NodePlan {
                spec: spec.clone(),
                number,
                segment: segment.clone(),
                ip,
                uplink,
                rp_filter,
                pod_cidr,
                pod_style,
            });
        }
        for (i, a) in nodes.iter().enumerate() {
            for b in &nodes[i + 1..] {
                ensure!(
                    a.spec.name != b.spec.name,
                    "two nodes called {}",
                    a.spec.name
                );
                ensure!(
                    a.ip != b.ip,
                    "{} and {} both have {}",
                    a.spec.name,
                    b.spec.name,
                    a.ip
                );
                ensure!(
                    !a.pod_cidr.contains(&b.pod_cidr) && !b.pod_cidr.contains(&a.pod_cidr),
                    "pod CIDRs of {} and {} overlap",
                    a.spec.name,
                    b.spec.name
                );
            }
        }
        Ok(Plan {
            nodes,
            segments,
            router_ip,
            router_ext_ip,
            ext_ip,
        })
    }

    /// The segments the nodes use, numbered: always the main one (the router's address there
    /// is the lab's [`router_ip`](Cluster::router_ip), and [`Cluster::add_segment_host`] puts
    /// hosts on it), then each other number a node names. Segment `n` is the `n`-th block of the
    /// node subnet's size after it, so 10.99.0.0/24 is followed by 10.99.1.0/24, where the router
    /// takes the first address.
    fn segments(&self, specs: &[NodeSpec], router_ip: Ipv4Addr) -> Result<Vec<Segment>> {
        let mut numbers: Vec<u8> = specs.iter().map(|s| s.segment).collect();
        numbers.push(0);
        numbers.sort_unstable();
        numbers.dedup();
        let len = self.node_subnet.prefix_len();
        let size = 1u64 << (32 - u32::from(len));
        let mut segments = Vec::new();
        for number in numbers {
            if number == 0 {
                segments.push(Segment {
                    number,
                    subnet: self.node_subnet,
                    router_ip,
                    bridge: self.router_bridge.clone(),
                });
                continue;
            }
            let start = u64::from(u32::from(self.node_subnet.network())) + size * u64::from(number);
            let subnet = u32::try_from(start)
                .ok()
                .and_then(|start| Ipv4Net::new(Ipv4Addr::from(start), len).ok())
                .ok_or_else(|| {
                    anyhow!(
                        "segment {number} lies past the end of the address space after {}",
                        self.node_subnet
                    )
                })?;
            for (what, other) in [("ext", self.ext_subnet), ("pod", self.pod_supernet)] {
                ensure!(
                    !subnet.contains(&other) && !other.contains(&subnet),
                    "segment {number} ({subnet}) overlaps the {what} range {other}"
                );
            }
            let bridge = format!("seg{number}");
            check_ifname(&bridge)?;
            ensure!(
                bridge != self.router_bridge,
                "the router bridge {bridge:?} has the name of segment {number}'s bridge"
            );
            segments.push(Segment {
                number,
                subnet,
                router_ip: nth_host(subnet, 1)?,
                bridge,
            });
        }
        Ok(segments)
    }

    /// Creates the lab. Needs root; fails (never skips) without it.
    pub fn build(self) -> Result<Cluster> {
        require_root()?;
        let plan = self.resolve()?;
        let probe_bin = match &self.probe_bin {
            Some(path) => path.clone(),
            None => locate_binary("SE_PROBE_BIN", "se-probe"),
        };
        ensure!(
            probe_bin.is_file(),
            "se-probe not found at {}: build it (`cargo build -p static-egress-netlab`) or set \
             SE_PROBE_BIN",
            probe_bin.display()
        );
        let (prefix, dir) = claim_prefix(&self.tag)?;
        Cluster::create(self, &plan, prefix, dir, probe_bin)
    }
}

/// `router` and `ext` are taken by the lab itself and `pod-` starts pod namespaces.
fn check_node_name(name: &str) -> Result<()> {
    check_dns_label("node name", name)?;
    ensure!(
        name != "router" && name != "ext" && !name.starts_with("pod-"),
        "node name {name:?} is reserved by the lab"
    );
    Ok(())
}

pub(crate) fn nth_host(subnet: Ipv4Net, n: u32) -> Result<Ipv4Addr> {
    let ip = u32::from(subnet.network())
        .checked_add(n)
        .map(Ipv4Addr::from)
        .filter(|ip| subnet.contains(ip) && *ip != subnet.broadcast())
        .ok_or_else(|| anyhow!("{subnet} has no host number {n}"))?;
    Ok(ip)
}

/// A subnet of the fabric behind its own bridge on the router; see [`NodeSpec::segment`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// 0 for the main segment, the one of [`ClusterBuilder::node_subnet`].
    pub number: u8,
    pub subnet: Ipv4Net,
    /// The router's address on the segment: its nodes' default gateway.
    pub router_ip: Ipv4Addr,
    /// The router's bridge for the segment: [`ClusterBuilder::router_bridge`] for the main
    /// one, `seg<n>` for the others.
    pub bridge: String,
}

#[derive(Debug)]
pub(crate) struct Plan {
    pub(crate) nodes: Vec<NodePlan>,
    pub(crate) segments: Vec<Segment>,
    pub(crate) router_ip: Ipv4Addr,
    pub(crate) router_ext_ip: Ipv4Addr,
    pub(crate) ext_ip: Ipv4Addr,
}

#[derive(Debug)]
pub(crate) struct NodePlan {
    pub(crate) spec: NodeSpec,
    pub(crate) number: u32,
    pub(crate) segment: Segment,
    pub(crate) ip: Ipv4Addr,
    pub(crate) uplink: String,
    pub(crate) rp_filter: u8,
    pub(crate) pod_cidr: Ipv4Net,
    pub(crate) pod_style: PodStyle,
}

/// Takes the first free `tag-pid-counter`: the counter separates labs of one process, and a
/// leftover of an earlier process that had the same pid is skipped rather than reused.
fn claim_prefix(tag: &str) -> Result<(String, PathBuf)> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    loop {
        let prefix = instance_prefix(
            tag,
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
        );
        if lab_namespaces(&prefix)?.is_empty() {
            let dir = lab_dir(&prefix);
            match std::fs::create_dir(&dir) {
                Ok(()) => return Ok((prefix, dir)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(anyhow!(e).context(format!("cannot create {}", dir.display())));
                }
            }
        }
    }
}

/// Test executables live in `target/<profile>/deps` and xtask in `target/<profile>`, so the
/// binaries of the same build are one or two levels up from the running program.
pub(crate) fn locate_binary(env_var: &str, name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env_var) {
        return PathBuf::from(path);
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(found) = exe
            .ancestors()
            .skip(1)
            .take(2)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    {
        return found;
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/debug")
        .join(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Ipv4Addr {
        s.parse().expect("address")
    }

    #[test]
    fn defaults_give_the_documented_topology() {
        let plan = Cluster::builder().nodes(3).resolve().expect("valid");
        assert_eq!(plan.router_ip, addr("10.99.0.1"));
        assert_eq!(plan.router_ext_ip, addr("203.0.113.1"));
        assert_eq!(plan.ext_ip, addr("203.0.113.10"));
        let nodes: Vec<(&str, Ipv4Addr, String)> = plan
            .nodes
            .iter()
            .map(|n| (n.spec.name.as_str(), n.ip, n.pod_cidr.to_string()))
            .collect();
        assert_eq!(
            nodes,
            vec![
                ("node1", addr("10.99.0.11"), "10.244.1.0/24".to_owned()),
                ("node2", addr("10.99.0.12"), "10.244.2.0/24".to_owned()),
                ("node3", addr("10.99.0.13"), "10.244.3.0/24".to_owned()),
            ]
        );
        assert!(
            plan.nodes
                .iter()
                .all(|n| n.uplink == "eth0" && n.rp_filter == 1)
        );
        assert!(plan.nodes.iter().all(|n| n.pod_style == PodStyle::Routed));
    }

    #[test]
    fn everything_is_configurable() {
        let plan = Cluster::builder()
            .node(NodeSpec::new("worker-a"))
            .node(
                NodeSpec::new("worker-b")
                    .pod_style(PodStyle::Bridged)
                    .rp_filter(2)
                    .uplink("ens5"),
            )
            .node_subnet("192.168.50.0/24".parse().expect("cidr"))
            .pod_supernet("172.20.0.0/16".parse().expect("cidr"))
            .uplink_name("enp1s0")
            .rp_filter(0)
            .ext_ip(addr("203.0.113.99"))
            .resolve()
            .expect("valid");
        assert_eq!(plan.router_ip, addr("192.168.50.1"));
        assert_eq!(plan.ext_ip, addr("203.0.113.99"));
        let a = &plan.nodes[0];
        assert_eq!(
            (a.ip, a.uplink.as_str(), a.rp_filter),
            (addr("192.168.50.11"), "enp1s0", 0)
        );
        assert_eq!(a.pod_cidr.to_string(), "172.20.1.0/24");
        let b = &plan.nodes[1];
        assert_eq!(
            (b.uplink.as_str(), b.rp_filter, b.pod_style),
            ("ens5", 2, PodStyle::Bridged)
        );
    }

    #[test]
    fn with_node_changes_only_that_node() {
        let plan = Cluster::builder()
            .nodes(3)
            .with_node("node2", |n| n.pod_style(PodStyle::Bridged))
            .resolve()
            .expect("valid");
        let styles: Vec<PodStyle> = plan.nodes.iter().map(|n| n.pod_style).collect();
        assert_eq!(
            styles,
            [PodStyle::Routed, PodStyle::Bridged, PodStyle::Routed]
        );
    }

    #[test]
    fn bad_settings_are_refused_before_anything_is_created() {
        let cases = [
            Cluster::builder().nodes(2).with_node("node9", |n| n),
            Cluster::builder().uplink_name("a-very-long-uplink"),
            Cluster::builder()
                .node(NodeSpec::new("a"))
                .node(NodeSpec::new("a")),
            Cluster::builder().node(NodeSpec::new("router")),
            Cluster::builder().node(NodeSpec::new("Node_1")),
            Cluster::builder().nodes(1).rp_filter(3),
            Cluster::builder().nodes(300),
            Cluster::builder().tag("Bad"),
            Cluster::builder().ext_ip("203.0.113.1".parse().expect("address")),
            Cluster::builder().node_ip_offset(u32::MAX),
            Cluster::builder()
                .node(NodeSpec::new("a").ip(addr("10.99.0.5")))
                .node(NodeSpec::new("b").ip(addr("10.99.0.5"))),
            Cluster::builder().node(NodeSpec::new("a").chained(json!({"type": "x"}))),
            Cluster::builder().node(
                NodeSpec::new("a")
                    .cni_plugin(CniPlugin::Ptp)
                    .pod_style(PodStyle::Bridged),
            ),
            Cluster::builder().node(
                NodeSpec::new("a")
                    .cni_plugin(CniPlugin::Bridge)
                    .chained(json!({"mtu": 1400})),
            ),
            Cluster::builder().cni_plugin_bin("../x", "/bin/true"),
            Cluster::builder().fabric_mtu(1000),
            Cluster::builder().fabric_mtu(70_000),
            Cluster::builder().node(NodeSpec::new("a").segment(1).ip(addr("10.99.0.50"))),
            Cluster::builder()
                .node_subnet("255.255.255.0/24".parse().expect("cidr"))
                .node(NodeSpec::new("a").segment(1)),
            Cluster::builder()
                .node_subnet("203.0.112.0/24".parse().expect("cidr"))
                .node(NodeSpec::new("a").segment(1)),
            Cluster::builder()
                .node_subnet("10.243.255.0/24".parse().expect("cidr"))
                .node(NodeSpec::new("a").segment(1)),
            Cluster::builder()
                .router_bridge("seg1")
                .node(NodeSpec::new("a").segment(1)),
        ];
        for builder in cases {
            assert!(builder.resolve().is_err(), "{builder:?} accepted");
        }
    }

    #[test]
    fn a_node_on_another_segment_gets_its_address_and_gateway_there() {
        let plan = Cluster::builder()
            .nodes(3)
            .with_node("node3", |n| n.segment(1))
            .resolve()
            .expect("valid");
        let segments: Vec<(u8, String, Ipv4Addr, &str)> = plan
            .segments
            .iter()
            .map(|s| {
                (
                    s.number,
                    s.subnet.to_string(),
                    s.router_ip,
                    s.bridge.as_str(),
                )
            })
            .collect();
        assert_eq!(
            segments,
            vec![
                (0, "10.99.0.0/24".to_owned(), addr("10.99.0.1"), "br0"),
                (1, "10.99.1.0/24".to_owned(), addr("10.99.1.1"), "seg1"),
            ]
        );
        let nodes: Vec<(u8, Ipv4Addr)> = plan
            .nodes
            .iter()
            .map(|n| (n.segment.number, n.ip))
            .collect();
        assert_eq!(
            nodes,
            vec![
                (0, addr("10.99.0.11")),
                (0, addr("10.99.0.12")),
                (1, addr("10.99.1.13")),
            ]
        );
        // The main segment exists even when no node is on it: the router's address there is
        // the lab's, and segment hosts join it.
        let plan = Cluster::builder()
            .node(NodeSpec::new("a").segment(2))
            .resolve()
            .expect("valid");
        let numbers: Vec<u8> = plan.segments.iter().map(|s| s.number).collect();
        assert_eq!(numbers, [0, 2]);
        assert_eq!(plan.segments[1].subnet.to_string(), "10.99.2.0/24");
    }

    #[test]
    fn a_plugin_node_takes_the_plugin_shape() {
        let plan = Cluster::builder()
            .node(NodeSpec::new("a").cni_plugin(CniPlugin::Bridge))
            .node(
                NodeSpec::new("b")
                    .cni_plugin(CniPlugin::Ptp)
                    .chained(json!({"type": "x"})),
            )
            .resolve()
            .expect("valid");
        let styles: Vec<PodStyle> = plan.nodes.iter().map(|n| n.pod_style).collect();
        assert_eq!(styles, [PodStyle::Bridged, PodStyle::Routed]);
        let config = CniPlugin::Bridge.config(plan.nodes[0].pod_cidr, Path::new("/tmp/ipam"));
        assert_eq!(config["bridge"], CniPlugin::BRIDGE);
        assert_eq!(config["ipam"]["ranges"][0][0]["subnet"], "10.244.1.0/24");
        assert_eq!(config["ipam"]["dataDir"], "/tmp/ipam");
        assert!(check_ifname(CniPlugin::BRIDGE).is_ok());
    }

    #[test]
    fn host_numbers_stay_inside_the_subnet() {
        let subnet: Ipv4Net = "10.0.0.0/30".parse().expect("cidr");
        assert_eq!(nth_host(subnet, 1).expect("host"), addr("10.0.0.1"));
        assert!(nth_host(subnet, 3).is_err(), "broadcast accepted");
        assert!(nth_host(subnet, 4).is_err());
    }
}
