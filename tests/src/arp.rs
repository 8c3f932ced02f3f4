//! Who answers ARP for an address on the node segment, watched from the router for a whole
//! test: `se-probe arp` broadcasts a request every 50 ms and `tcpdump` records every ARP packet on the
//! router's bridge, so that each request's answers can be counted (two answerers for one
//! request are two nodes serving one address).

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::cluster::Cluster;
use crate::cmd::netns_command;
use crate::process::Background;

/// The running watch; [`ArpWatch::finish`] stops it and reads what it saw.
#[derive(Debug)]
pub struct ArpWatch {
    ip: Ipv4Addr,
    capture: Background,
    asker: Background,
}

/// What the watch saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ArpSeen {
    /// Requests the router sent.
    pub requests: usize,
    /// The most different link-layer addresses that answered one request.
    pub most_answerers: usize,
    /// The answering link-layer addresses in the order they took over.
    pub answerers: Vec<String>,
    /// The capture's lines of each request that two or more answered, with their answers:
    /// their times place the fault among the agents' logs.
    pub doubled: Vec<String>,
    /// Who announced the address (gratuitous requests), by link-layer address, in order.
    pub announcers: Vec<String>,
}

impl Cluster {
    /// Starts watching who answers ARP for `ip` on the node segment.
    pub fn watch_arp(&mut self, ip: Ipv4Addr) -> Result<ArpWatch> {
        let bridge = self.router_bridge().to_owned();
        let run = self.next_run();
        let mut capture = netns_command(self.router_netns(), ["tcpdump"]);
        capture.args(["-i", &bridge, "-n", "-e", "-l", "--immediate-mode", "arp"]);
        let out = self.dir().join(format!("arp.{run}.out"));
        let capture = Background::spawn(capture, &out, "tcpdump on the router".into())?;
        // tcpdump needs a moment before it captures: requests sent earlier would go unseen.
        std::thread::sleep(Duration::from_millis(300));
        let mut asker: Command = netns_command(self.router_netns(), [self.probe_bin()]);
        asker
            .args([
                "arp",
                &bridge,
                &self.router_ip().to_string(),
                &ip.to_string(),
            ])
            .args(["--interval-ms", "50"]);
        let out = self.dir().join(format!("arp-ask.{run}.out"));
        let asker = Background::spawn(asker, &out, "se-probe arp on the router".into())?;
        Ok(ArpWatch { ip, capture, asker })
    }
}

impl ArpWatch {
    /// Stops the watch and counts what it saw.
    pub fn finish(mut self) -> Result<ArpSeen> {
        self.asker.terminate(Duration::from_secs(5))?;
        // The answers to the last request are on the wire within a millisecond.
        std::thread::sleep(Duration::from_millis(100));
        self.capture.terminate(Duration::from_secs(5))?;
        let text = self.capture.output().context("reading the ARP capture")?;
        Ok(count(&text, self.ip))
    }
}

/// Counts the answers to each request for `ip` in tcpdump's `-e -n` lines.
fn count(capture: &str, ip: Ipv4Addr) -> ArpSeen {
    let who_has = format!("Request who-has {ip} tell ");
    let is_at = format!("Reply {ip} is-at ");
    let mut seen = ArpSeen::default();
    let mut round = Round::default();
    // Who asked in this round: answers to others (a node resolving the address) are theirs.
    let mut asker = String::new();
    for line in capture.lines() {
        let mut macs = line.split_whitespace().skip(1);
        let (Some(src), Some(dst)) = (macs.next(), macs.nth(1)) else {
            continue;
        };
        let dst = dst.trim_end_matches(',');
        if let Some(rest) = line.split_once(&who_has).map(|(_, r)| r) {
            // A gratuitous request (`tell` itself) announces; it is not a question.
            if rest.starts_with(&format!("{ip},")) || rest.starts_with(&format!("{ip} ")) {
                seen.announcers.push(src.to_owned());
            } else {
                round.close(&mut seen);
                seen.requests += 1;
                src.clone_into(&mut asker);
                round.lines.push(line.to_owned());
            }
        } else if let Some(rest) = line.split_once(&is_at).map(|(_, r)| r)
            && dst == asker
        {
            let mac = rest.split([',', ' ']).next().unwrap_or_default().to_owned();
            if seen.answerers.last() != Some(&mac) {
                seen.answerers.push(mac.clone());
            }
            round.answerers.insert(mac);
            round.lines.push(line.to_owned());
        }
    }
    round.close(&mut seen);
    seen
}

/// One request and its answers.
#[derive(Default)]
struct Round {
    answerers: std::collections::BTreeSet<String>,
    lines: Vec<String>,
}

impl Round {
    /// Ends the round, counting it into `seen`.
    fn close(&mut self, seen: &mut ArpSeen) {
        seen.most_answerers = seen.most_answerers.max(self.answerers.len());
        if self.answerers.len() > 1 {
            seen.doubled.append(&mut self.lines);
        }
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_the_answers_to_each_request() {
        let ip = Ipv4Addr::new(10, 99, 0, 200);
        let capture = "\
12:00:00.000000 02:00:00:00:00:01 > ff:ff:ff:ff:ff:ff, ethertype ARP (0x0806), length 42: Request who-has 10.99.0.200 tell 10.99.0.1, length 28
12:00:00.000100 02:00:00:00:00:02 > 02:00:00:00:00:01, ethertype ARP (0x0806), length 42: Reply 10.99.0.200 is-at 02:00:00:00:00:02, length 28
12:00:00.050000 02:00:00:00:00:01 > ff:ff:ff:ff:ff:ff, ethertype ARP (0x0806), length 42: Request who-has 10.99.0.200 tell 10.99.0.1, length 28
12:00:00.050100 02:00:00:00:00:02 > 02:00:00:00:00:01, ethertype ARP (0x0806), length 42: Reply 10.99.0.200 is-at 02:00:00:00:00:02, length 28
12:00:00.060000 02:00:00:00:00:03 > ff:ff:ff:ff:ff:ff, ethertype ARP (0x0806), length 42: Request who-has 10.99.0.200 tell 10.99.0.200, length 28
12:00:00.060100 02:00:00:00:00:03 > ff:ff:ff:ff:ff:ff, ethertype ARP (0x0806), length 42: Reply 10.99.0.200 is-at 02:00:00:00:00:03, length 28
12:00:00.060200 02:00:00:00:00:03 > 02:00:00:00:00:01, ethertype ARP (0x0806), length 42: Reply 10.99.0.200 is-at 02:00:00:00:00:03, length 28
12:00:00.100000 02:00:00:00:00:01 > ff:ff:ff:ff:ff:ff, ethertype ARP (0x0806), length 42: Request who-has 10.99.0.200 tell 10.99.0.1, length 28
12:00:00.100100 02:00:00:00:00:03 > 02:00:00:00:00:01, ethertype ARP (0x0806), length 42: Reply 10.99.0.200 is-at 02:00:00:00:00:03, length 28
";
        let seen = count(capture, ip);
        assert_eq!(seen.requests, 3);
        assert_eq!(seen.most_answerers, 2);
        assert_eq!(seen.doubled.len(), 3, "{:?}", seen.doubled);
        assert_eq!(
            seen.answerers,
            ["02:00:00:00:00:02", "02:00:00:00:00:03"].map(String::from)
        );
    }
}
