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
//! All share their hook with other programs (a CNI's, a bandwidth manager's, a probe's, and
//! legacy tc filters after the TCX chain): every packet they neither drop nor redirect goes on
//! to the next program with `TCX_NEXT`, never `TCX_PASS`, which would end the chain.
#![no_std]
#![no_main]

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, bpf_redir_neigh},
    helpers::generated::bpf_redirect_neigh,
    macros::{classifier, map},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, PerCpuHashMap, lpm_trie::Key},
    programs::TcContext,
};
use static_egress_common::{
    Config, Counters, DEST_GATEWAY_BITS, DEST_VIA_GATEWAY, DestKey, EGRESS_LOCAL, EGRESS_ROUTED,
    EgressEntry, GATEWAY_FAIL_CLOSED, GatewayEntry, Guard, PodEntry, RANGE_CLUSTER,
    RANGE_REMOTE_PODS, capacity,
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

const ETH_HLEN: usize = 14;
const ETH_P_IP_WIRE: u16 = 0x0800_u16.to_be();
const IP_SRC_OFF: usize = ETH_HLEN + 12;
const IP_DST_OFF: usize = ETH_HLEN + 16;
const AF_INET: u32 = 2;
// `uplink_egress` writes a `bpf_redir_neigh` as five words.
const _: () = assert!(size_of::<bpf_redir_neigh>() == 20);
/// `TC_ACT_UNSPEC` is what TCX calls `TCX_NEXT`: the next program (or legacy tc) decides.
const TCX_NEXT: i32 = TC_ACT_UNSPEC;

#[classifier]
pub fn se_pod_ingress(ctx: TcContext) -> i32 {
    pod_ingress(&ctx).unwrap_or(TCX_NEXT)
}

#[classifier]
pub fn se_uplink_ingress(ctx: TcContext) -> i32 {
    uplink_ingress(&ctx);
    TCX_NEXT
}

#[classifier]
pub fn se_uplink_egress(ctx: TcContext) -> i32 {
    uplink_egress(&ctx).unwrap_or(TCX_NEXT)
}

/// `None` means "no verdict of ours": the packet goes on to the next program, marked or not.
fn pod_ingress(ctx: &TcContext) -> Option<i32> {
    let (src, dst) = ipv4_addrs(ctx)?;
    // SAFETY: entries are plain integers written whole by the agent.
    let pod = unsafe { SE_PODS.get(&src) }?;
    let key = Key::new(
        DEST_GATEWAY_BITS + 32,
        DestKey {
            gateway: pod.gateway,
            addr: dst,
        },
    );
    if *SE_DESTS.get(&key)? != DEST_VIA_GATEWAY {
        return None;
    }
    let mark_bit = SE_CONFIG.get(0)?.mark;
    let counters = SE_COUNTERS.get_ptr_mut(&pod.gateway);
    // SAFETY: as above.
    let held = unsafe { SE_EGRESS.get(&pod.egress_ip) }.is_some_and(|e| e.holder != 0);
    if !held {
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
        return Some(TC_ACT_SHOT as i32);
    }
    // SAFETY: `skb` is the live context pointer; other bits of the mark belong to others.
    let mark = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark(mark | mark_bit);
    if let Some(c) = counters {
        // SAFETY: per-CPU value, only this CPU writes it while we run.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(ctx.len());
        }
    }
    None
}

/// Marks a packet from another node's pod to outside the cluster: it is here to leave with an
/// egress IP, and the guard in [`uplink_egress`] must see it if it would leave otherwise.
fn uplink_ingress(ctx: &TcContext) -> Option<()> {
    let (src, dst) = ipv4_addrs(ctx)?;
    if *SE_RANGES.get(&Key::new(32, src))? & RANGE_REMOTE_PODS == 0 {
        return None;
    }
    if SE_RANGES
        .get(&Key::new(32, dst))
        .is_some_and(|r| *r & RANGE_CLUSTER != 0)
    {
        return None;
    }
    let mark_bit = SE_CONFIG.get(0)?.mark;
    // SAFETY: `skb` is the live context pointer; other bits of the mark belong to others.
    let mark = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark(mark | mark_bit);
    if let Some(guard) = SE_GUARD.get_ptr_mut(0) {
        // SAFETY: per-CPU value, only this CPU writes it while we run.
        unsafe { (*guard).transit += 1 };
    }
    None
}

fn uplink_egress(ctx: &TcContext) -> Option<i32> {
    let mark_bit = SE_CONFIG.get(0)?.mark;
    // SAFETY: `skb` is the live context pointer.
    let (mark, ifindex) = unsafe { ((*ctx.skb.skb).mark, (*ctx.skb.skb).ifindex) };
    if mark & mark_bit == 0 {
        return None;
    }
    let (src, _) = ipv4_addrs(ctx)?;
    // SAFETY: entries are plain integers written whole by the agent.
    let Some(pod) = (unsafe { SE_PODS.get(&src) }) else {
        // Not a local pod's own address: only an egress IP held here may take it out.
        // SAFETY: as above.
        let held = unsafe { SE_EGRESS.get(&src) }.is_some_and(|e| e.flags & EGRESS_LOCAL != 0);
        if held {
            return None;
        }
        if let Some(guard) = SE_GUARD.get_ptr_mut(0) {
            // SAFETY: per-CPU value, only this CPU writes it while we run.
            unsafe { (*guard).dropped += 1 };
        }
        return Some(TC_ACT_SHOT);
    };
    // SAFETY: as above.
    let egress = unsafe { SE_EGRESS.get(&pod.egress_ip) }?;
    if egress.holder == 0 || egress.flags & EGRESS_LOCAL != 0 {
        return None;
    }
    // Routed to the holder already: unless routing did not do its part (our rule or table
    // gone), in which case the redirect below takes the packet there anyway.
    if egress.flags & EGRESS_ROUTED != 0 && ctx.load::<[u8; 6]>(0).ok()? == egress.holder_mac {
        return None;
    }
    // The redirected packet passes this hook again; without the bit it goes out unchanged.
    ctx.set_mark(mark & !mark_bit);
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
        words.add(1).write_volatile(egress.holder);
        words.add(2).write_volatile(0);
        words.add(3).write_volatile(0);
        words.add(4).write_volatile(0);
    }
    // SAFETY: `nh` is initialised, lives across the call and its size is passed along.
    let verdict = unsafe {
        bpf_redirect_neigh(
            ifindex,
            nh.as_mut_ptr(),
            size_of::<bpf_redir_neigh>() as i32,
            0,
        )
    };
    Some(verdict as i32)
}

fn ipv4_addrs(ctx: &TcContext) -> Option<(u32, u32)> {
    if ctx.load::<u16>(12).ok()? != ETH_P_IP_WIRE {
        return None;
    }
    Some((ctx.load(IP_SRC_OFF).ok()?, ctx.load(IP_DST_OFF).ok()?))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
