//! What this agent created on the host, recorded before it is created, so that `cleanup`
//! (or a later agent) can remove it even after a crash.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::DatapathError;

const FILE: &str = "state.json";

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub uplink: Option<String>,
    pub fwmark: u32,
    pub route_table: u32,
    pub rule_priority: u32,
    /// Egress IPs we added to the uplink.
    pub addresses: BTreeSet<Ipv4Addr>,
    /// Holders' node IPs we keep resolved on the uplink.
    #[serde(default)]
    pub neighbours: BTreeSet<Ipv4Addr>,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DatapathError + '_ {
    move |source| DatapathError::Io {
        path: path.to_owned(),
        source,
    }
}

impl State {
    pub fn load(dir: &Path) -> Result<Option<Self>, DatapathError> {
        let path = dir.join(FILE);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| DatapathError::State { path, source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Written through a temporary file so a crash never leaves half a record.
    pub fn save(&self, dir: &Path) -> Result<(), DatapathError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let path = dir.join(FILE);
        let tmp: PathBuf = dir.join(format!("{FILE}.tmp"));
        let bytes = serde_json::to_vec_pretty(self).map_err(|source| DatapathError::State {
            path: path.clone(),
            source,
        })?;
        fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_err(&path))
    }

    /// Removes the record and the agent's status file beside it.
    pub fn remove(dir: &Path) -> Result<(), DatapathError> {
        for name in [FILE, "status.json"] {
            let path = dir.join(name);
            match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(&path)(e)),
                _ => {}
            }
        }
        Ok(())
    }
}
