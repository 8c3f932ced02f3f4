//! Routes, rules and addresses through rtnetlink: the uplink, the pod interfaces (found by
//! from the main table, or by asking the kernel for the route to a pod the table does not
//! settle), our rule and table, and the egress IPs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};

use futures_util::TryStreamExt as _;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::{
    AddressFamily,
    address::{AddressAttribute, AddressMessage},
    link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourExtFlags, NeighbourMessage, NeighbourState,
    },
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteScope, RouteType},
    rule::{RuleAction, RuleAttribute, RuleMessage},
};
use rtnetlink::{Handle, IpVersion};

use super::routes::{self, Hop};
use super::rule::{self, Next, Removal};
use super::{DatapathError, RuleSpec};

const MAIN_TABLE: u32 = RouteHeader::RT_TABLE_MAIN as u32;

/// A network interface of this namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    pub mtu: Option<u32>,
    pub up: bool,
    /// One end of a veth pair (a routed pod's, when the pod has the other).
    pub veth: bool,
}

impl From<LinkMessage> for Interface {
    fn from(msg: LinkMessage) -> Self {
        let mut iface = Interface {
            index: msg.header.index,
            name: String::new(),
            mac: None,
            mtu: None,
            up: msg.header.flags.contains(LinkFlags::Up),
            veth: false,
        };
        for attr in msg.attributes {
            match attr {
                LinkAttribute::IfName(name) => iface.name = name,
                LinkAttribute::Address(bytes) => iface.mac = bytes.try_into().ok(),
                LinkAttribute::Mtu(mtu) => iface.mtu = Some(mtu),
                LinkAttribute::LinkInfo(infos) => {
                    iface.veth = infos
                        .iter()
                        .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)));
                }
                _ => {}
            }
        }
        iface
    }
}

pub struct Netlink {
    handle: Handle,
}

fn nl(what: &'static str) -> impl FnOnce(rtnetlink::Error) -> DatapathError {
    move |source| DatapathError::Netlink { what, source }
}

impl Netlink {
    /// Opens a netlink socket; the connection task runs on the current tokio runtime.
    pub fn connect() -> Result<Self, DatapathError> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(DatapathError::NetlinkSocket)?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    pub async fn interface(&self, index: u32) -> Result<Option<Interface>, DatapathError> {
        let mut links = self.handle.link().get().match_index(index).execute();
        match links.try_next().await {
            Ok(Some(msg)) => Ok(Some(msg.into())),
            Ok(None) => Ok(None),
            // The kernel answers ENODEV for an index that does not exist.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(nl("get link")(e)),
        }
    }

    pub async fn interface_index(&self, name: &str) -> Result<Option<u32>, DatapathError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.try_next().await {
            Ok(found) => Ok(found.map(|m| m.header.index)),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(nl("get link")(e)),
        }
    }

    /// The interface holding `ip` (the node's InternalIP lives on the uplink).
    pub async fn interface_with_address(&self, ip: Ipv4Addr) -> Result<Option<u32>, DatapathError> {
        let addrs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_address_filter(IpAddr::V4(ip))
            .execute()
            .try_collect()
            .await
            .map_err(nl("get addresses"))?;
        Ok(addrs.first().map(|a| a.header.index))
    }

    /// The output interface of the kernel's route to `ip`, as `ip route get` would say.
    pub async fn route_oif(&self, ip: Ipv4Addr) -> Result<Option<u32>, DatapathError> {
        Ok(self.route_to(ip).await?.map(|(oif, _)| oif))
    }

    /// The output interface and the gateway, if any, of the kernel's route to `ip`.
    pub async fn route_to(
        &self,
        ip: Ipv4Addr,
    ) -> Result<Option<(u32, Option<Ipv4Addr>)>, DatapathError> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        msg.header.destination_prefix_length = 32;
        msg.attributes
            .push(RouteAttribute::Destination(RouteAddress::Inet(ip)));
        let mut answers = self.handle.route().get(msg).execute();
        match answers.try_next().await {
            Ok(Some(route)) => {
                let gateway = route.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Gateway(RouteAddress::Inet(gw)) => Some(*gw),
                    _ => None,
                });
                Ok(route_oif(&route).map(|oif| (oif, gateway)))
            }
            Ok(None) => Ok(None),
            // Unreachable, prohibit and blackhole routes (CNIs put one on a node's pod CIDR)
            // answer with an error: no interface leads to the address.
            Err(rtnetlink::Error::NetlinkError(e))
                if [
                    libc::ENETUNREACH,
                    libc::EHOSTUNREACH,
                    libc::EACCES,
                    libc::EINVAL,
                ]
                .contains(&-e.raw_code()) =>
            {
                Ok(None)
            }
            Err(e) => Err(nl("get route")(e)),
        }
    }

    /// The main table's IPv4 routes, for answering "which interface leads to this pod" without
    /// asking the kernel once per pod.
    pub async fn main_table(&self) -> Result<Vec<routes::Route>, DatapathError> {
        Ok(self
            .table_routes(MAIN_TABLE)
            .await?
            .iter()
            .map(|r| {
                let hop = match (r.header.kind, route_oif(r)) {
                    (RouteType::Unicast, Some(oif)) => Hop::Out(oif),
                    (RouteType::Unreachable | RouteType::BlackHole | RouteType::Prohibit, _) => {
                        Hop::Nowhere
                    }
                    _ => Hop::Ask,
                };
                (destination(r), metric(r), hop)
            })
            .collect())
    }

    /// Every interface's name, by index.
    pub async fn interfaces(&self) -> Result<HashMap<u32, Interface>, DatapathError> {
        let links: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl("dump links"))?;
        Ok(links
            .into_iter()
            .map(|msg| (msg.header.index, Interface::from(msg)))
            .collect())
    }

    pub async fn table_routes(&self, table: u32) -> Result<Vec<RouteMessage>, DatapathError> {
        let mut filter = RouteMessage::default();
        filter.header.address_family = AddressFamily::Inet;
        let all: Vec<RouteMessage> = self
            .handle
            .route()
            .get(filter)
            .execute()
            .try_collect()
            .await
            .map_err(nl("dump routes"))?;
        Ok(all
            .into_iter()
            .filter(|r| route_table(r) == table)
            .collect())
    }

    /// Makes `table` hold what [`table_routes_for`] says, from the main table as it is now.
    pub async fn sync_table(
        &self,
        table: u32,
        uplink: u32,
        via: Option<Ipv4Addr>,
        tunnel: Option<(u32, &[Ipv4Net])>,
    ) -> Result<(), DatapathError> {
        let main = self.table_routes(MAIN_TABLE).await?;
        let wanted = table_routes_for(main, table, uplink, via, tunnel);
        self.replace_table(table, &wanted).await
    }

    /// Makes `table` hold exactly a route to each of `ips` out of `device`.
    pub async fn sync_host_routes(
        &self,
        table: u32,
        device: u32,
        ips: &std::collections::BTreeSet<Ipv4Addr>,
    ) -> Result<(), DatapathError> {
        let wanted: Vec<RouteMessage> = ips
            .iter()
            .map(|ip| through(Ipv4Net::from(*ip), device, table))
            .collect();
        self.replace_table(table, &wanted).await
    }

    /// Makes `table` hold exactly `wanted`.
    async fn replace_table(
        &self,
        table: u32,
        wanted: &[RouteMessage],
    ) -> Result<(), DatapathError> {
        // Replacing first: a default route that changes gateway is swapped in place, so marked
        // packets never find the table without one.
        // Keyed once each: a table holds a route per other node's pods, and comparing every
        // pair grew with the square of the nodes.
        let current: HashSet<RouteKey> = self
            .table_routes(table)
            .await?
            .iter()
            .map(route_key)
            .collect();
        for route in wanted {
            if !current.contains(&route_key(route)) {
                self.handle
                    .route()
                    .add(route.clone())
                    .replace()
                    .execute()
                    .await
                    .map_err(nl("add route"))?;
            }
        }
        let wanted: HashSet<RouteKey> = wanted.iter().map(route_key).collect();
        for route in self.table_routes(table).await? {
            if !wanted.contains(&route_key(&route)) {
                self.handle
                    .route()
                    .del(route)
                    .execute()
                    .await
                    .map_err(nl("delete route"))?;
            }
        }
        Ok(())
    }

    /// Creates our tunnel device (VXLAN, collect-metadata, on UDP `port`, no ARP, `mac`,
    /// `mtu`) unless it exists, and brings it up; its index.
    pub async fn ensure_vxlan(
        &self,
        name: &str,
        port: u16,
        mac: [u8; 6],
        mtu: u32,
    ) -> Result<u32, DatapathError> {
        if let Some(index) = self.interface_index(name).await? {
            match self.tunnel_port(index).await? {
                Some(found) if found == port => {}
                // Ours, from a run with another `--tunnel-port`: left as it is, the kernel's
                // side of the tunnel (GRO aggregates, fragments) would listen on the old port
                // while the programs send to the new one.
                Some(found) => {
                    // The old device goes only once the new one can have its port: a port
                    // another device holds would leave no tunnel at all.
                    if std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))
                        .is_err_and(|e| e.kind() == std::io::ErrorKind::AddrInUse)
                    {
                        return Err(DatapathError::TunnelPortTaken(port));
                    }
                    tracing::info!(
                        device = name,
                        old = found,
                        port,
                        "tunnel device made again for another port"
                    );
                    self.remove_tunnel(name).await?;
                }
                None => return Err(DatapathError::TunnelNameTaken(name.to_owned())),
            }
        }
        if self.interface_index(name).await?.is_none() {
            let message = rtnetlink::LinkMessageBuilder::<rtnetlink::LinkVxlan>::new(name)
                .port(port)
                .learning(false)
                // Optional for VXLAN over IPv4: the inner packet has its own checksums, and
                // computing the outer one costs every tunneled packet.
                .udp_csum(false)
                .collect_metadata(true)
                .arp(false)
                .address(mac.to_vec())
                .mtu(mtu)
                .build();
            self.handle
                .link()
                .add(message)
                .execute()
                .await
                .map_err(nl("add tunnel device"))?;
        }
        let index = self
            .interface_index(name)
            .await?
            .ok_or_else(|| DatapathError::Netlink {
                what: "find the tunnel device just created",
                source: rtnetlink::Error::RequestFailed,
            })?;
        let iface = self.interface(index).await?;
        if iface.as_ref().and_then(|i| i.mtu) != Some(mtu) || !iface.is_some_and(|i| i.up) {
            let message = rtnetlink::LinkUnspec::new_with_index(index)
                .mtu(mtu)
                .up()
                .build();
            self.handle
                .link()
                .set(message)
                .execute()
                .await
                .map_err(|e| match e {
                    // The device binds its UDP port when it comes up.
                    rtnetlink::Error::NetlinkError(ref m) if m.raw_code() == -libc::EADDRINUSE => {
                        DatapathError::TunnelPortTaken(port)
                    }
                    e => nl("set tunnel device up")(e),
                })?;
        }
        Ok(index)
    }

    /// The UDP port of the interface `index` if it is a collect-metadata VXLAN device (as ours
    /// are), `None` if it is anything else.
    async fn tunnel_port(&self, index: u32) -> Result<Option<u16>, DatapathError> {
        let mut links = self.handle.link().get().match_index(index).execute();
        let Some(msg) = links.try_next().await.map_err(nl("get link"))? else {
            return Ok(None);
        };
        let vxlan = msg.attributes.into_iter().find_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos.into_iter().find_map(|i| match i {
                LinkInfo::Data(InfoData::Vxlan(v)) => Some(v),
                _ => None,
            }),
            _ => None,
        });
        Ok(vxlan
            .filter(|v| v.contains(&InfoVxlan::CollectMetadata(true)))
            .and_then(|v| {
                v.into_iter().find_map(|i| match i {
                    InfoVxlan::Port(p) => Some(p),
                    _ => None,
                })
            }))
    }

    /// Deletes the tunnel device `name` if it exists and is one (a collect-metadata VXLAN
    /// device, as ours are): an interface of that name that is anything else is not ours.
    pub async fn remove_tunnel(&self, name: &str) -> Result<bool, DatapathError> {
        let Some(index) = self.interface_index(name).await? else {
            return Ok(false);
        };
        if self.tunnel_port(index).await?.is_none() {
            return Ok(false);
        }
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(nl("delete link"))?;
        Ok(true)
    }

    pub async fn flush_table(&self, table: u32) -> Result<(), DatapathError> {
        for route in self.table_routes(table).await? {
            self.handle
                .route()
                .del(route)
                .execute()
                .await
                .map_err(nl("delete route"))?;
        }
        Ok(())
    }

    async fn rules_at(&self, priority: u32) -> Result<Vec<RuleMessage>, DatapathError> {
        let rules: Vec<RuleMessage> = self
            .handle
            .rule()
            .get(IpVersion::V4)
            .execute()
            .try_collect()
            .await
            .map_err(nl("dump rules"))?;
        Ok(rules
            .into_iter()
            .filter(|r| r.attributes.contains(&RuleAttribute::Priority(priority)))
            .collect())
    }

    /// Ensures our rule exists at `spec`'s priority, leaving every other rule alone; extra
    /// copies of ours (two agents' races, a crash between add and record) are removed.
    pub async fn sync_rule(&self, spec: RuleSpec) -> Result<(), DatapathError> {
        let rules = self.rules_at(spec.priority).await?;
        let copies = rules.iter().filter(|r| rule::is_ours(r, spec)).count();
        if copies > 1 {
            // Down to none, which the delete of an extra copy cannot tell apart from one, then
            // added again below.
            self.remove_rule(spec).await?;
        }
        if copies != 1 {
            let mut add = self
                .handle
                .rule()
                .add()
                .v4()
                .priority(spec.priority)
                .fw_mark(spec.mark)
                .table_id(spec.table)
                .action(RuleAction::ToTable)
                // Not exclusive: the kernel would take someone else's rule with our mark and
                // table plus a selector of theirs for ours, and refuse the add.
                .replace();
            add.message_mut()
                .attributes
                .push(RuleAttribute::FwMask(spec.mark));
            add.execute().await.map_err(nl("add rule"))?;
        }
        Ok(())
    }

    /// Removes our rule (every copy), and nothing else: when a delete would hit someone
    /// else's rule first, ours stays and the answer says whose rule is in the way.
    pub async fn remove_rule(&self, spec: RuleSpec) -> Result<Removal, DatapathError> {
        let mut removed = 0;
        loop {
            let rules = self.rules_at(spec.priority).await?;
            match rule::next_deletion(&rules, spec) {
                Next::Nothing => return Ok(Removal::Removed(removed)),
                Next::Theirs(theirs) => return Ok(Removal::Blocked(rule::describe(theirs))),
                Next::Ours(ours) => {
                    match self.handle.rule().del(ours.clone()).execute().await {
                        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENOENT => {
                        }
                        other => other.map_err(nl("delete rule"))?,
                    }
                    removed += 1;
                }
            }
        }
    }

    /// Every IPv4 address on every interface of this namespace.
    pub async fn all_addresses(&self) -> Result<Vec<Ipv4Addr>, DatapathError> {
        let addrs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl("get addresses"))?;
        Ok(addrs
            .iter()
            .filter_map(|a| {
                a.attributes.iter().find_map(|attr| match attr {
                    AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                    _ => None,
                })
            })
            .collect())
    }

    /// The next hops of the main table's routes (the node's default gateway among them).
    pub async fn main_gateways(&self) -> Result<Vec<Ipv4Addr>, DatapathError> {
        Ok(self
            .table_routes(MAIN_TABLE)
            .await?
            .iter()
            .filter_map(|r| {
                r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Gateway(RouteAddress::Inet(ip)) => Some(*ip),
                    _ => None,
                })
            })
            .collect())
    }

    /// Addresses on `index`, only `ip` when given.
    async fn addresses(
        &self,
        index: u32,
        ip: Option<Ipv4Addr>,
    ) -> Result<Vec<AddressMessage>, DatapathError> {
        let mut request = self.handle.address().get().set_link_index_filter(index);
        if let Some(ip) = ip {
            request = request.set_address_filter(IpAddr::V4(ip));
        }
        request
            .execute()
            .try_collect()
            .await
            .map_err(nl("get addresses"))
    }

    /// IPv4 addresses with prefix length 32 on `index`.
    pub async fn host_addresses(&self, index: u32) -> Result<Vec<Ipv4Addr>, DatapathError> {
        Ok(self
            .addresses(index, None)
            .await?
            .iter()
            .filter(|a| a.header.prefix_len == 32)
            .filter_map(|a| {
                a.attributes.iter().find_map(|attr| match attr {
                    AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                    _ => None,
                })
            })
            .collect())
    }

    pub async fn add_address(&self, index: u32, ip: Ipv4Addr) -> Result<(), DatapathError> {
        match self
            .handle
            .address()
            .add(index, IpAddr::V4(ip), 32)
            .execute()
            .await
        {
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
            other => other.map_err(nl("add address")),
        }
    }

    pub async fn remove_address(&self, index: u32, ip: Ipv4Addr) -> Result<(), DatapathError> {
        let addrs = self.addresses(index, Some(ip)).await?;
        for addr in addrs.into_iter().filter(|a| a.header.prefix_len == 32) {
            match self.handle.address().del(addr).execute().await {
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EADDRNOTAVAIL => {}
                other => other.map_err(nl("delete address"))?,
            }
        }
        Ok(())
    }

    /// Asks the kernel to keep `ip` resolved on `index` (a "managed" neighbour). The uplink
    /// program hands packets to a holder's MAC; a packet that meets an unresolved neighbour
    /// there is queued and later sent along its original route, to the router.
    pub async fn keep_resolved(&self, index: u32, ip: Ipv4Addr) -> Result<(), DatapathError> {
        let mut add = self
            .handle
            .neighbours()
            .add(index, IpAddr::V4(ip))
            .state(NeighbourState::None);
        add.message_mut()
            .attributes
            .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
        add.replace().execute().await.map_err(nl("add neighbour"))
    }

    /// The link-layer addresses of `ips` that the neighbour table of `index` knows now (an
    /// entry being resolved, or failed, has none).
    pub async fn neighbour_macs(
        &self,
        index: u32,
        ips: &[Ipv4Addr],
    ) -> Result<BTreeMap<Ipv4Addr, [u8; 6]>, DatapathError> {
        let entries: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Inet)
            .execute()
            .try_collect()
            .await
            .map_err(nl("dump neighbours"))?;
        Ok(entries
            .into_iter()
            .filter(|n| n.header.ifindex == index)
            .filter(|n| {
                !matches!(
                    n.header.state,
                    NeighbourState::Incomplete | NeighbourState::Failed | NeighbourState::None
                )
            })
            .filter_map(|n| {
                let mut ip = None;
                let mut mac = None;
                for attr in n.attributes {
                    match attr {
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => ip = Some(a),
                        NeighbourAttribute::LinkLayerAddress(bytes) => mac = bytes.try_into().ok(),
                        _ => {}
                    }
                }
                Some((ip?, mac?))
            })
            .filter(|(ip, _)| ips.contains(ip))
            .collect())
    }

    pub async fn forget_neighbour(&self, index: u32, ip: Ipv4Addr) -> Result<(), DatapathError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.ifindex = index;
        msg.attributes
            .push(NeighbourAttribute::Destination(IpAddr::V4(ip).into()));
        match self.handle.neighbours().del(msg).execute().await {
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENOENT => Ok(()),
            other => other.map_err(nl("delete neighbour")),
        }
    }
}

fn route_table(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table))
}

/// Our table: the main table's unicast routes through `uplink`, so that marked packets leave
/// through it whatever other routes the node has. With `via`, the default route goes to that
/// node instead: the holder every local selected pod uses. With `tunnel`, the other nodes' pod
/// CIDRs go through that device (index, CIDRs): the way back for replies to pods whose packets
/// came through it. One route per destination: two (main's to one prefix at two metrics, or
/// main's beside the tunnel's) would replace each other at every write, and every other sync
/// would leave the wrong one.
fn table_routes_for(
    main: Vec<RouteMessage>,
    table: u32,
    uplink: u32,
    via: Option<Ipv4Addr>,
    tunnel: Option<(u32, &[Ipv4Net])>,
) -> Vec<RouteMessage> {
    let mut main: Vec<RouteMessage> = main
        .into_iter()
        .filter(|r| r.header.kind == RouteType::Unicast && route_oif(r) == Some(uplink))
        .collect();
    // The copies carry no metric: of several to one destination, the one main prefers.
    main.sort_by_key(|r| (destination(r), metric(r)));
    main.dedup_by_key(|r| destination(r));
    let mut wanted: Vec<RouteMessage> = main.into_iter().map(|r| retable(r, table)).collect();
    if let Some(holder) = via {
        wanted.retain(|r| r.header.destination_prefix_length != 0);
        wanted.push(default_via(holder, uplink, table));
    }
    if let Some((device, cidrs)) = tunnel {
        wanted.retain(|r| !cidrs.contains(&destination(r)));
        wanted.extend(cidrs.iter().map(|cidr| through(*cidr, device, table)));
    }
    wanted
}

/// Where a route leads (0.0.0.0/0 for a default route).
fn destination(route: &RouteMessage) -> Ipv4Net {
    let address = route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(*ip),
            _ => None,
        })
        .unwrap_or(Ipv4Addr::UNSPECIFIED);
    Ipv4Net::new(address, route.header.destination_prefix_length).unwrap_or_default()
}

/// A route's metric (0 when it has none).
fn metric(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Priority(p) => Some(*p),
            _ => None,
        })
        .unwrap_or(0)
}

fn route_oif(route: &RouteMessage) -> Option<u32> {
    route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

/// The attributes that say where a route leads; the rest (metrics, cache info) may differ
/// between a main-table route and our copy of it.
fn is_path(attr: &RouteAttribute) -> bool {
    matches!(
        attr,
        RouteAttribute::Destination(_) | RouteAttribute::Gateway(_) | RouteAttribute::Oif(_)
    )
}

/// `cidr` straight out of `device` (no next hop: the device does not resolve any). Marked as
/// a static route: routing daemons skip routes of no protocol (BIRD's `learn` does).
fn through(cidr: Ipv4Net, device: u32, table: u32) -> RouteMessage {
    let mut route = RouteMessage::default();
    route.header.address_family = AddressFamily::Inet;
    route.header.destination_prefix_length = cidr.prefix_len();
    route.header.kind = RouteType::Unicast;
    route.header.protocol = rtnetlink::packet_route::route::RouteProtocol::Static;
    route.header.scope = RouteScope::Link;
    route.header.table = u8::try_from(table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
    route.attributes = vec![
        RouteAttribute::Destination(RouteAddress::Inet(cidr.network())),
        RouteAttribute::Oif(device),
        RouteAttribute::Table(table),
    ];
    route
}

/// A copy of a main-table route for our table, keeping only what identifies the path.
fn retable(route: RouteMessage, table: u32) -> RouteMessage {
    let via_gateway = route
        .attributes
        .iter()
        .any(|a| matches!(a, RouteAttribute::Gateway(_)));
    let mut out = RouteMessage::default();
    out.header.address_family = AddressFamily::Inet;
    out.header.destination_prefix_length = route.header.destination_prefix_length;
    out.header.kind = RouteType::Unicast;
    out.header.protocol = route.header.protocol;
    out.header.scope = if via_gateway {
        RouteScope::Universe
    } else {
        RouteScope::Link
    };
    // Tables above 255 only fit the attribute; the header then says "see the attribute".
    out.header.table = u8::try_from(table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
    out.attributes = route.attributes.into_iter().filter(is_path).collect();
    out.attributes.push(RouteAttribute::Table(table));
    out
}

fn default_via(holder: Ipv4Addr, uplink: u32, table: u32) -> RouteMessage {
    let mut route = RouteMessage::default();
    route.header.address_family = AddressFamily::Inet;
    route.header.kind = RouteType::Unicast;
    route.header.scope = RouteScope::Universe;
    route.header.table = u8::try_from(table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
    route.attributes = vec![
        RouteAttribute::Gateway(RouteAddress::Inet(holder)),
        RouteAttribute::Oif(uplink),
        RouteAttribute::Table(table),
    ];
    route
}

/// Where a route leads, as two routes that lead to the same place have it alike: its prefix
/// length and its path attributes (see [`is_path`]), in order.
type RouteKey = (u8, Vec<String>);

fn route_key(r: &RouteMessage) -> RouteKey {
    let mut attrs: Vec<String> = r
        .attributes
        .iter()
        .filter(|a| is_path(a))
        .map(|a| format!("{a:?}"))
        .collect();
    attrs.sort();
    (r.header.destination_prefix_length, attrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPLINK: u32 = 2;
    const TABLE: u32 = 1490;

    fn route(cidr: &str, gateway: Option<&str>, oif: u32, metric: Option<u32>) -> RouteMessage {
        let cidr: Ipv4Net = cidr.parse().expect("cidr");
        let mut r = RouteMessage::default();
        r.header.address_family = AddressFamily::Inet;
        r.header.destination_prefix_length = cidr.prefix_len();
        r.header.kind = RouteType::Unicast;
        if cidr.prefix_len() > 0 {
            r.attributes
                .push(RouteAttribute::Destination(RouteAddress::Inet(
                    cidr.network(),
                )));
        }
        if let Some(gw) = gateway {
            r.attributes
                .push(RouteAttribute::Gateway(RouteAddress::Inet(
                    gw.parse().expect("gateway"),
                )));
        }
        r.attributes.push(RouteAttribute::Oif(oif));
        if let Some(m) = metric {
            r.attributes.push(RouteAttribute::Priority(m));
        }
        r
    }

    fn gateway_of(r: &RouteMessage) -> Option<Ipv4Addr> {
        r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => Some(*ip),
            _ => None,
        })
    }

    #[test]
    fn one_route_per_destination_the_one_main_prefers() {
        let main = vec![
            route("0.0.0.0/0", Some("10.99.0.254"), UPLINK, Some(200)),
            route("0.0.0.0/0", Some("10.99.0.1"), UPLINK, Some(100)),
            route("10.99.0.0/24", None, UPLINK, None),
            // Not through the uplink: not copied.
            route("10.244.1.2/32", None, 7, None),
        ];
        let ours = table_routes_for(main, TABLE, UPLINK, None, None);
        assert_eq!(ours.len(), 2);
        let default = ours
            .iter()
            .find(|r| destination(r).prefix_len() == 0)
            .expect("a default route");
        assert_eq!(gateway_of(default), Some("10.99.0.1".parse().expect("ip")));
    }

    #[test]
    fn the_tunnel_replaces_mains_route_to_another_nodes_pods() {
        let main = vec![
            route("0.0.0.0/0", Some("10.99.0.1"), UPLINK, None),
            route("10.244.2.0/24", Some("10.99.0.12"), UPLINK, None),
        ];
        let pods: Vec<Ipv4Net> = vec!["10.244.2.0/24".parse().expect("cidr")];
        let ours = table_routes_for(main, TABLE, UPLINK, None, Some((9, &pods)));
        let to_pods: Vec<&RouteMessage> =
            ours.iter().filter(|r| destination(r) == pods[0]).collect();
        assert_eq!(to_pods.len(), 1);
        assert_eq!(route_oif(to_pods[0]), Some(9));
        // With a single remote holder, the default route goes to it.
        let ours = table_routes_for(
            vec![route("0.0.0.0/0", Some("10.99.0.1"), UPLINK, None)],
            TABLE,
            UPLINK,
            Some("10.99.0.12".parse().expect("ip")),
            None,
        );
        assert_eq!(ours.len(), 1);
        assert_eq!(
            gateway_of(&ours[0]),
            Some("10.99.0.12".parse().expect("ip"))
        );
    }
}
