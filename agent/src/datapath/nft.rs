//! Our one nftables table: SNAT to the egress IPs this node holds, and an identity SNAT for
//! marked packets so that a CNI's masquerade (a later NAT chain) never rewrites them to the
//! node's address. The table is replaced whole in one transaction.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

use crate::plan::SnatPlan;

use super::DatapathError;

pub const TABLE: &str = "static_egress";

/// Runs before `srcnat` (100), where iptables-nft and most CNIs masquerade: the first NAT
/// binding made for a connection is the one that stays.
const PRIORITY: &str = "srcnat - 10";

/// The devices our rules name: the uplink, and the tunnel's when this node has one. (Whether
/// a pod's packet on its way out came from another node, on the uplink or through the tunnel,
/// the uplink's ingress program checks before any rule sees it: `SE_SENDERS`, `RANGE_NODE`.)
#[derive(Clone, Copy, Debug)]
pub struct Devices<'a> {
    pub uplink: &'a str,
    pub tunnel: Option<Tunnel<'a>>,
}

/// The rules of the tunnel (see `datapath::tunnel`).
#[derive(Clone, Copy, Debug)]
pub struct Tunnel<'a> {
    pub device: &'a str,
    /// Our bit, kept in the connection's mark for connections that came through the tunnel.
    pub mark: u32,
    /// The largest TCP segment that fits the tunnel.
    pub mss: u32,
}

/// Our table for `snat`; `marks` are the fwmark bits that mean "selected" (ours, and while
/// settings change, the previous one).
pub fn render(snat: &[SnatPlan], marks: u32, devices: Devices<'_>) -> String {
    let mut s = String::new();
    // Adding first makes the delete valid when the table is absent; all three lines are one
    // transaction, so the kernel never runs without the table.
    let _ = writeln!(
        s,
        "add table ip {TABLE}\ndelete table ip {TABLE}\ntable ip {TABLE} {{"
    );
    for (i, rule) in snat.iter().enumerate() {
        set(
            &mut s,
            &format!("pods_{i}"),
            false,
            rule.pods.iter().map(ToString::to_string),
        );
        set(
            &mut s,
            &format!("dst_{i}"),
            true,
            rule.destinations.iter().map(ToString::to_string),
        );
        set(
            &mut s,
            &format!("excl_{i}"),
            true,
            rule.excluded.iter().map(ToString::to_string),
        );
    }
    if !snat.is_empty() {
        set(
            &mut s,
            "held",
            false,
            snat.iter()
                .map(|r| r.egress_ip)
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .map(|ip| ip.to_string()),
        );
        // A packet to an egress IP that no connection here expects is the reply to one that
        // left through the previous holder: answered by this node's stack it would reset
        // that connection. Dropped before conntrack confirms it, it leaves no state behind,
        // the peer sends it again, and by then the pod's own next packet has come this way
        // and made the connection known here (README, "Failover"). Every packet the node
        // receives passes this chain: the connection's state comes first, and nearly all of
        // them, of known connections, go no further.
        let _ = writeln!(
            s,
            "  chain input {{\n    type filter hook input priority filter; policy accept;\n    ct state new,invalid ip daddr @held meta l4proto {{ tcp, udp }} counter drop comment \"not a connection of this holder\"\n  }}"
        );
    }
    // Only a node that translates needs them: its tunneled connections' replies go back
    // through the tunnel. Elsewhere nothing sets the connections' mark.
    if let Some(tunnel) = devices.tunnel
        && !snat.is_empty()
    {
        render_tunnel(&mut s, tunnel);
    }
    let _ = writeln!(
        s,
        "  chain postrouting {{\n    type nat hook postrouting priority {PRIORITY}; policy accept;"
    );
    for (i, rule) in snat.iter().enumerate() {
        let _ = writeln!(
            s,
            "    ip saddr @pods_{i} ip daddr @dst_{i} ip daddr != @excl_{i} snat ip to {} comment \"{}\"",
            rule.egress_ip,
            comment(&rule.gateway)
        );
    }
    if let Some(tunnel) = devices.tunnel {
        let _ = writeln!(
            s,
            "    iifname \"{}\" meta mark & {marks:#x} != 0 counter drop comment \"not translated here\"",
            tunnel.device
        );
    }
    // Another node's pod, sent here to leave with an egress IP this node does not (or no
    // longer, or not yet) hold: the kernel guard would drop it on the way out, but only after
    // conntrack had recorded the connection as untranslated, and that record would outlive
    // a takeover and keep the connection from ever being translated here.
    let _ = writeln!(
        s,
        "    iifname \"{}\" meta mark & {marks:#x} != 0 counter drop comment \"not translated here\"",
        devices.uplink
    );
    let _ = writeln!(
        s,
        "    meta mark & {marks:#x} != 0 snat ip to ip saddr comment \"keep source of marked pod traffic\"\n  }}\n}}"
    );
    s
}

/// A connection that came through the tunnel keeps our bit in its conntrack mark, so that its
/// replies get it too and our table sends them back through the tunnel (its routes for the
/// other nodes' pod CIDRs); their SYNs are clamped to what fits the tunnel, both ways.
/// The mark is set in a NAT chain, which conntrack runs for a connection's first packet only
/// (before others' DNAT at `dstnat`, which would end the chain walk, though ours never binds).
/// Every packet of the node passes the filter chain at prerouting, so it has one rule, the
/// connection's mark, and what tunneled connections need sits behind it: the three rules it
/// had each took every packet, ours or not, on every holder. It comes after the NAT chain, so
/// that a connection's first SYN is clamped too.
fn render_tunnel(s: &mut String, tunnel: Tunnel<'_>) {
    let Tunnel { device, mark, mss } = tunnel;
    let _ = writeln!(
        s,
        "  chain tunnel_new {{\n    type nat hook prerouting priority dstnat - 10; policy accept;\n    iifname \"{device}\" ct mark set ct mark or {mark:#x}\n  }}\n  chain tunneled {{\n    ct direction reply iifname != \"{device}\" meta mark set meta mark or {mark:#x}\n    tcp flags syn tcp option maxseg size > {mss} tcp option maxseg size set {mss}\n  }}\n  chain tunnel {{\n    type filter hook prerouting priority dstnat + 10; policy accept;\n    ct mark & {mark:#x} == {mark:#x} jump tunneled\n  }}"
    );
}

fn set(s: &mut String, name: &str, interval: bool, elements: impl Iterator<Item = String>) {
    let flags = if interval {
        " flags interval; auto-merge;"
    } else {
        ""
    };
    set_of(s, name, "ipv4_addr", flags, elements);
}

fn set_of(
    s: &mut String,
    name: &str,
    type_: &str,
    flags: &str,
    elements: impl Iterator<Item = String>,
) {
    let elements: Vec<String> = elements.collect();
    let _ = write!(s, "  set {name} {{ type {type_};{flags}");
    if !elements.is_empty() {
        let _ = write!(s, " elements = {{ {} }};", elements.join(", "));
    }
    let _ = writeln!(s, " }}");
}

/// nftables refuses comments over 128 characters; a Kubernetes name may have 253. The comment
/// only helps a human reading the ruleset, so a long name is cut rather than refused.
const COMMENT_MAX: usize = 128;

fn comment(name: &str) -> String {
    name.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        .take(COMMENT_MAX)
        .collect()
}

/// Sends `script` to `nft -f -` with `flags` before it.
fn nft(flags: &[&str], script: &str) -> Result<(), DatapathError> {
    let mut child = Command::new("nft")
        .args(flags)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(DatapathError::NftSpawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(DatapathError::NftSpawn)?;
    }
    let out = child.wait_with_output().map_err(DatapathError::NftSpawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(DatapathError::Nft(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

pub fn apply(script: &str) -> Result<(), DatapathError> {
    nft(&[], script)
}

/// Whether nftables would accept `script`, without changing anything (`nft --check`).
pub fn check(script: &str) -> Result<(), DatapathError> {
    nft(&["--check"], script)
}

/// Our table as the kernel has it now (`nft list table`), without counter values; `None` when
/// there is none. Comparing two listings tells whether someone changed the table in between.
pub fn list() -> Result<Option<String>, DatapathError> {
    let out = Command::new("nft")
        .args(["--stateless", "list", "table", "ip", TABLE])
        .stdin(Stdio::null())
        .output()
        .map_err(DatapathError::NftSpawn)?;
    if out.status.success() {
        return Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()));
    }
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("No such file or directory") {
        Ok(None)
    } else {
        Err(DatapathError::Nft(err.trim().to_owned()))
    }
}

/// The generation of the namespace's whole nftables ruleset (`NFT_MSG_GETGEN`): the kernel
/// counts every committed change to any table. The same generation as at our last listing
/// means our table is still as listed, and the periodic drift check need not list it again: at
/// 100,000 pods that listing took over a second of CPU while the agent's loop waited for it.
pub fn generation() -> std::io::Result<u32> {
    use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
    const NFNL_SUBSYS_NFTABLES: u16 = 10;
    const NFT_MSG_GETGEN: u16 = 16;
    const NFTA_GEN_ID: u16 = 1;
    // The netlink header (length, type, flags, sequence, port) and nftables' own (family,
    // version, resource id: all zero).
    const HEADER: usize = 16;
    let mut request = [0u8; HEADER + 4];
    request[0..4].copy_from_slice(&(HEADER as u32 + 4).to_ne_bytes());
    request[4..6].copy_from_slice(&(NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETGEN).to_ne_bytes());
    request[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    request[8..12].copy_from_slice(&1u32.to_ne_bytes());
    let mut socket = Socket::new(NETLINK_NETFILTER)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    socket.send(&request, 0)?;
    let (answer, _) = socket.recv_from_full()?;
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let field = |at: usize| -> Option<[u8; 2]> { answer.get(at..at + 2)?.try_into().ok() };
    let kind = field(4)
        .map(u16::from_ne_bytes)
        .ok_or_else(|| bad("short answer"))?;
    if kind == libc::NLMSG_ERROR as u16 {
        let errno = answer
            .get(HEADER..HEADER + 4)
            .and_then(|b| b.try_into().ok())
            .map_or(0, i32::from_ne_bytes);
        return Err(std::io::Error::from_raw_os_error(-errno));
    }
    let mut at = HEADER + 4;
    while let (Some(len), Some(attr)) = (field(at), field(at + 2)) {
        let len = usize::from(u16::from_ne_bytes(len));
        if u16::from_ne_bytes(attr) & 0x3fff == NFTA_GEN_ID {
            return answer
                .get(at + 4..at + 8)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_be_bytes)
                .ok_or_else(|| bad("short generation attribute"));
        }
        if len < 4 {
            break;
        }
        at += (len + 3) & !3;
    }
    Err(bad("no generation in the answer"))
}

/// Deletes our table if it exists; returns whether there was one.
pub fn remove() -> Result<bool, DatapathError> {
    let exists = list()?.is_some();
    if exists {
        nft(&[], &format!("delete table ip {TABLE}\n"))?;
    }
    Ok(exists)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In a network namespace of its own (this test's thread only): the generation moves with
    /// a change to any table and stays while nothing changes.
    #[test]
    fn the_generation_counts_ruleset_changes() {
        let moved = std::thread::spawn(|| {
            // SAFETY: moves only this thread into a new, empty network namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                eprintln!("skipped: no new network namespace without CAP_SYS_ADMIN");
                return None;
            }
            let before = generation().expect("generation");
            let same = generation().expect("generation again");
            apply("add table ip someone_else\n").expect("a table");
            let after = generation().expect("generation after a change");
            Some((before, same, after))
        })
        .join()
        .expect("test thread");
        if let Some((before, same, after)) = moved {
            assert_eq!(before, same);
            assert_ne!(before, after);
        }
    }

    #[test]
    fn renders_snat_and_identity_rules() {
        let plan = SnatPlan {
            gateway: "corp-fw".into(),
            egress_ip: "10.99.0.200".parse().expect("ip"),
            pods: vec!["10.244.1.2".parse().expect("ip")],
            destinations: vec!["0.0.0.0/0".parse().expect("net")],
            excluded: vec![],
            announce: Default::default(),
        };
        let devices = Devices {
            uplink: "eth0",
            tunnel: None,
        };
        let text = render(std::slice::from_ref(&plan), 0x2000, devices);
        assert!(text.starts_with("add table ip static_egress\ndelete table ip static_egress\n"));
        assert!(text.contains("set pods_0 { type ipv4_addr; elements = { 10.244.1.2 }; }"));
        assert!(text.contains("set excl_0 { type ipv4_addr; flags interval; auto-merge; }"));
        assert!(text.contains("snat ip to 10.99.0.200 comment \"corp-fw\""));
        assert!(text.contains("meta mark & 0x2000 != 0 snat ip to ip saddr"));
        // Whether a packet came from a node is the programs' to check, before any rule.
        assert!(!text.contains("prerouting"));
        assert!(text.contains("set held { type ipv4_addr; elements = { 10.99.0.200 }; }"));
        assert!(text.contains(
            "ct state new,invalid ip daddr @held meta l4proto { tcp, udp } counter drop"
        ));
        // A node that translates nothing drops nothing.
        assert!(text.contains(
            "iifname \"eth0\" meta mark & 0x2000 != 0 counter drop comment \"not translated here\""
        ));
        let none = render(&[], 0x2000, devices);
        assert!(!none.contains("prerouting") && !none.contains("input"));
        let tunneled = Devices {
            tunnel: Some(Tunnel {
                device: "se-tunnel",
                mark: 0x2000,
                mss: 1410,
            }),
            ..devices
        };
        // A node that translates nothing has no connection to send back through the tunnel:
        // no chain of the tunnel's sees its packets.
        let text = render(&[], 0x2000, tunneled);
        assert!(!text.contains("chain tunnel"));
        let text = render(std::slice::from_ref(&plan), 0x2000, tunneled);
        assert!(text.contains(
            "type nat hook prerouting priority dstnat - 10; policy accept;\n    iifname \"se-tunnel\" ct mark set ct mark or 0x2000\n  }"
        ));
        assert!(text.contains("tcp option maxseg size set 1410"));
        // Behind the jump: the replies of tunneled connections take our bit, and our table.
        assert!(text.contains(
            "chain tunneled {\n    ct direction reply iifname != \"se-tunnel\" meta mark set meta mark or 0x2000\n"
        ));
        // Every packet of the node meets one rule of ours at prerouting, not three.
        assert!(text.contains(
            "type filter hook prerouting priority dstnat + 10; policy accept;\n    ct mark & 0x2000 == 0x2000 jump tunneled\n  }"
        ));
        assert!(
            !text.contains("hook forward"),
            "one chain for the tunnel: {text}"
        );
        assert!(text.contains(
            "iifname \"se-tunnel\" meta mark & 0x2000 != 0 counter drop comment \"not translated here\""
        ));
        check(&text).expect("nftables accepts the tunnel's rules");
    }

    #[test]
    fn comments_fit_what_nftables_accepts() {
        let long = "a-very-long-gateway-name.".repeat(10);
        assert_eq!(comment(&long).len(), COMMENT_MAX);
        assert_eq!(comment("corp-fw \"; flush ruleset"), "corp-fwflushruleset");
    }
}
