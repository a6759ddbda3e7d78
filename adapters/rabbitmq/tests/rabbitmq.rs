//! Behaviour specific to RabbitMQ, against the broker on 127.0.0.1:5672.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use switchyard_core::{
    Consumer, Context, DeadLetterInfo, DeadLetterReason, Envelope, HandleError, Message, QueueSpec,
    Settlement, SubscribeOptions, TopicSpec, Topology, Transport, TransportErrorKind,
};
use switchyard_rabbitmq::{RabbitConfig, RabbitTransport};
use switchyard_testkit::{failing_router, next_delivery};

fn url() -> String {
    std::env::var("SWITCHYARD_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

async fn connect() -> RabbitTransport {
    RabbitTransport::connect(RabbitConfig::new(url()).queue_expires(Duration::from_secs(60)))
        .await
        .expect("RabbitMQ on 127.0.0.1:5672")
}

fn unique(name: &str) -> String {
    format!(
        "sy-test-{name}-{}",
        &switchyard_core::MessageId::new().as_str()[24..]
    )
}

async fn queue(t: &RabbitTransport, name: &str) -> String {
    let q = unique(name);
    t.declare(&Topology::new().queue(QueueSpec::new(&q)))
        .await
        .unwrap();
    q
}

#[tokio::test]
async fn a_topic_without_bindings_refuses_the_message() {
    let t = connect().await;
    let topic = unique("lonely-topic");
    t.declare(&Topology::new().topic(TopicSpec::new(&topic)))
        .await
        .unwrap();
    let err = t
        .publish(&topic, Envelope::new("t", "x"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains("unroutable"), "{err}");
}

#[tokio::test]
async fn a_delay_is_rounded_up_to_its_tier_and_never_shortened() {
    let t = RabbitTransport::connect(
        RabbitConfig::new(url())
            .queue_expires(Duration::from_secs(60))
            .delay_tiers([Duration::from_millis(500), Duration::from_secs(2)]),
    )
    .await
    .unwrap();
    let q = queue(&t, "tiers").await;
    t.publish(&q, Envelope::new("t", "x")).await.unwrap();
    let mut s = t.subscribe(&q, SubscribeOptions::default()).await.unwrap();
    let first = s.next().await.unwrap().unwrap();
    let settled = Instant::now();
    // 700 ms is not a tier: it goes to the 2 s one.
    first
        .settle(Settlement::Retry {
            delay: Duration::from_millis(700),
        })
        .await
        .unwrap();
    let again = next_delivery(&mut s).await;
    let waited = settled.elapsed();
    assert!(
        waited >= Duration::from_secs(2),
        "came back after {waited:?}"
    );
    assert_eq!(again.attempt(), 2);
    again.ack().await.unwrap();
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Poison {
    n: u32,
}

impl Message for Poison {
    const TYPE: &'static str = "test.poison";
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_dead_lettered_after_exactly_max_attempts_with_headers_intact() {
    let t = RabbitTransport::connect(
        RabbitConfig::new(url())
            .queue_expires(Duration::from_secs(60))
            .delay_tiers([Duration::from_millis(100)]),
    )
    .await
    .unwrap();
    let q = queue(&t, "poison").await;
    let (router, calls) = failing_router::<Poison>(|| HandleError::transient("still broken"));
    let consumer = Consumer::builder(t.clone(), q.clone())
        .max_attempts(4)
        .serve_default(router)
        .spawn();
    let env = Envelope::new(Poison::TYPE, r#"{"n":1}"#)
        .with_correlation_id("corr-poison")
        .with_header("x-keep", "me");
    let id = env.id.clone();
    t.publish(&q, env).await.unwrap();
    let mut dead = t
        .subscribe(&format!("{q}.dlq"), SubscribeOptions::default())
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(30), dead.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let report = consumer.shutdown().await.unwrap();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        4,
        "exactly max_attempts handler calls ({report:?})"
    );
    let env = d.envelope().clone();
    d.ack().await.unwrap();
    assert_eq!(env.id, id);
    assert_eq!(env.correlation_id.as_deref(), Some("corr-poison"));
    assert_eq!(env.headers.get("x-keep"), Some("me"));
    let info = DeadLetterInfo::read_from(&env.headers).unwrap();
    assert_eq!(info.reason, DeadLetterReason::MaxAttempts);
    assert_eq!(
        (info.attempts, info.detail.as_str(), info.source.as_str()),
        (4, "still broken", q.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_whose_connection_dies_mid_handler_loses_nothing() {
    let q = {
        let t = connect().await;
        let q = queue(&t, "killed").await;
        for n in 0..20 {
            t.publish(&q, Envelope::new("t", format!("{n}")))
                .await
                .unwrap();
        }
        q
    };
    // A consumer takes some messages and "dies" mid-handler: its connection
    // goes away with the deliveries unacknowledged.
    let proxy = switchyard_testkit::FaultProxy::start("127.0.0.1:5672")
        .await
        .unwrap();
    let victim = RabbitTransport::connect(
        RabbitConfig::new(format!("amqp://guest:guest@{}/%2f", proxy.addr()))
            .queue_expires(Duration::from_secs(60)),
    )
    .await
    .unwrap();
    let mut s = victim
        .subscribe(&q, SubscribeOptions::default().prefetch(5))
        .await
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(s.next().await.unwrap().unwrap());
    }
    proxy.cut();
    let survivor = connect().await;
    let mut s = survivor
        .subscribe(&q, SubscribeOptions::default().prefetch(20))
        .await
        .unwrap();
    let mut seen = std::collections::BTreeSet::new();
    let mut redelivered = 0;
    while seen.len() < 20 {
        let d = tokio::time::timeout(Duration::from_secs(30), s.next())
            .await
            .expect("every message comes back")
            .unwrap()
            .unwrap();
        if d.attempt() > 1 {
            redelivered += 1;
        }
        seen.insert(String::from_utf8(d.envelope().payload.to_vec()).unwrap());
        d.ack().await.unwrap();
    }
    assert_eq!(
        redelivered, 5,
        "the five held by the dead consumer count an attempt"
    );
}

#[tokio::test]
async fn the_password_never_shows_in_errors_or_debug() {
    let config = RabbitConfig::new("amqp://guest:hunter2-secret@127.0.0.1:1/%2f");
    assert!(!format!("{config:?}").contains("hunter2"));
    let err = RabbitTransport::connect(config).await.unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Connection);
    let text = format!("{err} {err:?}");
    assert!(!text.contains("hunter2"), "{text}");
    assert!(text.contains("amqp://***@127.0.0.1:1"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumption_resumes_by_itself_after_the_connection_is_cut_and_nothing_is_lost() {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use switchyard_testkit::FaultProxy;

    const N: usize = 2000;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let direct = connect().await;
    let q = queue(&direct, "cut").await;
    for n in 0..N {
        direct
            .publish(&q, Envelope::new(Poison::TYPE, format!(r#"{{"n":{n}}}"#)))
            .await
            .unwrap();
    }
    let proxy = FaultProxy::start("127.0.0.1:5672").await.unwrap();
    let through_proxy = RabbitTransport::connect(
        RabbitConfig::new(format!("amqp://guest:guest@{}/%2f", proxy.addr()))
            .queue_expires(Duration::from_secs(60)),
    )
    .await
    .unwrap();
    let handled: Arc<Mutex<HashMap<u32, u32>>> = Arc::default();
    let router = switchyard_core::Router::builder()
        .route({
            let handled = Arc::clone(&handled);
            move |p: Poison, _: Context| {
                let handled = Arc::clone(&handled);
                async move {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    *handled.lock().unwrap().entry(p.n).or_default() += 1;
                    Ok::<_, HandleError>(())
                }
            }
        })
        .build();
    let consumer = Consumer::builder(through_proxy, q.clone())
        .concurrency(64)
        .serve_default(router)
        .spawn();
    let distinct = |h: &Arc<Mutex<HashMap<u32, u32>>>| h.lock().unwrap().len();
    let deadline = Instant::now() + Duration::from_secs(60);
    while distinct(&handled) < N / 4 {
        assert!(Instant::now() < deadline, "consumption did not start");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Cut the connection with many deliveries in flight.
    assert!(proxy.live_connections() >= 1);
    proxy.cut();
    let deadline = Instant::now() + Duration::from_secs(120);
    while distinct(&handled) < N {
        assert!(
            Instant::now() < deadline,
            "only {} of {N} handled after the cut: consumption did not resume",
            distinct(&handled)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report = consumer.shutdown().await.unwrap();
    let handled = handled.lock().unwrap();
    let twice: Vec<_> = handled.iter().filter(|(_, c)| **c > 1).collect();
    assert!(
        twice.is_empty(),
        "handled more than once despite dedupe: {twice:?} ({report:?})"
    );
    assert!(
        report.received as usize > N,
        "the cut made RabbitMQ redeliver: {report:?}"
    );
    assert_eq!(
        report.abandoned, 0,
        "settlements on the dead channel never hang: {report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_limit_at_or_below_the_budget_is_refused_at_start_up() {
    let t = RabbitTransport::connect(
        RabbitConfig::new(url())
            .queue_expires(Duration::from_secs(60))
            .delivery_limit(8),
    )
    .await
    .unwrap();
    let q = queue(&t, "limit").await;
    let router = switchyard_core::Router::builder()
        .route(|_: Poison, _: Context| async { Ok::<_, HandleError>(()) })
        .build();
    let err = Consumer::builder(t.clone(), q.clone())
        .max_attempts(5)
        .serve(router.clone())
        .spawn()
        .shutdown()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Config);
    assert!(
        err.to_string()
            .contains("x-delivery-limit 8 must be above 10"),
        "{err}"
    );
    // Within the limit it starts.
    let ok = Consumer::builder(t, q)
        .max_attempts(3)
        .serve(router)
        .spawn();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!ok.is_finished());
    ok.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returns_are_attributed_to_their_own_publish_among_many_in_flight() {
    // Publishes share channels with many unconfirmed at once, and RabbitMQ
    // acks them with `multiple`: each unroutable one must fail, and only those.
    let t = connect().await;
    let q = queue(&t, "mixed").await;
    let topic = unique("mixed-topic");
    t.declare(&Topology::new().topic(TopicSpec::new(&topic)))
        .await
        .unwrap();
    let mut publishes = Vec::new();
    for i in 0..600 {
        let to_topic = i % 10 == 3;
        let dest = if to_topic { topic.clone() } else { q.clone() };
        let t = t.clone();
        publishes.push(async move {
            let env = Envelope::new("t", format!("{i}"));
            let id = env.id.clone();
            (to_topic, id, t.publish(&dest, env).await)
        });
    }
    let results = futures_util::future::join_all(publishes).await;
    let mut routed = std::collections::HashSet::new();
    for (to_topic, id, r) in results {
        if to_topic {
            let e = r.expect_err("unroutable publish reported as stored");
            assert_eq!(e.kind(), TransportErrorKind::NotFound, "{e}");
        } else {
            r.expect("a routable publish failed");
            routed.insert(id);
        }
    }
    assert_eq!(routed.len(), 540);
    let mut s = t
        .subscribe(&q, SubscribeOptions::default().prefetch(600))
        .await
        .unwrap();
    let mut got = 0;
    while got < 540 {
        let d = next_delivery(&mut s).await;
        assert!(routed.contains(&d.envelope().id));
        d.ack().await.unwrap();
        got += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_queue_that_is_gone_holds_the_message_back_instead_of_spinning() {
    let t = connect().await;
    let q = queue(&t, "no-dlq").await;
    // Someone deletes the dead-letter queue.
    let conn = lapin::Connection::connect(&url(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_delete(
        format!("{q}.dlq").as_str().into(),
        lapin::options::QueueDeleteOptions::default(),
    )
    .await
    .unwrap();
    let (router, _) = failing_router::<Poison>(|| HandleError::permanent("bad data"));
    let consumer = Consumer::builder(t.clone(), q.clone())
        .max_attempts(3)
        .serve_default(router)
        .spawn();
    t.publish(&q, Envelope::new(Poison::TYPE, r#"{"n":1}"#))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let received = consumer.stats().received();
    assert!(
        (1..=2).contains(&received),
        "{received} deliveries in 3 s: dead-lettering that fails must back off"
    );
    // The dead-letter queue is back: the message gets there.
    t.declare(&Topology::new().queue(QueueSpec::new(&q)))
        .await
        .unwrap();
    let mut dead = t
        .subscribe(&format!("{q}.dlq"), SubscribeOptions::default())
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(30), dead.next())
        .await
        .expect("dead-lettered once the queue is back")
        .unwrap()
        .unwrap();
    let info = DeadLetterInfo::read_from(&d.envelope().headers).unwrap();
    d.ack().await.unwrap();
    consumer.shutdown().await.unwrap();
    assert!(matches!(
        info.reason,
        DeadLetterReason::Permanent | DeadLetterReason::MaxAttempts
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_connects_through_tls_and_verifies_the_broker_certificate() {
    use switchyard_testkit::{TestCertificates, TlsProxy};

    let certs = TestCertificates::generate().unwrap();
    // TLS in front of the shared broker, which listens on plain TCP only.
    let proxy = TlsProxy::start(&certs, "127.0.0.1:5672").await.unwrap();
    let amqps = format!("amqps://guest:guest@localhost:{}/%2f", proxy.addr().port());

    // The CA is not trusted: the handshake fails, and says nothing secret.
    let err = RabbitTransport::connect(RabbitConfig::new(&amqps))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Connection, "{err}");
    let text = format!("{err} {err:?}");
    assert!(!text.contains("guest:guest"), "{text}");

    // Trusting it, everything works over TLS.
    let t = RabbitTransport::connect(
        RabbitConfig::new(&amqps)
            .root_certificates(certs.ca_path())
            .queue_expires(Duration::from_secs(60)),
    )
    .await
    .expect("amqps:// through the TLS proxy");
    let q = queue(&t, "tls").await;
    t.publish(&q, Envelope::new("t", "over tls")).await.unwrap();
    let mut deliveries = t.subscribe(&q, SubscribeOptions::default()).await.unwrap();
    let d = next_delivery(&mut deliveries).await;
    assert_eq!(&d.envelope().payload[..], b"over tls");
    d.ack().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settlement_abandoned_mid_publish_gives_the_delivery_back_and_later_acks_still_flow() {
    let t = connect().await;
    let q = queue(&t, "abandoned").await;
    for n in ["first", "second"] {
        t.publish(&q, Envelope::new("t", n)).await.unwrap();
    }
    let mut s = t
        .subscribe(&q, SubscribeOptions::default().prefetch(4))
        .await
        .unwrap();
    let first = next_delivery(&mut s).await;
    let second = next_delivery(&mut s).await;
    assert_eq!(&first.envelope().payload[..], b"first");
    // The retry publishes to a delay tier and waits for its confirm; the
    // caller gives up (drops the future) before the confirm arrives.
    let abandoned = tokio::time::timeout(
        Duration::from_nanos(1),
        first.settle(Settlement::Retry {
            delay: Duration::from_secs(1),
        }),
    )
    .await;
    assert!(
        abandoned.is_err(),
        "the settlement was still publishing, but it ended on its first poll: {abandoned:?}"
    );
    // The ack after it must not be held back behind the abandoned tag.
    second.ack().await.unwrap();
    t.flush().await.unwrap();
    // The first comes back: given back at once, and through the delay tier
    // too if its publish had gone through (at least once, deduplicated
    // downstream). The second, acknowledged, never does: not on this
    // subscription, and not on a new one after this one is gone (which
    // would get back whatever the first still held unacknowledged).
    let mut seen = Vec::new();
    let drain = |s: switchyard_core::DeliveryStream| async move {
        let mut s = s;
        let mut got = Vec::new();
        while let Ok(Some(d)) = tokio::time::timeout(Duration::from_secs(3), s.next()).await {
            let d = d.unwrap();
            got.push(String::from_utf8(d.envelope().payload.to_vec()).unwrap());
            d.ack().await.unwrap();
        }
        got
    };
    seen.extend(drain(s).await);
    t.flush().await.unwrap();
    let s2 = t.subscribe(&q, SubscribeOptions::default()).await.unwrap();
    seen.extend(drain(s2).await);
    assert!(
        seen.iter().any(|p| p == "first"),
        "the first came back: {seen:?}"
    );
    assert!(
        seen.iter().all(|p| p == "first"),
        "the acknowledged second was delivered again: {seen:?}"
    );
}
