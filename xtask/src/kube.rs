//! The real kube-apiserver and etcd the cluster-mode tests run against, built by `cargo xtask
//! setup` from the Go module in `tests/apiserver/` that pins them. Built once per pin into the
//! user's cache directory (see [`netlab::kubeapi::KubeBuild`]); silent when already there.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use netlab::kubeapi::KubeBuild;

use crate::util::output;

/// Marks a build still in progress: `<dir>.partial-<pid>`.
const PARTIAL: &str = ".partial-";

/// Builds kube-apiserver and etcd unless the current pins' binaries exist.
pub fn binaries(verbose: bool) -> Result<()> {
    let build = KubeBuild::pinned()?;
    if build.is_built() {
        if verbose {
            println!(
                "setup: kube-apiserver {} and etcd {} present in {}",
                build.kubernetes,
                build.etcd,
                build.dir.display()
            );
        }
        return Ok(());
    }
    let go = go_command()?;
    println!(
        "setup: building kube-apiserver {} and etcd {} with Go (about 12 minutes on 2 cores \
         the first time)",
        build.kubernetes, build.etcd
    );
    let started = Instant::now();
    // Built beside the final directory and renamed into place, so an interrupted build never
    // looks complete.
    let mut partial = build.dir.clone().into_os_string();
    partial.push(format!("{PARTIAL}{}", std::process::id()));
    let partial = PathBuf::from(partial);
    remove_dir(&partial)?;
    fs::create_dir_all(&partial).with_context(|| format!("cannot create {}", partial.display()))?;
    for binary in build.binaries()? {
        let mut cmd = Command::new(&go);
        cmd.current_dir(KubeBuild::module_dir())
            .args(["build", "-trimpath", "-ldflags", &binary.ldflags, "-o"])
            .arg(partial.join(binary.name))
            .arg(binary.package)
            // Static binaries, as the projects release them; the module is ours alone.
            .env("CGO_ENABLED", "0")
            .env("GOWORK", "off")
            .env("GOFLAGS", "-mod=readonly -buildvcs=false");
        // Quiet unless it fails: the first build lists hundreds of module downloads.
        output(&mut cmd).with_context(|| format!("building {} failed", binary.name))?;
    }
    remove_dir(&build.dir)?;
    fs::rename(&partial, &build.dir)
        .with_context(|| format!("cannot move the build to {}", build.dir.display()))?;
    println!(
        "setup: built kube-apiserver {} and etcd {} in {} s ({})",
        build.kubernetes,
        build.etcd,
        started.elapsed().as_secs(),
        build.dir.display()
    );
    remove_other_builds(&build.dir)
}

/// `go` on PATH, or where the official archive installs it.
fn go_command() -> Result<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("go"))
            .find(|candidate| candidate.is_file())
    });
    let go = on_path.unwrap_or_else(|| PathBuf::from("/usr/local/go/bin/go"));
    if !go.is_file() {
        bail!(
            "Go is needed to build kube-apiserver and etcd for the tests (go.mod in {} names \
             the version): install Go and put `go` on PATH",
            KubeBuild::module_dir().display()
        );
    }
    Ok(go)
}

fn remove_dir(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", dir.display())),
    }
}

/// Builds of earlier pins are about 150 MB each and nothing uses them any more, nor the
/// leftovers of interrupted builds (builds in progress, perhaps another setup's, are left
/// alone).
fn remove_other_builds(current: &Path) -> Result<()> {
    let Some(root) = current.parent() else {
        return Ok(());
    };
    for entry in fs::read_dir(root).with_context(|| format!("cannot list {}", root.display()))? {
        let path = entry?.path();
        if path != current && !still_building(&path) && path.is_dir() {
            remove_dir(&path)?;
        }
    }
    Ok(())
}

/// Whether `path` is a build in progress: marked partial by a process that still runs.
fn still_building(path: &Path) -> bool {
    let name = path.to_string_lossy();
    let Some((_, pid)) = name.rsplit_once(PARTIAL) else {
        return false;
    };
    pid.parse::<u32>()
        .is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
}
