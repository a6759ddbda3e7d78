//! Behaviour specific to SQS, against the local SQS-compatible server.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::MessageSystemAttributeName;
use futures_util::StreamExt;
use switchyard_core::{
    Consumer, Context, DeadLetterInfo, DeadLetterReason, Envelope, HandleError, Message, QueueSpec,
    Settlement, SubscribeOptions, Topology, Transport, TransportErrorKind,
};
use switchyard_sqs::SqsTransport;

async fn queue(t: &SqsTransport, spec: QueueSpec) -> String {
    let name = spec.name.clone();
    t.declare(&Topology::new().queue(spec)).await.unwrap();
    name
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Job {
    n: u32,
}

impl Message for Job {
    const TYPE: &'static str = "test.job";
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_batch_that_partly_fails_reports_only_the_failed_entries() {
    let t = common::connect(common::config()).await;
    let q = queue(&t, QueueSpec::new(common::unique("partial"))).await;
    for n in 0..2 {
        t.publish(&q, Envelope::new("t", format!("old {n}")))
            .await
            .unwrap();
    }
    let mut s = t
        .subscribe(&q, SubscribeOptions::default().prefetch(10))
        .await
        .unwrap();
    let mut old = Vec::new();
    while old.len() < 2 {
        old.push(s.next().await.unwrap().unwrap());
    }
    // The queue is purged under the two unsettled deliveries: their receipt
    // handles are now invalid.
    let url = t.queue_url(&q).await.unwrap();
    t.client()
        .purge_queue()
        .queue_url(&url)
        .send()
        .await
        .unwrap();
    for n in 0..2 {
        t.publish(&q, Envelope::new("t", format!("new {n}")))
            .await
            .unwrap();
    }
    let mut new = Vec::new();
    while new.len() < 2 {
        new.push(s.next().await.unwrap().unwrap());
    }
    let before = t.request_counts();
    // All four acks share one DeleteMessageBatch request.
    let results = futures_util::future::join_all(old.into_iter().chain(new).map(|d| d.ack())).await;
    let after = t.request_counts().since(&before);
    assert_eq!(
        after.delete, 1,
        "one batch request for four acks: {after:?}"
    );
    for r in &results[..2] {
        let e = r.as_ref().unwrap_err();
        assert_eq!(e.kind(), TransportErrorKind::StaleDelivery, "{e}");
        assert!(e.to_string().contains("ReceiptHandleIsInvalid"), "{e}");
    }
    for r in &results[2..] {
        r.as_ref().unwrap();
    }
    let attrs = t.queue_attributes(&url).await.unwrap();
    let depth = |k| attrs.get(&k).map(String::as_str).unwrap_or("?").to_owned();
    assert_eq!(
        depth(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        "0",
        "the two valid entries were deleted"
    );
}

#[tokio::test]
async fn a_batch_publish_reports_the_entries_it_could_not_send_and_sends_the_rest() {
    let t = common::connect(common::config()).await;
    let q = queue(&t, QueueSpec::new(common::unique("batch"))).await;
    let max = t.capabilities().max_payload.unwrap();
    let mut batch: Vec<Envelope> = (0..12)
        .map(|n| Envelope::new("t", format!("{n}")))
        .collect();
    batch[5] = Envelope::new("t", vec![b'x'; max + 1]);
    let err = t.publish_batch(&q, batch).await.unwrap_err();
    assert_eq!(err.total, 12);
    assert_eq!(err.failed.len(), 1, "{err}");
    assert_eq!(err.failed[0].0, 5);
    assert_eq!(err.failed[0].1.kind(), TransportErrorKind::TooLarge);
    let mut s = t
        .subscribe(&q, SubscribeOptions::default().prefetch(20))
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 11 {
        let d = tokio::time::timeout(Duration::from_secs(20), s.next())
            .await
            .expect("eleven messages sent")
            .unwrap()
            .unwrap();
        seen.push(String::from_utf8(d.envelope().payload.to_vec()).unwrap());
        d.ack().await.unwrap();
    }
    seen.sort_by_key(|n| n.parse::<u32>().unwrap());
    let expected: Vec<String> = (0..12).filter(|n| *n != 5).map(|n| n.to_string()).collect();
    assert_eq!(seen, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn visibility_extension_keeps_a_long_handler_from_being_delivered_twice() {
    let t = common::connect(common::config()).await;
    let q = queue(
        &t,
        QueueSpec::new(common::unique("long")).lease(Duration::from_secs(2)),
    )
    .await;
    let calls = Arc::new(AtomicU32::new(0));
    let router = switchyard_core::Router::builder()
        .route({
            let calls = Arc::clone(&calls);
            move |_: Job, _: Context| {
                calls.fetch_add(1, Ordering::SeqCst);
                async {
                    // Three and a half visibility timeouts.
                    tokio::time::sleep(Duration::from_millis(7000)).await;
                    Ok::<_, HandleError>(())
                }
            }
        })
        .build();
    // Two competing consumers: without extension the second would get the
    // message once the first's visibility timeout ran out.
    let a = Consumer::builder(t.clone(), q.clone())
        .serve(router.clone())
        .spawn();
    let b = Consumer::builder(t.clone(), q.clone())
        .serve(router)
        .spawn();
    a.subscribed().await;
    b.subscribed().await;
    t.publish(&q, Envelope::new(Job::TYPE, r#"{"n":1}"#))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while a.stats().acked() + b.stats().acked() < 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Longer than a visibility timeout after the ack: a copy would show.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (ra, rb) = (a.shutdown().await.unwrap(), b.shutdown().await.unwrap());
    assert_eq!(calls.load(Ordering::SeqCst), 1, "{ra:?} {rb:?}");
    assert_eq!(ra.acked + rb.acked, 1);
}

#[tokio::test]
async fn a_retry_hides_the_message_for_its_delay_through_visibility() {
    let t = common::connect(common::config()).await;
    let q = queue(&t, QueueSpec::new(common::unique("retry"))).await;
    t.publish(&q, Envelope::new("t", "x")).await.unwrap();
    let mut s = t.subscribe(&q, SubscribeOptions::default()).await.unwrap();
    let first = s.next().await.unwrap().unwrap();
    assert_eq!(first.attempt(), 1);
    let before = t.request_counts();
    let settled = Instant::now();
    first
        .settle(Settlement::Retry {
            delay: Duration::from_millis(2500),
        })
        .await
        .unwrap();
    let spent = t.request_counts().since(&before);
    assert_eq!(
        (spent.change_visibility, spent.delete, spent.send),
        (1, 0, 0),
        "a retry is one visibility change, not a republish: {spent:?}"
    );
    // A raw receive during the delay finds nothing.
    let url = t.queue_url(&q).await.unwrap();
    let raw = t
        .client()
        .receive_message()
        .queue_url(&url)
        .wait_time_seconds(1)
        .send()
        .await
        .unwrap();
    assert!(raw.messages().is_empty(), "visible during its retry delay");
    let again = tokio::time::timeout(Duration::from_secs(20), s.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // Rounded up to whole seconds, never shortened.
    assert!(
        settled.elapsed() >= Duration::from_secs(3),
        "{:?}",
        settled.elapsed()
    );
    assert_eq!(again.attempt(), 2, "ApproximateReceiveCount");
    again.ack().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_dead_lettered_after_exactly_max_attempts_with_its_metadata() {
    let t = common::connect(common::config()).await;
    let q = queue(&t, QueueSpec::new(common::unique("poison"))).await;
    let (router, calls) =
        switchyard_testkit::failing_router::<Job>(|| HandleError::transient("still broken"));
    let consumer = Consumer::builder(t.clone(), q.clone())
        .max_attempts(3)
        .serve_default(router)
        .spawn();
    let env = Envelope::new(Job::TYPE, r#"{"n":1}"#)
        .with_correlation_id("corr-poison")
        .with_header("x-keep", "me");
    let id = env.id.clone();
    t.publish(&q, env).await.unwrap();
    let mut dead = t
        .subscribe(
            &switchyard_sqs::default_dead_letter(&q),
            SubscribeOptions::default(),
        )
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(60), dead.next())
        .await
        .expect("dead-lettered")
        .unwrap()
        .unwrap();
    let report = consumer.shutdown().await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 3, "{report:?}");
    let env = d.envelope().clone();
    d.ack().await.unwrap();
    assert_eq!(env.id, id);
    assert_eq!(env.correlation_id.as_deref(), Some("corr-poison"));
    assert_eq!(env.headers.get("x-keep"), Some("me"));
    let info = DeadLetterInfo::read_from(&env.headers).unwrap();
    assert_eq!(info.reason, DeadLetterReason::MaxAttempts);
    assert_eq!(
        (info.attempts, info.detail.as_str(), info.source.as_str()),
        (3, "still broken", q.as_str())
    );
    // Gone from the source.
    let url = t.queue_url(&q).await.unwrap();
    let attrs = t.queue_attributes(&url).await.unwrap();
    for key in [
        aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages,
        aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
    ] {
        assert_eq!(attrs.get(&key).map(String::as_str), Some("0"), "{key:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_keeps_order_per_group_with_groups_interleaved() {
    let t = common::connect(common::config().fifo(true)).await;
    let q = queue(&t, QueueSpec::new(common::unique("order"))).await;
    let groups = ["a", "b", "c"];
    let per_group = 15;
    let batch: Vec<Envelope> = (0..per_group)
        .flat_map(|n| {
            groups
                .iter()
                .map(move |g| Envelope::new("t", n.to_string()).with_partition_key(*g))
        })
        .collect();
    t.publish_batch(&q, batch).await.unwrap();
    let mut s = t
        .subscribe(&q, SubscribeOptions::default().prefetch(10))
        .await
        .unwrap();
    let seen: Arc<Mutex<HashMap<String, Vec<u32>>>> = Arc::default();
    let mut total = 0;
    let mut acks = Vec::new();
    while total < groups.len() * per_group {
        let d = tokio::time::timeout(Duration::from_secs(20), s.next())
            .await
            .expect("every message")
            .unwrap()
            .unwrap();
        let env = d.envelope();
        let n: u32 = std::str::from_utf8(&env.payload).unwrap().parse().unwrap();
        seen.lock()
            .unwrap()
            .entry(env.partition_key.clone().unwrap())
            .or_default()
            .push(n);
        total += 1;
        // Settle in the background, as a concurrent consumer would.
        acks.push(tokio::spawn(d.ack()));
    }
    for a in acks {
        a.await.unwrap().unwrap();
    }
    let seen = seen.lock().unwrap();
    for g in groups {
        let got = &seen[g];
        let expected: Vec<u32> = (0..per_group as u32).collect();
        assert_eq!(got, &expected, "group {g} out of order");
    }
}

#[tokio::test]
async fn fifo_deduplicates_a_republished_message_id() {
    let t = common::connect(common::config().fifo(true)).await;
    let q = queue(&t, QueueSpec::new(common::unique("dedup"))).await;
    let env = Envelope::new("t", "once");
    t.publish(&q, env.clone()).await.unwrap();
    t.publish(&q, env.clone()).await.unwrap();
    let mut s = t.subscribe(&q, SubscribeOptions::default()).await.unwrap();
    let d = s.next().await.unwrap().unwrap();
    assert_eq!(d.envelope().id, env.id);
    d.ack().await.unwrap();
    let quiet = tokio::time::timeout(Duration::from_secs(3), s.next()).await;
    assert!(quiet.is_err(), "the copy was delivered too");
}

#[tokio::test]
async fn an_idle_subscription_long_polls_instead_of_busy_looping() {
    let t = common::connect(common::config().wait_time(Duration::from_secs(2))).await;
    let q = queue(&t, QueueSpec::new(common::unique("idle"))).await;
    let mut s = t.subscribe(&q, SubscribeOptions::default()).await.unwrap();
    let before = t.request_counts();
    let idle = tokio::time::timeout(Duration::from_secs(7), s.next()).await;
    assert!(idle.is_err(), "nothing was published");
    let spent = t.request_counts().since(&before);
    // 7 s of 2 s long polls: four receives at most, nothing else.
    assert!(spent.receive <= 4, "{spent:?}");
    assert_eq!(spent.total(), spent.receive, "{spent:?}");
}

#[tokio::test]
async fn oversized_messages_and_unknown_queues_get_clear_errors() {
    let t = common::connect(common::config()).await;
    let max = t.capabilities().max_payload.unwrap();
    let e = t
        .publish("anywhere", Envelope::new("t", vec![b'x'; max + 1]))
        .await
        .unwrap_err();
    assert_eq!(
        e.kind(),
        TransportErrorKind::TooLarge,
        "checked before anything is sent: {e}"
    );
    // A queue made elsewhere with SQS's old 256 KiB limit: checked against
    // the queue's own maximum, counting base64 for a binary payload.
    let q = common::unique("small");
    t.client()
        .create_queue()
        .queue_name(&q)
        .attributes(
            aws_sdk_sqs::types::QueueAttributeName::MaximumMessageSize,
            "262144",
        )
        .send()
        .await
        .unwrap();
    t.publish(&q, Envelope::new("t", vec![b'x'; 200_000]))
        .await
        .expect("200 kB of text fits in 256 KiB");
    let e = t
        .publish(&q, Envelope::new("t", vec![0xffu8; 200_000]))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), TransportErrorKind::TooLarge);
    let text = e.to_string();
    assert!(text.contains("base64") && text.contains("262144"), "{text}");
    let e = t
        .publish("sy-test-no-such-queue", Envelope::new("t", "x"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), TransportErrorKind::NotFound, "{e}");
    let e = t
        .subscribe("sy-test-no-such-queue", SubscribeOptions::default())
        .await
        .err()
        .unwrap();
    assert_eq!(e.kind(), TransportErrorKind::NotFound, "{e}");
}

#[tokio::test]
async fn the_attempt_comes_from_approximate_receive_count() {
    let t = common::connect(common::config()).await;
    let q = queue(&t, QueueSpec::new(common::unique("count"))).await;
    t.publish(&q, Envelope::new("t", "x")).await.unwrap();
    let url = t.queue_url(&q).await.unwrap();
    // Received (and given back) twice by a raw client first.
    for _ in 0..2 {
        let out = t
            .client()
            .receive_message()
            .queue_url(&url)
            .wait_time_seconds(5)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .send()
            .await
            .unwrap();
        let m = &out.messages()[0];
        t.client()
            .change_message_visibility()
            .queue_url(&url)
            .receipt_handle(m.receipt_handle().unwrap())
            .visibility_timeout(0)
            .send()
            .await
            .unwrap();
    }
    let mut s = t.subscribe(&q, SubscribeOptions::default()).await.unwrap();
    let d = s.next().await.unwrap().unwrap();
    assert_eq!(d.attempt(), 3);
    d.ack().await.unwrap();
}

/// A subscription dropped while its long poll is on the wire leaves that
/// receive running: what it then takes is released in the background.
/// `flush` waits for that, so that a process exiting right after (the CLI)
/// does not leave the messages invisible for their visibility timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_waits_for_what_a_dropped_subscription_still_receives() {
    // A long poll that outlasts the releases below.
    let t = common::connect(common::config().wait_time(Duration::from_secs(5))).await;
    let q = queue(&t, QueueSpec::new(common::unique("orphan"))).await;
    for n in 0..2 {
        t.publish(&q, Envelope::new("t", format!("{n}")))
            .await
            .unwrap();
    }
    let mut s = t.subscribe(&q, SubscribeOptions::default()).await.unwrap();
    let mut held = Vec::new();
    while held.len() < 2 {
        held.push(s.next().await.unwrap().unwrap());
    }
    // Start another long poll (it finds nothing: both are held), and drop
    // the subscription while it waits on the server.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), s.next())
            .await
            .is_err(),
        "nothing else to receive"
    );
    drop(s);
    // Both are held, so nothing can answer that receive yet: it is still
    // waiting on the server when flush begins.
    let before_flush = t.request_counts();
    // Given back (together, as the CLI does) while flush waits: the receive
    // left on the wire takes them again, and its deliveries, dropped,
    // release them once more.
    let (flushed, released) = tokio::join!(
        t.flush(),
        futures_util::future::join_all(held.into_iter().map(|d| d.settle(Settlement::Release)))
    );
    flushed.unwrap();
    for released in released {
        released.unwrap();
    }
    let after_flush = t.request_counts();
    let stats = t.queue_stats(&q).await.unwrap();
    common::remove_queues(&q, false).await;
    // The receive left on the wire was still waiting when flush began, and
    // had been answered (and what it took released) when flush returned.
    assert_eq!(
        (before_flush.receive, after_flush.receive),
        (1, 2),
        "{after_flush:?}"
    );
    assert_eq!(
        (stats.depth, stats.in_flight),
        (Some(2), Some(0)),
        "after flush both messages are visible again"
    );
}
