//! The `switchyard` binary against the real brokers: topology, publish, a
//! consumer that dead-letters, then list/show/replay/purge and their effect
//! on the broker; bad configuration; passwords never printed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use assert_cmd::Command;
use futures_util::StreamExt;
use serde_json::Value;
use switchyard::{header_names, Config, Message, Router, SubscribeOptions};
use switchyard_testkit::TempFile;

#[derive(serde::Serialize, serde::Deserialize)]
struct Other {}
impl Message for Other {
    const TYPE: &'static str = "test.other";
}

fn write_config(text: &str) -> TempFile {
    TempFile::new("toml", text)
}

fn cli(config: &Path, args: &[&str]) -> assert_cmd::assert::Assert {
    Command::cargo_bin("switchyard")
        .unwrap()
        .arg("--config")
        .arg(config)
        .args(args)
        .timeout(Duration::from_secs(120))
        .assert()
}

fn json_of(a: &assert_cmd::assert::Assert) -> Value {
    let out = String::from_utf8(a.get_output().stdout.clone()).unwrap();
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn unique(name: &str) -> String {
    format!(
        "sy-cli-{name}-{}",
        &switchyard::MessageId::new().as_str()[24..]
    )
}

/// The whole dead-letter workflow against one broker.
async fn dead_letter_workflow(transport_toml: &str, label: &str, wait: &str) {
    let q = unique(label);
    let file = write_config(&format!(
        "{transport_toml}\n[consumers.orders]\nsource = \"{q}\"\nmax_attempts = 2\n"
    ));
    let config = file.path();

    cli(config, &["topology", "apply"]).success();
    let shown = json_of(&cli(config, &["topology", "show", "--json"]).success());
    assert!(
        shown
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["state"] == "exists"),
        "{shown}"
    );
    let published = json_of(
        &cli(
            config,
            &[
                "publish",
                "--destination",
                &q,
                "--type",
                "test.unknown",
                "--data",
                r#"{"n":1}"#,
                "--header",
                "x-origin=cli-test",
                "--count",
                "3",
                "--json",
            ],
        )
        .success(),
    );
    let ids: Vec<String> = published["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 3);

    // A consumer that knows another type only: all three are dead-lettered
    // as unknown-type.
    let loaded = Config::load(config).unwrap();
    let router = Router::builder()
        .route(|_: Other, _cx: switchyard::Context| async { Ok::<_, switchyard::HandleError>(()) })
        .build();

    let app = switchyard::start(&loaded, router).await.unwrap();
    app.subscribed().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let dead: u64 = app
            .consumers()
            .map(|(_, h)| h.stats().dead_lettered())
            .sum();
        if dead >= 3 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reports = app.shutdown().await;
    let report = reports[0].1.as_ref().unwrap();
    assert_eq!(report.dead_lettered, 3, "{report:?}");

    // list
    let listed = json_of(&cli(config, &["dlq", "list", "--wait", wait, "--json"]).success());
    let mut listed_ids: Vec<String> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            assert_eq!(m["reason"], "unknown-type", "{m}");
            assert_eq!(m["source"], q.as_str(), "{m}");
            assert_eq!(m["type"], "test.unknown", "{m}");
            m["id"].as_str().unwrap().to_owned()
        })
        .collect();
    listed_ids.sort();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(listed_ids, sorted, "every dead letter listed once");
    let grouped = json_of(
        &cli(
            config,
            &[
                "dlq",
                "list",
                "--wait",
                wait,
                "--group-by",
                "reason",
                "--json",
            ],
        )
        .success(),
    );
    assert_eq!(grouped[0]["reason"], "unknown-type");
    assert_eq!(grouped[0]["count"], 3);
    // The human table too.
    let table = cli(config, &["dlq", "list", "--wait", wait]).success();
    let text = String::from_utf8(table.get_output().stdout.clone()).unwrap();
    assert!(text.starts_with("id"), "{text}");
    assert_eq!(text.lines().count(), 4, "{text}");

    // show: no payload unless asked
    let shown =
        json_of(&cli(config, &["dlq", "show", "--wait", wait, &ids[0], "--json"]).success());
    assert!(shown.get("payload").is_none(), "{shown}");
    assert_eq!(shown["headers"]["x-origin"], "cli-test");
    let shown = json_of(
        &cli(
            config,
            &[
                "dlq",
                "show",
                "--wait",
                wait,
                &ids[0],
                "--show-payload",
                "--json",
            ],
        )
        .success(),
    );
    assert_eq!(shown["payload"], r#"{"n":1}"#);

    // replay one: it goes back to its source with its id, without the
    // dead-letter headers, and leaves the dead-letter queue
    let dry = json_of(
        &cli(
            config,
            &[
                "dlq",
                "replay",
                "--wait",
                wait,
                "--all",
                "--dry-run",
                "--json",
            ],
        )
        .success(),
    );
    assert_eq!(dry["replayed"].as_array().unwrap().len(), 3);
    let replayed = json_of(
        &cli(
            config,
            &["dlq", "replay", "--wait", wait, "--id", &ids[0], "--json"],
        )
        .success(),
    );
    assert_eq!(replayed["replayed"][0]["to"], q.as_str());
    let left = json_of(&cli(config, &["dlq", "list", "--wait", wait, "--json"]).success());
    assert_eq!(left.as_array().unwrap().len(), 2, "{left}");

    // purge: refused without --yes; --older-than keeps the recent ones
    cli(config, &["dlq", "purge", "--wait", wait]).code(2);
    let kept = json_of(
        &cli(
            config,
            &[
                "dlq",
                "purge",
                "--wait",
                wait,
                "--older-than",
                "1h",
                "--yes",
                "--json",
            ],
        )
        .success(),
    );
    assert_eq!(
        (kept["purged"].as_u64(), kept["kept"].as_u64()),
        (Some(0), Some(2))
    );
    let purged =
        json_of(&cli(config, &["dlq", "purge", "--wait", wait, "--yes", "--json"]).success());
    assert_eq!(purged["purged"], 2);
    let empty = json_of(&cli(config, &["dlq", "list", "--wait", wait, "--json"]).success());
    assert!(empty.as_array().unwrap().is_empty(), "{empty}");

    // stats: the replayed message waits in the source
    let stats = json_of(&cli(config, &["stats", "--json"]).success());
    assert_eq!(stats[0]["depth"], 1, "{stats}");

    // ... with its id, a fresh attempt budget and no dead-letter headers.
    let transport = loaded.transport().await.unwrap();
    let mut s = transport
        .subscribe(&q, SubscribeOptions::default())
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(30), s.next())
        .await
        .expect("the replayed message")
        .unwrap()
        .unwrap();
    assert_eq!(d.envelope().id.as_str(), ids[0]);
    assert_eq!(d.attempt(), 1);
    let left: Vec<_> = d
        .envelope()
        .headers
        .iter()
        .filter(|(name, _)| name.starts_with(header_names::DEAD_LETTER_PREFIX))
        .collect();
    assert!(
        left.is_empty(),
        "dead-letter headers after replay: {left:?}"
    );
    assert!(d
        .envelope()
        .headers
        .get(header_names::REPLAYED_AT)
        .is_some());
    d.ack().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_dead_letter_workflow() {
    dead_letter_workflow(
        "[transport]\nkind = \"rabbitmq\"\nurl = \"amqp://guest:guest@127.0.0.1:5672/%2f\"\nqueue_expires = \"120s\"\n",
        "rabbit",
        "2s",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_dead_letter_workflow() {
    // Messages the CLI gives back come back after the pull request it
    // leaves on the server has expired (1 s; redelivered after 2 s): wait
    // a little longer.
    dead_letter_workflow(
        "[transport]\nkind = \"jetstream\"\nurl = \"nats://127.0.0.1:4222\"\n",
        "js",
        "3s",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_dead_letter_workflow() {
    dead_letter_workflow(
        "[transport]\nkind = \"sqs\"\nurl = \"http://127.0.0.1:4566\"\nregion = \"us-east-1\"\naccess_key_id = \"test\"\nsecret_access_key = \"test\"\nwait_time = \"1s\"\n",
        "sqs",
        "2s",
    )
    .await;
}

#[test]
fn bad_configuration_gets_one_clear_error_and_exit_code_2() {
    let cases = [
        (
            "[transport]\nkind = \"kafka\"\n",
            "unknown transport kind \"kafka\"",
        ),
        (
            "[transport]\nkind = \"rabbitmq\"\n",
            "`transport.url`: missing",
        ),
        (
            "[transport]\nkind = \"memory\"\n[consumers.a]\nsource = \"a\"\ntimeout = \"soon\"\n",
            "invalid duration \"soon\"",
        ),
        (
            "[transport]\nkind = \"memory\"\n[consumers.a]\nsource = \"a\"\nconcurrency = -1\n",
            "consumers.a.concurrency",
        ),
        (
            "[transport]\nkind = \"memory\"\n",
            "memory transport lives inside one process",
        ),
    ];
    for (text, expected) in cases {
        let file = write_config(text);
        let out = cli(file.path(), &["stats"]).code(2);
        let err = String::from_utf8(out.get_output().stderr.clone()).unwrap();
        assert!(err.contains(expected), "{text}: {err}");
    }
    let missing = PathBuf::from("/nonexistent/switchyard.toml");
    let out = cli(&missing, &["stats"]).code(2);
    let err = String::from_utf8(out.get_output().stderr.clone()).unwrap();
    assert!(
        err.contains("/nonexistent/switchyard.toml: no such file"),
        "{err}"
    );
}

#[test]
fn a_password_in_the_url_never_appears_in_any_output() {
    let file = write_config(
        "[transport]\nkind = \"rabbitmq\"\nurl = \"amqp://admin:hunter2-secret@127.0.0.1:1/%2f\"\n[consumers.a]\nsource = \"a\"\n",
    );
    let config = file.path();
    for args in [
        &["stats"][..],
        &["topology", "show", "--json"][..],
        &[
            "publish",
            "--destination",
            "a",
            "--type",
            "t",
            "--data",
            "{}",
        ][..],
        &["dlq", "list"][..],
    ] {
        let out = cli(config, args).failure();
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.get_output().stdout),
            String::from_utf8_lossy(&out.get_output().stderr)
        );
        assert!(!all.contains("hunter2"), "{args:?}: {all}");
        assert!(all.contains("amqp://***@127.0.0.1:1"), "{args:?}: {all}");
    }
}
