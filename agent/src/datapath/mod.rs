//! Makes the kernel match a [`NodePlan`]: nftables table, egress addresses, policy routing,
//! BPF maps and TCX links, each brought to the plan by diffing what is there.

mod arp;
pub mod aws;
pub mod bpf;
mod config;
pub mod conntrack;
mod maps;
mod netlink;
pub mod nft;
mod ours;
mod routes;
mod rule;
mod state;
pub mod tunnel;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::path::PathBuf;

use static_egress_common::{Config, Guard, Heard, Lease};

use crate::model::Announce;
use crate::plan::{NodePlan, SnatPlan};
pub use bpf::{Bpf, Hook};
pub use config::{ConfigError, DatapathConfig, KernelLog, check_route_table, check_rule_priority};
pub use maps::{MapContents, PodLink};
use maps::{config_flags, map_contents, wire};
use netlink::Netlink;
pub use ours::ByName;
use routes::{Hop, MainTable};
use rule::Removal;
pub use state::{RuleSpec, State};

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("this binary was built without its eBPF programs; build it with `cargo xtask build`")]
    NoKernelObject,
    #[error("{0} is not a bpf filesystem; mount one with `mount -t bpf bpf {0}`")]
    NotBpffs(PathBuf),
    #[error("loading the eBPF object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("eBPF program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("the eBPF object has no program {0}")]
    MissingProgram(&'static str),
    #[error("the eBPF object has no map {0}")]
    MissingMap(&'static str),
    #[error("eBPF map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("attaching to interface {interface}: {source}")]
    Attach {
        interface: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("pinned link {path}: {source}")]
    Link {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Lock(#[from] crate::fsutil::LockError),
    #[error(
        "our rule fwmark {mark:#x}/{mark:#x} lookup {table} at priority {priority} stays: the \
         kernel would delete the rule `{theirs}` listed before it instead; move or remove that \
         rule, then run cleanup again"
    )]
    RuleInTheWay {
        priority: u32,
        mark: u32,
        table: u32,
        theirs: String,
    },
    #[error("opening a netlink socket: {0}")]
    NetlinkSocket(#[source] std::io::Error),
    #[error("netlink {what}: {source}")]
    Netlink {
        what: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("running nft: {0}")]
    NftSpawn(#[source] std::io::Error),
    #[error("nft refused our table: {0}")]
    Nft(String),
    #[error("Node {0} is missing from the objects or has no IPv4 InternalIP")]
    NoNodeIp(String),
    #[error("no interface holds this node's InternalIP {0}")]
    NoUplink(Ipv4Addr),
    #[error(
        "interface {0} exists and is not a VXLAN device of ours (collect-metadata); the tunnel \
         needs that name: remove or rename it"
    )]
    TunnelNameTaken(String),
    #[error(
        "the tunnel's UDP port {0} is taken on this node (another VXLAN device, such as the \
         CNI's own: flannel and Cilium use 8472, Calico 4789); choose another --tunnel-port, \
         the same on every node"
    )]
    TunnelPortTaken(u16),
    #[error("--announce-table and --route-table must be different tables, not both {0}")]
    SameTable(u32),
    #[error(transparent)]
    Aws(#[from] aws::AwsError),
    #[error("state file {path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl DatapathError {
    /// Which part of the data path failed, for the apply-error metric.
    pub fn step(&self) -> &'static str {
        match self {
            Self::NoKernelObject
            | Self::NotBpffs(_)
            | Self::Load(_)
            | Self::Program { .. }
            | Self::MissingProgram(_)
            | Self::MissingMap(_)
            | Self::Map { .. }
            | Self::Attach { .. }
            | Self::Link { .. } => "ebpf",
            Self::Io { .. } | Self::Lock(_) | Self::State { .. } => "state",
            Self::RuleInTheWay { .. } | Self::NetlinkSocket(_) | Self::Netlink { .. } => "routing",
            Self::NftSpawn(_) | Self::Nft(_) => "nftables",
            Self::NoNodeIp(_)
            | Self::NoUplink(_)
            | Self::SameTable(_)
            | Self::TunnelNameTaken(_)
            | Self::TunnelPortTaken(_) => "node",
            Self::Aws(_) => "cloud",
        }
    }
}

/// What a successful apply could not do, per object.
pub type Warnings = Vec<String>;

/// How much of the kernel an apply compares with the plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// What the plan changed, plus what is cheap to read back (rule, routes, addresses).
    Changes,
    /// Everything, to repair drift: also our nftables table and every TCX link.
    Everything,
}

/// Our nftables table: what the plan asked for, what went in, and how the kernel listed it
/// right after.
struct NftApplied {
    /// The script of the plan's SNAT, whether or not nftables took all of it.
    wanted: String,
    /// The SNAT in the kernel: the plan's, or with refused gateways' rules replaced by their
    /// last accepted version or left out.
    in_force: Vec<SnatPlan>,
    listing: Option<String>,
    /// The ruleset's generation read just before `listing`: while it stays, so does the table.
    generation: Option<u32>,
}

/// What an apply did beyond the plan.
#[derive(Debug, Default)]
pub struct Applied {
    /// Per object, what could not be done, and drift that was repaired.
    pub warnings: Warnings,
    /// Gateways whose SNAT nftables refused on this node, with why and what stands instead.
    pub refused: BTreeMap<String, String>,
    /// Something is still settling (a sender's link-layer address): apply again soon.
    pub incomplete: bool,
}

/// How long an apply waits for the senders' link-layer addresses, and how often it looks.
const RESOLVE_WAIT: std::time::Duration = std::time::Duration::from_millis(500);
const RESOLVE_POLL: std::time::Duration = std::time::Duration::from_millis(20);

pub struct Datapath {
    config: DatapathConfig,
    bpf: Bpf,
    nl: Netlink,
    state: State,
    nft: Option<NftApplied>,
    /// The egress IPs on the uplink now, for the repeated announcements of those just taken.
    held_now: tokio::sync::watch::Sender<BTreeSet<Ipv4Addr>>,
    /// The remapped connections of the other holders, restored on taking their egress IPs.
    handed_over: tokio::sync::watch::Receiver<conntrack::HandedOver>,
    /// Which holders packets reach through the tunnel.
    tunnels: tunnel::Tunnels,
    /// The egress IPs of `announce: Aws` gateways held here, in EC2.
    ec2: aws::Announced,
    /// The state dir is ours while the data path is: one agent per node and state dir.
    _lock: crate::fsutil::DirLock,
}

impl Datapath {
    /// Loads (or adopts) the kernel programs; changes nothing else yet.
    pub async fn open(config: DatapathConfig) -> Result<Self, DatapathError> {
        if config.announce_table == config.route_table {
            return Err(DatapathError::SameTable(config.route_table));
        }
        let ec2 = config.aws.clone().map(aws::Ec2::new).transpose()?;
        let lock = crate::fsutil::DirLock::acquire(&config.state_dir)?;
        let bpf = Bpf::load(&config.bpffs, config.kernel_log.level())?;
        let nl = Netlink::connect()?;
        let state = ours::starting_record(&config)?;
        Ok(Self {
            config,
            bpf,
            nl,
            state,
            nft: None,
            held_now: tokio::sync::watch::Sender::new(BTreeSet::new()),
            handed_over: tokio::sync::watch::channel(conntrack::HandedOver::new()).1,
            tunnels: tunnel::Tunnels::default(),
            ec2: aws::Announced::new(ec2),
            _lock: lock,
        })
    }

    /// The egress IPs held here, as each apply leaves them.
    pub fn held(&self) -> tokio::sync::watch::Receiver<BTreeSet<Ipv4Addr>> {
        self.held_now.subscribe()
    }

    /// Where the other holders' remapped connections come from.
    pub fn restore_from(
        &mut self,
        handed_over: tokio::sync::watch::Receiver<conntrack::HandedOver>,
    ) {
        self.handed_over = handed_over;
    }

    /// Our fwmark bit.
    pub fn mark(&self) -> u32 {
        self.config.fwmark
    }

    pub fn counters(&self) -> BTreeMap<u32, static_egress_common::Counters> {
        self.bpf.counters()
    }

    pub fn guard(&self) -> Guard {
        self.bpf.guard()
    }

    /// The lease the kernel serves by (see [`crate::membership`]).
    pub fn lease(&self) -> Lease {
        self.bpf.lease()
    }

    pub fn set_lease(&mut self, lease: Lease) -> Result<(), DatapathError> {
        self.bpf.set_lease(lease)
    }

    /// What the kernel saw of the probes to this node.
    pub fn heard(&self) -> Heard {
        self.bpf.heard()
    }

    /// How many of `nodes` have probed this node.
    pub fn probed_by(&self, nodes: &BTreeSet<Ipv4Addr>) -> usize {
        self.bpf
            .probers()
            .filter(|(ip, _)| nodes.contains(ip))
            .count()
    }

    /// Answers probes from now on, before the first plan: nodes that start together must
    /// hear each other at once, or each would count the others silent once it is done
    /// waiting for them, and take every egress IP for itself. Only the uplink's ingress
    /// program goes in, and the programs learn the node's address and the probe port; the
    /// rest waits for a plan. Nothing to do when an earlier agent's data path answers already.
    pub async fn answer_probes(&mut self, node_ip: Ipv4Addr) -> Result<(), DatapathError> {
        let config = self.bpf.config();
        let probe_port = self.config.probe_port.to_be();
        if config.node_ip == wire(node_ip) && config.probe_port == probe_port {
            return Ok(());
        }
        let uplink = self.interface_with(node_ip).await?;
        self.record(|s| s.uplink = Some(uplink.name.clone()))?;
        self.bpf.sync_links(
            Hook::UplinkIngress,
            &BTreeMap::from([(uplink.index, uplink.name)]),
        )?;
        self.bpf.set_config(Config {
            node_ip: wire(node_ip),
            probe_port,
            uplink_ifindex: uplink.index,
            ..config
        })
    }

    /// Brings the node to `plan`. Steps run in the order that keeps selected traffic from
    /// leaving with the node's address: NAT and addresses first, marking last; removals after,
    /// but for released egress IPs, whose addresses go right after their NAT.
    /// Drift found on the way (something of ours changed behind our back) is repaired and
    /// reported among the warnings.
    pub async fn apply(&mut self, plan: &NodePlan, check: Check) -> Result<Applied, DatapathError> {
        let mut applied = Applied::default();
        let uplink = self.uplink(plan).await?;
        let rule = self.config.rule();
        self.record(|s| {
            s.uplink = Some(uplink.name.clone());
            s.set_rule(rule);
        })?;

        // Until the rules of earlier settings are gone, packets may still carry their bits.
        let marks = self
            .state
            .retired
            .iter()
            .fold(rule.mark, |marks, r| marks | r.mark);
        let snat = self.not_taken_from_others(&plan.snat, &mut applied).await?;
        // The standby senders too: after a takeover their pods' first packets find them.
        let (mut macs, mut neighbours) = self
            .sender_macs(&uplink, &plan.senders, &mut applied)
            .await?;
        let standby = self
            .nl
            .neighbour_macs(uplink.index, &plan.standby_senders)
            .await?;
        let mut standby_on_link = Vec::new();
        for ip in &plan.standby_senders {
            if standby.contains_key(ip) || tunnel::on_link(&self.nl, &uplink, *ip).await? {
                standby_on_link.push(*ip);
            }
        }
        macs.extend(standby.into_values());
        self.bpf.sync_senders(&macs)?;
        // Every node has the tunnel's device: any may receive through it, as holder or as
        // origin of the replies.
        self.record(|s| s.tunnel = true)?;
        let tunnel_index = tunnel::device(&self.nl, &uplink, self.config.tunnel_port).await?;
        let tunneled = self
            .tunnels
            .choose(&self.nl, &uplink, plan, self.config.tunnel)
            .await?;
        let devices = nft::Devices {
            uplink: &uplink.name,
            tunnel: Some(nft::Tunnel {
                device: static_egress_common::tunnel::DEVICE,
                mark: rule.mark,
                mss: tunnel::mss(uplink.mtu.unwrap_or(1500)),
            }),
        };
        // Before the SNAT for an egress IP taken now goes in: from then on its entries are new.
        let present: BTreeSet<Ipv4Addr> = self
            .nl
            .host_addresses(uplink.index)
            .await?
            .into_iter()
            .collect();
        for taken in snat.iter().filter(|s| !present.contains(&s.egress_ip)) {
            let ip = taken.egress_ip;
            if let Err(e) = conntrack::forget_translated_to(ip) {
                applied.warnings.push(format!(
                    "forgetting connections translated to {ip} before taking it: {e}"
                ));
            }
            self.restore_remapped(taken, rule.mark, &mut applied.warnings);
        }
        let in_force = self.sync_nft(&snat, marks, devices, check, &mut applied)?;
        let warnings = &mut applied.warnings;
        // An address without its SNAT would only attract traffic this node cannot translate.
        let held: BTreeSet<Ipv4Addr> = in_force.iter().map(|s| s.egress_ip).collect();
        let announced = |how: fn(Announce) -> bool| -> BTreeSet<Ipv4Addr> {
            in_force
                .iter()
                .filter(|s| how(s.announce))
                .map(|s| s.egress_ip)
                .collect()
        };
        let by_arp = announced(|a| !a.quiet());
        self.hold_addresses(&uplink, &held, &present, &by_arp, warnings)
            .await?;
        // Released before the maps change: the kernel answers ARP for an address it has, and
        // the programs stop dropping those answers once the map no longer says the IP is held
        // here. Its SNAT is gone already, so nothing here still needs it.
        let released: Vec<Ipv4Addr> = self.state.addresses.difference(&held).copied().collect();
        self.held_now.send_replace(held.clone());
        for ip in released {
            self.nl.remove_address(uplink.index, ip).await?;
            tracing::info!(egress_ip = %ip, interface = %uplink.name, "released egress IP");
            self.record(|s| {
                s.addresses.remove(&ip);
            })?;
        }
        // Announced once held, withdrawn once released: the BGP daemon follows the table, EC2
        // the calls.
        let by_bgp = announced(|a| a == Announce::Bgp);
        self.announce(&uplink, &by_bgp).await?;
        self.ec2
            .sync(announced(|a| a == Announce::Aws), &self.held_now, warnings);

        self.nl.sync_rule(rule).await?;
        let via = routed_holder(plan, &tunneled);
        self.nl
            .sync_table(
                rule.table,
                uplink.index,
                via,
                Some((tunnel_index, &plan.remote_pod_cidrs)),
            )
            .await?;
        // The programs switch to our bit only once its rule and table are in place.
        self.bpf.set_config(Config {
            mark: rule.mark,
            node_ip: plan.node_ip.map(wire).unwrap_or_default(),
            probe_port: self.config.probe_port.to_be(),
            tunnel_port: self.config.tunnel_port.to_be(),
            tunnel_ifindex: tunnel_index,
            uplink_ifindex: uplink.index,
            flags: config_flags(plan, self.config.fast_path),
        })?;
        let holders = plan.remote_holders();
        // The nodes that would send here after a takeover too: it then finds their link-layer
        // addresses known instead of waiting for them (a cut-off holder's replacement waited up
        // to half a second).
        let direct = holders
            .iter()
            .filter(|h| !tunneled.contains(h) || via == Some(**h));
        for ip in direct.chain(&standby_on_link) {
            self.record(|s| {
                s.neighbours.insert(*ip);
            })?;
            self.nl.keep_resolved(uplink.index, *ip).await?;
            neighbours.insert(*ip);
        }

        let holder_macs = self
            .nl
            .neighbour_macs(uplink.index, &holders.iter().copied().collect::<Vec<_>>())
            .await?;
        let pod_links = self.pod_interfaces(plan, &uplink, warnings).await;
        self.bpf.sync_maps(&map_contents(
            plan,
            via,
            &holder_macs,
            &tunneled,
            &pod_links.of_pod,
        ))?;
        let pod_ifaces = pod_links.interfaces;
        // The uplink program first: a packet marked before it is in place would leave through
        // the router with the pod's address instead of going to the holder.
        let uplink_only = BTreeMap::from([(uplink.index, uplink.name.clone())]);
        let tunnel_only = BTreeMap::from([(
            tunnel_index,
            static_egress_common::tunnel::DEVICE.to_owned(),
        )]);
        let arriving: BTreeMap<u32, String> = uplink_only
            .clone()
            .into_iter()
            .chain(tunnel_only.clone())
            .collect();
        if check == Check::Everything {
            for (hook, interfaces) in [
                (Hook::UplinkEgress, &uplink_only),
                (Hook::UplinkIngress, &arriving),
                (Hook::TunnelEgress, &tunnel_only),
                (Hook::PodIngress, &pod_ifaces),
            ] {
                for name in self.bpf.forget_detached(hook, interfaces)? {
                    warnings.push(format!(
                        "our program was detached from {name}; attaching it again"
                    ));
                }
            }
        }
        self.bpf.sync_links(Hook::TunnelEgress, &tunnel_only)?;
        self.bpf.sync_links(Hook::UplinkEgress, &uplink_only)?;
        self.bpf.sync_links(Hook::UplinkIngress, &arriving)?;
        self.bpf.sync_links(Hook::PodIngress, &pod_ifaces)?;
        self.bpf.forget_old_maps()?;

        let unused: Vec<Ipv4Addr> = self
            .state
            .neighbours
            .difference(&neighbours)
            .copied()
            .collect();
        for ip in unused {
            self.nl.forget_neighbour(uplink.index, ip).await?;
            self.record(|s| {
                s.neighbours.remove(&ip);
            })?;
        }
        let retired: Vec<RuleSpec> = self.state.retired.iter().copied().collect();
        for old in retired {
            if let Removal::Blocked(theirs) = self.nl.remove_rule(old).await? {
                applied.warnings.push(format!(
                    "the rule of earlier settings (fwmark {:#x} lookup {} at priority {}) stays: \
                     deleting it would delete this rule of someone else's instead: {theirs}",
                    old.mark, old.table, old.priority
                ));
                continue;
            }
            if old.table != rule.table {
                self.nl.flush_table(old.table).await?;
            }
            tracing::info!(
                priority = old.priority,
                mark = format_args!("{:#x}", old.mark),
                table = old.table,
                "removed the rule and table of earlier settings"
            );
            self.record(|s| {
                s.retired.remove(&old);
            })?;
        }
        Ok(applied)
    }

    /// `snat` without the egress IPs this node must not take: an address it already has that
    /// is not ours, or the next hop of one of its routes (its default gateway, say). Holding
    /// one would answer ARP for another host and cut the node, or the segment, off from it.
    async fn not_taken_from_others(
        &self,
        snat: &[SnatPlan],
        applied: &mut Applied,
    ) -> Result<Vec<SnatPlan>, DatapathError> {
        if snat.is_empty() {
            return Ok(Vec::new());
        }
        let addresses: BTreeSet<Ipv4Addr> = self.nl.all_addresses().await?.into_iter().collect();
        let next_hops: BTreeSet<Ipv4Addr> = self.nl.main_gateways().await?.into_iter().collect();
        let mut kept = Vec::with_capacity(snat.len());
        for rule in snat {
            let ip = rule.egress_ip;
            let why = if next_hops.contains(&ip) {
                "a next hop of this node's routes (its gateway)"
            } else if addresses.contains(&ip) && !self.state.addresses.contains(&ip) {
                "already an address of this node, not one the agent added"
            } else {
                kept.push(rule.clone());
                continue;
            };
            let message = format!("egress IP {ip} is {why}; this node does not take it");
            applied
                .warnings
                .push(format!("EgressGateway {}: {message}", rule.gateway));
            applied.refused.insert(rule.gateway.clone(), message);
        }
        Ok(kept)
    }

    /// The link-layer addresses of the nodes on the uplink's subnet that send this node packets
    /// to translate, as the uplink's neighbour table has them, and those nodes. A sender
    /// without one yet gets a managed entry (the kernel resolves it and keeps it resolved) and
    /// a short wait; if it is still unknown, its pods' packets are dropped here until the next
    /// apply, which comes soon. A sender behind a router is none of these: its packets come
    /// through the tunnel.
    async fn sender_macs(
        &mut self,
        uplink: &netlink::Interface,
        senders: &[Ipv4Addr],
        applied: &mut Applied,
    ) -> Result<(BTreeSet<[u8; 6]>, BTreeSet<Ipv4Addr>), DatapathError> {
        let mut known = self.nl.neighbour_macs(uplink.index, senders).await?;
        let mut on_link: BTreeSet<Ipv4Addr> = known.keys().copied().collect();
        let mut missing = Vec::new();
        for ip in senders.iter().filter(|ip| !known.contains_key(ip)) {
            // Only a node on the uplink's subnet sends here with its own link-layer address;
            // the others' packets come through the tunnel, where their outer source is checked
            // instead, and asking the segment for their addresses would go unanswered.
            if tunnel::on_link(&self.nl, uplink, *ip).await? {
                missing.push(*ip);
                on_link.insert(*ip);
            }
        }
        if !missing.is_empty() {
            for ip in &missing {
                self.record(|s| {
                    s.neighbours.insert(*ip);
                })?;
                self.nl.keep_resolved(uplink.index, *ip).await?;
            }
            let deadline = tokio::time::Instant::now() + RESOLVE_WAIT;
            while missing.iter().any(|ip| !known.contains_key(ip))
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(RESOLVE_POLL).await;
                known = self.nl.neighbour_macs(uplink.index, senders).await?;
            }
            for ip in missing.iter().filter(|ip| !known.contains_key(ip)) {
                applied.warnings.push(format!(
                    "node {ip} does not answer ARP on {}: packets of its pods are not \
                     translated here until it does",
                    uplink.name
                ));
                applied.incomplete = true;
            }
        }
        Ok((known.into_values().collect(), on_link))
    }

    /// Replaces our table when the plan's SNAT changed or, when checking everything, when the
    /// kernel's copy is no longer what it was right after we sent it. When nftables refuses
    /// the table, each gateway's rules are checked alone: a refused gateway keeps the rules
    /// nftables last accepted for it on this node (or has none), and the others go in.
    /// Returns the SNAT in force.
    fn sync_nft(
        &mut self,
        snat: &[SnatPlan],
        marks: u32,
        devices: nft::Devices<'_>,
        check: Check,
        applied: &mut Applied,
    ) -> Result<Vec<SnatPlan>, DatapathError> {
        let wanted = nft::render(snat, marks, devices);
        let mut previous = self.nft.take();
        if let Some(before) = &mut previous
            && before.wanted == wanted
        {
            let unchanged = match check {
                Check::Changes => true,
                Check::Everything => {
                    let generation = nft::generation().ok();
                    if generation.is_some() && generation == before.generation {
                        true
                    } else {
                        // Some table changed, maybe another's: ours is compared whole.
                        let same = nft::list()? == before.listing;
                        if same {
                            before.generation = generation;
                        }
                        same
                    }
                }
            };
            if unchanged {
                let in_force = before.in_force.clone();
                self.nft = previous;
                return Ok(in_force);
            }
            applied.warnings.push(format!(
                "our nftables table {} was changed or removed by someone else; restoring it",
                nft::TABLE
            ));
        }
        let in_force = match nft::apply(&wanted) {
            Ok(()) => snat.to_vec(),
            Err(whole) => {
                let last = previous.as_ref().map_or(&[][..], |p| p.in_force.as_slice());
                let mut refused = BTreeMap::new();
                let in_force = without_refused(snat, marks, devices, last, &mut refused);
                if refused.is_empty() {
                    // Not one gateway's doing: keep the last good table whole.
                    self.nft = previous;
                    return Err(whole);
                }
                for (gateway, why) in refused {
                    applied
                        .warnings
                        .push(format!("EgressGateway {gateway}: {why}"));
                    applied.refused.insert(gateway, why);
                }
                if let Err(error) = nft::apply(&nft::render(&in_force, marks, devices)) {
                    self.nft = previous;
                    return Err(error);
                }
                in_force
            }
        };
        let generation = nft::generation().ok();
        self.nft = Some(NftApplied {
            wanted,
            listing: nft::list()?,
            generation,
            in_force: in_force.clone(),
        });
        Ok(in_force)
    }

    /// Makes `--announce-table` hold a route to each egress IP in `ips` through the uplink, for
    /// the node's BGP daemon to announce; a table of earlier settings is flushed.
    async fn announce(
        &mut self,
        uplink: &netlink::Interface,
        ips: &BTreeSet<Ipv4Addr>,
    ) -> Result<(), DatapathError> {
        let table = self.config.announce_table;
        if let Some(old) = self.state.announce_table.filter(|t| *t != table) {
            self.nl.flush_table(old).await?;
        }
        if ips.is_empty() && self.state.announce_table.is_none() {
            return Ok(());
        }
        self.record(|s| s.announce_table = Some(table))?;
        self.nl.sync_host_routes(table, uplink.index, ips).await
    }

    /// The interface holding this node's InternalIP.
    async fn uplink(&self, plan: &NodePlan) -> Result<netlink::Interface, DatapathError> {
        let node_ip = plan
            .node_ip
            .ok_or_else(|| DatapathError::NoNodeIp(plan.node.clone()))?;
        self.interface_with(node_ip).await
    }

    async fn interface_with(&self, ip: Ipv4Addr) -> Result<netlink::Interface, DatapathError> {
        let index = self
            .nl
            .interface_with_address(ip)
            .await?
            .ok_or(DatapathError::NoUplink(ip))?;
        self.nl
            .interface(index)
            .await?
            .ok_or(DatapathError::NoUplink(ip))
    }

    /// Changes the record of what we created, writing it only when it changed.
    fn record(&mut self, change: impl FnOnce(&mut State)) -> Result<(), DatapathError> {
        let before = self.state.clone();
        change(&mut self.state);
        if self.state != before {
            self.state.save(&self.config.state_dir)?;
        }
        Ok(())
    }

    /// Restores the connections the last holder of `taken` translated to other ports than
    /// their own (see [`crate::source::flows`]): only those of pods it translates.
    fn restore_remapped(&self, taken: &SnatPlan, mark: u32, warnings: &mut Warnings) {
        let ip = taken.egress_ip;
        let flows: Vec<conntrack::Remapped> = self
            .handed_over
            .borrow()
            .get(&ip)
            .into_iter()
            .flatten()
            .filter(|f| taken.pods.binary_search(f.source.ip()).is_ok())
            .copied()
            .collect();
        match conntrack::restore(ip, &flows, mark) {
            Ok(0) => {}
            Ok(restored) => {
                tracing::info!(egress_ip = %ip, restored, "restored remapped connections of the last holder");
            }
            Err(e) => warnings.push(format!(
                "restoring the remapped connections of {ip}'s last holder: {e}"
            )),
        }
    }

    /// Adds the held egress IPs that are not `present` on the uplink (recorded first) and
    /// announces them.
    async fn hold_addresses(
        &mut self,
        uplink: &netlink::Interface,
        held: &BTreeSet<Ipv4Addr>,
        present: &BTreeSet<Ipv4Addr>,
        by_arp: &BTreeSet<Ipv4Addr>,
        warnings: &mut Warnings,
    ) -> Result<(), DatapathError> {
        for ip in held.difference(present) {
            self.record(|s| {
                s.addresses.insert(*ip);
            })?;
            self.nl.add_address(uplink.index, *ip).await?;
            tracing::info!(egress_ip = %ip, interface = %uplink.name, "holding egress IP");
            if let Some(mac) = uplink.mac.filter(|_| by_arp.contains(ip)) {
                if let Err(e) = arp::announce(uplink.index, mac, *ip) {
                    warnings.push(format!("gratuitous ARP for {ip} on {}: {e}", uplink.name));
                }
                tokio::spawn(arp::repeat(
                    uplink.index,
                    mac,
                    *ip,
                    self.held_now.subscribe(),
                ));
            }
        }
        Ok(())
    }

    /// The interfaces the kernel routes the local selected and held pods to. A pod without one
    /// is reported and left unmarked; the others are still served.
    async fn pod_interfaces(
        &self,
        plan: &NodePlan,
        uplink: &netlink::Interface,
        warnings: &mut Warnings,
    ) -> PodLinks {
        let mut found = PodLinks::default();
        // Without the dumps every pod is asked about on its own: slower, same answers.
        let table = match self.nl.main_table().await {
            Ok(routes) => MainTable::new(routes),
            Err(e) => {
                tracing::debug!(error = %e, "cannot dump the main table; asking per pod");
                MainTable::default()
            }
        };
        let links = self.nl.interfaces().await.unwrap_or_else(|e| {
            tracing::debug!(error = %e, "cannot list the interfaces; asking per pod");
            HashMap::new()
        });
        let pods = plan.pods.iter().map(|p| (&p.namespace, &p.name, p.ip));
        let held = plan.held.iter().map(|p| (&p.namespace, &p.name, p.ip));
        for (namespace, pod_name, ip) in pods.chain(held) {
            let oif = match table.lookup(ip) {
                Some(Hop::Out(index)) => Ok(Some(index)),
                Some(Hop::Nowhere) => Ok(None),
                Some(Hop::Ask) | None => self.nl.route_oif(ip).await,
            };
            let iface = match oif {
                Ok(Some(index)) if index != uplink.index => match links.get(&index) {
                    Some(link) => Ok(Some(link.clone())),
                    None => self.nl.interface(index).await,
                },
                Ok(_) => Ok(None),
                Err(e) => Err(e),
            };
            match iface {
                Ok(Some(iface)) => {
                    found.of_pod.insert(
                        ip,
                        PodLink {
                            ifindex: iface.index,
                            veth: iface.veth,
                        },
                    );
                    found.interfaces.insert(iface.index, iface.name);
                }
                Ok(None) => warnings.push(format!(
                    "Pod {namespace}/{pod_name}: no local interface routes to its IP {ip}; its \
                     traffic is not marked"
                )),
                Err(e) => warnings.push(format!(
                    "Pod {namespace}/{pod_name}: looking up the interface of {ip}: {e}; its \
                     traffic is not marked"
                )),
            }
        }
        found
    }
}

/// Where the local selected and held pods are.
#[derive(Default)]
struct PodLinks {
    /// The interfaces the programs watch (index -> name).
    interfaces: BTreeMap<u32, String>,
    /// Each pod's interface, by its address.
    of_pod: HashMap<Ipv4Addr, PodLink>,
}

/// `snat` with each gateway whose rules nftables refuses on their own replaced by its rules in
/// `last` (what the kernel had), or left out; `refused` says which, why, and what stands.
fn without_refused(
    snat: &[SnatPlan],
    marks: u32,
    devices: nft::Devices<'_>,
    last: &[SnatPlan],
    refused: &mut BTreeMap<String, String>,
) -> Vec<SnatPlan> {
    let mut in_force = Vec::with_capacity(snat.len());
    for rule in snat {
        let Err(error) = nft::check(&nft::render(std::slice::from_ref(rule), marks, devices))
        else {
            in_force.push(rule.clone());
            continue;
        };
        let kept = last
            .iter()
            .find(|l| l.gateway == rule.gateway && l.egress_ip == rule.egress_ip);
        let outcome = match kept {
            Some(_) => "keeping its last accepted SNAT",
            None => "it has no SNAT on this node",
        };
        refused.insert(
            rule.gateway.clone(),
            format!(
                "nftables refused the SNAT for {} ({error}); {outcome}",
                rule.egress_ip
            ),
        );
        in_force.extend(kept.cloned());
    }
    in_force
}

/// `CLOCK_MONOTONIC`, the kernel programs' clock (`bpf_ktime_get_ns`), in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or_default() * 1_000_000_000
        + u64::try_from(ts.tv_nsec).unwrap_or_default()
}

/// The holder our table routes to: the single remote holder, directly or, when it is on the
/// uplink's subnet, through the tunnel too (the uplink's program then wraps a packet addressed
/// to it and lets it go on: the outer packet has the same next hop). A tunneled holder behind
/// a router is not: the packet it would be routed to is not the outer packet's next hop.
pub fn routed_holder(plan: &NodePlan, tunneled: &tunnel::Tunneled) -> Option<Ipv4Addr> {
    single_remote_holder(plan).filter(|h| !tunneled.contains(h) || tunneled.on_link.contains(h))
}

/// The node that holds the egress IPs of every local selected pod, when there is exactly one
/// and it is not this node: our table can then route to it directly, and the uplink program
/// leaves those packets alone, or wraps them for the tunnel and lets them go on (one pass
/// through the egress path instead of two). Not while this node holds an egress IP itself:
/// other nodes' pods' packets, marked on arrival, must find the way out in our table.
pub fn single_remote_holder(plan: &NodePlan) -> Option<Ipv4Addr> {
    if !plan.snat.is_empty() {
        return None;
    }
    let holder_of: BTreeMap<Ipv4Addr, &crate::plan::Holder> = plan
        .gateways
        .iter()
        .flat_map(|g| g.egress.iter())
        .filter_map(|e| Some((e.ip, e.holder.as_ref()?)))
        .collect();
    // Pods whose egress IP this node holds need the table's own default route: one holder
    // for every pod, and not this node, or nothing.
    let holders: BTreeSet<(&str, Ipv4Addr)> = plan
        .pods
        .iter()
        .filter_map(|p| holder_of.get(&p.egress_ip))
        .map(|h| (h.node.as_str(), h.node_ip))
        .collect();
    match holders.into_iter().collect::<Vec<_>>().as_slice() {
        [(node, ip)] if *node != plan.node => Some(*ip),
        _ => None,
    }
}

/// Removes everything an agent recorded in `state_dir`, our nftables table and our pins under
/// `bpffs` (which detaches our programs). Without a readable record (none, or a corrupt one,
/// which is set aside), it removes what is ours by name instead: also the rule and tables of
/// `by_name` (the agent's flags). Refuses while an agent (or another cleanup) holds the state
/// dir. Returns whether anything was there.
pub async fn cleanup(
    state_dir: &std::path::Path,
    bpffs: &std::path::Path,
    by_name: ByName,
) -> Result<bool, DatapathError> {
    ours::cleanup(state_dir, bpffs, by_name).await
}
