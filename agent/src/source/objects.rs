//! Where the agent's objects come from, behind one face: a file watched for changes, or the
//! cluster's watches. The loop asks each for its next complete view.

use std::path::Path;

use super::kube::{ClusterSource, WatchHealth};
use super::{FileSource, FileWatcher, Loaded, SourceError};

pub enum Objects {
    File {
        source: FileSource,
        changes: tokio::sync::mpsc::Receiver<()>,
        _watcher: FileWatcher,
    },
    Cluster(ClusterSource),
}

impl Objects {
    /// The file at `path`, read now (the first view) and watched from now on.
    pub fn file(path: &Path) -> Result<(Self, Loaded), SourceError> {
        let (source, loaded) = FileSource::open(path)?;
        let (watcher, changes) = super::watch(path)?;
        Ok((
            Self::File {
                source,
                changes,
                _watcher: watcher,
            },
            loaded,
        ))
    }

    /// The next view of the objects; `None` when the source has stopped for good.
    pub async fn next(&mut self) -> Option<Loaded> {
        match self {
            Self::File {
                source, changes, ..
            } => {
                changes.recv().await?;
                Some(source.reload())
            }
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
