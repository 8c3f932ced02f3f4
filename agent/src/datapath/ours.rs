//! What is ours by name, for when the record of what we created (`state.json`) is lost or
//! unreadable: the `static_egress` nftables table, our exact `ip rule` (`fwmark M/M lookup T` at
//! priority P, no other selector) and our routing table T for the mark, table and priority
//! given, and our pins under `<bpffs>/static-egress`. Egress addresses and managed neighbour
//! entries carry nothing that says they are ours, so they cannot be found this way.
//!
//! Our rule is removed exactly (see `rule`): never someone else's in its place.
//!
//! Also what the state dir means to the agent and to `cleanup`: its lock (one of them at a
//! time), and the record they start from.

use std::path::Path;

use super::netlink::Netlink;
use super::rule::Removal;
use super::state::{Record, State};
use super::{DatapathConfig, DatapathError, RuleSpec, bpf, nft};
use crate::fsutil::{DirLock, LOCK_FILE};
use static_egress_common::tunnel;

/// What is ours by name, from the agent's flags: its rule (and that rule's table) and its
/// `--announce-table`.
#[derive(Clone, Copy, Debug)]
pub struct ByName {
    pub rule: RuleSpec,
    pub announce_table: u32,
}

/// What [`remove_by_name`] found.
#[derive(Debug, Default)]
pub(super) struct Found {
    /// Something of ours was there.
    pub found: bool,
    /// Our rule stays: someone else's rule would be deleted in its place (described).
    pub blocked: Option<String>,
}

/// Removes what is ours by name (see the module's documentation). Rules of others at the same
/// priority, and every other table, stay.
pub(super) async fn remove_by_name(
    nl: &Netlink,
    by_name: ByName,
    bpffs: &Path,
) -> Result<Found, DatapathError> {
    let mut result = Found::default();
    match nl.remove_rule(by_name.rule).await? {
        Removal::Removed(n) => result.found |= n > 0,
        Removal::Blocked(theirs) => result.blocked = Some(theirs),
    }
    for table in [by_name.rule.table, by_name.announce_table] {
        result.found |= !nl.table_routes(table).await?.is_empty();
        nl.flush_table(table).await?;
    }
    result.found |= nft::remove()?;
    result.found |= bpf::remove_pins(bpffs)?;
    result.found |= nl.remove_tunnel(tunnel::DEVICE).await?;
    Ok(result)
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
    by_name: ByName,
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
                if let Removal::Blocked(theirs) = nl.remove_rule(*rule).await? {
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
            if state.tunnel {
                nl.remove_tunnel(tunnel::DEVICE).await?;
            }
            if let Some(table) = state.announce_table {
                nl.flush_table(table).await?;
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
                blocked.push((by_name.rule, theirs));
            }
            if found.found {
                removed = true;
                tracing::warn!(
                    "no record of what the agent created: removed what is ours by name (nftables \
                     table {}, rule fwmark {:#x}/{:#x} lookup {} at priority {}, tables {} and {}, \
                     pins under {}); egress IPs it added cannot be found by name: look for them \
                     with `ip -4 addr` and remove them with `ip addr del IP/32 dev UPLINK`",
                    nft::TABLE,
                    by_name.rule.mark,
                    by_name.rule.mark,
                    by_name.rule.table,
                    by_name.rule.priority,
                    by_name.rule.table,
                    by_name.announce_table,
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
    // The CNI plugin's socket and the pods it announced, which an agent leaves behind when it
    // stops, for the next one.
    for name in crate::cni::LEFT_IN_STATE_DIR {
        let path = state_dir.join(name);
        match std::fs::remove_file(&path) {
            Err(source) if source.kind() != std::io::ErrorKind::NotFound => {
                return Err(DatapathError::Io { path, source });
            }
            _ => {}
        }
    }
    if let Some(lock) = lock {
        let path = state_dir.join(LOCK_FILE);
        lock.remove()
            .map_err(|source| DatapathError::Io { path, source })?;
    }
    Ok(removed)
}
