//! Idle CPUs poll while the bench measures. On a VM a halted vCPU wakes through the
//! hypervisor: tens of microseconds that land on whichever round trip found its CPU idle, so
//! round trips came in two modes (about 14 and 60 µs on the same path, switching between runs)
//! and the paired rounds' intervals grew to ±30 µs. A PM QoS request of 0 µs
//! (`/dev/cpu_dma_latency`) keeps cpuidle in its polling state; the kernel withdraws the
//! request when the file is closed, so it lasts as long as the guard. Polling is idle time to
//! the kernel's accounting, so the CPU figures do not count it.

use std::fs::{File, OpenOptions};
use std::io::Write as _;

const PATH: &str = "/dev/cpu_dma_latency";

/// Holds the request while alive.
pub struct PollingIdle {
    request: Option<File>,
}

impl PollingIdle {
    /// Asks for polling idle; where the kernel has no PM QoS device, says so and goes on
    /// without it (the report says which).
    pub fn hold() -> Self {
        let request = OpenOptions::new()
            .write(true)
            .open(PATH)
            .and_then(|mut f| f.write_all(&0i32.to_ne_bytes()).map(|()| f));
        match request {
            Ok(f) => Self { request: Some(f) },
            Err(e) => {
                eprintln!(
                    "bench: idle CPUs may halt while measuring ({PATH}: {e}); round trips then \
                     include their wake-ups"
                );
                Self { request: None }
            }
        }
    }

    /// How the report describes the idle CPUs.
    pub fn describe(&self) -> &'static str {
        if self.request.is_some() {
            "idle CPUs polling (PM QoS 0 µs)"
        } else {
            "idle CPUs free to halt (no PM QoS device)"
        }
    }
}
