//! What is ours by name, for when the record of what we created (`state.json`) is lost or
//! unreadable: the `static_egress` nftables table, our exact `ip rule` (`fwmark M/M lookup T` at
//! priority P, no other selector) and our routing table T for the mark, table and priority
//! given, and our pins under `<bpffs>/static-egress`. Egress addresses and managed neighbour
//! entries carry nothing that says they are ours, so they cannot be found this way.
//!
//! Our rule is removed exactly: the kernel deletes the *first* rule that matches the fields
//! of a delete request, and ignores the selectors the request leaves out, so someone else's
//! `iif lo fwmark M/M lookup T` listed before ours at the same priority would go instead.
//! [`remove_rule_exactly`] deletes only when ours is the first such match, and otherwise says
//! whose rule is in the way.
//!
//! Also what the state dir means to the agent and to `cleanup`: its lock (one of them at a
//! time), and the record they start from.

use std::path::Path;

use futures_util::TryStreamExt as _;
use rtnetlink::IpVersion;
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};

use super::netlink::Netlink;
use super::state::{Record, State};
use super::{DatapathConfig, DatapathError, RuleSpec, bpf, nft};
use crate::fsutil::{DirLock, LOCK_FILE};

/// What [`remove_by_name`] found.
#[derive(Debug, Default)]
pub(super) struct ByName {
    /// Something of ours was there.
    pub found: bool,
    /// Our rule stays: someone else's rule would be deleted in its place (described).
    pub blocked: Option<String>,
}

/// Removes what is ours by name (see the module's documentation). Rules of others at the same
/// priority, and every other table, stay.
pub(super) async fn remove_by_name(
    nl: &Netlink,
    rule: RuleSpec,
    bpffs: &Path,
) -> Result<ByName, DatapathError> {
    let mut result = ByName::default();
    match remove_rule_exactly(rule).await? {
        Removal::Removed(n) => result.found |= n > 0,
        Removal::Blocked(theirs) => result.blocked = Some(theirs),
    }
    result.found |= !nl.table_routes(rule.table).await?.is_empty();
    nl.flush_table(rule.table).await?;
    result.found |= nft::remove()?;
    result.found |= bpf::remove_pins(bpffs)?;
    Ok(result)
}

/// The outcome of [`remove_rule_exactly`].
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Removal {
    /// How many of our rules were deleted (duplicates included).
    Removed(usize),
    /// Ours stays, behind this rule of someone else's that a delete would hit instead.
    Blocked(String),
}

/// What to delete next among `rules` (in the kernel's order), for our `spec`.
#[derive(Debug, PartialEq, Eq)]
enum Next<'a> {
    Nothing,
    Ours(&'a RuleMessage),
    Theirs(&'a RuleMessage),
}

fn next_deletion(rules: &[RuleMessage], spec: RuleSpec) -> Next<'_> {
    if !rules.iter().any(|r| is_ours(r, spec)) {
        return Next::Nothing;
    }
    // Present, so some rule matches; the kernel would delete the first one that does.
    match rules.iter().find(|r| kernel_would_match(r, spec)) {
        Some(first) if is_ours(first, spec) => Next::Ours(first),
        Some(first) => Next::Theirs(first),
        None => Next::Nothing,
    }
}

/// Deletes our rules at `spec`'s priority, one at a time, as long as each is the one the
/// kernel would delete.
pub(super) async fn remove_rule_exactly(spec: RuleSpec) -> Result<Removal, DatapathError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(DatapathError::NetlinkSocket)?;
    let task = tokio::spawn(conn);
    let result = async {
        let mut removed = 0;
        loop {
            let rules: Vec<RuleMessage> = handle
                .rule()
                .get(IpVersion::V4)
                .execute()
                .try_collect()
                .await
                .map_err(|source| DatapathError::Netlink {
                    what: "dump rules",
                    source,
                })?;
            match next_deletion(&rules, spec) {
                Next::Nothing => return Ok(Removal::Removed(removed)),
                Next::Theirs(theirs) => return Ok(Removal::Blocked(describe(theirs))),
                Next::Ours(ours) => {
                    match handle.rule().del(ours.clone()).execute().await {
                        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENOENT => {
                        }
                        other => other.map_err(|source| DatapathError::Netlink {
                            what: "delete rule",
                            source,
                        })?,
                    }
                    removed += 1;
                }
            }
        }
    }
    .await;
    task.abort();
    result
}

fn priority(rule: &RuleMessage) -> Option<u32> {
    rule.attributes.iter().find_map(|a| match a {
        RuleAttribute::Priority(p) => Some(*p),
        _ => None,
    })
}

fn table(rule: &RuleMessage) -> u32 {
    rule.attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(rule.header.table))
}

/// Whether the kernel, asked to delete our rule (`fwmark M/M lookup T` at P), could pick
/// `rule`: it compares only the fields the request sets.
fn kernel_would_match(rule: &RuleMessage, spec: RuleSpec) -> bool {
    rule.header.action == RuleAction::ToTable
        && priority(rule) == Some(spec.priority)
        && table(rule) == spec.table
        && rule.attributes.contains(&RuleAttribute::FwMark(spec.mark))
        && rule.attributes.contains(&RuleAttribute::FwMask(spec.mark))
}

/// Exactly ours: `fwmark M/M lookup T` at P and nothing else (no address, interface, port,
/// protocol, uid or other selector, no inversion).
fn is_ours(rule: &RuleMessage, spec: RuleSpec) -> bool {
    kernel_would_match(rule, spec)
        && rule.header.src_len == 0
        && rule.header.dst_len == 0
        && rule.header.tos == 0
        && rule.header.flags.is_empty()
        && rule.attributes.iter().all(|a| {
            matches!(
                a,
                RuleAttribute::Priority(_)
                    | RuleAttribute::Table(_)
                    | RuleAttribute::FwMark(_)
                    | RuleAttribute::FwMask(_)
                    // Who added a rule, not what it selects.
                    | RuleAttribute::Protocol(_)
                    // What the kernel lists for "not set" (-1).
                    | RuleAttribute::SuppressPrefixLen(u32::MAX)
                    | RuleAttribute::SuppressIfGroup(u32::MAX)
            )
        })
}

/// A rule as `ip rule` would roughly show it, for messages.
fn describe(rule: &RuleMessage) -> String {
    let mut parts = vec![format!("{}:", priority(rule).unwrap_or_default())];
    if rule.header.src_len > 0 {
        parts.push(format!("from .../{}", rule.header.src_len));
    }
    for attribute in &rule.attributes {
        match attribute {
            RuleAttribute::Source(ip) => parts.push(format!("from {ip}")),
            RuleAttribute::Destination(ip) => parts.push(format!("to {ip}")),
            RuleAttribute::Iifname(name) => parts.push(format!("iif {name}")),
            RuleAttribute::Oifname(name) => parts.push(format!("oif {name}")),
            RuleAttribute::FwMark(mark) => {
                let mask = rule.attributes.iter().find_map(|a| match a {
                    RuleAttribute::FwMask(m) => Some(*m),
                    _ => None,
                });
                parts.push(format!("fwmark {mark:#x}/{:#x}", mask.unwrap_or(u32::MAX)));
            }
            RuleAttribute::FwMask(_)
            | RuleAttribute::Priority(_)
            | RuleAttribute::Table(_)
            | RuleAttribute::Protocol(_)
            | RuleAttribute::SuppressPrefixLen(u32::MAX)
            | RuleAttribute::SuppressIfGroup(u32::MAX) => {}
            other => parts.push(format!("{other:?}")),
        }
    }
    parts.push(format!("lookup {}", table(rule)));
    parts.join(" ")
}

/// The record an agent starts from. A corrupt one is set aside and the agent starts with an
/// empty record. It does not remove what is ours by name first: its first apply compares
/// everything with the kernel and converges to the same end (the table replaced whole, its
/// exact rule kept, its routing table rewritten, the pinned maps and links adopted and those
/// on interfaces no longer wanted detached) without the moment in between when selected
/// traffic would leave unmarked, with the node's address.
pub(super) fn starting_record(config: &DatapathConfig) -> Result<State, DatapathError> {
    match State::load_or_set_aside(&config.state_dir)? {
        Record::Found(state) => Ok(state),
        Record::Missing => Ok(State::default()),
        Record::Corrupt { error, moved_to } => {
            tracing::warn!(
                "the record of what this agent created is unreadable ({error}); moved it to {} \
                 and starting with an empty one. Egress IPs and neighbour entries it had added \
                 cannot be found by name: an egress IP still on the uplink is now refused as \
                 not ours until removed by hand (`ip addr del IP/32 dev UPLINK`); rules of \
                 earlier --fwmark, --route-table or --rule-priority settings stay",
                moved_to.display(),
            );
            Ok(State::default())
        }
    }
}

/// See [`super::cleanup`].
pub(super) async fn cleanup(
    state_dir: &Path,
    bpffs: &Path,
    by_name: RuleSpec,
) -> Result<bool, DatapathError> {
    // An agent would put back what we remove, or keep running on a data path taken away.
    let lock = if state_dir.exists() {
        Some(DirLock::acquire(state_dir)?)
    } else {
        None
    };
    let record = match lock {
        Some(_) => State::load_or_set_aside(state_dir)?,
        None => Record::Missing,
    };
    let mut removed = false;
    let mut blocked = Vec::new();
    let nl = Netlink::connect()?;
    match &record {
        Record::Found(state) => {
            for rule in state.rule().iter().chain(&state.retired) {
                if let Removal::Blocked(theirs) = remove_rule_exactly(*rule).await? {
                    blocked.push((*rule, theirs));
                }
                nl.flush_table(rule.table).await?;
            }
            if let Some(uplink) = &state.uplink
                && let Some(index) = nl.interface_index(uplink).await?
            {
                for ip in &state.addresses {
                    nl.remove_address(index, *ip).await?;
                }
                for ip in &state.neighbours {
                    nl.forget_neighbour(index, *ip).await?;
                }
            }
            removed = true;
        }
        Record::Missing | Record::Corrupt { .. } => {
            if let Record::Corrupt { error, moved_to } = &record {
                tracing::warn!(
                    "{} is unreadable ({error}); moved it to {}; removing what is ours by name",
                    state_dir.join("state.json").display(),
                    moved_to.display()
                );
                removed = true;
            }
            let found = remove_by_name(&nl, by_name, bpffs).await?;
            if let Some(theirs) = found.blocked {
                blocked.push((by_name, theirs));
            }
            if found.found {
                removed = true;
                tracing::warn!(
                    "no record of what the agent created: removed what is ours by name (nftables \
                     table {}, rule fwmark {:#x}/{:#x} lookup {} at priority {}, table {}, pins \
                     under {}); egress IPs it added cannot be found by name: look for them with \
                     `ip -4 addr` and remove them with `ip addr del IP/32 dev UPLINK`",
                    nft::TABLE,
                    by_name.mark,
                    by_name.mark,
                    by_name.table,
                    by_name.priority,
                    by_name.table,
                    bpf::pin_root(bpffs).display()
                );
            }
        }
    }
    removed |= nft::remove()?;
    removed |= bpf::remove_pins(bpffs)?;
    if let Some((ours, theirs)) = blocked.into_iter().next() {
        // The record stays (and the lock goes with this process): a second run, once the
        // other rule is out of the way, finishes the job.
        return Err(DatapathError::RuleInTheWay {
            priority: ours.priority,
            mark: ours.mark,
            table: ours.table,
            theirs,
        });
    }
    State::remove(state_dir)?;
    if let Some(lock) = lock {
        let path = state_dir.join(LOCK_FILE);
        lock.remove()
            .map_err(|source| DatapathError::Io { path, source })?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::rule::RuleFlags;

    const SPEC: RuleSpec = RuleSpec {
        priority: 1490,
        mark: 0x2000,
        table: 1490,
    };

    fn rule(extra: &[RuleAttribute]) -> RuleMessage {
        let mut rule = RuleMessage::default();
        rule.header.action = RuleAction::ToTable;
        // As the kernel lists `ip rule add priority 1490 fwmark 0x2000/0x2000 lookup 1490`.
        rule.attributes = vec![
            RuleAttribute::Table(1490),
            RuleAttribute::SuppressPrefixLen(u32::MAX),
            RuleAttribute::Protocol(Default::default()),
            RuleAttribute::Priority(1490),
            RuleAttribute::FwMark(0x2000),
            RuleAttribute::FwMask(0x2000),
        ];
        rule.attributes.extend_from_slice(extra);
        rule
    }

    #[test]
    fn only_the_exact_rule_is_ours() {
        assert!(is_ours(&rule(&[]), SPEC));
        let others = [
            rule(&[RuleAttribute::Iifname("lo".into())]),
            rule(&[RuleAttribute::Oifname("eth0".into())]),
            rule(&[RuleAttribute::Source("192.0.2.0".parse().expect("ip"))]),
            rule(&[RuleAttribute::IpProtocol(
                rtnetlink::packet_route::IpProtocol::Tcp,
            )]),
            rule(&[RuleAttribute::SuppressPrefixLen(0)]),
        ];
        for other in &others {
            assert!(!is_ours(other, SPEC), "{other:?}");
            assert!(kernel_would_match(other, SPEC), "{other:?}");
        }
        let mut from = rule(&[]);
        from.header.src_len = 24;
        assert!(!is_ours(&from, SPEC));
        let mut inverted = rule(&[]);
        inverted.header.flags = RuleFlags::Invert;
        assert!(!is_ours(&inverted, SPEC));
        let mut other_table = rule(&[]);
        other_table.attributes[0] = RuleAttribute::Table(100);
        assert!(!kernel_would_match(&other_table, SPEC));
    }

    #[test]
    fn ours_is_deleted_only_when_the_kernel_would_pick_it() {
        let ours = rule(&[]);
        let theirs = rule(&[RuleAttribute::Iifname("lo".into())]);
        let mut unrelated = rule(&[]);
        unrelated.attributes[0] = RuleAttribute::Table(100);
        assert_eq!(next_deletion(&[], SPEC), Next::Nothing);
        assert_eq!(
            next_deletion(std::slice::from_ref(&theirs), SPEC),
            Next::Nothing
        );
        assert_eq!(
            next_deletion(&[unrelated.clone(), ours.clone(), theirs.clone()], SPEC),
            Next::Ours(&ours)
        );
        let blocked = [theirs.clone(), ours.clone()];
        assert_eq!(next_deletion(&blocked, SPEC), Next::Theirs(&blocked[0]));
        assert_eq!(
            describe(&theirs),
            "1490: fwmark 0x2000/0x2000 iif lo lookup 1490"
        );
    }
}
