//! `cargo xtask bench latency`: the hand-built path, the same through hand-built VXLAN
//! devices, static-egress, its tunnel and its fast path, alternated many times in one run
//! (hand, hand's tunnel, ours, tunnel, fast, fast, tunnel, ...: each round in the other order
//! than the last, so that a drift of the machine weighs on all alike). Each variant's
//! request/response latency, one-stream TCP goodput, 64-byte packet rate and CPU per round
//! trip, gigabit and packet are paired with the hand-built path's of the same round (the
//! tunnel's with the direct path's and with the hand-built tunnel's). The differences of the pairs, with a
//! 95% confidence interval, tell a gap of a few microseconds or percent from the noise of one run, which the
//! medians of single runs could not (`datapath` showed -3 to +14.7 µs for the same code, and
//! one-stream goodput swings by 10-20% between runs).
//!
//! The quiet time after each set-up is measured too, in short windows: whether the first
//! seconds after the agents start are slower than the steady state, and than the hand-built
//! path's first seconds.

use std::time::{Duration, Instant};

use anyhow::Result;

use super::lab::{Bench, Size, Variant};
use super::measure;

/// One round: the variants measured back to back.
#[derive(Clone, Debug)]
pub struct Round {
    pub hand: Leg,
    /// The hand-built path through the kernel's VXLAN devices.
    pub hand_tunnel: Leg,
    pub ours: Leg,
    /// `--tunnel always`.
    pub tunnel: Leg,
    /// `--fast-path`.
    pub fast: Leg,
}

/// One variant's figures in a round.
#[derive(Clone, Debug)]
pub struct Leg {
    pub p50_us: f64,
    pub p99_us: f64,
    /// Busy CPU of the whole machine per round trip, in microseconds.
    pub cpu_us: f64,
    /// One TCP stream's goodput.
    pub tcp_gbps: f64,
    /// Busy CPU of the whole machine per gigabit of that stream, in CPU-seconds.
    pub cpu_s_per_gbit: f64,
    /// 64-byte datagrams the external host received, thousands per second (trafgen).
    pub udp_kpps: f64,
    /// Busy CPU of the whole machine per datagram received, in nanoseconds.
    pub cpu_ns_per_packet: f64,
    /// The quiet time after set-up, in windows: (seconds from set-up to the window's end, its
    /// RR p50 in microseconds).
    pub start: Vec<(f64, f64)>,
}

/// How much each variant of a round is measured.
#[derive(Clone, Copy, Debug)]
pub struct Effort {
    pub rounds: usize,
    pub round_trips: u32,
    /// Quiet time after a variant is set up (measured in windows), before its figures.
    pub settle: Duration,
    /// Length of the one-stream TCP run, and of the 64-byte stream.
    pub stream_seconds: u64,
}

/// Round trips in one window of the quiet time: about 50 ms of them.
const WINDOW_ROUND_TRIPS: u32 = 2_000;

/// `effort.rounds` rounds of the five variants; the bench lab is left clean after the last.
pub fn run(bench: &mut Bench, effort: Effort) -> Result<Vec<Round>> {
    let mut out = Vec::with_capacity(effort.rounds);
    for i in 0..effort.rounds {
        let mut order = [
            Variant::Hand,
            Variant::HandTunnel,
            Variant::Ours,
            Variant::Tunnel,
            Variant::Fast,
        ];
        if i % 2 == 1 {
            order.reverse();
        }
        let (mut hand, mut hand_tunnel, mut ours, mut tunnel, mut fast) =
            (None, None, None, None, None);
        for variant in order {
            println!("paired round {}: {}", i + 1, variant.title());
            let leg = measure_leg(bench, variant, effort)?;
            match variant {
                Variant::Hand => hand = Some(leg),
                Variant::HandTunnel => hand_tunnel = Some(leg),
                Variant::Ours => ours = Some(leg),
                Variant::Tunnel => tunnel = Some(leg),
                Variant::Fast => fast = Some(leg),
                // Not in `order`.
                Variant::None | Variant::Iptables => {}
            }
        }
        if let (Some(hand), Some(hand_tunnel), Some(ours), Some(tunnel), Some(fast)) =
            (hand, hand_tunnel, ours, tunnel, fast)
        {
            out.push(Round {
                hand,
                hand_tunnel,
                ours,
                tunnel,
                fast,
            });
        }
    }
    bench.leave()?;
    Ok(out)
}

fn measure_leg(bench: &mut Bench, variant: Variant, effort: Effort) -> Result<Leg> {
    bench.enter(variant, Size::ONE)?;
    let set_up = Instant::now();
    let mut start = Vec::new();
    while set_up.elapsed() < effort.settle {
        let (p50, _) = measure::rr(&bench.cluster, &bench.pod, WINDOW_ROUND_TRIPS)?;
        start.push((set_up.elapsed().as_secs_f64(), p50));
    }
    let (p50_us, p99_us, cpu_us) =
        measure::rr_with_cpu(&bench.cluster, &bench.pod, effort.round_trips)?;
    let (tcp_gbps, cpu_s_per_gbit) =
        measure::tcp_with_cpu(&bench.cluster, &bench.pod, effort.stream_seconds)?;
    let (udp_kpps, cpu_ns_per_packet) =
        measure::udp_small(&bench.cluster, &bench.pod, effort.stream_seconds)?;
    Ok(Leg {
        p50_us,
        p99_us,
        cpu_us,
        tcp_gbps,
        cpu_s_per_gbit,
        udp_kpps,
        cpu_ns_per_packet,
        start,
    })
}

/// Mean of `values` and the half-width of its 95% confidence interval (Student's t).
pub fn mean_ci(values: &[f64]) -> (f64, f64) {
    let n = values.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, f64::INFINITY);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    (mean, t_975(n - 1) * (var / n as f64).sqrt())
}

/// The 97.5th percentile of Student's t with `dof` degrees of freedom.
fn t_975(dof: usize) -> f64 {
    const TABLE: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    TABLE.get(dof.saturating_sub(1)).copied().unwrap_or(1.96)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_follow_students_t() {
        let (mean, half) = mean_ci(&[1.0, 2.0, 3.0, 4.0, 5.0]);
        assert!((mean - 3.0).abs() < 1e-9);
        // s = 1.5811, s/sqrt(5) = 0.7071, t(4) = 2.776.
        assert!((half - 1.963).abs() < 1e-3, "{half}");
        assert!(mean_ci(&[1.0]).1.is_infinite());
    }
}
