//! The orders demo, unchanged, on every broker from its configuration file:
//! it checks its own outcome and exits non-zero on anything unexpected.

use std::process::Command;

fn run_demo(config: Option<&str>) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_orders"));
    cmd.current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    if let Some(c) = config {
        cmd.args(["--config", c]);
    }
    let out = cmd.output().expect("the demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{config:?} failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains("ok: every message ended up where it should"),
        "{stdout}"
    );
    assert!(!stdout.contains("guest:guest") && !stderr.contains("guest:guest"));
}

#[test]
fn on_the_built_in_memory_configuration() {
    run_demo(None);
}

#[test]
fn on_memory_from_its_file() {
    run_demo(Some("examples/config/memory.toml"));
}

#[test]
fn on_rabbitmq() {
    run_demo(Some("examples/config/rabbitmq.toml"));
}

#[test]
fn on_jetstream() {
    run_demo(Some("examples/config/jetstream.toml"));
}

#[test]
fn on_sqs() {
    run_demo(Some("examples/config/sqs.toml"));
}
