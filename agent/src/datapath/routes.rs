//! Which interface leads to each local pod, answered from one dump of the main table instead of
//! one kernel lookup per pod: at 50,000 local pods the lookups (two netlink round trips each)
//! were most of the agent's idle CPU, spent again at every apply. The CNIs put their routes to
//! local pods in the main table (a route per pod, or one per bridge); policy rules that would
//! send unmarked traffic to pods through another table are not followed here.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// Where a main-table route sends packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hop {
    /// Out of this interface.
    Out(u32),
    /// Nowhere: an unreachable, blackhole or prohibit route (CNIs put one on a node's pod
    /// CIDR), as the kernel's own lookup would answer.
    Nowhere,
    /// The table alone does not say (several next hops, a kind of route not modelled here):
    /// the caller asks the kernel.
    Ask,
}

/// One main-table route: destination, the route's metric (lower wins), where it leads.
pub type Route = (Ipv4Net, u32, Hop);

/// The main table, indexed for longest-prefix lookups: host routes (one per pod with
/// point-to-point CNIs) in a hash map, the few wider ones in a list, longest first.
#[derive(Debug, Default)]
pub struct MainTable {
    hosts: HashMap<Ipv4Addr, (u32, Hop)>,
    wider: Vec<(Ipv4Net, u32, Hop)>,
}

impl MainTable {
    pub fn new(routes: impl IntoIterator<Item = Route>) -> Self {
        let mut table = Self::default();
        for (net, metric, hop) in routes {
            if net.prefix_len() == 32 {
                let slot = table.hosts.entry(net.addr()).or_insert((metric, hop));
                if metric < slot.0 {
                    *slot = (metric, hop);
                }
            } else {
                table.wider.push((net.trunc(), metric, hop));
            }
        }
        // Longest prefix first, then the lowest metric among routes to the same prefix.
        table
            .wider
            .sort_by_key(|(net, metric, _)| (std::cmp::Reverse(net.prefix_len()), *metric));
        table
    }

    /// Where the main table sends packets to `ip`; `None` when no route covers it.
    pub fn lookup(&self, ip: Ipv4Addr) -> Option<Hop> {
        if let Some((_, hop)) = self.hosts.get(&ip) {
            return Some(*hop);
        }
        self.wider
            .iter()
            .find(|(net, ..)| net.contains(&ip))
            .map(|(.., hop)| *hop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("a CIDR")
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("an address")
    }

    #[test]
    fn the_longest_prefix_wins_and_then_the_lowest_metric() {
        let table = MainTable::new([
            (net("0.0.0.0/0"), 0, Hop::Out(2)),
            (net("10.244.1.0/24"), 0, Hop::Nowhere),
            (net("10.244.1.0/25"), 100, Hop::Out(7)),
            (net("10.244.1.0/25"), 50, Hop::Out(8)),
            (net("10.244.1.5/32"), 10, Hop::Out(9)),
            (net("10.244.1.5/32"), 5, Hop::Out(10)),
            (net("10.244.1.6/32"), 0, Hop::Ask),
        ]);
        assert_eq!(table.lookup(ip("10.244.1.5")), Some(Hop::Out(10)));
        assert_eq!(table.lookup(ip("10.244.1.6")), Some(Hop::Ask));
        assert_eq!(table.lookup(ip("10.244.1.7")), Some(Hop::Out(8)));
        assert_eq!(table.lookup(ip("10.244.1.200")), Some(Hop::Nowhere));
        assert_eq!(table.lookup(ip("192.0.2.1")), Some(Hop::Out(2)));
    }

    #[test]
    fn an_address_no_route_covers_has_no_answer() {
        let table = MainTable::new([(net("10.244.1.9/24"), 0, Hop::Out(3))]);
        assert_eq!(table.lookup(ip("10.244.1.1")), Some(Hop::Out(3)));
        assert_eq!(table.lookup(ip("10.244.2.1")), None);
    }
}
