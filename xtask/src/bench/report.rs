//! The bench's Markdown table, raw JSON and SVG chart under `target/bench/`.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::failover::{self, FailoverResults};
use super::lab::Variant;
use super::measure::{Sample, median};
use super::paired::{Leg, Round, mean_ci};
use super::{Axis, Results};

const TARGET_THROUGHPUT: f64 = 0.97;
const TARGET_ADDED_P50_US: f64 = 5.0;
/// "Flat": the largest scale point's RR p50 within this factor of the smallest one's, and its throughput
/// within the inverse.
const FLAT_FACTOR: f64 = 1.10;
const TARGET_CHANGE_P99_MS: f64 = 100.0;
const TARGET_RSS_MIB: f64 = 50.0;
const RSS_TARGET_PODS: u32 = 10_000;
const TARGET_TAKEOVER_P99_MS: f64 = 300.0;

/// Writes `report.md`, `raw.json` and `chart.svg` into `dir`; returns the Markdown.
pub fn write(dir: &Path, results: &Results, command: &str) -> Result<String> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let header = machine(command);
    let markdown = markdown(results, &header);
    let files = [
        ("report.md", markdown.clone()),
        (
            "raw.json",
            serde_json::to_string_pretty(&raw(results, &header))?,
        ),
        ("chart.svg", chart(results)),
    ];
    for (name, text) in files {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(markdown)
}

/// Date, core count, kernel and command, for the table's caption.
fn machine(command: &str) -> String {
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{date}, {cores} cores (`nproc`), kernel {} (`uname -r`), `{command}`",
        kernel.trim()
    )
}

fn medians(results: &Results) -> Vec<(Variant, Sample)> {
    results
        .datapath
        .iter()
        .map(|(v, s)| (*v, Sample::median(s)))
        .collect()
}

fn of(medians: &[(Variant, Sample)], variant: Variant) -> Option<Sample> {
    medians.iter().find(|(v, _)| *v == variant).map(|(_, s)| *s)
}

fn cell(value: f64, base: f64, unit: &str, decimals: usize) -> String {
    format!("{value:.decimals$} {unit} ({:.2})", value / base)
}

type Pick = fn(&Round) -> &Leg;

const HAND: Pick = |r| &r.hand;
const OURS: Pick = |r| &r.ours;
const TUNNEL: Pick = |r| &r.tunnel;
const FAST: Pick = |r| &r.fast;
const HAND_TUNNEL: Pick = |r| &r.hand_tunnel;

/// The paired part's variants, as its table shows them.
const PAIRED_VARIANTS: [(&str, Pick); 5] = [
    ("hand-built (median of rounds)", HAND),
    ("static-egress", OURS),
    ("--fast-path", FAST),
    ("tunnel", TUNNEL),
    ("hand-built VXLAN", HAND_TUNNEL),
];

/// What the paired part compares: each variant with the hand-built path; the tunnel with the
/// direct path and with the hand-built tunnel, whose own cost over the hand-built path is
/// beside it.
const COMPARED: [(&str, Pick, Pick); 5] = [
    ("static-egress - hand-built", OURS, HAND),
    ("--fast-path - hand-built", FAST, HAND),
    ("tunnel - static-egress", TUNNEL, OURS),
    ("hand-built VXLAN - hand-built", HAND_TUNNEL, HAND),
    ("tunnel - hand-built VXLAN", TUNNEL, HAND_TUNNEL),
];

/// Mean over the rounds of `f(a) - f(b)`, and the half-width of its 95% interval.
fn paired_diff(rounds: &[Round], a: Pick, b: Pick, f: fn(&Leg) -> f64) -> (f64, f64) {
    mean_ci(&rounds.iter().map(|r| f(a(r)) - f(b(r))).collect::<Vec<_>>())
}

/// Mean over the rounds of `f(a) / f(b)`, and the half-width of its 95% interval.
fn paired_ratio(rounds: &[Round], a: Pick, b: Pick, f: fn(&Leg) -> f64) -> (f64, f64) {
    mean_ci(&rounds.iter().map(|r| f(a(r)) / f(b(r))).collect::<Vec<_>>())
}

/// How a figure of the paired rounds is compared with its pair.
#[derive(Clone, Copy)]
enum Compare {
    /// A time: the mean difference, in microseconds.
    Difference,
    /// A rate or a cost per unit: the mean ratio.
    Ratio,
}

/// One row of the paired table.
struct PairedRow {
    label: &'static str,
    figure: fn(&Leg) -> f64,
    unit: &'static str,
    decimals: usize,
    compare: Compare,
}

const PAIRED_ROWS: [PairedRow; 7] = [
    PairedRow {
        label: "RR p50",
        figure: |l| l.p50_us,
        unit: "µs",
        decimals: 1,
        compare: Compare::Difference,
    },
    PairedRow {
        label: "RR p99",
        figure: |l| l.p99_us,
        unit: "µs",
        decimals: 1,
        compare: Compare::Difference,
    },
    PairedRow {
        label: "CPU per round trip (whole machine)",
        figure: |l| l.cpu_us,
        unit: "µs",
        decimals: 1,
        compare: Compare::Difference,
    },
    PairedRow {
        label: "TCP 1 stream",
        figure: |l| l.tcp_gbps,
        unit: "Gbit/s",
        decimals: 2,
        compare: Compare::Ratio,
    },
    PairedRow {
        label: "CPU per Gbit (1 stream, whole machine)",
        figure: |l| l.cpu_s_per_gbit,
        unit: "CPU-s",
        decimals: 3,
        compare: Compare::Ratio,
    },
    PairedRow {
        label: "UDP 64 B rate (trafgen)",
        figure: |l| l.udp_kpps,
        unit: "kpps",
        decimals: 0,
        compare: Compare::Ratio,
    },
    PairedRow {
        label: "CPU per 64 B packet (whole machine)",
        figure: |l| l.cpu_ns_per_packet,
        unit: "ns",
        decimals: 0,
        compare: Compare::Ratio,
    },
];

/// The paired rounds: each variant's median over the rounds, and the mean difference (times)
/// or ratio (rates, costs per unit) of the pairs with its 95% confidence interval. The latency
/// target is judged on the interval's upper end.
fn paired(md: &mut String, rounds: &[Round]) {
    if rounds.is_empty() {
        return;
    }
    let (d50, h50) = paired_diff(rounds, OURS, HAND, |l| l.p50_us);
    let (f50, _) = paired_diff(rounds, FAST, HAND, |l| l.p50_us);
    let _ = writeln!(
        md,
        "**Paired rounds** ({} rounds of the hand-built path, the same through hand-built VXLAN \
         devices, static-egress, its fast path and its tunnel, each round in the other order \
         than the last; 64 B round trips, then one TCP stream, then a stream of 64 B datagrams; \
         differences (latency, CPU per round trip) and ratios (rates, CPU per gigabit and per \
         packet) to the variant named, in the same round, as mean and 95% interval):\n\n\
         | | {} | {} |\n|---|{}",
        rounds.len(),
        PAIRED_VARIANTS.map(|(what, _)| what).join(" | "),
        COMPARED.map(|(what, _, _)| what).join(" | "),
        "---|".repeat(PAIRED_VARIANTS.len() + COMPARED.len()),
    );
    for PairedRow {
        label,
        figure: f,
        unit,
        decimals,
        compare,
    } in PAIRED_ROWS
    {
        let medians = PAIRED_VARIANTS.map(|(_, pick)| {
            let m = median(rounds.iter().map(|r| f(pick(r))));
            format!("{m:.decimals$} {unit}")
        });
        let compared = COMPARED.map(|(_, a, b)| match compare {
            Compare::Ratio => {
                let (mean, half) = paired_ratio(rounds, a, b, f);
                format!("x{mean:.3} ± {half:.3}")
            }
            Compare::Difference => {
                let (mean, half) = paired_diff(rounds, a, b, f);
                format!("{mean:+.1} ± {half:.1} µs")
            }
        });
        let _ = writeln!(
            md,
            "| {label} | {} | {} |",
            medians.join(" | "),
            compared.join(" | ")
        );
    }
    let _ = writeln!(
        md,
        "\nAdded p50 latency <= {TARGET_ADDED_P50_US} µs with the interval's upper end: {}. \
         The fast path's p50 at or below the hand-built path's (mean): {}.",
        yes(d50 + h50 <= TARGET_ADDED_P50_US),
        yes(f50 <= 0.0),
    );
}

/// The quiet time after set-up, second by second: the median of the windows' RR p50 that ended
/// in each second, over every round of the variant, beside its steady p50.
fn start_up(md: &mut String, rounds: &[Round]) {
    let seconds = rounds
        .iter()
        .flat_map(|r| r.hand.start.iter().chain(&r.ours.start))
        .map(|(t, _)| t.ceil() as usize)
        .max()
        .unwrap_or(0);
    if seconds == 0 {
        return;
    }
    let in_second = |legs: &[&Leg], s: usize| {
        median(legs.iter().flat_map(|l| {
            l.start
                .iter()
                .filter(move |(t, _)| t.ceil() as usize == s)
                .map(|(_, p50)| *p50)
        }))
    };
    let hand: Vec<&Leg> = rounds.iter().map(HAND).collect();
    let ours: Vec<&Leg> = rounds.iter().map(OURS).collect();
    let steady = |legs: &[&Leg]| median(legs.iter().map(|l| l.p50_us));
    let (hand_steady, ours_steady) = (steady(&hand), steady(&ours));
    md.push_str(
        "**The first seconds** after each set-up (round trips in windows of 2,000 while the \
         variant settles; RR p50, the median of the windows ending in that second over all \
         rounds; ratio to the variant's steady p50 above):\n\n\
         | second after set-up | hand-built | static-egress |\n|---|---|---|\n",
    );
    for s in 1..=seconds {
        let _ = writeln!(
            md,
            "| {s} | {} | {} |",
            cell(in_second(&hand, s), hand_steady, "µs", 1),
            cell(in_second(&ours, s), ours_steady, "µs", 1),
        );
    }
    md.push('\n');
}

fn yes(ok: bool) -> &'static str {
    if ok { "met" } else { "**missed**" }
}

fn markdown(results: &Results, header: &str) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "{header}; {}.\n", results.settings);
    let medians = medians(results);
    if let Some(base) = of(&medians, Variant::None) {
        md.push_str(
            "**Data path** (same pod, same traffic; ratios to variant 1 in parentheses; variant 1 \
             leaves from node1 and skips the gateway hop, so it is the ceiling):\n\n\
             | variant | path | TCP 1 stream | CPU per Gbit (1 stream, whole machine) | TCP multi-stream | UDP 64 B rate (trafgen) | CPU per 64 B packet | RR p50 | RR p99 |\n\
             |---|---|---|---|---|---|---|---|---|\n",
        );
        for (variant, s) in &medians {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                variant.title(),
                variant.path(),
                cell(s.tcp1_gbps, base.tcp1_gbps, "Gbit/s", 2),
                cell(s.cpu_s_per_gbit, base.cpu_s_per_gbit, "CPU-s", 3),
                cell(s.tcpn_gbps, base.tcpn_gbps, "Gbit/s", 2),
                cell(s.udp_kpps, base.udp_kpps, "kpps", 0),
                cell(s.cpu_ns_per_packet, base.cpu_ns_per_packet, "ns", 0),
                cell(s.rr_p50_us, base.rr_p50_us, "µs", 1),
                cell(s.rr_p99_us, base.rr_p99_us, "µs", 1),
            );
        }
        md.push('\n');
    }
    paired(&mut md, &results.paired);
    start_up(&mut md, &results.paired);
    for axis in Axis::ALL {
        scale_table(&mut md, results, axis);
    }
    control_table(&mut md, results);
    if !results.profile.is_empty() {
        md.push_str(&super::profile::markdown(&results.profile, 25));
    }
    if let Some(f) = &results.failover {
        failover_table(&mut md, f);
    }
    targets(&mut md, results, &medians);
    md
}

fn failover_table(md: &mut String, f: &FailoverResults) {
    let _ = writeln!(
        md,
        "**Failover** ({} rounds on three nodes, agent defaults: a probe every {} ms, a node \
         is down after {} unanswered. Each round cuts the holder off, then connects it again; \
         it takes the egress IP back once it has served for the rejoin time. Time new \
         connections of the pod went unanswered, opened one at a time every {} ms and each \
         given {} ms, so the figures include up to {} ms of the loop's own resolution):\n\n\
         | move | p50 | p99 | max | target |\n|---|---|---|---|---|",
        f.unplanned_ms.len(),
        failover::INTERVAL.as_millis(),
        failover::MISSES,
        failover::LOOP_INTERVAL.as_millis(),
        failover::LOOP_TIMEOUT.as_millis(),
        (failover::LOOP_INTERVAL + failover::LOOP_TIMEOUT).as_millis(),
    );
    for (what, values, target) in [
        ("unplanned: holder cut off", &f.unplanned_ms, true),
        ("planned: holder takes its IP back", &f.planned_ms, false),
    ] {
        let p99 = percentile(values, 0.99);
        let _ = writeln!(
            md,
            "| {what} | {:.0} ms | {p99:.0} ms | {:.0} ms | {} |",
            percentile(values, 0.5),
            values.iter().copied().fold(0.0, f64::max),
            if target {
                format!(
                    "< {TARGET_TAKEOVER_P99_MS:.0} ms p99: {}",
                    yes(p99 < TARGET_TAKEOVER_P99_MS)
                )
            } else {
                "-".to_owned()
            }
        );
    }
    let _ = writeln!(
        md,
        "\nLong-lived connections alive after both moves: {} of {}. Connections the server \
         saw with another source than the egress IP: {}.\n\n\
         Probes: node2's kernel answered {:.0} a second here ({} nodes probe it; {:.0} \
         expected). At 1,000 nodes a candidate answers {:.0} a second and each node sends \
         {:.0} a second per candidate, 58 bytes each way, answered in the kernel.\n\n\
         Peers, as documented: Kube-OVN under 1 s (BFD, underlay with Multus); \
         OVN-Kubernetes a few seconds or longer (5 s probes); Antrea, Calico and Azure several \
         seconds; Cilium's open-source egress gateway does not fail over. None of them keeps \
         established connections across a move.\n",
        f.streams_survived,
        f.streams,
        f.leaked,
        f.answered_pps,
        f.probing_nodes,
        failover::probes_per_second(f.probing_nodes),
        failover::probes_per_second(999),
        failover::probes_per_second(1),
    );
}

fn scale_points(results: &Results, axis: Axis, variant: Variant) -> Vec<(u32, Sample)> {
    results
        .scale
        .iter()
        .filter(|p| p.axis == axis && p.variant == variant)
        .map(|p| (p.n, p.sample))
        .collect()
}

impl Axis {
    /// What grows along the axis, for headings.
    fn what(self) -> &'static str {
        match self {
            Self::Pods => "selected pod IPs",
            Self::Dests => "destination prefixes",
            Self::Gateways => "gateways",
        }
    }

    /// How each variant carries the axis' entries.
    fn note(self) -> &'static str {
        match self {
            Self::Pods => {
                "variant 3: entries of the ipset (hash:ip) on node1 and node2; variant 4: selected \
                 Pod objects, 50,000 on node1 behind one bridge (the pod map on node1, the SNAT \
                 set on node2) and the rest on a node without agent"
            }
            Self::Dests => {
                "variant 3: one iptables MARK rule per prefix in mangle PREROUTING on node1, the \
                 matching one last; variant 4: the gateway's destinationCIDRs (an LPM trie)"
            }
            Self::Gateways => {
                "variant 4 only (kube-static-egress-ip has one gateway): each further gateway \
                 with its own egress IP on node2 and one selected pod on node1"
            }
        }
    }
}

/// A figure of a sample as the tables show it: label, value, unit, decimals.
type Figure = (&'static str, fn(&Sample) -> f64, &'static str, usize);

const SCALE_FIGURES: [Figure; 2] = [
    ("RR p50", |s| s.rr_p50_us, "µs", 1),
    ("TCP 1 stream", |s| s.tcp1_gbps, "Gbit/s", 2),
];

fn scale_table(md: &mut String, results: &Results, axis: Axis) {
    let series: Vec<(Variant, Vec<(u32, Sample)>)> = [Variant::Iptables, Variant::Ours]
        .into_iter()
        .map(|v| (v, scale_points(results, axis, v)))
        .filter(|(_, points)| !points.is_empty())
        .collect();
    let Some((_, rows)) = series.last() else {
        return;
    };
    let what = axis.what();
    let mut header = format!("| {what} |");
    let mut rule = "|---|".to_owned();
    for (label, ..) in SCALE_FIGURES {
        for (variant, _) in &series {
            let short = match variant {
                Variant::Iptables => "3 iptables",
                _ => "4 static-egress",
            };
            let _ = write!(header, " {short} {label} |");
            rule.push_str("---|");
        }
    }
    let _ = write!(
        md,
        "**Scale: {what}** ({}; ratios to the first row of the same variant):\n\n{header}\n{rule}\n",
        axis.note()
    );
    for (row, (n, _)) in rows.iter().enumerate() {
        let _ = write!(md, "| {n} |");
        for (_, value, unit, decimals) in SCALE_FIGURES {
            for (_, points) in &series {
                match (points.first(), points.get(row)) {
                    (Some((_, first)), Some((_, point))) => {
                        let _ = write!(
                            md,
                            " {} |",
                            cell(value(point), value(first), unit, decimals)
                        );
                    }
                    _ => md.push_str(" - |"),
                }
            }
        }
        md.push('\n');
    }
    md.push('\n');
}

fn percentile(values: &[f64], q: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    // Nearest rank; the index is small and non-negative by construction.
    let last = v.len() - 1;
    let index = ((last as f64) * q).round() as usize;
    v[index.min(last)]
}

fn control_table(md: &mut String, results: &Results) {
    if results.change_ms.is_empty() && results.startups.is_empty() {
        return;
    }
    md.push_str("**Control plane** (static-egress agents on node1 and node2):\n\n| measure | value |\n|---|---|\n");
    if !results.change_ms.is_empty() {
        let _ = writeln!(
            md,
            "| object change to both agents' `applied_digest` ({} changes, 1 ms polling) | p50 {:.1} ms, p99 {:.1} ms |",
            results.change_ms.len(),
            percentile(&results.change_ms, 0.5),
            percentile(&results.change_ms, 0.99)
        );
    }
    for s in &results.startups {
        let rss: Vec<String> = s
            .rss_kib
            .iter()
            .map(|(node, kib)| format!("{node} {:.1} MiB", *kib as f64 / 1024.0))
            .collect();
        let cpu: Vec<String> = s
            .idle_cpu_percent
            .iter()
            .map(|(node, pct)| format!("{node} {pct:.2} %"))
            .collect();
        let _ = writeln!(
            md,
            "| cold start with {} pods to applied on both nodes | {:.2} s |\n| agent VmRSS idle with {} pods | {} |\n| agent CPU idle with {} pods (share of one core) | {} |",
            s.pods,
            s.seconds,
            s.pods,
            rss.join(", "),
            s.pods,
            cpu.join(", ")
        );
    }
    md.push('\n');
}

/// Growth of RR p50 and of one-stream throughput from the first to the last scale point.
fn growth(results: &Results, axis: Axis, variant: Variant) -> Option<(f64, f64)> {
    let points = scale_points(results, axis, variant);
    let (first, last) = (points.first()?.1, points.last()?.1);
    Some((
        last.rr_p50_us / first.rr_p50_us,
        last.tcp1_gbps / first.tcp1_gbps,
    ))
}

/// One stream's goodput of `a` over `b` for the targets: the paired rounds' mean ratio when
/// there are any (single runs swing by more than the margins), the datapath medians' otherwise.
fn tcp_ratio(
    results: &Results,
    medians: &[(Variant, Sample)],
    (a, b): (Pick, Pick),
    (va, vb): (Variant, Variant),
    what: &str,
) -> Option<(f64, String)> {
    if results.paired.is_empty() {
        let r = of(medians, va)?.tcp1_gbps / of(medians, vb)?.tcp1_gbps;
        return Some((r, format!("{:.1}% ({what})", r * 100.0)));
    }
    let (r, half) = paired_ratio(&results.paired, a, b, |l| l.tcp_gbps);
    Some((
        r,
        format!("{:.1} ± {:.1}% ({what}, paired)", r * 100.0, half * 100.0),
    ))
}

/// RR p50 of `a` minus `b`, as [`tcp_ratio`] takes it; judged on the interval's upper end.
fn rr_added(
    results: &Results,
    medians: &[(Variant, Sample)],
    (a, b): (Pick, Pick),
    (va, vb): (Variant, Variant),
) -> Option<(f64, String)> {
    if results.paired.is_empty() {
        let d = of(medians, va)?.rr_p50_us - of(medians, vb)?.rr_p50_us;
        return Some((d, format!("{d:+.1} µs RR p50")));
    }
    let (d, half) = paired_diff(&results.paired, a, b, |l| l.p50_us);
    Some((d + half, format!("{d:+.1} ± {half:.1} µs RR p50 (paired)")))
}

/// What one path adds to another: ratios of their one-stream goodput and 64 B rate, and the
/// difference of their RR p50.
struct Added {
    tcp: f64,
    small: f64,
    rr_us: f64,
}

/// [`Added`] of `a` over `b`: the paired rounds' means when the run has them, the datapath
/// medians' otherwise.
fn added_cost(
    results: &Results,
    medians: &[(Variant, Sample)],
    (a, b): (Pick, Pick),
    (va, vb): (Variant, Variant),
) -> Option<Added> {
    if results.paired.is_empty() {
        let (a, b) = (of(medians, va)?, of(medians, vb)?);
        return Some(Added {
            tcp: a.tcp1_gbps / b.tcp1_gbps,
            small: a.udp_kpps / b.udp_kpps,
            rr_us: a.rr_p50_us - b.rr_p50_us,
        });
    }
    let rounds = &results.paired;
    Some(Added {
        tcp: paired_ratio(rounds, a, b, |l| l.tcp_gbps).0,
        small: paired_ratio(rounds, a, b, |l| l.udp_kpps).0,
        rr_us: paired_diff(rounds, a, b, |l| l.p50_us).0,
    })
}

fn targets(md: &mut String, results: &Results, medians: &[(Variant, Sample)]) {
    let mut rows: Vec<(String, String, &str)> = Vec::new();
    let (ours, fast) = (
        ((OURS, HAND), (Variant::Ours, Variant::Hand)),
        ((FAST, HAND), (Variant::Fast, Variant::Hand)),
    );
    if let Some((r1, one)) = tcp_ratio(results, medians, ours.0, ours.1, "1 stream") {
        let multi = of(medians, Variant::Ours)
            .zip(of(medians, Variant::Hand))
            .map(|(o, h)| o.tcpn_gbps / h.tcpn_gbps);
        let shown = multi.map_or_else(String::new, |rn| {
            format!(", {:.1}% (multi-stream)", rn * 100.0)
        });
        rows.push((
            "throughput >= 97% of variant 2".into(),
            format!("{one}{shown}"),
            yes(r1 >= TARGET_THROUGHPUT && multi.is_none_or(|rn| rn >= TARGET_THROUGHPUT)),
        ));
    }
    if let Some((added, shown)) = rr_added(results, medians, ours.0, ours.1) {
        rows.push((
            "added latency <= 5 µs p50 over variant 2".into(),
            shown,
            yes(added <= TARGET_ADDED_P50_US),
        ));
    }
    if let (Some((tcp, one)), Some((_, rr))) = (
        tcp_ratio(results, medians, fast.0, fast.1, "TCP 1 stream"),
        rr_added(results, medians, fast.0, fast.1),
    ) {
        // At or below on the mean: "past" is about where the figures sit, not an interval.
        let faster = if results.paired.is_empty() {
            of(medians, Variant::Fast)
                .zip(of(medians, Variant::Hand))
                .is_some_and(|(f, h)| f.rr_p50_us <= h.rr_p50_us)
        } else {
            paired_diff(&results.paired, FAST, HAND, |l| l.p50_us).0 <= 0.0
        };
        // The 64 B rate as the other two figures: from the pairs when the run has them.
        let small = if results.paired.is_empty() {
            of(medians, Variant::Fast)
                .zip(of(medians, Variant::Hand))
                .map(|(f, h)| {
                    let r = f.udp_kpps / h.udp_kpps;
                    (r, format!(", {r:.2} (64 B rate)"))
                })
        } else {
            let (r, half) = paired_ratio(&results.paired, FAST, HAND, |l| l.udp_kpps);
            Some((
                r,
                format!(
                    ", {:.1} ± {:.1}% (64 B rate, paired)",
                    r * 100.0,
                    half * 100.0
                ),
            ))
        };
        let (small, shown) = small.map_or((None, String::new()), |(r, text)| (Some(r), text));
        rows.push((
            "past hand-built: the fast path at >= 1.00 of variant 2 (variant 6 vs 2)".into(),
            format!("{one}{shown}, {rr}"),
            yes(tcp >= 1.0 && small.is_none_or(|r| r >= 1.0) && faster),
        ));
    }
    let tunnel = ((TUNNEL, OURS), (Variant::Tunnel, Variant::Ours));
    if let (Some((r1, one)), Some((added, rr))) = (
        tcp_ratio(results, medians, tunnel.0, tunnel.1, "1 stream"),
        rr_added(results, medians, tunnel.0, tunnel.1),
    ) {
        rows.push((
            "the tunnel costs no more than the direct path (variant 5 vs 4)".into(),
            format!("{one} of its throughput, {rr}"),
            yes(r1 >= TARGET_THROUGHPUT && added <= TARGET_ADDED_P50_US),
        ));
    }
    // What our wrapping adds to a tunnel against what our redirect adds to the direct path:
    // each over the same path built by hand.
    if let (Some(wrap), Some(redirect)) = (
        added_cost(
            results,
            medians,
            (TUNNEL, HAND_TUNNEL),
            (Variant::Tunnel, Variant::HandTunnel),
        ),
        added_cost(
            results,
            medians,
            (OURS, HAND),
            (Variant::Ours, Variant::Hand),
        ),
    ) {
        let paired = if results.paired.is_empty() {
            ""
        } else {
            " (paired, means)"
        };
        rows.push((
            "the tunnel adds no more to VXLAN built by hand than the direct path adds to the \
             hand-built path (variant 5 vs 7, against 4 vs 2)"
                .into(),
            format!(
                "TCP 1 stream x{:.3} against x{:.3}, 64 B rate x{:.3} against x{:.3}, RR p50 \
                 {:+.1} against {:+.1} µs{paired}",
                wrap.tcp, redirect.tcp, wrap.small, redirect.small, wrap.rr_us, redirect.rr_us
            ),
            yes(wrap.tcp >= redirect.tcp
                && wrap.small >= redirect.small
                && wrap.rr_us <= redirect.rr_us),
        ));
    }
    for axis in Axis::ALL {
        let Some((rr, tcp)) = growth(results, axis, Variant::Ours) else {
            continue;
        };
        let iptables = growth(results, axis, Variant::Iptables)
            .map(|(rr, tcp)| format!("; iptables x{rr:.2}, x{tcp:.2}"))
            .unwrap_or_default();
        rows.push((
            format!(
                "flat cost over {} (last/first: RR p50 <= {FLAT_FACTOR}, TCP 1 stream >= {:.2})",
                axis.what(),
                1.0 / FLAT_FACTOR
            ),
            format!("static-egress RR x{rr:.2}, TCP x{tcp:.2}{iptables}"),
            yes(rr <= FLAT_FACTOR && tcp >= 1.0 / FLAT_FACTOR),
        ));
    }
    if !results.change_ms.is_empty() {
        let p99 = percentile(&results.change_ms, 0.99);
        rows.push((
            "change to data path < 100 ms p99".into(),
            format!("{p99:.1} ms"),
            yes(p99 < TARGET_CHANGE_P99_MS),
        ));
    }
    if let Some(s) = results.startups.iter().find(|s| s.pods == RSS_TARGET_PODS) {
        let max = s.rss_kib.iter().map(|(_, k)| *k).max().unwrap_or(0) as f64 / 1024.0;
        rows.push((
            "agent RSS < 50 MiB at 10k pods".into(),
            format!("{max:.1} MiB (largest agent)"),
            yes(max < TARGET_RSS_MIB),
        ));
    }
    if rows.is_empty() {
        return;
    }
    md.push_str("**Targets:**\n\n| target | result | |\n|---|---|---|\n");
    for (target, result, met) in rows {
        let _ = writeln!(md, "| {target} | {result} | {met} |");
    }
}

fn sample_json(s: &Sample) -> Value {
    json!({
        "tcp1_gbps": s.tcp1_gbps,
        "cpu_s_per_gbit": s.cpu_s_per_gbit,
        "tcpn_gbps": s.tcpn_gbps,
        "udp_kpps": s.udp_kpps,
        "cpu_ns_per_packet": s.cpu_ns_per_packet,
        "rr_p50_us": s.rr_p50_us,
        "rr_p99_us": s.rr_p99_us,
    })
}

fn leg_json(l: &Leg) -> Value {
    json!({
        "rr_p50_us": l.p50_us,
        "rr_p99_us": l.p99_us,
        "cpu_us_per_round_trip": l.cpu_us,
        "tcp1_gbps": l.tcp_gbps,
        "cpu_s_per_gbit": l.cpu_s_per_gbit,
        "udp_kpps": l.udp_kpps,
        "cpu_ns_per_packet": l.cpu_ns_per_packet,
        "start": l.start,
    })
}

fn raw(results: &Results, header: &str) -> Value {
    json!({
        "run": header,
        "settings": results.settings,
        "datapath": results.datapath.iter().map(|(v, samples)| json!({
            "variant": v.key(),
            "samples": samples.iter().map(sample_json).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "scale": results.scale.iter().map(|p| json!({
            "axis": p.axis.key(),
            "n": p.n,
            "variant": p.variant.key(),
            "sample": sample_json(&p.sample),
        })).collect::<Vec<_>>(),
        "paired": results.paired.iter().map(|r| json!({
            "hand": leg_json(&r.hand),
            "hand-vxlan": leg_json(&r.hand_tunnel),
            "static-egress": leg_json(&r.ours),
            "static-egress-tunnel": leg_json(&r.tunnel),
            "static-egress-fast": leg_json(&r.fast),
        })).collect::<Vec<_>>(),
        "change_ms": results.change_ms,
        "failover": results.failover.as_ref().map(|f| json!({
            "unplanned_ms": f.unplanned_ms,
            "planned_ms": f.planned_ms,
            "streams": f.streams,
            "streams_survived": f.streams_survived,
            "leaked": f.leaked,
            "answered_probes_per_second": f.answered_pps,
            "probing_nodes": f.probing_nodes,
        })),
        "startups": results.startups.iter().map(|s| json!({
            "pods": s.pods,
            "seconds": s.seconds,
            "rss_kib": s.rss_kib,
            "idle_cpu_percent": s.idle_cpu_percent,
        })).collect::<Vec<_>>(),
    })
}

// ---- chart --------------------------------------------------------------------------------

const WIDTH: f64 = 900.0;
const PANEL_H: f64 = 260.0;
const COLORS: [&str; 7] = [
    "#888888", "#4e79a7", "#e15759", "#59a14f", "#f28e2b", "#b07aa1", "#76b7b2",
];

fn chart(results: &Results) -> String {
    let mut panels = Vec::new();
    let medians = medians(results);
    if !medians.is_empty() {
        panels.push(bars(&medians));
    }
    for axis in Axis::ALL {
        let series: Vec<Series> = [Variant::Iptables, Variant::Ours]
            .into_iter()
            .map(|v| (v, scale_points(results, axis, v)))
            .filter(|(_, points)| !points.is_empty())
            .collect();
        if !series.is_empty() {
            panels.push(lines(axis.what(), &series));
        }
    }
    let height = PANEL_H * panels.len().max(1) as f64;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for (i, panel) in panels.iter().enumerate() {
        let _ = writeln!(
            svg,
            "<g transform=\"translate(0,{})\">\n{panel}</g>",
            i as f64 * PANEL_H
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// A chart label and how to read its figure from a sample.
type Metric = (&'static str, fn(&Sample) -> f64);

/// Grouped bars: each metric's ratio to variant 1, one bar per variant.
fn bars(medians: &[(Variant, Sample)]) -> String {
    let metrics: [Metric; 5] = [
        ("TCP 1 stream", |s| s.tcp1_gbps),
        ("TCP multi", |s| s.tcpn_gbps),
        ("UDP 64 B rate", |s| s.udp_kpps),
        ("RR p50 (lower is better)", |s| s.rr_p50_us),
        ("RR p99 (lower is better)", |s| s.rr_p99_us),
    ];
    let base = of(medians, Variant::None).unwrap_or_default();
    let ratios: Vec<Vec<f64>> = metrics
        .iter()
        .map(|(_, f)| medians.iter().map(|(_, s)| f(s) / f(&base)).collect())
        .collect();
    let max = ratios
        .iter()
        .flatten()
        .copied()
        .filter(|r| r.is_finite())
        .fold(1.0_f64, f64::max)
        * 1.15;
    let (left, top, plot_w, plot_h) = (60.0, 40.0, WIDTH - 80.0, PANEL_H - 100.0);
    let mut g = format!(
        "<text x=\"{left}\" y=\"20\" font-size=\"14\" font-weight=\"bold\">Data path, ratio to \
         variant 1 (no policy)</text>\n"
    );
    axis_y(&mut g, left, top, plot_w, plot_h, max, "x");
    let group_w = plot_w / metrics.len() as f64;
    let bar_w = group_w * 0.8 / medians.len().max(1) as f64;
    for (m, (label, _)) in metrics.iter().enumerate() {
        let x0 = left + group_w * m as f64 + group_w * 0.1;
        for (v, ratio) in ratios[m].iter().enumerate() {
            let ratio = if ratio.is_finite() { *ratio } else { 0.0 };
            let h = plot_h * ratio / max;
            let x = x0 + bar_w * v as f64;
            let _ = writeln!(
                g,
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{}\"/>\
                 <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"9\" text-anchor=\"middle\">{ratio:.2}</text>",
                top + plot_h - h,
                bar_w - 2.0,
                COLORS[v % COLORS.len()],
                x + bar_w / 2.0,
                top + plot_h - h - 3.0
            );
        }
        let _ = writeln!(
            g,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{label}</text>",
            x0 + group_w * 0.4,
            top + plot_h + 16.0
        );
    }
    legend(
        &mut g,
        left,
        top + plot_h + 36.0,
        medians.iter().map(|(v, _)| *v).collect(),
    );
    g
}

/// A variant's scale points: (n, sample).
type Series = (Variant, Vec<(u32, Sample)>);

/// RR p50 against the scale (log x), one line per variant.
fn lines(what: &str, series: &[Series]) -> String {
    let (left, top, plot_w, plot_h) = (60.0, 40.0, WIDTH - 80.0, PANEL_H - 100.0);
    let max_y = series
        .iter()
        .flat_map(|(_, pts)| pts.iter().map(|(_, s)| s.rr_p50_us))
        .filter(|y| y.is_finite())
        .fold(1.0_f64, f64::max)
        * 1.2;
    let max_x = series
        .iter()
        .flat_map(|(_, pts)| pts.iter().map(|(n, _)| f64::from(*n)))
        .fold(10.0_f64, f64::max)
        .log10();
    let x_of = |n: u32| left + plot_w * f64::from(n.max(1)).log10() / max_x;
    let mut g = format!(
        "<text x=\"{left}\" y=\"20\" font-size=\"14\" font-weight=\"bold\">Request/response p50 \
         (µs) vs {what}</text>\n"
    );
    axis_y(&mut g, left, top, plot_w, plot_h, max_y, " µs");
    if let Some((_, pts)) = series.first() {
        for (n, _) in pts {
            let _ = writeln!(
                g,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{n}</text>",
                x_of(*n),
                top + plot_h + 16.0
            );
        }
    }
    for (variant, pts) in series {
        let color = COLORS[Variant::ALL.iter().position(|v| v == variant).unwrap_or(0)];
        let points: Vec<String> = pts
            .iter()
            .map(|(n, s)| {
                format!(
                    "{:.1},{:.1}",
                    x_of(*n),
                    top + plot_h - plot_h * s.rr_p50_us / max_y
                )
            })
            .collect();
        let _ = writeln!(
            g,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"/>",
            points.join(" ")
        );
        for p in &points {
            let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(
                g,
                "<circle cx=\"{x}\" cy=\"{y}\" r=\"3\" fill=\"{color}\"/>"
            );
        }
    }
    legend(
        &mut g,
        left,
        top + plot_h + 36.0,
        series.iter().map(|(v, _)| *v).collect(),
    );
    g
}

fn axis_y(g: &mut String, left: f64, top: f64, width: f64, height: f64, max: f64, unit: &str) {
    for i in 0..=4 {
        let value = max * f64::from(i) / 4.0;
        let y = top + height - height * f64::from(i) / 4.0;
        let _ = writeln!(
            g,
            "<line x1=\"{left}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#dddddd\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{value:.1}{unit}</text>",
            left + width,
            left - 5.0,
            y + 4.0
        );
    }
}

fn legend(g: &mut String, left: f64, y: f64, variants: Vec<Variant>) {
    let mut x = left;
    for v in variants {
        let color = COLORS[Variant::ALL.iter().position(|a| *a == v).unwrap_or(0)];
        let _ = writeln!(
            g,
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"10\" height=\"10\" fill=\"{color}\"/>\
             <text x=\"{:.1}\" y=\"{y:.1}\">{}</text>",
            y - 9.0,
            x + 14.0,
            v.title()
        );
        x += 14.0 + 6.5 * v.title().len() as f64 + 20.0;
    }
}

#[cfg(test)]
mod tests {
    use super::super::measure::median;
    use super::*;

    #[test]
    fn median_and_percentile_pick_the_middle_and_the_tail() {
        assert_eq!(median([3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0, f64::NAN]), 2.5);
        assert!(median([]).is_nan());
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 0.5), 51.0);
        assert_eq!(percentile(&values, 0.99), 99.0);
    }

    #[test]
    fn a_datapath_only_run_renders_its_table_and_chart() {
        let s = |t: f64, l: f64| Sample {
            tcp1_gbps: t,
            cpu_s_per_gbit: 0.1,
            tcpn_gbps: t,
            udp_kpps: 100.0,
            cpu_ns_per_packet: 5_000.0,
            rr_p50_us: l,
            rr_p99_us: l * 2.0,
        };
        let results = Results {
            datapath: vec![
                (Variant::None, vec![s(10.0, 20.0)]),
                (Variant::Hand, vec![s(8.0, 30.0)]),
                (Variant::Iptables, vec![s(7.0, 32.0)]),
                (Variant::Ours, vec![s(7.9, 33.0)]),
            ],
            ..Results::default()
        };
        let md = markdown(&results, "test run");
        assert!(md.contains("| 4 static-egress |"), "{md}");
        assert!(md.contains("98.8% (1 stream)"), "{md}");
        assert!(md.contains("+3.0 µs RR p50 | met"), "{md}");
        let svg = chart(&results);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
    }

    #[test]
    fn paired_rounds_judge_the_targets_on_the_pairs() {
        let leg = |p50: f64, gbps: f64| Leg {
            p50_us: p50,
            p99_us: p50 * 1.5,
            cpu_us: p50,
            tcp_gbps: gbps,
            cpu_s_per_gbit: 1.0 / gbps,
            udp_kpps: gbps * 10.0,
            cpu_ns_per_packet: 100.0 / gbps,
            start: vec![(0.5, p50), (1.0, p50)],
        };
        // The rounds drift together: the pairs' differences stay steady.
        let rounds: Vec<Round> = (0..10)
            .map(|i| {
                let drift = f64::from(i % 3);
                Round {
                    hand: leg(20.0 + drift, 30.0 - drift),
                    hand_tunnel: leg(23.0 + drift, 25.5 - drift),
                    ours: leg(21.0 + drift, 29.7 - drift),
                    tunnel: leg(21.5 + drift, 25.0 - drift),
                    fast: leg(19.5 + drift, 30.6 - drift),
                }
            })
            .collect();
        let results = Results {
            paired: rounds,
            ..Results::default()
        };
        let md = markdown(&results, "test run");
        assert!(md.contains("| RR p50 | 21.0 µs | 22.0 µs | 20.5 µs | 22.5 µs | 24.0 µs | +1.0 ± 0.0 µs | -0.5 ± 0.0 µs | +0.5 ± 0.0 µs | +3.0 ± 0.0 µs | -1.5 ± 0.0 µs |"), "{md}");
        assert!(
            md.contains(
                "| UDP 64 B rate (trafgen) | 290 kpps | 287 kpps | 296 kpps | 240 kpps | 245 kpps | x0.990"
            ),
            "{md}"
        );
        assert!(
            md.contains(
                "| throughput >= 97% of variant 2 | 99.0 ± 0.0% (1 stream, paired) | met |"
            ),
            "{md}"
        );
        assert!(
            md.contains(
                "102.1 ± 0.0% (TCP 1 stream, paired), 102.1 ± 0.0% (64 B rate, paired), -0.5 ± 0.0 µs RR p50 (paired) | met |"
            ),
            "{md}"
        );
        assert!(md.contains("| the tunnel costs no more than the direct path (variant 5 vs 4) | 83.7 ± 0.4% (1 stream, paired) of its throughput"), "{md}");
        assert!(md.contains("| the tunnel adds no more to VXLAN built by hand than the direct path adds to the hand-built path (variant 5 vs 7, against 4 vs 2) | TCP 1 stream x0.980 against x0.990, 64 B rate x0.980 against x0.990, RR p50 -1.5 against +1.0 µs (paired, means) | **missed** |"), "{md}");
        assert!(md.contains("**missed**"), "{md}");
    }

    #[test]
    fn a_failover_run_renders_its_percentiles_beside_the_target() {
        let results = Results {
            failover: Some(FailoverResults {
                unplanned_ms: (0..20).map(|i| 250.0 + f64::from(i)).collect(),
                planned_ms: vec![280.0; 20],
                streams_survived: 19,
                streams: 20,
                leaked: 0,
                answered_pps: 39.5,
                probing_nodes: 2,
            }),
            ..Results::default()
        };
        let md = markdown(&results, "test run");
        assert!(
            md.contains(
                "| unplanned: holder cut off | 260 ms | 269 ms | 269 ms | < 300 ms p99: met |"
            ),
            "{md}"
        );
        assert!(md.contains("alive after both moves: 19 of 20"), "{md}");
        assert!(md.contains("answers 19980 a second"), "{md}");
    }
}
