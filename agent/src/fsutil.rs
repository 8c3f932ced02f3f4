//! Files the agent keeps in its state directory, written so that a crash or a power loss leaves
//! either the old or the new content, never a mix or nothing, and a lock that says which agent
//! owns the directory.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Seek as _, Write as _};
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

/// Replaces `path` with what `write` produces: written to `<path>.tmp` (buffered, so a large
/// document can be serialized straight into it instead of into memory first), flushed to disk,
/// renamed over `path`, then the directory flushed so the rename itself is durable. Readers
/// see the old file or the new one, whole; after a crash the file is the old or the new one,
/// never empty or half written.
pub fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut dyn io::Write) -> io::Result<()>,
) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let mut tmp_name = name.to_owned();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    let mut buffered = io::BufWriter::new(file);
    write(&mut buffered)?;
    let file = buffered
        .into_inner()
        .map_err(io::IntoInnerError::into_error)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, path)?;
    sync_dir(path.parent().filter(|p| !p.as_os_str().is_empty()))
}

/// Flushes a directory's entries (a rename or an unlink in it) to disk.
fn sync_dir(dir: Option<&Path>) -> io::Result<()> {
    File::open(dir.unwrap_or(Path::new(".")))?.sync_all()
}

/// The name of the lock file in a state directory.
pub const LOCK_FILE: &str = "agent.lock";

/// An exclusive lock on a state directory (`flock` on `<dir>/agent.lock`), held while this
/// value lives. The kernel releases it when the process dies, however it dies (SIGKILL and
/// OOM kills included), so a stale lock file never blocks the next agent.
#[derive(Debug)]
pub struct DirLock {
    file: File,
    path: PathBuf,
}

/// Why a state directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock; `pid` is the one it wrote in the lock file (as that
    /// process sees itself: a container has its own numbering), when it could be read.
    #[error(
        "{}: another static-egress process{} is using this state dir; stop it first (one \
         agent or cleanup at a time per node and state dir)",
        path.display(),
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Held { path: PathBuf, pid: Option<u32> },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl DirLock {
    /// Takes the lock on `dir` (created if missing) without waiting, and writes this process'
    /// pid into the lock file for whoever finds it taken.
    pub fn acquire(dir: &Path) -> Result<Self, LockError> {
        let path = dir.join(LOCK_FILE);
        let io_err = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(dir).map_err(io_err)?;
        loop {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(io_err)?;
            // SAFETY: flock on a file descriptor we own; no memory is involved.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let error = io::Error::last_os_error();
                if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    return Err(LockError::Held {
                        pid: read_pid(&mut file),
                        path,
                    });
                }
                return Err(io_err(error));
            }
            // The holder that removes the file (`cleanup`) does so while it holds the lock:
            // a lock taken on a file that is no longer at `path` locks nothing; try again.
            let same = match (file.metadata(), fs::metadata(&path)) {
                (Ok(held), Ok(named)) => held.dev() == named.dev() && held.ino() == named.ino(),
                _ => false,
            };
            if !same {
                continue;
            }
            let pid = format!("{}\n", std::process::id());
            file.set_len(0)
                .and_then(|()| file.rewind())
                .and_then(|()| file.write_all(pid.as_bytes()))
                .map_err(io_err)?;
            return Ok(Self { file, path });
        }
    }

    /// Removes the lock file, then releases the lock: nothing of ours stays in the directory.
    pub fn remove(self) -> io::Result<()> {
        match fs::remove_file(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        drop(self.file);
        Ok(())
    }
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system's temporary directory, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "static-egress-fsutil-{name}-{}",
                std::process::id()
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).expect("create a temporary directory");
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn write_atomically_replaces_the_file_and_leaves_no_temporary() {
        let dir = TempDir::new("write");
        let path = dir.0.join("state.json");
        write_atomically(&path, |w| w.write_all(b"first")).expect("write");
        write_atomically(&path, |w| w.write_all(b"second, longer")).expect("rewrite");
        assert_eq!(fs::read(&path).expect("read"), b"second, longer");
        let names: Vec<_> = fs::read_dir(&dir.0)
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["state.json"]);
    }

    #[test]
    fn a_second_lock_on_the_same_dir_is_refused_and_names_the_holder() {
        let dir = TempDir::new("lock");
        let first = DirLock::acquire(&dir.0).expect("first lock");
        // flock locks belong to the open file, so a second open in this process conflicts
        // exactly as a second agent would.
        match DirLock::acquire(&dir.0) {
            Err(LockError::Held { pid, path }) => {
                assert_eq!(pid, Some(std::process::id()));
                assert_eq!(path, dir.0.join(LOCK_FILE));
            }
            other => panic!("expected the lock to be held, got {other:?}"),
        }
        let message = DirLock::acquire(&dir.0).expect_err("held").to_string();
        assert!(
            message.contains(&format!("(pid {})", std::process::id())) && !message.contains('\n'),
            "{message}"
        );
        drop(first);
        let again = DirLock::acquire(&dir.0).expect("free once the holder is gone");
        again.remove().expect("remove");
        assert!(!dir.0.join(LOCK_FILE).exists());
        DirLock::acquire(&dir.0).expect("a removed lock file is created again");
    }
}
