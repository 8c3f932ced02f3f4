//! `cargo xtask test`: formatting, lints, build, then every test with the freshly built agent.

use anyhow::{Context, Result};
use netlab::kubeapi::{KUBE_BIN_DIR_ENV, KubeBuild};

use crate::build::{self, EBPF_OBJ_ENV, TEST_COUNTER_OBJ_ENV};
use crate::setup;
use crate::util::{cargo, run_cmd};

#[derive(clap::Args)]
pub struct Options {
    /// Test optimized builds.
    #[arg(long)]
    release: bool,
    /// Passed on to `cargo test`, e.g. `-- topology -- --nocapture`.
    #[arg(last = true)]
    cargo_test_args: Vec<String>,
}

pub fn run(options: &Options) -> Result<()> {
    netlab::require_root().context("the tests build network namespaces")?;
    setup::run(&setup::Options {
        verbose: false,
        no_kube: false,
    })?;

    eprintln!("xtask: checking formatting");
    run_cmd(cargo(None).args(["fmt", "--all", "--check"]))?;

    eprintln!("xtask: building the kernel programs");
    let ebpf_obj = build::kernel()?;

    eprintln!("xtask: linting");
    run_cmd(
        cargo(None)
            .args(["clippy", "--all-targets", "--", "-D", "warnings"])
            .env(EBPF_OBJ_ENV, &ebpf_obj),
    )?;

    // `cargo test` builds the agent and the probe tool with everything else, with the same
    // features (a separate `cargo build` of two packages resolves other features and made the
    // test build compile the TLS and Kubernetes crates a second time).
    let artifacts = build::artifacts(options.release, ebpf_obj);

    eprintln!("xtask: building and testing");
    let mut test = cargo(None);
    test.arg("test")
        .env(EBPF_OBJ_ENV, &artifacts.ebpf_obj)
        .env("STATIC_EGRESS_BIN", &artifacts.agent)
        .env("STATIC_EGRESS_CNI_BIN", &artifacts.cni)
        .env("SE_PROBE_BIN", &artifacts.probe)
        .env(TEST_COUNTER_OBJ_ENV, build::test_counter_object())
        .env(KUBE_BIN_DIR_ENV, KubeBuild::pinned()?.dir);
    if options.release {
        test.arg("--release");
    }
    run_cmd(test.args(&options.cargo_test_args))
}
