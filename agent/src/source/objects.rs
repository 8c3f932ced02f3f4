//! Where the agent's objects come from, behind one face: a file watched for changes, or the
//! cluster's watches. The loop asks each for its next complete view.

use std::path::Path;

use super::kube::{ClusterSource, WatchHealth};
use super::{FileSource, FileWatcher, Loaded, SourceError};

pub enum Objects {
    File {
        /// Each reload, as the file's own thread made it.
        loads: tokio::sync::mpsc::Receiver<Loaded>,
        _watcher: FileWatcher,
    },
    Cluster(ClusterSource),
}

impl Objects {
    /// The file at `path`, read now (the first view) and watched from now on. Reloads run on a
    /// thread of their own: parsing 100,000 pods takes seconds, during which the agent's loop
    /// must go on renewing the lease (a loop that stopped for longer than it had the kernel
    /// fence the node) and following the probes.
    pub fn file(path: &Path) -> Result<(Self, Loaded), SourceError> {
        let (mut source, loaded) = FileSource::open(path)?;
        let (watcher, mut changes) = super::watch(path)?;
        // One reload waits to be taken while changes coalesce behind it.
        let (tx, loads) = tokio::sync::mpsc::channel(1);
        std::thread::Builder::new()
            .name("objects-file".to_owned())
            .spawn(move || {
                while changes.blocking_recv().is_some() {
                    if tx.blocking_send(source.reload()).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| SourceError::Watch {
                path: path.to_owned(),
                source: notify::Error::io(e),
            })?;
        Ok((
            Self::File {
                loads,
                _watcher: watcher,
            },
            loaded,
        ))
    }

    /// The next view of the objects; `None` when the source has stopped for good.
    pub async fn next(&mut self) -> Option<Loaded> {
        match self {
            Self::File { loads, .. } => loads.recv().await,
            Self::Cluster(cluster) => cluster.updates.recv().await,
        }
    }

    /// How the cluster's watches fare; `None` for a file.
    pub fn watch_health(&self) -> Option<WatchHealth> {
        match self {
            Self::File { .. } => None,
            Self::Cluster(cluster) => Some(cluster.health.borrow().clone()),
        }
    }
}
