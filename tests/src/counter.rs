//! The tests' own packet counter (`se-tc-counter` with the `tests/counter-ebpf` object) on a
//! lab interface: it shows whether packets still reach the programs behind the agent's.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};

use crate::builder::locate_binary;
use crate::cluster::LabNode;
use crate::cmd::exec;

/// Which tc hook of the interface.
#[derive(Clone, Copy, Debug)]
pub enum TcHook {
    Ingress,
    Egress,
}

/// How the counter is attached: after the TCX chain's other programs, in front of them
/// (attached after them), or as a classic tc filter on a clsact qdisc (which runs only when
/// the TCX chain ends in `TCX_NEXT`).
#[derive(Clone, Copy, Debug)]
pub enum TcMode {
    Tcx,
    TcxFirst,
    Legacy,
}

/// Packets from one source, as the counter saw them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counted {
    pub packets: u64,
    /// Of those, the packets that carried a fwmark.
    pub marked: u64,
    /// Packets from it inside the agent's tunnel packets (not among `packets`).
    pub wrapped: u64,
}

/// One attached counter; it goes with the node's namespace and bpffs.
pub struct TcCounter {
    netns: String,
    pin: PathBuf,
    tool: PathBuf,
}

impl TcCounter {
    /// Attaches a counter for packets from `sources` to `iface` of `node`.
    pub fn attach(
        node: &LabNode,
        iface: &str,
        hook: TcHook,
        mode: TcMode,
        sources: &[Ipv4Addr],
    ) -> Result<Self> {
        let tool = locate_binary("SE_TC_COUNTER_BIN", "se-tc-counter");
        let obj = counter_object();
        ensure!(
            obj.is_file(),
            "the tests' counter program is missing at {}: build it with `cargo xtask build` \
             (or set SE_TEST_COUNTER_OBJ)",
            obj.display()
        );
        let hook_name = match hook {
            TcHook::Ingress => "ingress",
            TcHook::Egress => "egress",
        };
        let mode_name = match mode {
            TcMode::Tcx => "tcx",
            TcMode::TcxFirst => "tcx-first",
            TcMode::Legacy => "legacy",
        };
        let pin = node
            .bpffs
            .join(format!("se-test-counter-{iface}-{hook_name}-{mode_name}"));
        let mut args: Vec<String> = vec![
            tool.display().to_string(),
            "attach".into(),
            "--obj".into(),
            obj.display().to_string(),
            "--iface".into(),
            iface.into(),
            "--hook".into(),
            hook_name.into(),
            "--mode".into(),
            mode_name.into(),
            "--pin".into(),
            pin.display().to_string(),
        ];
        for src in sources {
            args.extend(["--src".into(), src.to_string()]);
        }
        exec(&node.netns, &args).with_context(|| format!("attaching a counter to {iface}"))?;
        Ok(Self {
            netns: node.netns.clone(),
            pin,
            tool,
        })
    }

    pub fn read(&self, src: Ipv4Addr) -> Result<Counted> {
        let out = exec(
            &self.netns,
            [
                self.tool.display().to_string(),
                "read".into(),
                "--pin".into(),
                self.pin.display().to_string(),
                "--src".into(),
                src.to_string(),
            ],
        )?;
        let mut fields = out.split_whitespace().map(str::parse::<u64>);
        match (fields.next(), fields.next(), fields.next()) {
            (Some(Ok(packets)), Some(Ok(marked)), Some(Ok(wrapped))) => Ok(Counted {
                packets,
                marked,
                wrapped,
            }),
            _ => anyhow::bail!("odd counter output {out:?}"),
        }
    }
}

fn counter_object() -> PathBuf {
    std::env::var_os("SE_TEST_COUNTER_OBJ").map_or_else(
        || {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/bpfel-unknown-none/release/se-test-counter")
        },
        PathBuf::from,
    )
}
