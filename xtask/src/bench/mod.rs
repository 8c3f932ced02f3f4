//! `cargo xtask bench`: static-egress against no policy, a hand-built policy and an
//! iptables/ipset one, on the same namespace topology and traffic, back to back in one run.

mod failover;
mod idle;
mod lab;
mod measure;
mod paired;
mod profile;
mod report;

use std::time::Duration;

use anyhow::{Context, Result};

use crate::util::target_dir;
use crate::{build, setup};
use lab::{Bench, Size, Variant};
use measure::{Effort, Sample};

#[derive(clap::Args)]
pub struct Options {
    /// Run only this part.
    #[arg(value_enum)]
    part: Option<Part>,
    /// Longer runs, three rounds (medians), and the 100,000-pod memory point.
    #[arg(long)]
    full: bool,
    /// Use the release binaries already in the target directory instead of building them.
    #[arg(long)]
    no_build: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// Throughput, small-packet rate and latency of the six variants.
    Datapath,
    /// Latency and one-stream goodput of the hand-built path, static-egress, its tunnel and
    /// its fast path, alternated in rounds, with the differences' confidence intervals.
    Latency,
    /// Per-packet cost as selected pods, destination prefixes and gateways grow.
    Scale,
    /// Change-to-data-path time, start-up and memory of the agent.
    Control,
    /// Takeover times of unplanned and planned moves, surviving connections, probe cost.
    Failover,
    /// Where the CPU time goes: the hand-built path and ours (direct and tunneled) sampled
    /// with perf under request/response and TCP load, symbol by symbol. Not part of a run of
    /// every part.
    Profile,
}

struct Settings {
    rounds: usize,
    datapath: Effort,
    scale: Effort,
    pods: &'static [u32],
    dests: &'static [u32],
    gateways: &'static [u32],
    changes: u32,
    memory_pods: &'static [u32],
    /// How long idle CPU is sampled; 30 s or more includes one full re-check of the host.
    idle_window: Duration,
    /// Rounds of one unplanned and one planned move each.
    failover_rounds: usize,
    /// Rounds of the paired part (hand-built, static-egress, its tunnel and fast path).
    paired: paired::Effort,
    /// Round trips sampled per variant by the profile part.
    profile_round_trips: u32,
}

const QUICK: Settings = Settings {
    rounds: 1,
    datapath: Effort {
        seconds: 3,
        streams: 4,
        round_trips: 5_000,
    },
    scale: Effort {
        seconds: 2,
        streams: 1,
        round_trips: 3_000,
    },
    pods: &[1, 100, 1_000, 10_000],
    dests: &[1, 10, 100, 1_000],
    gateways: &[1, 10, 100],
    changes: 30,
    memory_pods: &[10_000],
    idle_window: Duration::from_secs(10),
    failover_rounds: 20,
    paired: paired::Effort {
        rounds: 8,
        round_trips: 3_000,
        settle: Duration::from_secs(2),
        stream_seconds: 2,
    },
    profile_round_trips: 20_000,
};

const FULL: Settings = Settings {
    rounds: 3,
    datapath: Effort {
        seconds: 10,
        streams: 4,
        round_trips: 20_000,
    },
    scale: Effort {
        seconds: 5,
        streams: 1,
        round_trips: 10_000,
    },
    pods: &[1, 100, 1_000, 10_000, 100_000],
    dests: &[1, 10, 100, 1_000, 10_000],
    gateways: &[1, 10, 100],
    changes: 100,
    memory_pods: &[10_000, 100_000],
    idle_window: Duration::from_secs(35),
    failover_rounds: 50,
    paired: paired::Effort {
        rounds: 20,
        round_trips: 10_000,
        settle: Duration::from_secs(6),
        stream_seconds: 4,
    },
    profile_round_trips: 100_000,
};

/// Pause between object changes, so each is its own file event and reconcile.
const CHANGE_GAP: Duration = Duration::from_millis(100);
/// Idle time before reading an agent's memory, past its first periodic re-check.
const IDLE_BEFORE_RSS: Duration = Duration::from_secs(6);
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Quiet time after a variant is set up, before measuring: the first seconds after the agents
/// start are measurably slower (see the README's bench section), and the comparison is of
/// steady states.
const SETTLE: Duration = Duration::from_secs(6);

/// Quiet time after a scale point's policy is in place, before it is measured.
const POINT_SETTLE: Duration = Duration::from_secs(3);

/// Which axis a scale point grows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Axis {
    Pods,
    Dests,
    Gateways,
}

impl Axis {
    pub const ALL: [Self; 3] = [Self::Pods, Self::Dests, Self::Gateways];

    pub fn key(self) -> &'static str {
        match self {
            Self::Pods => "pods",
            Self::Dests => "dests",
            Self::Gateways => "gateways",
        }
    }

    fn size(self, n: u32) -> Size {
        match self {
            Self::Pods => Size {
                pods: n,
                ..Size::ONE
            },
            Self::Dests => Size {
                dests: n,
                ..Size::ONE
            },
            Self::Gateways => Size {
                gateways: n,
                ..Size::ONE
            },
        }
    }
}

pub struct ScalePoint {
    pub axis: Axis,
    pub n: u32,
    pub variant: Variant,
    pub sample: Sample,
}

pub struct Startup {
    pub pods: u32,
    pub seconds: f64,
    /// (node, VmRSS in KiB) of each agent after idling.
    pub rss_kib: Vec<(String, u64)>,
    /// (node, share of one core in percent) each agent used while idle.
    pub idle_cpu_percent: Vec<(String, f64)>,
}

#[derive(Default)]
pub struct Results {
    pub settings: String,
    /// Per variant, every round's sample.
    pub datapath: Vec<(Variant, Vec<Sample>)>,
    pub scale: Vec<ScalePoint>,
    pub change_ms: Vec<f64>,
    pub startups: Vec<Startup>,
    pub failover: Option<failover::FailoverResults>,
    pub paired: Vec<paired::Round>,
    pub profile: Vec<profile::Profile>,
}

pub fn run(options: &Options) -> Result<()> {
    netlab::require_root().context("the bench builds network namespaces")?;
    setup::run(&setup::Options {
        verbose: false,
        no_kube: true,
    })?;
    let (agent, probe) = if options.no_build {
        let dir = target_dir().join("release");
        (dir.join("static-egress"), dir.join("se-probe"))
    } else {
        let artifacts = build::run(&build::Options { release: true })?;
        (artifacts.agent, artifacts.probe)
    };
    let settings = if options.full { &FULL } else { &QUICK };
    let idle = idle::PollingIdle::hold();
    let wanted = |part| {
        options.part.is_none_or(|p| p == part)
            && (part != Part::Profile || options.part == Some(Part::Profile))
    };

    let mut results = Results {
        settings: format!("{}; {}", describe(settings), idle.describe()),
        ..Results::default()
    };
    if [
        Part::Datapath,
        Part::Latency,
        Part::Scale,
        Part::Control,
        Part::Profile,
    ]
    .into_iter()
    .any(wanted)
    {
        let mut bench = Bench::new(&agent, &probe)?;
        println!("bench lab {} is up", bench.cluster.prefix());
        let _servers = measure::start_servers(&bench.cluster)?;
        if wanted(Part::Datapath) {
            datapath(&mut bench, settings, &mut results)?;
        }
        if wanted(Part::Latency) {
            results.paired = paired::run(&mut bench, settings.paired)?;
        }
        if wanted(Part::Scale) {
            scale(&mut bench, settings, &mut results)?;
        }
        if wanted(Part::Control) {
            control(&mut bench, settings, &mut results)?;
        }
        if wanted(Part::Profile) {
            results.profile = profile::run(
                &mut bench,
                &profile::VARIANTS,
                &[
                    profile::Load::Rr(settings.profile_round_trips),
                    profile::Load::Tcp(settings.datapath.seconds),
                    profile::Load::Small(settings.datapath.seconds),
                ],
                &target_dir().join("bench"),
            )?;
        }
        bench.leave()?;
    }
    if wanted(Part::Failover) {
        println!("failover: {} rounds", settings.failover_rounds);
        results.failover = Some(failover::run(&agent, &probe, settings.failover_rounds)?);
    }

    let command = match (options.part, options.full) {
        (None, false) => "cargo xtask bench".to_owned(),
        (None, true) => "cargo xtask bench --full".to_owned(),
        (Some(p), full) => format!(
            "cargo xtask bench {}{}",
            format!("{p:?}").to_lowercase(),
            if full { " --full" } else { "" }
        ),
    };
    let dir = target_dir().join("bench");
    let markdown = report::write(&dir, &results, &command)?;
    println!("\n{markdown}");
    println!("written to {}", dir.display());
    Ok(())
}

fn describe(s: &Settings) -> String {
    format!(
        "{} round(s) per variant, median shown; iperf3 {} s per run, {} streams for the \
         multi-stream figure; {} round trips of 64 B for latency; scale points: iperf3 {} s, {} \
         round trips; paired rounds: {}, each variant {} round trips, then a {} s TCP stream \
         and as long a 64 B stream",
        s.rounds,
        s.datapath.seconds,
        s.datapath.streams,
        s.datapath.round_trips,
        s.scale.seconds,
        s.scale.round_trips,
        s.paired.rounds,
        s.paired.round_trips,
        s.paired.stream_seconds,
    )
}

fn datapath(bench: &mut Bench, settings: &Settings, results: &mut Results) -> Result<()> {
    let mut samples: Vec<(Variant, Vec<Sample>)> =
        Variant::ALL.iter().map(|v| (*v, Vec::new())).collect();
    for round in 1..=settings.rounds {
        for (variant, list) in &mut samples {
            println!("datapath round {round}: {}", variant.title());
            bench.enter(*variant, Size::ONE)?;
            std::thread::sleep(SETTLE);
            list.push(measure::sample(
                &bench.cluster,
                &bench.pod,
                settings.datapath,
                true,
            )?);
        }
    }
    bench.leave()?;
    results.datapath = samples;
    Ok(())
}

fn scale(bench: &mut Bench, settings: &Settings, results: &mut Results) -> Result<()> {
    // Rounds outermost and the variant next: the agents then only see object changes, not
    // restarts, within a round; each point's figure is the median of its rounds.
    let mut rounds: Vec<Vec<ScalePoint>> = Vec::new();
    for round in 1..=settings.rounds {
        let mut points = Vec::new();
        for variant in [Variant::Iptables, Variant::Ours] {
            for axis in Axis::ALL {
                // The iptables variant is kube-static-egress-ip's single gateway.
                if variant == Variant::Iptables && axis == Axis::Gateways {
                    continue;
                }
                let ns = match axis {
                    Axis::Pods => settings.pods,
                    Axis::Dests => settings.dests,
                    Axis::Gateways => settings.gateways,
                };
                for &n in ns {
                    println!(
                        "scale round {round}: {} with {n} {}",
                        variant.key(),
                        axis.key()
                    );
                    let fresh = bench.active() != Some(variant);
                    bench.enter(variant, axis.size(n))?;
                    // Steady states are compared, not the moments right after a change of up
                    // to 100,000 pods, which the datapath part's settling time also leaves out.
                    std::thread::sleep(if fresh { SETTLE } else { POINT_SETTLE });
                    let sample =
                        measure::sample(&bench.cluster, &bench.pod, settings.scale, false)?;
                    points.push(ScalePoint {
                        axis,
                        n,
                        variant,
                        sample,
                    });
                }
            }
        }
        rounds.push(points);
    }
    if let Some(first) = rounds.first() {
        results.scale = (0..first.len())
            .map(|i| {
                let samples: Vec<Sample> = rounds.iter().map(|r| r[i].sample).collect();
                ScalePoint {
                    sample: Sample::median(&samples),
                    ..first[i]
                }
            })
            .collect();
    }
    bench.leave()
}

/// CPU the agents use with nothing changing: status refreshes and, in a window of 30 s or more,
/// one full re-check of the host.
fn idle_cpu(bench: &Bench, window: Duration) -> Result<Vec<(String, f64)>> {
    let before = bench
        .agents()
        .iter()
        .map(|a| measure::cpu_time(a.pid()))
        .collect::<Result<Vec<_>>>()?;
    std::thread::sleep(window);
    bench
        .agents()
        .iter()
        .zip(before)
        .map(|(a, t0)| {
            let used = measure::cpu_time(a.pid())?.saturating_sub(t0);
            Ok((
                a.node().to_owned(),
                used.as_secs_f64() / window.as_secs_f64() * 100.0,
            ))
        })
        .collect()
}

fn control(bench: &mut Bench, settings: &Settings, results: &mut Results) -> Result<()> {
    println!("control: {} object changes", settings.changes);
    bench.enter(Variant::Ours, Size::ONE)?;
    for i in 0..settings.changes {
        std::thread::sleep(CHANGE_GAP);
        let started = std::time::Instant::now();
        bench.toggle_churn_pod(i % 2 == 0)?;
        bench.wait_agents(CHANGE_TIMEOUT)?;
        results
            .change_ms
            .push(started.elapsed().as_secs_f64() * 1e3);
    }
    for &pods in settings.memory_pods {
        println!("control: cold start with {pods} pods");
        let took = bench.cold_start(pods)?;
        std::thread::sleep(IDLE_BEFORE_RSS);
        let rss_kib = bench
            .agents()
            .iter()
            .map(|a| Ok((a.node().to_owned(), measure::rss_kib(a.pid())?)))
            .collect::<Result<Vec<_>>>()?;
        let idle_cpu_percent = idle_cpu(bench, settings.idle_window)?;
        results.startups.push(Startup {
            pods,
            seconds: took.as_secs_f64(),
            rss_kib,
            idle_cpu_percent,
        });
    }
    bench.leave()
}
