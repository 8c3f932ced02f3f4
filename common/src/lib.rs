//! Map layouts shared by the kernel programs (`ebpf/`) and the agent.
//!
//! Addresses are stored as the four bytes seen on the wire reinterpreted as a native `u32`
//! (`u32::from_ne_bytes(ip.octets())`), so the kernel side compares them without byte swaps.
#![no_std]

/// The version of the maps' layouts: bumped whenever one changes, it names their pin directory
/// (`maps-v<N>`), so an upgraded agent creates maps of the new layout beside the old ones and
/// swaps programs over without a gap.
pub const MAPS_LAYOUT: u32 = 2;

/// Names of the pinned maps and programs; the agent and the kernel objects agree on them.
pub mod names {
    pub const PODS: &str = "SE_PODS";
    pub const DESTS: &str = "SE_DESTS";
    pub const GATEWAYS: &str = "SE_GATEWAYS";
    pub const EGRESS: &str = "SE_EGRESS";
    pub const COUNTERS: &str = "SE_COUNTERS";
    pub const CONFIG: &str = "SE_CONFIG";
    pub const RANGES: &str = "SE_RANGES";
    pub const GUARD: &str = "SE_GUARD";
    pub const PROG_POD_INGRESS: &str = "se_pod_ingress";
    pub const PROG_UPLINK_INGRESS: &str = "se_uplink_ingress";
    pub const PROG_UPLINK_EGRESS: &str = "se_uplink_egress";
}

/// Capacities of the maps; the planner leaves out, in name order, the gateways that do not fit
/// (and the local pods beyond `PODS`).
pub mod capacity {
    pub const PODS: u32 = 65_536;
    pub const DESTS: u32 = 65_536;
    pub const GATEWAYS: u32 = 4_096;
    pub const EGRESS: u32 = 4_096;
    /// Cluster ranges: every node's pod CIDRs and address, and `--cluster-cidr`s.
    pub const RANGES: u32 = 65_536;
}

/// `SE_RANGES` value bit: the range is inside the cluster (pod CIDRs, node addresses,
/// `--cluster-cidr`s). Keyed by an LPM key over the IPv4 address alone.
pub const RANGE_CLUSTER: u8 = 1;
/// `SE_RANGES` value bit: another node's pod CIDR. A packet from there to outside the cluster
/// that arrives on the uplink is another node's pod's, on its way to an egress IP held here.
pub const RANGE_REMOTE_PODS: u8 = 2;

/// The single, per-CPU value of `SE_GUARD`: what the uplink programs did to keep selected
/// traffic from leaving with any address but its pod's own or an egress IP held here.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Guard {
    /// Packets of other nodes' pods to outside the cluster, marked on arrival.
    pub transit: u64,
    /// Marked packets about to leave with another source (a masquerade that got to them
    /// first, a missing SNAT): dropped.
    pub dropped: u64,
}

/// Value of `SE_PODS`, keyed by a local pod's IPv4 address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodEntry {
    /// Gateway id: key of `SE_GATEWAYS`, `SE_COUNTERS` and the first half of `SE_DESTS` keys.
    pub gateway: u32,
    /// The egress IP this pod leaves with: key of `SE_EGRESS`.
    pub egress_ip: u32,
}

/// Data part of the `SE_DESTS` longest-prefix-match key. The prefix length always covers all
/// of `gateway` (32 bits) plus the destination prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DestKey {
    pub gateway: u32,
    pub addr: u32,
}

/// Prefix bits of `DestKey` taken by the gateway id.
pub const DEST_GATEWAY_BITS: u32 = 32;
/// `SE_DESTS` value: the destination goes through the gateway.
pub const DEST_VIA_GATEWAY: u8 = 1;
/// `SE_DESTS` value: the destination is excluded and leaves as if unselected.
pub const DEST_EXCLUDED: u8 = 0;

/// Value of `SE_GATEWAYS`, keyed by gateway id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GatewayEntry {
    pub flags: u32,
}

/// `GatewayEntry::flags`: drop selected traffic while the pod's egress IP has no holder.
pub const GATEWAY_FAIL_CLOSED: u32 = 1;

/// Value of `SE_EGRESS`, keyed by egress IP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EgressEntry {
    /// Node IP of the holder; 0 when no node holds the address.
    pub holder: u32,
    pub flags: u32,
    /// The holder's link-layer address on the uplink, when known (all zero otherwise): with
    /// `EGRESS_ROUTED`, a packet on its way to any other is not on its way to the holder.
    pub holder_mac: [u8; 6],
    pub _reserved: [u8; 2],
}

/// `EgressEntry::flags`: this node holds the address, packets leave straight from the uplink.
pub const EGRESS_LOCAL: u32 = 1;
/// `EgressEntry::flags`: our routing table already sends packets to this holder (checked
/// against `holder_mac`: with our rule gone, they would go elsewhere).
pub const EGRESS_ROUTED: u32 = 2;

/// Per-CPU value of `SE_COUNTERS`, keyed by gateway id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    pub dropped: u64,
}

/// The single entry of the `SE_CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// The fwmark bit that sends a packet to our routing table (exactly one bit set).
    pub mark: u32,
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all types are `repr(C)`, `Copy`, made of integers and have no padding.
    unsafe impl aya::Pod for PodEntry {}
    unsafe impl aya::Pod for DestKey {}
    unsafe impl aya::Pod for GatewayEntry {}
    unsafe impl aya::Pod for EgressEntry {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for Guard {}
}
