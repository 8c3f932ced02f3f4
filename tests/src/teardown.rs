//! Removing a lab: processes, bpffs mounts, namespaces, files. Everything is found from the
//! prefix, so this also cleans up after a lab whose process died or was kept on purpose.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

use crate::cmd::{NETNS_DIR, ip};
use crate::names::check_prefix;
use crate::{require_root, wait_until};

/// The directory that holds a lab's files.
pub(crate) fn lab_dir(prefix: &str) -> PathBuf {
    std::env::temp_dir().join(prefix)
}

/// Removes everything of the lab with this prefix (see [`crate::Cluster::prefix`]): kills the
/// processes in its namespaces, unmounts its bpffs, deletes its namespaces and its directory.
pub fn teardown_prefix(prefix: &str) -> Result<()> {
    require_root()?;
    check_prefix(prefix)?;
    teardown(prefix, &lab_dir(prefix))
}

/// Goes on after a failed step, so one stuck piece does not leave the rest behind, and reports
/// every failure at the end.
pub(crate) fn teardown(prefix: &str, dir: &Path) -> Result<()> {
    let mut errors = Vec::new();
    let namespaces = match lab_namespaces(prefix) {
        Ok(namespaces) => namespaces,
        Err(e) => {
            errors.push(e);
            Vec::new()
        }
    };
    for ns in &namespaces {
        if let Err(e) = kill_namespace_processes(ns) {
            errors.push(e);
        }
    }
    for mount in mounts_under(dir).unwrap_or_else(|e| {
        errors.push(e);
        Vec::new()
    }) {
        if let Err(e) = unmount(&mount) {
            errors.push(e);
        }
    }
    for ns in &namespaces {
        if let Err(e) = ip(["netns", "del", ns]) {
            errors.push(e);
        }
    }
    match mounts_under(dir) {
        // Deleting files inside a still-mounted bpffs would unpin objects behind the back of
        // whatever holds that mount; leave the directory for a later attempt instead.
        Ok(left) if !left.is_empty() => errors.push(anyhow!(
            "not removing {}: still mounted: {left:?}",
            dir.display()
        )),
        Ok(_) => {
            if let Err(e) = fs::remove_dir_all(dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                errors.push(anyhow!(e).context(format!("cannot remove {}", dir.display())));
            }
        }
        Err(e) => errors.push(e),
    }
    if errors.is_empty() {
        return Ok(());
    }
    let all: Vec<String> = errors.iter().map(|e| format!("{e:#}")).collect();
    bail!("tearing down lab {prefix} failed:\n  {}", all.join("\n  "))
}

pub(crate) fn lab_namespaces(prefix: &str) -> Result<Vec<String>> {
    let start = format!("{prefix}-");
    let entries = match fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(anyhow!(e).context(format!("cannot list {NETNS_DIR}"))),
    };
    let mut names = Vec::new();
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with(&start) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Everything in a lab namespace belongs to the lab (agents, probes, loops), so SIGKILL it all,
/// then wait until the kernel reports no process left in it.
pub(crate) fn kill_namespace_processes(ns: &str) -> Result<()> {
    let pids = namespace_pids(ns)?;
    for pid in &pids {
        // SAFETY: plain syscall. A pid that exited meanwhile gives ESRCH, which is fine.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    if pids.is_empty() {
        return Ok(());
    }
    wait_until(Duration::from_secs(5), || {
        namespace_pids(ns).is_ok_and(|left| left.is_empty())
    })
    .with_context(|| format!("processes in namespace {ns} survive SIGKILL"))
}

fn namespace_pids(ns: &str) -> Result<Vec<libc::pid_t>> {
    let out = ip(["netns", "pids", ns])?;
    out.split_whitespace()
        .map(|pid| pid.parse().with_context(|| format!("odd pid {pid:?}")))
        .collect()
}

/// Mount points at or below `dir` in this process's mount table, deepest first.
fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let table = fs::read_to_string("/proc/self/mountinfo").context("cannot read mountinfo")?;
    let mut mounts: Vec<PathBuf> = table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mount_field(field)))
        .filter(|mount| mount.starts_with(dir))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    mounts.dedup();
    Ok(mounts)
}

/// mountinfo writes space, tab, newline and backslash as three-digit octal escapes.
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let digits = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], digits) {
            (b'\\', Some(d)) => {
                out.push(
                    d.iter()
                        .fold(0u8, |acc, b| acc.wrapping_mul(8).wrapping_add(b - b'0')),
                );
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(crate) fn mount_bpffs(dir: &Path) -> Result<()> {
    let target = CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call;
    // bpffs takes no mount data.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot mount bpffs on {}", dir.display()));
    }
    Ok(())
}

/// Unmounts, falling back to a lazy unmount when something still holds the mount busy.
fn unmount(dir: &Path) -> Result<()> {
    let target = CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: `target` is a valid NUL-terminated path for the duration of the calls.
    let rc = unsafe { libc::umount2(target.as_ptr(), 0) };
    if rc == 0 {
        return Ok(());
    }
    // SAFETY: as above.
    let rc = unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot unmount {}", dir.display()));
    }
    Ok(())
}

/// A shell script doing what [`teardown`] does, for a kept lab: it works without this crate.
pub(crate) fn script(prefix: &str, dir: &Path) -> String {
    format!(
        r#"#!/bin/bash
# Removes netlab lab {prefix}: its processes, bpffs mounts, namespaces and files.
set -u
prefix='{prefix}'
dir='{dir}'
namespaces=$(ip netns list | awk '{{print $1}}' | grep "^$prefix-")
for ns in $namespaces; do
    for pid in $(ip netns pids "$ns"); do kill -9 "$pid" 2>/dev/null; done
done
for ns in $namespaces; do
    for _ in $(seq 50); do
        [ -z "$(ip netns pids "$ns")" ] && break
        sleep 0.1
    done
done
awk -v d="$dir" '$5 == d || index($5, d "/") == 1 {{print $5}}' /proc/self/mountinfo | sort -r |
    while read -r m; do umount "$m" 2>/dev/null || umount -l "$m"; done
for ns in $namespaces; do ip netns del "$ns"; done
if awk -v d="$dir" '$5 == d || index($5, d "/") == 1' /proc/self/mountinfo | grep -q .; then
    echo "still mounted under $dir, not removing it" >&2
    exit 1
fi
rm -rf "$dir"
echo "removed lab $prefix"
"#,
        dir = dir.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mount_field(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape_mount_field(r"/tmp/x\134"), r"/tmp/x\");
        assert_eq!(unescape_mount_field("/plain"), "/plain");
        assert_eq!(unescape_mount_field(r"/odd\04"), r"/odd\04");
    }

    #[test]
    fn script_names_the_prefix_and_directory() {
        let s = script("nl-1-0", Path::new("/tmp/nl-1-0"));
        assert!(s.contains("prefix='nl-1-0'"));
        assert!(s.contains("dir='/tmp/nl-1-0'"));
        assert!(s.starts_with("#!/bin/bash\n"));
    }
}
