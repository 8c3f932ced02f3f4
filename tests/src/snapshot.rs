//! What a node's network configuration looks like, for "cleanup leaves nothing behind" tests.

use anyhow::Result;

use crate::cmd::exec;

/// A node's netfilter ruleset, policy rules, routes, addresses and BPF attachments as text.
///
/// Two snapshots compare equal when the node is configured the same, except for packet and byte
/// counters, which are blanked because traffic in between would otherwise make them differ.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSnapshot {
    /// `nft list ruleset`, counters blanked.
    pub nft_ruleset: String,
    /// `ip rule`.
    pub ip_rules: String,
    /// `ip route show table all`.
    pub routes: String,
    /// `ip addr`.
    pub addresses: String,
    /// `bpftool net show`: tc, TCX and XDP programs attached to the node's interfaces.
    pub bpf_attachments: String,
}

impl NodeSnapshot {
    pub(crate) fn take(netns: &str) -> Result<Self> {
        Ok(Self {
            nft_ruleset: blank_counters(&exec(netns, ["nft", "list", "ruleset"])?),
            ip_rules: exec(netns, ["ip", "rule"])?,
            routes: exec(netns, ["ip", "route", "show", "table", "all"])?,
            addresses: exec(netns, ["ip", "addr"])?,
            bpf_attachments: exec(netns, ["bpftool", "net", "show"])?,
        })
    }

    /// Lines only in `self` (`-`) or only in `other` (`+`), per part; empty when equal. Meant for
    /// assertion messages, where the full `Debug` of two snapshots is hard to read.
    pub fn differences(&self, other: &Self) -> Vec<String> {
        let parts = [
            ("nft", &self.nft_ruleset, &other.nft_ruleset),
            ("rule", &self.ip_rules, &other.ip_rules),
            ("route", &self.routes, &other.routes),
            ("addr", &self.addresses, &other.addresses),
            ("bpf", &self.bpf_attachments, &other.bpf_attachments),
        ];
        let mut out = Vec::new();
        for (part, before, after) in parts {
            for line in lines_missing_from(before, after) {
                out.push(format!("- {part}: {line}"));
            }
            for line in lines_missing_from(after, before) {
                out.push(format!("+ {part}: {line}"));
            }
        }
        out
    }
}

/// Lines of `a` that `b` lacks, counting repeats.
fn lines_missing_from<'a>(a: &'a str, b: &str) -> Vec<&'a str> {
    let mut remaining: Vec<&str> = b.lines().collect();
    a.lines()
        .filter(|line| match remaining.iter().position(|r| r == line) {
            Some(i) => {
                remaining.swap_remove(i);
                false
            }
            None => true,
        })
        .collect()
}

/// Turns `counter packets 12 bytes 720` into `counter`.
fn blank_counters(ruleset: &str) -> String {
    ruleset
        .lines()
        .map(|line| {
            let indent = &line[..line.len() - line.trim_start().len()];
            let mut words = Vec::new();
            let mut it = line.split_whitespace().peekable();
            while let Some(word) = it.next() {
                words.push(word);
                if word == "counter" && it.peek() == Some(&"packets") {
                    // Skip `packets N bytes M`.
                    for _ in 0..4 {
                        it.next();
                    }
                }
            }
            format!("{indent}{}\n", words.join(" "))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_blanked_and_layout_kept() {
        let ruleset = "table ip nat {\n\tchain POSTROUTING {\n\t\tip saddr 10.244.0.0/16 counter packets 3 bytes 180 masquerade\n\t}\n}\n";
        assert_eq!(
            blank_counters(ruleset),
            "table ip nat {\n\tchain POSTROUTING {\n\t\tip saddr 10.244.0.0/16 counter masquerade\n\t}\n}\n"
        );
    }

    #[test]
    fn differences_name_the_part_and_direction() {
        let a = NodeSnapshot {
            nft_ruleset: String::new(),
            ip_rules: "0: from all lookup local\n32766: from all lookup main\n".into(),
            routes: "default via 10.99.0.1 dev eth0\n".into(),
            addresses: String::new(),
            bpf_attachments: String::new(),
        };
        let mut b = a.clone();
        b.ip_rules = "0: from all lookup local\n100: from all fwmark 0x1 lookup 100\n32766: from all lookup main\n".into();
        assert!(a.differences(&a).is_empty());
        assert_eq!(
            a.differences(&b),
            vec!["+ rule: 100: from all fwmark 0x1 lookup 100".to_owned()]
        );
    }
}
