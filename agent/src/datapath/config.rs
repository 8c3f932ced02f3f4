//! Host-level settings of the data path, and the values they must never take.

use std::path::PathBuf;

use super::RuleSpec;

/// Host-level settings of the data path.
#[derive(Clone, Debug)]
pub struct DatapathConfig {
    pub bpffs: PathBuf,
    pub state_dir: PathBuf,
    /// One bit: ours.
    pub fwmark: u32,
    /// Ours alone: the agent keeps exactly its own routes in it.
    pub route_table: u32,
    pub rule_priority: u32,
    /// The UDP port on which the uplink program answers other nodes' probes.
    pub probe_port: u16,
    /// What the kernel programs log (off: nothing; their log calls cost one branch then).
    pub kernel_log: KernelLog,
    /// When marked packets go to their holder through the tunnel.
    pub tunnel: super::tunnel::TunnelMode,
    /// The tunnel's UDP port (VXLAN), the same on every node.
    pub tunnel_port: u16,
    /// Whether selected pods' packets and their replies skip the origin's routing and
    /// netfilter (`--fast-path`).
    pub fast_path: bool,
    /// Ours alone: the held egress IPs of `announce: Bgp` gateways, for the node's BGP daemon.
    pub announce_table: u32,
    /// This node in AWS, for `announce: Aws` gateways.
    pub aws: Option<super::aws::AwsConfig>,
}

/// How much the kernel programs log into the agent's log (`--kernel-log`, or a Node's
/// `static-egress.io/kernel-log` annotation): `debug` tells each packet they drop and why.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelLog {
    #[default]
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl KernelLog {
    pub fn level(self) -> Option<aya_log::Level> {
        use aya_log::Level;
        Some(match self {
            Self::Off => return None,
            Self::Error => Level::Error,
            Self::Warn => Level::Warn,
            Self::Info => Level::Info,
            Self::Debug => Level::Debug,
            Self::Trace => Level::Trace,
        })
    }
}

impl DatapathConfig {
    pub fn rule(&self) -> RuleSpec {
        RuleSpec {
            priority: self.rule_priority,
            mark: self.fwmark,
            table: self.route_table,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "routing table {0} is reserved by the kernel (0 unspec, 253 default, 254 main, 255 local); \
         pick an unused table such as 1490"
    )]
    ReservedTable(u32),
    #[error(
        "rule priority {0} is taken by the kernel's default rules (0 local, 32766 main, 32767 \
         default); pick one before 32766 that no other rule uses, such as 1490"
    )]
    ReservedPriority(u32),
    #[error("{0:?} is not a number")]
    NotANumber(String),
}

fn number(s: &str) -> Result<u32, ConfigError> {
    s.parse().map_err(|_| ConfigError::NotANumber(s.to_owned()))
}

/// Our table is flushed and rewritten at will: never one the kernel or the system relies on.
pub fn check_route_table(s: &str) -> Result<u32, ConfigError> {
    match number(s)? {
        table @ (0 | 253..=255) => Err(ConfigError::ReservedTable(table)),
        table => Ok(table),
    }
}

/// Our rule must not sit at (or be confused with) the kernel's own rules.
pub fn check_rule_priority(s: &str) -> Result<u32, ConfigError> {
    match number(s)? {
        priority @ (0 | 32766 | 32767) => Err(ConfigError::ReservedPriority(priority)),
        priority => Ok(priority),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_tables_and_priorities_are_refused() {
        for table in ["0", "253", "254", "255"] {
            assert!(check_route_table(table).is_err(), "{table}");
        }
        assert_eq!(check_route_table("1490"), Ok(1490));
        assert_eq!(check_route_table("252"), Ok(252));
        assert_eq!(check_route_table("256"), Ok(256));
        for priority in ["0", "32766", "32767"] {
            assert!(check_rule_priority(priority).is_err(), "{priority}");
        }
        assert_eq!(check_rule_priority("1490"), Ok(1490));
        assert_eq!(
            check_rule_priority("x"),
            Err(ConfigError::NotANumber("x".into()))
        );
    }
}
