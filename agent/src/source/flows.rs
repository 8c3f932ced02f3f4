//! Connections handed over between holders. SNAT keeps a connection's own source port when it
//! can, so a node taking an egress IP over picks most connections up mid-stream with the same
//! translation. Not the few whose port was taken (two pods' connections from one port to one
//! destination): the holder chose another port for them, which the taker cannot guess. So
//! every interval a holder lists those ([`Remapped`]) and sends them to the nodes that may
//! take its egress IPs over, as UDP datagrams to the probe port (which the kernel programs
//! leave to this socket: they answer probes only). A taker restores them before its SNAT goes
//! in (`Datapath::apply`), and only those of the pods its plan translates to that IP.
//!
//! What a taker knows is at most an interval old (plus a lost datagram): a connection remapped
//! in the last interval before an unplanned move may break. Each datagram stands alone (the
//! connections of one egress IP, up to [`PER_DATAGRAM`]) and says how long to keep them: [`KEEP`]
//! times as long as until its sender's next listing. What is not heard again by then is
//! forgotten.
//!
//! Cost: nothing on the wire while no connection is remapped; otherwise 16 bytes per remapped
//! connection per interval to each node that may take over. On a holder, one listing of the
//! conntrack table per interval, or less often when the table is large: the next listing
//! waits [`SPACING`] times as long as the last took (100,000 connections take about 0.3 s to
//! list, so every 6 s), which keeps it under 5% of a core.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::datapath::conntrack::{self, HandedOver, Protocol, Remapped};
use crate::source::probes::Asks;

/// `b"SEF1"`, as the first four payload bytes (probes start with `SEP1`).
const MAGIC: [u8; 4] = *b"SEF1";
/// Magic, egress IP, milliseconds to keep, count.
const HEADER: usize = 14;
/// Protocol, flags, source, destination, ports.
const ENTRY: usize = 16;
/// Fits an IPv4 UDP datagram in a 1,500-byte MTU, with room for a tunnel around it.
const PER_DATAGRAM: usize = 80;
/// Listings a connection is remembered for after it was last heard of.
const KEEP: u32 = 3;
const TUNNELED: u8 = 1;
/// At most this many connections are kept from what was heard (1.6 MiB or so), and for at
/// most [`LONGEST_KEEP`]: a peer that sends nonsense cannot fill the agent's memory.
const MOST_HEARD: usize = 65_536;
const LONGEST_KEEP: Duration = Duration::from_secs(600);
/// A listing of the conntrack table waits this many times as long as the last one took.
const SPACING: u32 = 20;

/// How connections are handed over.
#[derive(Clone, Copy, Debug)]
pub struct FlowSync {
    /// The probe port, on every node.
    pub port: u16,
    /// How often a holder sends; zero turns handing over off.
    pub interval: Duration,
    /// Our fwmark bit (see [`Remapped::tunneled`]).
    pub mark: u32,
}

impl FlowSync {
    /// As the agent's failover options say, with our fwmark bit.
    pub fn new(failover: &crate::membership::FailoverOptions, mark: u32) -> Self {
        Self {
            port: failover.probes.port,
            interval: failover.flow_sync,
            mark,
        }
    }
}

/// Starts sending the remapped connections of the egress IPs in `held` to the nodes in
/// `peers`, and listening for theirs; the returned watch has what was heard. Handing over is
/// an improvement, not a duty: when the port cannot be bound, it is logged and nothing is
/// heard.
pub fn start(
    config: FlowSync,
    held: watch::Receiver<BTreeSet<Ipv4Addr>>,
    peers: watch::Receiver<Asks>,
) -> watch::Receiver<HandedOver> {
    let (tx, rx) = watch::channel(HandedOver::new());
    if config.interval.is_zero() || config.port == 0 {
        return rx;
    }
    let socket = match std::net::UdpSocket::bind(SocketAddrV4::new(
        Ipv4Addr::UNSPECIFIED,
        config.port,
    ))
    .and_then(|s| s.set_nonblocking(true).map(|()| s))
    .and_then(UdpSocket::from_std)
    {
        Ok(socket) => socket,
        Err(error) => {
            tracing::warn!(port = config.port, %error, "cannot listen for handed-over connections; connections SNAT remapped will not survive a takeover");
            return rx;
        }
    };
    tokio::spawn(run(socket, config, held, peers, tx));
    rx
}

async fn run(
    socket: UdpSocket,
    config: FlowSync,
    held: watch::Receiver<BTreeSet<Ipv4Addr>>,
    peers: watch::Receiver<Asks>,
    tx: watch::Sender<HandedOver>,
) {
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heard = Heard::default();
    let mut buf = [0u8; HEADER + PER_DATAGRAM * ENTRY];
    let mut next_listing = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let now = Instant::now();
                heard.forget_before(now);
                publish(&tx, &heard);
                let ips = held.borrow().clone();
                let targets: Vec<Ipv4Addr> = peers.borrow().targets.values().copied().collect();
                if ips.is_empty() || targets.is_empty() || now < next_listing {
                    continue;
                }
                let listed = tokio::task::spawn_blocking(move || list(&ips, config.mark)).await;
                let gap = config.interval.max(now.elapsed() * SPACING);
                next_listing = now + gap;
                let keep = gap * KEEP;
                for datagram in listed.unwrap_or_default().iter().flat_map(|(ip, flows)| encode(*ip, flows, keep)) {
                    for target in &targets {
                        if let Err(error) = socket.send_to(&datagram, SocketAddrV4::new(*target, config.port)).await {
                            tracing::debug!(%target, %error, "sending remapped connections");
                        }
                    }
                }
            }
            received = socket.recv_from(&mut buf) => {
                let Ok((len, SocketAddr::V4(from))) = received else { continue };
                // Only from the nodes that may hold egress IPs (probe requests that reach
                // the stack, before the programs are attached, are not ours either).
                if !peers.borrow().targets.values().any(|ip| ip == from.ip()) {
                    continue;
                }
                if let Some((ip, keep, flows)) = decode(&buf[..len]) {
                    heard.note(ip, flows, Instant::now() + keep.min(LONGEST_KEEP));
                    publish(&tx, &heard);
                }
            }
        }
    }
}

/// The remapped connections of `ips`; none when conntrack cannot list them.
fn list(ips: &BTreeSet<Ipv4Addr>, mark: u32) -> HandedOver {
    conntrack::remapped_to(ips, mark).unwrap_or_else(|error| {
        tracing::debug!(%error, "listing remapped connections");
        HandedOver::new()
    })
}

/// What was heard, with until when each connection is kept; at most [`MOST_HEARD`].
#[derive(Default)]
struct Heard {
    flows: BTreeMap<Ipv4Addr, BTreeMap<Remapped, Instant>>,
    count: usize,
}

impl Heard {
    fn note(&mut self, ip: Ipv4Addr, flows: Vec<Remapped>, until: Instant) {
        let known = self.flows.entry(ip).or_default();
        for flow in flows {
            if let Some(kept) = known.get_mut(&flow) {
                *kept = until;
            } else if self.count < MOST_HEARD {
                known.insert(flow, until);
                self.count += 1;
            }
        }
    }

    fn forget_before(&mut self, now: Instant) {
        for flows in self.flows.values_mut() {
            flows.retain(|_, until| *until >= now);
        }
        self.flows.retain(|_, flows| !flows.is_empty());
        self.count = self.flows.values().map(BTreeMap::len).sum();
    }

    fn current(&self) -> HandedOver {
        self.flows
            .iter()
            .map(|(ip, flows)| (*ip, flows.keys().copied().collect()))
            .collect()
    }
}

fn publish(tx: &watch::Sender<HandedOver>, heard: &Heard) {
    let current = heard.current();
    tx.send_if_modified(|old| {
        let changed = *old != current;
        *old = current;
        changed
    });
}

/// The datagrams that carry `flows`, to be kept for `keep`, each standing alone; none for none.
fn encode(ip: Ipv4Addr, flows: &[Remapped], keep: Duration) -> Vec<Vec<u8>> {
    let keep_ms = u32::try_from(keep.as_millis()).unwrap_or(u32::MAX);
    flows
        .chunks(PER_DATAGRAM)
        .map(|chunk| {
            let mut datagram = Vec::with_capacity(HEADER + chunk.len() * ENTRY);
            datagram.extend_from_slice(&MAGIC);
            datagram.extend_from_slice(&ip.octets());
            datagram.extend_from_slice(&keep_ms.to_be_bytes());
            // At most PER_DATAGRAM.
            datagram.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            for flow in chunk {
                datagram.push(flow.protocol.number());
                datagram.push(if flow.tunneled { TUNNELED } else { 0 });
                datagram.extend_from_slice(&flow.source.ip().octets());
                datagram.extend_from_slice(&flow.destination.ip().octets());
                datagram.extend_from_slice(&flow.source.port().to_be_bytes());
                datagram.extend_from_slice(&flow.destination.port().to_be_bytes());
                datagram.extend_from_slice(&flow.port.to_be_bytes());
            }
            datagram
        })
        .collect()
}

/// The egress IP, how long to keep them and the connections a datagram tells; `None` when it
/// is not one of ours or is cut short.
fn decode(datagram: &[u8]) -> Option<(Ipv4Addr, Duration, Vec<Remapped>)> {
    let (header, entries) = datagram.split_at_checked(HEADER)?;
    if header[..4] != MAGIC {
        return None;
    }
    let ip = Ipv4Addr::new(header[4], header[5], header[6], header[7]);
    let keep = u32::from_be_bytes([header[8], header[9], header[10], header[11]]);
    let count = usize::from(u16::from_be_bytes([header[12], header[13]]));
    if entries.len() != count * ENTRY {
        return None;
    }
    let flows = entries
        .chunks_exact(ENTRY)
        .map(|e| {
            let address = |at: usize| Ipv4Addr::new(e[at], e[at + 1], e[at + 2], e[at + 3]);
            let port = |at: usize| u16::from_be_bytes([e[at], e[at + 1]]);
            Some(Remapped {
                protocol: Protocol::from_number(e[0])?,
                tunneled: e[1] & TUNNELED != 0,
                source: SocketAddrV4::new(address(2), port(10)),
                destination: SocketAddrV4::new(address(6), port(12)),
                port: port(14),
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some((ip, Duration::from_millis(u64::from(keep)), flows))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(n: u16) -> Remapped {
        Remapped {
            protocol: if n.is_multiple_of(2) {
                Protocol::Tcp
            } else {
                Protocol::Udp
            },
            source: SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, (n % 250) as u8 + 1), 40_000),
            destination: SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 10), 443),
            port: 50_000 + n,
            tunneled: n.is_multiple_of(3),
        }
    }

    #[test]
    fn connections_cross_in_datagrams_that_stand_alone() {
        let ip = Ipv4Addr::new(10, 99, 0, 200);
        let flows: Vec<Remapped> = (0..170).map(flow).collect();
        let keep = Duration::from_secs(3);
        let datagrams = encode(ip, &flows, keep);
        assert_eq!(datagrams.len(), 3);
        assert!(datagrams.iter().all(|d| d.len() <= 1_300));
        let back: Vec<Remapped> = datagrams
            .iter()
            .flat_map(|d| {
                let (to, kept, flows) = decode(d).expect("decodes");
                assert_eq!((to, kept), (ip, keep));
                flows
            })
            .collect();
        assert_eq!(back, flows);
        assert!(encode(ip, &[], keep).is_empty());
    }

    #[test]
    fn what_is_not_ours_or_cut_short_is_ignored() {
        let datagram = encode(
            Ipv4Addr::new(10, 99, 0, 200),
            &[flow(2)],
            Duration::from_secs(3),
        )
        .remove(0);
        assert!(decode(&datagram[..datagram.len() - 1]).is_none());
        let mut probe = datagram.clone();
        probe[..4].copy_from_slice(b"SEP1");
        assert!(decode(&probe).is_none());
        let mut icmp = datagram;
        icmp[HEADER] = 1;
        assert!(decode(&icmp).is_none());
    }

    #[test]
    fn connections_not_heard_of_again_are_forgotten() {
        let ip = Ipv4Addr::new(10, 99, 0, 200);
        let start = Instant::now();
        let mut heard = Heard::default();
        heard.note(ip, vec![flow(1), flow(2)], start + Duration::from_secs(3));
        heard.note(ip, vec![flow(2)], start + Duration::from_secs(5));
        heard.forget_before(start + Duration::from_secs(4));
        assert_eq!(heard.current(), HandedOver::from([(ip, vec![flow(2)])]));
        heard.forget_before(start + Duration::from_secs(6));
        assert!(heard.current().is_empty());
    }

    #[test]
    fn what_is_kept_is_bounded() {
        let ip = Ipv4Addr::new(10, 99, 0, 200);
        let until = Instant::now() + Duration::from_secs(3);
        let mut heard = Heard::default();
        let many = (0..=u16::MAX).map(|port| Remapped { port, ..flow(0) });
        heard.note(ip, many.clone().collect(), until);
        heard.note(
            ip,
            many.map(|port| Remapped {
                protocol: Protocol::Udp,
                ..port
            })
            .collect(),
            until,
        );
        assert_eq!(heard.count, MOST_HEARD);
        assert_eq!(heard.current()[&ip].len(), MOST_HEARD);
    }
}
