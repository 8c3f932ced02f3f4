//! The agent's end of the CNI plugin's socket (see [`crate::cni`]): requests come in as
//! [`Call`]s for the loop, which answers each once its data path is applied; the
//! [`Announcements`] are what the plugin said of the pods starting here, until the objects
//! speak for them.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::cni::{Command, Reply, Request, SOCKET};
use crate::model::Snapshot;
use crate::plan::{NodePlan, Starting};

/// A plugin that has not sent its request within this long is cut off.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Longer than any plugin waits (its `timeoutMs`, 2 s by default): a reply after that is lost.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Requests waiting for the loop; more plugins at once wait to be read.
const QUEUE: usize = 64;
/// Pods announced and not yet shown by the objects; more than a node runs.
const MAX_ANNOUNCED: usize = 4096;

/// A request from a plugin, and where its answer goes.
pub struct Call {
    pub request: Request,
    answer: oneshot::Sender<Reply>,
}

impl Call {
    pub fn answer(self, reply: Reply) {
        // The plugin may have given up waiting; the runtime retries then.
        let _ = self.answer.send(reply);
    }
}

/// The calls of the plugins; never yields when the socket could not be opened.
pub struct Calls {
    rx: Option<mpsc::Receiver<Call>>,
}

impl Calls {
    pub async fn next(&mut self) -> Option<Call> {
        match &mut self.rx {
            Some(rx) => rx.recv().await,
            None => std::future::pending().await,
        }
    }
}

/// Listens on `cni.sock` in `state_dir` (only root may connect). A socket that cannot be
/// opened is logged and leaves the agent serving without it: pods then start as they would
/// without the plugin, which says so (or waits, with `unclassified: hold`).
pub fn listen(state_dir: &Path) -> Calls {
    let path = state_dir.join(SOCKET);
    match bind(&path) {
        Ok(listener) => {
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(accept(listener, tx));
            tracing::info!(socket = %path.display(), "listening for the CNI plugin");
            Calls { rx: Some(rx) }
        }
        Err(error) => {
            tracing::warn!(socket = %path.display(), %error,
                "cannot listen for the CNI plugin; pods are programmed once the objects show them");
            Calls { rx: None }
        }
    }
}

fn bind(path: &Path) -> io::Result<UnixListener> {
    // A socket left by an earlier agent: the state dir's lock says none runs now.
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

async fn accept(listener: UnixListener, tx: mpsc::Sender<Call>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve(stream, tx.clone()));
            }
            Err(error) => {
                tracing::warn!(%error, "accepting a CNI plugin's connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve(stream: UnixStream, tx: mpsc::Sender<Call>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(64 * 1024));
    let read = tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line)).await;
    let reply = match read {
        Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
            Ok(request) => {
                let (answer, answered) = oneshot::channel();
                if tx.send(Call { request, answer }).await.is_err() {
                    return;
                }
                match tokio::time::timeout(ANSWER_TIMEOUT, answered).await {
                    Ok(Ok(reply)) => reply,
                    _ => return,
                }
            }
            Err(e) => Reply::Failed {
                error: format!("unreadable request: {e}"),
            },
        },
        _ => return,
    };
    if let Ok(mut out) = serde_json::to_vec(&reply) {
        out.push(b'\n');
        let _ = write.write_all(&out).await;
    }
}

/// Where the announcements are kept across restarts of the agent, in its state directory: an
/// agent restarted between a pod's ADD and the kubelet's report would otherwise forget the
/// pod and let it leave unmarked.
const RECORD: &str = crate::cni::ANNOUNCED;

/// What the plugin said of the pods starting on this node, by (namespace, name).
#[derive(Debug, Default)]
pub struct Announcements {
    pods: BTreeMap<(String, String), (String, Starting)>,
    /// The record's path; `None` in tests.
    record: Option<std::path::PathBuf>,
}

/// One announcement as recorded.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Recorded {
    namespace: String,
    name: String,
    container_id: String,
    ip: std::net::Ipv4Addr,
    hold_unknown: bool,
}

impl Announcements {
    /// The announcements an earlier agent recorded in `state_dir` (none when there is no
    /// readable record).
    pub fn load(state_dir: &Path) -> Self {
        let path = state_dir.join(RECORD);
        let recorded: Vec<Recorded> = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
                tracing::warn!(record = %path.display(), %error, "ignoring an unreadable record");
                Vec::new()
            }),
            Err(_) => Vec::new(),
        };
        let pods = recorded
            .into_iter()
            .map(|r| {
                let starting = Starting {
                    ip: r.ip,
                    hold_unknown: r.hold_unknown,
                };
                ((r.namespace, r.name), (r.container_id, starting))
            })
            .collect();
        Self {
            pods,
            record: Some(path),
        }
    }

    fn save(&self) {
        let Some(path) = &self.record else {
            return;
        };
        let recorded: Vec<Recorded> = self
            .pods
            .iter()
            .map(|((namespace, name), (container_id, starting))| Recorded {
                namespace: namespace.clone(),
                name: name.clone(),
                container_id: container_id.clone(),
                ip: starting.ip,
                hold_unknown: starting.hold_unknown,
            })
            .collect();
        let written = serde_json::to_vec(&recorded)
            .map_err(io::Error::other)
            .and_then(|bytes| crate::fsutil::write_atomically(path, |w| w.write_all(&bytes)));
        if let Err(error) = written {
            tracing::warn!(record = %path.display(), %error, "cannot record the pods starting here");
        }
    }

    /// Takes in a request; whether the plan may change.
    pub fn take(&mut self, request: &Request) -> bool {
        let changed = self.change(request);
        if changed {
            self.save();
        }
        changed
    }

    fn change(&mut self, request: &Request) -> bool {
        let key = (request.namespace.clone(), request.name.clone());
        match (request.command, request.ip) {
            (Command::Add, Some(ip)) => {
                if self.pods.len() >= MAX_ANNOUNCED && !self.pods.contains_key(&key) {
                    return false;
                }
                let starting = Starting {
                    ip,
                    hold_unknown: request.hold_unknown,
                };
                // The runtime's IPAM gave the address to this pod: whoever had it is gone.
                self.pods.retain(|k, (_, s)| *k == key || s.ip != ip);
                let new = (request.container_id.clone(), starting);
                self.pods.insert(key, new.clone()) != Some(new)
            }
            (Command::Add, None) => false,
            (Command::Del, _) => {
                let ours = self
                    .pods
                    .get(&key)
                    .is_some_and(|(container, _)| *container == request.container_id);
                ours && self.pods.remove(&key).is_some()
            }
        }
    }

    /// The pods announced and not yet shown by `snapshot`, for the planner; announcements the
    /// objects now speak for are forgotten first.
    pub fn starting(&mut self, snapshot: &Snapshot) -> BTreeMap<(String, String), Starting> {
        self.forget_known(snapshot);
        self.pods
            .iter()
            .map(|(key, (_, starting))| (key.clone(), *starting))
            .collect()
    }

    /// Forgets the pods the objects now show running with an address (they speak for them),
    /// and those whose address the objects show another pod running with (they are gone).
    fn forget_known(&mut self, snapshot: &Snapshot) {
        if self.pods.is_empty() {
            return;
        }
        let before = self.pods.len();
        let running: BTreeMap<_, _> = snapshot
            .pods
            .iter()
            .filter(|(_, p)| p.running)
            .filter_map(|(key, p)| Some((p.ip?, key)))
            .collect();
        self.pods.retain(|key, (_, starting)| {
            let shown = snapshot
                .pods
                .get(key)
                .is_some_and(|p| p.running && p.ip.is_some());
            let taken = running.get(&starting.ip).is_some_and(|k| *k != key);
            !shown && !taken
        });
        if self.pods.len() != before {
            self.save();
        }
    }

    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }
}

/// The answer to `request` after `applied` was applied (`None`: nothing was, and `failure`
/// says why).
pub fn verdict(request: &Request, applied: Option<&NodePlan>, failure: Option<&str>) -> Reply {
    if request.command == Command::Del {
        return Reply::Forgotten;
    }
    let Some(plan) = applied.filter(|_| failure.is_none()) else {
        return Reply::Failed {
            error: failure
                .unwrap_or("the agent has not programmed this node yet")
                .to_owned(),
        };
    };
    let same = |namespace: &str, name: &str| namespace == request.namespace && name == request.name;
    if let Some(pod) = plan.pods.iter().find(|p| same(&p.namespace, &p.name)) {
        return Reply::Selected {
            gateway: pod.gateway.clone(),
            egress_ip: pod.egress_ip,
        };
    }
    if let Some(pod) = plan.held.iter().find(|p| same(&p.namespace, &p.name)) {
        return Reply::Held {
            why: pod.why.to_string(),
        };
    }
    Reply::NotSelected
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::model::PodInfo;

    fn request(command: Command, name: &str, container: &str, ip: [u8; 4]) -> Request {
        Request {
            command,
            namespace: "shop".into(),
            name: name.into(),
            container_id: container.into(),
            ip: Some(Ipv4Addr::from(ip)),
            hold_unknown: true,
        }
    }

    #[test]
    fn a_del_of_an_earlier_sandbox_leaves_the_newer_one_be() {
        let mut announced = Announcements::default();
        assert!(announced.take(&request(Command::Add, "a", "c1", [10, 0, 0, 5])));
        assert!(!announced.take(&request(Command::Add, "a", "c1", [10, 0, 0, 5])));
        assert!(announced.take(&request(Command::Add, "a", "c2", [10, 0, 0, 6])));
        assert!(!announced.take(&request(Command::Del, "a", "c1", [0; 4])));
        assert_eq!(announced.len(), 1);
        assert!(announced.take(&request(Command::Del, "a", "c2", [0; 4])));
        assert!(announced.is_empty());
    }

    #[test]
    fn announcements_end_when_the_objects_speak_for_the_pod_or_its_address_moves_on() {
        let mut announced = Announcements::default();
        announced.take(&request(Command::Add, "a", "c1", [10, 0, 0, 5]));
        announced.take(&request(Command::Add, "b", "c2", [10, 0, 0, 6]));
        // The address of a pod that went away without a DEL goes to the next one.
        announced.take(&request(Command::Add, "c", "c3", [10, 0, 0, 6]));
        assert_eq!(announced.len(), 2);
        let pod = |name: &str, ip: [u8; 4]| PodInfo {
            namespace: "shop".into(),
            name: name.into(),
            ip: Some(Ipv4Addr::from(ip)),
            running: true,
            ..PodInfo::default()
        };
        let mut snapshot = Snapshot::default();
        for p in [pod("a", [10, 0, 0, 5]), pod("d", [10, 0, 0, 6])] {
            snapshot
                .pods
                .insert((p.namespace.clone(), p.name.clone()), p);
        }
        announced.forget_known(&snapshot);
        assert!(announced.is_empty(), "{announced:?}");
    }

    #[test]
    fn a_restarted_agent_still_knows_the_pods_announced_before() {
        let dir = std::env::temp_dir().join(format!("se-cni-record-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut announced = Announcements::load(&dir);
        announced.take(&request(Command::Add, "a", "c1", [10, 0, 0, 5]));
        let again = Announcements::load(&dir);
        assert_eq!(again.pods, announced.pods);
        assert_eq!(again.len(), 1);
        std::fs::write(dir.join(RECORD), "not json").expect("write");
        assert!(
            Announcements::load(&dir).is_empty(),
            "an unreadable record is ignored"
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn the_plugin_hears_what_was_applied() {
        let add = request(Command::Add, "a", "c1", [10, 0, 0, 5]);
        let failed = verdict(&add, None, Some("the last apply failed: x"));
        assert_eq!(
            failed,
            Reply::Failed {
                error: "the last apply failed: x".into()
            }
        );
        assert_eq!(
            verdict(&add, Some(&NodePlan::default()), None),
            Reply::NotSelected
        );
        let del = request(Command::Del, "a", "c1", [0; 4]);
        assert_eq!(verdict(&del, None, None), Reply::Forgotten);
    }
}
