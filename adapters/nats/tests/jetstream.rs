//! Behaviour specific to JetStream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use switchyard_core::{
    Consumer, Context, DeadLetterInfo, DeadLetterReason, Envelope, HandleError, Message, QueueSpec,
    Router, SubscribeOptions, Topology, Transport,
};
use switchyard_nats::{NatsConfig, NatsTransport};

mod common;
use common::PrivateServer;

fn url() -> String {
    std::env::var("SWITCHYARD_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

fn unique(name: &str) -> String {
    format!(
        "sy-test-{name}-{}",
        &switchyard_core::MessageId::new().as_str()[24..]
    )
}

async fn connect_to(url: &str) -> NatsTransport {
    NatsTransport::connect(NatsConfig::new(url))
        .await
        .expect("NATS with JetStream")
}

async fn remove_stream(url: &str, queue: &str) {
    let js = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
    for name in [queue.to_owned(), format!("{queue}_dlq")] {
        let _ = js.delete_stream(&name).await;
    }
}

/// The queue's stats once the server holds nothing unsettled, or after
/// 10 s. The server applies acks apart from answering the info request:
/// the client is flushed first, and the last acks may show a moment later.
async fn settled_stats(t: &NatsTransport, q: &str) -> switchyard_core::QueueStats {
    t.flush().await.unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = t.queue_stats(q).await.unwrap();
        if (stats.depth, stats.in_flight) == (Some(0), Some(0)) || Instant::now() > until {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Job {
    n: u32,
}

impl Message for Job {
    const TYPE: &'static str = "test.job";
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_running_three_ack_waits_is_not_redelivered_thanks_to_in_progress() {
    let t = connect_to(&url()).await;
    let q = unique("slow");
    t.declare(&Topology::new().queue(QueueSpec::new(&q).lease(Duration::from_secs(1))))
        .await
        .unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let router = Router::builder()
        .route({
            let calls = Arc::clone(&calls);
            move |_: Job, _: Context| {
                calls.fetch_add(1, Ordering::SeqCst);
                async {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    Ok::<_, HandleError>(())
                }
            }
        })
        .build();
    let consumer = Consumer::builder(t.clone(), q.clone())
        .serve(router)
        .spawn();
    t.publish(&q, Envelope::new(Job::TYPE, r#"{"n":1}"#))
        .await
        .unwrap();
    let started = Instant::now();
    while consumer.stats().acked() < 1 {
        assert!(started.elapsed() < Duration::from_secs(20), "never acked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Long enough for a redelivery to have shown up, had the lease lapsed.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let report = consumer.shutdown().await.unwrap();
    remove_stream(&url(), &q).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "redelivered while being handled: {report:?}"
    );
    assert_eq!((report.received, report.settle_failed), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_dead_lettered_after_exactly_max_attempts() {
    let t = connect_to(&url()).await;
    let q = unique("poison");
    t.declare(&Topology::new().queue(QueueSpec::new(&q)))
        .await
        .unwrap();
    let (router, calls) =
        switchyard_testkit::failing_router::<Job>(|| HandleError::transient("still broken"));
    let stack = switchyard_core::middleware::Stack::new()
        .retry_policy(switchyard_core::middleware::retry::ExponentialBackoff::new(
            Duration::from_millis(10),
            Duration::from_millis(50),
        ))
        .build(router);
    let consumer = Consumer::builder(t.clone(), q.clone())
        .max_attempts(4)
        .serve(stack)
        .spawn();
    let env = Envelope::new(Job::TYPE, r#"{"n":1}"#).with_header("x-keep", "me");
    t.publish(&q, env.clone()).await.unwrap();
    let js = async_nats::jetstream::new(async_nats::connect(url()).await.unwrap());
    let sequence = js
        .get_stream(&q)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .last_sequence;
    let mut dead = t
        .subscribe(&format!("{q}.dlq"), SubscribeOptions::default())
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(30), dead.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    consumer.shutdown().await.unwrap();
    let got = d.envelope().clone();
    d.ack().await.unwrap();
    remove_stream(&url(), &q).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        4,
        "exactly max_attempts handler calls"
    );
    assert_eq!(got.id, env.id);
    assert_eq!(got.headers.get("x-keep"), Some("me"));
    let info = DeadLetterInfo::read_from(&got.headers).unwrap();
    assert_eq!(
        (info.reason, info.attempts),
        (DeadLetterReason::MaxAttempts, 4)
    );
    // Where it came from, as JetStream knows it.
    assert_eq!(got.headers.get("switchyard-dead-letter-subject"), Some(&*q));
    assert_eq!(
        got.headers.get("switchyard-dead-letter-stream-sequence"),
        Some(sequence.to_string().as_str())
    );
}

/// An ack that finds the client's command queue full neither fails nor
/// gets lost: `begin_settle` hands back a future that waits for room. With
/// a queue of one, an ack attempt left holding its place in the queue's
/// wait list would take the only slot and every later ack would wait for
/// ever (the test times out). On one thread the connection task cannot
/// drain the queue while the acks are queued in one go.
#[tokio::test(flavor = "current_thread")]
async fn acks_wait_for_room_when_the_client_queue_is_full() {
    use futures_util::FutureExt;
    let t = NatsTransport::connect(NatsConfig::new(url()).client_capacity(1))
        .await
        .expect("NATS with JetStream");
    let q = unique("full-queue");
    t.declare(&Topology::new().queue(QueueSpec::new(&q)))
        .await
        .unwrap();
    // The stream is removed however the checks end.
    let checked = std::panic::AssertUnwindSafe(acks_wait_for_room(&t, &q))
        .catch_unwind()
        .await;
    remove_stream(&url(), &q).await;
    if let Err(panic) = checked {
        std::panic::resume_unwind(panic);
    }
}

async fn acks_wait_for_room(t: &NatsTransport, q: &str) {
    use switchyard_core::{Settlement, Settling};
    let n = 48;
    for i in 0..n {
        t.publish(q, Envelope::new(Job::TYPE, format!(r#"{{"n":{i}}}"#)))
            .await
            .unwrap();
    }
    let mut sub = t
        .subscribe(q, SubscribeOptions::default().prefetch(n))
        .await
        .unwrap();
    let mut settlers = Vec::new();
    for _ in 0..n {
        let (_, _, _, settler) = switchyard_testkit::next_delivery(&mut sub)
            .await
            .into_parts();
        settlers.push(settler);
    }
    let (queued, waiting) = std::future::poll_fn(|cx| {
        let mut queued = 0;
        let mut waiting = Vec::new();
        for settler in settlers.drain(..) {
            match settler.begin_settle(Settlement::Ack, cx) {
                Settling::Done(result) => {
                    result.expect("an ack queued at once");
                    queued += 1;
                }
                Settling::Pending(rest) => waiting.push(rest),
            }
        }
        std::task::Poll::Ready((queued, waiting))
    })
    .await;
    assert!(
        !waiting.is_empty(),
        "the queue of one never filled: all {queued} acks were queued at once"
    );
    let waited = waiting.len();
    tokio::time::timeout(Duration::from_secs(10), async {
        for rest in waiting {
            rest.await.expect("an ack that waited for room");
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{waited} acks still waiting for room after 10 s"));
    drop(sub);
    let stats = settled_stats(t, q).await;
    assert_eq!(
        (stats.depth, stats.in_flight),
        (Some(0), Some(0)),
        "every ack reached the server ({queued} queued at once, {waited} waited)"
    );
}

/// Every kind of settlement reaches the server, whether queued to the
/// client at once (the runtime's usual path) or confirmed by the server
/// (`double_ack`): acks remove, a retry's nak redelivers, and nothing is
/// left pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_and_naks_reach_the_server_with_and_without_double_ack() {
    for double_ack in [false, true] {
        let t = NatsTransport::connect(NatsConfig::new(url()).double_ack(double_ack))
            .await
            .expect("NATS with JetStream");
        let q = unique("settle");
        t.declare(&Topology::new().queue(QueueSpec::new(&q)))
            .await
            .unwrap();
        let n = 40;
        // Each odd message fails once, so half of them are nakked once.
        let calls: Arc<Mutex<HashMap<u32, u32>>> = Arc::default();
        let router = Router::builder()
            .route({
                let calls = Arc::clone(&calls);
                move |job: Job, _cx: Context| {
                    let calls = Arc::clone(&calls);
                    async move {
                        let seen = {
                            let mut calls = calls.lock().unwrap();
                            let c = calls.entry(job.n).or_default();
                            *c += 1;
                            *c
                        };
                        if job.n % 2 == 1 && seen == 1 {
                            return Err(HandleError::transient("first try fails"));
                        }
                        Ok(())
                    }
                }
            })
            .build();
        let consumer = Consumer::builder(t.clone(), q.clone())
            .serve(router)
            .spawn();
        for i in 0..n {
            t.publish(&q, Envelope::new(Job::TYPE, format!(r#"{{"n":{i}}}"#)))
                .await
                .unwrap();
        }
        let until = Instant::now() + Duration::from_secs(30);
        while calls.lock().unwrap().values().sum::<u32>() < n + n / 2 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let report = consumer.shutdown().await.unwrap();
        let stats = settled_stats(&t, &q).await;
        remove_stream(&url(), &q).await;
        let calls = calls.lock().unwrap().clone();
        assert_eq!(
            calls.len(),
            n as usize,
            "double_ack {double_ack}: every message handled"
        );
        for (i, c) in &calls {
            let expected = if i % 2 == 1 { 2 } else { 1 };
            assert_eq!(
                *c, expected,
                "double_ack {double_ack}: message {i} handled {c} times"
            );
        }
        assert_eq!(
            (report.acked, report.retried, report.settle_failed),
            (u64::from(n), u64::from(n / 2), 0),
            "double_ack {double_ack}"
        );
        assert_eq!(
            (stats.depth, stats.in_flight),
            (Some(0), Some(0)),
            "double_ack {double_ack}: the server holds nothing unacknowledged"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_published_with_the_same_id_are_stored_once() {
    let t = connect_to(&url()).await;
    let q = unique("dup");
    t.declare(&Topology::new().queue(QueueSpec::new(&q)))
        .await
        .unwrap();
    let env = Envelope::new(Job::TYPE, r#"{"n":1}"#);
    for _ in 0..3 {
        t.publish(&q, env.clone()).await.unwrap();
    }
    let js = async_nats::jetstream::new(async_nats::connect(url()).await.unwrap());
    let mut stream = js.get_stream(&q).await.unwrap();
    let stored = stream.info().await.unwrap().state.messages;
    remove_stream(&url(), &q).await;
    assert_eq!(stored, 1, "the server's duplicate window keeps one copy");
}

/// The server ends a waiting pull request with a status when the durable
/// consumer is deleted under it; the subscription must make the consumer
/// and its pull anew, and go on consuming. (The new consumer starts from
/// the beginning of the stream, so the message handled before is handled
/// again: at-least-once.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_the_server_ends_is_made_anew_and_consumption_goes_on() {
    let t = connect_to(&url()).await;
    let q = unique("ended");
    t.declare(&Topology::new().queue(QueueSpec::new(&q)))
        .await
        .unwrap();
    let handled = Arc::new(Mutex::new(Vec::new()));
    let router = Router::builder()
        .route({
            let handled = Arc::clone(&handled);
            move |job: Job, _: Context| {
                handled.lock().unwrap().push(job.n);
                async { Ok::<_, HandleError>(()) }
            }
        })
        .build();
    let consumer = Consumer::builder(t.clone(), q.clone())
        .serve(router)
        .spawn();
    let handled_so_far = || handled.lock().unwrap().clone();
    let wait_for = |n: u32| async move {
        let until = Instant::now() + Duration::from_secs(15);
        while !handled_so_far().contains(&n) && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        handled_so_far()
    };
    let result = async {
        t.publish(&q, Envelope::new(Job::TYPE, r#"{"n":1}"#))
            .await
            .unwrap();
        assert_eq!(wait_for(1).await, [1], "the first message was not handled");
        // A pull request is waiting on the server now; deleting the
        // consumer ends it.
        let js = async_nats::jetstream::new(async_nats::connect(url()).await.unwrap());
        js.get_stream(&q)
            .await
            .unwrap()
            .delete_consumer("switchyard")
            .await
            .unwrap();
        t.publish(&q, Envelope::new(Job::TYPE, r#"{"n":2}"#))
            .await
            .unwrap();
        let handled = wait_for(2).await;
        assert!(
            handled.contains(&2),
            "the message published after the consumer was deleted was not handled: {handled:?}"
        );
        let stats = settled_stats(&t, &q).await;
        assert_eq!((stats.depth, stats.in_flight), (Some(0), Some(0)));
    };
    let outcome = futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(result)).await;
    let report = consumer.shutdown().await;
    remove_stream(&url(), &q).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    let report = report.unwrap();
    assert_eq!(report.received, report.acked, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumption_resumes_by_itself_after_a_server_restart_and_nothing_is_lost() {
    const N: u32 = 2000;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let port = 14222 + (std::process::id() % 1000) as u16;
    let dir = std::env::temp_dir().join(format!("sy-nats-{}", std::process::id()));
    let mut server = PrivateServer::start(port, &dir, &[]);
    server.wait_ready().await;
    let url = format!("nats://127.0.0.1:{port}");
    let t = connect_to(&url).await;
    let q = "restart";
    t.declare(&Topology::new().queue(QueueSpec::new(q)))
        .await
        .unwrap();
    for n in 0..N {
        t.publish(q, Envelope::new(Job::TYPE, format!(r#"{{"n":{n}}}"#)))
            .await
            .unwrap();
    }
    let handled: Arc<Mutex<HashMap<u32, u32>>> = Arc::default();
    let router = Router::builder()
        .route({
            let handled = Arc::clone(&handled);
            move |job: Job, _: Context| {
                let handled = Arc::clone(&handled);
                async move {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    *handled.lock().unwrap().entry(job.n).or_default() += 1;
                    Ok::<_, HandleError>(())
                }
            }
        })
        .build();
    let consumer = Consumer::builder(t.clone(), q)
        .concurrency(32)
        .serve_default(router)
        .spawn();
    let distinct = || handled.lock().unwrap().len() as u32;
    let deadline = Instant::now() + Duration::from_secs(60);
    while distinct() < N / 4 {
        assert!(Instant::now() < deadline, "consumption did not start");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.restart();
    let at_restart = distinct();
    assert!(at_restart < N, "the restart came after the work was done");
    server.wait_ready().await;
    let deadline = Instant::now() + Duration::from_secs(40);
    while distinct() < N {
        assert!(
            Instant::now() < deadline,
            "only {} of {N} handled after the restart: consumption did not resume ({:?})",
            distinct(),
            consumer.stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report = consumer.shutdown().await;
    let twice = handled.lock().unwrap().values().filter(|c| **c > 1).count();
    assert_eq!(twice, 0, "handled twice despite dedupe ({report:?})");
}
