//! Processes the lab runs in the background: agents, the external probe server, probe loops.

use std::fs::{self, File};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::POLL_INTERVAL;
use crate::cmd::describe;

/// How long a process gets to exit after SIGTERM before [`AgentHandle::stop`] calls it a failure.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A child with stdout and stderr in one file, killed when dropped unless detached.
#[derive(Debug)]
pub(crate) struct Background {
    child: Child,
    what: String,
    output: PathBuf,
    detached: bool,
}

impl Background {
    pub(crate) fn spawn(mut cmd: Command, output: &Path, what: String) -> Result<Self> {
        let out =
            File::create(output).with_context(|| format!("cannot create {}", output.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {what}: `{}`", describe(&cmd)))?;
        Ok(Self {
            child,
            what,
            output: output.to_owned(),
            detached: false,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn output_path(&self) -> &Path {
        &self.output
    }

    pub(crate) fn output(&self) -> Result<String> {
        let bytes = fs::read(&self.output)
            .with_context(|| format!("cannot read {}", self.output.display()))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    pub(crate) fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the process to exit by itself.
    pub(crate) fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} (pid {}) still running after {timeout:?}",
                    self.what,
                    self.pid()
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// SIGTERM, then waits; a process that ignores it is killed and reported as an error.
    pub(crate) fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        let pid = libc::pid_t::try_from(self.pid())?;
        // SAFETY: plain syscall; the child is not reaped yet, so the pid still names it.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot send SIGTERM to {}", self.what));
        }
        match self.wait_exit(timeout) {
            Ok(status) => Ok(status),
            Err(e) => {
                self.kill()?;
                Err(e.context(format!("{} ignored SIGTERM and was killed", self.what)))
            }
        }
    }

    /// SIGTERM, then SIGKILL if it still runs after `grace`: a process that may take longer
    /// to stop than anyone waits for it, as a kubelet stops a pod.
    pub(crate) fn stop_within(&mut self, grace: Duration) -> Result<ExitStatus> {
        match self.terminate(grace) {
            Ok(status) => Ok(status),
            // Killed after the grace period (and reaped): what was asked for.
            Err(_) if self.child.try_wait()?.is_some() => Ok(self.child.wait()?),
            Err(e) => Err(e),
        }
    }

    pub(crate) fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        self.child
            .kill()
            .with_context(|| format!("cannot kill {}", self.what))?;
        Ok(self.child.wait()?)
    }

    pub(crate) fn detach(mut self) {
        self.detached = true;
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if !self.detached {
            // Errors here mean the process is already gone, which is the goal.
            let _ = self.kill();
        }
    }
}

/// A running `static-egress agent` in a node's namespace; killed when dropped.
#[derive(Debug)]
pub struct AgentHandle {
    pub(crate) process: Background,
    pub(crate) node: String,
}

impl AgentHandle {
    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn log_path(&self) -> &Path {
        self.process.output_path()
    }

    /// Everything the agent printed so far, stdout and stderr interleaved.
    pub fn log(&self) -> Result<String> {
        self.process.output()
    }

    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// Sends SIGTERM and waits for the agent to exit (10 s at most, then SIGKILL and an error).
    pub fn stop(&mut self) -> Result<ExitStatus> {
        self.process.terminate(STOP_TIMEOUT)
    }

    /// SIGKILL: the agent gets no chance to clean up, as in a crash or OOM kill.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        self.process.kill()
    }

    /// Waits for the agent to exit on its own, e.g. after a fatal configuration error.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.process.wait_exit(timeout)
    }

    /// Leaves the agent running after this handle is gone (the lab's `--keep`).
    pub fn detach(self) {
        self.process.detach();
    }
}

/// One line of `se-probe loop` output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The server saw the connection come from this address.
    From(Ipv4Addr),
    /// The connection failed; the probe's message.
    Failed(String),
}

impl Answer {
    fn parse(line: &str) -> Self {
        match line.parse() {
            Ok(ip) => Self::From(ip),
            Err(_) => Self::Failed(line.strip_prefix("error: ").unwrap_or(line).to_owned()),
        }
    }

    pub fn source(&self) -> Option<Ipv4Addr> {
        match self {
            Self::From(ip) => Some(*ip),
            Self::Failed(_) => None,
        }
    }
}

/// Fails, listing the exceptions, unless every connection succeeded and left with `want`.
pub fn expect_all_from(answers: &[Answer], want: Ipv4Addr) -> anyhow::Result<()> {
    let bad: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.source() != Some(want))
        .collect();
    anyhow::ensure!(
        bad.is_empty(),
        "{} of {} connections did not leave with {want}: {bad:?}",
        bad.len(),
        answers.len()
    );
    Ok(())
}

/// Fails, listing them, if any connection left with another address than `want`; failed
/// connections are fine (dropped traffic is not a leak). Returns how many left with `want`.
pub fn expect_none_leaked(answers: &[Answer], want: Ipv4Addr) -> anyhow::Result<usize> {
    let leaked: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.source().is_some_and(|ip| ip != want))
        .collect();
    anyhow::ensure!(
        leaked.is_empty(),
        "{} of {} connections left with another address than {want}: {leaked:?}",
        leaked.len(),
        answers.len()
    );
    Ok(answers.iter().filter(|a| a.source() == Some(want)).count())
}

/// How a `se-probe stream` connection fared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamOutcome {
    pub survived: bool,
    pub echoes: u64,
    /// The longest time between two echoes.
    pub longest_silence: Duration,
    /// Why it broke, when it did.
    pub error: Option<String>,
}

/// `se-probe stream` running in a pod: one long-lived connection kept busy.
#[derive(Debug)]
pub struct Stream {
    pub(crate) process: Background,
}

impl Stream {
    /// Waits for the stream to end and says how it fared.
    pub fn wait(mut self, timeout: Duration) -> Result<StreamOutcome> {
        self.process.wait_exit(timeout)?;
        let output = self.process.output()?;
        let line = output.lines().last().unwrap_or_default();
        let mut fields = line.splitn(4, ' ');
        let (kind, echoes, silence) = (fields.next(), fields.next(), fields.next());
        let (Some(kind), Some(Ok(echoes)), Some(Ok(silence))) = (
            kind,
            echoes.map(str::parse::<u64>),
            silence.map(str::parse::<u64>),
        ) else {
            anyhow::bail!("odd se-probe stream output: {output:?}");
        };
        Ok(StreamOutcome {
            survived: kind == "survived",
            echoes,
            longest_silence: Duration::from_millis(silence),
            error: fields.next().map(str::to_owned),
        })
    }
}

/// `se-probe loop` running in a pod: a pod that keeps opening connections.
#[derive(Debug)]
pub struct ProbeLoop {
    pub(crate) process: Background,
}

impl ProbeLoop {
    /// Answers of the connections finished so far.
    pub fn answers(&self) -> Result<Vec<Answer>> {
        Ok(parse_answers(&self.process.output()?))
    }

    /// The answers so far, each with when it came (since the loop started).
    pub fn timed_answers(&self) -> Result<Vec<(Duration, Answer)>> {
        Ok(parse_timed_answers(&self.process.output()?))
    }

    /// Like [`wait`](Self::wait), with when each answer came.
    pub fn wait_timed(mut self, timeout: Duration) -> Result<Vec<(Duration, Answer)>> {
        self.process.wait_exit(timeout)?;
        self.timed_answers()
    }

    /// Like [`stop`](Self::stop), with when each answer came.
    pub fn stop_timed(mut self) -> Result<Vec<(Duration, Answer)>> {
        self.process.kill()?;
        self.timed_answers()
    }

    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// Waits for the loop to finish its connections and returns all answers.
    pub fn wait(mut self, timeout: Duration) -> Result<Vec<Answer>> {
        self.process.wait_exit(timeout)?;
        self.answers()
    }

    /// Stops the loop early and returns the answers so far.
    pub fn stop(mut self) -> Result<Vec<Answer>> {
        self.process.kill()?;
        self.answers()
    }
}

/// Complete lines only: the last one may still be being written.
fn parse_answers(output: &str) -> Vec<Answer> {
    parse_timed_answers(output)
        .into_iter()
        .map(|(_, answer)| answer)
        .collect()
}

/// `se-probe loop`'s lines: milliseconds since it started, then the answer.
fn parse_timed_answers(output: &str) -> Vec<(Duration, Answer)> {
    let complete = match output.rfind('\n') {
        Some(end) => &output[..end],
        None => "",
    };
    complete
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (at, rest) = l.trim().split_once(' ').unwrap_or(("0", l.trim()));
            let at = Duration::from_millis(at.parse().unwrap_or_default());
            (at, Answer::parse(rest))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loop_output_is_parsed_line_by_line() {
        let out = "0 10.99.0.200\n20 error: cannot connect to 203.0.113.10:7777: refused\n\
                   2041 10.99.0.11\n2061 10.9";
        assert_eq!(
            parse_timed_answers(out),
            vec![
                (Duration::ZERO, Answer::From(Ipv4Addr::new(10, 99, 0, 200))),
                (
                    Duration::from_millis(20),
                    Answer::Failed("cannot connect to 203.0.113.10:7777: refused".into())
                ),
                (
                    Duration::from_millis(2041),
                    Answer::From(Ipv4Addr::new(10, 99, 0, 11))
                ),
            ]
        );
        assert_eq!(parse_answers(out).len(), 3);
        assert!(parse_answers("").is_empty());
    }
}
