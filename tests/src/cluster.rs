//! A running lab: topology, pods, objects, agents.

use std::ffi::{OsStr, OsString};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use ipnet::Ipv4Net;
use serde_json::Value;

use crate::builder::{
    ClusterBuilder, CniPlugin, NodePlan, Plan, PodStyle, Segment, check_chained, locate_binary,
    nth_host,
};
use crate::cmd::{exec, ip, netns_command, write_sysctls};
use crate::cni::{self, Attachment, Sandbox};
use crate::digest::digest;
use crate::names::{check_dns_label, check_dns_subdomain, host_veth_name, ipv4_conf_key};
use crate::objects::{self, Labels, Objects};
use crate::process::{AgentHandle, Background, ProbeLoop, Stream};
use crate::snapshot::NodeSnapshot;
use crate::teardown::{kill_namespace_processes, mount_bpffs, script, teardown};
use crate::{POLL_INTERVAL, wait_until};

/// The next-hop address routed pods use, answered by the node through proxy ARP (as Calico does).
const ROUTED_POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// How long `se-probe ask` waits for a connection and its reply unless told otherwise.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);
/// Where Debian's `containernetworking-plugins` installs the plugins.
const SYSTEM_CNI_DIR: &str = "/usr/lib/cni";
/// The `name` of every node's conflist; `host-local` keeps its leases under it.
const CNI_NETWORK: &str = "netlab";
/// The static-egress plugin, found like the agent when a conflist names it.
const STATIC_EGRESS_CNI: &str = "static-egress-cni";
/// The name of the router's nftables tables (`ip` and `bridge` family) that drop pod sources.
const FABRIC_TABLE: &str = "netlab";

/// A node's VXLAN tunnel endpoint in an [`overlay`](ClusterBuilder::overlay) lab, made as
/// Flannel's `vxlan` backend makes it, so that what the agent finds on a lab node is what it
/// finds on a Flannel node: device `flannel.1` (VNI 1, UDP port 8472, bound to the uplink and the
/// node address, no learning), holding the network address of the node's pod CIDR as a /32.
///
/// Flannel programs every peer statically instead of letting VXLAN learn: a route
/// `<peer pod CIDR> via <peer's address> dev flannel.1 onlink`, a permanent neighbour entry for
/// that address with the peer's MAC, and a forwarding entry sending that MAC to the peer's node
/// address. The lab does the same; the MACs are derived from the node addresses rather than
/// random, so they are the same in every run and never collide within a lab.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vtep {
    pub device: String,
    pub mac: String,
    /// The network address of the node's pod CIDR (10.244.1.0 for 10.244.1.0/24).
    pub address: Ipv4Addr,
    /// The fabric MTU less the 50 bytes of outer IPv4, UDP, VXLAN and Ethernet headers.
    pub mtu: u32,
}

impl Vtep {
    /// Flannel's device name for VNI 1.
    pub const DEVICE: &'static str = "flannel.1";
    /// Flannel's default VNI.
    pub const VNI: u32 = 1;
    /// Flannel's default port: the Linux kernel's historic VXLAN port, not IANA's 4789.
    pub const PORT: u16 = 8472;
    /// What VXLAN over IPv4 adds to an inner packet: outer IPv4 (20), UDP (8), VXLAN (8) and
    /// the inner Ethernet header (14).
    pub const OVERHEAD: u32 = 50;

    fn for_node(ip: Ipv4Addr, pod_cidr: Ipv4Net, fabric_mtu: u32) -> Self {
        let [a, b, c, d] = ip.octets();
        Self {
            device: Self::DEVICE.to_owned(),
            // 0x0e: unicast (bit 0 clear), locally administered (bit 1 set).
            mac: format!("0e:fe:{a:02x}:{b:02x}:{c:02x}:{d:02x}"),
            address: pod_cidr.network(),
            mtu: fabric_mtu - Self::OVERHEAD,
        }
    }
}

/// A node of a running lab.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabNode {
    /// The Kubernetes node name (`--node`).
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    /// Prefix length of the node's segment, as configured on the uplink.
    pub prefix_len: u8,
    /// The number of the node's [`Segment`] (0: the main one); see
    /// [`Cluster::node_segment`].
    pub segment: u8,
    /// The router's address on the node's segment, where its default route points.
    pub gateway: Ipv4Addr,
    pub uplink: String,
    /// The uplink's peer on the router's bridge of the node's segment.
    pub router_port: String,
    /// The node's VXLAN device in an [`overlay`](ClusterBuilder::overlay) lab.
    pub vtep: Option<Vtep>,
    pub pod_cidr: Ipv4Net,
    /// The shape of the node's pods; for a [`plugin`](Self::plugin) node, the plugin's.
    pub pod_style: PodStyle,
    /// The real CNI plugin that wires the node's pods, if not the lab.
    pub plugin: Option<CniPlugin>,
    /// Plugins the node's conflist runs after [`plugin`](Self::plugin) (see
    /// [`Cluster::set_chained`]).
    pub chained: Vec<Value>,
    pub rp_filter: u8,
    /// The node's bpffs (`--bpffs`).
    pub bpffs: PathBuf,
    /// The agent's state directory (`--state-dir`).
    pub state_dir: PathBuf,
}

impl LabNode {
    /// Runs a command in the node's namespace; see [`crate::exec`].
    pub fn exec<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        exec(&self.netns, args)
    }

    pub fn status_path(&self) -> PathBuf {
        self.state_dir.join("status.json")
    }

    /// `host-local`'s leases for the node's plugin pods (one file per address in use, under the
    /// conflist's name): in the lab's directory, so they go with the lab and two labs never
    /// share an address pool.
    pub fn ipam_dir(&self) -> PathBuf {
        self.state_dir.with_file_name("ipam")
    }
}

/// What to create with [`Cluster::add_pod`].
#[derive(Clone, Debug)]
pub struct PodSpec {
    namespace: String,
    name: String,
    node: String,
    ip: Option<Ipv4Addr>,
    labels: Labels,
    annotations: Labels,
    reported: bool,
}

impl PodSpec {
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        node: impl Into<String>,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            node: node.into(),
            ip: None,
            labels: Labels::new(),
            annotations: Labels::new(),
            reported: true,
        }
    }

    /// The Pod object goes into the objects Pending and without its address, as the API server
    /// has it between the CNI ADD and the kubelet's status update; [`Cluster::report_pod`]
    /// then does that update.
    pub fn unreported(mut self) -> Self {
        self.reported = false;
        self
    }

    /// A fixed address instead of the next free one of the node's pod CIDR (not on a
    /// [`plugin`](LabNode::plugin) node, where `host-local` chooses).
    pub fn ip(mut self, ip: Ipv4Addr) -> Self {
        self.ip = Some(ip);
        self
    }

    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    pub fn annotation(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.annotations.insert(key.into(), value.into());
        self
    }

    /// Opts the pod in to the gateway `name` by annotation.
    pub fn gateway(self, name: impl Into<String>) -> Self {
        self.annotation(objects::GATEWAY_ANNOTATION, name)
    }
}

/// A pod of a running lab.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabPod {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    /// The node side of the pod's veth.
    pub host_veth: String,
    pub style: PodStyle,
    /// On a [`plugin`](LabNode::plugin) node: the sandbox and the ADD result DEL gets back.
    pub attachment: Option<Attachment>,
}

impl LabPod {
    /// Runs a command in the pod's namespace; see [`crate::exec`].
    pub fn exec<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        exec(&self.netns, args)
    }
}

/// A lab left running by [`Cluster::keep`].
#[derive(Clone, Debug)]
pub struct Kept {
    pub prefix: String,
    pub dir: PathBuf,
    /// A bash script that removes the lab.
    pub script: PathBuf,
}

impl Kept {
    /// The shell command that removes the lab.
    pub fn command(&self) -> String {
        format!("bash {}", self.script.display())
    }
}

/// A running lab; dropping it removes everything it created.
#[derive(Debug)]
pub struct Cluster {
    prefix: String,
    dir: PathBuf,
    objects_path: PathBuf,
    router_netns: String,
    ext_netns: String,
    settings: ClusterBuilder,
    router_ip: Ipv4Addr,
    ext_ip: Ipv4Addr,
    segments: Vec<Segment>,
    nodes: Vec<LabNode>,
    pods: Vec<LabPod>,
    objects: Objects,
    probe_bin: PathBuf,
    /// `CNI_PATH` of plugin nodes: links to the system plugins and the extra ones.
    cni_bin_dir: PathBuf,
    ext_server: Option<Background>,
    /// `se-probe echo` on ext, for streams; started with the first one.
    ext_echo: Option<Background>,
    /// Numbers the log files of agents and loops.
    runs: AtomicU32,
    armed: bool,
}

/// `ip netns add` sets up the shared `/run/netns` mount the first time it runs; concurrent first
/// runs can race on that, so this process adds namespaces one at a time.
static NETNS_ADD: Mutex<()> = Mutex::new(());

fn add_netns(name: &str, ipv6: bool) -> Result<()> {
    {
        let _serialized = NETNS_ADD.lock().unwrap_or_else(|e| e.into_inner());
        ip(["netns", "add", name])?;
    }
    ip(["-n", name, "link", "set", "lo", "up"])?;
    if !ipv6 {
        write_sysctls(
            name,
            &[
                ("net/ipv6/conf/all/disable_ipv6".into(), "1".into()),
                ("net/ipv6/conf/default/disable_ipv6".into(), "1".into()),
            ],
        )?;
    }
    Ok(())
}

fn rp_filter_settings(devices: &[&str], value: u8) -> Vec<(String, String)> {
    devices
        .iter()
        .map(|dev| (ipv4_conf_key(dev, "rp_filter"), value.to_string()))
        .collect()
}

impl Cluster {
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    pub(crate) fn create(
        settings: ClusterBuilder,
        plan: &Plan,
        prefix: String,
        dir: PathBuf,
        probe_bin: PathBuf,
    ) -> Result<Self> {
        let mut cluster = Self {
            objects_path: dir.join("objects.yaml"),
            cni_bin_dir: dir.join("cni-bin"),
            dir,
            router_netns: format!("{prefix}-router"),
            ext_netns: format!("{prefix}-ext"),
            prefix,
            settings,
            router_ip: plan.router_ip,
            ext_ip: plan.ext_ip,
            segments: plan.segments.clone(),
            nodes: Vec::new(),
            pods: Vec::new(),
            objects: Objects::default(),
            probe_bin,
            ext_server: None,
            ext_echo: None,
            runs: AtomicU32::new(0),
            armed: true,
        };
        // From here on an error drops `cluster`, which removes whatever was already created.
        cluster.build_topology(plan)?;
        Ok(cluster)
    }

    fn build_topology(&mut self, plan: &Plan) -> Result<()> {
        let s = &self.settings;
        let (router, ext) = (self.router_netns.clone(), self.ext_netns.clone());
        add_netns(&router, s.ipv6)?;
        add_netns(&ext, s.ipv6)?;
        write_sysctls(&router, &[("net/ipv4/ip_forward".into(), "1".into())])?;
        if plan.nodes.iter().any(|n| n.spec.plugin.is_some()) {
            self.link_cni_plugins()?;
        }

        let mtu = s.fabric_mtu;
        for segment in &plan.segments {
            let br = &segment.bridge;
            let len = segment.subnet.prefix_len();
            add_bridge(&router, br)?;
            // Set, not left to follow the ports: a bridge without ports has 1500 and takes the
            // lowest MTU of its ports as they join, unless it was given one.
            ip_in(&router, &format!("link set {br} mtu {mtu}"))?;
            ip_in(
                &router,
                &format!("addr add {}/{len} dev {br}", segment.router_ip),
            )?;
            ip_in(&router, &format!("link set {br} up"))?;
        }

        let ext_len = s.ext_subnet.prefix_len();
        let router_ext_ip = plan.router_ext_ip;
        ip_in(
            &router,
            &format!("link add {ROUTER_EXT} type veth peer name eth0 netns {ext}"),
        )?;
        ip_in(&router, &format!("link set {ROUTER_EXT} mtu {mtu}"))?;
        ip_in(
            &router,
            &format!("addr add {router_ext_ip}/{ext_len} dev {ROUTER_EXT}"),
        )?;
        ip_in(&router, &format!("link set {ROUTER_EXT} up"))?;
        ip_in(&ext, &format!("link set eth0 mtu {mtu}"))?;
        ip_in(
            &ext,
            &format!("addr add {}/{ext_len} dev eth0", self.ext_ip),
        )?;
        ip_in(&ext, "link set eth0 up")?;
        ip_in(&ext, &format!("route add default via {router_ext_ip}"))?;

        for node in &plan.nodes {
            let lab_node = self.create_node(node)?;
            self.objects.set_node(
                objects::Node {
                    name: lab_node.name.clone(),
                    labels: node.spec.labels.clone(),
                    annotations: Labels::new(),
                    ready: node.spec.ready,
                    unschedulable: false,
                    internal_ip: Some(lab_node.ip),
                    pod_cidrs: vec![lab_node.pod_cidr],
                }
                .label("kubernetes.io/hostname", lab_node.name.clone()),
            );
            self.nodes.push(lab_node);
        }
        if self.settings.overlay {
            self.connect_vteps()?;
        } else {
            self.add_host_gw_routes()?;
        }
        if self.settings.fabric_drops_pod_sources {
            self.add_fabric_filter()?;
        }
        self.start_ext_server()?;
        self.write_objects()?;
        Ok(())
    }

    /// host-gw: every node reaches the other nodes' pods through those nodes' addresses, which
    /// works only on a shared segment. Pods behind another segment are routed via the router,
    /// which then needs a route to every pod CIDR via its node, as a routed fabric that peers
    /// with the nodes (BGP) has. A single-segment lab gives the router none, so that pod
    /// addresses stay unroutable from `ext` as they are in most clusters.
    fn add_host_gw_routes(&self) -> Result<()> {
        for node in &self.nodes {
            for other in self.nodes.iter().filter(|o| o.name != node.name) {
                let via = if other.segment == node.segment {
                    other.ip
                } else {
                    node.gateway
                };
                let route = format!("route add {} via {via} dev {}", other.pod_cidr, node.uplink);
                ip_in(&node.netns, &route)?;
            }
        }
        let first = self.nodes.first().map(|n| n.segment);
        if self.nodes.iter().any(|n| Some(n.segment) != first) {
            for node in &self.nodes {
                let route = format!("route add {} via {}", node.pod_cidr, node.ip);
                ip_in(&self.router_netns, &route)?;
            }
        }
        Ok(())
    }

    /// Flannel's static programming of every peer's VXLAN endpoint (see [`Vtep`]): route, ARP
    /// and FDB entries. The FDB entry names the peer's node address whatever its segment:
    /// the encapsulated packet follows the node's ordinary routes, via the router if need be.
    fn connect_vteps(&self) -> Result<()> {
        for node in &self.nodes {
            let dev = Vtep::DEVICE;
            for other in self.nodes.iter().filter(|o| o.name != node.name) {
                let peer = other
                    .vtep
                    .as_ref()
                    .ok_or_else(|| anyhow!("{} has no VXLAN device", other.name))?;
                ip_in(
                    &node.netns,
                    &format!(
                        "neigh add {} lladdr {} dev {dev} nud permanent",
                        peer.address, peer.mac
                    ),
                )?;
                let fdb = format!(
                    "fdb append {} dev {dev} dst {} self permanent",
                    peer.mac, other.ip
                );
                exec(
                    &node.netns,
                    std::iter::once("bridge").chain(fdb.split_whitespace()),
                )?;
                ip_in(
                    &node.netns,
                    &format!(
                        "route add {} via {} dev {dev} onlink",
                        other.pod_cidr, peer.address
                    ),
                )?;
            }
        }
        Ok(())
    }

    /// The router's filter of pod sources (see [`ClusterBuilder::fabric_drops_pod_sources`]).
    ///
    /// Two tables, because the router both routes and switches: the `ip` one sees what it
    /// forwards between segments and to `ext`, the `bridge` one what passes between ports of
    /// one segment's bridge. Whether the `ip` hooks also see bridged frames depends on the
    /// host (`br_netfilter`, which once present is on in every new namespace), so the lab does
    /// not rely on it; where it is on, the bridge chain's `filter` priority (-200) comes before
    /// the hook (0) that hands frames to `ip`, so a dropped frame is counted once.
    fn add_fabric_filter(&self) -> Result<()> {
        let pods = self.settings.pod_supernet;
        let chain = |family: &str| {
            format!(
                "table {family} {FABRIC_TABLE} {{\n\
                 \tchain forward {{\n\
                 \t\ttype filter hook forward priority filter; policy accept;\n\
                 \t\tip saddr {pods} counter drop comment \"pod source on the fabric\"\n\
                 \t}}\n\
                 }}\n"
            )
        };
        let rules = format!("{}{}", chain("ip"), chain("bridge"));
        let path = self.dir.join("fabric.nft");
        std::fs::write(&path, rules).with_context(|| format!("cannot write {}", path.display()))?;
        exec(
            &self.router_netns,
            [OsStr::new("nft"), OsStr::new("-f"), path.as_os_str()],
        )?;
        Ok(())
    }

    fn create_node(&self, plan: &NodePlan) -> Result<LabNode> {
        let s = &self.settings;
        let name = &plan.spec.name;
        let netns = format!("{}-{name}", self.prefix);
        add_netns(&netns, s.ipv6)?;
        let mut sysctls = vec![("net/ipv4/ip_forward".to_owned(), "1".to_owned())];
        // `default` before any interface exists, so the uplink and pod veths inherit it.
        sysctls.extend(rp_filter_settings(&["all", "default"], plan.rp_filter));
        write_sysctls(&netns, &sysctls)?;

        let port = format!("port{}", plan.number);
        let (uplink, router) = (plan.uplink.as_str(), self.router_netns.as_str());
        let segment = &plan.segment;
        let prefix_len = segment.subnet.prefix_len();
        let mtu = s.fabric_mtu;
        ip_in(
            &netns,
            &format!("link add {uplink} type veth peer name {port} netns {router}"),
        )?;
        ip_in(&netns, &format!("link set {uplink} mtu {mtu}"))?;
        ip_in(router, &format!("link set {port} mtu {mtu}"))?;
        ip_in(
            router,
            &format!("link set {port} master {} up", segment.bridge),
        )?;
        write_sysctls(&netns, &rp_filter_settings(&[uplink], plan.rp_filter))?;
        ip_in(
            &netns,
            &format!("addr add {}/{prefix_len} dev {uplink}", plan.ip),
        )?;
        ip_in(&netns, &format!("link set {uplink} up"))?;
        ip_in(
            &netns,
            &format!("route add default via {} dev {uplink}", segment.router_ip),
        )?;
        let vtep = if s.overlay {
            let vtep = Vtep::for_node(plan.ip, plan.pod_cidr, mtu);
            let dev = &vtep.device;
            ip_in(
                &netns,
                &format!(
                    "link add {dev} type vxlan id {} local {} dev {uplink} dstport {} nolearning",
                    Vtep::VNI,
                    plan.ip,
                    Vtep::PORT
                ),
            )?;
            ip_in(
                &netns,
                &format!("link set {dev} address {} mtu {}", vtep.mac, vtep.mtu),
            )?;
            ip_in(&netns, &format!("addr add {}/32 dev {dev}", vtep.address))?;
            ip_in(&netns, &format!("link set {dev} up"))?;
            Some(vtep)
        } else {
            None
        };

        match plan.pod_style {
            // The plugin makes its bridge or routes with the first pod, and masquerades itself.
            _ if plan.spec.plugin.is_some() => {}
            PodStyle::Routed => {
                // As Calico does for its own block: pods that do not exist are unreachable
                // instead of being sent to the default route.
                ip_in(&netns, &format!("route add blackhole {}", plan.pod_cidr))?;
            }
            PodStyle::Bridged => {
                let bridge = &s.pod_bridge;
                let gateway = nth_host(plan.pod_cidr, 1)?;
                let len = plan.pod_cidr.prefix_len();
                add_bridge(&netns, bridge)?;
                ip_in(&netns, &format!("addr add {gateway}/{len} dev {bridge}"))?;
                ip_in(&netns, &format!("link set {bridge} up"))?;
            }
        }
        if s.masquerade && plan.spec.plugin.is_none() {
            let pods = s.pod_supernet.to_string();
            exec(
                &netns,
                ["iptables", "-w", "-t", "nat", "-A", "POSTROUTING"]
                    .into_iter()
                    .chain(["-s", &pods, "!", "-d", &pods, "-j", "MASQUERADE"]),
            )?;
        }

        let node_dir = self.dir.join(name);
        let bpffs = node_dir.join("bpf");
        let state_dir = node_dir.join("state");
        for dir in [&bpffs, &state_dir] {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        mount_bpffs(&bpffs)?;
        Ok(LabNode {
            name: name.clone(),
            netns,
            ip: plan.ip,
            prefix_len,
            segment: segment.number,
            gateway: segment.router_ip,
            uplink: plan.uplink.clone(),
            router_port: port,
            vtep,
            pod_cidr: plan.pod_cidr,
            pod_style: plan.pod_style,
            plugin: plan.spec.plugin,
            chained: plan.spec.chained.clone(),
            rp_filter: plan.rp_filter,
            bpffs,
            state_dir,
        })
    }

    fn start_ext_server(&mut self) -> Result<()> {
        let listen = self.probe_addr().to_string();
        let log = self.ext_log_path();
        let mut cmd = netns_command(&self.ext_netns, [self.probe_bin.as_os_str()]);
        cmd.args(["serve", "--listen", &listen, "--log"]).arg(&log);
        let out = self.dir.join("ext-serve.out");
        let mut server = Background::spawn(cmd, &out, "se-probe serve in ext".into())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if server.output()?.lines().any(|l| l == "ready") {
                break;
            }
            if !server.is_running() || Instant::now() >= deadline {
                bail!(
                    "se-probe serve did not get ready: {}",
                    server.output()?.trim()
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        self.ext_server = Some(server);
        Ok(())
    }

    /// `tag-pid-counter`: starts every namespace of this lab and names its directory.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The lab's directory: objects file, node state dirs and bpffs, logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn nodes(&self) -> &[LabNode] {
        &self.nodes
    }

    pub fn node(&self, name: &str) -> Result<&LabNode> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| anyhow!("the lab has no node {name}"))
    }

    pub fn pods(&self) -> &[LabPod] {
        &self.pods
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Result<&LabPod> {
        self.pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
            .ok_or_else(|| anyhow!("the lab has no pod {namespace}/{name}"))
    }

    pub fn router_netns(&self) -> &str {
        &self.router_netns
    }

    /// Makes the router's link to the external host carry packets of at most `mtu` bytes out
    /// of the cluster: a larger one with DF set gets the router's "fragmentation needed".
    pub fn narrow_outside_link(&self, mtu: u32) -> Result<()> {
        ip_in(
            &self.router_netns,
            &format!("link set {ROUTER_EXT} mtu {mtu}"),
        )?;
        Ok(())
    }

    /// The router's bridge for the main node segment.
    pub fn router_bridge(&self) -> &str {
        &self.settings.router_bridge
    }

    /// The fabric's segments: the main one first, then those nodes were put on (see
    /// [`NodeSpec::segment`](crate::NodeSpec::segment)).
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The segment `node` sits on.
    pub fn node_segment(&self, node: &str) -> Result<&Segment> {
        let number = self.node(node)?.segment;
        self.segments
            .iter()
            .find(|s| s.number == number)
            .ok_or_else(|| anyhow!("the lab has no segment {number}"))
    }

    /// How many packets the fabric has dropped for their pod source, on the router's bridges
    /// and in its forwarding together (see [`ClusterBuilder::fabric_drops_pod_sources`]): a
    /// test that expects pod traffic to be stopped, or to never reach the fabric unwrapped,
    /// can check that the filter saw it, rather than trusting a silence that has other
    /// explanations.
    pub fn fabric_drops(&self) -> Result<u64> {
        ensure!(
            self.settings.fabric_drops_pod_sources,
            "the lab's fabric does not drop pod sources: build it with fabric_drops_pod_sources"
        );
        let mut total = 0;
        for family in ["ip", "bridge"] {
            let out = exec(
                &self.router_netns,
                ["nft", "-j", "list", "table", family, FABRIC_TABLE],
            )?;
            let json: Value = serde_json::from_str(&out)
                .with_context(|| format!("odd output of nft -j: {out}"))?;
            total += counted_packets(&json);
        }
        Ok(total)
    }

    pub fn ext_netns(&self) -> &str {
        &self.ext_netns
    }

    /// The router's address on the node segment: the nodes' default gateway.
    pub fn router_ip(&self) -> Ipv4Addr {
        self.router_ip
    }

    pub fn ext_ip(&self) -> Ipv4Addr {
        self.ext_ip
    }

    /// Where the external probe server listens.
    pub fn probe_addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.ext_ip, self.settings.probe_port)
    }

    pub fn probe_bin(&self) -> &Path {
        &self.probe_bin
    }

    /// The `static-egress` binary the lab runs (see [`ClusterBuilder::agent_bin`]).
    pub fn agent_bin(&self) -> Result<PathBuf> {
        let path = match &self.settings.agent_bin {
            Some(path) => path.clone(),
            None => locate_binary("STATIC_EGRESS_BIN", "static-egress"),
        };
        ensure!(
            path.is_file(),
            "static-egress not found at {}: build it with `cargo xtask build` or set \
             STATIC_EGRESS_BIN",
            path.display()
        );
        Ok(path)
    }

    pub(crate) fn next_run(&self) -> u32 {
        self.runs.fetch_add(1, Ordering::Relaxed) + 1
    }

    // ---- pods -----------------------------------------------------------------------------

    /// Creates a pod's namespace and wiring on its node and puts its Pod object (Running, with
    /// its address, unless [`unreported`](PodSpec::unreported)) into
    /// [`objects`](Self::objects); the file is written by [`write_objects`](Self::write_objects).
    ///
    /// On a [`plugin`](LabNode::plugin) node the node's conflist is run (ADD) for a new
    /// sandbox and the pod gets the address and node-side interface of the result; a failed ADD
    /// is followed by a DEL and the namespace's removal, as a runtime cleans up, and returned.
    pub fn add_pod(&mut self, spec: PodSpec) -> Result<LabPod> {
        check_dns_label("namespace", &spec.namespace)?;
        check_dns_subdomain("pod name", &spec.name)?;
        ensure!(
            self.pod(&spec.namespace, &spec.name).is_err(),
            "pod {}/{} already exists",
            spec.namespace,
            spec.name
        );
        let node = self.node(&spec.node)?.clone();
        let netns = format!("{}-pod-{}.{}", self.prefix, spec.namespace, spec.name);
        let pod = if node.plugin.is_some() {
            ensure!(
                spec.ip.is_none(),
                "pod {}/{}: no fixed address on {}, whose CNI plugin's host-local chooses",
                spec.namespace,
                spec.name,
                node.name
            );
            let sandbox = self.new_sandbox(&spec.namespace, &spec.name, &netns, None);
            let (attachment, address, host_veth) = self.attach(&node, sandbox)?;
            LabPod {
                netns,
                host_veth,
                namespace: spec.namespace.clone(),
                name: spec.name.clone(),
                node: node.name.clone(),
                ip: address,
                style: node.pod_style,
                attachment: Some(attachment),
            }
        } else {
            let address = match spec.ip {
                Some(address) => address,
                None => self.free_pod_ip(&node)?,
            };
            ensure!(
                !self.pods.iter().any(|p| p.ip == address),
                "address {address} is already taken by another pod"
            );
            let pod = LabPod {
                netns,
                host_veth: host_veth_name(
                    node.pod_style.veth_prefix(),
                    &spec.namespace,
                    &spec.name,
                )?,
                namespace: spec.namespace.clone(),
                name: spec.name.clone(),
                node: node.name.clone(),
                ip: address,
                style: node.pod_style,
                attachment: None,
            };
            if let Err(e) = self.wire_pod(&pod, &node) {
                // Take back what was created so a retry starts clean.
                let _ = kill_namespace_processes(&pod.netns);
                let _ = ip(["netns", "del", &pod.netns]);
                return Err(e);
            }
            pod
        };
        let mut object = objects::Pod::new(&spec.namespace, &spec.name).node(&node.name);
        object = if spec.reported {
            object.ip(pod.ip)
        } else {
            object.phase("Pending")
        };
        object.labels = spec.labels;
        object.annotations = spec.annotations;
        self.objects.set_pod(object);
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// The kubelet's status update after a pod's sandbox is up: its Pod object gets the pod's
    /// address and `Running` (see [`PodSpec::unreported`]). Written with the next
    /// [`write_objects`](Self::write_objects).
    pub fn report_pod(&mut self, namespace: &str, name: &str) -> Result<()> {
        let address = self.pod(namespace, name)?.ip;
        let object = self.objects.pod_mut(namespace, name)?;
        object.ip = Some(address);
        object.phase = "Running".into();
        Ok(())
    }

    // ---- CNI plugins ----------------------------------------------------------------------

    /// The conflist the runtime of a [`plugin`](LabNode::plugin) node runs: the node's plugin,
    /// then its [`chained`](LabNode::chained) ones.
    pub fn conflist(&self, node: &str) -> Result<Value> {
        let node = self.node(node)?;
        let plugin = node
            .plugin
            .ok_or_else(|| anyhow!("node {} has no CNI plugin", node.name))?;
        let mut plugins = vec![plugin.config(node.pod_cidr, &node.ipam_dir())];
        plugins.extend(node.chained.iter().cloned());
        Ok(serde_json::json!({
            "cniVersion": cni::CNI_VERSION,
            "name": CNI_NETWORK,
            "plugins": plugins,
        }))
    }

    /// Replaces the plugins chained after a plugin node's own: a chained plugin's configuration
    /// may name things that exist only once the lab runs (a socket in the agent's
    /// [`state_dir`](LabNode::state_dir)). Applies from the next ADD or DEL, DELs of pods added
    /// before included: runtimes delete with the configuration they have at that moment.
    pub fn set_chained(&mut self, node: &str, chained: Vec<Value>) -> Result<()> {
        for plugin in &chained {
            check_chained(plugin)?;
        }
        let lab_node = self
            .nodes
            .iter_mut()
            .find(|n| n.name == node)
            .ok_or_else(|| anyhow!("the lab has no node {node}"))?;
        ensure!(
            lab_node.plugin.is_some(),
            "node {node} has no CNI plugin for others to follow"
        );
        lab_node.chained = chained;
        Ok(())
    }

    /// The directory given to plugins as `CNI_PATH`: links to `/usr/lib/cni`'s plugins and to
    /// those of [`ClusterBuilder::cni_plugin_bin`].
    pub fn cni_bin_dir(&self) -> &Path {
        &self.cni_bin_dir
    }

    /// Fills [`cni_bin_dir`](Self::cni_bin_dir). Links rather than a list of directories, so
    /// that an extra plugin can also stand in for a system one of the same name.
    fn link_cni_plugins(&self) -> Result<()> {
        let dir = &self.cni_bin_dir;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let system = std::fs::read_dir(SYSTEM_CNI_DIR).with_context(|| {
            format!(
                "cannot list {SYSTEM_CNI_DIR}: install containernetworking-plugins \
                 (`cargo xtask setup`)"
            )
        })?;
        for entry in system {
            let entry = entry?;
            let link = dir.join(entry.file_name());
            symlink(entry.path(), &link)
                .with_context(|| format!("cannot link {}", link.display()))?;
        }
        for (type_name, path) in &self.settings.cni_plugin_bins {
            self.link_cni_plugin(type_name, path)?;
        }
        Ok(())
    }

    fn link_cni_plugin(&self, type_name: &str, path: &Path) -> Result<()> {
        ensure!(
            path.is_file(),
            "CNI plugin {type_name} not found at {}",
            path.display()
        );
        // A relative target would be read relative to the link's directory.
        let target = std::path::absolute(path)?;
        let link = self.cni_bin_dir.join(type_name);
        match std::fs::remove_file(&link) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(anyhow!(e).context(format!("cannot replace {}", link.display())));
            }
            _ => {}
        }
        symlink(&target, &link).with_context(|| format!("cannot link {}", link.display()))
    }

    /// `CNI_PATH` for `conflist`, linking `static-egress-cni` in first if the conflist names it
    /// and no binary was given: only labs that chain it need it built.
    fn cni_path(&self, conflist: &Value) -> Result<Vec<PathBuf>> {
        let names_ours = conflist["plugins"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p.get("type").and_then(Value::as_str) == Some(STATIC_EGRESS_CNI));
        if names_ours
            && std::fs::symlink_metadata(self.cni_bin_dir.join(STATIC_EGRESS_CNI)).is_err()
        {
            let path = locate_binary("STATIC_EGRESS_CNI_BIN", STATIC_EGRESS_CNI);
            ensure!(
                path.is_file(),
                "{STATIC_EGRESS_CNI} not found at {}: build it or set STATIC_EGRESS_CNI_BIN",
                path.display()
            );
            self.link_cni_plugin(STATIC_EGRESS_CNI, &path)?;
        }
        Ok(vec![self.cni_bin_dir.clone()])
    }

    /// A new sandbox of a pod: a new container id every time, and a new pod UID unless the
    /// sandbox replaces one of the same pod (`uid`). Both are derived from the lab, the pod and
    /// a counter, so they are unique yet tell whose they are in a plugin's logs.
    fn new_sandbox(
        &self,
        namespace: &str,
        name: &str,
        netns: &str,
        uid: Option<String>,
    ) -> Sandbox {
        let seed = format!("{}/{namespace}/{name}/{}", self.prefix, self.next_run());
        // The part number goes first: FNV mixes early bytes into every bit of the hash.
        let hex = |first: u8, parts: u8| -> String {
            (first..first + parts)
                .map(|i| digest(format!("{i}/{seed}").as_bytes()))
                .collect()
        };
        let uid = uid.unwrap_or_else(|| {
            let h = hex(4, 2);
            format!(
                "{}-{}-{}-{}-{}",
                &h[..8],
                &h[8..12],
                &h[12..16],
                &h[16..20],
                &h[20..]
            )
        });
        Sandbox {
            // 64 hex digits, the shape of containerd's ids.
            container_id: hex(0, 4),
            netns: netns.to_owned(),
            pod_namespace: namespace.to_owned(),
            pod_name: name.to_owned(),
            pod_uid: uid,
        }
    }

    /// Creates the sandbox's namespace and runs ADD; returns the attachment with the pod's
    /// address and node-side interface. Whatever fails is undone before the error returns.
    fn attach(&self, node: &LabNode, sandbox: Sandbox) -> Result<(Attachment, Ipv4Addr, String)> {
        let conflist = self.conflist(&node.name)?;
        let cni_path = self.cni_path(&conflist)?;
        let host = cni::Host {
            netns: &node.netns,
            cni_path: &cni_path,
        };
        let added = add_netns(&sandbox.netns, self.settings.ipv6)
            .and_then(|()| cni::add(host, &conflist, &sandbox));
        let result = match added {
            Ok(result) => result,
            Err(e) => return Err(undo_attach(host, &conflist, &sandbox, None, e)),
        };
        match plugin_wiring(&result) {
            Ok((address, host_veth)) => Ok((Attachment { sandbox, result }, address, host_veth)),
            Err(e) => Err(undo_attach(host, &conflist, &sandbox, Some(&result), e)),
        }
    }

    /// DEL of a plugin pod's sandbox with the node's current conflist.
    fn detach(&self, node: &LabNode, attachment: &Attachment) -> Result<()> {
        let conflist = self.conflist(&node.name)?;
        let cni_path = self.cni_path(&conflist)?;
        let host = cni::Host {
            netns: &node.netns,
            cni_path: &cni_path,
        };
        let sandbox = &attachment.sandbox;
        cni::del(host, &conflist, sandbox, Some(&attachment.result)).with_context(|| {
            format!(
                "DEL of pod {}/{} (sandbox {}) on {}",
                sandbox.pod_namespace, sandbox.pod_name, sandbox.container_id, node.name
            )
        })
    }

    fn wire_pod(&self, pod: &LabPod, node: &LabNode) -> Result<()> {
        let (ns, veth, host) = (
            pod.netns.as_str(),
            pod.host_veth.as_str(),
            node.netns.as_str(),
        );
        add_netns(ns, self.settings.ipv6)?;
        ip_in(
            ns,
            &format!("link add eth0 type veth peer name {veth} netns {host}"),
        )?;
        match pod.style {
            PodStyle::Routed => {
                ip_in(ns, &format!("addr add {}/32 dev eth0", pod.ip))?;
                ip_in(ns, "link set eth0 up")?;
                ip_in(
                    ns,
                    &format!("route add default via {ROUTED_POD_GATEWAY} dev eth0 onlink"),
                )?;
                write_sysctls(host, &[(ipv4_conf_key(veth, "proxy_arp"), "1".into())])?;
                ip_in(host, &format!("link set {veth} up"))?;
                ip_in(host, &format!("route add {}/32 dev {veth}", pod.ip))?;
            }
            PodStyle::Bridged => {
                let gateway = nth_host(node.pod_cidr, 1)?;
                let len = node.pod_cidr.prefix_len();
                ip_in(ns, &format!("addr add {}/{len} dev eth0", pod.ip))?;
                ip_in(ns, "link set eth0 up")?;
                ip_in(ns, &format!("route add default via {gateway}"))?;
                ip_in(
                    host,
                    &format!("link set {veth} master {} up", self.settings.pod_bridge),
                )?;
            }
        }
        Ok(())
    }

    /// Lowest address of the node's pod CIDR above the first (the bridge's on bridged nodes)
    /// that no pod has.
    fn free_pod_ip(&self, node: &LabNode) -> Result<Ipv4Addr> {
        node.pod_cidr
            .hosts()
            .skip(1)
            .find(|ip| !self.pods.iter().any(|p| p.ip == *ip))
            .ok_or_else(|| anyhow!("pod CIDR {} of {} is full", node.pod_cidr, node.name))
    }

    /// Removes a pod's namespace and wiring, and its Pod object from [`objects`](Self::objects).
    ///
    /// A plugin pod's sandbox gets a DEL first; if that fails the pod stays (its processes
    /// killed) and the error returns, so a test can put things right and remove it again, as
    /// the kubelet retries.
    pub fn remove_pod(&mut self, namespace: &str, name: &str) -> Result<()> {
        let pod = self.pod(namespace, name)?.clone();
        let node = self.node(&pod.node)?;
        kill_namespace_processes(&pod.netns)?;
        match &pod.attachment {
            Some(attachment) => self.detach(node, attachment)?,
            // Deleting the veth from the node side is immediate, while the kernel dismantles a
            // deleted namespace in the background: a pod added again right away would
            // otherwise find its veth name still taken.
            None => {
                ip_in(&node.netns, &format!("link del {}", pod.host_veth))?;
            }
        }
        ip(["netns", "del", &pod.netns])?;
        self.pods
            .retain(|p| !(p.namespace == namespace && p.name == name));
        self.objects.remove_pod(namespace, name);
        Ok(())
    }

    /// A host that is not a node, on the nodes' segment: namespace `<prefix>-<name>`, address
    /// `ip` on its `eth0`, default route via the router. Returns its namespace. Removed with
    /// the lab.
    pub fn add_segment_host(&self, name: &str, ip: Ipv4Addr) -> Result<String> {
        check_dns_label("host name", name)?;
        let netns = format!("{}-{name}", self.prefix);
        let port = format!("h-{name}");
        crate::names::check_ifname(&port)?;
        add_netns(&netns, self.settings.ipv6)?;
        ip_in(
            &self.router_netns,
            &format!("link add {port} type veth peer name eth0 netns {netns}"),
        )?;
        let mtu = self.settings.fabric_mtu;
        ip_in(&self.router_netns, &format!("link set {port} mtu {mtu}"))?;
        ip_in(&netns, &format!("link set eth0 mtu {mtu}"))?;
        ip_in(
            &self.router_netns,
            &format!("link set {port} master {} up", self.settings.router_bridge),
        )?;
        let len = self.settings.node_subnet.prefix_len();
        ip_in(&netns, &format!("addr add {ip}/{len} dev eth0"))?;
        ip_in(&netns, "link set eth0 up")?;
        ip_in(&netns, &format!("route add default via {}", self.router_ip))?;
        Ok(netns)
    }

    /// Re-creates a pod's namespace and veth, as a runtime does when it restarts a pod's
    /// sandbox: the node side of the veth comes back with a new index.
    ///
    /// A lab-wired pod keeps its address. A plugin pod gets DEL, then ADD for a new sandbox
    /// (new container id, same pod UID): its address and node-side interface are whatever the
    /// plugin gives this time, and its Pod object follows if it was reported. If the ADD fails
    /// the pod is gone from the lab, as its sandbox is.
    pub fn rewire_pod(&mut self, namespace: &str, name: &str) -> Result<()> {
        let pod = self.pod(namespace, name)?.clone();
        let node = self.node(&pod.node)?.clone();
        kill_namespace_processes(&pod.netns)?;
        let Some(old) = &pod.attachment else {
            ip_in(&node.netns, &format!("link del {}", pod.host_veth))?;
            ip(["netns", "del", &pod.netns])?;
            return self.wire_pod(&pod, &node);
        };
        self.detach(&node, old)?;
        ip(["netns", "del", &pod.netns])?;
        let uid = Some(old.sandbox.pod_uid.clone());
        let sandbox = self.new_sandbox(namespace, name, &pod.netns, uid);
        let attached = self.attach(&node, sandbox);
        let Ok((attachment, address, host_veth)) = attached else {
            self.pods
                .retain(|p| !(p.namespace == namespace && p.name == name));
            self.objects.remove_pod(namespace, name);
            return attached.map(|_| ());
        };
        if let Some(entry) = self
            .pods
            .iter_mut()
            .find(|p| p.namespace == namespace && p.name == name)
        {
            entry.ip = address;
            entry.host_veth = host_veth;
            entry.attachment = Some(attachment);
        }
        if let Ok(object) = self.objects.pod_mut(namespace, name)
            && object.ip.is_some()
        {
            object.ip = Some(address);
        }
        Ok(())
    }

    /// Asks the external probe server, from inside the pod, which source address it sees.
    pub fn ask(&self, pod: &LabPod) -> Result<Ipv4Addr> {
        self.ask_timeout(pod, ASK_TIMEOUT)
    }

    pub fn ask_timeout(&self, pod: &LabPod, timeout: Duration) -> Result<Ipv4Addr> {
        let answer = exec(
            &pod.netns,
            [
                self.probe_bin.as_os_str(),
                OsStr::new("ask"),
                OsStr::new(&self.probe_addr().to_string()),
                OsStr::new("--timeout-ms"),
                OsStr::new(&timeout.as_millis().to_string()),
            ],
        )
        .with_context(|| format!("pod {}/{} could not reach ext", pod.namespace, pod.name))?;
        answer
            .trim()
            .parse()
            .with_context(|| format!("odd answer from se-probe: {answer:?}"))
    }

    /// Starts `se-probe loop` in the pod: `count` connections, one every `interval`.
    pub fn start_loop(&self, pod: &LabPod, interval: Duration, count: u32) -> Result<ProbeLoop> {
        self.start_loop_with_timeout(pod, interval, count, ASK_TIMEOUT)
    }

    /// Like [`start_loop`](Self::start_loop), each connection given `timeout`.
    pub fn start_loop_with_timeout(
        &self,
        pod: &LabPod,
        interval: Duration,
        count: u32,
        timeout: Duration,
    ) -> Result<ProbeLoop> {
        let out = self.dir.join(format!(
            "loop.{}.{}.{}.out",
            pod.namespace,
            pod.name,
            self.next_run()
        ));
        let mut cmd = netns_command(&pod.netns, [self.probe_bin.as_os_str()]);
        cmd.arg("loop")
            .arg(self.probe_addr().to_string())
            .args(["--interval-ms", &interval.as_millis().to_string()])
            .args(["--count", &count.to_string()])
            .args(["--timeout-ms", &timeout.as_millis().to_string()]);
        let what = format!("se-probe loop in {}/{}", pod.namespace, pod.name);
        Ok(ProbeLoop {
            process: Background::spawn(cmd, &out, what)?,
        })
    }

    /// Starts `se-probe stream` in the pod: one connection to an echo server on `ext` (started
    /// with the first stream), kept busy with a message every `interval` for `duration`.
    pub fn start_stream(
        &mut self,
        pod: &LabPod,
        interval: Duration,
        duration: Duration,
    ) -> Result<Stream> {
        self.start_stream_from(pod, 0, interval, duration)
    }

    /// [`Self::start_stream`] from `source_port` (any when 0).
    pub fn start_stream_from(
        &mut self,
        pod: &LabPod,
        source_port: u16,
        interval: Duration,
        duration: Duration,
    ) -> Result<Stream> {
        let echo = SocketAddrV4::new(self.ext_ip, self.settings.probe_port + 1);
        if self.ext_echo.is_none() {
            let mut cmd = netns_command(&self.ext_netns, [self.probe_bin.as_os_str()]);
            cmd.args(["echo", "--listen", &echo.to_string()]);
            let out = self.dir.join("ext-echo.out");
            let server = Background::spawn(cmd, &out, "se-probe echo in ext".into())?;
            wait_until(Duration::from_secs(10), || {
                server
                    .output()
                    .is_ok_and(|o| o.lines().any(|l| l == "ready"))
            })
            .context("se-probe echo did not get ready")?;
            self.ext_echo = Some(server);
        }
        let out = self.dir.join(format!(
            "stream.{}.{}.{}.out",
            pod.namespace,
            pod.name,
            self.next_run()
        ));
        let mut cmd = netns_command(&pod.netns, [self.probe_bin.as_os_str()]);
        cmd.arg("stream")
            .arg(echo.to_string())
            .args(["--interval-ms", &interval.as_millis().to_string()])
            .args(["--seconds", &duration.as_secs().to_string()])
            .args(["--source-port", &source_port.to_string()]);
        let what = format!("se-probe stream in {}/{}", pod.namespace, pod.name);
        Ok(Stream {
            process: Background::spawn(cmd, &out, what)?,
        })
    }

    fn ext_log_path(&self) -> PathBuf {
        self.dir.join("ext-seen.log")
    }

    /// Every source address the external server has seen, oldest first.
    pub fn ext_seen(&self) -> Result<Vec<Ipv4Addr>> {
        let path = self.ext_log_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(anyhow!(e).context(format!("cannot read {}", path.display()))),
        };
        text.lines()
            .map(|l| {
                l.parse()
                    .with_context(|| format!("odd line {l:?} in {}", path.display()))
            })
            .collect()
    }

    // ---- nodes ----------------------------------------------------------------------------

    /// Sets `rp_filter` on the node's `all`, `default` and uplink.
    pub fn set_rp_filter(&mut self, node: &str, value: u8) -> Result<()> {
        ensure!(value <= 2, "rp_filter {value} is not 0, 1 or 2");
        let index = self
            .nodes
            .iter()
            .position(|n| n.name == node)
            .ok_or_else(|| anyhow!("the lab has no node {node}"))?;
        let lab_node = &mut self.nodes[index];
        let devices = ["all", "default", lab_node.uplink.as_str()];
        write_sysctls(&lab_node.netns, &rp_filter_settings(&devices, value))?;
        lab_node.rp_filter = value;
        Ok(())
    }

    /// Writes `/proc/sys/<key>` inside `netns`; `key` in path form, e.g.
    /// `net/ipv4/conf/eth0/rp_filter`.
    pub fn set_sysctl(&self, netns: &str, key: &str, value: &str) -> Result<()> {
        write_sysctls(netns, &[(key.to_owned(), value.to_owned())])
    }

    /// Brings an interface up or down, e.g. a node's uplink to cut it off.
    pub fn set_link(&self, netns: &str, interface: &str, up: bool) -> Result<()> {
        ip([
            "-n",
            netns,
            "link",
            "set",
            "dev",
            interface,
            if up { "up" } else { "down" },
        ])?;
        Ok(())
    }

    /// Cuts `node` off the segment, or connects it again, at the router's side of its cable:
    /// the node keeps its addresses and routes, as when a switch port or cable fails.
    pub fn cut_off(&self, node: &str, cut: bool) -> Result<()> {
        let port = self.node(node)?.router_port.clone();
        self.set_link(&self.router_netns, &port, !cut)
    }

    pub fn snapshot(&self, node: &str) -> Result<NodeSnapshot> {
        NodeSnapshot::take(&self.node(node)?.netns)
    }

    // ---- objects --------------------------------------------------------------------------

    pub fn objects(&self) -> &Objects {
        &self.objects
    }

    /// Changes take effect for the agents at the next [`write_objects`](Self::write_objects).
    pub fn objects_mut(&mut self) -> &mut Objects {
        &mut self.objects
    }

    /// The file given to the agents with `--from-file`.
    pub fn objects_path(&self) -> &Path {
        &self.objects_path
    }

    /// Writes the objects file atomically; returns its digest.
    pub fn write_objects(&self) -> Result<String> {
        self.objects.write(&self.objects_path)
    }

    /// Changes the objects and writes the file; returns its digest.
    pub fn update_objects(&mut self, change: impl FnOnce(&mut Objects)) -> Result<String> {
        change(&mut self.objects);
        self.write_objects()
    }

    /// Digest of the objects file as it is on disk, as the agent computes it.
    pub fn objects_digest(&self) -> Result<String> {
        let bytes = std::fs::read(&self.objects_path)
            .with_context(|| format!("cannot read {}", self.objects_path.display()))?;
        Ok(digest(&bytes))
    }

    // ---- agents ---------------------------------------------------------------------------

    /// Starts `static-egress agent` for `node` in its namespace, output to a log file.
    pub fn start_agent<I, S>(&self, node: &str, extra_args: I) -> Result<AgentHandle>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.start_agent_with_env(node, extra_args, &[])
    }

    /// Like [`start_agent`](Self::start_agent), with extra environment variables (say a
    /// `PATH` that puts a stand-in for a tool first).
    pub fn start_agent_with_env<I, S>(
        &self,
        node: &str,
        extra_args: I,
        env: &[(&str, &OsStr)],
    ) -> Result<AgentHandle>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut args = vec![
            OsString::from("--from-file"),
            self.objects_path.clone().into(),
        ];
        args.extend(extra_args.into_iter().map(|a| a.as_ref().to_owned()));
        self.spawn_agent(node, &args, env)
    }

    /// Starts the agent for `node` in cluster mode: objects come from the API server that
    /// `kubeconfig` names instead of the objects file.
    pub fn start_agent_with_kubeconfig(
        &self,
        node: &str,
        kubeconfig: &Path,
        extra_args: &[&str],
    ) -> Result<AgentHandle> {
        let args: Vec<OsString> = extra_args.iter().map(OsString::from).collect();
        self.spawn_agent(node, &args, &[("KUBECONFIG", kubeconfig.as_os_str())])
    }

    fn spawn_agent(
        &self,
        node: &str,
        args: &[OsString],
        env: &[(&str, &OsStr)],
    ) -> Result<AgentHandle> {
        let node = self.node(node)?;
        let bin = self.agent_bin()?;
        let log = self
            .dir
            .join(&node.name)
            .join(format!("agent.{}.log", self.next_run()));
        let mut cmd = netns_command(&node.netns, [bin.as_os_str()]);
        cmd.args(["agent", "--node", &node.name])
            .arg("--state-dir")
            .arg(&node.state_dir)
            .arg("--bpffs")
            .arg(&node.bpffs)
            .args(args)
            .envs(env.iter().copied());
        let what = format!("agent on {}", node.name);
        Ok(AgentHandle {
            process: Background::spawn(cmd, &log, what)?,
            node: node.name.clone(),
        })
    }

    /// Runs `static-egress cleanup` for `node` in its namespace; returns its stdout.
    pub fn cleanup(&self, node: &str) -> Result<String> {
        self.cleanup_with(node, std::iter::empty::<&str>())
    }

    /// [`cleanup`](Self::cleanup) with more flags (`--cni-conf-dir DIR`, ...).
    pub fn cleanup_with<I, S>(&self, node: &str, extra_args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let node = self.node(node)?;
        let bin = self.agent_bin()?;
        let mut argv: Vec<std::ffi::OsString> = [
            bin.as_os_str(),
            OsStr::new("cleanup"),
            OsStr::new("--state-dir"),
            node.state_dir.as_os_str(),
            OsStr::new("--bpffs"),
            node.bpffs.as_os_str(),
        ]
        .iter()
        .map(|a| a.to_os_string())
        .collect();
        argv.extend(extra_args.into_iter().map(|a| a.as_ref().to_os_string()));
        exec(&node.netns, argv)
    }

    /// The `applied_digest` of the node's `status.json`, if the agent wrote one.
    pub fn applied_digest(&self, node: &str) -> Result<Option<String>> {
        let path = self.node(node)?.status_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(anyhow!(e).context(format!("cannot read {}", path.display()))),
        };
        // A status file caught mid-write by a non-atomic writer reads as "nothing applied yet".
        let status: serde_json::Value = match serde_json::from_str(&text) {
            Ok(status) => status,
            Err(_) => return Ok(None),
        };
        Ok(status
            .get("applied_digest")
            .and_then(|d| d.as_str())
            .map(str::to_owned))
    }

    /// Waits until the node's agent reports the current objects file as applied.
    pub fn wait_applied(&self, node: &str, timeout: Duration) -> Result<()> {
        let want = self.objects_digest()?;
        let deadline = Instant::now() + timeout;
        loop {
            let have = self.applied_digest(node)?;
            if have.as_deref() == Some(want.as_str()) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let status = std::fs::read_to_string(self.node(node)?.status_path())
                    .unwrap_or_else(|e| format!("<{e}>"));
                bail!(
                    "agent on {node} did not apply objects {want} within {timeout:?} \
                     (status.json: {})",
                    status.trim()
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    // ---- lifetime -------------------------------------------------------------------------

    /// Leaves the lab running (processes included) and returns how to remove it later.
    pub fn keep(mut self) -> Result<Kept> {
        let script_path = self.dir.join("teardown.sh");
        std::fs::write(&script_path, script(&self.prefix, &self.dir))
            .with_context(|| format!("cannot write {}", script_path.display()))?;
        if let Some(server) = self.ext_server.take() {
            server.detach();
        }
        self.armed = false;
        Ok(Kept {
            prefix: self.prefix.clone(),
            dir: self.dir.clone(),
            script: script_path,
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        drop(self.ext_server.take());
        if let Err(e) = teardown(&self.prefix, &self.dir) {
            eprintln!("netlab: {e:#}");
        }
    }
}

/// The packets of every `counter` in `nft -j` output.
fn counted_packets(json: &Value) -> u64 {
    match json {
        Value::Object(map) => map
            .iter()
            .map(|(key, value)| match (key.as_str(), value.get("packets")) {
                ("counter", Some(packets)) => packets.as_u64().unwrap_or(0),
                _ => counted_packets(value),
            })
            .sum(),
        Value::Array(items) => items.iter().map(counted_packets).sum(),
        _ => 0,
    }
}

/// A bridge whose link-layer address stays what it is when ports join: left to itself, a
/// bridge takes the lowest of its ports' addresses, so a host added to a running lab now and
/// then changed it, and the neighbours' cached address for the bridge's IP went nowhere.
fn add_bridge(netns: &str, name: &str) -> Result<()> {
    ip_in(netns, &format!("link add {name} type bridge"))?;
    let shown = ip_in(netns, &format!("-br link show {name}"))?;
    let mac = shown
        .split_whitespace()
        .nth(2)
        .with_context(|| format!("no address for bridge {name} in: {shown}"))?;
    ip_in(netns, &format!("link set {name} address {mac}"))?;
    Ok(())
}

/// The pod's address (the result's first IPv4 one) and the node side of its veth (the one
/// interface of the result outside the sandbox that is not the bridge).
fn plugin_wiring(result: &Value) -> Result<(Ipv4Addr, String)> {
    let list = |key: &str| {
        result
            .get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
    };
    let address = list("ips")
        .filter_map(|ip| ip.get("address")?.as_str()?.parse::<Ipv4Net>().ok())
        .map(|net| net.addr())
        .next()
        .ok_or_else(|| anyhow!("the CNI result has no IPv4 address: {result}"))?;
    let host_veth = list("interfaces")
        .filter(|i| {
            i.get("sandbox")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
        })
        .filter_map(|i| i.get("name")?.as_str())
        .find(|name| *name != CniPlugin::BRIDGE)
        .ok_or_else(|| anyhow!("the CNI result has no node-side interface: {result}"))?;
    Ok((address, host_veth.to_owned()))
}

/// What a runtime does after a failed ADD: DEL (with the result, if the plugins gave one), and
/// the sandbox's namespace goes. Returns the ADD's error, with the DEL's if that failed too.
fn undo_attach(
    host: cni::Host<'_>,
    conflist: &Value,
    sandbox: &Sandbox,
    result: Option<&Value>,
    error: anyhow::Error,
) -> anyhow::Error {
    let deleted = cni::del(host, conflist, sandbox, result);
    let _ = kill_namespace_processes(&sandbox.netns);
    let _ = ip(["netns", "del", &sandbox.netns]);
    let error = error.context(format!(
        "ADD of pod {}/{} (sandbox {}) on {}",
        sandbox.pod_namespace, sandbox.pod_name, sandbox.container_id, host.netns
    ));
    match deleted {
        Ok(()) => error,
        Err(del) => anyhow!("{error:#}; the DEL that followed failed too: {del:#}"),
    }
}

/// `ip -n NETNS <command>`, the command split at spaces: every name in it was checked to have
/// none, which keeps the topology code readable.
/// The router's end of its link to the external host.
const ROUTER_EXT: &str = "ext0";

fn ip_in(netns: &str, command: &str) -> Result<String> {
    ip(["-n", netns].into_iter().chain(command.split_whitespace()))
}
