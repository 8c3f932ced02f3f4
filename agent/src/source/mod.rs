//! The agent's inputs: its objects, from a file of Kubernetes objects (read as a stream of
//! documents) watched for changes or from the cluster's API server, what probes between
//! nodes say of the nodes that may hold egress IPs, and the connections their holders hand
//! over.

pub mod cni;
pub mod documents;
mod file;
pub mod flows;
#[cfg(test)]
mod fuzz;
pub mod kube;
pub mod leases;
pub mod objects;
pub mod probes;

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::model::ObjectKey;
use documents::StreamError;

pub use file::{FileSource, FileWatcher, Loaded, watch};

/// Something wrong in the input that did not stop the agent; logged with `tracing::warn!`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The object concerned, when it could be identified.
    pub object: Option<ObjectKey>,
    /// Complete sentence, including the object and what the source did about it.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Failures that leave a source without any usable snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read objects file {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("objects file {} is not UTF-8 text: {source}", path.display())]
    NotText {
        path: PathBuf,
        source: std::str::Utf8Error,
    },
    #[error("objects file {} cannot be parsed: {source}", path.display())]
    Syntax { path: PathBuf, source: StreamError },
    #[error(
        "objects file {} has {size} bytes, more than the {max} the agent reads",
        path.display()
    )]
    TooLarge { path: PathBuf, size: u64, max: u64 },
    #[error("cannot watch objects file {}: {source}", path.display())]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
    #[error(
        "the EgressGateway CustomResourceDefinition is not installed (`static-egress crd | kubectl apply -f -`)"
    )]
    CrdMissing,
    #[error("cannot list EgressGateways from the Kubernetes API: {0}")]
    Cluster(#[source] ::kube::Error),
}

/// FNV-1a, 64 bits: cheap, dependency-free, and easy to recompute in tests and scripts.
pub fn fnv1a_64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_64_known_values() {
        assert_eq!(fnv1a_64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a_64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a_64(b"foobar"), 0x8594_4171_f739_67e8);
    }
}
