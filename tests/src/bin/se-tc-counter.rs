//! Loads the tests' own packet counter (`tests/counter-ebpf`) onto an interface, behind whatever
//! is attached there (or, as `tcx-first`, in front of it), and reads its counts: the end-to-end
//! tests use it to check that the agent's programs leave every packet they do not drop or
//! redirect to the programs after them, and how often a packet passes a hook.
//!
//! Run inside the namespace of the interface (`ip netns exec`). The counts map is pinned in
//! `--pin DIR` (on a bpffs), so it outlives this process; so are TCX links, while legacy tc
//! filters stay on the interface by themselves.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};
use aya::maps::{Map, MapData, PerCpuHashMap, PerCpuValues};
use aya::programs::links::FdLink;
use aya::programs::tc::{self, NlOptions, TcAttachOptions};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use aya::{Ebpf, util::nr_cpus};

const USAGE: &str = "usage:
  se-tc-counter attach --obj FILE --iface NAME --hook ingress|egress --mode tcx|tcx-first|legacy --pin DIR --src IP...
  se-tc-counter read --pin DIR --src IP   (prints: packets marked wrapped)";

const MAP: &str = "SE_TEST_COUNTS";
const PROGRAM: &str = "se_test_count";

/// The kernel side's per-CPU value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Count {
    packets: u64,
    marked: u64,
    wrapped: u64,
}

// SAFETY: `repr(C)`, three integers, no padding.
unsafe impl aya::Pod for Count {}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("se-tc-counter: {e:#}\n{USAGE}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<()> {
    let Some((command, rest)) = args.split_first() else {
        bail!("missing command");
    };
    let flag = |name: &str| -> Result<&str> {
        rest.iter()
            .position(|a| a == &format!("--{name}"))
            .and_then(|i| rest.get(i + 1))
            .map(String::as_str)
            .with_context(|| format!("--{name} is required"))
    };
    let sources = || -> Result<Vec<Ipv4Addr>> {
        let mut out = Vec::new();
        let mut iter = rest.iter();
        while let Some(arg) = iter.next() {
            if arg == "--src" {
                let ip = iter.next().context("--src needs an address")?;
                out.push(ip.parse().with_context(|| format!("--src {ip}"))?);
            }
        }
        Ok(out)
    };
    let pin = PathBuf::from(flag("pin")?);
    match command.as_str() {
        "attach" => {
            let hook = match flag("hook")? {
                "ingress" => TcAttachType::Ingress,
                "egress" => TcAttachType::Egress,
                other => bail!("unknown hook {other:?}"),
            };
            let place = match flag("mode")? {
                "tcx" => Place::Last,
                "tcx-first" => Place::First,
                "legacy" => Place::Legacy,
                other => bail!("unknown mode {other:?}"),
            };
            attach(
                Path::new(flag("obj")?),
                flag("iface")?,
                hook,
                place,
                &pin,
                &sources()?,
            )
        }
        "read" => {
            let [src] = sources()?[..] else {
                bail!("read takes one --src");
            };
            let count = read(&pin, src)?;
            println!("{} {} {}", count.packets, count.marked, count.wrapped);
            Ok(())
        }
        other => bail!("unknown command {other:?}"),
    }
}

/// Where on the interface's hook the counter goes.
#[derive(Clone, Copy)]
enum Place {
    /// At the end of the TCX chain.
    Last,
    /// At the front of the TCX chain.
    First,
    /// A classic tc filter, after the TCX chain.
    Legacy,
}

fn attach(
    obj: &Path,
    iface: &str,
    hook: TcAttachType,
    place: Place,
    pin: &Path,
    sources: &[Ipv4Addr],
) -> Result<()> {
    std::fs::create_dir_all(pin).with_context(|| format!("creating {}", pin.display()))?;
    let mut ebpf = Ebpf::load_file(obj).with_context(|| format!("loading {}", obj.display()))?;
    {
        let map = ebpf.map_mut(MAP).context("the object has no counts map")?;
        let mut counts: PerCpuHashMap<&mut MapData, u32, Count> = PerCpuHashMap::try_from(map)?;
        let cpus = nr_cpus().map_err(|(_, e)| e)?;
        for src in sources {
            let zero = PerCpuValues::try_from(vec![Count::default(); cpus])?;
            counts.insert(u32::from_ne_bytes(src.octets()), zero, 0)?;
        }
    }
    ebpf.map(MAP)
        .context("the object has no counts map")?
        .pin(pin.join("counts"))?;
    let program: &mut SchedClassifier = ebpf
        .program_mut(PROGRAM)
        .context("the object has no counter program")?
        .try_into()?;
    program.load()?;
    let order = match place {
        Place::Last => LinkOrder::last(),
        Place::First => LinkOrder::first(),
        Place::Legacy => {
            attach_legacy(program, iface, hook)?;
            return Ok(());
        }
    };
    let id = program.attach_with_options(iface, hook, TcAttachOptions::TcxOrder(order))?;
    let link = FdLink::try_from(program.take_link(id)?)?;
    link.pin(pin.join("link"))?;
    Ok(())
}

fn attach_legacy(program: &mut SchedClassifier, iface: &str, hook: TcAttachType) -> Result<()> {
    // The qdisc may be there already (another filter, or our own earlier attach).
    if let Err(e) = tc::qdisc_add_clsact(iface)
        && !e.to_string().contains("exists")
    {
        return Err(e).context("adding the clsact qdisc");
    }
    let id =
        program.attach_with_options(iface, hook, TcAttachOptions::Netlink(NlOptions::default()))?;
    // A netlink filter stays on the interface when its loader exits, unless the loader
    // detaches it: keep it by never dropping the link.
    std::mem::forget(program.take_link(id)?);
    Ok(())
}

fn read(pin: &Path, src: Ipv4Addr) -> Result<Count> {
    let data = MapData::from_pin(pin.join("counts"))?;
    let counts: PerCpuHashMap<MapData, u32, Count> =
        PerCpuHashMap::try_from(Map::PerCpuHashMap(data))?;
    let per_cpu = counts
        .get(&u32::from_ne_bytes(src.octets()), 0)
        .with_context(|| format!("{src} is not counted"))?;
    Ok(per_cpu.iter().fold(Count::default(), |sum, c| Count {
        packets: sum.packets + c.packets,
        marked: sum.marked + c.marked,
        wrapped: sum.wrapped + c.wrapped,
    }))
}
