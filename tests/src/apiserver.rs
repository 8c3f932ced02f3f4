//! A small Kubernetes API endpoint for end-to-end tests of cluster mode: it serves list and
//! watch over plain HTTP for Nodes, Namespaces, Pods (with the `spec.nodeName` field selector)
//! and EgressGateways, with resource versions, watch bookmarks and `410 Gone` for a version it
//! no longer remembers; it accepts status patches and Events and records them. It can be
//! stopped and started again (optionally forgetting its history, as an API server restarted
//! behind a new etcd compaction would).
//!
//! It listens in one of the lab's namespaces: the listening socket is created on a thread that
//! entered that namespace, and sockets keep the namespace they were created in.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc::channel;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

/// The four collections the agent watches, by URL path.
const COLLECTIONS: &[(&str, &str)] = &[
    ("/api/v1/nodes", "Node"),
    ("/api/v1/namespaces", "Namespace"),
    ("/api/v1/pods", "Pod"),
    (
        "/apis/static-egress.io/v1alpha1/egressgateways",
        "EgressGateway",
    ),
];

/// Watches end after this long, as a real API server ends them, so clients re-watch.
const WATCH_TIMEOUT: Duration = Duration::from_secs(20);
const BOOKMARK_EVERY: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Store {
    version: u64,
    /// The oldest version a watch may resume from; older ones get 410 Gone.
    oldest: u64,
    /// kind -> "namespace/name" -> object (with metadata.resourceVersion set).
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    /// (version, event type, object), oldest first.
    history: Vec<(u64, &'static str, Value)>,
    /// Set when the endpoint stops: open watches end.
    generation: u64,
    /// Open connections by id, broken when the endpoint stops.
    connections: BTreeMap<u64, TcpStream>,
    next_connection: u64,
    /// How long status patches and events wait before they are answered: a slow API server.
    write_delay: Duration,
}

struct Shared {
    store: Mutex<Store>,
    changed: Condvar,
}

fn lock(shared: &Shared) -> MutexGuard<'_, Store> {
    // A test thread that panicked while holding the lock leaves consistent data behind.
    shared
        .store
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn key_of(object: &Value) -> String {
    let meta = &object["metadata"];
    format!(
        "{}/{}",
        meta["namespace"].as_str().unwrap_or(""),
        meta["name"].as_str().unwrap_or("")
    )
}

/// A fake API server; dropping it stops it.
pub struct ApiServer {
    shared: Arc<Shared>,
    netns: String,
    addr: SocketAddrV4,
    running: Option<Running>,
}

struct Running {
    listener: TcpListener,
    thread: thread::JoinHandle<()>,
}

impl ApiServer {
    /// Starts listening on `addr` inside network namespace `netns`.
    pub fn start(netns: &str, addr: SocketAddrV4) -> Result<Self> {
        let mut server = Self {
            shared: Arc::new(Shared {
                store: Mutex::new(Store::default()),
                changed: Condvar::new(),
            }),
            netns: netns.to_owned(),
            addr,
            running: None,
        };
        server.listen()?;
        Ok(server)
    }

    pub fn addr(&self) -> SocketAddrV4 {
        self.addr
    }

    fn listen(&mut self) -> Result<()> {
        let (tx, rx) = channel::<Result<TcpListener>>();
        let netns = self.netns.clone();
        let addr = self.addr;
        // The namespace switch happens on a thread of its own that only binds the socket.
        thread::spawn(move || {
            let bound = enter_netns(&netns).and_then(|()| {
                TcpListener::bind(addr)
                    .with_context(|| format!("cannot listen on {addr} in {netns}"))
            });
            let _ = tx.send(bound);
        });
        let listener = rx.recv().context("the binding thread died")??;
        let accept = listener.try_clone()?;
        let shared = Arc::clone(&self.shared);
        let thread = thread::spawn(move || {
            for stream in accept.incoming() {
                let Ok(stream) = stream else { break };
                let Ok(copy) = stream.try_clone() else {
                    continue;
                };
                let id = {
                    let mut store = lock(&shared);
                    store.next_connection += 1;
                    let id = store.next_connection;
                    store.connections.insert(id, copy);
                    id
                };
                let shared = Arc::clone(&shared);
                thread::spawn(move || {
                    let _ = serve(&shared, &stream);
                    // A connection nobody reads any more must not look alive to the client's
                    // pool: close it for good.
                    let _ = stream.shutdown(Shutdown::Both);
                    lock(&shared).connections.remove(&id);
                });
            }
        });
        self.running = Some(Running { listener, thread });
        Ok(())
    }

    /// Stops accepting and ends every open watch, as an API server going down does.
    pub fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            // SAFETY: shutting down a listening socket we own wakes the blocked accept.
            unsafe { libc::shutdown(running.listener.as_raw_fd(), libc::SHUT_RDWR) };
            let _ = running.thread.join();
        }
        let mut store = lock(&self.shared);
        store.generation += 1;
        for connection in std::mem::take(&mut store.connections).into_values() {
            let _ = connection.shutdown(Shutdown::Both);
        }
        drop(store);
        self.shared.changed.notify_all();
    }

    /// Starts again after [`stop`](Self::stop). With `forget_history`, watches resuming from
    /// an older version get `410 Gone` and clients must list again.
    pub fn restart(&mut self, forget_history: bool) -> Result<()> {
        if forget_history {
            let mut store = lock(&self.shared);
            store.version += 1;
            store.oldest = store.version;
            store.history.clear();
        }
        self.listen()
    }

    /// Makes the stored objects equal to `objects` (JSON with apiVersion, kind, metadata),
    /// producing ADDED, MODIFIED and DELETED events for the differences.
    pub fn sync(&self, objects: &[Value]) -> Result<()> {
        let mut wanted: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
        for object in objects {
            let kind = object["kind"]
                .as_str()
                .ok_or_else(|| anyhow!("object without kind: {object}"))?;
            if COLLECTIONS.iter().any(|(_, k)| *k == kind) {
                wanted
                    .entry(kind.to_owned())
                    .or_default()
                    .insert(key_of(object), object.clone());
            }
        }
        let mut store = lock(&self.shared);
        for (_, kind) in COLLECTIONS {
            let want = wanted.remove(*kind).unwrap_or_default();
            let have = store.objects.get(*kind).cloned().unwrap_or_default();
            for (key, old) in &have {
                if !want.contains_key(key) {
                    record(&mut store, kind, key, "DELETED", old.clone());
                }
            }
            for (key, mut new) in want {
                let event = match have.get(&key) {
                    None => "ADDED",
                    Some(old) if without_version(old) == new => continue,
                    Some(_) => "MODIFIED",
                };
                // Keep what the agents wrote in status, as a real server does on spec updates.
                if *kind == "EgressGateway"
                    && let Some(status) = have
                        .get(&key)
                        .map(|o| o["status"].clone())
                        .filter(|s| !s.is_null())
                {
                    new["status"] = status;
                }
                record(&mut store, kind, &key, event, new);
            }
        }
        drop(store);
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Makes every write (status patch, event) wait `delay` before it is answered, as an
    /// overloaded API server would.
    pub fn delay_writes(&self, delay: Duration) {
        lock(&self.shared).write_delay = delay;
    }

    /// Writes a kubeconfig for this endpoint into `dir` and returns its path.
    pub fn kubeconfig(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: http://{}\ncontexts:\n- name: lab\n  context:\n    cluster: lab\n    user: agent\nusers:\n- name: agent\n  user: {{}}\ncurrent-context: lab\n",
            self.addr
        );
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What the test controls of a stored object: all but the version and an agent-written status.
fn without_version(object: &Value) -> Value {
    let mut copy = object.clone();
    if let Some(meta) = copy["metadata"].as_object_mut() {
        meta.remove("resourceVersion");
    }
    if object["kind"] == "EgressGateway"
        && let Some(map) = copy.as_object_mut()
    {
        map.remove("status");
    }
    copy
}

fn record(store: &mut Store, kind: &str, key: &str, event: &'static str, mut object: Value) {
    store.version += 1;
    let version = store.version;
    object["metadata"]["resourceVersion"] = json!(version.to_string());
    let objects = store.objects.entry(kind.to_owned()).or_default();
    if event == "DELETED" {
        objects.remove(key);
    } else {
        objects.insert(key.to_owned(), object.clone());
    }
    store.history.push((version, event, object));
}

fn enter_netns(name: &str) -> Result<()> {
    let path = format!("/run/netns/{name}");
    let ns = File::open(&path).with_context(|| format!("cannot open {path}"))?;
    // SAFETY: `ns` is an open namespace file; setns changes only this thread's namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns into {name}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

struct Request {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    body: Vec<u8>,
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (
        parts.next().unwrap_or_default().to_owned(),
        parts.next().unwrap_or_default(),
    );
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_decode(v)))
        .collect();
    let mut length = 0;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header)?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(Some(Request {
        method,
        path: path.to_owned(),
        query,
        body,
    }))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn serve(shared: &Shared, stream: &TcpStream) -> Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let out = stream.try_clone()?;
    let mut out = out;
    while let Some(request) = read_request(&mut reader)? {
        if request
            .query
            .get("watch")
            .is_some_and(|w| w == "true" || w == "1")
        {
            return watch(shared, &request, out);
        }
        if request.method != "GET" {
            let delay = lock(shared).write_delay;
            thread::sleep(delay);
        }
        let (code, body) = respond(shared, &request);
        let body = body.to_string();
        write!(
            out,
            "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            if code < 300 { "OK" } else { "Error" },
            body.len()
        )?;
        out.flush()?;
    }
    Ok(())
}

fn collection(path: &str) -> Option<&'static str> {
    COLLECTIONS
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, k)| *k)
}

fn matches_selector(object: &Value, query: &BTreeMap<String, String>) -> bool {
    match query
        .get("fieldSelector")
        .and_then(|s| s.strip_prefix("spec.nodeName="))
    {
        Some(node) => object["spec"]["nodeName"].as_str() == Some(node),
        None => true,
    }
}

fn status_error(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn respond(shared: &Shared, request: &Request) -> (u16, Value) {
    if request.method == "GET"
        && let Some(kind) = collection(&request.path)
    {
        let store = lock(shared);
        // Pages as a real API server does: `limit` items, then a `continue` token (here the
        // offset) for the rest.
        let offset: usize = request
            .query
            .get("continue")
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let limit: usize = request
            .query
            .get("limit")
            .and_then(|l| l.parse().ok())
            .unwrap_or(usize::MAX);
        let matching: Vec<&Value> = store
            .objects
            .get(kind)
            .map(|m| {
                m.values()
                    .filter(|o| matches_selector(o, &request.query))
                    .collect()
            })
            .unwrap_or_default();
        let items: Vec<Value> = matching
            .iter()
            .skip(offset)
            .take(limit)
            .map(|o| (*o).clone())
            .collect();
        let mut metadata = json!({"resourceVersion": store.version.to_string()});
        if offset.saturating_add(limit) < matching.len() {
            metadata["continue"] = json!((offset + limit).to_string());
        }
        return (
            200,
            json!({"kind": format!("{kind}List"), "apiVersion": "v1", "metadata": metadata, "items": items}),
        );
    }
    let gateways = "/apis/static-egress.io/v1alpha1/egressgateways/";
    if request.method == "PATCH"
        && let Some(name) = request
            .path
            .strip_prefix(gateways)
            .and_then(|p| p.strip_suffix("/status"))
    {
        let Ok(patch) = serde_json::from_slice::<Value>(&request.body) else {
            return (
                400,
                status_error(400, "BadRequest", "the patch is not JSON"),
            );
        };
        let mut store = lock(shared);
        let key = format!("/{name}");
        let Some(mut object) = store
            .objects
            .get("EgressGateway")
            .and_then(|m| m.get(&key))
            .cloned()
        else {
            return (404, status_error(404, "NotFound", "no such EgressGateway"));
        };
        object["status"] = patch["status"].clone();
        record(
            &mut store,
            "EgressGateway",
            &key,
            "MODIFIED",
            object.clone(),
        );
        let object = store.objects["EgressGateway"][&key].clone();
        drop(store);
        shared.changed.notify_all();
        return (200, object);
    }
    if request.method == "POST" && request.path.ends_with("/events") {
        let Ok(event) = serde_json::from_slice::<Value>(&request.body) else {
            return (
                400,
                status_error(400, "BadRequest", "the event is not JSON"),
            );
        };
        return (201, event);
    }
    (
        404,
        status_error(
            404,
            "NotFound",
            &format!("{} {} is not served here", request.method, request.path),
        ),
    )
}

fn chunk(out: &mut TcpStream, value: &Value) -> std::io::Result<()> {
    let line = format!("{value}\n");
    write!(out, "{:x}\r\n{line}\r\n", line.len())?;
    out.flush()
}

fn watch(shared: &Shared, request: &Request, mut out: TcpStream) -> Result<()> {
    let Some(kind) = collection(&request.path) else {
        let body = status_error(404, "NotFound", "not a watchable collection").to_string();
        write!(
            out,
            "HTTP/1.1 404 Error\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        return Ok(());
    };
    write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )?;
    let mut since: u64 = request
        .query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = request
        .query
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true");
    let mut store = lock(shared);
    let generation = store.generation;
    if since < store.oldest && since != 0 {
        let gone = status_error(410, "Expired", "too old resource version");
        drop(store);
        chunk(&mut out, &json!({"type": "ERROR", "object": gone}))?;
        return finish(out);
    }
    if since == 0 {
        since = store.version;
    }
    let deadline = Instant::now() + WATCH_TIMEOUT;
    let mut last_bookmark = Instant::now();
    loop {
        let pending: Vec<(u64, &'static str, Value)> = store
            .history
            .iter()
            .filter(|(v, _, o)| {
                *v > since && o["kind"] == kind && matches_selector(o, &request.query)
            })
            .cloned()
            .collect();
        let current = store.version;
        drop(store);
        for (version, event, object) in pending {
            chunk(&mut out, &json!({"type": event, "object": object}))?;
            since = version;
        }
        since = since.max(current);
        if bookmarks && last_bookmark.elapsed() >= BOOKMARK_EVERY {
            let bookmark = json!({"kind": kind, "apiVersion": "v1",
                                  "metadata": {"resourceVersion": since.to_string()}});
            chunk(&mut out, &json!({"type": "BOOKMARK", "object": bookmark}))?;
            last_bookmark = Instant::now();
        }
        if Instant::now() >= deadline {
            return finish(out);
        }
        store = lock(shared);
        if store.generation != generation {
            drop(store);
            // The endpoint went down: the connection breaks without a clean end.
            let _ = out.shutdown(Shutdown::Both);
            return Ok(());
        }
        if store.version == since {
            store = shared
                .changed
                .wait_timeout(store, Duration::from_millis(500))
                .map(|(guard, _)| guard)
                .unwrap_or_else(|e| e.into_inner().0);
            if store.generation != generation {
                drop(store);
                let _ = out.shutdown(Shutdown::Both);
                return Ok(());
            }
        }
    }
}

fn finish(mut out: TcpStream) -> Result<()> {
    write!(out, "0\r\n\r\n")?;
    out.flush()?;
    Ok(())
}

/// The lab's usual address for the endpoint: the router, port 6443.
pub fn default_addr(router: Ipv4Addr) -> SocketAddrV4 {
    SocketAddrV4::new(router, 6443)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_handles_field_selectors() {
        assert_eq!(
            percent_decode("spec.nodeName%3Dnode1"),
            "spec.nodeName=node1"
        );
        assert_eq!(percent_decode("plain"), "plain");
    }

    #[test]
    fn only_pods_of_the_selected_node_match() {
        let pod = json!({"spec": {"nodeName": "node1"}});
        let mut query = BTreeMap::new();
        assert!(matches_selector(&pod, &query));
        query.insert("fieldSelector".to_owned(), "spec.nodeName=node2".to_owned());
        assert!(!matches_selector(&pod, &query));
    }
}
