//! `cargo xtask bench profile`: where the time goes. The whole machine is sampled with `perf
//! record -e cpu-clock` (these machines have no hardware counters) while one variant carries a
//! load, for the hand-built path and for ours, and each kernel or user symbol's CPU time is
//! divided by the work done (round trips, megabytes moved, datagrams): the symbols whose cost differs
//! most between the two are where our path spends what the hand-built one does not.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::lab::{Bench, Size, Variant};
use super::measure;

/// One sample per 100 µs of CPU time on each CPU.
const PERIOD_NS: u64 = 100_000;
/// Symbols where an idle CPU waits: not work.
const IDLE: [&str; 5] = ["idle", "safe_halt", "mwait", "cpu_startup_entry", "do_idle"];

/// A load the variants are compared under.
#[derive(Clone, Copy, Debug)]
pub enum Load {
    /// Round trips of 64 B on one connection; costs per round trip.
    Rr(u32),
    /// One TCP stream for this many seconds; costs per megabyte moved.
    Tcp(u64),
    /// 64-byte UDP datagrams from trafgen for this many seconds; costs per datagram received.
    Small(u64),
}

impl Load {
    fn unit(self) -> &'static str {
        match self {
            Self::Rr(_) => "round trip",
            Self::Tcp(_) => "MB",
            Self::Small(_) => "64 B packet",
        }
    }
}

/// The CPU time (ns) per unit of work of every symbol that was not idle, and the work done.
pub struct Profile {
    pub variant: Variant,
    pub load: Load,
    pub per_unit_ns: BTreeMap<String, f64>,
}

impl Profile {
    fn total(&self) -> f64 {
        self.per_unit_ns.values().sum()
    }
}

/// Profiles `variants` under each of `loads`, in that order, writing perf's data files to `dir`.
pub fn run(
    bench: &mut Bench,
    variants: &[Variant],
    loads: &[Load],
    dir: &Path,
) -> Result<Vec<Profile>> {
    std::fs::create_dir_all(dir)?;
    let mut out = Vec::new();
    for &load in loads {
        for &variant in variants {
            println!("profile: {} under {load:?}", variant.title());
            bench.enter(variant, Size::ONE)?;
            std::thread::sleep(super::SETTLE);
            let data = dir.join(format!(
                "perf-{}-{}.data",
                variant.key(),
                load.unit().replace(' ', "-")
            ));
            let work = record(bench, load, &data)?;
            out.push(Profile {
                variant,
                load,
                per_unit_ns: per_unit(&report(&data)?, work),
            });
        }
    }
    bench.leave()?;
    Ok(out)
}

/// Records the whole machine while the pod runs `load`; the units of work done.
fn record(bench: &Bench, load: Load, data: &Path) -> Result<f64> {
    let period = PERIOD_NS.to_string();
    let mut perf = Command::new("perf");
    perf.args(["record", "-e", "cpu-clock", "-c", &period, "-a", "-q", "-o"])
        .arg(data)
        .arg("--");
    match load {
        Load::Rr(count) => {
            let line = crate::util::output(perf.args(measure::rr_command(
                &bench.cluster,
                &bench.pod,
                count,
            )))?;
            measure::field(&line, "n")
        }
        Load::Small(seconds) => {
            let _stream =
                netlab::trafgen::Stream::start(&bench.cluster, &bench.pod, measure::SMALL_PORT)?;
            let before = measure::received(&bench.cluster)?;
            let secs = seconds.to_string();
            crate::util::output(perf.args(["sleep", &secs]))?;
            Ok((measure::received(&bench.cluster)? - before) as f64)
        }
        Load::Tcp(seconds) => {
            let report = crate::util::output(perf.args(measure::iperf_command(
                &bench.cluster,
                &bench.pod,
                seconds,
                &[],
            )))?;
            let report: serde_json::Value =
                serde_json::from_str(&report).context("iperf3 printed no JSON")?;
            let bytes = report["end"]["sum_received"]["bytes"]
                .as_f64()
                .context("iperf3 JSON without end.sum_received.bytes")?;
            Ok(bytes / 1e6)
        }
    }
}

/// Samples per symbol, from `perf report`.
fn report(data: &Path) -> Result<BTreeMap<String, u64>> {
    let text = crate::util::output(
        Command::new("perf")
            .args([
                "report",
                "--no-children",
                "--sort",
                "sym",
                "--stdio",
                "-q",
                "-n",
                "-i",
            ])
            .arg(data),
    )?;
    let samples = parse_report(&text);
    if samples.is_empty() {
        bail!("perf report of {} had no samples", data.display());
    }
    Ok(samples)
}

/// Lines like `    12.34%  1234  [k] tcp_sendmsg`: the sample count and the symbol.
fn parse_report(text: &str) -> BTreeMap<String, u64> {
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let (Some(_share), Some(count), Some(_kind)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let Ok(count) = count.parse::<u64>() else {
            continue;
        };
        let symbol = fields.collect::<Vec<_>>().join(" ");
        if symbol.is_empty() || IDLE.iter().any(|i| symbol.contains(i)) {
            continue;
        }
        *samples.entry(symbol).or_insert(0) += count;
    }
    samples
}

fn per_unit(samples: &BTreeMap<String, u64>, work: f64) -> BTreeMap<String, f64> {
    samples
        .iter()
        .map(|(s, n)| (s.clone(), (*n * PERIOD_NS) as f64 / work.max(1e-9)))
        .collect()
}

/// The variants profiled, in this order.
pub const VARIANTS: [Variant; 5] = [
    Variant::Hand,
    Variant::Ours,
    Variant::Fast,
    Variant::Tunnel,
    Variant::HandTunnel,
];

/// The profiles compared, as the paired rounds compare them: each path with the hand-built one,
/// the tunnel with the direct path and with the tunnel built by hand, and that one with the
/// hand-built direct path (what VXLAN itself costs).
const COMPARED: [(Variant, Variant); 5] = [
    (Variant::Hand, Variant::Ours),
    (Variant::Hand, Variant::Fast),
    (Variant::Ours, Variant::Tunnel),
    (Variant::Hand, Variant::HandTunnel),
    (Variant::HandTunnel, Variant::Tunnel),
];

/// For each load: busy CPU per unit of each variant, then for each pair of [`COMPARED`] the
/// `top` symbols whose cost differs most between the two, in ns per unit.
pub fn markdown(profiles: &[Profile], top: usize) -> String {
    let mut md = String::new();
    let loads: Vec<Load> = profiles.iter().fold(Vec::new(), |mut acc, p| {
        if !acc.iter().any(|l: &Load| l.unit() == p.load.unit()) {
            acc.push(p.load);
        }
        acc
    });
    for load in loads {
        let of_load: Vec<&Profile> = profiles
            .iter()
            .filter(|p| p.load.unit() == load.unit())
            .collect();
        let unit = load.unit();
        let _ = writeln!(
            md,
            "**Profile under {load:?}** (`perf record -e cpu-clock -a`, whole machine, idle left out; ns of CPU per {unit}):\n"
        );
        for p in &of_load {
            let _ = writeln!(
                md,
                "- {}: {:.0} ns per {unit}",
                p.variant.title(),
                p.total()
            );
        }
        let of_variant = |v: Variant| of_load.iter().find(|p| p.variant == v);
        for (base, other) in COMPARED
            .iter()
            .filter_map(|&(a, b)| of_variant(a).zip(of_variant(b)))
        {
            let mut diff: Vec<(String, f64, f64)> = base
                .per_unit_ns
                .keys()
                .chain(other.per_unit_ns.keys())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .map(|s| {
                    let a = base.per_unit_ns.get(s).copied().unwrap_or(0.0);
                    let b = other.per_unit_ns.get(s).copied().unwrap_or(0.0);
                    (s.clone(), a, b)
                })
                .collect();
            diff.sort_by(|x, y| (y.2 - y.1).abs().total_cmp(&(x.2 - x.1).abs()));
            let _ = writeln!(
                md,
                "\n| symbol | {} | {} | difference |\n|---|---|---|---|",
                base.variant.key(),
                other.variant.key()
            );
            for (s, a, b) in diff.into_iter().take(top) {
                let _ = writeln!(md, "| `{s}` | {a:.0} | {b:.0} | {:+.0} |", b - a);
            }
        }
        md.push('\n');
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_samples_per_symbol_and_leaves_idle_out() {
        let text = "    40.00%  400  [k] pv_native_safe_halt\n    12.50%  125  [k] tcp_sendmsg\n     1.00%   10  [.] main\n\n";
        let samples = parse_report(text);
        assert_eq!(samples.len(), 2);
        assert_eq!(samples["tcp_sendmsg"], 125);
        assert_eq!(per_unit(&samples, 10.0)["main"], 100_000.0);
    }

    #[test]
    fn the_tunnel_is_set_beside_the_direct_path_and_the_tunnel_built_by_hand() {
        let profile = |variant, ns: &[(&str, f64)]| Profile {
            variant,
            load: Load::Tcp(1),
            per_unit_ns: ns.iter().map(|(s, n)| ((*s).to_owned(), *n)).collect(),
        };
        let md = markdown(
            &[
                profile(Variant::Hand, &[("ip_forward", 10.0)]),
                profile(Variant::Ours, &[("ip_forward", 10.0), ("bpf_prog", 2.0)]),
                profile(Variant::Tunnel, &[("ip_forward", 10.0), ("vxlan_rcv", 5.0)]),
                profile(
                    Variant::HandTunnel,
                    &[("ip_forward", 10.0), ("vxlan_rcv", 7.0)],
                ),
            ],
            5,
        );
        let tables: Vec<&str> = md.lines().filter(|l| l.starts_with("| symbol")).collect();
        // Without the fast path's profile, its comparison is left out.
        assert_eq!(
            tables,
            [
                "| symbol | hand | static-egress | difference |",
                "| symbol | static-egress | static-egress-tunnel | difference |",
                "| symbol | hand | hand-vxlan | difference |",
                "| symbol | hand-vxlan | static-egress-tunnel | difference |",
            ],
            "{md}"
        );
        assert!(md.contains("| `vxlan_rcv` | 7 | 5 | -2 |"), "{md}");
        assert!(
            md.contains("- 7 hand-built VXLAN devices + ip rule + nft SNAT: 17 ns per MB"),
            "{md}"
        );
    }
}
