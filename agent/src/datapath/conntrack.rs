//! Conntrack and the egress IPs: how many connections use each (for metrics), and forgetting
//! those translated to an egress IP when this node takes it: any it still tracks were carried
//! by another holder since (the IP moved away and back), so their TCP windows are stale and
//! conntrack would call their next packets invalid, and the connections would stall here.
//! Forgotten, a connection is picked up again from the pod's next packet, translated to the
//! same port (README, "Failover").

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::Command;

/// Deletes the tracked connections whose replies go to `ip`; a message when that failed.
pub fn forget_translated_to(ip: Ipv4Addr) -> Result<(), String> {
    let out = Command::new("conntrack")
        .args(["-D", "--reply-dst", &ip.to_string()])
        .output()
        .map_err(|e| format!("running conntrack: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // conntrack exits with 1 when there was nothing to delete.
    if out.status.success() || stderr.contains(" 0 flow entries") {
        Ok(())
    } else {
        Err(stderr.trim().to_owned())
    }
}

/// Source ports SNAT picks from when a connection's own port is taken (1024-65535).
const SNAT_PORTS: u64 = 64_512;

/// How an egress IP's source ports are used here.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnatUse {
    /// Connections translated to it.
    pub connections: u64,
    /// Those to its busiest destination (address, port and protocol): they share one range
    /// of source ports, so that is where an egress IP runs out first.
    pub busiest: u64,
}

impl SnatUse {
    /// The busiest destination's share of the source ports.
    pub fn busiest_share(&self) -> f64 {
        // Both far below 2^52: exact as floats.
        #[expect(clippy::cast_precision_loss, reason = "small integers")]
        let share = self.busiest as f64 / SNAT_PORTS as f64;
        share
    }
}

/// The use of each of `ips` by the connections tracked here (none when conntrack cannot be
/// run: the counts are for metrics, never for the data path).
pub fn snat_use(ips: &[Ipv4Addr]) -> BTreeMap<Ipv4Addr, SnatUse> {
    ips.iter()
        .map(|ip| {
            let listed = Command::new("conntrack")
                .args(["-L", "--reply-dst", &ip.to_string()])
                .output();
            let used = match listed {
                Ok(out) if out.status.success() => usage(&String::from_utf8_lossy(&out.stdout)),
                _ => SnatUse::default(),
            };
            (*ip, used)
        })
        .collect()
}

/// Counts `conntrack -L` lines by destination: the protocol, and the reply direction's source
/// address and port (the original destination).
fn usage(listing: &str) -> SnatUse {
    let mut by_destination: BTreeMap<(&str, &str, &str), u64> = BTreeMap::new();
    for line in listing.lines() {
        let mut fields = line.split_whitespace();
        let Some(protocol) = fields.next() else {
            continue;
        };
        let reply = |key: &str| {
            line.split_whitespace()
                .filter_map(|f| f.strip_prefix(key))
                .nth(1)
                .unwrap_or_default()
        };
        *by_destination
            .entry((protocol, reply("src="), reply("sport=")))
            .or_default() += 1;
    }
    SnatUse {
        connections: by_destination.values().sum(),
        busiest: by_destination.values().copied().max().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_counted_by_destination() {
        let listing = "\
tcp      6 116 TIME_WAIT src=10.244.1.2 dst=203.0.113.10 sport=36580 dport=7777 src=203.0.113.10 dst=10.99.0.200 sport=7777 dport=36580 [ASSURED] mark=0 use=1
tcp      6 431999 ESTABLISHED src=10.244.1.3 dst=203.0.113.10 sport=40000 dport=7777 src=203.0.113.10 dst=10.99.0.200 sport=7777 dport=40000 [ASSURED] mark=0 use=1
tcp      6 431999 ESTABLISHED src=10.244.1.3 dst=203.0.113.10 sport=40001 dport=443 src=203.0.113.10 dst=10.99.0.200 sport=443 dport=40001 [ASSURED] mark=0 use=1
icmp     1 28 src=10.244.1.2 dst=203.0.113.10 type=8 code=0 id=28938 src=203.0.113.10 dst=10.99.0.200 type=0 code=0 id=28938 mark=0 use=1
";
        let used = usage(listing);
        assert_eq!(
            used,
            SnatUse {
                connections: 4,
                busiest: 2
            }
        );
        assert!((used.busiest_share() - 2.0 / 64_512.0).abs() < 1e-12);
        assert_eq!(usage(""), SnatUse::default());
    }
}
