//! `cargo xtask build`: the kernel programs (nightly, BPF target), then the agent, which embeds
//! them, and the test tools.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};

use crate::setup::KERNEL_TOOLCHAIN;
use crate::util::{cargo, cargo_home, run_cmd, target_dir, workspace_root};

/// The agent's build script embeds the kernel object found here.
pub const EBPF_OBJ_ENV: &str = "STATIC_EGRESS_EBPF_OBJ";
const BPF_TARGET: &str = "bpfel-unknown-none";

#[derive(clap::Args)]
pub struct Options {
    /// Optimize the agent and tools (the kernel programs are always built optimized).
    #[arg(long)]
    pub release: bool,
}

/// What a build produced.
pub struct Artifacts {
    pub ebpf_obj: PathBuf,
    pub agent: PathBuf,
    /// The chained CNI plugin (`static-egress-cni`).
    pub cni: PathBuf,
    pub probe: PathBuf,
}

pub fn run(options: &Options) -> Result<Artifacts> {
    let ebpf_obj = kernel()?;
    host(options.release, ebpf_obj)
}

/// The kernel crate of the tests (a packet counter to attach beside ours), built with ours.
const TEST_COUNTER: &str = "se-test-counter";
/// Where the end-to-end tests find that counter's object.
pub const TEST_COUNTER_OBJ_ENV: &str = "SE_TEST_COUNTER_OBJ";

/// Builds the kernel crates and returns the absolute path of the agent's object.
pub fn kernel() -> Result<PathBuf> {
    let manifest = workspace_root().join("ebpf/Cargo.toml");
    ensure!(
        manifest.is_file(),
        "the kernel crate is missing: no {}",
        manifest.display()
    );
    let mut cmd = cargo(Some(KERNEL_TOOLCHAIN));
    cmd.args([
        "build",
        "-p",
        "static-egress-ebpf",
        "-p",
        TEST_COUNTER,
        "--release",
        "--target",
        BPF_TARGET,
    ])
    .args(["-Z", "build-std=core"])
    // rustc calls the linker by name: make sure it is the one `setup` matched to nightly.
    .env("PATH", path_with(&cargo_home()?.join("bin"))?);
    run_cmd(&mut cmd)?;
    let obj = kernel_object("static-egress-ebpf");
    for built in [&obj, &test_counter_object()] {
        ensure!(
            built.is_file(),
            "the kernel build did not produce {}",
            built.display()
        );
    }
    Ok(obj)
}

fn kernel_object(name: &str) -> PathBuf {
    target_dir().join(BPF_TARGET).join("release").join(name)
}

pub fn test_counter_object() -> PathBuf {
    kernel_object(TEST_COUNTER)
}

/// Builds the agent (embedding `ebpf_obj`) and the netlab tools.
pub fn host(release: bool, ebpf_obj: PathBuf) -> Result<Artifacts> {
    let mut cmd = cargo(None);
    cmd.args(["build", "-p", "static-egress", "-p", "static-egress-netlab"])
        .env(EBPF_OBJ_ENV, &ebpf_obj);
    if release {
        cmd.arg("--release");
    }
    run_cmd(&mut cmd)?;
    Ok(artifacts(release, ebpf_obj))
}

/// Where a host build of the workspace puts the agent and the probe tool (`cargo test`
/// builds them there too).
pub fn artifacts(release: bool, ebpf_obj: PathBuf) -> Artifacts {
    let dir = target_dir().join(if release { "release" } else { "debug" });
    Artifacts {
        ebpf_obj,
        agent: dir.join("static-egress"),
        cni: dir.join("static-egress-cni"),
        probe: dir.join("se-probe"),
    }
}

fn path_with(first: &Path) -> Result<std::ffi::OsString> {
    let rest = std::env::var_os("PATH").unwrap_or_default();
    std::env::join_paths(std::iter::once(first.to_owned()).chain(std::env::split_paths(&rest)))
        .context("cannot build PATH")
}
