//! The objects file: loaded whole, merged with the last good version of each object, and
//! watched so an edit reaches the agent within tens of milliseconds.

use std::ffi::OsString;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, MetadataKind, ModifyKind};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::documents::{Documents, ObjectError, parse_documents};
use super::{Problem, SourceError, fnv1a_64};
use crate::model::{ParsedObject, Snapshot};

/// The largest objects file the agent reads: several times a 100,000-pod cluster's objects.
pub const MAX_FILE_BYTES: u64 = 256 << 20;

/// The file's bytes, refusing a file larger than [`MAX_FILE_BYTES`] without reading it all.
fn read_capped(path: &Path) -> Result<Vec<u8>, SourceError> {
    let read_error = |source| SourceError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let too_large = |size| SourceError::TooLarge {
        path: path.to_owned(),
        size,
        max: MAX_FILE_BYTES,
    };
    let size = file.metadata().map_err(read_error)?.len();
    if size > MAX_FILE_BYTES {
        return Err(too_large(size));
    }
    // Sized to the file: reading into a growing buffer leaves up to as much again unused.
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0).saturating_add(1));
    // One byte more than allowed tells a file at the limit from one beyond it, even if it
    // grows while being read.
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    match bytes.len() as u64 {
        read if read > MAX_FILE_BYTES => Err(too_large(read)),
        _ => Ok(bytes),
    }
}

/// The objects in `bytes`, which are dropped before the caller merges them: on a large file
/// the text is as big as the objects it holds.
fn parse(path: &Path, bytes: Vec<u8>) -> Result<Documents, SourceError> {
    let text = std::str::from_utf8(&bytes).map_err(|source| SourceError::NotText {
        path: path.to_owned(),
        source,
    })?;
    parse_documents(text).map_err(|source| SourceError::Syntax {
        path: path.to_owned(),
        source,
    })
}

/// Result of one (re)load.
#[derive(Clone, Debug, PartialEq)]
pub struct Loaded {
    /// Shared with whoever reports on it, without a copy.
    pub snapshot: Arc<Snapshot>,
    /// What was skipped or kept from before, and why.
    pub problems: Vec<Problem>,
    /// FNV-1a 64 of the bytes this load read, even when they were rejected as a whole (so a
    /// status file shows that a version was seen); unchanged when the file could not be read.
    pub digest: u64,
}

/// Reads the objects file and keeps, per object, the last version that was valid.
#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    /// Handed out as it is (the agent and its reports share it): at 10,000 pods a second copy
    /// costs megabytes.
    last_good: Arc<Snapshot>,
    digest: u64,
}

impl FileSource {
    /// First load: without a readable, parseable file there is nothing to fall back on.
    pub fn open(path: impl Into<PathBuf>) -> Result<(Self, Loaded), SourceError> {
        let path = path.into();
        let bytes = read_capped(&path)?;
        let digest = fnv1a_64(&bytes);
        let documents = parse(&path, bytes)?;
        let mut source = Self {
            path,
            last_good: Arc::default(),
            digest,
        };
        let problems = source.merge(documents.objects, documents.errors);
        let loaded = source.loaded(problems);
        Ok((source, loaded))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reloads after a change. Never fails: whatever cannot be used is reported and the last
    /// good version stays in place (an editor may have the file half-written or renamed away).
    pub fn reload(&mut self) -> Loaded {
        let whole = |message: String| Problem {
            object: None,
            message: format!("{message}; keeping the last good snapshot"),
        };
        let bytes = match read_capped(&self.path) {
            Ok(bytes) => bytes,
            Err(e) => return self.loaded(vec![whole(e.to_string())]),
        };
        self.digest = fnv1a_64(&bytes);
        match parse(&self.path, bytes) {
            Err(e) => self.loaded(vec![whole(e.to_string())]),
            Ok(documents) => {
                let problems = self.merge(documents.objects, documents.errors);
                self.loaded(problems)
            }
        }
    }

    /// Replaces the object set, keeping the previous version of objects now invalid.
    fn merge(&mut self, objects: Vec<ParsedObject>, errors: Vec<ObjectError>) -> Vec<Problem> {
        let mut next: Snapshot = objects.into_iter().collect();
        let mut problems = Vec::with_capacity(errors.len());
        for error in errors {
            let outcome = match &error.object {
                // A valid copy elsewhere in the file wins; the error still deserves a report.
                Some(key) if next.object(key).is_some() => "",
                Some(key) => match self.last_good.object(key) {
                    Some(previous) => {
                        next.insert(previous);
                        "; keeping its last valid version"
                    }
                    None => "; skipped",
                },
                None => "",
            };
            problems.push(Problem {
                object: error.object.clone(),
                message: format!("{}: {error}{outcome}", self.path.display()),
            });
        }
        self.last_good = Arc::new(next);
        problems
    }

    fn loaded(&self, problems: Vec<Problem>) -> Loaded {
        Loaded {
            snapshot: Arc::clone(&self.last_good),
            problems,
            digest: self.digest,
        }
    }
}

/// Keeps the file watched; dropping it stops the notifications.
#[derive(Debug)]
pub struct FileWatcher {
    _watcher: RecommendedWatcher,
}

/// Quiet time that ends a burst of events (truncate + write + close, or write + rename), so
/// the reload does not read a half-written file.
const QUIET: Duration = Duration::from_millis(15);
/// A file rewritten without pause still gets reloaded this often.
const MAX_DELAY: Duration = Duration::from_millis(50);

/// Watches `path` and sends `()` whenever it should be reloaded; signals coalesce while one is
/// pending. The parent directory is watched because editors and `kubectl`-style tools replace
/// the file by renaming another one over it, which a watch on the file itself would miss.
pub fn watch(path: &Path) -> Result<(FileWatcher, mpsc::Receiver<()>), SourceError> {
    let watch_error = |source| SourceError::Watch {
        path: path.to_owned(),
        source,
    };
    let file_name = path
        .file_name()
        .map(OsString::from)
        .ok_or_else(|| watch_error(notify::Error::generic("the path does not name a file")))?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };

    let (raw_tx, raw_rx) = std_mpsc::channel::<()>();
    let (tx, rx) = mpsc::channel(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let relevant = match event {
            Ok(event) => {
                is_change(event.kind) && event.paths.iter().any(|p| names_file(p, &file_name))
            }
            Err(e) => {
                tracing::warn!(error = %e, "objects file watch reported an error; reloading");
                true
            }
        };
        // Fails only once the debouncer has stopped, i.e. nobody listens any more.
        if relevant && raw_tx.send(()).is_err() {
            tracing::debug!("objects file changed but the agent stopped listening");
        }
    })
    .map_err(watch_error)?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .map_err(watch_error)?;
    std::thread::Builder::new()
        .name("objects-watch".to_owned())
        .spawn(move || debounce(&raw_rx, &tx))
        .map_err(|e| watch_error(notify::Error::io(e)))?;
    Ok((FileWatcher { _watcher: watcher }, rx))
}

/// Our own reads show up as open/close events and must not trigger reloads.
fn is_change(kind: EventKind) -> bool {
    match kind {
        EventKind::Access(access) => access == AccessKind::Close(AccessMode::Write),
        EventKind::Modify(ModifyKind::Metadata(MetadataKind::AccessTime)) => false,
        _ => true,
    }
}

/// Kubernetes mounts a ConfigMap key as a symlink through `..data`, which is swapped by a
/// rename on update: that rename is the only event the file's change produces.
fn names_file(path: &Path, file_name: &OsString) -> bool {
    path.file_name()
        .is_some_and(|name| name == file_name.as_os_str() || name == "..data")
}

fn debounce(raw: &std_mpsc::Receiver<()>, tx: &mpsc::Sender<()>) {
    while raw.recv().is_ok() {
        let deadline = Instant::now() + MAX_DELAY;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match raw.recv_timeout(QUIET.min(left)) {
                Ok(()) => {}
                Err(std_mpsc::RecvTimeoutError::Timeout) => break,
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
        if let Err(mpsc::error::TrySendError::Closed(())) = tx.try_send(()) {
            return;
        }
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A fresh directory removed on drop (the crate has no tempfile dependency).
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "static-egress-source-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn file(&self) -> PathBuf {
            self.0.join("objects.yaml")
        }

        /// Writes elsewhere and renames over the file, as editors and `kubectl`-style tools do.
        fn replace(&self, text: &str) {
            let tmp = self.0.join(".objects.yaml.tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, self.file()).unwrap();
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {v: '1'}}\n";
    const GW: &str = "apiVersion: static-egress.io/v1alpha1\nkind: EgressGateway\nmetadata: {name: gw}\nspec: {egressIPs: [192.0.2.1], namespaceSelector: {}}\n";
    const GW_BROKEN: &str = "apiVersion: static-egress.io/v1alpha1\nkind: EgressGateway\nmetadata: {name: gw}\nspec: {egressIPs: [192.0.2.1]}\n";
    const POD_BROKEN: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: new, namespace: shop}\nstatus: {podIP: nope}\n";

    fn messages(loaded: &Loaded) -> Vec<String> {
        loaded.problems.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn missing_file_at_start_is_an_error_naming_the_path() {
        let dir = TempDir::new();
        let err = FileSource::open(dir.file()).unwrap_err();
        assert!(matches!(err, SourceError::Read { .. }), "{err:?}");
        let message = err.to_string();
        assert!(
            message.starts_with(&format!(
                "cannot read objects file {}: ",
                dir.file().display()
            )),
            "{message}"
        );
    }

    #[test]
    fn a_file_too_large_is_refused_at_start_and_kept_out_later() {
        let dir = TempDir::new();
        std::fs::write(dir.file(), NS).unwrap();
        let (mut source, _) = FileSource::open(dir.file()).unwrap();
        // Sparse: the size is what counts, and nothing is read.
        let huge = std::fs::File::options()
            .write(true)
            .open(dir.file())
            .unwrap();
        huge.set_len(MAX_FILE_BYTES + 1).unwrap();
        let loaded = source.reload();
        assert!(loaded.snapshot.namespaces.contains_key("shop"));
        assert_eq!(
            messages(&loaded),
            [format!(
                "objects file {} has {} bytes, more than the {MAX_FILE_BYTES} the agent reads; \
                 keeping the last good snapshot",
                dir.file().display(),
                MAX_FILE_BYTES + 1
            )]
        );
        let err = FileSource::open(dir.file()).unwrap_err();
        assert!(matches!(err, SourceError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn broken_file_at_start_is_an_error() {
        let dir = TempDir::new();
        std::fs::write(dir.file(), "a: [").unwrap();
        let err = FileSource::open(dir.file()).unwrap_err();
        assert!(matches!(err, SourceError::Syntax { .. }), "{err:?}");
        std::fs::write(dir.file(), [0xff, 0xfe]).unwrap();
        let err = FileSource::open(dir.file()).unwrap_err();
        assert!(matches!(err, SourceError::NotText { .. }), "{err:?}");
    }

    #[test]
    fn first_load_skips_invalid_objects() {
        let dir = TempDir::new();
        let text = format!("{NS}---\n{POD_BROKEN}");
        std::fs::write(dir.file(), &text).unwrap();
        let (source, loaded) = FileSource::open(dir.file()).unwrap();
        assert_eq!(source.path(), dir.file());
        assert_eq!(loaded.digest, fnv1a_64(text.as_bytes()));
        assert_eq!(loaded.snapshot.namespaces.len(), 1);
        assert!(loaded.snapshot.pods.is_empty());
        assert_eq!(
            messages(&loaded),
            [format!(
                "{}: document 2: Pod shop/new: status.podIP: \"nope\" is not an IP address; skipped",
                dir.file().display()
            )]
        );
        assert_eq!(
            loaded.problems[0]
                .object
                .as_ref()
                .map(ToString::to_string)
                .as_deref(),
            Some("Pod shop/new")
        );
    }

    #[test]
    fn keeps_the_last_good_version_of_each_object() {
        let dir = TempDir::new();
        std::fs::write(dir.file(), format!("{NS}---\n{GW}")).unwrap();
        let (mut source, first) = FileSource::open(dir.file()).unwrap();
        assert_eq!(first.problems, []);
        let good_gateway = first.snapshot.gateways.get("gw").cloned().unwrap();

        // The gateway turns invalid, the namespace changes, a new invalid pod appears.
        let text = format!(
            "{}---\n{GW_BROKEN}---\n{POD_BROKEN}",
            NS.replace("'1'", "'2'")
        );
        std::fs::write(dir.file(), &text).unwrap();
        let second = source.reload();
        assert_eq!(second.digest, fnv1a_64(text.as_bytes()));
        assert_eq!(second.snapshot.gateways.get("gw"), Some(&good_gateway));
        assert_eq!(
            second.snapshot.namespaces["shop"]
                .labels
                .get("v")
                .map(String::as_str),
            Some("2")
        );
        assert!(second.snapshot.pods.is_empty());
        let path = dir.file().display().to_string();
        assert_eq!(
            messages(&second),
            [
                format!(
                    "{path}: document 2: EgressGateway gw: spec.namespaceSelector: is required (use {{}} to admit every namespace); keeping its last valid version"
                ),
                format!(
                    "{path}: document 3: Pod shop/new: status.podIP: \"nope\" is not an IP address; skipped"
                ),
            ]
        );

        // Still invalid on the next load: the version from two loads ago is still kept.
        assert_eq!(
            source.reload().snapshot.gateways.get("gw"),
            Some(&good_gateway)
        );

        // Removing an object from the file removes it, valid or not.
        std::fs::write(dir.file(), NS).unwrap();
        let third = source.reload();
        assert_eq!(third.problems, []);
        assert!(third.snapshot.gateways.is_empty());

        // Once gone, its old version is forgotten: a broken one is now simply skipped.
        std::fs::write(dir.file(), GW_BROKEN).unwrap();
        let fourth = source.reload();
        assert!(fourth.snapshot.gateways.is_empty());
        assert!(
            fourth.problems[0].message.ends_with("; skipped"),
            "{:?}",
            fourth.problems
        );
    }

    #[test]
    fn broken_or_missing_file_keeps_the_whole_snapshot() {
        let dir = TempDir::new();
        std::fs::write(dir.file(), format!("{NS}---\n{GW}")).unwrap();
        let (mut source, first) = FileSource::open(dir.file()).unwrap();

        std::fs::write(dir.file(), format!("{NS}---\nkind: [")).unwrap();
        let broken = source.reload();
        assert_eq!(broken.snapshot, first.snapshot);
        assert_ne!(broken.digest, first.digest, "the new bytes were read");
        assert_eq!(broken.problems.len(), 1);
        let message = &broken.problems[0].message;
        assert!(
            message.contains("document 2: YAML/JSON syntax error"),
            "{message}"
        );
        assert!(
            message.ends_with("; keeping the last good snapshot"),
            "{message}"
        );

        std::fs::remove_file(dir.file()).unwrap();
        let missing = source.reload();
        assert_eq!(missing.snapshot, first.snapshot);
        assert_eq!(missing.digest, broken.digest);
        assert!(
            missing.problems[0].message.starts_with("cannot read "),
            "{:?}",
            missing.problems
        );

        dir.replace(NS);
        let back = source.reload();
        assert_eq!(back.problems, []);
        assert!(back.snapshot.gateways.is_empty());
        assert_eq!(back.digest, fnv1a_64(NS.as_bytes()));
    }

    async fn next_signal(rx: &mut mpsc::Receiver<()>, within: Duration) -> bool {
        matches!(tokio::time::timeout(within, rx.recv()).await, Ok(Some(())))
    }

    #[tokio::test]
    async fn watcher_signals_after_rename_replace() {
        let dir = TempDir::new();
        std::fs::write(dir.file(), NS).unwrap();
        let (mut source, _) = FileSource::open(dir.file()).unwrap();
        let (_watcher, mut rx) = watch(&dir.file()).unwrap();

        // Changes to other files in the directory are not ours.
        std::fs::write(dir.0.join("unrelated.yaml"), "x: 1").unwrap();
        assert!(!next_signal(&mut rx, Duration::from_millis(150)).await);

        let started = Instant::now();
        dir.replace(GW);
        assert!(
            next_signal(&mut rx, Duration::from_secs(5)).await,
            "no reload signal"
        );
        // About 20 ms is expected; the bound leaves room for a loaded CI machine.
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert!(source.reload().snapshot.gateways.contains_key("gw"));

        // Reading the file (as the reload just did) must not look like a change.
        assert!(!next_signal(&mut rx, Duration::from_millis(150)).await);

        // In-place writes count too, and a burst ends in one signal once quiet.
        std::fs::write(dir.file(), NS).unwrap();
        std::fs::write(dir.file(), GW).unwrap();
        assert!(
            next_signal(&mut rx, Duration::from_secs(5)).await,
            "no reload signal"
        );
        assert!(!next_signal(&mut rx, Duration::from_millis(150)).await);
    }

    #[tokio::test]
    async fn watcher_stops_with_its_guard() {
        let dir = TempDir::new();
        std::fs::write(dir.file(), NS).unwrap();
        let (watcher, mut rx) = watch(&dir.file()).unwrap();
        drop(watcher);
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(5), rx.recv()).await,
            Ok(None)
        );
    }

    #[test]
    fn watch_needs_a_file_name_and_an_existing_directory() {
        assert!(watch(Path::new("/")).is_err());
        let err = watch(Path::new("/nonexistent-static-egress-dir/objects.yaml")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot watch objects file /nonexistent"),
            "{err}"
        );
    }

    /// One document of a generated file: a copy of one of a few objects, valid (with a
    /// version) or not, or something that names no object.
    #[derive(Clone, Debug)]
    enum Doc {
        Object { key: usize, version: Option<u8> },
        Junk(usize),
    }

    /// The objects, by index: each has a valid form per version and an invalid one that still
    /// names it. The version shows as label `v` (the egress IP's last byte for the gateway).
    const KEYS: [&str; 5] = [
        "Namespace a",
        "Namespace b",
        "Pod a/p",
        "Node n1",
        "EgressGateway g",
    ];

    fn document(doc: &Doc) -> String {
        let (key, version) = match doc {
            Doc::Object { key, version } => (key, version),
            Doc::Junk(j) => {
                let junk = [
                    "{apiVersion: v1, kind: Service, metadata: {name: s, namespace: a}}",
                    "42",
                    "{apiVersion: v1, kind: Pod, metadata: {namespace: a}}",
                ];
                return junk[j % junk.len()].to_owned();
            }
        };
        let v = version.map(|v| v.to_string());
        let labels = |v: &Option<String>| match v {
            Some(v) => format!("{{v: '{v}'}}"),
            None => "[not, a, map]".to_owned(),
        };
        match key {
            0 | 1 => format!(
                "{{apiVersion: v1, kind: Namespace, metadata: {{name: {}, labels: {}}}}}",
                ["a", "b"][*key],
                labels(&v)
            ),
            2 => format!(
                "{{apiVersion: v1, kind: Pod, metadata: {{name: p, namespace: a, labels: {}}}, \
                 status: {{phase: Running, podIP: 10.0.0.1}}}}",
                labels(&v)
            ),
            3 => format!(
                "{{apiVersion: v1, kind: Node, metadata: {{name: n1, labels: {{v: '{}'}}}}, \
                 spec: {{podCIDR: {}}}}}",
                v.clone().unwrap_or_default(),
                if v.is_some() {
                    "10.244.0.0/24"
                } else {
                    "10.244.0.1/24"
                }
            ),
            _ => format!(
                "{{apiVersion: static-egress.io/v1alpha1, kind: EgressGateway, \
                 metadata: {{name: g}}, spec: {{egressIPs: [192.0.2.{}]{}}}}}",
                version.map_or(9, |v| v + 1),
                if v.is_some() {
                    ", namespaceSelector: {}"
                } else {
                    ""
                }
            ),
        }
    }

    /// What the snapshot holds, as in [`KEYS`] order: each object's version.
    fn versions(snapshot: &Snapshot) -> BTreeMap<&'static str, String> {
        let label = |labels: &crate::model::Labels| labels.get("v").cloned().unwrap_or_default();
        let mut out = BTreeMap::new();
        for (i, name) in ["a", "b"].into_iter().enumerate() {
            if let Some(ns) = snapshot.namespaces.get(name) {
                out.insert(KEYS[i], label(&ns.labels));
            }
        }
        if let Some(pod) = snapshot.pods.get(&("a".to_owned(), "p".to_owned())) {
            out.insert(KEYS[2], label(&pod.labels));
        }
        if let Some(node) = snapshot.nodes.get("n1") {
            out.insert(KEYS[3], label(&node.labels));
        }
        if let Some(gateway) = snapshot.gateways.get("g") {
            out.insert(KEYS[4], (gateway.egress_ips[0].octets()[3] - 1).to_string());
        }
        out
    }

    fn arb_file() -> impl proptest::strategy::Strategy<Value = (Vec<Doc>, bool, bool)> {
        use proptest::prelude::*;
        let doc = prop_oneof![
            6 => (0..KEYS.len(), proptest::option::weighted(0.7, 0u8..3))
                .prop_map(|(key, version)| Doc::Object { key, version }),
            1 => (0usize..3).prop_map(Doc::Junk),
        ];
        (
            proptest::collection::vec(doc, 0..10),
            proptest::bool::weighted(0.15),
            any::<bool>(),
        )
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(64))]

        /// Over a sequence of reloads, each object is its first copy in the file when that copy
        /// is valid; otherwise its last valid version, if it had one at the previous load; and
        /// absent when the file no longer lists it. A file that does not parse as a whole
        /// changes nothing. Every unusable document is reported once.
        #[test]
        fn reloads_keep_the_last_valid_version_of_each_object(
            files in proptest::collection::vec(arb_file(), 1..6),
        ) {
            let dir = TempDir::new();
            std::fs::write(dir.file(), "").unwrap();
            let (mut source, _) = FileSource::open(dir.file()).unwrap();
            let mut model: BTreeMap<&'static str, String> = BTreeMap::new();
            for (docs, broken, as_list) in files {
                let texts: Vec<String> = docs.iter().map(document).collect();
                let mut text = if as_list {
                    let items: String = texts.iter().map(|t| format!("- {t}\n")).collect();
                    format!("apiVersion: v1\nkind: List\nitems:\n{items}")
                } else {
                    texts.iter().map(|t| format!("---\n{t}\n")).collect()
                };
                if broken {
                    text.push_str("---\nkind: [\n");
                }
                dir.replace(&text);
                let loaded = source.reload();
                proptest::prop_assert_eq!(loaded.digest, fnv1a_64(text.as_bytes()));

                if broken {
                    proptest::prop_assert_eq!(loaded.problems.len(), 1);
                } else {
                    let mut next = BTreeMap::new();
                    let mut decided = std::collections::HashSet::new();
                    for doc in &docs {
                        if let Doc::Object { key, version } = doc
                            && decided.insert(*key)
                        {
                            match (version, model.get(KEYS[*key])) {
                                (Some(v), _) => {
                                    next.insert(KEYS[*key], v.to_string());
                                }
                                (None, Some(previous)) => {
                                    next.insert(KEYS[*key], previous.clone());
                                }
                                (None, None) => {}
                            }
                        }
                    }
                    model = next;
                    // Every document but the first valid copy of each object is reported.
                    let used = docs
                        .iter()
                        .enumerate()
                        .filter(|(i, d)| match d {
                            Doc::Object { key, version: Some(_) } => !docs[..*i]
                                .iter()
                                .any(|e| matches!(e, Doc::Object { key: k, .. } if k == key)),
                            _ => false,
                        })
                        .count();
                    proptest::prop_assert_eq!(loaded.problems.len(), docs.len() - used);
                }
                proptest::prop_assert_eq!(versions(&loaded.snapshot), model.clone(), "{}", text);
            }
        }
    }
}
