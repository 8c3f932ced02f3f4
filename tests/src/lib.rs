//! A Kubernetes-like cluster made of network namespaces, for testing static-egress end to end.
//!
//! [`Cluster::builder`] creates a router, an external host (`ext`, running `se-probe serve`),
//! nodes with a CNI-like setup (host-gw routes, masquerade via iptables-nft) and pods in either
//! the routed (Calico-like) or the bridged (flannel-like) style. A node can instead leave its
//! pods to a real CNI plugin ([`CniPlugin`], run as a container runtime runs it: [`cni`]), with
//! more plugins chained after it. The fabric between the nodes can be made harder on them:
//! pods reaching other nodes through a Flannel-like VXLAN overlay instead of host-gw routes
//! ([`ClusterBuilder::overlay`]), a router that drops whatever carries a pod source
//! ([`ClusterBuilder::fabric_drops_pod_sources`]), nodes on subnets of their own behind the
//! router ([`NodeSpec::segment`]), jumbo frames ([`ClusterBuilder::fabric_mtu`]). The cluster
//! also keeps a model of the Kubernetes objects it stands for ([`objects::Objects`]) and writes
//! it to the file the agent reads. Everything lives in namespaces and a temporary directory
//! that carry a per-instance prefix, so tests run in parallel, and dropping the [`Cluster`]
//! removes all of it.
//!
//! Nothing here touches the network configuration of the namespace it is called from.
//!
//! ```no_run
//! use std::net::Ipv4Addr;
//! use std::time::Duration;
//!
//! use netlab::objects::{EgressGateway, match_labels};
//! use netlab::{Cluster, PodSpec, PodStyle};
//!
//! # fn main() -> anyhow::Result<()> {
//! let mut cluster = Cluster::builder()
//!     .nodes(3)
//!     .with_node("node2", |n| n.pod_style(PodStyle::Bridged).label("egress", "true"))
//!     .build()?;
//! let pod = cluster.add_pod(PodSpec::new("payments", "api-1", "node1").label("app", "api"))?;
//! assert_eq!(cluster.ask(&pod)?, cluster.node("node1")?.ip); // the CNI's masquerade
//!
//! cluster.update_objects(|objects| {
//!     objects.namespace("payments").labels.insert("team".into(), "payments".into());
//!     objects.set_gateway(
//!         EgressGateway::new("corp-fw")
//!             .egress_ip(Ipv4Addr::new(10, 99, 0, 200))
//!             .node_selector(match_labels([("egress", "true")]))
//!             .namespace_selector(Some(match_labels([("team", "payments")])))
//!             .pod_selector(Some(match_labels([("app", "api")]))),
//!     );
//! })?;
//! let mut agents = Vec::new();
//! for node in ["node1", "node2", "node3"] {
//!     agents.push(cluster.start_agent(node, std::iter::empty::<&str>())?);
//!     cluster.wait_applied(node, Duration::from_secs(30))?;
//! }
//! assert_eq!(cluster.ask(&pod)?, Ipv4Addr::new(10, 99, 0, 200));
//! # Ok(())
//! # }
//! ```

pub mod apiserver;
mod arp;
mod bird;
mod builder;
mod cluster;
mod cmd;
pub mod cni;
pub mod counter;
mod digest;
pub mod fixture;
pub mod kubeapi;
mod names;
pub mod objects;
mod process;
mod snapshot;
mod teardown;
pub mod trafgen;

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

pub use arp::{ArpSeen, ArpWatch};
pub use bird::Bird;
pub use builder::{ClusterBuilder, CniPlugin, NodeSpec, PodStyle, Segment};
pub use cluster::{Cluster, Kept, LabNode, LabPod, PodSpec, Vtep};
pub use cmd::{exec, exec_output};
pub use digest::digest;
pub use process::{
    AgentHandle, Answer, ProbeLoop, Stream, StreamOutcome, expect_all_from, expect_none_leaked,
};
pub use snapshot::NodeSnapshot;
pub use teardown::teardown_prefix;

/// How often [`wait_until`] and the other waits re-check their condition.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Polls `condition` until it holds, failing after `timeout`.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("condition still false after {timeout:?}");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Fails with a clear message unless the process runs as root: the lab needs namespaces,
/// mounts and raw network configuration, and a test that silently skips proves nothing.
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        bail!(
            "netlab must run as root (effective uid is {euid}): it creates network namespaces \
             and mounts bpffs; run the tests with `cargo xtask test` as root"
        );
    }
    Ok(())
}
