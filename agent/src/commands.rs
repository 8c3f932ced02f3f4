//! The one-shot subcommands (`plan`, `explain`, `status`, `health`): each reads what it needs
//! once, prints, and returns; the agent's loop is in [`crate::agent`].

use std::path::Path;
use std::time::Duration;

use ipnet::Ipv4Net;

use crate::agent::AgentError;
use crate::plan::{self, PlanConfig};
use crate::report::node_status;
use crate::source::FileSource;

/// Prints the plan for `node` (the `plan` subcommand).
pub fn print_plan(node: &str, file: &Path, cluster_cidrs: Vec<Ipv4Net>) -> Result<(), AgentError> {
    let (_, loaded) = FileSource::open(file)?;
    for problem in &loaded.problems {
        eprintln!("warning: {problem}");
    }
    print!(
        "{}",
        plan::plan(
            &loaded.snapshot,
            node,
            &PlanConfig {
                cluster_cidrs,
                ..PlanConfig::default()
            }
        )
    );
    Ok(())
}

/// Explains which gateway `namespace/pod` uses (the `explain` subcommand), from `file` or,
/// without one, from the cluster.
pub async fn explain(
    namespace: &str,
    pod: &str,
    file: Option<&Path>,
    cluster_cidrs: Vec<Ipv4Net>,
) -> Result<(), AgentError> {
    let loaded = match file {
        Some(file) => FileSource::open(file)?.1,
        None => {
            let client = kube::Client::try_default().await?;
            crate::source::kube::view_of_pod(client, namespace, pod).await?
        }
    };
    for problem in &loaded.problems {
        eprintln!("warning: {problem}");
    }
    let config = PlanConfig {
        cluster_cidrs,
        ..PlanConfig::default()
    };
    print!(
        "{}",
        plan::explain(&loaded.snapshot, namespace, pod, &config)
    );
    Ok(())
}

/// The `status` subcommand; see [`node_status::show`]. Counters come from the pinned maps
/// when they can be read, else from the status file.
pub fn status(state_dir: &Path, bpffs: &Path, json: bool) -> Result<(), AgentError> {
    let live = match crate::datapath::bpf::pinned_counters(bpffs) {
        Ok(live) => Some(live),
        Err(error) => {
            eprintln!("warning: the counters are the status file's: {error}");
            None
        }
    };
    print!("{}", node_status::show(state_dir, live, json)?);
    Ok(())
}

/// The `health` subcommand; see [`node_status::check`].
pub fn health(state_dir: &Path, max_age: Duration, ready: bool) -> Result<(), AgentError> {
    println!("{}", node_status::check(state_dir, max_age, ready)?);
    Ok(())
}
