//! Probes between nodes: every interval, a small UDP datagram to each node that may hold egress
//! IPs, answered by that node's uplink program in the kernel. An answer says whether the node
//! serves (its lease runs), drains or is fenced (its lease ran out), and for how long it has
//! served without a break; no answer for `misses` intervals and the node is silent. Within a
//! few intervals, without waiting for the Node object, every node knows which nodes can hold
//! egress IPs ([`crate::plan::Health`]).
//!
//! Cost: each node sends `candidates / interval` datagrams a second (60 with three candidates at
//! the default 50 ms), and each candidate answers `nodes / interval` (20,000 a second for a
//! thousand nodes at 50 ms), in the kernel, 58 bytes each way.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use static_egress_common::probe;
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::plan::{Down, Health};

/// How probes run.
#[derive(Clone, Debug)]
pub struct ProbeConfig {
    /// The UDP port every node's uplink program answers on.
    pub port: u16,
    pub interval: Duration,
    /// Unanswered intervals before a node counts as silent.
    pub misses: u32,
    /// How long a node must have served without a break before it takes egress IPs again.
    pub rejoin: Duration,
}

impl ProbeConfig {
    /// How long without an answer makes a node silent.
    pub fn silent_after(&self) -> Duration {
        self.interval * self.misses
    }

    /// How long without a probe makes a node count itself cut off: an interval less than the
    /// others wait, so that it stops serving before they take over.
    pub fn silence(&self) -> Duration {
        self.interval * self.misses.saturating_sub(1)
    }
}

/// The other nodes to probe, by name (see [`crate::plan::peers`]).
pub type Targets = BTreeMap<String, Ipv4Addr>;

/// What the prober asks, as the agent sets it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Asks {
    pub targets: Targets,
    /// This node serves, settled: it may tell a silent peer that it was counted out. A node
    /// that is cut off or rejoining has not heard its peers, so it must not fence them: when
    /// it comes back, its stale view would stop the nodes that took over from it.
    pub count_out: bool,
}

/// What the probes say, for the agent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Liveness {
    /// Every target has answered or had the rejoin time to: the agent plans only from then on, so
    /// that a starting node neither takes its peers' egress IPs nor sends to a node whose
    /// agent never ran.
    pub settled: bool,
    /// The targets this describes.
    pub targets: Targets,
    /// The targets' health.
    pub health: Health,
}

/// What one target last said.
#[derive(Clone, Copy, Debug)]
struct Heard {
    /// Probes sent to it since: counted rather than timed, so that a prober that did not
    /// run for a while (a starved CPU) does not count its peers out for its own pause.
    unanswered: u32,
    state: u8,
    uptime: Duration,
}

/// Starts probing on a thread of its own, the targets from `asks` as they change: the
/// agent's loop may block on a slow disk or netlink for longer than a probe interval, and
/// peers must not count this node out, nor it them, for that.
pub fn start(
    config: ProbeConfig,
    asks: watch::Receiver<Asks>,
) -> io::Result<watch::Receiver<Liveness>> {
    let socket = std::net::UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
    socket.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (tx, rx) = watch::channel(Liveness::default());
    std::thread::Builder::new()
        .name("probes".into())
        .spawn(move || {
            runtime.block_on(async move {
                match UdpSocket::from_std(socket) {
                    Ok(socket) => run(socket, config, asks, tx).await,
                    Err(error) => tracing::error!(%error, "cannot start probing"),
                }
            });
        })?;
    Ok(rx)
}

async fn run(
    socket: UdpSocket,
    config: ProbeConfig,
    mut asks: watch::Receiver<Asks>,
    tx: watch::Sender<Liveness>,
) {
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heard: BTreeMap<Ipv4Addr, Heard> = BTreeMap::new();
    // When each target was first asked: it has had its chance once the silent time passed.
    let mut asked: BTreeMap<Ipv4Addr, Instant> = BTreeMap::new();
    let mut seq: u32 = 0;
    let mut buf = [0u8; 64];
    loop {
        tokio::select! {
            _ = tick.tick() => {
                // Answers that came while this thread did not run (a starved CPU) count before
                // the next probe goes out: the peers' kernels answered in time.
                while let Ok((len, from)) = socket.try_recv_from(&mut buf) {
                    note_reply(&mut heard, &buf[..len], from);
                }
                let now = Instant::now();
                let Asks { targets: current, count_out } = asks.borrow().clone();
                let health_now = health(&current, &heard, &config);
                seq = seq.wrapping_add(1);
                // Nodes that start together come up within a moment of each other: a peer
                // that has not answered yet is given the rejoin time, which this node waits
                // anyway, so that they all start from the same view.
                let patience = config.silent_after().max(config.rejoin);
                for (name, ip) in &current {
                    let first_asked = *asked.entry(*ip).or_insert(now);
                    // A node counted out hears it, and stops serving until its agent knows;
                    // also one that has not answered since this agent started, once it had its
                    // chance: it may hold egress IPs from before (this agent restarted while it
                    // was cut off), which this node plans without. Not before: every peer is
                    // unheard at an agent's first probes.
                    let lost = count_out
                        && health_now.down.get(name) == Some(&Down::Silent)
                        && (heard.contains_key(ip) || now - first_asked >= patience);
                    let request = request(seq, lost);
                    if let Some(h) = heard.get_mut(ip) {
                        h.unanswered = h.unanswered.saturating_add(1);
                    }
                    if let Err(error) = socket
                        .send_to(&request, SocketAddrV4::new(*ip, config.port))
                        .await
                    {
                        tracing::debug!(%ip, %error, "sending a probe");
                    }
                }
                let liveness = Liveness {
                    settled: current.values().all(|ip| {
                        heard.contains_key(ip)
                            || asked.get(ip).is_some_and(|at| now - *at >= patience)
                    }),
                    health: health_now,
                    targets: current,
                };
                tx.send_if_modified(|old| {
                    let changed = *old != liveness;
                    *old = liveness;
                    changed
                });
            }
            received = socket.recv_from(&mut buf) => {
                if let Ok((len, from)) = received {
                    note_reply(&mut heard, &buf[..len], from);
                }
            }
            changed = asks.changed() => {
                if changed.is_err() {
                    return;
                }
                let current = asks.borrow().targets.clone();
                heard.retain(|ip, _| current.values().any(|t| t == ip));
                asked.retain(|ip, _| current.values().any(|t| t == ip));
            }
        }
    }
}

/// A datagram from `from`: when it is an answer, its sender has answered.
fn note_reply(heard: &mut BTreeMap<Ipv4Addr, Heard>, payload: &[u8], from: std::net::SocketAddr) {
    let std::net::SocketAddr::V4(from) = from else {
        return;
    };
    if let Some((state, uptime)) = reply(payload) {
        heard.insert(
            *from.ip(),
            Heard {
                unanswered: 0,
                state,
                uptime,
            },
        );
    }
}

fn health(targets: &Targets, heard: &BTreeMap<Ipv4Addr, Heard>, config: &ProbeConfig) -> Health {
    let mut down = BTreeMap::new();
    let mut rejoining = BTreeSet::new();
    let mut veterans = BTreeSet::new();
    for (name, ip) in targets {
        match heard.get(ip) {
            Some(h) if h.unanswered < config.misses => match h.state {
                probe::SERVING if h.uptime < config.rejoin => {
                    rejoining.insert(name.clone());
                }
                probe::SERVING => {
                    if h.uptime >= config.rejoin * 2 {
                        veterans.insert(name.clone());
                    }
                }
                probe::DRAINING => {
                    down.insert(name.clone(), Down::Draining);
                }
                _ => {
                    down.insert(name.clone(), Down::Fenced);
                }
            },
            _ => {
                down.insert(name.clone(), Down::Silent);
            }
        }
    }
    Health {
        down,
        rejoining,
        veterans,
    }
}

fn request(seq: u32, lost: bool) -> [u8; probe::LEN] {
    let mut out = [0u8; probe::LEN];
    out[..4].copy_from_slice(&probe::MAGIC);
    out[probe::KIND] = probe::REQUEST;
    out[probe::VIEW] = if lost { probe::LOST } else { probe::HEARD };
    out[probe::SEQ..probe::SEQ + 4].copy_from_slice(&seq.to_be_bytes());
    out
}

/// The state and uptime of a reply; `None` for anything else.
fn reply(payload: &[u8]) -> Option<(u8, Duration)> {
    if payload.len() < probe::LEN
        || payload[..4] != probe::MAGIC
        || payload[probe::KIND] != probe::REPLY
    {
        return None;
    }
    let uptime: [u8; 4] = payload[probe::UPTIME..probe::UPTIME + 4].try_into().ok()?;
    Some((
        payload[probe::STATE],
        Duration::from_millis(u64::from(u32::from_be_bytes(uptime))),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ProbeConfig {
        ProbeConfig {
            port: 7947,
            interval: Duration::from_millis(50),
            misses: 4,
            rejoin: Duration::from_secs(2),
        }
    }

    #[test]
    fn requests_and_replies() {
        let r = request(7, false);
        assert_eq!(&r[..4], b"SEP1");
        assert_eq!(r[probe::KIND], probe::REQUEST);
        assert_eq!(r[probe::VIEW], probe::HEARD);
        assert_eq!(request(7, true)[probe::VIEW], probe::LOST);
        assert_eq!(reply(&r), None, "a request is not a reply");
        let mut answer = r;
        answer[probe::KIND] = probe::REPLY;
        answer[probe::STATE] = probe::SERVING;
        answer[probe::UPTIME..].copy_from_slice(&2500u32.to_be_bytes());
        assert_eq!(
            reply(&answer),
            Some((probe::SERVING, Duration::from_millis(2500)))
        );
        assert_eq!(reply(&answer[..8]), None);
    }

    #[test]
    fn health_from_what_was_heard() {
        let ip = |n: u8| Ipv4Addr::new(10, 0, 0, n);
        let targets: Targets = (1..=5).map(|n| (format!("n{n}"), ip(n))).collect();
        let heard = BTreeMap::from([
            (
                ip(1),
                Heard {
                    unanswered: 1,
                    state: probe::SERVING,
                    uptime: Duration::from_secs(60),
                },
            ),
            (
                ip(2),
                Heard {
                    unanswered: 1,
                    state: probe::SERVING,
                    uptime: Duration::from_secs(1),
                },
            ),
            (
                ip(3),
                Heard {
                    unanswered: 1,
                    state: probe::FENCED,
                    uptime: Duration::ZERO,
                },
            ),
            (
                ip(4),
                Heard {
                    unanswered: 1,
                    state: probe::DRAINING,
                    uptime: Duration::from_secs(60),
                },
            ),
            // Heard, but four probes ago.
            (
                ip(5),
                Heard {
                    unanswered: 4,
                    state: probe::SERVING,
                    uptime: Duration::from_secs(60),
                },
            ),
        ]);
        let health = health(&targets, &heard, &config());
        assert_eq!(
            health.down,
            BTreeMap::from([
                ("n3".to_owned(), Down::Fenced),
                ("n4".to_owned(), Down::Draining),
                ("n5".to_owned(), Down::Silent),
            ])
        );
        assert_eq!(health.rejoining, BTreeSet::from(["n2".to_owned()]));
    }
}
