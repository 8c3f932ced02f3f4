//! `cargo xtask <task>`: the project's setup, build, test, lab and bench commands.

mod bench;
mod build;
mod kube;
mod lab;
mod setup;
mod test;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "static-egress project tasks", disable_help_subcommand = true)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (Debian packages, rust-src, bpf-linker,
    /// kube-apiserver and etcd).
    Setup(setup::Options),
    /// Build the kernel programs, then the agent and the test tools.
    Build(build::Options),
    /// Check formatting and lints, build, and run every test (needs root).
    Test(test::Options),
    /// Show the agent at work in a three-node network-namespace cluster (needs root).
    Lab(lab::Options),
    /// Measure the data path and the agent against other ways of pinning egress (needs root).
    Bench(bench::Options),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup(options) => setup::run(&options),
        Task::Build(options) => build::run(&options).map(|_| ()),
        Task::Test(options) => test::run(&options),
        Task::Lab(options) => lab::run(&options),
        Task::Bench(options) => bench::run(&options),
    }
}
