//! Counts IPv4 packets per source address, and how many of them carry any fwmark, then hands
//! every packet on (`TCX_NEXT`). The end-to-end tests attach it behind the agent's programs,
//! as a TCX link and as a legacy tc filter, to check that the agent shares its hooks, and in
//! front of them, to see how often a packet passes the hook. A packet wrapped for the agent's
//! tunnel (UDP to its default port) counts under the source of the packet inside, as wrapped.
//!
//! Only sources the loader entered in `SE_TEST_COUNTS` are counted: the program never inserts,
//! so two CPUs cannot race to create an entry.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    macros::{classifier, map},
    maps::PerCpuHashMap,
    programs::TcContext,
};
use static_egress_common::tunnel;

/// Per-CPU value, keyed by the source address as the four bytes seen on the wire.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Count {
    pub packets: u64,
    pub marked: u64,
    pub wrapped: u64,
}

#[map(name = "SE_TEST_COUNTS")]
static SE_TEST_COUNTS: PerCpuHashMap<u32, Count> = PerCpuHashMap::with_max_entries(64, 0);

const ETH_P_IP_WIRE: u16 = 0x0800_u16.to_be();
const IP_SRC_OFF: usize = 14 + 12;
const IPPROTO_UDP: u8 = 17;
/// The agent's default `--tunnel-port`, which the tests keep.
const TUNNEL_PORT_WIRE: u16 = tunnel::DEFAULT_PORT.to_be();
/// Where the inner packet's source lies in a tunnel packet (outer IPv4 without options, UDP,
/// VXLAN, inner Ethernet).
const INNER_SRC_OFF: usize = 14 + 20 + 8 + 8 + 14 + 12;

#[classifier]
pub fn se_test_count(ctx: TcContext) -> i32 {
    count(&ctx);
    TC_ACT_UNSPEC
}

fn count(ctx: &TcContext) -> Option<()> {
    if ctx.load::<u16>(12).ok()? != ETH_P_IP_WIRE {
        return None;
    }
    if let Some(inner) = wrapped_source(ctx) {
        let entry = SE_TEST_COUNTS.get_ptr_mut(&inner)?;
        // SAFETY: a per-CPU value: only this CPU writes it while the program runs.
        unsafe { (*entry).wrapped += 1 };
        return Some(());
    }
    let src: u32 = ctx.load(IP_SRC_OFF).ok()?;
    let entry = SE_TEST_COUNTS.get_ptr_mut(&src)?;
    // SAFETY: `skb` is the live context pointer.
    let mark = unsafe { (*ctx.skb.skb).mark };
    // SAFETY: a per-CPU value: only this CPU writes it while the program runs.
    unsafe {
        (*entry).packets += 1;
        if mark != 0 {
            (*entry).marked += 1;
        }
    }
    Some(())
}

/// The inner source of a tunnel packet.
fn wrapped_source(ctx: &TcContext) -> Option<u32> {
    let version_ihl: u8 = ctx.load(14).ok()?;
    let protocol: u8 = ctx.load(14 + 9).ok()?;
    let port: u16 = ctx.load(14 + 20 + 2).ok()?;
    if version_ihl != 0x45 || protocol != IPPROTO_UDP || port != TUNNEL_PORT_WIRE {
        return None;
    }
    ctx.load(INNER_SRC_OFF).ok()
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
