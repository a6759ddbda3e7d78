//! The consumer runtime end to end on the memory transport: settlement by
//! error class, panics, bounded concurrency, leases, drain and shutdown.

mod common;

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::{broker, broker_with, dead_letters, eventually, publisher, Job};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use switchyard::memory::MemoryTransport;
use switchyard::{
    Consumer, Context, DeadLetterReason, Envelope, HandleError, Message, QueueSpec, Router,
    SubscribeOptions, Topology, Transport,
};

#[derive(Serialize, Deserialize, Debug)]
struct JobV2 {
    n: u32,
}

impl Message for JobV2 {
    const TYPE: &'static str = "test.job";
    const VERSION: u32 = 2;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_retry_until_the_budget_then_dead_letter() {
    let broker = broker().await;
    let calls = Arc::new(AtomicU32::new(0));
    let router = Router::builder()
        .route({
            let calls = Arc::clone(&calls);
            move |_: Job, cx: Context| {
                let calls = Arc::clone(&calls);
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err(HandleError::transient(format!(
                        "database unavailable on attempt {}",
                        cx.attempt()
                    )))
                }
            }
        })
        .build();
    let consumer = Consumer::builder(broker.clone(), "jobs")
        .max_attempts(3)
        .serve(router)
        .spawn();
    publisher(&broker)
        .publish("jobs", &Job { n: 1 })
        .await
        .unwrap();
    eventually("dead-lettered", || consumer.stats().dead_lettered() == 1).await;
    let report = consumer.shutdown().await.unwrap();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "exactly max_attempts handler calls"
    );
    assert_eq!(report.retried, 2);
    let dead = dead_letters(&broker, "jobs.dlq").await;
    assert_eq!(dead.len(), 1);
    let (_, info) = &dead[0];
    assert_eq!(info.reason, DeadLetterReason::MaxAttempts);
    assert_eq!(info.attempts, 3);
    assert_eq!(info.detail, "database unavailable on attempt 3");
    assert_eq!(info.source, "jobs");
    assert_eq!(broker.depth("jobs"), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_failure_that_recovers_is_acked() {
    let broker = broker().await;
    let router = Router::builder()
        .route(|_: Job, cx: Context| async move {
            if cx.attempt() < 3 {
                return Err(
                    HandleError::transient("flaky").with_retry_after(Duration::from_millis(20))
                );
            }
            Ok(())
        })
        .build();
    let consumer = Consumer::builder(broker.clone(), "jobs")
        .max_attempts(5)
        .serve(router)
        .spawn();
    publisher(&broker)
        .publish("jobs", &Job { n: 1 })
        .await
        .unwrap();
    eventually("acked", || consumer.stats().acked() == 1).await;
    let report = consumer.shutdown().await.unwrap();
    assert_eq!(
        (report.retried, report.dead_lettered, report.acked),
        (2, 0, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_errors_dead_letter_at_once_and_rejections_ack() {
    let broker = broker().await;
    let calls = Arc::new(AtomicU32::new(0));
    let router = Router::builder()
        .route({
            let calls = Arc::clone(&calls);
            move |job: Job, _: Context| {
                let calls = Arc::clone(&calls);
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    match job.n {
                        1 => Err(HandleError::permanent("sku does not exist")),
                        _ => Err(HandleError::rejected("out of stock")),
                    }
                }
            }
        })
        .build();
    let consumer = Consumer::builder(broker.clone(), "jobs")
        .serve(router)
        .spawn();
    let p = publisher(&broker);
    p.publish("jobs", &Job { n: 1 }).await.unwrap();
    p.publish("jobs", &Job { n: 2 }).await.unwrap();
    eventually("both settled", || {
        consumer.stats().dead_lettered() + consumer.stats().acked() == 2
    })
    .await;
    let report = consumer.shutdown().await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2, "neither is retried");
    assert_eq!(
        (report.dead_lettered, report.acked, report.retried),
        (1, 1, 0)
    );
    let dead = dead_letters(&broker, "jobs.dlq").await;
    assert_eq!(dead[0].1.reason, DeadLetterReason::Permanent);
    assert_eq!(dead[0].1.detail, "sku does not exist");
    assert_eq!(dead[0].1.attempts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_unknown_and_unsupported_messages_are_dead_lettered_with_reasons() {
    let broker = broker().await;
    let router = Router::builder()
        .route(|_: Job, _: Context| async { Ok(()) })
        .build();
    let consumer = Consumer::builder(broker.clone(), "jobs")
        .serve(router)
        .spawn();
    broker
        .publish(
            "jobs",
            Envelope::new("test.job", "{not json").with_id("malformed"),
        )
        .await
        .unwrap();
    broker
        .publish("jobs", Envelope::new("test.other", "{}").with_id("unknown"))
        .await
        .unwrap();
    broker
        .publish(
            "jobs",
            Envelope::new("test.job", "{\"n\":1}")
                .with_schema_version(9)
                .with_id("future"),
        )
        .await
        .unwrap();
    broker
        .publish(
            "jobs",
            Envelope::new("test.job", "{\"n\":1}").with_id("fine"),
        )
        .await
        .unwrap();
    eventually("all settled", || {
        consumer.stats().dead_lettered() == 3 && consumer.stats().acked() == 1
    })
    .await;
    consumer.shutdown().await.unwrap();
    let mut reasons: Vec<_> = dead_letters(&broker, "jobs.dlq")
        .await
        .into_iter()
        .map(|(env, info)| (env.id.to_string(), info.reason.to_string(), info.detail))
        .collect();
    reasons.sort();
    assert_eq!(reasons[0].0, "future");
    assert_eq!(reasons[0].1, "unsupported-version");
    assert!(
        reasons[0].2.contains("schema version 9"),
        "{}",
        reasons[0].2
    );
    assert_eq!(reasons[1].0, "malformed");
    assert_eq!(reasons[1].1, "malformed");
    assert!(
        reasons[1]
            .2
            .starts_with("cannot decode test.job v1 payload"),
        "{}",
        reasons[1].2
    );
    assert_eq!(reasons[2].0, "unknown");
    assert_eq!(reasons[2].1, "unknown-type");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_route_to_their_own_handlers() {
    let broker = broker().await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let router = Router::builder()
        .route({
            let seen = Arc::clone(&seen);
            move |j: Job, _: Context| {
                let seen = Arc::clone(&seen);
                async move {
                    seen.lock().unwrap().push(format!("v1:{}", j.n));
                    Ok(())
                }
            }
        })
        .route({
            let seen = Arc::clone(&seen);
            move |j: JobV2, _: Context| {
                let seen = Arc::clone(&seen);
                async move {
                    seen.lock().unwrap().push(format!("v2:{}", j.n));
                    Ok(())
                }
            }
        })
        .build();
    let consumer = Consumer::builder(broker.clone(), "jobs")
        .concurrency(1)
        .serve(router)
        .spawn();
    let p = publisher(&broker);
    p.publish("jobs", &Job { n: 1 }).await.unwrap();
    p.publish("jobs", &JobV2 { n: 2 }).await.unwrap();
    eventually("both handled", || consumer.stats().acked() == 2).await;
    consumer.shutdown().await.unwrap();
    assert_eq!(*seen.lock().unwrap(), ["v1:1", "v2:2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_fails_only_its_message() {
    let broker = broker().await;
    let handled = Arc::new(AtomicUsize::new(0));
    let router = Router::builder()
        .route({
            let handled = Arc::clone(&handled);
            move |job: Job, _: Context| {
                let handled = Arc::clone(&handled);
                async move {
                    if job.n == 13 {
                        panic!("unlucky number {}", job.n);
                    }
                    handled.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            }
        })
        .build();
    let consumer = Consumer::builder(broker.clone(), "jobs")
        .max_attempts(2)
        .serve(router)
        .spawn();
    let p = publisher(&broker);
    for n in 0..20 {
        p.publish("jobs", &Job { n }).await.unwrap();
    }
    eventually("all settled", || {
        handled.load(Ordering::SeqCst) == 19 && consumer.stats().dead_lettered() == 1
    })
    .await;
    assert!(!consumer.is_finished(), "the consumer keeps running");
    // And it still takes new work.
    p.publish("jobs", &Job { n: 100 }).await.unwrap();
    eventually("handled after the panic", || {
        handled.load(Ordering::SeqCst) == 20
    })
    .await;
    consumer.shutdown().await.unwrap();
    let dead = dead_letters(&broker, "jobs.dlq").await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].1.reason, DeadLetterReason::MaxAttempts);
    assert_eq!(dead[0].1.detail, "handler panicked: unlucky number 13");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_work_never_exceeds_the_concurrency() {
    let broker = broker().await;
    let current = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let router = Router::builder()
        .route({
            let (current, peak) = (Arc::clone(&current), Arc::clone(&peak));
            move |_: Job, _: Context| {
                let (current, peak) = (Arc::clone(&current), Arc::clone(&peak));
                async move {
                    let now = current.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    current.fetch_sub(1, Ordering::SeqCst);
                    Ok(())
                }
            }
        })
        .build();
    let consumer = Consumer::builder(broker.clone(), "jobs")
        .concurrency(4)
        .serve(router)
        .spawn();
    let p = publisher(&broker);
    for n in 0..100 {
        p.publish("jobs", &Job { n }).await.unwrap();
    }
    eventually("all handled", || consumer.stats().acked() == 100).await;
    consumer.shutdown().await.unwrap();
    let peak = peak.load(Ordering::SeqCst);
    assert!(peak <= 4, "{peak} handlers ran at once with concurrency 4");
    assert!(peak >= 2, "handlers never overlapped (peak {peak})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_work_and_stops_pulling() {
    let broker = broker().await;
    let started = Arc::new(AtomicUsize::new(0));
    let router = Router::builder()
        .route({
            let started = Arc::clone(&started);
            move |_: Job, _: Context| {
                let started = Arc::clone(&started);
                async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Ok(())
                }
            }
        })
        .build();
    let consumer = Consumer::builder(broker.clone(), "jobs")
        .concurrency(2)
        .drain_timeout(Duration::from_secs(5))
        .serve(router)
        .spawn();
    let p = publisher(&broker);
    for n in 0..10 {
        p.publish("jobs", &Job { n }).await.unwrap();
    }
    eventually("two in flight", || started.load(Ordering::SeqCst) == 2).await;
    let report = consumer.shutdown().await.unwrap();
    assert!(!report.drain_timed_out);
    assert_eq!(report.released, 0);
    assert_eq!(
        report.acked, report.received,
        "every pulled delivery finished during the drain"
    );
    assert_eq!(report.received as usize, started.load(Ordering::SeqCst));
    assert_eq!(
        broker.depth("jobs"),
        Some(10 - report.acked as usize),
        "the rest stays queued"
    );
    assert_eq!(broker.in_flight("jobs"), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_releases_work_past_the_drain_timeout_without_counting_an_attempt() {
    let broker = broker().await;
    let cancelled = Arc::new(AtomicUsize::new(0));
    let router = Router::builder()
        .route({
            let cancelled = Arc::clone(&cancelled);
            move |_: Job, cx: Context| {
                let cancelled = Arc::clone(&cancelled);
                async move {
                    cx.cancellation().cancelled().await;
                    cancelled.fetch_add(1, Ordering::SeqCst);
                    // Ignores cancellation a while longer: the runtime must not wait.
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    Ok(())
                }
            }
        })
        .build();
    let consumer = Consumer::builder(broker.clone(), "jobs")
        .drain_timeout(Duration::from_millis(100))
        .serve(router)
        .spawn();
    publisher(&broker)
        .publish("jobs", &Job { n: 1 })
        .await
        .unwrap();
    eventually("in flight", || broker.in_flight("jobs") == Some(1)).await;
    let report = consumer.shutdown().await.unwrap();
    assert!(report.drain_timed_out);
    assert_eq!(
        (report.released, report.retried, report.dead_lettered),
        (1, 0, 0)
    );
    assert_eq!(
        cancelled.load(Ordering::SeqCst),
        1,
        "the handler saw its cancellation token fire"
    );
    let mut stream = broker
        .subscribe("jobs", SubscribeOptions::default())
        .await
        .unwrap();
    let again = stream.next().await.unwrap().unwrap();
    assert_eq!(again.attempt(), 1, "shutdown is not a failed attempt");
    assert_eq!(broker.depth("jobs.dlq"), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_keeps_crashing_its_consumer_is_dead_lettered_without_another_run() {
    let broker = broker().await;
    publisher(&broker)
        .publish("jobs", &Job { n: 1 })
        .await
        .unwrap();
    // Three consumers "crash" holding it: dropped unsettled, each counts.
    for _ in 0..3 {
        let mut stream = broker
            .subscribe("jobs", SubscribeOptions::default())
            .await
            .unwrap();
        drop(stream.next().await.unwrap().unwrap());
    }
    let calls = Arc::new(AtomicU32::new(0));
    let router = Router::builder()
        .route({
            let calls = Arc::clone(&calls);
            move |_: Job, _: Context| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Ok(()) }
            }
        })
        .build();
    let consumer = Consumer::builder(broker.clone(), "jobs")
        .max_attempts(3)
        .serve(router)
        .spawn();
    eventually("dead-lettered", || consumer.stats().dead_lettered() == 1).await;
    consumer.shutdown().await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    let dead = dead_letters(&broker, "jobs.dlq").await;
    assert_eq!(dead[0].1.reason, DeadLetterReason::MaxAttempts);
    assert_eq!(dead[0].1.attempts, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_extends_leases_while_a_handler_runs() {
    let broker = broker_with(QueueSpec::new("jobs").lease(Duration::from_millis(150))).await;
    let calls = Arc::new(AtomicU32::new(0));
    let router = Router::builder()
        .route({
            let calls = Arc::clone(&calls);
            move |_: Job, _: Context| {
                calls.fetch_add(1, Ordering::SeqCst);
                async {
                    tokio::time::sleep(Duration::from_millis(800)).await;
                    Ok(())
                }
            }
        })
        .build();
    let consumer = Consumer::builder(broker.clone(), "jobs")
        .concurrency(4)
        .serve(router)
        .spawn();
    publisher(&broker)
        .publish("jobs", &Job { n: 1 })
        .await
        .unwrap();
    eventually("acked", || consumer.stats().acked() == 1).await;
    // Were the lease not extended, a second delivery would have started by now.
    let report = consumer.shutdown().await.unwrap();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "redelivered while still being handled"
    );
    assert_eq!((report.received, report.settle_failed), (1, 0));
    assert_eq!(broker.depth("jobs"), Some(0));
}

#[derive(Serialize, Deserialize, Debug)]
struct Followup {
    of: u32,
}

impl Message for Followup {
    const TYPE: &'static str = "test.followup";
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_published_from_a_handler_continue_the_conversation() {
    let broker = broker().await;
    broker
        .declare(&Topology::new().queue(QueueSpec::new("followups")))
        .await
        .unwrap();
    let router = Router::builder()
        .route(|job: Job, cx: Context| async move {
            cx.publish("followups", &Followup { of: job.n }).await?;
            Ok(())
        })
        .build();
    let consumer = Consumer::builder(broker.clone(), "jobs")
        .producer("test-service")
        .serve(router)
        .spawn();
    let deadline = SystemTime::now() + Duration::from_secs(60);
    let incoming = Envelope::new(Job::TYPE, "{\"n\":7}")
        .with_correlation_id("conversation-1")
        .with_deadline(deadline);
    let incoming_id = incoming.id.clone();
    broker.publish("jobs", incoming).await.unwrap();
    let mut stream = broker
        .subscribe("followups", SubscribeOptions::default())
        .await
        .unwrap();
    let out = stream.next().await.unwrap().unwrap();
    consumer.shutdown().await.unwrap();
    let env = out.envelope();
    assert_eq!(env.kind, "test.followup");
    assert_eq!(env.correlation_id.as_deref(), Some("conversation-1"));
    assert_eq!(env.causation_id.as_deref(), Some(incoming_id.as_str()));
    assert_eq!(env.deadline, Some(deadline), "the deadline is inherited");
    assert_eq!(env.producer.as_deref(), Some("test-service"));
    assert_eq!(env.content_type.as_deref(), Some("application/json"));
    assert_ne!(env.id, incoming_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn towers_own_layers_drop_into_the_pipeline() {
    use tower::ServiceBuilder;

    let broker = broker().await;
    let router = Router::builder()
        .route(|job: Job, _: Context| async move {
            if job.n == 0 {
                // Hangs: tower's Timeout gives up, which counts as transient.
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            Ok(())
        })
        .build();
    // RateLimit is not Clone: the runtime drives one pipeline instance.
    // The first layer is outermost: ConcurrencyLimit's readiness holds
    // messages at the broker (the runtime waits for poll_ready before it
    // pulls), so LoadShed inside it never has to shed.
    let pipeline = ServiceBuilder::new()
        .rate_limit(1000, Duration::from_secs(1))
        .concurrency_limit(4)
        .load_shed()
        .timeout(Duration::from_millis(50))
        .service(router);
    let consumer = Consumer::builder(broker.clone(), "jobs")
        .max_attempts(2)
        .serve(pipeline)
        .spawn();
    let p = publisher(&broker);
    for n in 0..10 {
        p.publish("jobs", &Job { n }).await.unwrap();
    }
    eventually("settled", || {
        consumer.stats().acked() == 9 && consumer.stats().dead_lettered() == 1
    })
    .await;
    let report = consumer.shutdown().await.unwrap();
    assert_eq!(report.retried, 1);
    let dead = dead_letters(&broker, "jobs.dlq").await;
    assert_eq!(dead[0].1.reason, DeadLetterReason::MaxAttempts);
    assert!(
        dead[0].1.detail.contains("timed out"),
        "{}",
        dead[0].1.detail
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribing_to_an_undeclared_source_is_a_clear_error() {
    let broker = MemoryTransport::new();
    let router = Router::builder()
        .route(|_: Job, _: Context| async { Ok(()) })
        .build();
    let consumer = Consumer::builder(broker, "nope").serve(router).spawn();
    let err = consumer.shutdown().await.unwrap_err();
    assert_eq!(err.kind(), switchyard::TransportErrorKind::NotFound);
    assert!(err.to_string().contains("\"nope\""), "{err}");
}
