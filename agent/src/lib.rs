//! static-egress: gives selected Kubernetes pods a fixed source IP for traffic leaving the
//! cluster. `source` turns a file of objects into a `model::Snapshot`, `plan` decides what this
//! node must program, `datapath` makes the kernel match the plan, `report` tells the cluster
//! (gateway status, events), and `agent` loops over them;
//! `commands` are the one-shot subcommands.

pub mod agent;
pub mod cni;
pub mod commands;
pub mod datapath;
pub mod fsutil;
pub mod membership;
pub mod model;
pub mod plan;
pub mod report;
pub mod source;
#[cfg(test)]
mod testing;
