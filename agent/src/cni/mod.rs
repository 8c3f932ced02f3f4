//! No leak at pod start: a chained CNI plugin (`static-egress-cni`) tells this node's agent
//! about a pod the container runtime is starting, with the address the previous plugin gave
//! it, and waits until the agent has programmed it. Without it, a new pod's first connections
//! leave with the node's address until the kubelet reports the pod's address and the agent
//! sees it (a second or more).
//!
//! The agent classifies the pod from what it already knows of it (its labels and namespace
//! come with the objects long before its address does) and answers once the data path is
//! applied: selected (marked from the first packet), not selected, or held (its traffic to
//! outside the cluster dropped until the objects show its address; see
//! [`crate::plan::HoldReason`]). The objects win as soon as they show the pod running with an
//! address. [`plugin`] runs under the container runtime; [`crate::source::cni`] is the agent's
//! end of the socket.

pub mod install;
pub mod plugin;

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// The socket's name in the agent's state directory (`--state-dir`).
pub const SOCKET: &str = "cni.sock";
/// Where the agent records the pods the plugin announced, in its state directory.
pub const ANNOUNCED: &str = "cni-announced.json";
/// The files of this feature in the state directory (`cleanup` removes them).
pub const LEFT_IN_STATE_DIR: [&str; 2] = [SOCKET, ANNOUNCED];

/// What the plugin does with a pod the agent cannot classify before it starts (its config's
/// `unclassified`, the agent's `--cni-unclassified`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Unclassified {
    /// Hold its traffic to outside the cluster until the agent knows it; while the agent does
    /// not answer, fail the ADD so that the runtime tries again later.
    #[default]
    Hold,
    /// Start it anyway: it leaves as an unselected pod until the agent knows it.
    Allow,
}

/// One line of JSON from the plugin; the agent answers with one [`Reply`] line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Request {
    pub command: Command,
    pub namespace: String,
    pub name: String,
    /// The sandbox's id: a DEL of an earlier sandbox of the same pod leaves the newer one be.
    pub container_id: String,
    /// The pod's IPv4 address (ADD only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
    /// Hold the pod's traffic to outside the cluster while the agent's objects do not know the
    /// pod (the plugin's `unclassified: hold`).
    #[serde(default)]
    pub hold_unknown: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
    Add,
    Del,
}

/// What the agent did with a [`Request`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "camelCase")]
pub enum Reply {
    /// Its packets to the gateway's destinations are marked from now on.
    #[serde(rename_all = "camelCase")]
    Selected {
        gateway: String,
        egress_ip: Ipv4Addr,
    },
    /// Its packets to outside the cluster are dropped until the objects show its address.
    Held { why: String },
    /// No gateway selects it: it leaves as any pod does.
    NotSelected,
    /// DEL: the agent no longer holds anything for this sandbox.
    Forgotten,
    /// Nothing was programmed (the agent is starting, or its last apply failed).
    Failed { error: String },
}
