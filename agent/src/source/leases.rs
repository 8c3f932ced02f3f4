//! Holder Leases, in cluster mode: one `coordination.k8s.io` Lease per egress IP in the
//! agent's namespace (`egress-10-99-0-200`, labelled with the IP), naming the node that holds it.
//!
//! Probes decide who holds an egress IP, fast and without the API server in the way (see
//! [`crate::plan::failover`]); the Lease settles what probes cannot: a partial partition, where
//! a node counts the holder out while the holder still hears others and serves on. Rules:
//!
//! - A node that takes an egress IP claims its Lease at once, whoever it names (it does not wait
//!   for the old claim to run out: that would make every takeover as slow as the Lease). Each
//!   claim increments `leaseTransitions`, through optimistic concurrency, so claims are ordered.
//! - The holder renews its claim every `renew`; renewing never takes a Lease from another node.
//! - A node that sees a later claim than its own on an egress IP it holds has **lost** it: it lets
//!   go at once and does not take it again while the winner's claim stands (the winner renews
//!   it, or its last renewal is younger than the Lease's duration, by this node's clock), even
//!   if its own probes would have it hold. So two nodes hold one egress IP for at most the time
//!   the claim takes to reach the loser through its watch, and never take it from each other
//!   back and forth.
//! - A node that stops holding an egress IP releases its Lease (no holder), so that a node that
//!   lost it may take it again at once.
//!
//! The Lease does not stop egress when the API server cannot be reached: a holder that cannot
//! renew serves on (its probes still say it should, and the kernel lease still fences an agent
//! that is gone); an outage of the API server must not become an outage of egress. During
//! such an outage a partial partition can leave two holders, as in file mode.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt as _};
use tokio::sync::watch;
use tokio::time::Instant;

use super::kube::{Retry, retrying};

/// The label that says which egress IP a Lease is for.
pub const IP_LABEL: &str = "static-egress.io/egress-ip";
/// How long one write may take before it counts as failed and is tried again.
const API_TIMEOUT: Duration = Duration::from_secs(5);

/// How Leases are kept.
#[derive(Clone, Debug)]
pub struct LeaseOptions {
    /// Where the Leases live: the agent's own namespace.
    pub namespace: String,
    /// `leaseDurationSeconds`: how long a claim stands after its last renewal.
    pub duration: Duration,
    /// How often the holder renews.
    pub renew: Duration,
}

impl LeaseOptions {
    /// Claims stand for `duration` and are renewed every fifth of it, in `namespace` or else
    /// the client's (the ServiceAccount's, in a pod).
    pub fn new(namespace: Option<String>, client: &Client, duration: Duration) -> Self {
        Self {
            namespace: namespace.unwrap_or_else(|| client.default_namespace().to_owned()),
            duration,
            renew: duration / 5,
        }
    }
}

/// Egress IPs another node claimed after this one, by the node that did.
pub type Lost = BTreeMap<Ipv4Addr, String>;

/// The Lease name for `ip`.
pub fn name(ip: Ipv4Addr) -> String {
    format!("egress-{}", ip.to_string().replace('.', "-"))
}

/// A Lease as this node last saw it.
#[derive(Clone, Debug)]
struct Seen {
    holder: Option<String>,
    renewed: Option<Timestamp>,
    /// When this node saw the holder or its renewal change: claims run out by this node's
    /// clock, not by the writer's.
    changed: Instant,
    lease: Lease,
}

/// What to write next.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Action {
    /// Name this node as the holder: a new claim.
    Claim(Ipv4Addr),
    /// Renew this node's claim.
    Renew(Ipv4Addr),
    /// This node no longer holds it: no holder.
    Release(Ipv4Addr),
}

/// The Leases as this node sees them and its claims: what to write, and what it lost. Pure,
/// so that every rule above is tested without an API server.
#[derive(Debug)]
struct Book {
    node: String,
    duration: Duration,
    renew: Duration,
    seen: BTreeMap<Ipv4Addr, Seen>,
    /// This node's claims: the claim's number (`leaseTransitions`) and when it was last written.
    claims: BTreeMap<Ipv4Addr, (i32, Instant)>,
    lost: Lost,
}

impl Book {
    fn new(node: String, duration: Duration, renew: Duration) -> Self {
        Self {
            node,
            duration,
            renew,
            seen: BTreeMap::new(),
            claims: BTreeMap::new(),
            lost: Lost::new(),
        }
    }

    /// A Lease as listed or watched (or read back after a write).
    fn observe(&mut self, ip: Ipv4Addr, lease: Lease, now: Instant) {
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.filter(|h| !h.is_empty());
        let transitions = spec.lease_transitions.unwrap_or(0);
        let renewed = spec.renew_time.map(|t| t.0);
        let changed = match self.seen.get(&ip) {
            Some(s) if s.holder == holder && s.renewed == renewed => s.changed,
            _ => now,
        };
        if let Some(winner) = &holder
            && *winner != self.node
            && let Some((mine, _)) = self.claims.get(&ip)
            && transitions > *mine
        {
            tracing::warn!(egress_ip = %ip, winner, "another node claimed the egress IP's Lease after this one: letting it go");
            self.lost.insert(ip, winner.clone());
            self.claims.remove(&ip);
        }
        self.seen.insert(
            ip,
            Seen {
                holder,
                renewed,
                changed,
                lease,
            },
        );
    }

    fn forget(&mut self, ip: Ipv4Addr) {
        self.seen.remove(&ip);
    }

    /// Lost egress IPs whose winner let go, or whose claim ran out; true if any did.
    fn expire(&mut self, now: Instant) -> bool {
        let before = self.lost.len();
        let (seen, duration) = (&self.seen, self.duration);
        self.lost.retain(|ip, winner| {
            seen.get(ip).is_some_and(|s| {
                s.holder.as_ref() == Some(winner) && now.duration_since(s.changed) < duration
            })
        });
        self.lost.len() != before
    }

    /// What to write for this node to hold `held` and nothing else.
    fn actions(&self, held: &BTreeSet<Ipv4Addr>, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        for &ip in held.iter().filter(|ip| !self.lost.contains_key(ip)) {
            let ours = self
                .seen
                .get(&ip)
                .is_some_and(|s| s.holder.as_deref() == Some(self.node.as_str()));
            match self.claims.get(&ip) {
                Some((_, at)) if ours && now.duration_since(*at) < self.renew => {}
                Some(_) if ours => actions.push(Action::Renew(ip)),
                _ => actions.push(Action::Claim(ip)),
            }
        }
        for &ip in self.claims.keys().filter(|ip| !held.contains(ip)) {
            actions.push(Action::Release(ip));
        }
        // A Lease naming this node that it neither holds nor claims (an agent restarted).
        for (&ip, seen) in &self.seen {
            if seen.holder.as_deref() == Some(self.node.as_str())
                && !held.contains(&ip)
                && !self.claims.contains_key(&ip)
            {
                actions.push(Action::Release(ip));
            }
        }
        actions
    }

    /// The Lease to write for `action`: the last seen one changed, or a new one.
    fn desired(&self, action: &Action, now: Timestamp) -> Lease {
        let ip = match action {
            Action::Claim(ip) | Action::Renew(ip) | Action::Release(ip) => *ip,
        };
        let mut lease = self.seen.get(&ip).map_or_else(
            || Lease {
                metadata: ObjectMeta {
                    name: Some(name(ip)),
                    labels: Some(BTreeMap::from([
                        (IP_LABEL.to_owned(), ip.to_string()),
                        (
                            "app.kubernetes.io/managed-by".to_owned(),
                            "static-egress".to_owned(),
                        ),
                    ])),
                    ..ObjectMeta::default()
                },
                spec: None,
            },
            |s| s.lease.clone(),
        );
        let mut spec = lease.spec.take().unwrap_or_default();
        match action {
            Action::Claim(_) => {
                spec.holder_identity = Some(self.node.clone());
                spec.acquire_time = Some(MicroTime(now));
                spec.renew_time = Some(MicroTime(now));
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                spec.lease_duration_seconds = Some(seconds(self.duration));
            }
            Action::Renew(_) => {
                spec.renew_time = Some(MicroTime(now));
                spec.lease_duration_seconds = Some(seconds(self.duration));
            }
            Action::Release(_) => {
                spec.holder_identity = None;
                spec.acquire_time = None;
                spec.renew_time = None;
            }
        }
        lease.spec = Some(spec);
        lease
    }

    /// `action` went through and the server answered `lease`.
    fn wrote(&mut self, action: &Action, ip: Ipv4Addr, lease: Lease, now: Instant) {
        let transitions = lease
            .spec
            .as_ref()
            .and_then(|s| s.lease_transitions)
            .unwrap_or(0);
        match action {
            Action::Claim(_) | Action::Renew(_) => {
                self.claims.insert(ip, (transitions, now));
            }
            Action::Release(_) => {
                self.claims.remove(&ip);
            }
        }
        self.observe(ip, lease, now);
    }
}

fn seconds(duration: Duration) -> i32 {
    i32::try_from(duration.as_secs().max(1)).unwrap_or(i32::MAX)
}

/// The IP a Lease is for, from its label.
fn ip_of(lease: &Lease) -> Option<Ipv4Addr> {
    lease.labels().get(IP_LABEL)?.parse().ok()
}

/// The agent's side of the Lease keeper: it says what this node holds, and hears what it lost.
pub struct Leases {
    pub held: watch::Sender<BTreeSet<Ipv4Addr>>,
    pub lost: watch::Receiver<Lost>,
}

/// Starts keeping this node's Leases on a task of its own: the API server's latency never
/// reaches the data path.
pub fn start(client: Client, node: String, options: LeaseOptions) -> Leases {
    let (held, held_rx) = watch::channel(BTreeSet::new());
    let (lost_tx, lost) = watch::channel(Lost::new());
    tokio::spawn(run(client, node, options, held_rx, lost_tx));
    Leases { held, lost }
}

/// Tells the Lease keeper which egress IPs this node serves now (after an apply).
pub fn tell_held(held: &watch::Sender<BTreeSet<Ipv4Addr>>, now: BTreeSet<Ipv4Addr>) {
    held.send_if_modified(|old| {
        let changed = *old != now;
        *old = now;
        changed
    });
}

/// The next change of the egress IPs lost to other nodes' claims; never without a keeper
/// (file mode). `None` when the keeper stopped.
pub async fn next_lost(lost: &mut Option<watch::Receiver<Lost>>) -> Option<Lost> {
    match lost {
        Some(lost) => {
            lost.changed().await.ok()?;
            Some(lost.borrow_and_update().clone())
        }
        None => std::future::pending().await,
    }
}

async fn run(
    client: Client,
    node: String,
    options: LeaseOptions,
    mut held: watch::Receiver<BTreeSet<Ipv4Addr>>,
    lost: watch::Sender<Lost>,
) {
    let api: Api<Lease> = Api::namespaced(client, &options.namespace);
    let config = watcher::Config::default().labels(IP_LABEL);
    let mut events = retrying(
        watcher::watcher(api.clone(), config).boxed(),
        Retry::new(&node),
    );
    let mut book = Book::new(node, options.duration, options.renew);
    let mut tick = tokio::time::interval(options.renew / 4);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Writes that failed, and when: tried again a tick later, and said once per failure.
    let mut failed: BTreeMap<Ipv4Addr, Instant> = BTreeMap::new();
    loop {
        tokio::select! {
            changed = held.changed() => if changed.is_err() { return },
            event = events.next() => match event {
                Some(Ok(Event::Apply(lease) | Event::InitApply(lease))) => {
                    if let Some(ip) = ip_of(&lease) {
                        book.observe(ip, lease, Instant::now());
                    }
                }
                Some(Ok(Event::Delete(lease))) => {
                    if let Some(ip) = ip_of(&lease) {
                        book.forget(ip);
                    }
                }
                Some(Ok(Event::Init | Event::InitDone)) => {}
                Some(Err(error)) => tracing::debug!(%error, "watching the holder Leases"),
                None => return,
            },
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        book.expire(now);
        let wanted = held.borrow().clone();
        for action in book.actions(&wanted, now) {
            let (Action::Claim(ip) | Action::Renew(ip) | Action::Release(ip)) = action;
            let last = failed.get(&ip).copied();
            if last.is_some_and(|at| now.duration_since(at) < options.renew / 4) {
                continue;
            }
            match write(&api, &mut book, &action).await {
                Ok(()) => {
                    failed.remove(&ip);
                }
                Err(error) => {
                    if last.is_none() {
                        tracing::warn!(egress_ip = %ip, "{error}; serving on, retrying");
                    }
                    failed.insert(ip, now);
                }
            }
        }
        lost.send_if_modified(|old| {
            let changed = *old != book.lost;
            old.clone_from(&book.lost);
            changed
        });
    }
}

/// Writes one action; a conflict (someone wrote in between) reads the Lease again, so the
/// next round starts from what the server has.
async fn write(api: &Api<Lease>, book: &mut Book, action: &Action) -> Result<(), String> {
    let (Action::Claim(ip) | Action::Renew(ip) | Action::Release(ip)) = *action;
    let lease = book.desired(action, Timestamp::now());
    let name = name(ip);
    let call = async {
        if lease.metadata.resource_version.is_some() {
            api.replace(&name, &PostParams::default(), &lease).await
        } else {
            api.create(&PostParams::default(), &lease).await
        }
    };
    let timed_out =
        || format!("the API server did not answer within {API_TIMEOUT:?} writing Lease {name}");
    match tokio::time::timeout(API_TIMEOUT, call)
        .await
        .map_err(|_| timed_out())?
    {
        Ok(written) => {
            if !matches!(action, Action::Renew(_)) {
                tracing::info!(egress_ip = %ip, lease = name, ?action, "holder Lease written");
            }
            book.wrote(action, ip, written, Instant::now());
            Ok(())
        }
        Err(kube::Error::Api(status)) if status.is_conflict() || status.is_already_exists() => {
            let read = tokio::time::timeout(API_TIMEOUT, api.get_opt(&name))
                .await
                .map_err(|_| timed_out())?
                .map_err(|error| format!("reading Lease {name}: {error}"))?;
            match read {
                Some(current) => book.observe(ip, current, Instant::now()),
                None => book.forget(ip),
            }
            Ok(())
        }
        Err(error) => Err(format!("cannot write Lease {name}: {error}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;

    const IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 200);
    const DURATION: Duration = Duration::from_secs(10);
    const RENEW: Duration = Duration::from_secs(2);

    fn lease(holder: Option<&str>, transitions: i32, version: &str) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(name(IP)),
                resource_version: Some(version.to_owned()),
                labels: Some(BTreeMap::from([(IP_LABEL.to_owned(), IP.to_string())])),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_owned),
                lease_transitions: Some(transitions),
                renew_time: Some(MicroTime(Timestamp::now())),
                ..LeaseSpec::default()
            }),
        }
    }

    fn book(node: &str) -> Book {
        Book::new(node.to_owned(), DURATION, RENEW)
    }

    fn held() -> BTreeSet<Ipv4Addr> {
        BTreeSet::from([IP])
    }

    #[test]
    fn a_taker_claims_whoever_the_lease_names_and_the_claim_is_numbered() {
        let now = Instant::now();
        let mut b = book("node3");
        b.observe(IP, lease(Some("node2"), 4, "10"), now);
        assert_eq!(b.actions(&held(), now), vec![Action::Claim(IP)]);
        let claim = b.desired(&Action::Claim(IP), Timestamp::now());
        let spec = claim.spec.clone().expect("a spec");
        assert_eq!(spec.holder_identity.as_deref(), Some("node3"));
        assert_eq!(spec.lease_transitions, Some(5));
        assert_eq!(spec.lease_duration_seconds, Some(10));
        assert_eq!(claim.metadata.resource_version.as_deref(), Some("10"));
        b.wrote(&Action::Claim(IP), IP, lease(Some("node3"), 5, "11"), now);
        assert!(b.actions(&held(), now).is_empty(), "renewed too early");
        assert_eq!(b.actions(&held(), now + RENEW), vec![Action::Renew(IP)]);
    }

    #[test]
    fn a_later_claim_wins_and_the_loser_stays_out_while_it_stands() {
        let now = Instant::now();
        let mut b = book("node2");
        b.wrote(&Action::Claim(IP), IP, lease(Some("node2"), 5, "11"), now);
        // An older event (before this node's claim) arriving late changes nothing.
        b.observe(IP, lease(Some("node1"), 4, "10"), now);
        assert!(b.lost.is_empty());
        b.observe(IP, lease(Some("node3"), 6, "12"), now);
        assert_eq!(b.lost, Lost::from([(IP, "node3".to_owned())]));
        // Even if this node's plan would hold it, it neither claims nor renews.
        assert!(b.actions(&held(), now).is_empty());
        // The winner renews: it stands.
        let later = now + DURATION / 2;
        b.observe(IP, lease(Some("node3"), 6, "13"), later);
        assert!(!b.expire(later + DURATION / 2));
        // No renewal for the Lease's duration: it ran out.
        assert!(b.expire(later + DURATION));
        assert_eq!(
            b.actions(&held(), later + DURATION),
            vec![Action::Claim(IP)]
        );
    }

    #[test]
    fn a_release_by_the_winner_ends_the_loss_at_once() {
        let now = Instant::now();
        let mut b = book("node2");
        b.wrote(&Action::Claim(IP), IP, lease(Some("node2"), 5, "11"), now);
        b.observe(IP, lease(Some("node3"), 6, "12"), now);
        b.observe(IP, lease(None, 6, "13"), now);
        assert!(b.expire(now));
        assert!(b.lost.is_empty());
    }

    #[test]
    fn what_is_no_longer_held_is_released_and_a_renewal_never_takes() {
        let now = Instant::now();
        let mut b = book("node2");
        b.wrote(&Action::Claim(IP), IP, lease(Some("node2"), 5, "11"), now);
        assert_eq!(b.actions(&BTreeSet::new(), now), vec![Action::Release(IP)]);
        let released = b.desired(&Action::Release(IP), Timestamp::now());
        assert_eq!(released.spec.expect("a spec").holder_identity, None);
        let renewed = b.desired(&Action::Renew(IP), Timestamp::now());
        assert_eq!(renewed.spec.expect("a spec").lease_transitions, Some(5));
        // An agent that restarts finds its old claim and lets go of what it does not hold.
        let mut restarted = book("node2");
        restarted.observe(IP, lease(Some("node2"), 5, "11"), now);
        assert_eq!(
            restarted.actions(&BTreeSet::new(), now),
            vec![Action::Release(IP)]
        );
    }

    #[test]
    fn names_fit_a_lease() {
        assert_eq!(name(IP), "egress-10-99-0-200");
    }
}
