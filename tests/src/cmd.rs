//! Running commands, inside network namespaces or not, with errors that say what failed.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, bail, ensure};

/// Where `ip netns add` keeps its namespaces.
pub(crate) const NETNS_DIR: &str = "/run/netns";

/// Runs `args` inside the network namespace `netns` (through `ip netns exec`) and returns its
/// stdout, or an error carrying the command line, the exit status and stderr.
pub fn exec<I, S>(netns: &str, args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = netns_command(netns, args);
    run(&mut cmd)
}

/// Like [`exec`], but returns the raw output whatever the exit status, for tests that expect
/// a command to fail.
pub fn exec_output<I, S>(netns: &str, args: I) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = netns_command(netns, args);
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{}`", describe(&cmd)))
}

pub(crate) fn netns_command<I, S>(netns: &str, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns]).args(args);
    cmd
}

/// Runs `ip` with `args` (use `-n NS` to reach into a namespace).
pub(crate) fn ip<I, S>(args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new("ip");
    cmd.args(args);
    run(&mut cmd)
}

pub(crate) fn run(cmd: &mut Command) -> Result<String> {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    if !output.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            describe(cmd),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

pub(crate) fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Writes `/proc/sys` settings (slash-form keys) as seen from inside `netns`.
///
/// A short-lived thread joins the namespace, so neither this process nor any other thread ever
/// changes network namespace, and no `sysctl` binary is needed.
pub(crate) fn write_sysctls(netns: &str, settings: &[(String, String)]) -> Result<()> {
    let path = Path::new(NETNS_DIR).join(netns);
    let ns = File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    let ns_inode = ns.metadata()?.ino();
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<()> {
                // SAFETY: `ns` is an open namespace file that outlives the call; setns only
                // changes the namespace of this thread, which ends when the closure returns.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error())
                        .with_context(|| format!("cannot enter network namespace {netns}"));
                }
                // A write that landed in the caller's namespace would change the host, so make
                // sure the switch really happened before touching anything.
                let now = std::fs::metadata("/proc/thread-self/ns/net")?.ino();
                ensure!(
                    now == ns_inode,
                    "thread did not end up in namespace {netns}"
                );
                for (key, value) in settings {
                    let file = Path::new("/proc/sys").join(key);
                    std::fs::write(&file, value).with_context(|| {
                        format!("cannot set {key}={value} in namespace {netns}")
                    })?;
                }
                Ok(())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("sysctl thread for {netns} panicked"))?
    })
}
