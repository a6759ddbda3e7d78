//! Each middleware layer on the memory transport.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{broker, dead_letters, eventually, publisher, Job};
use futures_util::StreamExt;
use switchyard::middleware::dedupe::{DedupeLayer, MemoryDedupeStore};
use switchyard::middleware::ordering::OrderingLayer;
use switchyard::middleware::retry::{ExponentialBackoff, RetryLayer};
use switchyard::middleware::trace::{TraceLayer, TraceParent};
use switchyard::middleware::Stack;
use switchyard::{
    AckReason, Consumer, Context, DeadLetterReason, Envelope, HandleError, Message, Outcome,
    QueueSpec, Router, SubscribeOptions, Topology, Transport,
};
use tower::ServiceBuilder;

fn counting_router(
    calls: &Arc<AtomicUsize>,
    behaviour: impl Fn(Job, Context) -> Result<(), HandleError> + Send + Sync + 'static,
) -> Router {
    let calls = Arc::clone(calls);
    let behaviour = Arc::new(behaviour);
    Router::builder()
        .route(move |job: Job, cx: Context| {
            calls.fetch_add(1, Ordering::SeqCst);
            let behaviour = Arc::clone(&behaviour);
            async move { behaviour(job, cx) }
        })
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_backs_off_honours_hints_and_calls_its_hooks() {
    let broker = broker().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let router = counting_router(&calls, |job, _| {
        Err(HandleError::transient("down")
            .with_retry_after(Duration::from_millis(u64::from(job.n))))
    });
    let retries: Arc<Mutex<Vec<(u32, Duration)>>> = Arc::default();
    let dead: Arc<Mutex<Vec<(u32, String)>>> = Arc::default();
    let layer = RetryLayer::new()
        .policy(
            ExponentialBackoff::new(Duration::from_millis(10), Duration::from_secs(1))
                .without_jitter(),
        )
        .on_retry({
            let retries = Arc::clone(&retries);
            move |e, delay| {
                retries.lock().unwrap().push((e.attempt, delay));
            }
        })
        .on_dead_letter({
            let dead = Arc::clone(&dead);
            move |e, reason| {
                dead.lock()
                    .unwrap()
                    .push((e.attempt, format!("{reason}: {}", e.detail)));
            }
        });
    let consumer = Consumer::builder(broker.clone(), "jobs")
        .max_attempts(4)
        .serve(ServiceBuilder::new().layer(layer).service(router))
        .spawn();
    // The hint (30 ms) beats the backoff (10, 20 ms) until the backoff grows past it (40 ms).
    publisher(&broker)
        .publish("jobs", &Job { n: 30 })
        .await
        .unwrap();
    let stats = consumer.stats();
    eventually("dead-lettered", || stats.dead_lettered() == 1).await;
    consumer.shutdown().await.unwrap();
    let ms = |n| Duration::from_millis(n);
    assert_eq!(
        *retries.lock().unwrap(),
        [(1, ms(30)), (2, ms(30)), (3, ms(40))]
    );
    assert_eq!(
        *dead.lock().unwrap(),
        [(4, "max-attempts: down".to_owned())]
    );
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failures_skip_the_retries_and_rejections_are_acked() {
    let broker = broker().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let router = counting_router(&calls, |job, _| match job.n {
        1 => Err(HandleError::permanent("bad sku")),
        _ => Err(HandleError::rejected("out of stock")),
    });
    let consumer = Consumer::builder(broker.clone(), "jobs")
        .serve(
            ServiceBuilder::new()
                .layer(RetryLayer::new())
                .service(router),
        )
        .spawn();
    let p = publisher(&broker);
    p.publish("jobs", &Job { n: 1 }).await.unwrap();
    p.publish("jobs", &Job { n: 2 }).await.unwrap();
    let stats = consumer.stats();
    eventually("settled", || {
        stats.dead_lettered() == 1 && stats.acked() == 1
    })
    .await;
    let report = consumer.shutdown().await.unwrap();
    assert_eq!((report.retried, calls.load(Ordering::SeqCst)), (0, 2));
    assert_eq!(
        dead_letters(&broker, "jobs.dlq").await[0].1.reason,
        DeadLetterReason::Permanent
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedupe_acks_duplicates_without_calling_the_handler() {
    let broker = broker().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let router = counting_router(&calls, |_, _| Ok(()));
    let consumer = Consumer::builder(broker.clone(), "jobs")
        .serve(
            ServiceBuilder::new()
                .layer(DedupeLayer::new(MemoryDedupeStore::new()))
                .service(router),
        )
        .spawn();
    let env = Envelope::new(Job::TYPE, r#"{"n":1}"#);
    for copy in 1..=3 {
        broker.publish("jobs", env.clone()).await.unwrap();
        let stats = consumer.stats();
        eventually("acked", || stats.acked() == copy).await;
    }
    consumer.shutdown().await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_never_both_run_and_failures_are_not_recorded() {
    let broker = broker().await;
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let router = Router::builder()
        .route({
            let (running, peak, calls) =
                (Arc::clone(&running), Arc::clone(&peak), Arc::clone(&calls));
            move |_: Job, cx: Context| {
                let (running, peak, calls) =
                    (Arc::clone(&running), Arc::clone(&peak), Arc::clone(&calls));
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    // The first attempt fails: its id must not be recorded.
                    if cx.attempt() == 1 {
                        return Err(HandleError::transient("first attempt fails"));
                    }
                    Ok(())
                }
            }
        })
        .build();
    let dedupe = DedupeLayer::new(MemoryDedupeStore::new()).busy_retry(Duration::from_millis(20));
    let consumer = Consumer::builder(broker.clone(), "jobs")
        .concurrency(8)
        .max_attempts(10)
        .serve(ServiceBuilder::new().layer(dedupe).service(router))
        .spawn();
    let env = Envelope::new(Job::TYPE, r#"{"n":1}"#);
    for _ in 0..4 {
        broker.publish("jobs", env.clone()).await.unwrap();
    }
    let stats = consumer.stats();
    eventually("all four copies acked", || stats.acked() == 4).await;
    consumer.shutdown().await.unwrap();
    assert_eq!(
        peak.load(Ordering::SeqCst),
        1,
        "two copies ran the handler at once"
    );
    // Copy one fails on attempt 1 (not recorded), succeeds later; the others
    // were held back while it ran, then acked as duplicates... unless one of
    // them got its claim first after the failure: either way exactly one
    // handler success, and the failure did not count as processed.
    assert!(
        calls.load(Ordering::SeqCst) >= 2,
        "the failed attempt was retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordering_serialises_each_key_and_runs_keys_concurrently() {
    let broker = broker().await;
    let log: Arc<Mutex<Vec<(String, u32)>>> = Arc::default();
    let per_key_running: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let overlap = Arc::new(AtomicUsize::new(0));
    let running = Arc::new(AtomicUsize::new(0));
    let router = Router::builder()
        .route({
            let (log, per_key, overlap, running) = (
                Arc::clone(&log),
                Arc::clone(&per_key_running),
                Arc::clone(&overlap),
                Arc::clone(&running),
            );
            move |job: Job, cx: Context| {
                let (log, per_key, overlap, running) = (
                    Arc::clone(&log),
                    Arc::clone(&per_key),
                    Arc::clone(&overlap),
                    Arc::clone(&running),
                );
                async move {
                    let key = cx.envelope().partition_key.clone().unwrap();
                    {
                        let mut m = per_key.lock().unwrap();
                        let c = m.entry(key.clone()).or_default();
                        *c += 1;
                        assert_eq!(*c, 1, "two messages of key {key} at once");
                    }
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    overlap.fetch_max(now, Ordering::SeqCst);
                    // Later messages finish faster: without ordering they would overtake.
                    tokio::time::sleep(Duration::from_millis(u64::from(20 - job.n % 20))).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    *per_key.lock().unwrap().get_mut(&key).unwrap() -= 1;
                    log.lock().unwrap().push((key, job.n));
                    Ok::<_, HandleError>(())
                }
            }
        })
        .build();
    let consumer = Consumer::builder(broker.clone(), "jobs")
        .concurrency(16)
        .serve(
            ServiceBuilder::new()
                .layer(OrderingLayer::new())
                .service(router),
        )
        .spawn();
    let keys = ["a", "b", "c", "d"];
    for n in 0..40u32 {
        let env = Envelope::new(Job::TYPE, format!(r#"{{"n":{n}}}"#))
            .with_partition_key(keys[n as usize % 4]);
        broker.publish("jobs", env).await.unwrap();
    }
    let stats = consumer.stats();
    eventually("all handled", || stats.acked() == 40).await;
    consumer.shutdown().await.unwrap();
    let log = log.lock().unwrap().clone();
    for key in keys {
        let seq: Vec<u32> = log
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, n)| *n)
            .collect();
        let mut sorted = seq.clone();
        sorted.sort_unstable();
        assert_eq!(seq, sorted, "key {key} out of order");
        assert_eq!(seq.len(), 10);
    }
    assert!(
        overlap.load(Ordering::SeqCst) >= 2,
        "different keys never ran concurrently"
    );
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Followup;

impl Message for Followup {
    const TYPE: &'static str = "test.followup";
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_context_continues_into_published_messages() {
    let broker = broker().await;
    broker
        .declare(&Topology::new().queue(QueueSpec::new("out")))
        .await
        .unwrap();
    let router = Router::builder()
        .route(|_: Job, cx: Context| async move {
            cx.publish("out", &Followup).await?;
            Ok(())
        })
        .build();
    let consumer = Consumer::builder(broker.clone(), "jobs")
        .serve(
            ServiceBuilder::new()
                .layer(TraceLayer::new())
                .service(router),
        )
        .spawn();
    let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut env = Envelope::new(Job::TYPE, r#"{"n":1}"#);
    env.trace.traceparent = Some(incoming.into());
    env.trace.tracestate = Some("vendor=1".into());
    broker.publish("jobs", env).await.unwrap();
    let mut out = broker
        .subscribe("out", SubscribeOptions::default())
        .await
        .unwrap();
    let published = out.next().await.unwrap().unwrap();
    consumer.shutdown().await.unwrap();
    let parent = TraceParent::parse(incoming).unwrap();
    let child =
        TraceParent::parse(published.envelope().trace.traceparent.as_deref().unwrap()).unwrap();
    assert_eq!(child.trace_id, parent.trace_id, "same trace");
    assert_ne!(child.span_id, parent.span_id, "the delivery's own span");
    assert_eq!(child.flags, parent.flags);
    assert_eq!(
        published.envelope().trace.tracestate.as_deref(),
        Some("vendor=1")
    );
}

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn each_delivery_gets_a_span_with_its_identity_and_outcome() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer({
            let c = captured.clone();
            move || c.clone()
        })
        .with_ansi(false)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let broker = broker().await;
    let router = Router::builder()
        .route(|_: Job, _: Context| async { Ok::<_, HandleError>(()) })
        .build();
    let consumer = Consumer::builder(broker.clone(), "jobs").serve_default(router);
    let consumer = consumer.spawn();
    let env = Envelope::new(Job::TYPE, r#"{"n":1}"#)
        .with_correlation_id("conv-9")
        .with_header("x", "y");
    let id = env.id.to_string();
    broker.publish("jobs", env).await.unwrap();
    let stats = consumer.stats();
    eventually("acked", || stats.acked() == 1).await;
    consumer.shutdown().await.unwrap();
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("switchyard.delivery"))
        .unwrap_or_else(|| panic!("no span in {text}"));
    for field in [
        format!("message_id={id}"),
        "message_type=test.job".into(),
        "correlation_id=\"conv-9\"".into(),
        "attempt=1".into(),
        "consumer=jobs".into(),
        "outcome=\"acked\"".into(),
    ] {
        assert!(line.contains(&field), "{field} missing from {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_stack_is_one_call() {
    let broker = broker().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let router = counting_router(&calls, |_, _| Ok(()));
    let consumer = Consumer::builder(broker.clone(), "jobs")
        .serve_default(router)
        .spawn();
    let env = Envelope::new(Job::TYPE, r#"{"n":1}"#);
    broker.publish("jobs", env.clone()).await.unwrap();
    broker.publish("jobs", env).await.unwrap();
    broker
        .publish("jobs", Envelope::new("nobody.handles", "{}"))
        .await
        .unwrap();
    let stats = consumer.stats();
    eventually("settled", || {
        stats.acked() == 2 && stats.dead_lettered() == 1
    })
    .await;
    consumer.shutdown().await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1, "deduplicated");
    assert_eq!(
        dead_letters(&broker, "jobs.dlq").await[0].1.reason,
        DeadLetterReason::UnknownType
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stack_hooks_see_retries_and_dead_letters() {
    let broker = broker().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let router = counting_router(&calls, |_, _| Err(HandleError::transient("nope")));
    let (retries, dead) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let stack = Stack::new()
        .retry_policy(ExponentialBackoff::new(
            Duration::from_millis(1),
            Duration::from_millis(2),
        ))
        .on_retry({
            let retries = Arc::clone(&retries);
            move |_, _| {
                retries.fetch_add(1, Ordering::SeqCst);
            }
        })
        .on_dead_letter({
            let dead = Arc::clone(&dead);
            move |_, _| {
                dead.fetch_add(1, Ordering::SeqCst);
            }
        })
        .build(router);
    let consumer = Consumer::builder(broker.clone(), "jobs")
        .max_attempts(3)
        .serve(stack)
        .spawn();
    publisher(&broker)
        .publish("jobs", &Job { n: 1 })
        .await
        .unwrap();
    let stats = consumer.stats();
    eventually("dead-lettered", || stats.dead_lettered() == 1).await;
    consumer.shutdown().await.unwrap();
    assert_eq!(
        (retries.load(Ordering::SeqCst), dead.load(Ordering::SeqCst)),
        (2, 1)
    );
}

#[test]
fn outcome_labels_are_stable() {
    assert_eq!(Outcome::Ack(AckReason::Duplicate).label(), "duplicate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_of_a_keyed_message_does_not_block_its_key() {
    let broker = broker().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let router = counting_router(&calls, |_, _| Ok(()));
    let consumer = Consumer::builder(broker.clone(), "jobs")
        .serve_default(router)
        .spawn();
    let first = Envelope::new(Job::TYPE, r#"{"n":1}"#).with_partition_key("order-1");
    broker.publish("jobs", first.clone()).await.unwrap();
    let stats = consumer.stats();
    eventually("the first handled", || stats.acked() == 1).await;
    // Its redelivery is a duplicate: acked without the handler, and it
    // must give up its ordering turn for the key's later messages.
    broker.publish("jobs", first).await.unwrap();
    for n in 2..=5 {
        let env = Envelope::new(Job::TYPE, format!(r#"{{"n":{n}}}"#)).with_partition_key("order-1");
        broker.publish("jobs", env).await.unwrap();
    }
    eventually("the key's later messages handled", || stats.acked() == 6).await;
    consumer.shutdown().await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_a_message_in_progress_waits_for_it_instead_of_spending_an_attempt() {
    let broker = broker().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let router = Router::builder()
        .route({
            let calls = Arc::clone(&calls);
            move |_: Job, _: Context| {
                calls.fetch_add(1, Ordering::SeqCst);
                async {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Ok::<_, HandleError>(())
                }
            }
        })
        .build();
    let consumer = Consumer::builder(broker.clone(), "jobs")
        .concurrency(4)
        .serve_default(router)
        .spawn();
    let env = Envelope::new(Job::TYPE, r#"{"n":1}"#);
    broker.publish("jobs", env.clone()).await.unwrap();
    broker.publish("jobs", env).await.unwrap();
    let stats = consumer.stats();
    eventually("both acked", || stats.acked() == 2).await;
    let report = consumer.shutdown().await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(report.retried, 0, "the copy waited in process: {report:?}");
}
