//! The command line as a user meets it: the planner's output, and clear errors with exit
//! code 2 for bad input. Nothing here touches the network configuration.

use std::path::PathBuf;
use std::process::{Command, Output};

fn static_egress(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_static-egress"))
        .args(args)
        .output()
        .expect("run static-egress")
}

fn example() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/objects.yaml")
        .display()
        .to_string()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn plan_explains_selection_holders_and_snat() {
    let out = static_egress(&["plan", "--node", "node1", "--from-file", &example()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("egress 10.99.0.200 held by node2 (10.99.0.12)"),
        "{text}"
    );
    assert!(
        text.contains("payments/api-1 10.244.1.2 -> corp-fw (10.99.0.200) because podSelector"),
        "{text}"
    );
    assert!(!text.contains("payments/batch"), "{text}");
    assert!(
        text.contains(
            "namespace web asks for corp-fw: its namespaceSelector does not admit namespace web"
        ),
        "{text}"
    );

    let out = static_egress(&["plan", "--node", "node2", "--from-file", &example()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("10.99.0.200 (corp-fw) for 1 pod(s): 10.244.1.2"),
        "{text}"
    );
}

#[test]
fn a_missing_objects_file_is_an_input_error() {
    let out = static_egress(&[
        "plan",
        "--node",
        "node1",
        "--from-file",
        "/nonexistent/objects.yaml",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.starts_with("error: ") && err.contains("/nonexistent/objects.yaml"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn a_fwmark_with_more_than_one_bit_is_refused() {
    let out = static_egress(&[
        "agent",
        "--node",
        "n",
        "--from-file",
        &example(),
        "--fwmark",
        "0x3000",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("must have exactly one bit set"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn reserved_tables_and_rule_priorities_are_refused() {
    for (flag, value, says) in [
        ("--route-table", "254", "routing table 254 is reserved"),
        ("--route-table", "0", "routing table 0 is reserved"),
        ("--rule-priority", "32766", "rule priority 32766 is taken"),
        ("--rule-priority", "0", "rule priority 0 is taken"),
    ] {
        let out = static_egress(&[
            "agent",
            "--node",
            "n",
            "--from-file",
            &example(),
            flag,
            value,
        ]);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        assert!(stderr(&out).contains(says), "{}", stderr(&out));
    }
}

#[test]
fn the_agent_refuses_a_directory_that_is_not_a_bpffs() {
    let dir = std::env::temp_dir().join(format!("static-egress-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let d = dir.display().to_string();
    let out = static_egress(&[
        "agent",
        "--node",
        "node1",
        "--from-file",
        &example(),
        "--bpffs",
        &d,
        "--state-dir",
        &d,
    ]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("is not a bpf filesystem; mount one with `mount -t bpf bpf"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn health_reports_a_missing_or_stale_status() {
    let dir = std::env::temp_dir().join(format!("static-egress-health-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let d = dir.display().to_string();
    let missing = static_egress(&["health", "--state-dir", &d]);
    assert_eq!(missing.status.code(), Some(1), "{}", stderr(&missing));
    std::fs::write(dir.join("status.json"), "{}").expect("status");
    let fresh = static_egress(&["health", "--state-dir", &d, "--max-age", "60s"]);
    assert!(fresh.status.success(), "{}", stderr(&fresh));
    // An agent that stopped writing two minutes ago.
    let aged = Command::new("touch")
        .args(["-d", "2 minutes ago"])
        .arg(dir.join("status.json"))
        .status()
        .expect("run touch");
    assert!(aged.success());
    let stale = static_egress(&["health", "--state-dir", &d, "--max-age", "60"]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(stale.status.code(), Some(1));
    assert!(
        stderr(&stale).contains("the agent is not reconciling"),
        "{}",
        stderr(&stale)
    );
}
