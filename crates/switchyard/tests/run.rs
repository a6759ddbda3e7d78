//! `switchyard::run` starts every configured consumer and stops them
//! gracefully on SIGTERM. (nextest runs each test in its own process, so
//! the signal reaches only this test.)

use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchyard::{Config, Context, HandleError, Message, Router};

#[derive(Serialize, Deserialize)]
struct Ping {
    n: u32,
}

impl Message for Ping {
    const TYPE: &'static str = "test.ping";
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_every_consumer_until_sigterm() {
    let config = Config::from_toml(
        "[transport]\nkind = \"memory\"\n[consumers.a]\nsource = \"a\"\n[consumers.b]\nsource = \"b\"\nconcurrency = 4\n",
    )
    .unwrap();
    let router = Router::builder()
        .route(|_: Ping, _: Context| async { Ok::<_, HandleError>(()) })
        .build();
    let running = tokio::spawn(async move { switchyard::run(&config, router).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!running.is_finished(), "run returns only at a signal");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let reports = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("stopped after SIGTERM")
        .unwrap()
        .unwrap();
    let names: Vec<&str> = reports.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    for (_, r) in reports {
        r.expect("a graceful stop");
    }
}
