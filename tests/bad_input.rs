//! Bad input through the default middleware stack on the memory transport:
//! each case ends in its stated outcome, and the consumer keeps running.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::{broker, dead_letters, eventually, Job};
use switchyard::memory::MemoryTransport;
use switchyard::middleware::deadline::DeadlinePolicy;
use switchyard::middleware::Stack;
use switchyard::{
    header_names, Consumer, ConsumerHandle, Context, DeadLetterReason, Envelope, HandleError,
    Message, Router, Transport,
};

const MAX_PAYLOAD: usize = 1024;

struct Harness {
    broker: MemoryTransport,
    consumer: ConsumerHandle,
    handled: Arc<Mutex<Vec<u32>>>,
    panics: Arc<AtomicUsize>,
}

/// A consumer with the default stack whose handler panics on n = 13 and
/// hangs on n = 99; everything else is handled.
async fn start(policy: DeadlinePolicy) -> Harness {
    let broker = broker().await;
    let handled: Arc<Mutex<Vec<u32>>> = Arc::default();
    let panics = Arc::new(AtomicUsize::new(0));
    let router = Router::builder()
        .route({
            let (handled, panics) = (Arc::clone(&handled), Arc::clone(&panics));
            move |job: Job, _: Context| {
                let (handled, panics) = (Arc::clone(&handled), Arc::clone(&panics));
                async move {
                    match job.n {
                        13 => {
                            panics.fetch_add(1, Ordering::SeqCst);
                            panic!("thirteen");
                        }
                        99 => std::future::pending::<()>().await,
                        _ => {}
                    }
                    handled.lock().unwrap().push(job.n);
                    Ok::<_, HandleError>(())
                }
            }
        })
        .build();
    let stack = Stack::new()
        .max_payload(MAX_PAYLOAD)
        .deadline(policy)
        .timeout(Duration::from_millis(100))
        .retry_policy(switchyard::middleware::retry::ExponentialBackoff::new(
            Duration::from_millis(1),
            Duration::from_millis(5),
        ))
        .build(router);
    let consumer = Consumer::builder(broker.clone(), "jobs")
        .max_attempts(3)
        .serve(stack)
        .spawn();
    Harness {
        broker,
        consumer,
        handled,
        panics,
    }
}

impl Harness {
    async fn send(&self, env: Envelope) {
        self.broker.publish("jobs", env).await.unwrap();
    }

    /// Waits for `n` dead-letters, checks that a good message is still
    /// handled afterwards, shuts down, and returns the dead-letters by id.
    async fn finish(self, dead: u64) -> Vec<(String, DeadLetterReason, String)> {
        let stats = self.consumer.stats();
        eventually(&format!("{dead} dead-lettered"), || {
            stats.dead_lettered() >= dead
        })
        .await;
        assert!(!self.consumer.is_finished(), "the consumer keeps running");
        self.send(Envelope::new(Job::TYPE, r#"{"n":1000}"#)).await;
        let handled = Arc::clone(&self.handled);
        eventually("a good message after the bad ones", || {
            handled.lock().unwrap().contains(&1000)
        })
        .await;
        let report = self.consumer.shutdown().await.unwrap();
        assert_eq!(report.dead_lettered, dead, "{report:?}");
        let mut out: Vec<_> = dead_letters(&self.broker, "jobs.dlq")
            .await
            .into_iter()
            .map(|(env, info)| (env.id.as_str().to_owned(), info.reason, info.detail))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

async fn one_bad(env: Envelope) -> (DeadLetterReason, String) {
    let h = start(DeadlinePolicy::DeadLetter).await;
    h.send(env).await;
    let mut dead = h.finish(1).await;
    let (_, reason, detail) = dead.remove(0);
    (reason, detail)
}

fn job(payload: impl AsRef<[u8]>) -> Envelope {
    Envelope::new(Job::TYPE, payload.as_ref().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_body() {
    let (reason, detail) = one_bad(job("")).await;
    assert_eq!(reason, DeadLetterReason::Malformed);
    assert_eq!(detail, "the payload is empty");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_one_byte_over_the_limit() {
    let at_limit = format!(r#"{{"n":7{}}}"#, " ".repeat(MAX_PAYLOAD - 7));
    assert_eq!(at_limit.len(), MAX_PAYLOAD);
    let h = start(DeadlinePolicy::DeadLetter).await;
    h.send(job(&at_limit)).await;
    h.send(job(format!("{at_limit} ").as_bytes())).await;
    let dead = h.finish(1).await;
    assert_eq!(dead[0].1, DeadLetterReason::TooLarge);
    assert_eq!(
        dead[0].2,
        format!(
            "payload of {} bytes is over the limit of {MAX_PAYLOAD} bytes",
            MAX_PAYLOAD + 1
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8() {
    let (reason, detail) = one_bad(job(b"{\"n\":\"\xff\xfe\"}")).await;
    assert_eq!(reason, DeadLetterReason::Malformed);
    assert!(
        detail.starts_with("cannot decode test.job v1 payload"),
        "{detail}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_nesting_bomb() {
    let bomb = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let h = start(DeadlinePolicy::DeadLetter).await;
    // Within the size limit: a small bomb, and a deep one at the limit.
    let small = format!("{}{}", "[".repeat(500), "]".repeat(500));
    h.send(job(small.as_bytes())).await;
    let dead = h.finish(1).await;
    assert_eq!(dead[0].1, DeadLetterReason::Malformed);
    assert_eq!(
        dead[0].2,
        "JSON nested 65 levels deep, over the limit of 64"
    );
    // A huge one is stopped by the size check before anything parses it.
    let (reason, _) = one_bad(job(bomb.as_bytes())).await;
    assert_eq!(reason, DeadLetterReason::TooLarge);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_json_keys() {
    let (reason, detail) = one_bad(job(r#"{"n":1,"n":2}"#)).await;
    assert_eq!(reason, DeadLetterReason::Malformed);
    assert!(detail.contains("duplicate field `n`"), "{detail}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailing_garbage_after_valid_json() {
    let (reason, detail) = one_bad(job(r#"{"n":1} and then some"#)).await;
    assert_eq!(reason, DeadLetterReason::Malformed);
    assert!(detail.contains("trailing characters"), "{detail}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_type() {
    let (reason, detail) = one_bad(Envelope::new("test.who-knows", "{}")).await;
    assert_eq!(reason, DeadLetterReason::UnknownType);
    assert_eq!(detail, r#"no handler for message type "test.who-knows""#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_version() {
    let (reason, detail) = one_bad(job(r#"{"n":1}"#).with_schema_version(4)).await;
    assert_eq!(reason, DeadLetterReason::UnsupportedVersion);
    assert_eq!(
        detail,
        r#""test.job" is handled in schema versions [1], not 4"#
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_empty_id() {
    let h = start(DeadlinePolicy::DeadLetter).await;
    h.send(job(r#"{"n":1}"#).with_id("")).await;
    h.send(job(r#"{"n":2}"#).with_id("   ")).await;
    let dead = h.finish(2).await;
    for (_, reason, detail) in dead {
        assert_eq!(reason, DeadLetterReason::Malformed);
        assert_eq!(detail, "the message id is empty");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_10kb_id_with_crlf_is_rejected_and_quoted_escaped() {
    let id = format!(
        "evil\r\nFAKE LOG LINE level=error\r\n{}",
        "x".repeat(10_000)
    );
    let h = start(DeadlinePolicy::DeadLetter).await;
    h.send(job(r#"{"n":1}"#).with_id(id.as_str())).await;
    let dead = h.finish(1).await;
    let (_, reason, detail) = &dead[0];
    assert_eq!(*reason, DeadLetterReason::Malformed);
    assert!(
        detail.starts_with("the message id is 10033 bytes, over the limit of 256"),
        "{detail}"
    );
    assert!(
        detail.contains(r"evil\r\nFAKE LOG LINE"),
        "escaped: {detail}"
    );
    assert!(
        !detail.contains('\n') && !detail.contains('\r'),
        "no raw CR/LF"
    );
    assert!(
        detail.len() < 200,
        "quoted, not copied whole: {} bytes",
        detail.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_deadline_is_dead_lettered() {
    let (reason, detail) =
        one_bad(job(r#"{"n":1}"#).with_deadline(SystemTime::now() - Duration::from_secs(5))).await;
    assert_eq!(reason, DeadLetterReason::Expired);
    assert!(detail.contains("passed"), "{detail}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_deadline_is_dropped_under_the_drop_policy() {
    let h = start(DeadlinePolicy::Drop).await;
    h.send(job(r#"{"n":5}"#).with_deadline(SystemTime::now() - Duration::from_secs(5)))
        .await;
    let stats = h.consumer.stats();
    eventually("acked", || stats.acked() == 1).await;
    let handled = Arc::clone(&h.handled);
    let dead = h.finish(0).await;
    assert!(dead.is_empty());
    assert!(
        !handled.lock().unwrap().contains(&5),
        "the handler never ran"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_that_does_not_parse() {
    let (reason, detail) =
        one_bad(job(r#"{"n":1}"#).with_header(header_names::DEADLINE, "next tuesday\r\n")).await;
    assert_eq!(reason, DeadLetterReason::Malformed);
    assert_eq!(
        detail,
        r#"header switchyard-deadline does not parse: "next tuesday\r\n""#
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_panics_on_one_message() {
    let h = start(DeadlinePolicy::DeadLetter).await;
    for n in [1, 13, 2, 3] {
        h.send(job(format!(r#"{{"n":{n}}}"#).as_bytes())).await;
    }
    let (handled, panics) = (Arc::clone(&h.handled), Arc::clone(&h.panics));
    let dead = h.finish(1).await;
    assert_eq!(dead[0].1, DeadLetterReason::MaxAttempts);
    assert_eq!(dead[0].2, "handler panicked: thirteen");
    assert_eq!(panics.load(Ordering::SeqCst), 3, "once per attempt");
    let mut others = handled.lock().unwrap().clone();
    others.sort_unstable();
    assert_eq!(others, [1, 2, 3, 1000]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_hangs() {
    let (reason, detail) = one_bad(job(r#"{"n":99}"#)).await;
    assert_eq!(reason, DeadLetterReason::MaxAttempts);
    assert_eq!(detail, "the handler timed out after 100ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_id_with_a_different_payload() {
    let h = start(DeadlinePolicy::DeadLetter).await;
    let first = job(r#"{"n":1}"#);
    let reused = job(r#"{"n":2}"#).with_id(first.id.clone());
    let dup = first.clone();
    h.send(first).await;
    let handled = Arc::clone(&h.handled);
    eventually("the first handled", || handled.lock().unwrap().contains(&1)).await;
    h.send(dup).await;
    h.send(reused).await;
    let dead = h.finish(1).await;
    assert_eq!(dead[0].1, DeadLetterReason::IdReuse);
    assert!(dead[0].2.contains("different payload"), "{}", dead[0].2);
    assert_eq!(
        *handled.lock().unwrap(),
        [1, 1000],
        "the duplicate was not handled again, nor the reused id"
    );
}

#[test]
fn job_type_is_stable() {
    assert_eq!(Job::TYPE, "test.job");
}
