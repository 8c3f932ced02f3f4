//! This node's part in failover: which nodes it probes, what it makes of their answers, and
//! its own standing, kept in the kernel's lease. The agent renews the lease every probe
//! interval; the kernel serves by it alone, so that a node stops serving on its own when:
//! - its agent is gone longer than the lease (killed, stuck, frozen);
//! - probes stop coming (it is cut off), one interval before the others would count it out
//!   and take its egress IPs; it serves again when they come back, unless they did;
//! - a peer's probe says it was counted out (the peer lost it, or the node was cut off and
//!   came back): until its agent has planned with that.
//!
//! Every node then hears it as fenced, or silent, and no two nodes serve one egress IP.
//!
//! A cordoned node drains: its kernel answers *draining* as soon as its agent sees the cordon,
//! so the others take its egress IPs within an interval, while it translates what still
//! reaches it for [`FailoverOptions::handover`]. The others wait for that answer rather than
//! act on the cordon in the objects, which each node sees at its own moment; they act on the
//! cordon alone once [`FailoverOptions::cordon_grace`] has passed without it (an agent that
//! does not drain), as a planned move.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use static_egress_common::{Heard, LEASE_DRAINING, Lease};
use tokio::sync::watch;

use crate::datapath::{Datapath, DatapathError, monotonic_ns};
use crate::model::Snapshot;
use crate::plan::{Down, Health, Holder, NodePlan, Peers, handovers};
use crate::source::probes::{Asks, Liveness, ProbeConfig};

/// How often the nodes that probed this one are counted (a walk of a map of up to one entry
/// per node): they change only when nodes come and go.
const COUNT_PROBERS_EVERY: Duration = Duration::from_secs(1);

/// How this agent takes part in failover.
#[derive(Clone, Debug)]
pub struct FailoverOptions {
    pub probes: ProbeConfig,
    /// How long the kernel lets this node serve after the agent last renewed its lease.
    pub lease: Duration,
    /// On SIGTERM, hand the egress IPs over before stopping.
    pub drain_on_stop: bool,
    /// How often a holder tells the others its remapped connections (see
    /// [`crate::source::flows`]); zero: never.
    pub flow_sync: Duration,
}

impl FailoverOptions {
    /// How long a draining node serves on: the others hear it drain within an interval, count
    /// it out and take its egress IPs; a few intervals more cover their apply.
    pub fn handover(&self) -> Duration {
        self.probes.interval * 6
    }

    /// How long a cordoned node that still answers *serving* keeps its egress IPs: the
    /// nodes see the cordon in the objects moments apart (a file read, a watch event), and it
    /// drains as soon as its agent does.
    pub fn cordon_grace(&self) -> Duration {
        self.probes.interval * 20
    }
}

/// This node's standing, as its own lease and the probes it received say.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Own {
    #[default]
    Serving,
    /// Back less than the rejoin time ago.
    Rejoining,
    /// A peer counted this node out since the agent last planned (it was cut off, or did
    /// not answer), or the lease ran out before: the others hold its egress IPs.
    CutOff,
}

pub struct Membership {
    pub options: FailoverOptions,
    asks: watch::Sender<Asks>,
    peers: Peers,
    liveness: Liveness,
    /// The peers came from the objects at least once.
    peers_known: bool,
    /// The probes settled once: from then on the agent plans whatever they say.
    settled_once: bool,
    draining: bool,
    /// Since when this node is cordoned, as far as its agent knows: it drains meanwhile.
    cordoned_since: Option<Instant>,
    /// The other nodes the objects say are cordoned, and since when this agent knows.
    cordoned: BTreeMap<String, Instant>,
    /// Served for twice the rejoin time (see `Health::veterans`).
    veteran: bool,
    /// Stopping for a restart: the data path stays and serves on its lease.
    stopping: bool,
    own: Own,
    /// `Heard::cut_offs` at the last renewal (what a plan made now knows of), and as of the
    /// last plan that was applied (what the kernel then lets this node serve with).
    cut_offs: u32,
    acked: Option<u32>,
    probed_by: usize,
    counted_at: Option<Instant>,
    /// Planned moves under way (see `moving`): the old holder, and when the move is due.
    taking: BTreeMap<Ipv4Addr, (Holder, Instant)>,
}

impl Membership {
    pub fn new(options: FailoverOptions, asks: watch::Sender<Asks>) -> Self {
        Self {
            options,
            asks,
            peers: Peers::default(),
            liveness: Liveness::default(),
            peers_known: false,
            settled_once: false,
            draining: false,
            cordoned_since: None,
            cordoned: BTreeMap::new(),
            veteran: false,
            stopping: false,
            own: Own::default(),
            cut_offs: 0,
            acked: None,
            probed_by: 0,
            counted_at: None,
            taking: BTreeMap::new(),
        }
    }

    /// The planned moves from `applied` to `next` still under way (see
    /// [`PlanConfig::moving`](crate::plan::PlanConfig::moving)): each waits four intervals,
    /// which cover the old holder's next probe tick and apply, from when this node first
    /// saw it; the old holder itself waits two more, to translate what nodes that act a
    /// little later still send it. A move ends when it is due (the plan made now enacts it)
    /// or when `next` no longer makes it.
    pub fn moving(
        &mut self,
        applied: &NodePlan,
        next: &NodePlan,
        node: &str,
        health: &Health,
    ) -> BTreeMap<Ipv4Addr, Holder> {
        let after = next.holders();
        self.taking
            .retain(|ip, (old, _)| after.get(ip).is_some_and(|new| *new != old.node));
        let now = Instant::now();
        for (ip, old) in handovers(applied, next, health) {
            let wait = if old.node == node {
                self.options.handover()
            } else {
                self.handover_wait()
            };
            self.taking.entry(ip).or_insert((old, now + wait));
        }
        self.taking.retain(|_, (_, due)| *due > now);
        self.taking
            .iter()
            .map(|(ip, (old, _))| (*ip, old.clone()))
            .collect()
    }

    /// The agent must plan again though nothing came in: a planned move is due, or the health
    /// it planned with (`planned`) changed with time (a cordoned node's drain handed over, a cordon's grace
    /// ran out).
    pub fn due(&self, node: &str, planned: &Health) -> bool {
        let now = Instant::now();
        self.taking.values().any(|(_, due)| *due <= now)
            || (self.settled() && self.health(node) != *planned)
    }

    /// Four intervals: the old holder hears of the move up to an interval after this node
    /// (each reads the other's uptime from its probes), acts at its next tick and applies.
    fn handover_wait(&self) -> Duration {
        self.options.probes.interval * 4
    }

    /// The nodes around this one, as the objects say now.
    pub fn set_peers(&mut self, peers: Peers) {
        self.asks.send_if_modified(|old| {
            let changed = old.targets != peers.targets;
            old.targets.clone_from(&peers.targets);
            changed
        });
        if peers.addresses != self.peers.addresses {
            self.counted_at = None;
        }
        self.peers = peers;
        self.peers_known = true;
    }

    /// Takes what the probes say now; `true` when it changes who may hold egress IPs.
    pub fn heard(&mut self, liveness: Liveness) -> bool {
        let was_settled = self.settled();
        let changed = liveness.health != self.liveness.health;
        self.liveness = liveness;
        self.settled_once |= self.settled_now();
        changed || was_settled != self.settled()
    }

    /// Whether the probes have had their chance since the agent started.
    pub fn settled(&self) -> bool {
        self.settled_once || self.settled_now()
    }

    /// Every peer the objects name now has answered or had its chance to.
    fn settled_now(&self) -> bool {
        self.peers_known && self.liveness.settled && self.liveness.targets == self.peers.targets
    }

    /// Told to drain (SIGTERM), or cordoned.
    fn draining(&self) -> bool {
        self.draining || self.cordoned_since.is_some()
    }

    /// Takes the nodes `snapshot` says are cordoned (`node` is this one); `true` when this
    /// node starts or stops draining for it.
    pub fn set_cordoned(&mut self, node: &str, snapshot: &Snapshot) -> bool {
        let mut cordoned: BTreeSet<String> = snapshot
            .nodes
            .values()
            .filter(|n| n.unschedulable)
            .map(|n| n.name.clone())
            .collect();
        let now = Instant::now();
        let own = cordoned.remove(node);
        let changed = own != self.cordoned_since.is_some();
        if changed {
            self.cordoned_since = own.then_some(now);
            if own {
                tracing::info!("cordoned: handing the egress IPs of this node over");
            } else {
                tracing::info!("no longer cordoned: serving again");
            }
        }
        self.cordoned.retain(|name, _| cordoned.contains(name));
        for name in cordoned {
            self.cordoned.entry(name).or_insert(now);
        }
        changed
    }

    /// The health of the candidate holders for the planner: the peers' as probed, this
    /// node's own as its lease says.
    pub fn health(&self, node: &str) -> Health {
        let mut health = self.liveness.health.clone();
        cordons(
            &mut health,
            &self.cordoned,
            self.options.cordon_grace(),
            Instant::now(),
        );
        let handed_over = self
            .cordoned_since
            .is_some_and(|since| since.elapsed() >= self.options.handover());
        if self.draining || handed_over {
            health.down.insert(node.to_owned(), Down::Draining);
        } else {
            match self.own {
                Own::Serving => {
                    if self.veteran {
                        health.veterans.insert(node.to_owned());
                    }
                }
                Own::Rejoining => {
                    health.rejoining.insert(node.to_owned());
                }
                Own::CutOff => {
                    health.down.insert(node.to_owned(), Down::CutOff);
                }
            }
        }
        health
    }

    /// Renews the lease and reads this node's standing; `true` when the agent must plan
    /// again: the standing changed, or a peer counted this node out since the last plan.
    pub fn renew(&mut self, datapath: &mut Datapath) -> Result<bool, DatapathError> {
        let now = monotonic_ns();
        let old = datapath.lease();
        let heard = datapath.heard();
        let mut acked = *self.acked.get_or_insert(old.cut_offs_seen);
        if old.expires_ns != 0 && old.expires_ns <= now {
            // The lease ran out (this agent was away longer, frozen or killed): the kernel
            // stopped serving, and renewing must not start it again with a plan made before
            // the break, while another node holds what this one did. It serves again once a
            // plan made from now on is in place (see `applied`). A first lease has no plan
            // before it to protect.
            acked = heard.cut_offs.wrapping_sub(1);
            self.acked = Some(acked);
            tracing::warn!("the lease had run out: not serving until planned again");
        }
        if self
            .counted_at
            .is_none_or(|at| at.elapsed() >= COUNT_PROBERS_EVERY)
        {
            self.probed_by = datapath.probed_by(&self.peers.addresses);
            self.counted_at = Some(Instant::now());
        }
        let lease = next_lease(&old, &self.terms(acked), now);
        datapath.set_lease(lease)?;
        self.cut_offs = heard.cut_offs;
        let own = standing(&lease, &heard, now, self.options.probes.rejoin);
        let uptime = now.saturating_sub(lease.since_ns.max(heard.cut_off_ns));
        let veteran = uptime >= nanos(self.options.probes.rejoin * 2);
        let changed = own != self.own || veteran != self.veteran;
        self.veteran = veteran;
        if changed {
            match own {
                Own::CutOff => tracing::info!(
                    "not serving until planned again (counted out by another node, or back \
                     after a break)"
                ),
                Own::Rejoining => tracing::info!(
                    "rejoining: taking egress IPs only after serving {:?} without a break",
                    self.options.probes.rejoin
                ),
                Own::Serving => tracing::info!("serving"),
            }
        }
        self.own = own;
        let count_out = own == Own::Serving && !self.draining();
        self.asks.send_if_modified(|old| {
            let changed = old.count_out != count_out;
            old.count_out = count_out;
            changed
        });
        // A peer counted this node out again since the last plan: only a new plan lets the
        // kernel serve again (see `applied`), even if the standing stays the same.
        Ok(changed || heard.cut_offs != acked)
    }

    /// A plan made with the standing of the last renewal is in place: the kernel may serve
    /// again if a peer had counted this node out (it no longer holds what the others took).
    pub fn applied(&mut self, datapath: &mut Datapath) -> Result<(), DatapathError> {
        if self.acked == Some(self.cut_offs) {
            return Ok(());
        }
        self.acked = Some(self.cut_offs);
        let mut lease = datapath.lease();
        lease.cut_offs_seen = self.cut_offs;
        datapath.set_lease(lease)
    }

    /// The agent stops and leaves the data path serving for the next one: no probes come
    /// from this node's prober meanwhile, nor perhaps from the others' (all restarting), so
    /// the kernel must not take that for a cut-off.
    pub fn stop(&mut self, datapath: &mut Datapath) -> Result<(), DatapathError> {
        self.stopping = true;
        self.renew(datapath).map(drop)
    }

    /// Starts handing the egress IPs over: the kernel answers probes as draining at once.
    pub fn drain(&mut self, datapath: &mut Datapath) -> Result<(), DatapathError> {
        self.draining = true;
        self.renew(datapath).map(drop)
    }

    fn terms(&self, acked: u32) -> Terms {
        Terms {
            lease: self.options.lease,
            // A node probed by a single other one cannot tell that one's death from its own
            // cut-off: fencing itself would stop all egress when its only peer dies. Nor is
            // there a point when no other node could take over, or when this agent stops for
            // a restart (the lease still runs out if it does not come back).
            silence: if self.peers.candidate
                && self.probed_by >= 2
                && !self.peers.targets.is_empty()
                && !self.stopping
            {
                self.options.probes.silence()
            } else {
                Duration::ZERO
            },
            // A prober's probes come every interval; two make room for jitter.
            steady: self.options.probes.interval * 2,
            isolated: self.options.probes.silent_after(),
            acked,
            draining: self.draining(),
        }
    }
}

/// What the agent grants the kernel at a renewal.
struct Terms {
    lease: Duration,
    silence: Duration,
    steady: Duration,
    isolated: Duration,
    acked: u32,
    draining: bool,
}

/// Marks the nodes cordoned for `grace` or longer as such, unless the probes already say why
/// they cannot hold (draining, as they should).
fn cordons(
    health: &mut Health,
    cordoned: &BTreeMap<String, Instant>,
    grace: Duration,
    now: Instant,
) {
    for (name, since) in cordoned {
        if now.duration_since(*since) >= grace {
            health.down.entry(name.clone()).or_insert(Down::Cordoned);
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The lease from now on: the break starts over when the old one had run out.
fn next_lease(old: &Lease, terms: &Terms, now: u64) -> Lease {
    Lease {
        expires_ns: now.saturating_add(nanos(terms.lease)),
        since_ns: if old.expires_ns > now {
            old.since_ns
        } else {
            now
        },
        silence_ns: nanos(terms.silence),
        steady_ns: nanos(terms.steady),
        isolated_ns: nanos(terms.isolated),
        cut_offs_seen: terms.acked,
        flags: if terms.draining { LEASE_DRAINING } else { 0 },
    }
}

/// This node's standing under `lease`, as the kernel decides it (see `lease_state` in the
/// kernel programs) and as its probe answers tell the others.
///
/// Silence alone is left to the kernel, which stops serving while it lasts: if it lasted long
/// enough for the others to count this node out, their next probes say so and this node is
/// cut off; if not (a short pause of theirs), it was never replaced and serves on.
fn standing(lease: &Lease, heard: &Heard, now: u64, rejoin: Duration) -> Own {
    let uptime = now.saturating_sub(lease.since_ns.max(heard.cut_off_ns));
    if heard.cut_offs != lease.cut_offs_seen {
        Own::CutOff
    } else if uptime < nanos(rejoin) {
        Own::Rejoining
    } else {
        Own::Serving
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cordon_counts_only_after_the_grace_and_a_drain_comes_first() {
        let start = Instant::now();
        let grace = Duration::from_secs(1);
        let cordoned = BTreeMap::from([("n2".to_owned(), start), ("n3".to_owned(), start)]);
        let mut health = Health::default();
        health.down.insert("n3".into(), Down::Draining);
        cordons(
            &mut health,
            &cordoned,
            grace,
            start + Duration::from_millis(999),
        );
        assert_eq!(health.down.get("n2"), None);
        cordons(&mut health, &cordoned, grace, start + grace);
        assert_eq!(health.down.get("n2"), Some(&Down::Cordoned));
        assert_eq!(health.down.get("n3"), Some(&Down::Draining));
    }

    const S: u64 = 1_000_000_000;
    const MS: u64 = 1_000_000;

    fn terms() -> Terms {
        Terms {
            lease: Duration::from_secs(10),
            silence: Duration::from_millis(150),
            steady: Duration::from_millis(100),
            isolated: Duration::from_millis(200),
            acked: 0,
            draining: false,
        }
    }

    #[test]
    fn the_break_starts_over_only_when_the_lease_ran_out() {
        let running = Lease {
            expires_ns: 100 * S,
            since_ns: 10 * S,
            ..Lease::default()
        };
        let renewed = next_lease(&running, &terms(), 95 * S);
        assert_eq!(renewed.since_ns, 10 * S);
        assert_eq!(renewed.expires_ns, 105 * S);
        assert_eq!(renewed.silence_ns, 150 * MS);
        let after_expiry = next_lease(&running, &terms(), 101 * S);
        assert_eq!(after_expiry.since_ns, 101 * S);
        // A first lease (the map holds zeros).
        assert_eq!(
            next_lease(&Lease::default(), &terms(), 7 * S).since_ns,
            7 * S
        );
    }

    #[test]
    fn standing_follows_the_kernel() {
        let rejoin = Duration::from_secs(2);
        let lease = next_lease(&Lease::default(), &terms(), 0);
        let heard = Heard {
            last_request_ns: 9 * S,
            ..Heard::default()
        };
        assert_eq!(standing(&lease, &heard, S, rejoin), Own::Rejoining);
        assert_eq!(standing(&lease, &heard, 9 * S, rejoin), Own::Serving);
        // Silent past the silence time: the kernel stops serving, the agent plans on.
        assert_eq!(
            standing(&lease, &heard, 9 * S + 151 * MS, rejoin),
            Own::Serving
        );
        // A peer counted this node out: cut off until the agent planned with it, then
        // rejoining from that moment.
        let counted_out = Heard {
            last_request_ns: 11 * S,
            cut_off_ns: 9 * S,
            cut_offs: 1,
            ..Heard::default()
        };
        assert_eq!(standing(&lease, &counted_out, 9 * S, rejoin), Own::CutOff);
        let acked = Lease {
            cut_offs_seen: 1,
            ..lease
        };
        assert_eq!(
            standing(&acked, &counted_out, 10 * S, rejoin),
            Own::Rejoining
        );
        assert_eq!(standing(&acked, &counted_out, 11 * S, rejoin), Own::Serving);
    }
}
