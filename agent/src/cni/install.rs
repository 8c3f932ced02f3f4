//! Puts the plugin on the node (`--cni-conf-dir`): copies its binary into the runtime's plugin
//! directory and chains it at the end of the network config the runtime uses (the first
//! `.conflist` by name, as libcni picks it). The agent does it once it has programmed the node
//! (so that pods never wait on an agent that cannot answer yet), and again at every resync: a
//! CNI that rewrites its config on restart drops the entry, and this puts it back.
//! `static-egress cleanup --cni-conf-dir` takes both out again. Only our own entry (type
//! `static-egress-cni`) and our own binary are ever touched.

use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::Unclassified;

/// The plugin's `type` in a conflist and its binary's name.
pub const PLUGIN: &str = "static-egress-cni";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("reading {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("writing {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("{} is not a network config list: {why}", path.display())]
    NotAList { path: PathBuf, why: String },
    #[error(
        "no network config list (.conflist) in {}: the plugin can only be chained in one",
        dir.display()
    )]
    NoList { dir: PathBuf },
}

/// Where and how to install.
#[derive(Clone, Debug)]
pub struct CniInstall {
    pub conf_dir: PathBuf,
    pub bin_dir: PathBuf,
    /// The agent's socket, as the runtime's plugin process sees it.
    pub socket: PathBuf,
    pub unclassified: Unclassified,
}

impl CniInstall {
    fn entry(&self) -> Value {
        json!({
            "type": PLUGIN,
            "socket": self.socket,
            "unclassified": self.unclassified,
        })
    }

    /// Copies `binary` over ours when `copy` (the agent's first run; a newer agent brings a
    /// newer plugin) or when ours is missing, and chains our entry into the runtime's list.
    /// Returns the list changed, if any.
    pub fn ensure(&self, binary: &Path, copy: bool) -> Result<Option<PathBuf>, InstallError> {
        let target = self.bin_dir.join(PLUGIN);
        if copy || !target.exists() {
            copy_executable(binary, &target)?;
        }
        let path = runtime_list(&self.conf_dir)?;
        let mut list = read_list(&path)?;
        if !chain(&mut list, self.entry()) {
            return Ok(None);
        }
        write_list(&path, &list)?;
        Ok(Some(path))
    }
}

/// Keeps the plugin installed from the agent's loop.
pub struct Installer {
    install: CniInstall,
    /// Whether it was installed since the agent started (then the binary was copied).
    done: bool,
}

impl Installer {
    pub fn new(install: CniInstall) -> Self {
        Self {
            install,
            done: false,
        }
    }

    /// After a successful apply: installs the plugin the first time (before, pods would wait
    /// on an agent that cannot answer yet) and at every full check (`everything`), when a
    /// CNI's restart may have taken it out. A failure is logged; pods then start as they would
    /// without the plugin, and the next full check tries again.
    pub fn applied(&mut self, everything: bool) {
        if self.done && !everything {
            return;
        }
        let binary = std::env::current_exe()
            .map(|exe| exe.with_file_name(PLUGIN))
            .unwrap_or_default();
        match self.install.ensure(&binary, !self.done) {
            Ok(changed) => {
                if let Some(list) = changed {
                    tracing::info!(config = %list.display(), "chained the CNI plugin");
                }
                self.done = true;
            }
            Err(error) => tracing::warn!(%error, "cannot install the CNI plugin"),
        }
    }
}

/// Takes our entry out of every list in `conf_dir` and our binary out of `bin_dir`; whether
/// anything was there.
pub fn remove(conf_dir: &Path, bin_dir: &Path) -> Result<bool, InstallError> {
    let mut removed = false;
    for path in config_files(conf_dir)? {
        if path.extension().is_none_or(|e| e != "conflist") {
            continue;
        }
        let mut list = read_list(&path)?;
        if unchain(&mut list) {
            write_list(&path, &list)?;
            removed = true;
        }
    }
    let binary = bin_dir.join(PLUGIN);
    match fs::remove_file(&binary) {
        Ok(()) => removed = true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(InstallError::Write {
                path: binary,
                source,
            });
        }
    }
    Ok(removed)
}

/// Puts `entry` last in the list's plugins, replacing an earlier entry of ours; whether the
/// list changed.
fn chain(list: &mut Value, entry: Value) -> bool {
    let Some(plugins) = list.get_mut("plugins").and_then(Value::as_array_mut) else {
        return false;
    };
    if plugins.last() == Some(&entry) && plugins.iter().filter(|p| is_ours(p)).count() == 1 {
        return false;
    }
    plugins.retain(|p| !is_ours(p));
    plugins.push(entry);
    true
}

fn unchain(list: &mut Value) -> bool {
    let Some(plugins) = list.get_mut("plugins").and_then(Value::as_array_mut) else {
        return false;
    };
    let before = plugins.len();
    plugins.retain(|p| !is_ours(p));
    plugins.len() != before
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN)
}

/// The config files of `dir` in the order libcni reads them (by name).
fn config_files(dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let read = |source| InstallError::Read {
        path: dir.to_owned(),
        source,
    };
    let entries = match fs::read_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        entries => entries.map_err(read)?,
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "conf" || e == "conflist" || e == "json")
        })
        .collect();
    files.sort();
    Ok(files)
}

/// The list the runtime uses: the first config file by name, which must be a `.conflist`.
fn runtime_list(dir: &Path) -> Result<PathBuf, InstallError> {
    let first = config_files(dir)?
        .into_iter()
        .next()
        .ok_or_else(|| InstallError::NoList {
            dir: dir.to_owned(),
        })?;
    if first.extension().is_none_or(|e| e != "conflist") {
        return Err(InstallError::NotAList {
            path: first,
            why: "the runtime uses this single-plugin config, which cannot chain plugins".into(),
        });
    }
    Ok(first)
}

fn read_list(path: &Path) -> Result<Value, InstallError> {
    let bytes = fs::read(path).map_err(|source| InstallError::Read {
        path: path.to_owned(),
        source,
    })?;
    let list: Value = serde_json::from_slice(&bytes).map_err(|e| InstallError::NotAList {
        path: path.to_owned(),
        why: e.to_string(),
    })?;
    if !list.get("plugins").is_some_and(Value::is_array) {
        return Err(InstallError::NotAList {
            path: path.to_owned(),
            why: "it has no plugins array".into(),
        });
    }
    Ok(list)
}

/// Replaced whole (the runtime reads the old list or the new one, never half of it).
fn write_list(path: &Path, list: &Value) -> Result<(), InstallError> {
    let mut bytes = serde_json::to_vec_pretty(list).unwrap_or_default();
    bytes.push(b'\n');
    crate::fsutil::write_atomically(path, |w| w.write_all(&bytes)).map_err(|source| {
        InstallError::Write {
            path: path.to_owned(),
            source,
        }
    })
}

/// Copied beside the target, made executable, then renamed over it: a runtime never runs a
/// half-written plugin.
fn copy_executable(from: &Path, to: &Path) -> Result<(), InstallError> {
    let write = |source| InstallError::Write {
        path: to.to_owned(),
        source,
    };
    let bytes = fs::read(from).map_err(|source| InstallError::Read {
        path: from.to_owned(),
        source,
    })?;
    let tmp = to.with_extension("static-egress.tmp");
    let mut file = fs::File::create(&tmp).map_err(write)?;
    file.write_all(&bytes).map_err(write)?;
    file.set_permissions(fs::Permissions::from_mode(0o755))
        .map_err(write)?;
    file.sync_all().map_err(write)?;
    fs::rename(&tmp, to).map_err(write)
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    fn install(dir: &Path) -> CniInstall {
        CniInstall {
            conf_dir: dir.join("net.d"),
            bin_dir: dir.join("bin"),
            socket: "/var/lib/static-egress/cni.sock".into(),
            unclassified: Unclassified::Hold,
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("se-cni-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("net.d")).unwrap();
        fs::create_dir_all(dir.join("bin")).unwrap();
        fs::write(dir.join("plugin"), b"#!/bin/sh\n").unwrap();
        dir
    }

    #[test]
    fn chains_last_in_the_first_list_once_and_comes_out_again() {
        let dir = scratch("chain");
        let i = install(&dir);
        let flannel = json!({"cniVersion": "1.0.0", "name": "cbr0",
            "plugins": [{"type": "flannel"}, {"type": "portmap"}]});
        fs::write(i.conf_dir.join("10-flannel.conflist"), flannel.to_string()).unwrap();
        fs::write(i.conf_dir.join("99-other.conflist"), flannel.to_string()).unwrap();
        let changed = i.ensure(&dir.join("plugin"), true).unwrap();
        assert_eq!(changed, Some(i.conf_dir.join("10-flannel.conflist")));
        assert_eq!(
            i.ensure(&dir.join("plugin"), false).unwrap(),
            None,
            "idempotent"
        );
        let list = read_list(&i.conf_dir.join("10-flannel.conflist")).unwrap();
        let types: Vec<&str> = list["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["flannel", "portmap", PLUGIN]);
        let mode = fs::metadata(i.bin_dir.join(PLUGIN))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        // The CNI rewrote its list on restart: the entry comes back.
        fs::write(i.conf_dir.join("10-flannel.conflist"), flannel.to_string()).unwrap();
        assert!(i.ensure(&dir.join("plugin"), false).unwrap().is_some());

        assert!(remove(&i.conf_dir, &i.bin_dir).unwrap());
        assert_eq!(
            read_list(&i.conf_dir.join("10-flannel.conflist")).unwrap(),
            flannel
        );
        assert!(!i.bin_dir.join(PLUGIN).exists());
        assert!(!remove(&i.conf_dir, &i.bin_dir).unwrap());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_single_plugin_config_or_none_is_a_clear_error() {
        let dir = scratch("single");
        let i = install(&dir);
        let error = i.ensure(&dir.join("plugin"), true).unwrap_err();
        assert!(matches!(error, InstallError::NoList { .. }), "{error}");
        fs::write(i.conf_dir.join("10-bridge.conf"), r#"{"type":"bridge"}"#).unwrap();
        let error = i.ensure(&dir.join("plugin"), true).unwrap_err();
        assert!(error.to_string().contains("cannot chain"), "{error}");
        fs::remove_dir_all(dir).unwrap();
    }
}
