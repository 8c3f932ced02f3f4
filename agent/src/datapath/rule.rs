//! Our `ip rule`, and how to tell it from others' at the same priority: ours is exactly
//! `fwmark M/M lookup T` at priority P, with no other selector. Deleting it takes care: the
//! kernel deletes the *first* rule that matches the fields of a delete request and ignores the
//! selectors the request leaves out, so someone else's `iif lo fwmark M/M lookup T` listed
//! before ours at the same priority would go instead. [`next_deletion`] says what a delete
//! would hit.

use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};

use super::RuleSpec;

/// The outcome of removing our rule.
#[derive(Debug, PartialEq, Eq)]
pub enum Removal {
    /// How many of our rules were deleted (duplicates included).
    Removed(usize),
    /// Ours stays, behind this rule of someone else's that a delete would hit instead.
    Blocked(String),
}

/// What to delete next among `rules` (in the kernel's order), for our `spec`.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next<'a> {
    Nothing,
    Ours(&'a RuleMessage),
    Theirs(&'a RuleMessage),
}

pub(super) fn next_deletion(rules: &[RuleMessage], spec: RuleSpec) -> Next<'_> {
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
pub(super) fn kernel_would_match(rule: &RuleMessage, spec: RuleSpec) -> bool {
    rule.header.action == RuleAction::ToTable
        && priority(rule) == Some(spec.priority)
        && table(rule) == spec.table
        && rule.attributes.contains(&RuleAttribute::FwMark(spec.mark))
        && rule.attributes.contains(&RuleAttribute::FwMask(spec.mark))
}

/// Exactly ours: `fwmark M/M lookup T` at P and nothing else (no address, interface, port,
/// protocol, uid or other selector, no inversion).
pub(super) fn is_ours(rule: &RuleMessage, spec: RuleSpec) -> bool {
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
pub(super) fn describe(rule: &RuleMessage) -> String {
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
