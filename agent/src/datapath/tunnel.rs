//! How marked packets reach a holder that pod-sourced packets cannot reach directly. Direct:
//! the origin hands the packet, with its pod's source address, to the holder's link-layer
//! address on the uplink. Tunnel: it goes inside a VXLAN packet between the two nodes'
//! addresses, which any fabric carries (an overlay pod network, nodes on other subnets, a cloud
//! that drops pod-sourced packets), and the holder sends the replies back the same way, so that
//! they arrive on a device of ours whatever the CNI does with pod traffic between nodes.
//!
//! This kernel has VXLAN devices (also in collect-metadata mode, which eBPF addresses per
//! packet with `bpf_skb_set_tunnel_key`) but no GRE, IPIP, Geneve or WireGuard: the tunnel is
//! VXLAN, and one device per node, [`tunnel::DEVICE`], is where its packets come out. Our
//! programs wrap and unwrap them themselves: `se_uplink_egress` (a local pod's packet) and
//! `se_tunnel_egress` (a reply routed into the device) write the outer headers and hand the
//! packet to the uplink; `se_uplink_ingress` unwraps what other nodes send and hands the inner
//! packet to the device's ingress, where the same program marks what comes from other nodes'
//! pods, as on the uplink. The kernel's device does the rest (GRO aggregates, which this kernel
//! cannot unwrap right from eBPF; packets too large to wrap unfragmented), with the same bytes on
//! the wire.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use static_egress_common::tunnel;

use super::DatapathError;
use super::netlink::{Interface, Netlink};
use crate::plan::NodePlan;

/// `--tunnel`: when marked packets go to their holder through the tunnel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TunnelMode {
    /// Direct when the holder is on the uplink's subnet and this node routes the other nodes'
    /// pod CIDRs over the uplink (pod-sourced packets cross the fabric); tunnel otherwise.
    #[default]
    Auto,
    /// Always through the tunnel.
    Always,
    /// Never: the holder must be reachable with pod-sourced packets on the uplink's segment.
    Never,
}

/// What this node's routes say about reaching a holder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reach {
    /// The holder's address is on the uplink's subnet (no gateway on the way).
    pub on_link: bool,
    /// The other nodes' pod CIDRs are routed over the uplink: the pod network sends
    /// pod-sourced packets across the fabric, so the fabric carries them.
    pub pods_routed: bool,
}

impl TunnelMode {
    pub fn tunneled(self, reach: Reach) -> bool {
        match self {
            Self::Always => true,
            Self::Never => false,
            Self::Auto => !(reach.on_link && reach.pods_routed),
        }
    }
}

/// Which holders packets reach through the tunnel, as last chosen (to log changes).
#[derive(Debug, Default)]
pub struct Tunnels {
    last: BTreeSet<Ipv4Addr>,
}

/// The holders packets reach through the tunnel, and those of them on the uplink's subnet: the
/// outer packet goes to those as its next hop, without a route lookup per packet.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tunneled {
    pub holders: BTreeSet<Ipv4Addr>,
    pub on_link: BTreeSet<Ipv4Addr>,
}

impl Tunneled {
    pub fn contains(&self, holder: &Ipv4Addr) -> bool {
        self.holders.contains(holder)
    }
}

impl Tunnels {
    /// The other nodes holding egress IPs in `plan` that packets reach through the tunnel, as
    /// `mode` and this node's routes say; a change is logged.
    pub async fn choose(
        &mut self,
        nl: &Netlink,
        uplink: &Interface,
        plan: &NodePlan,
        mode: TunnelMode,
    ) -> Result<Tunneled, DatapathError> {
        let holders = plan.remote_holders();
        let mut tunneled = Tunneled::default();
        if !holders.is_empty() && mode != TunnelMode::Never {
            let pods_routed = pods_routed(nl, uplink, &plan.remote_pod_cidrs).await?;
            for holder in holders {
                let reach = Reach {
                    on_link: on_link(nl, uplink, holder).await?,
                    pods_routed,
                };
                if mode.tunneled(reach) {
                    tunneled.holders.insert(holder);
                    if reach.on_link {
                        tunneled.on_link.insert(holder);
                    }
                }
            }
        }
        if tunneled.holders != self.last {
            tracing::info!(tunneled = ?tunneled.holders, ?mode, "holders reached through the tunnel");
            self.last = tunneled.holders.clone();
        }
        Ok(tunneled)
    }
}

/// Whether `node` is on the uplink's subnet: the kernel's route to it has no gateway.
pub(super) async fn on_link(
    nl: &Netlink,
    uplink: &Interface,
    node: Ipv4Addr,
) -> Result<bool, DatapathError> {
    Ok(matches!(nl.route_to(node).await?, Some((oif, None)) if oif == uplink.index))
}

/// Whether this node routes the other nodes' pod CIDRs (`pod_cidrs`) over the uplink.
async fn pods_routed(
    nl: &Netlink,
    uplink: &Interface,
    pod_cidrs: &[ipnet::Ipv4Net],
) -> Result<bool, DatapathError> {
    for cidr in pod_cidrs {
        if nl.route_oif(cidr.network()).await? != Some(uplink.index) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Creates the tunnel device (or finds it) on UDP `port`, sized to fit in the uplink's MTU;
/// its interface index. What arrives on it has a source that routes elsewhere (another node's
/// pod, which the CNI routes; an outside address, for a reply), so the kernel checks sources
/// there loosely (`rp_filter` 2, which needs an address on the device: [`tunnel::ADDRESS`]),
/// and with their mark (`src_valid_mark`: our table routes the other nodes' pods through it).
pub async fn device(nl: &Netlink, uplink: &Interface, port: u16) -> Result<u32, DatapathError> {
    let mtu = uplink.mtu.unwrap_or(1500).saturating_sub(tunnel::OVERHEAD);
    let index = nl
        .ensure_vxlan(tunnel::DEVICE, port, tunnel::MAC, mtu)
        .await?;
    let address = Ipv4Addr::from(tunnel::ADDRESS);
    if !nl.host_addresses(index).await?.contains(&address) {
        nl.add_address(index, address).await?;
    }
    for (key, value) in [("rp_filter", "2"), ("src_valid_mark", "1")] {
        let path = format!("/proc/sys/net/ipv4/conf/{}/{key}", tunnel::DEVICE);
        if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == value) {
            continue;
        }
        std::fs::write(&path, value).map_err(|source| DatapathError::Io {
            path: path.into(),
            source,
        })?;
    }
    Ok(index)
}

/// The largest TCP segment that fits the tunnel: SYNs of tunneled connections are clamped to
/// it on the holder, both ways.
pub fn mss(uplink_mtu: u32) -> u32 {
    uplink_mtu.saturating_sub(tunnel::OVERHEAD + 40)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_tunnels_unless_the_holder_is_on_link_and_pods_are_routed() {
        let reach = |on_link, pods_routed| Reach {
            on_link,
            pods_routed,
        };
        assert!(!TunnelMode::Auto.tunneled(reach(true, true)));
        assert!(TunnelMode::Auto.tunneled(reach(false, true)));
        assert!(TunnelMode::Auto.tunneled(reach(true, false)));
        assert!(TunnelMode::Always.tunneled(reach(true, true)));
        assert!(!TunnelMode::Never.tunneled(reach(false, false)));
        assert_eq!(mss(1500), 1410);
        assert_eq!(mss(9000), 8910);
    }
}
