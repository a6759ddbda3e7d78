//! Loading configuration: every key, the environment overrides, and one
//! clear error (file, key, problem) for each kind of mistake.

use std::time::Duration;

use switchyard::config::{Config, DeadlineConfig, DedupeConfig, TransportKind};
use switchyard_testkit::TempFile;

fn file(text: &str) -> TempFile {
    TempFile::new("toml", text)
}

fn load_err(text: &str) -> (String, String) {
    let f = file(text);
    let e = Config::load(f.path()).unwrap_err();
    (e.to_string(), f.path().display().to_string())
}

#[test]
fn a_full_file_loads_with_defaults_filled_in() {
    let f = file(
        r#"
[transport]
kind = "rabbitmq"
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
delay_tiers = ["1s", "10s"]

[consumers.billing]
source = "billing"
concurrency = 8
max_attempts = 3
backoff = { initial = "250ms", max = "1m" }
timeout = "5s"
deadline_policy = "drop"
dead_letter = "billing-dead"
dedupe = "none"

[consumers.shipping]
source = "shipping"

[topics.orders-events]
subscriptions = ["billing", "shipping"]
"#,
    );
    let c = Config::load(f.path()).unwrap();
    assert_eq!(c.transport.kind, TransportKind::Rabbitmq);
    assert_eq!(
        c.transport.delay_tiers.as_deref(),
        Some(&[Duration::from_secs(1), Duration::from_secs(10)][..])
    );
    let b = &c.consumers["billing"];
    assert_eq!((b.concurrency, b.max_attempts), (8, 3));
    assert_eq!(b.backoff.initial, Duration::from_millis(250));
    assert_eq!(b.backoff.max, Duration::from_secs(60));
    assert_eq!(b.timeout, Duration::from_secs(5));
    assert_eq!(b.deadline_policy, DeadlineConfig::Drop);
    assert_eq!(b.dedupe, DedupeConfig::None);
    let s = &c.consumers["shipping"];
    assert_eq!((s.concurrency, s.max_attempts), (32, 5));
    assert_eq!(s.timeout, Duration::from_secs(30));
    assert_eq!(s.dedupe, DedupeConfig::Memory);
    let topology = c.topology();
    assert_eq!(topology.queues.len(), 2);
    assert_eq!(
        topology.queues[0].dead_letter.as_deref(),
        Some("billing-dead")
    );
    assert_eq!(topology.topics[0].subscriptions, ["billing", "shipping"]);
    // Debug never shows the password.
    assert!(!format!("{c:?}").contains("guest:guest"));
}

#[test]
fn an_unknown_kind_lists_the_valid_ones() {
    let (e, path) = load_err("[transport]\nkind = \"kafka\"\n");
    assert!(e.starts_with(&path), "{e}");
    assert!(e.contains("transport.kind"), "{e}");
    assert!(e.contains("\"kafka\""), "{e}");
    for k in ["memory", "rabbitmq", "jetstream", "nats", "sqs"] {
        assert!(e.contains(k), "{e}");
    }
}

#[test]
fn a_missing_url_says_what_the_kind_needs() {
    let (e, path) = load_err("[transport]\nkind = \"jetstream\"\n");
    assert!(e.starts_with(&path), "{e}");
    assert!(e.contains("`transport.url`: missing"), "{e}");
    assert!(e.contains("nats://"), "{e}");
}

#[test]
fn a_bad_duration_names_its_key() {
    let (e, path) = load_err(
        "[transport]\nkind = \"memory\"\n[consumers.a]\nsource = \"a\"\ntimeout = \"5 parsecs\"\n",
    );
    assert!(e.starts_with(&path), "{e}");
    assert!(e.contains("consumers.a.timeout"), "{e}");
    assert!(e.contains("invalid duration \"5 parsecs\""), "{e}");
}

#[test]
fn a_negative_or_zero_limit_is_refused() {
    let (e, _) = load_err(
        "[transport]\nkind = \"memory\"\n[consumers.a]\nsource = \"a\"\nconcurrency = -4\n",
    );
    assert!(e.contains("consumers.a.concurrency"), "{e}");
    assert!(e.contains("-4"), "{e}");
    let (e, _) = load_err(
        "[transport]\nkind = \"memory\"\n[consumers.a]\nsource = \"a\"\nmax_attempts = 0\n",
    );
    assert!(
        e.contains("`consumers.a.max_attempts`: must be at least 1"),
        "{e}"
    );
    let (e, _) = load_err(
        "[transport]\nkind = \"jetstream\"\nurl = \"nats://h:4222\"\nclient_capacity = 0\n",
    );
    assert!(
        e.contains("`transport.client_capacity`: must be at least 1"),
        "{e}"
    );
}

#[test]
fn the_nats_client_capacity_applies_to_both_nats_kinds_only() {
    for kind in ["jetstream", "nats"] {
        let f = file(&format!(
            "[transport]\nkind = \"{kind}\"\nurl = \"nats://h:4222\"\nclient_capacity = 64\n"
        ));
        let c = Config::load(f.path()).unwrap();
        assert_eq!(c.transport.client_capacity, Some(64), "{kind}");
    }
    let (e, _) =
        load_err("[transport]\nkind = \"rabbitmq\"\nurl = \"amqp://h\"\nclient_capacity = 64\n");
    assert!(
        e.contains("`transport.client_capacity`: applies to jetstream, nats only"),
        "{e}"
    );
}

#[test]
fn unknown_keys_and_options_of_another_kind_are_refused() {
    let (e, _) = load_err("[transport]\nkind = \"memory\"\nurll = \"x\"\n");
    assert!(e.contains("urll"), "{e}");
    let (e, _) =
        load_err("[transport]\nkind = \"rabbitmq\"\nurl = \"amqp://h\"\nregion = \"eu-west-1\"\n");
    assert!(e.contains("`transport.region`: applies to sqs only"), "{e}");
}

#[test]
fn a_missing_file_is_named() {
    let e = Config::load("/nonexistent/switchyard.toml").unwrap_err();
    assert!(
        e.to_string()
            .starts_with("/nonexistent/switchyard.toml: no such file"),
        "{e}"
    );
}

#[test]
fn a_password_never_appears_in_an_error() {
    let (e, _) = load_err("[transport]\nkind = \"rabbitmq\"\nurl = \"http://admin:hunter2@h/\"\n");
    assert!(e.contains("not an amqp:// URL"), "{e}");
    assert!(!e.contains("hunter2"), "{e}");
    // A wrong type for the URL makes figment quote the value: still redacted.
    let (e, _) = load_err(
        "[transport]\nkind = \"rabbitmq\"\nurl = \"amqp://admin:hunter2@h/\"\nconnection_name = [\"amqp://admin:hunter2@h/\"]\n",
    );
    assert!(!e.contains("hunter2"), "{e}");
}

#[tokio::test]
async fn a_connection_failure_names_the_redacted_url() {
    let c = Config::from_toml(
        "[transport]\nkind = \"rabbitmq\"\nurl = \"amqp://admin:hunter2@127.0.0.1:1/%2f\"\n",
    )
    .unwrap();
    let e = c.transport().await.err().unwrap().to_string();
    assert!(e.contains("amqp://***@127.0.0.1:1/%2f"), "{e}");
    assert!(!e.contains("hunter2"), "{e}");
}

#[test]
fn the_environment_overrides_the_file() {
    // A variable no other test of this binary reads.
    std::env::set_var("SWITCHYARD_CONSUMERS__ENVTEST__CONCURRENCY", "7");
    let f = file(
        "[transport]\nkind = \"memory\"\n[consumers.envtest]\nsource = \"q\"\nconcurrency = 2\n",
    );
    let c = Config::load(f.path()).unwrap();
    std::env::remove_var("SWITCHYARD_CONSUMERS__ENVTEST__CONCURRENCY");
    assert_eq!(c.consumers["envtest"].concurrency, 7);
}

#[test]
fn a_dead_letter_queue_must_differ_from_the_source_and_shared_sources_must_agree() {
    let (e, _) = load_err(
        "[transport]\nkind = \"memory\"\n[consumers.a]\nsource = \"q\"\ndead_letter = \"q\"\n",
    );
    assert!(
        e.contains("`consumers.a.dead_letter`: must name a queue other than"),
        "{e}"
    );
    let (e, _) = load_err(
        "[transport]\nkind = \"memory\"\n[consumers.a]\nsource = \"q\"\n[consumers.b]\nsource = \"q\"\ndead_letter = \"elsewhere\"\n",
    );
    assert!(e.contains("share the source \"q\""), "{e}");
}

#[test]
fn a_syntax_error_does_not_echo_the_line_that_holds_a_secret() {
    let (e, path) = load_err(
        "[transport]\nkind = \"sqs\"\naccess_key_id = \"AKID\"\nsecret_access_key = wJalrXUtnFEMI/K7MDENG\n",
    );
    assert!(e.starts_with(&path), "{e}");
    assert!(!e.contains("wJalrXUtnFEMI"), "{e}");
    let (e, _) = load_err(
        "[transport]\nkind = \"sqs\"\naccess_key_id = \"AKID\"\nsecret_access_key = 123456789\n",
    );
    assert!(e.contains("transport.secret_access_key"), "{e}");
    assert!(!e.contains("123456789"), "{e}");
}
