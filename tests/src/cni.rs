//! The runtime's half of CNI, enough to run a network configuration list the way containerd
//! and CRI-O do through libcni.
//!
//! A node of a real cluster never calls its CNI plugins itself: the container runtime does, one
//! process per plugin, with the sandbox described in environment variables and the network
//! configuration on stdin. A plugin chained after `bridge` or `ptp` (static-egress-cni, say)
//! only meets the conditions it will meet in production if the lab calls it in exactly that
//! way, so this module copies what libcni does and nothing more: no result caching on disk, no
//! CHECK, no capabilities (`runtimeConfig`), since no plugin the lab runs asks for them.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Map, Value};

/// What the lab's conflists declare: the newest version Debian's plugins (1.1.1) speak, so a
/// chained plugin sees results in today's shape.
pub const CNI_VERSION: &str = "1.0.0";

/// The interface name kubelet asks every plugin to give the pod.
pub const POD_IFNAME: &str = "eth0";

/// Where `ip netns add` puts namespaces, spelled as runtimes pass it in `CNI_NETNS`.
const NETNS_PATH: &str = "/var/run/netns";

/// PATH for the plugins when the caller has none: they run `iptables` and friends.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// One pod sandbox as the runtime knows it when it calls the plugins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sandbox {
    /// The sandbox (pause) container's id: new for every sandbox, also of the same pod.
    pub container_id: String,
    /// The sandbox's network namespace, by its name under `/var/run/netns`.
    pub netns: String,
    pub pod_namespace: String,
    pub pod_name: String,
    pub pod_uid: String,
}

impl Sandbox {
    pub fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_PATH).join(&self.netns)
    }

    /// `CNI_ARGS` with the pod keys CRI runtimes pass, and `IgnoreUnknown` so that plugins
    /// which know none of them do not refuse them.
    pub fn cni_args(&self) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};\
             K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            self.pod_namespace, self.pod_name, self.container_id, self.pod_uid
        )
    }
}

/// A sandbox attached by a successful ADD. DEL needs the final result again, as libcni passes
/// it from its cache as `prevResult`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub sandbox: Sandbox,
    pub result: Value,
}

/// Where plugins run: the namespace that plays the pod's host, and the directories searched for
/// a plugin by its `type` (`CNI_PATH`).
#[derive(Clone, Copy, Debug)]
pub struct Host<'a> {
    pub netns: &'a str,
    pub cni_path: &'a [PathBuf],
}

/// Runs ADD for every plugin of `conflist` in order, each given the previous one's result as
/// `prevResult`; returns the last result. Stops at the first failure, which the caller cleans up
/// with [`del`] as a runtime does.
pub fn add(host: Host<'_>, conflist: &Value, sandbox: &Sandbox) -> Result<Value> {
    let list = List::parse(conflist)?;
    let mut previous: Option<Value> = None;
    for plugin in list.plugins {
        let config = list.config(plugin, previous.take())?;
        let stdout = invoke(host, "ADD", &config, sandbox)?;
        let result = serde_json::from_slice(&stdout).with_context(|| {
            format!(
                "plugin {} printed no JSON result for ADD: {:?}",
                plugin_type(&config),
                String::from_utf8_lossy(&stdout)
            )
        })?;
        previous = Some(result);
    }
    previous.ok_or_else(|| anyhow!("conflist {} has no plugins", list.name))
}

/// Runs DEL for every plugin of `conflist` in reverse order, each given `cached` (the final
/// result of the sandbox's ADD, if there was one) as `prevResult`. Stops at the first failure as
/// libcni does, leaving the rest to a retry.
pub fn del(
    host: Host<'_>,
    conflist: &Value,
    sandbox: &Sandbox,
    cached: Option<&Value>,
) -> Result<()> {
    let list = List::parse(conflist)?;
    for plugin in list.plugins.iter().rev() {
        let config = list.config(plugin, cached.cloned())?;
        invoke(host, "DEL", &config, sandbox)?;
    }
    Ok(())
}

/// The parts of a conflist a runtime reads.
struct List<'a> {
    version: &'a str,
    name: &'a str,
    plugins: &'a [Value],
}

impl<'a> List<'a> {
    fn parse(conflist: &'a Value) -> Result<Self> {
        let text = |key: &str| {
            conflist
                .get(key)
                .and_then(Value::as_str)
                .ok_or_else(|| anyhow!("conflist has no string {key:?}: {conflist}"))
        };
        let plugins = conflist
            .get("plugins")
            .and_then(Value::as_array)
            .ok_or_else(|| anyhow!("conflist has no \"plugins\" list: {conflist}"))?;
        Ok(Self {
            version: text("cniVersion")?,
            name: text("name")?,
            plugins,
        })
    }

    /// A plugin's network configuration: its own object plus the list's name and version, which
    /// a plugin of a list never repeats itself.
    fn config(&self, plugin: &Value, previous: Option<Value>) -> Result<Value> {
        let mut config: Map<String, Value> = match plugin.as_object() {
            Some(object) if object.get("type").is_some_and(Value::is_string) => object.clone(),
            _ => bail!(
                "conflist {}: a plugin without a \"type\": {plugin}",
                self.name
            ),
        };
        config.insert("name".into(), self.name.into());
        config.insert("cniVersion".into(), self.version.into());
        if let Some(previous) = previous {
            config.insert("prevResult".into(), previous);
        }
        Ok(Value::Object(config))
    }
}

fn plugin_type(config: &Value) -> &str {
    config.get("type").and_then(Value::as_str).unwrap_or("?")
}

/// The first `CNI_PATH` directory holding a file named after the plugin's type, as libcni
/// looks plugins up.
fn find_plugin(cni_path: &[PathBuf], kind: &str) -> Result<PathBuf> {
    cni_path
        .iter()
        .map(|dir| dir.join(kind))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| anyhow!("no plugin {kind:?} in CNI_PATH {cni_path:?}"))
}

/// Runs one plugin inside the host namespace with only the CNI variables and PATH, from `/`:
/// the test process's environment (cargo's, RUST_LOG...) and working directory must not change
/// what a plugin does, nor a relative path of a plugin land in the source tree.
fn invoke(host: Host<'_>, command: &str, config: &Value, sandbox: &Sandbox) -> Result<Vec<u8>> {
    let kind = plugin_type(config);
    let binary = find_plugin(host.cni_path, kind)?;
    let var = |key: &str, value: &std::ffi::OsStr| {
        let mut pair = OsString::from(key);
        pair.push("=");
        pair.push(value);
        pair
    };
    let cni_path = std::env::join_paths(host.cni_path).context("CNI_PATH")?;
    let path = std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into());
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", host.netns, "env", "-i"])
        .arg(var("CNI_COMMAND", command.as_ref()))
        .arg(var("CNI_CONTAINERID", sandbox.container_id.as_ref()))
        .arg(var("CNI_NETNS", sandbox.netns_path().as_os_str()))
        .arg(var("CNI_IFNAME", POD_IFNAME.as_ref()))
        .arg(var("CNI_PATH", &cni_path))
        .arg(var("CNI_ARGS", sandbox.cni_args().as_ref()))
        .arg(var("PATH", &path))
        .arg(&binary)
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let what = format!("{command} of plugin {kind} ({})", binary.display());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {what}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        // The configuration is a few kilobytes at most, well within a pipe's buffer.
        stdin
            .write_all(&serde_json::to_vec(config)?)
            .with_context(|| format!("cannot give {what} its configuration"))?;
    }
    let output = child
        .wait_with_output()
        .with_context(|| format!("cannot wait for {what}"))?;
    if !output.status.success() {
        return Err(plugin_error(kind, command, &output));
    }
    Ok(output.stdout)
}

/// A failed plugin prints `{"code", "msg", "details"}` on stdout; anything else is quoted as it
/// came, since a crashing plugin prints a Go panic instead.
fn plugin_error(kind: &str, command: &str, output: &Output) -> anyhow::Error {
    let (status, stdout) = (output.status, &output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stderr = stderr.trim();
    let said = match serde_json::from_slice::<Value>(stdout) {
        Ok(error) => {
            let field = |key: &str| {
                error
                    .get(key)
                    .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
            };
            format!(
                "{} (code {}; details: {})",
                field("msg").unwrap_or_default(),
                field("code").unwrap_or_else(|| "none".into()),
                field("details")
                    .filter(|d| !d.is_empty())
                    .unwrap_or_else(|| "none".into())
            )
        }
        Err(_) => format!("stdout {:?}", String::from_utf8_lossy(stdout).trim()),
    };
    anyhow!("CNI plugin {kind} failed {command} ({status}): {said}; stderr: {stderr:?}")
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;

    use super::*;

    #[test]
    fn plugin_config_takes_name_version_and_previous_result() {
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0", "name": "lab",
            "plugins": [{"type": "ptp", "ipMasq": true}, {"type": "extra"}],
        });
        let list = List::parse(&conflist).expect("valid");
        let first = list.config(&list.plugins[0], None).expect("config");
        assert_eq!(
            first,
            serde_json::json!({"type": "ptp", "ipMasq": true, "name": "lab", "cniVersion": "1.0.0"})
        );
        let previous = serde_json::json!({"ips": []});
        let second = list
            .config(&list.plugins[1], Some(previous.clone()))
            .expect("config");
        assert_eq!(second["prevResult"], previous);
        assert!(
            list.config(&serde_json::json!({"ipMasq": true}), None)
                .is_err()
        );
    }

    #[test]
    fn errors_quote_message_details_and_stderr() {
        let stdout = br#"{"code": 11, "msg": "failed to allocate", "details": "range is full"}"#;
        let output = |code, stdout: &[u8], stderr: &[u8]| Output {
            status: ExitStatus::from_raw(code),
            stdout: stdout.to_vec(),
            stderr: stderr.to_vec(),
        };
        let text = plugin_error("bridge", "ADD", &output(256, stdout, b"oops\n")).to_string();
        for part in [
            "bridge",
            "ADD",
            "failed to allocate",
            "code 11",
            "range is full",
            "oops",
        ] {
            assert!(text.contains(part), "{part:?} missing from {text}");
        }
        let crashed = plugin_error("ptp", "DEL", &output(6, b"panic: nil", b"")).to_string();
        assert!(crashed.contains("panic: nil"), "{crashed}");
    }

    #[test]
    fn args_name_the_pod_as_kubelet_does() {
        let sandbox = Sandbox {
            container_id: "c1".into(),
            netns: "lab-pod-a.b".into(),
            pod_namespace: "a".into(),
            pod_name: "b".into(),
            pod_uid: "u1".into(),
        };
        assert_eq!(
            sandbox.cni_args(),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=a;K8S_POD_NAME=b;K8S_POD_INFRA_CONTAINER_ID=c1;K8S_POD_UID=u1"
        );
        assert_eq!(
            sandbox.netns_path(),
            Path::new("/var/run/netns/lab-pod-a.b")
        );
    }
}
