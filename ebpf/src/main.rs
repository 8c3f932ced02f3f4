//! Kernel side of static-egress.
//!
//! `se_pod_ingress` runs at tc ingress of pod-facing interfaces: a packet from a selected pod
//! to one of its gateway's destinations gets our fwmark bit (policy routing then sends it out
//! of the uplink), or is dropped when the gateway fails closed and nobody holds its egress IP.
//! `se_uplink_egress` runs at tc egress of the uplink: a marked packet whose egress IP is held
//! by another node is handed to that node's MAC address (the routing table cannot tell
//! gateways apart, the program can).
//!
//! `se_uplink_ingress` runs at tc ingress of the uplink: a packet of another node's pod on its
//! way out of the cluster (to an egress IP held here) gets our bit too. Then one rule holds at
//! the uplink's egress, whatever nftables does or no longer does: a packet with our bit leaves
//! only with its pod's own address (to its holder) or an egress IP held here; with any other
//! source (a CNI's masquerade got to it because our SNAT is missing) it is dropped.
//!
//! With the fast path on (`CONFIG_FAST_PATH`), `se_pod_ingress` hands a selected pod's packet
//! for a holder elsewhere straight to the uplink (or wraps it for the tunnel) instead of marking
//! it, and `se_uplink_ingress` hands the holder's replies straight to the pod's interface: the
//! origin's routing, netfilter and conntrack see neither (nor does a NetworkPolicy enforced
//! there, which is why it is the operator's choice).
//!
//! All share their hook with other programs (a CNI's, a bandwidth manager's, a probe's, and
//! legacy tc filters after the TCX chain): every packet they neither drop nor redirect goes on
//! to the next program with `TCX_NEXT`, never `TCX_PASS`, which would end the chain.
#![no_std]
#![no_main]

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{
        BPF_ADJ_ROOM_ENCAP_L2_SHIFT, BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4,
        BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO, BPF_F_INGRESS,
        BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_SHOT, TC_ACT_UNSPEC, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
        bpf_fib_lookup, bpf_redir_neigh, bpf_tunnel_key,
    },
    helpers::generated::{
        bpf_check_mtu, bpf_fib_lookup as fib_lookup, bpf_get_prandom_u32, bpf_ktime_get_coarse_ns,
        bpf_ktime_get_ns, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer,
        bpf_skb_set_tunnel_key,
    },
    macros::{classifier, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, lpm_trie::Key},
    programs::TcContext,
};
use aya_log_ebpf::debug;
use static_egress_common::{
    CONFIG_FAST_PATH, Config, Counters, DEST_GATEWAY_BITS, DEST_VIA_GATEWAY, DestKey, EGRESS_LOCAL,
    EGRESS_ON_LINK, EGRESS_QUIET, EGRESS_ROUTED, EGRESS_TUNNEL, EgressEntry, GATEWAY_FAIL_CLOSED,
    GATEWAY_HOLD, GatewayEntry, Guard, Heard, Lease, POD_VETH, PodEntry, Prober, RANGE_CLUSTER,
    RANGE_NODE, RANGE_REMOTE_PODS, capacity, probe, tunnel,
};

#[map(name = "SE_PODS")]
static SE_PODS: HashMap<u32, PodEntry> = HashMap::pinned(capacity::PODS, 0);
#[map(name = "SE_DESTS")]
static SE_DESTS: LpmTrie<DestKey, u8> = LpmTrie::pinned(capacity::DESTS, 0);
#[map(name = "SE_GATEWAYS")]
static SE_GATEWAYS: HashMap<u32, GatewayEntry> = HashMap::pinned(capacity::GATEWAYS, 0);
#[map(name = "SE_EGRESS")]
static SE_EGRESS: HashMap<u32, EgressEntry> = HashMap::pinned(capacity::EGRESS, 0);
#[map(name = "SE_COUNTERS")]
static SE_COUNTERS: PerCpuHashMap<u32, Counters> = PerCpuHashMap::pinned(capacity::GATEWAYS, 0);
#[map(name = "SE_CONFIG")]
static SE_CONFIG: Array<Config> = Array::pinned(1, 0);
#[map(name = "SE_RANGES")]
static SE_RANGES: LpmTrie<u32, u8> = LpmTrie::pinned(capacity::RANGES, 0);
#[map(name = "SE_GUARD")]
static SE_GUARD: PerCpuArray<Guard> = PerCpuArray::pinned(1, 0);
#[map(name = "SE_LEASE")]
static SE_LEASE: Array<Lease> = Array::pinned(1, 0);
#[map(name = "SE_HEARD")]
static SE_HEARD: Array<Heard> = Array::pinned(1, 0);
/// Who probed this node (IPv4 address, network order) and when last: the agent turns the
/// silence fence on only once two nodes or more probe this one.
/// The other nodes' pod CIDRs (LPM over the IPv4 address), with each node's address (network
/// order): where the tunnel takes a reply to one of their pods.
#[map(name = "SE_PEERS")]
static SE_PEERS: LpmTrie<u32, u32> = LpmTrie::pinned(capacity::PEERS, 0);
/// The other nodes' link-layer addresses on the uplink: a pod's packet on its way out that
/// comes in on the uplink from any other host is not a node's (a host on the segment that sends
/// as a pod, to leave with the egress IP).
#[map(name = "SE_SENDERS")]
static SE_SENDERS: HashMap<[u8; 6], u8> = HashMap::pinned(capacity::SENDERS, 0);
#[map(name = "SE_PROBERS")]
static SE_PROBERS: LruHashMap<u32, Prober> = LruHashMap::pinned(capacity::PROBERS, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP_WIRE: u16 = 0x0800_u16.to_be();
const ETH_P_ARP_WIRE: u16 = 0x0806_u16.to_be();
/// The sender's protocol address in an Ethernet/IPv4 ARP packet.
const ARP_SPA_OFF: usize = ETH_HLEN + 14;
const IPPROTO_UDP: u8 = 17;
/// The UDP header and payload of a packet without IP options.
const UDP_OFF: usize = ETH_HLEN + 20;
const PAYLOAD_OFF: usize = UDP_OFF + 8;
const IP_SRC_OFF: usize = ETH_HLEN + 12;
const IP_DST_OFF: usize = ETH_HLEN + 16;
const AF_INET: u32 = 2;
// `uplink_egress` writes a `bpf_redir_neigh` as five words, `tunnel` a `bpf_tunnel_key` as
// eleven.
const _: () = assert!(size_of::<bpf_redir_neigh>() == 20);
const _: () = assert!(size_of::<bpf_tunnel_key>() == 44);
// `into_peer` writes a `bpf_fib_lookup` as sixteen words.
const _: () = assert!(size_of::<bpf_fib_lookup>() == 64);
/// The outer packet's TTL.
const TUNNEL_TTL: u32 = 64;
/// A tunneled frame's link-layer addresses: to the tunnel devices' shared MAC, which the other
/// end takes in, from another, or it would take the frame for its own come back.
const TUNNEL_MACS: [u8; 12] = {
    let mut macs = [0; 12];
    let mut i = 0;
    while i < 6 {
        macs[i] = tunnel::MAC[i];
        macs[i + 6] = tunnel::SOURCE_MAC[i];
        i += 1;
    }
    macs
};
/// `TC_ACT_UNSPEC` is what TCX calls `TCX_NEXT`: the next program (or legacy tc) decides.
const TCX_NEXT: i32 = TC_ACT_UNSPEC;

#[classifier]
pub fn se_pod_ingress(ctx: TcContext) -> i32 {
    pull_headers(&ctx);
    pod_ingress(&ctx).unwrap_or(TCX_NEXT)
}

#[classifier]
pub fn se_uplink_ingress(ctx: TcContext) -> i32 {
    if unwrapped_here(&ctx) {
        return TCX_NEXT;
    }
    if let Some(verdict) = answer_probe(&ctx) {
        return verdict;
    }
    if let Some(verdict) = decapsulate(&ctx) {
        return verdict;
    }
    if let Some(verdict) = SE_CONFIG.get(0).and_then(|c| fast_back(&ctx, c, false)) {
        return verdict;
    }
    uplink_ingress(&ctx).unwrap_or(TCX_NEXT)
}

#[classifier]
pub fn se_uplink_egress(ctx: TcContext) -> i32 {
    uplink_egress(&ctx).unwrap_or(TCX_NEXT)
}

/// The tunnel device is ours alone: a packet that has no node to go to is dropped (the device
/// could not send it anyway).
#[classifier]
pub fn se_tunnel_egress(ctx: TcContext) -> i32 {
    tunnel_egress(&ctx).unwrap_or(TC_ACT_SHOT)
}

/// A pod's packet whose headers are not where the programs read them directly (a packet
/// socket's, as trafgen sends them, has only its Ethernet header there) gets them pulled there
/// once, up to the ports: the stack's IPv4 receive would pull them next anyway (the fast path's
/// TTL write too), and until then every field read costs a `bpf_skb_load_bytes` call and copy.
fn pull_headers(ctx: &TcContext) {
    if ctx.data() + PAYLOAD_OFF > ctx.data_end() && ctx.len() as usize >= PAYLOAD_OFF {
        // On failure the reads take the helper's way, as before.
        let _ = ctx.pull_data(PAYLOAD_OFF as u32);
    }
}

/// `None` means "no verdict of ours": the packet goes on to the next program, marked or not.
fn pod_ingress(ctx: &TcContext) -> Option<i32> {
    let (src, dst) = ipv4_addrs(ctx)?;
    // SAFETY: entries are plain integers written whole by the agent.
    let pod = unsafe { SE_PODS.get(&src) }?;
    if pod.gateway == GATEWAY_HOLD {
        return hold(ctx, src, dst);
    }
    if !via_gateway(pod.gateway, dst) {
        return None;
    }
    let counters = SE_COUNTERS.get_ptr_mut(&pod.gateway);
    // SAFETY: as above.
    let Some(egress) = (unsafe { SE_EGRESS.get(&pod.egress_ip) }).filter(|e| e.holder != 0) else {
        // A gateway missing from the map is a transient state of an update: fail closed.
        // SAFETY: as above.
        let fail_closed = unsafe { SE_GATEWAYS.get(&pod.gateway) }
            .is_none_or(|g| g.flags & GATEWAY_FAIL_CLOSED != 0);
        if !fail_closed {
            return None;
        }
        if let Some(c) = counters {
            // SAFETY: per-CPU value, only this CPU writes it while we run.
            unsafe { (*c).dropped += 1 };
        }
        debug!(
            ctx,
            "no node holds egress IP {:i}: dropped {:i} -> {:i} (FailClosed)",
            u32::from_be(pod.egress_ip),
            u32::from_be(src),
            u32::from_be(dst)
        );
        return Some(TC_ACT_SHOT as i32);
    };
    if let Some(c) = counters {
        // SAFETY: per-CPU value, only this CPU writes it while we run.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(ctx.len());
        }
    }
    let config = SE_CONFIG.get(0)?;
    if config.flags & CONFIG_FAST_PATH != 0
        && let Some(verdict) = fast_out(ctx, config, egress)
    {
        return Some(verdict);
    }
    // SAFETY: `skb` is the live context pointer; other bits of the mark belong to others.
    let mark = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark(mark | config.mark);
    None
}

/// The fast path out: a selected pod's packet goes from its interface straight to the holder
/// of its egress IP on another node (through the tunnel when that is the way there), as the
/// origin's forwarding would send it, with its TTL one lower. `None` leaves it to the origin's
/// stack: held here (the SNAT is here), a TTL that ends here (the stack says so to the
/// sender), a packet too big for the uplink (the stack tells the sender or fragments it).
fn fast_out(ctx: &TcContext, config: &Config, egress: &EgressEntry) -> Option<i32> {
    if egress.flags & EGRESS_LOCAL != 0 || config.uplink_ifindex == 0 {
        return None;
    }
    let ttl = forwardable(ctx)?;
    if egress.flags & EGRESS_TUNNEL != 0 {
        let verdict = encapsulate(ctx, config, egress.holder, onward(egress))?;
        return Some(
            if decrement_ttl(ctx, ETH_HLEN + tunnel::OVERHEAD as usize, ttl) {
                verdict
            } else {
                TC_ACT_SHOT
            },
        );
    }
    let mut mtu = 0u32;
    // SAFETY: a plain helper call on the live context; `mtu` outlives it.
    let fits =
        unsafe { bpf_check_mtu(ctx.skb.skb.cast(), config.uplink_ifindex, &mut mtu, 0, 0) } == 0;
    if !fits {
        return None;
    }
    if !decrement_ttl(ctx, ETH_HLEN, ttl) {
        return Some(TC_ACT_SHOT);
    }
    Some(redirect_neigh(config.uplink_ifindex, egress.holder))
}

/// The fast path back: a reply from the holder of a local pod's egress IP (on the uplink from
/// the holder's link-layer address, or unwrapped from the tunnel, where only nodes send) to
/// that pod, from one of its gateway's destinations, goes straight to the pod's interface.
fn fast_back(ctx: &TcContext, config: &Config, tunneled: bool) -> Option<i32> {
    if config.flags & CONFIG_FAST_PATH == 0 {
        return None;
    }
    let (src, dst) = ipv4_addrs(ctx)?;
    // SAFETY: entries are plain integers written whole by the agent.
    let pod = unsafe { SE_PODS.get(&dst) }?;
    if pod.gateway == GATEWAY_HOLD || pod.ifindex == 0 {
        return None;
    }
    // SAFETY: as above.
    let egress = unsafe { SE_EGRESS.get(&pod.egress_ip) }?;
    if egress.holder == 0 || egress.flags & EGRESS_LOCAL != 0 {
        return None;
    }
    if !tunneled && read::<[u8; 6]>(ctx, 6)? != egress.holder_mac {
        return None;
    }
    if !via_gateway(pod.gateway, src) {
        return None;
    }
    let ttl = forwardable(ctx)?;
    if !decrement_ttl(ctx, ETH_HLEN, ttl) {
        return Some(TC_ACT_SHOT);
    }
    if pod.flags & POD_VETH != 0
        && let Some(verdict) = into_peer(ctx, pod.ifindex, src, dst)
    {
        return Some(verdict);
    }
    Some(redirect_neigh(pod.ifindex, dst))
}

/// Puts the packet straight into the other end of the veth `ifindex` (the pod's), addressed
/// as the node would address it there: no transmit on the node's end, no second pass through
/// the backlog. `None` when the route to `dst` is not that veth or its neighbour is not known
/// yet (`bpf_redirect_neigh` resolves it).
fn into_peer(ctx: &TcContext, ifindex: u32, src: u32, dst: u32) -> Option<i32> {
    // Every byte written, one word at a time, for the verifier (see `redirect_neigh`).
    let mut fib = MaybeUninit::<bpf_fib_lookup>::uninit();
    let words = fib.as_mut_ptr().cast::<u32>();
    // SAFETY: `skb` is the live context pointer.
    let arrived = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: bpf_fib_lookup is sixteen u32 words: family, protocol and ports, then the length,
    // the input interface, TOS, the source and destination (16-byte unions each), VLAN, and the
    // link-layer addresses it answers with.
    unsafe {
        words.write_volatile(AF_INET);
        words.add(1).write_volatile(0);
        words.add(2).write_volatile(arrived);
        words.add(3).write_volatile(0);
        words.add(4).write_volatile(src);
        let mut i = 5;
        while i < 8 {
            words.add(i).write_volatile(0);
            i += 1;
        }
        words.add(8).write_volatile(dst);
        let mut i = 9;
        while i < 16 {
            words.add(i).write_volatile(0);
            i += 1;
        }
    }
    // SAFETY: `fib` is initialised, lives across the call and its size is passed along.
    let found = unsafe {
        fib_lookup(
            ctx.skb.skb.cast(),
            fib.as_mut_ptr(),
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    // SAFETY: written whole by us, then by the helper (both addresses on success).
    let fib = unsafe { fib.assume_init_ref() };
    if found != i64::from(BPF_FIB_LKUP_RET_SUCCESS) || fib.ifindex != ifindex {
        return None;
    }
    if ctx.store(0, &fib.dmac, 0).is_err() || ctx.store(6, &fib.smac, 0).is_err() {
        return Some(TC_ACT_SHOT);
    }
    // SAFETY: a plain helper call.
    Some(unsafe { bpf_redirect_peer(ifindex, 0) } as i32)
}

/// The TTL of an IPv4 packet that may be forwarded (more than one hop left).
fn forwardable(ctx: &TcContext) -> Option<u8> {
    let ttl: u8 = read(ctx, ETH_HLEN + 8)?;
    (ttl > 1).then_some(ttl)
}

/// Lowers the TTL (`ttl`, read before) of the IPv4 header at `ip`, checksum too, as a router
/// does. `false`: the header may be half written (never seen: the offsets were read before),
/// and the packet must not go on.
fn decrement_ttl(ctx: &TcContext, ip: usize, ttl: u8) -> bool {
    let Some(protocol) = read::<u8>(ctx, ip + 9) else {
        return false;
    };
    let from = u16::from_ne_bytes([ttl, protocol]);
    let to = u16::from_ne_bytes([ttl - 1, protocol]);
    ctx.store(ip + 8, &(ttl - 1), 0).is_ok()
        && ctx
            .l3_csum_replace(ip + 10, u64::from(from), u64::from(to), 2)
            .is_ok()
}

/// Hands the packet to `next_hop`'s link-layer address on `ifindex`, resolved as the kernel
/// resolves neighbours.
fn redirect_neigh(ifindex: u32, next_hop: u32) -> i32 {
    // Every byte written, one word at a time. The verifier refuses to pass uninitialised
    // stack bytes (the unused IPv6 part of the union) to a helper, and `mem::zeroed()` became
    // a byte loop over the stack at a variable offset, which it refuses too; both are allowed
    // only to loaders with CAP_PERFMON, which the DaemonSet does not give.
    let mut nh = MaybeUninit::<bpf_redir_neigh>::uninit();
    let words = nh.as_mut_ptr().cast::<u32>();
    // SAFETY: bpf_redir_neigh is five u32 words (the family, then a 16-byte union whose first
    // word is the IPv4 next hop), each written once within the value.
    unsafe {
        words.write_volatile(AF_INET);
        words.add(1).write_volatile(next_hop);
        words.add(2).write_volatile(0);
        words.add(3).write_volatile(0);
        words.add(4).write_volatile(0);
    }
    // SAFETY: `nh` is initialised, lives across the call and its size is passed along.
    (unsafe {
        bpf_redirect_neigh(
            ifindex,
            nh.as_mut_ptr(),
            size_of::<bpf_redir_neigh>() as i32,
            0,
        )
    }) as i32
}

/// Whether `addr` is one of `gateway`'s destinations (not excluded from them).
fn via_gateway(gateway: u32, addr: u32) -> bool {
    let key = Key::new(DEST_GATEWAY_BITS + 32, DestKey { gateway, addr });
    SE_DESTS.get(&key).is_some_and(|v| *v == DEST_VIA_GATEWAY)
}

/// A starting pod the agent holds may reach the cluster; anything else it sends is dropped
/// until the agent knows where it must go (see `GATEWAY_HOLD`).
fn hold(ctx: &TcContext, src: u32, dst: u32) -> Option<i32> {
    if SE_RANGES
        .get(&Key::new(32, dst))
        .is_some_and(|r| *r & RANGE_CLUSTER != 0)
    {
        return None;
    }
    debug!(
        ctx,
        "starting pod {:i} not classified yet: dropped its packet to {:i}",
        u32::from_be(src),
        u32::from_be(dst)
    );
    Some(TC_ACT_SHOT as i32)
}

/// Whether this node may serve its egress IPs now (see `Lease::state`).
fn lease_state() -> u8 {
    let (Some(lease), Some(heard)) = (SE_LEASE.get(0), SE_HEARD.get(0)) else {
        return probe::FENCED;
    };
    // SAFETY: both read the kernel's monotonic clock, coarsely and precisely.
    lease.state(heard, unsafe { bpf_ktime_get_coarse_ns() }, || unsafe {
        bpf_ktime_get_ns()
    })
}

/// A probe came in from `from`, which counts this node out when `view` is `probe::LOST`: this
/// node was cut off while the others took its egress IPs, so it stops serving and starts its
/// break over before it answers, and every node hears that from this very answer on.
fn probed(from: u32, view: u8) {
    // SAFETY: reads the kernel's monotonic clock.
    let now = unsafe { bpf_ktime_get_ns() };
    let (steady_ns, isolated_ns) = SE_LEASE
        .get(0)
        .map_or((0, 0), |lease| (lease.steady_ns, lease.isolated_ns));
    // SAFETY: plain integers written whole.
    let previous = unsafe { SE_PROBERS.get(&from) }.copied();
    let steady_since_ns = match previous {
        Some(p) if now.saturating_sub(p.last_ns) <= steady_ns => p.steady_since_ns,
        _ => now,
    };
    let _ = SE_PROBERS.insert(
        &from,
        &Prober {
            last_ns: now,
            steady_since_ns,
        },
        0,
    );
    let Some(heard) = SE_HEARD.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: the single entry of an array map, written by this program alone; races between
    // CPUs only blur the times by the time between two probes, or lose a count of several.
    unsafe {
        let last = (*heard).last_request_ns;
        let isolated = last != 0 && now.saturating_sub(last) > isolated_ns;
        let steady = now.saturating_sub(steady_since_ns) >= isolated_ns;
        if view == probe::LOST && (isolated || steady) {
            (*heard).cut_off_ns = now;
            (*heard).cut_offs = (*heard).cut_offs.wrapping_add(1);
        }
        (*heard).last_request_ns = now;
    }
}

fn count(field: fn(&mut Guard) -> &mut u64) {
    if let Some(guard) = SE_GUARD.get_ptr_mut(0) {
        // SAFETY: per-CPU value, only this CPU writes it while we run.
        unsafe { *field(&mut *guard) += 1 };
    }
}

/// Answers a probe from another node in place: addresses and ports swapped, the lease's state
/// written in, sent back out of the interface it came in on. The answer comes from the kernel,
/// so it says what the data path does: it keeps coming while the agent is away, and says
/// `FENCED` once the lease has run out, when the data path has stopped serving too.
fn answer_probe(ctx: &TcContext) -> Option<i32> {
    let config = SE_CONFIG.get(0)?;
    if config.probe_port == 0 || read::<u16>(ctx, 12)? != ETH_P_IP_WIRE {
        return None;
    }
    // No IP options (version 4, header length 5), UDP, to this node, to the probe port.
    if read::<u8>(ctx, ETH_HLEN)? != 0x45 || read::<u8>(ctx, ETH_HLEN + 9)? != IPPROTO_UDP {
        return None;
    }
    if read::<u32>(ctx, IP_DST_OFF)? != config.node_ip
        || read::<[u8; 4]>(ctx, PAYLOAD_OFF)? != probe::MAGIC
    {
        return None;
    }
    let kind = read::<u8>(ctx, PAYLOAD_OFF + probe::KIND)?;
    if kind == probe::REPLY && read::<u16>(ctx, UDP_OFF)? == config.probe_port {
        // An answer to this node's own prober, on its way to the agent: the node can still
        // reach its peers (see `lease_state`). Not once it was silent, though: coming back
        // from a cut-off, answers may come before the peers' probes, and only those say
        // whether the peers counted this node out meanwhile; serving until then would answer
        // ARP for egress IPs that another node holds now.
        if let (Some(lease), Some(heard)) = (SE_LEASE.get(0), SE_HEARD.get_ptr_mut(0)) {
            // SAFETY: reads the kernel's monotonic clock; plain loads and a store to the
            // single entry.
            unsafe {
                let now = bpf_ktime_get_ns();
                if !lease.silent(&*heard, now) {
                    (*heard).last_reply_ns = now;
                }
            }
        }
        return None;
    }
    if kind != probe::REQUEST || read::<u16>(ctx, UDP_OFF + 2)? != config.probe_port {
        return None;
    }
    probed(
        read(ctx, IP_SRC_OFF)?,
        read(ctx, PAYLOAD_OFF + probe::VIEW)?,
    );
    let macs: [u8; 12] = read(ctx, 0)?;
    let addrs: [u8; 8] = read(ctx, IP_SRC_OFF)?;
    let ports: [u8; 4] = read(ctx, UDP_OFF)?;
    let swapped_macs = [
        macs[6], macs[7], macs[8], macs[9], macs[10], macs[11], macs[0], macs[1], macs[2], macs[3],
        macs[4], macs[5],
    ];
    // The IP checksum does not change when its two addresses trade places.
    let swapped_addrs = [
        addrs[4], addrs[5], addrs[6], addrs[7], addrs[0], addrs[1], addrs[2], addrs[3],
    ];
    let swapped_ports = [ports[2], ports[3], ports[0], ports[1]];
    // No UDP checksum (allowed over IPv4): the payload changes.
    let answer = [probe::REPLY, lease_state()];
    let uptime_ms = SE_LEASE.get(0).map_or(0, |lease| {
        let cut_off = SE_HEARD.get(0).map_or(0, |h| h.cut_off_ns);
        // SAFETY: reads the kernel's monotonic clock.
        let now = unsafe { bpf_ktime_get_ns() };
        let ms = now.saturating_sub(lease.since_ns.max(cut_off)) / 1_000_000;
        if ms > u64::from(u32::MAX) {
            u32::MAX
        } else {
            ms as u32
        }
    });
    ctx.store(0, &swapped_macs, 0).ok()?;
    ctx.store(IP_SRC_OFF, &swapped_addrs, 0).ok()?;
    ctx.store(UDP_OFF, &swapped_ports, 0).ok()?;
    ctx.store(UDP_OFF + 6, &0u16, 0).ok()?;
    ctx.store(PAYLOAD_OFF + probe::KIND, &answer, 0).ok()?;
    ctx.store(PAYLOAD_OFF + probe::UPTIME, &uptime_ms.to_be(), 0)
        .ok()?;
    count(|g| &mut g.probes);
    // SAFETY: `skb` is the live context pointer.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: a plain helper call; the packet goes out of the interface it came in on.
    Some(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

/// A packet that [`decapsulate`] took out of the tunnel on the uplink and handed to the tunnel
/// device with our bit (see [`uplink_ingress`]): looked at there already, it goes on at once.
fn unwrapped_here(ctx: &TcContext) -> bool {
    let Some(config) = SE_CONFIG.get(0) else {
        return false;
    };
    // SAFETY: `skb` is the live context pointer.
    let (mark, ifindex) = unsafe { ((*ctx.skb.skb).mark, (*ctx.skb.skb).ifindex) };
    ifindex == config.tunnel_ifindex && mark & config.mark != 0
}

/// Whether a packet from `src` to `dst` comes from another node's pod and leaves the cluster:
/// it is here to leave with an egress IP held here.
fn passing_through(src: u32, dst: u32) -> bool {
    SE_RANGES
        .get(&Key::new(32, src))
        .is_some_and(|r| *r & RANGE_REMOTE_PODS != 0)
        && SE_RANGES
            .get(&Key::new(32, dst))
            .is_none_or(|r| *r & RANGE_CLUSTER == 0)
}

/// Gives a packet passing through our bit, for the guard in [`uplink_egress`].
fn mark_passing(ctx: &TcContext, config: &Config) {
    // SAFETY: `skb` is the live context pointer; other bits of the mark belong to others.
    let mark = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark(mark | config.mark);
    count(|g| &mut g.transit);
}

/// Marks a packet from another node's pod to outside the cluster: it is here to leave with an
/// egress IP, and the guard in [`uplink_egress`] must see it if it would leave otherwise. On
/// the uplink it must come from another node (`SE_SENDERS`), or it is dropped: a host on the
/// segment sending as a pod. (Through the tunnel, [`decapsulate`] checked the outer source.)
fn uplink_ingress(ctx: &TcContext) -> Option<i32> {
    let (src, dst) = ipv4_addrs(ctx)?;
    if !passing_through(src, dst) {
        return None;
    }
    let config = SE_CONFIG.get(0)?;
    // SAFETY: `skb` is the live context pointer.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if ifindex == config.uplink_ifindex {
        let sender: [u8; 6] = read(ctx, 6)?;
        // SAFETY: entries are written whole by the agent.
        if unsafe { SE_SENDERS.get(&sender) }.is_none() {
            count(|g| &mut g.foreign);
            debug!(
                ctx,
                "{:i} -> {:i} came from a host that is not a node: dropped",
                u32::from_be(src),
                u32::from_be(dst)
            );
            return Some(TC_ACT_SHOT);
        }
    }
    mark_passing(ctx, config);
    None
}

/// An ARP packet announcing an egress IP held here (an answer, or a gratuitous one), while
/// the lease does not let this node serve: dropped, so the segment forgets this node for it.
fn fence_arp(ctx: &TcContext) -> Option<i32> {
    if read::<u16>(ctx, 12)? != ETH_P_ARP_WIRE {
        return None;
    }
    let sender: u32 = read(ctx, ARP_SPA_OFF)?;
    // SAFETY: entries are plain integers written whole by the agent.
    let flags = unsafe { SE_EGRESS.get(&sender) }.map_or(0, |e| e.flags);
    if flags & EGRESS_LOCAL == 0 {
        return None;
    }
    if flags & EGRESS_QUIET != 0 {
        // Announced by BGP or by the operator: ARP must not draw its traffic here too.
        return Some(TC_ACT_SHOT);
    }
    if lease_state() == probe::SERVING {
        return None;
    }
    count(|g| &mut g.fenced);
    Some(TC_ACT_SHOT)
}

fn uplink_egress(ctx: &TcContext) -> Option<i32> {
    if let Some(verdict) = fence_arp(ctx) {
        return Some(verdict);
    }
    let mark_bit = SE_CONFIG.get(0)?.mark;
    // SAFETY: `skb` is the live context pointer.
    let (mark, ifindex) = unsafe { ((*ctx.skb.skb).mark, (*ctx.skb.skb).ifindex) };
    if mark & mark_bit == 0 {
        return None;
    }
    let (src, _) = ipv4_addrs(ctx)?;
    // SAFETY: entries are plain integers written whole by the agent.
    let Some(pod) = (unsafe { SE_PODS.get(&src) }) else {
        // Not a local pod's own address: only an egress IP held here may take it out, and
        // only while the lease lets this node serve.
        // SAFETY: as above.
        let held = unsafe { SE_EGRESS.get(&src) }.is_some_and(|e| e.flags & EGRESS_LOCAL != 0);
        if !held {
            count(|g| &mut g.dropped);
            debug!(
                ctx,
                "a marked packet would leave with {:i}, neither its pod's address nor an egress IP held here: dropped",
                u32::from_be(src)
            );
            return Some(TC_ACT_SHOT);
        }
        if lease_state() == probe::FENCED {
            count(|g| &mut g.fenced);
            debug!(
                ctx,
                "egress IP {:i} is fenced (the lease does not let this node serve): dropped",
                u32::from_be(src)
            );
            return Some(TC_ACT_SHOT);
        }
        return None;
    };
    // SAFETY: as above.
    let egress = unsafe { SE_EGRESS.get(&pod.egress_ip) }?;
    if egress.holder == 0 || egress.flags & EGRESS_LOCAL != 0 {
        return None;
    }
    // Routed to the holder already: unless routing did not do its part (our rule or table
    // gone), in which case the redirect below takes the packet there anyway.
    let routed = egress.flags & EGRESS_ROUTED != 0 && read::<[u8; 6]>(ctx, 0)? == egress.holder_mac;
    if routed && egress.flags & EGRESS_TUNNEL == 0 {
        return None;
    }
    // A redirected packet passes this hook again; without the bit it goes out unchanged. A
    // wrapped one is the node's own.
    ctx.set_mark(mark & !mark_bit);
    if egress.flags & EGRESS_TUNNEL != 0 {
        let config = SE_CONFIG.get(0)?;
        // Addressed to the holder already, the wrapped packet goes on from here: a redirect
        // would take it through the device's queue and this hook a second time.
        let onward = if routed { Onward::Here } else { onward(egress) };
        if let Some(verdict) = encapsulate(ctx, config, egress.holder, onward) {
            return Some(verdict);
        }
        // The kernel's tunnel device takes it instead; `tunnel_egress` addresses it there.
        if config.tunnel_ifindex == 0 {
            return Some(TC_ACT_SHOT);
        }
        // SAFETY: a plain helper call.
        return Some(unsafe { bpf_redirect(config.tunnel_ifindex, 0) } as i32);
    }
    Some(redirect_neigh(ifindex, egress.holder))
}

/// Addresses a packet leaving through the tunnel device to the node it goes to: a local pod's
/// packet to the holder of its egress IP, a reply to another node's pod (on the holder) to
/// that node. The outer packet goes between node addresses, which any fabric carries; the
/// inner frame is addressed to the tunnel devices' shared MAC, or the other end would not take
/// it in, and comes from another, or it would take it for a loop. Our bit comes off: the outer packet is the node's own.
fn tunnel_egress(ctx: &TcContext) -> Option<i32> {
    let (src, dst) = ipv4_addrs(ctx)?;
    // SAFETY: entries are plain integers written whole by the agent.
    let remote = match unsafe { SE_PODS.get(&src) } {
        Some(pod) => {
            // SAFETY: as above.
            let egress = unsafe { SE_EGRESS.get(&pod.egress_ip) }?;
            if egress.holder == 0 || egress.flags & EGRESS_LOCAL != 0 {
                return None;
            }
            egress.holder
        }
        None => *SE_PEERS.get(&Key::new(32, dst))?,
    };
    let config = SE_CONFIG.get(0)?;
    // SAFETY: `skb` is the live context pointer; other bits of the mark belong to others.
    let mark = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark(mark & !config.mark);
    // The holder does not know which of its peers are on its subnet: the kernel looks the
    // outer destination up.
    if let Some(verdict) = encapsulate(ctx, config, remote, Onward::Route) {
        return Some(verdict);
    }
    // Left to the kernel's device: addressed to it here.
    ctx.store(0, &TUNNEL_MACS, 0).ok()?;
    // Every byte written, one word at a time, for the verifier (see `uplink_egress`).
    let mut key = MaybeUninit::<bpf_tunnel_key>::uninit();
    let words = key.as_mut_ptr().cast::<u32>();
    // SAFETY: bpf_tunnel_key is eleven u32 words: the VNI, the remote address (host order) in
    // a 16-byte union, TOS and TTL and flags in one word, the flow label, the local address in
    // a 16-byte union (0: the route's source).
    unsafe {
        words.write_volatile(tunnel::VNI);
        words.add(1).write_volatile(u32::from_be(remote));
        words.add(2).write_volatile(0);
        words.add(3).write_volatile(0);
        words.add(4).write_volatile(0);
        words.add(5).write_volatile(TUNNEL_TTL << 8);
        words.add(6).write_volatile(0);
        words.add(7).write_volatile(0);
        words.add(8).write_volatile(0);
        words.add(9).write_volatile(0);
        words.add(10).write_volatile(0);
    }
    // SAFETY: `key` is initialised, lives across the call and its size is passed along.
    let set = unsafe {
        bpf_skb_set_tunnel_key(
            ctx.skb.skb,
            key.as_mut_ptr(),
            size_of::<bpf_tunnel_key>() as u32,
            0,
        )
    };
    if set != 0 {
        return None;
    }
    Some(TCX_NEXT)
}

/// Where a packet wrapped for the tunnel goes next.
#[derive(Clone, Copy)]
enum Onward {
    /// On through the hook it is in: the uplink's egress, its frame addressed to the holder.
    Here,
    /// To the holder's link-layer address on the uplink (it is on the uplink's subnet).
    Neighbour,
    /// Where the kernel's route to the outer destination says.
    Route,
}

/// How the outer packet to the holder in `egress` gets there from a hook that is not the
/// uplink's egress: straight to it when it is on the uplink's subnet (see `EGRESS_ON_LINK`).
fn onward(egress: &EgressEntry) -> Onward {
    if egress.flags & EGRESS_ON_LINK != 0 {
        Onward::Neighbour
    } else {
        Onward::Route
    }
}

/// Wraps a packet for `remote` here and hands it to the uplink (`onward`), the way the
/// kernel's VXLAN device would (the same bytes on the wire, so either end may be either),
/// without its cost: no second device, no netfilter pass for the outer packet, no UDP socket,
/// and for a `remote` on the uplink's subnet no route lookup either. `None` (packet unchanged)
/// leaves it to the kernel's device: no node address or uplink known yet, or a packet that
/// would not fit the uplink once wrapped (the device fragments it).
fn encapsulate(ctx: &TcContext, config: &Config, remote: u32, onward: Onward) -> Option<i32> {
    if config.node_ip == 0 || config.tunnel_port == 0 || config.uplink_ifindex == 0 {
        return None;
    }
    let skb = ctx.skb.skb;
    let mut mtu = 0u32;
    // SAFETY: a plain helper call on the live context; `mtu` outlives it. A TCP segment
    // (GSO) passes: the holder clamps tunneled connections' MSS to fit.
    let fits = unsafe {
        bpf_check_mtu(
            skb.cast(),
            config.uplink_ifindex,
            &mut mtu,
            tunnel::OVERHEAD as i32,
            0,
        )
    } == 0;
    let total = ctx.len() as usize - ETH_HLEN + tunnel::OVERHEAD as usize;
    if !fits || total > usize::from(u16::MAX) {
        return None;
    }
    let ip: [u8; 20] = read(ctx, ETH_HLEN)?;
    // The ports, if the header has no options (`flow_hash` looks at them only then).
    let ports = read::<u32>(ctx, UDP_OFF).unwrap_or(0);
    let hash = tunnel::flow_hash(&ip, ports);
    // SAFETY: a plain helper call.
    let id = unsafe { bpf_get_prandom_u32() };
    let flags = u64::from(
        BPF_F_ADJ_ROOM_FIXED_GSO
            | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
            | BPF_F_ADJ_ROOM_ENCAP_L4_UDP
            | BPF_F_ADJ_ROOM_ENCAP_L2_ETH,
    ) | ((ETH_HLEN as u64) << BPF_ADJ_ROOM_ENCAP_L2_SHIFT);
    ctx.adjust_room(tunnel::OVERHEAD as i32, BPF_ADJ_ROOM_MAC, flags)
        .ok()?;
    let header = tunnel_header(config, remote, total as u16, id as u16, hash);
    if ctx.store(ETH_HLEN, &header, 0).is_err() {
        // Room made but not filled: the packet is no longer what it was.
        return Some(TC_ACT_SHOT);
    }
    count(|g| &mut g.tunnel_out);
    Some(match onward {
        Onward::Here => TCX_NEXT,
        Onward::Neighbour => redirect_neigh(config.uplink_ifindex, remote),
        // SAFETY: a plain helper call; no next hop given: the kernel looks the outer
        // destination up and fills in both link-layer addresses.
        Onward::Route => {
            (unsafe { bpf_redirect_neigh(config.uplink_ifindex, core::ptr::null_mut(), 0, 0) })
                as i32
        }
    })
}

/// Outer IPv4 (`total` bytes long, no DF: a smaller path fragments it, as the kernel's
/// device does), UDP (source port from the inner flow's hash, for the fabric's ECMP; no
/// checksum, allowed over IPv4), VXLAN and the inner Ethernet header.
fn tunnel_header(config: &Config, remote: u32, total: u16, id: u16, hash: u32) -> [u8; 50] {
    let mut h = [0u8; tunnel::OVERHEAD as usize];
    let [t0, t1] = total.to_be_bytes();
    let [i0, i1] = id.to_be_bytes();
    let src = config.node_ip.to_ne_bytes();
    let dst = remote.to_ne_bytes();
    h[..20].copy_from_slice(&[
        0x45,
        0,
        t0,
        t1,
        i0,
        i1,
        0,
        0,
        TUNNEL_TTL as u8,
        IPPROTO_UDP,
        0,
        0,
        src[0],
        src[1],
        src[2],
        src[3],
        dst[0],
        dst[1],
        dst[2],
        dst[3],
    ]);
    let [c0, c1] = ipv4_checksum(&h).to_be_bytes();
    h[10] = c0;
    h[11] = c1;
    let [s0, s1] = (0xc000 | (hash & 0x3fff) as u16).to_be_bytes();
    let [d0, d1] = config.tunnel_port.to_ne_bytes();
    let [u0, u1] = (total - 20).to_be_bytes();
    let vni = (tunnel::VNI << 8).to_be_bytes();
    h[20..36].copy_from_slice(&[
        s0, s1, d0, d1, u0, u1, 0, 0, // UDP
        0x08, 0, 0, 0, vni[0], vni[1], vni[2], vni[3], // VXLAN: a VNI follows
    ]);
    h[36..48].copy_from_slice(&TUNNEL_MACS);
    h[48] = 0x08;
    h[49] = 0x00;
    h
}

/// The IPv4 header checksum of the first 20 bytes of `h` (its checksum field zero).
fn ipv4_checksum(h: &[u8; 50]) -> u16 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < 20 {
        sum += u32::from(u16::from_be_bytes([h[i], h[i + 1]]));
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Takes a tunnel packet from another node out of the tunnel here and hands the inner packet
/// to the tunnel device as if the device had received it (its nftables rules and routes see
/// what they would have seen; our program there, what [`uplink_ingress`] would have marked
/// there, marked already). A tunnel packet from anyone else is dropped. GRO
/// aggregates (this kernel cannot clear their tunnel offload state from eBPF, so they would
/// not be segmented right if forwarded) and whatever is not ours go on to the kernel.
fn decapsulate(ctx: &TcContext) -> Option<i32> {
    let config = SE_CONFIG.get(0)?;
    // SAFETY: `skb` is the live context pointer.
    let (ifindex, gso_size) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).gso_size) };
    if config.tunnel_port == 0 || ifindex != config.uplink_ifindex {
        return None;
    }
    if read::<u16>(ctx, 12)? != ETH_P_IP_WIRE {
        return None;
    }
    let ip: [u8; 20] = read(ctx, ETH_HLEN)?;
    // No options, UDP, with its UDP header (a later fragment is nothing without the first).
    if ip[0] != 0x45 || ip[9] != IPPROTO_UDP || ip[6] & 0x1f != 0 || ip[7] != 0 {
        return None;
    }
    let src = u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]);
    let dst = u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]);
    if dst != config.node_ip || read::<u16>(ctx, UDP_OFF + 2)? != config.tunnel_port {
        return None;
    }
    if SE_RANGES
        .get(&Key::new(32, src))
        .is_none_or(|r| *r & RANGE_NODE == 0)
    {
        // Only nodes send into the tunnel (a host that forges a node's address as well gets
        // through, as on the direct path with a node's link-layer address).
        count(|g| &mut g.foreign);
        debug!(
            ctx,
            "tunnel packet from {:i}, not a node: dropped",
            u32::from_be(src)
        );
        return Some(TC_ACT_SHOT);
    }
    // The first fragment of one (the kernel reassembles it), or a GRO aggregate.
    if ip[6] & 0x20 != 0 || gso_size != 0 {
        return None;
    }
    let vxlan: [u8; 8] = read(ctx, PAYLOAD_OFF)?;
    let vni = (tunnel::VNI << 8).to_be_bytes();
    if vxlan[0] != 0x08 || vxlan[4..] != vni {
        return None;
    }
    if read::<u16>(ctx, PAYLOAD_OFF + 8 + 12)? != ETH_P_IP_WIRE {
        return None;
    }
    ctx.adjust_room(-(tunnel::OVERHEAD as i32), BPF_ADJ_ROOM_MAC, 0)
        .ok()?;
    count(|g| &mut g.tunnel_in);
    if let Some(verdict) = fast_back(ctx, config, true) {
        return Some(verdict);
    }
    // Marked here, the program on the device lets it go on without a second look.
    if let Some((src, dst)) = ipv4_addrs(ctx)
        && passing_through(src, dst)
    {
        mark_passing(ctx, config);
    }
    if ctx.store(0, &TUNNEL_MACS, 0).is_err() {
        return Some(TC_ACT_SHOT);
    }
    // SAFETY: a plain helper call.
    Some(unsafe { bpf_redirect(config.tunnel_ifindex, u64::from(BPF_F_INGRESS)) } as i32)
}

/// Reads a `T` at `off` straight from the packet where it lies in the part the program can
/// see directly (the headers, nearly always), through `bpf_skb_load_bytes` otherwise: the
/// helper call and its copy cost more than the read.
#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + off + size_of::<T>() <= end {
        // SAFETY: within the packet's directly readable bytes, checked just above.
        Some(unsafe { ((start + off) as *const T).read_unaligned() })
    } else {
        ctx.load(off).ok()
    }
}

fn ipv4_addrs(ctx: &TcContext) -> Option<(u32, u32)> {
    if read::<u16>(ctx, 12)? != ETH_P_IP_WIRE {
        return None;
    }
    Some((read(ctx, IP_SRC_OFF)?, read(ctx, IP_DST_OFF)?))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
