//! Counts IPv4 packets per source address, and how many of them carry any fwmark, then hands
//! every packet on (`TCX_NEXT`). The end-to-end tests attach it behind the agent's programs,
//! as a TCX link and as a legacy tc filter, to check that the agent shares its hooks.
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

/// Per-CPU value, keyed by the source address as the four bytes seen on the wire.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Count {
    pub packets: u64,
    pub marked: u64,
}

#[map(name = "SE_TEST_COUNTS")]
static SE_TEST_COUNTS: PerCpuHashMap<u32, Count> = PerCpuHashMap::with_max_entries(64, 0);

const ETH_P_IP_WIRE: u16 = 0x0800_u16.to_be();
const IP_SRC_OFF: usize = 14 + 12;

#[classifier]
pub fn se_test_count(ctx: TcContext) -> i32 {
    count(&ctx);
    TC_ACT_UNSPEC
}

fn count(ctx: &TcContext) -> Option<()> {
    if ctx.load::<u16>(12).ok()? != ETH_P_IP_WIRE {
        return None;
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
