//! Map layouts shared by the kernel programs (`ebpf/`) and the agent.
//!
//! Addresses are stored as the four bytes seen on the wire reinterpreted as a native `u32`
//! (`u32::from_ne_bytes(ip.octets())`), so the kernel side compares them without byte swaps.
#![no_std]

/// The version of the maps' layouts: bumped whenever one changes, it names their pin directory
/// (`maps-v<N>`), so an upgraded agent creates maps of the new layout beside the old ones and
/// swaps programs over without a gap.
pub const MAPS_LAYOUT: u32 = 6;

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
    pub const LEASE: &str = "SE_LEASE";
    pub const HEARD: &str = "SE_HEARD";
    pub const PROBERS: &str = "SE_PROBERS";
    pub const PEERS: &str = "SE_PEERS";
    pub const SENDERS: &str = "SE_SENDERS";
    pub const PROG_POD_INGRESS: &str = "se_pod_ingress";
    pub const PROG_UPLINK_INGRESS: &str = "se_uplink_ingress";
    pub const PROG_UPLINK_EGRESS: &str = "se_uplink_egress";
    pub const PROG_TUNNEL_EGRESS: &str = "se_tunnel_egress";
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
    /// Nodes that probed this one, with when they last did (least recently used first out).
    pub const PROBERS: u32 = 16_384;
    /// The other nodes' pod CIDRs.
    pub const PEERS: u32 = 65_536;
    /// The other nodes' link-layer addresses on the uplink.
    pub const SENDERS: u32 = 16_384;
}

/// `SE_RANGES` value bit: the range is inside the cluster (pod CIDRs, node addresses,
/// `--cluster-cidr`s). Keyed by an LPM key over the IPv4 address alone.
pub const RANGE_CLUSTER: u8 = 1;
/// `SE_RANGES` value bit: another node's pod CIDR. A packet from there to outside the cluster
/// that arrives on the uplink is another node's pod's, on its way to an egress IP held here.
pub const RANGE_REMOTE_PODS: u8 = 2;
/// `SE_RANGES` value bit (on a /32): another node's address, the only sources whose tunnel
/// packets the programs take out of the tunnel themselves.
pub const RANGE_NODE: u8 = 4;

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
    /// Packets (and ARP answers) of an egress IP held here, dropped because the lease ran out.
    pub fenced: u64,
    /// Probes answered.
    pub probes: u64,
    /// Packets dropped because they came from a host that is not a cluster node: a pod's
    /// packet on its way out with a link-layer source that is not another node's (a host on
    /// the segment sending as a pod), or a tunnel packet from an address that is not.
    pub foreign: u64,
    /// Packets the programs put into the tunnel themselves (not left to the kernel's device).
    pub tunnel_out: u64,
    /// Packets the programs took out of the tunnel themselves.
    pub tunnel_in: u64,
}

/// `PodEntry::gateway` of a starting pod the agent holds: its CNI plugin announced it before
/// the agent could classify it, or before the holder of its egress IP could know its address.
/// Its packets to outside the cluster (no `RANGE_CLUSTER` in `SE_RANGES`) are dropped rather
/// than leave with the node's address; no gateway has this id.
pub const GATEWAY_HOLD: u32 = 0;

/// Value of `SE_PODS`, keyed by a local pod's IPv4 address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodEntry {
    /// Gateway id: key of `SE_GATEWAYS`, `SE_COUNTERS` and the first half of `SE_DESTS` keys.
    pub gateway: u32,
    /// The egress IP this pod leaves with: key of `SE_EGRESS`.
    pub egress_ip: u32,
    /// The interface the node routes the pod's address to (its veth, or the bridge it sits
    /// behind): where the fast path hands the pod its replies (see [`CONFIG_FAST_PATH`]).
    pub ifindex: u32,
    /// `POD_*` bits.
    pub flags: u32,
}

/// `PodEntry::flags`: `ifindex` is the node's end of a veth pair whose other end is the pod's:
/// the fast path puts a reply straight into the pod (`bpf_redirect_peer`), past the veth.
pub const POD_VETH: u32 = 1;

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
/// `EgressEntry::flags` with `EGRESS_LOCAL`: the address is announced otherwise than by ARP
/// (BGP, or by the operator), so this node's ARP answers for it are dropped.
pub const EGRESS_QUIET: u32 = 8;
/// `EgressEntry::flags`: packets go to the holder through the tunnel (see [`tunnel`]).
pub const EGRESS_TUNNEL: u32 = 4;
/// `EgressEntry::flags` with `EGRESS_TUNNEL`: the holder is on the uplink's subnet, so the
/// outer packet goes to it as its next hop (no route looked up for every packet).
pub const EGRESS_ON_LINK: u32 = 16;
/// `EgressEntry::flags`: our routing table already sends packets to this holder (checked
/// against `holder_mac`: with our rule gone, they would go elsewhere), so the uplink's program
/// lets them go on as they are, or with `EGRESS_TUNNEL | EGRESS_ON_LINK` wrapped.
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
    /// This node's InternalIP: probes to it are answered by the uplink's ingress program.
    pub node_ip: u32,
    /// The UDP port of probes, in network byte order; 0 turns answering off.
    pub probe_port: u16,
    /// The tunnel's UDP port, in network byte order; 0 when this node has no tunnel.
    pub tunnel_port: u16,
    /// The interface index of this node's tunnel device (see [`tunnel`]); 0 when it has none.
    pub tunnel_ifindex: u32,
    /// The uplink's interface index: tunnel packets leave and arrive there.
    pub uplink_ifindex: u32,
    /// `CONFIG_*` bits.
    pub flags: u32,
}

/// `Config::flags`: the fast path. A selected pod's packet on its way to a holder elsewhere goes
/// from the pod's interface straight to the uplink (or into the tunnel), and the holder's reply
/// straight back to the pod: the origin's routing and netfilter never see either. Set only
/// while a pod of this node leaves through another node: elsewhere the programs would look
/// every packet up for nothing.
pub const CONFIG_FAST_PATH: u32 = 1;

/// The tunnel between nodes: VXLAN between node addresses, through which the origin sends a
/// selected pod's packet to a holder that pod-sourced packets cannot reach directly (an overlay
/// pod network, another subnet). The programs write and read its headers themselves; a VXLAN
/// device in collect-metadata mode on every node is where unwrapped packets come in, and
/// carries what the programs leave to it. The inner frame is addressed to [`tunnel::MAC`],
/// which every node's device has, so that the holder takes it in.
pub mod tunnel {
    /// The device's name.
    pub const DEVICE: &str = "se-tunnel";
    /// Locally administered, the same on every node.
    pub const MAC: [u8; 6] = [0x0a, 0x53, 0x45, 0x54, 0x55, 0x4e];
    /// The inner frames' source: any but [`MAC`], which the receiving device would take for
    /// its own frame come back (a loop) and drop.
    pub const SOURCE_MAC: [u8; 6] = [0x0a, 0x53, 0x45, 0x54, 0x55, 0x53];
    /// The device's own address (IPv4, link-local, the same on every node): the kernel checks
    /// a packet's source loosely only on a device that has an address (`rp_filter` 2), and a
    /// reply coming back through the tunnel has an outside source that routes elsewhere.
    pub const ADDRESS: [u8; 4] = [169, 254, 83, 69];
    /// The UDP port of `--tunnel-port` when none is given: not the CNIs' own VXLAN port
    /// (flannel and Cilium use 8472, Calico 4789).
    pub const DEFAULT_PORT: u16 = 8475;
    /// The VXLAN network identifier of our packets.
    pub const VNI: u32 = 0x5345;
    /// Outer IPv4 (20), UDP (8), VXLAN (8) and inner Ethernet (14) headers.
    pub const OVERHEAD: u32 = 50;

    /// A hash of the flow of the inner IPv4 packet whose header is `ip` and whose first four
    /// bytes after it are `ports` (addresses, protocol, and for TCP and UDP, but in
    /// fragments, the ports): the same for every packet of a flow, as the outer UDP source
    /// port must be for the fabric's ECMP to keep a flow on one path. The kernel's own
    /// (`bpf_get_hash_recalc`) dissects the packet and runs SipHash over what it found, which
    /// cost as much as the rest of the wrapping.
    pub fn flow_hash(ip: &[u8; 20], ports: u32) -> u32 {
        let src = u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]);
        let dst = u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]);
        let whole = ip[6] & 0x3f == 0 && ip[7] == 0;
        let ports = if ip[0] == 0x45 && whole && (ip[9] == 6 || ip[9] == 17) {
            ports
        } else {
            0
        };
        mix(src ^ dst.rotate_left(16) ^ ports.rotate_left(8) ^ u32::from(ip[9]))
    }

    /// Spreads every bit of `x` over the result (xor-shift, multiply, twice): flows one port
    /// apart get unrelated hashes.
    fn mix(mut x: u32) -> u32 {
        x ^= x >> 16;
        x = x.wrapping_mul(0x45d9_f3b5);
        x ^= x >> 15;
        x = x.wrapping_mul(0x2c1b_3c6d);
        x ^ (x >> 16)
    }
}

/// The single entry of `SE_LEASE`, written by the agent alone: until when this node may serve
/// its egress IPs. A node whose agent stops (killed, stuck, frozen) stops serving at
/// `expires_ns` on its own, and its probe answers say so, so another node takes over with no
/// two holders.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lease {
    /// `CLOCK_MONOTONIC` (`bpf_ktime_get_ns`) nanoseconds, as every time here.
    pub expires_ns: u64,
    /// Since when the lease has run without a break: probe answers carry for how long the
    /// node has served (from this or the end of its last cut-off, whichever is later), so that
    /// every node, the node itself included, counts a node that came back only after the
    /// rejoin time.
    pub since_ns: u64,
    /// Longer than this without a probe, and without an answer to its own probes, and the node
    /// was cut off from the nodes that probe it, who count it out: it stops serving until
    /// probes come again. 0 turns this off (no node, or a single one, probes this node: a lone
    /// peer's death looks the same; or no other node could take over).
    pub silence_ns: u64,
    /// A probe saying this node was counted out counts only if its sender has probed without
    /// a gap (none longer than `steady_ns`) for at least `isolated_ns`, long enough to count a
    /// node out from what it heard (this node's answers got lost), or this node heard no probe
    /// at all for longer than `isolated_ns` (it was the one cut off). A node that comes back
    /// from its own isolation says its peers were lost until it hears them again; that stale
    /// view is ignored.
    pub steady_ns: u64,
    pub isolated_ns: u64,
    /// `Heard::cut_offs` as of the agent's last plan: while the kernel counts more, the node
    /// was counted out by a peer since, and does not serve until its agent has planned with it.
    pub cut_offs_seen: u32,
    pub flags: u32,
}

/// `Lease::flags`: the node is handing its egress IPs over; it answers probes as draining,
/// and serves on until the lease runs out.
pub const LEASE_DRAINING: u32 = 1;

/// How far the kernel's coarse clock (`bpf_ktime_get_coarse_ns`) may lag its precise one: a
/// tick (4 ms at 250 Hz; 10 ms at the slowest tick rate), doubled for a tick that comes late.
pub const COARSE_LAG_NS: u64 = 20_000_000;

impl Lease {
    /// Whether this node may serve its egress IPs at `now`: its lease runs, no peer counted it
    /// out since its agent last planned, probes did not stop coming (it is not cut off right
    /// now), and it is not draining (then it serves, but says so). `probe::FENCED`,
    /// `probe::SERVING` or `probe::DRAINING`.
    pub fn state_at(&self, heard: &Heard, now: u64) -> u8 {
        if now >= self.expires_ns || heard.cut_offs != self.cut_offs_seen || self.silent(heard, now)
        {
            probe::FENCED
        } else if self.flags & LEASE_DRAINING != 0 {
            probe::DRAINING
        } else {
            probe::SERVING
        }
    }

    /// [`Lease::state_at`] the time now, from the coarse clock's reading `coarse` (at most
    /// [`COARSE_LAG_NS`] behind the time); `precise` reads the precise clock. Every packet
    /// leaving with an egress IP asks, and the precise clock's read of the clock source was
    /// half the run time of the holder's `se_uplink_egress` (115 ns per packet with it, 57
    /// without), so it is read only when the two ends of where the time may be give different
    /// answers: within the lag of a deadline. Fenced stays fenced as time goes on, so when both
    /// ends agree, every time between them gives the same answer.
    pub fn state(&self, heard: &Heard, coarse: u64, precise: impl FnOnce() -> u64) -> u8 {
        let early = self.state_at(heard, coarse);
        if early == self.state_at(heard, coarse.saturating_add(COARSE_LAG_NS)) {
            return early;
        }
        self.state_at(heard, precise())
    }

    /// Cut off at `now`: no probe came, and no answer to this node's own probes either. Probes
    /// that stop while answers still come mean the other agents are away (restarting), not this
    /// node: it serves on.
    pub fn silent(&self, heard: &Heard, now: u64) -> bool {
        self.silence_ns != 0
            && heard.last_request_ns != 0
            && now.saturating_sub(heard.last_request_ns) > self.silence_ns
            && now.saturating_sub(heard.last_reply_ns) > self.silence_ns
    }
}

/// The single entry of `SE_HEARD`, written by the kernel alone (the program answering probes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Heard {
    /// When the last probe came in.
    pub last_request_ns: u64,
    /// When a peer last said it had counted this node out (`probe::LOST`).
    pub cut_off_ns: u64,
    /// How many probes said so.
    pub cut_offs: u32,
    pub _reserved: u32,
    /// When the last answer to this node's own probes came in.
    pub last_reply_ns: u64,
}

/// A value of `SE_PROBERS` (key: the prober's address, network byte order), written by the
/// kernel: when that node last probed this one, and since when it has probed without a gap.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Prober {
    pub last_ns: u64,
    pub steady_since_ns: u64,
}

/// A probe between nodes: a UDP datagram of this payload to the node's InternalIP and the
/// probe port, answered by the node's uplink program (in the kernel, agent or not).
pub mod probe {
    /// `b"SEP1"`, as the first four payload bytes.
    pub const MAGIC: [u8; 4] = *b"SEP1";
    pub const LEN: usize = 16;
    /// Offsets in the payload.
    pub const KIND: usize = 4;
    pub const STATE: usize = 5;
    /// In a request: how the prober counts the node it asks (`HEARD` or `LOST`).
    pub const VIEW: usize = 6;
    pub const SEQ: usize = 8;
    /// In a reply: for how long the node has served without a break, in milliseconds (u32,
    /// network byte order, saturating).
    pub const UPTIME: usize = 12;
    pub const REQUEST: u8 = 1;
    pub const REPLY: u8 = 2;
    /// `STATE` of a reply: the lease has run out (or was never taken): not serving.
    pub const FENCED: u8 = 0;
    pub const SERVING: u8 = 1;
    pub const DRAINING: u8 = 2;
    /// `VIEW` of a request: the prober hears the node, or has not had its chance yet.
    pub const HEARD: u8 = 0;
    /// `VIEW` of a request: the prober heard nothing from the node for the silent time and
    /// counts it out; the node, hearing that, was cut off and does not serve until its agent
    /// has planned with it.
    pub const LOST: u8 = 1;
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
    unsafe impl aya::Pod for Lease {}
    unsafe impl aya::Pod for Heard {}
    unsafe impl aya::Pod for Prober {}
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// An IPv4 header from `src` to `dst` (last octets) of `protocol`, with flags and fragment
    /// offset `frag`.
    fn header(src: u8, dst: u8, protocol: u8, frag: [u8; 2]) -> [u8; 20] {
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[6..8].copy_from_slice(&frag);
        ip[9] = protocol;
        ip[12..16].copy_from_slice(&[10, 244, 1, src]);
        ip[16..20].copy_from_slice(&[203, 0, 113, dst]);
        ip
    }

    #[test]
    fn flows_a_port_apart_leave_on_outer_ports_spread_over_the_range() {
        // The outer source port keeps 14 bits of the hash: 4,096 connections from one pod to
        // one server, on consecutive source ports, as a busy client opens them.
        let mut seen = [0u64; 256];
        for port in 0..4096u32 {
            let ports = (40_000 + port).to_be() | 443u32.to_be() << 16;
            let bits = tunnel::flow_hash(&header(2, 10, 6, [0x40, 0]), ports) & 0x3fff;
            seen[bits as usize / 64] |= 1 << (bits % 64);
        }
        let distinct: u32 = seen.iter().map(|w| w.count_ones()).sum();
        // Thrown at random, 4,096 flows would land on about 3,620 of the 16,384 ports.
        assert!(
            distinct > 3_400,
            "only {distinct} outer ports for 4,096 flows"
        );
    }

    #[test]
    fn every_fragment_of_a_datagram_takes_the_same_path() {
        let ports = 5353u32.to_be() | 53u32.to_be() << 16;
        let first = tunnel::flow_hash(&header(2, 10, 17, [0x20, 0]), ports);
        // A later fragment has no ports: what follows its header is data.
        let later = tunnel::flow_hash(&header(2, 10, 17, [0, 0xb9]), 0xdead_beef);
        assert_eq!(first, later);
        // A whole datagram of the flow has its ports counted in: its own path.
        let whole = tunnel::flow_hash(&header(2, 10, 17, [0, 0]), ports);
        assert_ne!(whole, first);
        // Nor are ports read behind IP options.
        let mut options = header(2, 10, 17, [0, 0]);
        options[0] = 0x46;
        assert_eq!(
            tunnel::flow_hash(&options, ports),
            tunnel::flow_hash(&options, 0)
        );
    }

    fn lease() -> Lease {
        Lease {
            expires_ns: 10_000 * MS,
            silence_ns: 100 * MS,
            ..Lease::default()
        }
    }

    fn heard(at: u64) -> Heard {
        Heard {
            last_request_ns: at,
            last_reply_ns: at,
            ..Heard::default()
        }
    }

    #[test]
    fn away_from_its_deadlines_the_coarse_clock_decides_alone() {
        let (lease, heard) = (lease(), heard(1_000 * MS));
        let unread = || -> u64 { panic!("the precise clock was read") };
        assert_eq!(lease.state(&heard, 1_030 * MS, unread), probe::SERVING);
        assert_eq!(lease.state(&heard, 10_000 * MS, unread), probe::FENCED);
        let draining = Lease {
            flags: LEASE_DRAINING,
            ..lease
        };
        assert_eq!(draining.state(&heard, 1_030 * MS, unread), probe::DRAINING);
    }

    #[test]
    fn near_a_deadline_the_precise_clock_decides() {
        let lease = lease();
        // (last probe heard, coarse clock, precise clock, state): the coarse clock a tick
        // behind the lease's end, then behind the end of the silence time; the precise one
        // says whether it has passed.
        let cases = [
            (9_950, 9_995, 10_000, probe::FENCED),
            (9_950, 9_990, 9_995, probe::SERVING),
            (1_000, 1_095, 1_101, probe::FENCED),
            (1_000, 1_090, 1_099, probe::SERVING),
        ];
        for (at, coarse, precise, state) in cases {
            assert_eq!(
                lease.state(&heard(at * MS), coarse * MS, || precise * MS),
                state,
                "heard at {at} ms, clocks at {coarse} and {precise} ms"
            );
        }
    }

    #[test]
    fn silence_counts_only_without_probes_and_without_answers() {
        let lease = lease();
        let answered = Heard {
            last_reply_ns: 1_150 * MS,
            ..heard(1_000 * MS)
        };
        assert!(lease.silent(&heard(1_000 * MS), 1_101 * MS));
        assert!(!lease.silent(&answered, 1_200 * MS));
        assert!(!lease.silent(&heard(0), 5_000 * MS), "never probed");
    }
}
