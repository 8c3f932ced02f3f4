//! Conntrack and the egress IPs: how many connections use each (for metrics), and forgetting
//! those translated to an egress IP when this node takes it: any it still tracks were carried
//! by another holder since (the IP moved away and back), so their TCP windows are stale and
//! conntrack would call their next packets invalid, and the connections would stall here.
//! Forgotten, a connection is picked up again from the pod's next packet, translated to the
//! same port (README, "Failover"); unless SNAT had to give it another port than its own, which
//! a new holder cannot guess: those ([`Remapped`]) are listed on the holder, handed to the
//! nodes that may take over ([`crate::source::flows`]) and restored there before the SNAT.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::{Command, Stdio};

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

/// A connection translated to an egress IP with another source port than its own (its own was
/// taken by another pod's connection to the same destination).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Remapped {
    pub protocol: Protocol,
    /// The pod's address and port.
    pub source: SocketAddrV4,
    pub destination: SocketAddrV4,
    /// The source port it leaves with.
    pub port: u16,
    /// It came through the tunnel: its conntrack mark carries our bit, which sends its replies
    /// back through the tunnel.
    pub tunneled: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
        }
    }

    pub fn from_number(number: u8) -> Option<Self> {
        match number {
            6 => Some(Self::Tcp),
            17 => Some(Self::Udp),
            _ => None,
        }
    }
}

/// The remapped connections a node was told of, by the egress IP they are translated to.
pub type HandedOver = BTreeMap<Ipv4Addr, Vec<Remapped>>;

/// The connections translated to one of `ips` with another source port than their own, by
/// egress IP (TCP ones only once established: a handshake in flight is retried anyway).
/// `mark` is our bit. One listing of the whole table, whatever the number of egress IPs.
pub fn remapped_to(ips: &BTreeSet<Ipv4Addr>, mark: u32) -> Result<HandedOver, String> {
    let out = Command::new("conntrack")
        .arg("-L")
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("running conntrack: {e}"))?;
    if !out.status.success() {
        return Err(format!("conntrack -L exited with {}", out.status));
    }
    let mut found = HandedOver::new();
    for (ip, flow) in String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| remapped(line, mark))
        .filter(|(ip, _)| ips.contains(ip))
    {
        found.entry(ip).or_default().push(flow);
    }
    Ok(found)
}

/// One `conntrack -L` line, when it is a remapped connection: the address it is translated to
/// and the connection.
fn remapped(line: &str, mark: u32) -> Option<(Ipv4Addr, Remapped)> {
    let mut fields = line.split_whitespace();
    let protocol = match fields.next()? {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        _ => return None,
    };
    if protocol == Protocol::Tcp && !line.contains(" ESTABLISHED ") {
        return None;
    }
    // The original direction's fields come first, the reply's second.
    let value = |key: &str, nth: usize| {
        line.split_whitespace()
            .filter_map(|f| f.strip_prefix(key))
            .nth(nth)
    };
    let address = |key, nth| value(key, nth)?.parse::<Ipv4Addr>().ok();
    let port = |key, nth| value(key, nth)?.parse::<u16>().ok();
    let translated = port("dport=", 1)?;
    let source = SocketAddrV4::new(address("src=", 0)?, port("sport=", 0)?);
    if translated == source.port() {
        return None;
    }
    let ct_mark = value("mark=", 0).and_then(|m| m.parse::<u32>().ok())?;
    let flow = Remapped {
        protocol,
        source,
        destination: SocketAddrV4::new(address("dst=", 0)?, port("dport=", 0)?),
        port: translated,
        tunneled: ct_mark & mark != 0,
    };
    Some((address("dst=", 1)?, flow))
}

/// Creates the conntrack entries of `flows`, translated to `ip`, as this node's SNAT would
/// have had they started here; `mark` is our bit. Returns how many it created.
pub fn restore(ip: Ipv4Addr, flows: &[Remapped], mark: u32) -> Result<usize, String> {
    let (script, count) = restore_script(ip, flows, mark);
    if count == 0 {
        return Ok(0);
    }
    let mut child = Command::new("conntrack")
        .args(["-R", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running conntrack: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| format!("writing to conntrack: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("running conntrack: {e}"))?;
    if out.status.success() {
        Ok(count)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// The `conntrack -R` lines that create `flows`, and how many. conntrack stops at the first
/// entry it cannot create, so two entries that would clash (the same connection, or the same
/// translated port towards one destination) are cut down to the first.
fn restore_script(ip: Ipv4Addr, flows: &[Remapped], mark: u32) -> (String, usize) {
    let mut connections = BTreeSet::new();
    let mut ports = BTreeSet::new();
    let mut script = String::new();
    let mut count = 0;
    for flow in flows {
        let connection = (flow.protocol, flow.source, flow.destination);
        let port = (flow.protocol, flow.destination, flow.port);
        if !connections.insert(connection) || !ports.insert(port) {
            continue;
        }
        let (name, state, timeout) = match flow.protocol {
            // Each packet sets the timeout of its state again (five days once established).
            Protocol::Tcp => ("tcp", " --state ESTABLISHED", 300),
            Protocol::Udp => ("udp", "", 120),
        };
        script.push_str(&format!(
            "-I -p {name} -s {} -d {} --sport {} --dport {}{state} -u ASSURED,SEEN_REPLY -t {timeout} --src-nat {ip}:{} -m {}\n",
            flow.source.ip(),
            flow.destination.ip(),
            flow.source.port(),
            flow.destination.port(),
            flow.port,
            if flow.tunneled { mark } else { 0 },
        ));
        count += 1;
    }
    (script, count)
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

    const LISTING: &str = "\
tcp      6 116 TIME_WAIT src=10.244.1.2 dst=203.0.113.10 sport=36580 dport=7777 src=203.0.113.10 dst=10.99.0.200 sport=7777 dport=36581 [ASSURED] mark=0 use=1
tcp      6 431999 ESTABLISHED src=10.244.1.3 dst=203.0.113.10 sport=40000 dport=7777 src=203.0.113.10 dst=10.99.0.200 sport=7777 dport=40000 [ASSURED] mark=0 use=1
tcp      6 431999 ESTABLISHED src=10.244.2.4 dst=203.0.113.10 sport=40000 dport=7777 src=203.0.113.10 dst=10.99.0.200 sport=7777 dport=61003 [ASSURED] mark=8192 use=1
udp      17 28 src=10.244.1.3 dst=203.0.113.53 sport=5353 dport=53 src=203.0.113.53 dst=10.99.0.200 sport=53 dport=5354 mark=0 use=1
icmp     1 28 src=10.244.1.2 dst=203.0.113.10 type=8 code=0 id=28938 src=203.0.113.10 dst=10.99.0.200 type=0 code=0 id=28938 mark=0 use=1
";

    fn flow(protocol: Protocol, source: &str, destination: &str, port: u16) -> Remapped {
        Remapped {
            protocol,
            source: source.parse().expect("an address and port"),
            destination: destination.parse().expect("an address and port"),
            port,
            tunneled: false,
        }
    }

    #[test]
    fn only_established_connections_translated_to_another_port_are_remapped() {
        let egress_ip = Ipv4Addr::new(10, 99, 0, 200);
        let found: Vec<Remapped> = LISTING
            .lines()
            .filter_map(|line| remapped(line, 0x2000))
            .map(|(ip, flow)| {
                assert_eq!(ip, egress_ip);
                flow
            })
            .collect();
        assert_eq!(
            found,
            vec![
                Remapped {
                    tunneled: true,
                    ..flow(
                        Protocol::Tcp,
                        "10.244.2.4:40000",
                        "203.0.113.10:7777",
                        61003
                    )
                },
                flow(Protocol::Udp, "10.244.1.3:5353", "203.0.113.53:53", 5354),
            ]
        );
    }

    #[test]
    fn restored_entries_never_clash_with_each_other() {
        let ip = Ipv4Addr::new(10, 99, 0, 200);
        let first = Remapped {
            tunneled: true,
            ..flow(
                Protocol::Tcp,
                "10.244.2.4:40000",
                "203.0.113.10:7777",
                61003,
            )
        };
        let flows = [
            first,
            // The same connection again, and another one claiming the same port.
            flow(
                Protocol::Tcp,
                "10.244.2.4:40000",
                "203.0.113.10:7777",
                61004,
            ),
            flow(
                Protocol::Tcp,
                "10.244.2.5:40000",
                "203.0.113.10:7777",
                61003,
            ),
            // The same port towards another destination is fine.
            flow(Protocol::Udp, "10.244.2.5:40000", "203.0.113.53:53", 61003),
        ];
        let (script, count) = restore_script(ip, &flows, 0x2000);
        assert_eq!(count, 2);
        assert_eq!(
            script,
            "-I -p tcp -s 10.244.2.4 -d 203.0.113.10 --sport 40000 --dport 7777 --state ESTABLISHED -u ASSURED,SEEN_REPLY -t 300 --src-nat 10.99.0.200:61003 -m 8192\n\
             -I -p udp -s 10.244.2.5 -d 203.0.113.53 --sport 40000 --dport 53 -u ASSURED,SEEN_REPLY -t 120 --src-nat 10.99.0.200:61003 -m 0\n"
        );
    }

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
