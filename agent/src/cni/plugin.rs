//! `static-egress-cni`, chained after the plugin that wires the pod (`bridge`, `ptp`, a CNI's
//! own), as the container runtime runs it: the command in `CNI_COMMAND`, the pod in
//! `CNI_ARGS` (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`), the network config with the previous
//! plugin's result (`prevResult`) on stdin. It passes that result on unchanged.
//!
//! Config keys besides `type`: `socket` (the agent's, default
//! `/var/lib/static-egress/cni.sock`), `unclassified` (`hold`, the default, or `allow`) and
//! `timeoutMs` (how long to wait for the agent, default 2000). With `hold`, a pod the agent
//! does not know yet is held (its traffic to outside the cluster dropped) until it does, and
//! when the agent does not answer at all the ADD fails, so that the runtime tries again later:
//! the pod does not start without its egress policy. With `allow`, both start it anyway, as if
//! the plugin were not there.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use super::{Command, Reply, Request, Unclassified};

const DEFAULT_SOCKET: &str = "/var/lib/static-egress/cni.sock";
const DEFAULT_TIMEOUT_MS: u64 = 2000;
/// Versions of the CNI spec whose results this plugin passes on (their `ips` look alike).
const SUPPORTED: [&str; 6] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0", "1.2.0"];

/// Error codes of the CNI spec.
const INVALID_ENVIRONMENT: u32 = 4;
const DECODE: u32 = 6;
const INVALID_CONFIG: u32 = 7;
const TRY_AGAIN_LATER: u32 = 11;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetConf {
    #[serde(default)]
    cni_version: String,
    #[serde(default)]
    socket: Option<PathBuf>,
    #[serde(default)]
    unclassified: Unclassified,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    prev_result: Option<Value>,
}

/// A failure as the spec has plugins report it: JSON on stdout and a non-zero exit.
#[derive(Debug, PartialEq, Eq)]
pub struct PluginError {
    code: u32,
    msg: String,
    details: String,
}

impl PluginError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }
}

/// The environment variables of one invocation that the plugin reads.
#[derive(Debug, Default)]
pub struct Invocation {
    pub command: String,
    pub container_id: String,
    pub args: String,
}

impl Invocation {
    fn from_env() -> Self {
        let var = |name| std::env::var(name).unwrap_or_default();
        Self {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            args: var("CNI_ARGS"),
        }
    }

    /// `K8S_POD_NAMESPACE` and `K8S_POD_NAME` from `CNI_ARGS` (`K=V;K=V`), as kubelet's
    /// runtimes set them; `None` for a sandbox that is not a Kubernetes pod.
    fn pod(&self) -> Option<(String, String)> {
        let value = |key: &str| {
            self.args
                .split(';')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.to_owned())
                .filter(|v| !v.is_empty())
        };
        Some((value("K8S_POD_NAMESPACE")?, value("K8S_POD_NAME")?))
    }
}

/// The plugin's `main`: reads the invocation, prints the result or the error, returns the exit
/// code.
pub fn main() -> i32 {
    let mut stdin = Vec::new();
    let outcome = std::io::stdin()
        .read_to_end(&mut stdin)
        .map_err(|e| PluginError::new(DECODE, "cannot read the network config", e.to_string()))
        .and_then(|_| run(&Invocation::from_env(), &stdin, ask_agent));
    let version = serde_json::from_slice::<Value>(&stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| "1.0.0".to_owned());
    let mut stdout = std::io::stdout().lock();
    match outcome {
        Ok(Some(out)) => {
            let _ = writeln!(stdout, "{out}");
            0
        }
        Ok(None) => 0,
        Err(e) => {
            let error = json!({
                "cniVersion": version,
                "code": e.code,
                "msg": e.msg,
                "details": e.details,
            });
            let _ = writeln!(stdout, "{error}");
            1
        }
    }
}

/// One invocation: what to print on stdout, if anything. `ask` sends a request to the agent
/// at a socket path and waits for its reply.
pub fn run(
    invocation: &Invocation,
    stdin: &[u8],
    ask: impl FnOnce(&Path, &Request, Duration) -> std::io::Result<Reply>,
) -> Result<Option<Value>, PluginError> {
    let conf: NetConf = serde_json::from_slice(stdin)
        .map_err(|e| PluginError::new(DECODE, "cannot decode the network config", e.to_string()))?;
    let socket = conf
        .socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    let timeout = Duration::from_millis(conf.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS));
    match invocation.command.as_str() {
        "VERSION" => Ok(Some(json!({
            "cniVersion": if conf.cni_version.is_empty() { "1.0.0" } else { &conf.cni_version },
            "supportedVersions": SUPPORTED,
        }))),
        "ADD" => add(invocation, &conf, &socket, timeout, ask),
        "DEL" => {
            // Best effort: a DEL must succeed even when the agent is away; the agent forgets
            // an announcement once the objects show the pod, or when it restarts.
            if let Some((namespace, name)) = invocation.pod() {
                let request = Request {
                    command: Command::Del,
                    namespace,
                    name,
                    container_id: invocation.container_id.clone(),
                    ip: None,
                    hold_unknown: false,
                };
                if let Err(e) = ask(&socket, &request, timeout) {
                    eprintln!("static-egress-cni: DEL not delivered to the agent: {e}");
                }
            }
            Ok(None)
        }
        // CHECK, STATUS, GC: nothing of ours to verify or collect.
        "CHECK" | "STATUS" | "GC" => Ok(None),
        other => Err(PluginError::new(
            INVALID_ENVIRONMENT,
            format!("unknown CNI_COMMAND {other:?}"),
            "",
        )),
    }
}

fn add(
    invocation: &Invocation,
    conf: &NetConf,
    socket: &Path,
    timeout: Duration,
    ask: impl FnOnce(&Path, &Request, Duration) -> std::io::Result<Reply>,
) -> Result<Option<Value>, PluginError> {
    let Some(mut result) = conf.prev_result.clone() else {
        return Err(PluginError::new(
            INVALID_CONFIG,
            "static-egress-cni must be chained after the plugin that gives the pod its address",
            "the network config has no prevResult",
        ));
    };
    if let Some(object) = result.as_object_mut() {
        object.insert("cniVersion".into(), json!(conf.cni_version));
    }
    let (Some((namespace, name)), Some(ip)) = (invocation.pod(), first_ipv4(&result)) else {
        // Not a Kubernetes pod, or no IPv4 address: nothing static-egress could select.
        return Ok(Some(result));
    };
    let request = Request {
        command: Command::Add,
        namespace,
        name,
        container_id: invocation.container_id.clone(),
        ip: Some(ip),
        hold_unknown: conf.unclassified == Unclassified::Hold,
    };
    let failure = match ask(socket, &request, timeout) {
        Ok(Reply::Failed { error }) => error,
        Ok(_) => return Ok(Some(result)),
        Err(e) => format!("no answer from the agent at {}: {e}", socket.display()),
    };
    let pod = format!("{}/{}", request.namespace, request.name);
    match conf.unclassified {
        Unclassified::Hold => Err(PluginError::new(
            TRY_AGAIN_LATER,
            format!("static-egress could not program pod {pod} ({ip}) before it starts"),
            format!("{failure}; the pod waits for the agent (unclassified: hold)"),
        )),
        Unclassified::Allow => {
            eprintln!(
                "static-egress-cni: pod {pod} starts unclassified (unclassified: allow): {failure}"
            );
            Ok(Some(result))
        }
    }
}

/// The first IPv4 address of a result's `ips` (`"10.244.1.5/24"`).
fn first_ipv4(result: &Value) -> Option<Ipv4Addr> {
    result
        .get("ips")?
        .as_array()?
        .iter()
        .filter_map(|ip| ip.get("address")?.as_str())
        .filter_map(|a| a.split('/').next()?.parse::<Ipv4Addr>().ok())
        .next()
}

/// Sends `request` to the agent's socket and reads its one-line reply, within `timeout` in all.
pub fn ask_agent(socket: &Path, request: &Request, timeout: Duration) -> std::io::Result<Reply> {
    let deadline = std::time::Instant::now() + timeout;
    let left = || {
        deadline
            .checked_duration_since(std::time::Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"))
    };
    let mut stream = UnixStream::connect(socket)?;
    stream.set_write_timeout(Some(left()?))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    stream.set_read_timeout(Some(left()?))?;
    let mut reply = String::new();
    BufReader::new(stream.take(64 * 1024)).read_line(&mut reply)?;
    serde_json::from_str(&reply).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unreadable reply {reply:?}: {e}"),
        )
    })
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    fn invocation(command: &str) -> Invocation {
        Invocation {
            command: command.into(),
            container_id: "c1".into(),
            args: "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=api-1;K8S_POD_UID=u".into(),
        }
    }

    fn conf(extra: Value) -> Vec<u8> {
        let mut conf = json!({
            "cniVersion": "1.0.0",
            "name": "k8s",
            "type": "static-egress-cni",
            "socket": "/run/x.sock",
            "prevResult": {
                "cniVersion": "1.0.0",
                "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/p"}],
                "ips": [
                    {"address": "fd00::5/64"},
                    {"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 0}
                ]
            }
        });
        for (k, v) in extra.as_object().unwrap() {
            conf[k] = v.clone();
        }
        serde_json::to_vec(&conf).unwrap()
    }

    #[test]
    fn add_announces_the_pod_and_passes_the_previous_result_on() {
        let mut asked = None;
        let out = run(
            &invocation("ADD"),
            &conf(json!({})),
            |socket, request, _| {
                asked = Some((socket.to_owned(), request.clone()));
                Ok(Reply::NotSelected)
            },
        )
        .unwrap()
        .unwrap();
        let (socket, request) = asked.unwrap();
        assert_eq!(socket, PathBuf::from("/run/x.sock"));
        assert_eq!(request.ip, Some(Ipv4Addr::new(10, 244, 1, 5)));
        assert_eq!(
            (request.namespace.as_str(), request.name.as_str()),
            ("shop", "api-1")
        );
        assert!(request.hold_unknown);
        assert_eq!(out["ips"][1]["address"], "10.244.1.5/24");
        assert_eq!(out["cniVersion"], "1.0.0");
    }

    #[test]
    fn without_an_answer_hold_fails_the_add_and_allow_starts_the_pod() {
        let refused = |_: &Path, _: &Request, _| -> std::io::Result<Reply> {
            Err(std::io::ErrorKind::ConnectionRefused.into())
        };
        let error = run(&invocation("ADD"), &conf(json!({})), refused).unwrap_err();
        assert_eq!(error.code, TRY_AGAIN_LATER);
        assert!(error.msg.contains("shop/api-1"), "{}", error.msg);
        let failed = |_: &Path, _: &Request, _| {
            Ok(Reply::Failed {
                error: "starting".into(),
            })
        };
        assert!(run(&invocation("ADD"), &conf(json!({})), failed).is_err());
        let allowed = run(
            &invocation("ADD"),
            &conf(json!({"unclassified": "allow"})),
            refused,
        );
        assert!(allowed.unwrap().is_some());
    }

    #[test]
    fn sandboxes_that_are_not_pods_and_del_without_an_agent_succeed() {
        let never =
            |_: &Path, _: &Request, _| -> std::io::Result<Reply> { panic!("nothing to ask") };
        let plain = Invocation {
            command: "ADD".into(),
            ..Invocation::default()
        };
        assert!(run(&plain, &conf(json!({})), never).unwrap().is_some());
        let gone = |_: &Path, _: &Request, _| -> std::io::Result<Reply> {
            Err(std::io::ErrorKind::NotFound.into())
        };
        assert_eq!(run(&invocation("DEL"), &conf(json!({})), gone), Ok(None));
        let error = run(
            &invocation("ADD"),
            &conf(json!({"prevResult": null})),
            never,
        );
        assert_eq!(error.unwrap_err().code, INVALID_CONFIG);
    }
}
