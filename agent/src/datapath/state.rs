//! What this agent created on the host, recorded before it is created, so that `cleanup`
//! (or a later agent) can remove it even after a crash.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::DatapathError;
use crate::fsutil::write_atomically;

const FILE: &str = "state.json";

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub uplink: Option<String>,
    /// Our rule, `fwmark` / `route_table` / `rule_priority` as last configured; 0 before the
    /// first apply.
    pub fwmark: u32,
    pub route_table: u32,
    pub rule_priority: u32,
    /// Rules of earlier settings (another `--fwmark`, `--route-table` or `--rule-priority`), kept
    /// until the current one is in place and they are removed with their tables.
    #[serde(default)]
    pub retired: BTreeSet<RuleSpec>,
    /// Egress IPs we added to the uplink.
    pub addresses: BTreeSet<Ipv4Addr>,
    /// Holders' node IPs we keep resolved on the uplink.
    #[serde(default)]
    pub neighbours: BTreeSet<Ipv4Addr>,
    /// Whether we created the tunnel device (`static_egress_common::tunnel::DEVICE`).
    #[serde(default)]
    pub tunnel: bool,
    /// The routing table we put held egress IPs announced by BGP in (`--announce-table`).
    #[serde(default)]
    pub announce_table: Option<u32>,
}

/// What the state directory holds.
#[derive(Debug)]
pub enum Record {
    Found(State),
    /// No agent ran here, or `cleanup` removed the record.
    Missing,
    /// The file was not a record; it was renamed to `moved_to`.
    Corrupt {
        error: String,
        moved_to: PathBuf,
    },
}

/// One `ip rule fwmark MARK/MARK lookup TABLE` at PRIORITY.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RuleSpec {
    pub priority: u32,
    pub mark: u32,
    pub table: u32,
}

impl State {
    /// The rule this state says is ours now, if an apply has recorded one.
    pub fn rule(&self) -> Option<RuleSpec> {
        (self.route_table != 0).then_some(RuleSpec {
            priority: self.rule_priority,
            mark: self.fwmark,
            table: self.route_table,
        })
    }

    /// Makes `rule` the current one; the previous one, if different, is retired.
    pub fn set_rule(&mut self, rule: RuleSpec) {
        if let Some(previous) = self.rule().filter(|p| *p != rule) {
            self.retired.insert(previous);
        }
        self.retired.remove(&rule);
        self.fwmark = rule.mark;
        self.route_table = rule.table;
        self.rule_priority = rule.priority;
    }
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

    /// Reads the record like [`State::load`], but a file that is not a record (cut short,
    /// edited by hand, from an incompatible version) is moved aside to
    /// `state.json.corrupt-<unix seconds>` instead of stopping the caller.
    pub fn load_or_set_aside(dir: &Path) -> Result<Record, DatapathError> {
        match Self::load(dir) {
            Ok(Some(state)) => Ok(Record::Found(state)),
            Ok(None) => Ok(Record::Missing),
            Err(DatapathError::State { path, source }) => {
                let seconds = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or_default();
                let mut aside = dir.join(format!("{FILE}.corrupt-{seconds}"));
                for n in 1.. {
                    if !aside.exists() {
                        break;
                    }
                    aside = dir.join(format!("{FILE}.corrupt-{seconds}.{n}"));
                }
                fs::rename(&path, &aside).map_err(io_err(&path))?;
                Ok(Record::Corrupt {
                    error: source.to_string(),
                    moved_to: aside,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Written through a temporary file, flushed to disk with its directory, so that neither a
    /// crash nor a power loss leaves half a record (or none).
    pub fn save(&self, dir: &Path) -> Result<(), DatapathError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let path = dir.join(FILE);
        let bytes = serde_json::to_vec_pretty(self).map_err(|source| DatapathError::State {
            path: path.clone(),
            source,
        })?;
        write_atomically(&path, |w| w.write_all(&bytes)).map_err(io_err(&path))
    }

    /// Removes the record and the agent's status file beside it (and what a write cut short
    /// may have left of either).
    pub fn remove(dir: &Path) -> Result<(), DatapathError> {
        for name in [FILE, "status.json", "state.json.tmp", "status.json.tmp"] {
            let path = dir.join(name);
            match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(&path)(e)),
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_rule_retires_the_previous_one_until_it_comes_back() {
        let rule = |priority, mark, table| RuleSpec {
            priority,
            mark,
            table,
        };
        let mut state = State::default();
        assert_eq!(state.rule(), None);
        state.set_rule(rule(1490, 0x2000, 1490));
        assert!(state.retired.is_empty(), "nothing was there before");
        state.set_rule(rule(1490, 0x2000, 1490));
        assert!(state.retired.is_empty());
        state.set_rule(rule(1500, 0x10000, 1500));
        assert_eq!(state.rule(), Some(rule(1500, 0x10000, 1500)));
        assert_eq!(
            state.retired.iter().copied().collect::<Vec<_>>(),
            [rule(1490, 0x2000, 1490)]
        );
        // Back to the old settings before the move finished: nothing of ours to remove.
        state.set_rule(rule(1490, 0x2000, 1490));
        assert_eq!(
            state.retired.iter().copied().collect::<Vec<_>>(),
            [rule(1500, 0x10000, 1500)]
        );
    }

    #[test]
    fn a_corrupt_record_is_set_aside_and_a_missing_one_is_missing() {
        let dir = std::env::temp_dir().join(format!("static-egress-state-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create");
        assert!(matches!(
            State::load_or_set_aside(&dir),
            Ok(Record::Missing)
        ));

        let state = State {
            uplink: Some("eth0".into()),
            addresses: BTreeSet::from([Ipv4Addr::new(10, 99, 0, 200)]),
            ..State::default()
        };
        state.save(&dir).expect("save");
        assert!(matches!(State::load_or_set_aside(&dir), Ok(Record::Found(s)) if s == state));

        for (i, garbage) in [&b"{\"uplink\": \"eth"[..], b"", b"[]"].iter().enumerate() {
            fs::write(dir.join(FILE), garbage).expect("write garbage");
            let Ok(Record::Corrupt { error, moved_to }) = State::load_or_set_aside(&dir) else {
                panic!("{garbage:?} should be a corrupt record");
            };
            assert!(!error.is_empty());
            assert!(!dir.join(FILE).exists(), "the corrupt file is moved away");
            assert_eq!(fs::read(&moved_to).expect("kept aside"), *garbage);
            let name = moved_to
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            assert!(name.starts_with("state.json.corrupt-"), "{name}");
            let aside = fs::read_dir(&dir)
                .expect("list")
                .filter(|e| {
                    e.as_ref()
                        .is_ok_and(|e| e.file_name().to_string_lossy().contains("corrupt"))
                })
                .count();
            assert_eq!(aside, i + 1, "an earlier copy set aside is kept");
            assert!(matches!(
                State::load_or_set_aside(&dir),
                Ok(Record::Missing)
            ));
        }
        let _ = fs::remove_dir_all(&dir);
    }
}
