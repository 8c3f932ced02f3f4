//! Names of namespaces, interfaces and sysctls: pure functions, unit-tested.

use anyhow::{Context, Result, bail, ensure};

use crate::digest::digest;

/// Linux interface names are at most `IFNAMSIZ - 1` bytes.
pub(crate) const MAX_IFNAME: usize = 15;

/// A prefix unique to one lab instance: `<tag>-<pid>-<counter>` with the numbers in base 36 to
/// stay short. The pid separates concurrent test processes, the counter the labs of one process.
pub(crate) fn instance_prefix(tag: &str, pid: u32, counter: u32) -> String {
    format!("{tag}-{}-{}", base36(pid), base36(counter))
}

/// Checks that `prefix` has the shape [`instance_prefix`] produces, so tearing down by prefix can
/// never match namespaces that some other tool created.
pub(crate) fn check_prefix(prefix: &str) -> Result<()> {
    let parts: Vec<&str> = prefix.split('-').collect();
    ensure!(
        parts.len() == 3
            && parts.iter().all(|p| {
                !p.is_empty()
                    && p.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            }),
        "{prefix:?} is not a netlab prefix (expected TAG-PID-COUNTER, e.g. nl-2x4f-0)"
    );
    Ok(())
}

/// Checks a lab tag: short and plain, because it starts every namespace and directory name.
pub(crate) fn check_tag(tag: &str) -> Result<()> {
    ensure!(
        (1..=8).contains(&tag.len())
            && tag
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
        "lab tag {tag:?} must be 1 to 8 lowercase letters or digits"
    );
    Ok(())
}

/// A Kubernetes DNS label (namespace and, here, node names): it also ends up in namespace and
/// directory names, so nothing else may slip in.
pub(crate) fn check_dns_label(what: &str, name: &str) -> Result<()> {
    ensure!(
        (1..=63).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-')
            && !name.ends_with('-'),
        "{what} {name:?} must be a DNS label (lowercase letters, digits, '-')"
    );
    Ok(())
}

/// A Kubernetes DNS subdomain (pod names): DNS labels joined by dots.
pub(crate) fn check_dns_subdomain(what: &str, name: &str) -> Result<()> {
    ensure!(
        name.len() <= 253,
        "{what} {name:?} is longer than 253 bytes"
    );
    for label in name.split('.') {
        check_dns_label(what, label)
            .with_context(|| format!("{what} {name:?} is not a DNS name"))?;
    }
    Ok(())
}

fn base36(mut n: u32) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8_lossy(&out).into_owned()
}

/// Name of the node-side veth of a pod: `<prefix><hash>`, filled up to the 15-byte limit the way
/// CNIs derive theirs from the workload's identity, so it is stable for a given pod.
pub(crate) fn host_veth_name(prefix: &str, namespace: &str, pod: &str) -> Result<String> {
    ensure!(
        !prefix.is_empty() && prefix.len() <= MAX_IFNAME - 4,
        "veth prefix {prefix:?} must be 1 to {} bytes to leave room for a hash",
        MAX_IFNAME - 4
    );
    let hash = digest(format!("{namespace}/{pod}").as_bytes());
    let name = format!("{prefix}{}", &hash[..MAX_IFNAME - prefix.len()]);
    check_ifname(&name)?;
    Ok(name)
}

/// Rejects interface names the kernel would refuse, before any command runs.
pub(crate) fn check_ifname(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_IFNAME {
        bail!("interface name {name:?} must be 1 to {MAX_IFNAME} bytes");
    }
    if name == "."
        || name == ".."
        || name.contains(['/', ':'])
        || name.contains(char::is_whitespace)
    {
        bail!("interface name {name:?} contains a character Linux does not allow");
    }
    Ok(())
}

/// A per-interface IPv4 sysctl key in the slash form, which `sysctl` reads unambiguously even
/// when the interface name contains dots (VLAN devices such as `eth0.100`).
pub(crate) fn ipv4_conf_key(interface: &str, setting: &str) -> String {
    format!("net/ipv4/conf/{interface}/{setting}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_short_distinct_and_accepted() {
        let a = instance_prefix("nl", 4_194_304, 0);
        let b = instance_prefix("nl", 4_194_304, 1);
        assert_eq!(instance_prefix("nl", 36 * 36 + 1, 37), "nl-101-11");
        assert_ne!(a, b);
        assert!(a.len() <= 12, "{a}");
        check_prefix(&a).expect("generated prefix is valid");
        check_prefix(&instance_prefix("lab7", 1, 35)).expect("valid");
    }

    #[test]
    fn base36_digits() {
        assert_eq!(base36(0), "0");
        assert_eq!(base36(35), "z");
        assert_eq!(base36(36), "10");
    }

    #[test]
    fn foreign_prefixes_are_refused() {
        for bad in [
            "",
            "nl",
            "nl-1",
            "nl-1-",
            "cni-1-2-3",
            "NL-1-2",
            "nl-1-2/x",
            "*",
        ] {
            assert!(check_prefix(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn tags_are_checked() {
        check_tag("nl").expect("valid");
        for bad in ["", "toolongtag", "a-b", "A"] {
            assert!(check_tag(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn host_veths_fill_fifteen_bytes_and_are_stable() {
        let a = host_veth_name("cali", "payments", "api-1").expect("valid");
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("cali"));
        assert_eq!(
            a,
            host_veth_name("cali", "payments", "api-1").expect("valid")
        );
        assert_ne!(
            a,
            host_veth_name("cali", "payments", "api-2").expect("valid")
        );
        assert_ne!(
            a,
            host_veth_name("cali", "payment", "s/api-1").expect("valid")
        );
        assert!(host_veth_name("averylongprefix", "a", "b").is_err());
    }

    #[test]
    fn interface_names() {
        check_ifname("eth0").expect("valid");
        check_ifname("enp0s31f6.100").expect("valid");
        for bad in ["", "sixteen-bytes-xx", "a/b", "a b", "a:1", ".."] {
            assert!(check_ifname(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn kubernetes_names() {
        check_dns_label("namespace", "payments-2").expect("valid");
        check_dns_subdomain("pod", "api-7d9f.x").expect("valid");
        for bad in ["", "-a", "a-", "A", "a_b", "a.b"] {
            assert!(
                check_dns_label("namespace", bad).is_err(),
                "{bad:?} accepted"
            );
        }
        for bad in ["", "a..b", ".a", "a b"] {
            assert!(check_dns_subdomain("pod", bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn sysctl_keys_keep_dotted_interfaces_intact() {
        assert_eq!(
            ipv4_conf_key("eth0.100", "rp_filter"),
            "net/ipv4/conf/eth0.100/rp_filter"
        );
    }
}
