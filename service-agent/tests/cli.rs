//! The command line as an operator meets it (no root needed).

use std::process::Command;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_service-agent"))
}

#[test]
fn log_format_json_writes_one_json_object_per_line() {
    let root = std::env::temp_dir().join(format!("cli-cleanup-{}", std::process::id()));
    let out = agent()
        .args(["--log-format", "json", "cleanup", "--bpffs-root"])
        .arg(&root)
        .env("RUST_LOG", "info")
        .output()
        .expect("service-agent");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr.lines().find(|l| l.contains("removed the dataplane")).expect("a log line");
    let v: serde_json::Value = serde_json::from_str(line).expect("JSON log line");
    assert_eq!(v["level"], "INFO");
    assert_eq!(v["fields"]["links"], 0);
}

#[test]
fn rust_log_filters_the_log() {
    let root = std::env::temp_dir().join(format!("cli-cleanup-quiet-{}", std::process::id()));
    let out = agent().args(["cleanup", "--bpffs-root"]).arg(&root).env("RUST_LOG", "warn").output().expect("run");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).trim().is_empty(), "info lines with RUST_LOG=warn");
}

#[test]
fn a_bad_flag_is_refused_with_a_clear_error() {
    let out = agent()
        .args(["run", "--manifests", "/tmp", "--node-name", "n", "--metrics-bind-address", "nope"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--metrics-bind-address"), "{err}");
}

#[test]
fn localhost_nodeports_without_the_socket_path_is_refused_naming_both_flags() {
    let out = agent()
        .args(["run", "--manifests", "/tmp", "--node-name", "n", "--localhost-nodeports", "--socket-lb", "off"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "a usage error: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--localhost-nodeports") && err.contains("--socket-lb off"), "{err}");
}
