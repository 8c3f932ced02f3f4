//! Traffic between the pod and the external host: iperf3 for throughput and small-packet rate,
//! `se-probe rr` for request/response latency. Every run is bounded by `timeout(1)`.

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use netlab::{Cluster, LabPod};
use serde_json::Value;

const IPERF_PORT: u16 = 5201;
const ECHO_PORT: u16 = 7778;
/// Where the small-packet stream goes; the external host counts and drops it.
pub const SMALL_PORT: u16 = 7779;
/// Added to a run's own duration before `timeout` kills it.
const GRACE_SECS: u64 = 20;
const RR_SIZE: &str = "64";

/// The CPUs of the round trips' client (the first this process may run on) and server (the
/// last; the same one on a single CPU). Left to the scheduler, a run found them on one CPU or
/// on two by chance, and its round trips took about 10 or about 14 µs on this VM whatever the
/// path (the other CPU's wake-up), so that two variants of one round could be 4 µs apart for
/// nothing. Two CPUs, as two hosts never share one.
#[derive(Clone, Copy)]
enum RrEnd {
    Client,
    Server,
}

impl RrEnd {
    fn cpu(self) -> String {
        let allowed = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let (first, last) = first_and_last_cpu(&allowed).unwrap_or(("0", "0"));
        match self {
            Self::Client => first,
            Self::Server => last,
        }
        .to_owned()
    }
}

/// The first and last CPU of `Cpus_allowed_list` in a `/proc/<pid>/status` text (a cpuset may
/// not start at 0: `2-3,6`).
fn first_and_last_cpu(status: &str) -> Option<(&str, &str)> {
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?
        .trim();
    let first = list.split([',', '-']).next()?;
    let last = list.rsplit([',', '-']).next()?;
    (!first.is_empty() && !last.is_empty()).then_some((first, last))
}

/// One measurement of a variant on the current policy.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    pub tcp1_gbps: f64,
    /// Busy CPU of the whole machine (both ends and every hop) per gigabit moved, one stream.
    pub cpu_s_per_gbit: f64,
    pub tcpn_gbps: f64,
    pub udp_kpps: f64,
    /// Busy CPU of the whole machine per datagram the external host received, in ns.
    pub cpu_ns_per_packet: f64,
    pub rr_p50_us: f64,
    pub rr_p99_us: f64,
}

impl Sample {
    /// Each figure's median over `samples` (rounds of one variant or one scale point).
    pub fn median(samples: &[Self]) -> Self {
        let of = |f: fn(&Self) -> f64| median(samples.iter().map(f));
        Self {
            tcp1_gbps: of(|s| s.tcp1_gbps),
            cpu_s_per_gbit: of(|s| s.cpu_s_per_gbit),
            tcpn_gbps: of(|s| s.tcpn_gbps),
            udp_kpps: of(|s| s.udp_kpps),
            cpu_ns_per_packet: of(|s| s.cpu_ns_per_packet),
            rr_p50_us: of(|s| s.rr_p50_us),
            rr_p99_us: of(|s| s.rr_p99_us),
        }
    }
}

/// The middle of the finite values (the mean of the two middle ones for an even count); NaN
/// without any.
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// How long and how often to measure.
#[derive(Clone, Copy, Debug)]
pub struct Effort {
    pub seconds: u64,
    pub streams: u32,
    pub round_trips: u32,
}

/// A server in the ext namespace, killed when dropped.
pub struct Server {
    child: Child,
}

impl Server {
    fn start(cluster: &Cluster, name: &str, args: &[&str], ready: &str) -> Result<Self> {
        let log = cluster.dir().join(format!("{name}.out"));
        let out = File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let child = Command::new("ip")
            .args(["netns", "exec", cluster.ext_netns()])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {name} in ext"))?;
        let mut server = Self { child };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains(ready) {
                return Ok(server);
            }
            if Instant::now() >= deadline || !matches!(server.child.try_wait(), Ok(None)) {
                bail!("{name} in ext did not start: {}", text.trim());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Already gone is fine: the lab's teardown kills what runs in its namespaces.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The iperf3 and echo servers the measurements talk to.
pub struct Servers {
    _iperf: Server,
    _echo: Server,
}

pub fn start_servers(cluster: &Cluster) -> Result<Servers> {
    // Counts (and drops) the small-packet stream, before anything else sees it.
    netlab::exec(
        cluster.ext_netns(),
        [
            "nft",
            &format!(
                "add table ip bench_rx; add chain ip bench_rx small {{ type filter hook prerouting priority raw; }}; \
                 add rule ip bench_rx small udp dport {SMALL_PORT} counter drop"
            ),
        ],
    )?;
    let ext = cluster.ext_ip().to_string();
    let port = IPERF_PORT.to_string();
    let iperf = Server::start(
        cluster,
        "iperf3",
        &["iperf3", "-s", "--forceflush", "-B", &ext, "-p", &port],
        "listening",
    )?;
    let probe = cluster.probe_bin().to_string_lossy().into_owned();
    let listen = format!("{ext}:{ECHO_PORT}");
    let echo = Server::start(
        cluster,
        "echo",
        &[
            "taskset",
            "-c",
            &RrEnd::Server.cpu(),
            &probe,
            "echo",
            "--listen",
            &listen,
        ],
        "ready",
    )?;
    Ok(Servers {
        _iperf: iperf,
        _echo: echo,
    })
}

/// Everything in [`Sample`]; `full_set` false measures only what the scale runs compare
/// (one TCP stream and round trips).
pub fn sample(cluster: &Cluster, pod: &LabPod, effort: Effort, full_set: bool) -> Result<Sample> {
    let (tcp1_gbps, cpu_s_per_gbit) = tcp_with_cpu(cluster, pod, effort.seconds)?;
    let mut s = Sample {
        tcp1_gbps,
        cpu_s_per_gbit,
        ..Sample::default()
    };
    if full_set {
        s.tcpn_gbps = tcp(cluster, pod, effort.seconds, effort.streams)?;
        (s.udp_kpps, s.cpu_ns_per_packet) = udp_small(cluster, pod, effort.seconds)?;
    }
    (s.rr_p50_us, s.rr_p99_us) = rr(cluster, pod, effort.round_trips)?;
    Ok(s)
}

/// Runs `command` (from [`in_pod`]) for at most `limit_secs` and some grace.
fn bounded(limit_secs: u64, command: &[String]) -> Result<String> {
    let limit = (limit_secs + GRACE_SECS).to_string();
    let mut cmd = Command::new("timeout");
    cmd.arg(limit).args(command);
    crate::util::output(&mut cmd)
}

/// `args` run in the pod's namespace.
fn in_pod(pod: &LabPod, args: &[&str]) -> Vec<String> {
    ["ip", "netns", "exec", &pod.netns]
        .into_iter()
        .chain(args.iter().copied())
        .map(str::to_owned)
        .collect()
}

/// iperf3 in the pod, to the external server, for `seconds`, JSON out.
pub fn iperf_command(cluster: &Cluster, pod: &LabPod, seconds: u64, extra: &[&str]) -> Vec<String> {
    let ext = cluster.ext_ip().to_string();
    let (port, secs) = (IPERF_PORT.to_string(), seconds.to_string());
    let mut args = vec![
        "iperf3",
        "-c",
        &ext,
        "-p",
        &port,
        "-t",
        &secs,
        "-J",
        "--connect-timeout",
        "2000",
    ];
    args.extend_from_slice(extra);
    in_pod(pod, &args)
}

fn iperf(cluster: &Cluster, pod: &LabPod, seconds: u64, extra: &[&str]) -> Result<Value> {
    let text = bounded(seconds, &iperf_command(cluster, pod, seconds, extra))?;
    serde_json::from_str(&text).context("iperf3 printed no JSON")
}

/// Receiver-side goodput in Gbit/s.
fn tcp(cluster: &Cluster, pod: &LabPod, seconds: u64, streams: u32) -> Result<f64> {
    let streams = streams.to_string();
    let report = iperf(cluster, pod, seconds, &["-P", &streams])?;
    let bps = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 JSON without end.sum_received.bits_per_second")?;
    Ok(bps / 1e9)
}

/// One TCP stream for `seconds`: its goodput in Gbit/s and the busy CPU of the whole machine
/// (both ends and every hop) per gigabit moved, in CPU-seconds.
pub fn tcp_with_cpu(cluster: &Cluster, pod: &LabPod, seconds: u64) -> Result<(f64, f64)> {
    let busy_before = busy_cpu_seconds()?;
    let gbps = tcp(cluster, pod, seconds, 1)?;
    let busy = busy_cpu_seconds()? - busy_before;
    Ok((gbps, busy / (gbps * seconds as f64)))
}

/// 64-byte UDP datagrams at the rate `trafgen` (Debian's netsniff-ng) writes them into the
/// pod's interface from one CPU, written whole into its send ring, past the pod's socket layer:
/// what the path forwards is measured, not the sender's stack (iperf3's UDP client measured
/// iperf3 more than the path). Thousands the external host received per second, counted by its
/// own nftables counter over `seconds` once the stream runs, and the machine's busy CPU per
/// datagram received (ns) over the same time.
pub fn udp_small(cluster: &Cluster, pod: &LabPod, seconds: u64) -> Result<(f64, f64)> {
    let stream = netlab::trafgen::Stream::start(cluster, pod, SMALL_PORT)?;
    let (before, busy, started) = (received(cluster)?, busy_cpu_seconds()?, Instant::now());
    std::thread::sleep(Duration::from_secs(seconds));
    let packets = (received(cluster)? - before) as f64;
    let busy = busy_cpu_seconds()? - busy;
    if packets == 0.0 {
        bail!(
            "the external host received none of trafgen's datagrams: {}",
            stream.log()
        );
    }
    Ok((
        packets / started.elapsed().as_secs_f64() / 1e3,
        busy * 1e9 / packets,
    ))
}

/// Datagrams the external host counted on [`SMALL_PORT`] so far.
pub fn received(cluster: &Cluster) -> Result<u64> {
    let listing = netlab::exec(
        cluster.ext_netns(),
        ["nft", "list", "chain", "ip", "bench_rx", "small"],
    )?;
    listing
        .split("counter packets ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .context("no counter in the external host's bench_rx table")?
        .parse()
        .context("odd counter")
}

/// `se-probe rr` in the pod: `count` 64-byte round trips on one connection to the echo server.
pub fn rr_command(cluster: &Cluster, pod: &LabPod, count: u32) -> Vec<String> {
    let probe = cluster.probe_bin().to_string_lossy().into_owned();
    let addr = format!("{}:{ECHO_PORT}", cluster.ext_ip());
    let count = count.to_string();
    in_pod(
        pod,
        &[
            "taskset",
            "-c",
            &RrEnd::Client.cpu(),
            &probe,
            "rr",
            &addr,
            "--count",
            &count,
            "--size",
            RR_SIZE,
        ],
    )
}

/// p50 and p99 of `count` 64-byte round trips on one connection, in microseconds.
pub fn rr(cluster: &Cluster, pod: &LabPod, count: u32) -> Result<(f64, f64)> {
    let line = bounded(60, &rr_command(cluster, pod, count))?;
    Ok((field(&line, "p50_us")?, field(&line, "p99_us")?))
}

/// p50 and p99 of `count` round trips, and the busy CPU of the whole machine per round trip,
/// all in microseconds.
pub fn rr_with_cpu(cluster: &Cluster, pod: &LabPod, count: u32) -> Result<(f64, f64, f64)> {
    let busy_before = busy_cpu_seconds()?;
    let (p50, p99) = rr(cluster, pod, count)?;
    let busy = busy_cpu_seconds()? - busy_before;
    Ok((p50, p99, busy * 1e6 / f64::from(count.max(1))))
}

/// The number after `name=` in a `se-probe rr` line.
pub fn field(line: &str, name: &str) -> Result<f64> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .with_context(|| format!("no {name} in {line:?}"))?
        .parse()
        .with_context(|| format!("bad {name} in {line:?}"))
}

/// Seconds all CPUs have spent busy since boot (everything but idle and iowait), from /proc/stat.
fn busy_cpu_seconds() -> Result<f64> {
    let text = std::fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
    busy_of(&text, clock_ticks_per_second())
}

fn busy_of(stat: &str, ticks_per_second: u64) -> Result<f64> {
    let line = stat.lines().next().context("empty /proc/stat")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().context("bad /proc/stat field"))
        .collect::<Result<_>>()?;
    let (idle, iowait) = (
        ticks.get(3).copied().unwrap_or(0),
        ticks.get(4).copied().unwrap_or(0),
    );
    let total: u64 = ticks.iter().take(8).sum();
    Ok((total - idle - iowait) as f64 / ticks_per_second as f64)
}

/// CPU time a process has used so far (user + system), from /proc/PID/stat.
pub fn cpu_time(pid: u32) -> Result<std::time::Duration> {
    let path = Path::new("/proc").join(pid.to_string()).join("stat");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    cpu_time_of(&text, clock_ticks_per_second())
}

fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|t| *t > 0).unwrap_or(100)
}

/// utime and stime are the 14th and 15th fields; the command name (2nd) may hold spaces, so
/// fields are counted after its closing parenthesis.
fn cpu_time_of(stat: &str, ticks_per_second: u64) -> Result<std::time::Duration> {
    let after_name = stat.rsplit_once(')').context("no command name in stat")?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .context("short stat line")?
            .parse()
            .context("bad stat field")
    };
    let total = ticks(11)? + ticks(12)?;
    Ok(std::time::Duration::from_millis(
        total * 1000 / ticks_per_second,
    ))
}

/// VmRSS of a process, in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let path = Path::new("/proc").join(pid.to_string()).join("status");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no VmRSS line")?
        .parse()
        .context("bad VmRSS")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_take_the_first_and_last_allowed_cpu() {
        let status = "Name:\txtask\nCpus_allowed:\t3\nCpus_allowed_list:\t0-1\n";
        assert_eq!(first_and_last_cpu(status), Some(("0", "1")));
        let cpuset = "Cpus_allowed_list:\t2-3,6\n";
        assert_eq!(first_and_last_cpu(cpuset), Some(("2", "6")));
        assert_eq!(
            first_and_last_cpu("Cpus_allowed_list:\t5\n"),
            Some(("5", "5"))
        );
        assert_eq!(first_and_last_cpu("Name:\txtask\n"), None);
    }

    #[test]
    fn busy_cpu_leaves_out_idle_and_iowait() {
        let stat = "cpu  100 0 50 1000 20 5 5 0 0 0\ncpu0 1 2 3\n";
        assert_eq!(busy_of(stat, 100).expect("parses"), 1.6);
    }

    #[test]
    fn cpu_time_counts_user_and_system_ticks() {
        let stat = "42 (static egress) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 1 2 3";
        let cpu = cpu_time_of(stat, 100).expect("parses");
        assert_eq!(cpu, std::time::Duration::from_secs(3));
    }

    #[test]
    fn reads_fields_of_an_rr_line() {
        let line = "n=100 p50_us=51.0 p99_us=99.5 mean_us=50.5\n";
        assert_eq!(field(line, "p50_us").expect("p50"), 51.0);
        assert_eq!(field(line, "p99_us").expect("p99"), 99.5);
        assert!(field(line, "p90_us").is_err());
    }
}
