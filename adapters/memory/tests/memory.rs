//! Behaviour specific to the memory transport.

use std::time::Duration;

use futures_util::StreamExt;
use switchyard_core::{
    Envelope, QueueSpec, Settlement, SubscribeOptions, TopicSpec, Topology, Transport,
    TransportErrorKind,
};
use switchyard_memory::{MemoryConfig, MemoryTransport};

#[tokio::test]
async fn a_full_queue_slows_the_publisher_instead_of_buffering() {
    let broker = MemoryTransport::new();
    broker
        .declare(&Topology::new().queue(QueueSpec::new("q").capacity(3)))
        .await
        .unwrap();
    for _ in 0..3 {
        broker.publish("q", Envelope::new("t", "x")).await.unwrap();
    }
    let blocked = broker.publish("q", Envelope::new("t", "fourth"));
    tokio::pin!(blocked);
    assert!(
        tokio::time::timeout(Duration::from_millis(100), &mut blocked)
            .await
            .is_err(),
        "a publish into a full queue must wait"
    );
    assert_eq!(broker.depth("q"), Some(3));
    let mut stream = broker
        .subscribe("q", SubscribeOptions::default())
        .await
        .unwrap();
    stream.next().await.unwrap().unwrap().ack().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), blocked)
        .await
        .expect("the publisher resumes once there is room")
        .unwrap();
    assert_eq!(broker.depth("q"), Some(3));
}

#[tokio::test]
async fn in_flight_messages_do_not_count_against_capacity() {
    // A handler that publishes to its own full queue must not deadlock:
    // capacity bounds waiting messages; prefetch bounds in-flight ones.
    let broker = MemoryTransport::with_config(MemoryConfig::default().default_capacity(1));
    broker
        .declare(&Topology::new().queue(QueueSpec::new("q")))
        .await
        .unwrap();
    broker.publish("q", Envelope::new("t", "x")).await.unwrap();
    let mut stream = broker
        .subscribe("q", SubscribeOptions::default())
        .await
        .unwrap();
    let held = stream.next().await.unwrap().unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        broker.publish("q", Envelope::new("t", "y")),
    )
    .await
    .expect("room was made when the first message was taken")
    .unwrap();
    let third = broker.publish("q", Envelope::new("t", "z"));
    assert!(tokio::time::timeout(Duration::from_millis(50), third)
        .await
        .is_err());
    held.ack().await.unwrap();
}

#[tokio::test]
async fn a_waiting_subscription_gets_a_message_whose_lease_ran_out() {
    let broker = MemoryTransport::new();
    broker
        .declare(&Topology::new().queue(QueueSpec::new("q").lease(Duration::from_millis(100))))
        .await
        .unwrap();
    // Both subscriptions are parked, with no timer armed, before anything exists.
    let mut a = broker
        .subscribe("q", SubscribeOptions::default())
        .await
        .unwrap();
    let mut b = broker
        .subscribe("q", SubscribeOptions::default())
        .await
        .unwrap();
    let waiting = tokio::spawn(async move {
        let d = b.next().await.unwrap().unwrap();
        (d.attempt(), d)
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let publish = broker.publish("q", Envelope::new("t", "x"));
    let (held, _) = tokio::join!(
        async {
            tokio::select! {
                d = a.next() => Some(d.unwrap().unwrap()),
                _ = tokio::time::sleep(Duration::from_millis(50)) => None,
            }
        },
        publish
    );
    // Whoever took it first holds it unsettled; the other must get it back
    // once the lease runs out, with nothing else happening on the queue.
    let redelivered = match held {
        Some(_held) => tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the parked subscription was never woken for the expired lease")
            .unwrap(),
        None => {
            let (attempt, d) = tokio::time::timeout(Duration::from_secs(5), waiting)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(attempt, 1);
            let _held = d;
            let again = tokio::time::timeout(Duration::from_secs(5), a.next())
                .await
                .expect("the parked subscription was never woken for the expired lease")
                .unwrap()
                .unwrap();
            (again.attempt(), again)
        }
    };
    assert_eq!(redelivered.0, 2);
}

#[tokio::test]
async fn an_enormous_retry_delay_holds_the_message_instead_of_losing_it() {
    let broker = MemoryTransport::new();
    broker
        .declare(&Topology::new().queue(QueueSpec::new("q")))
        .await
        .unwrap();
    broker.publish("q", Envelope::new("t", "x")).await.unwrap();
    let mut stream = broker
        .subscribe("q", SubscribeOptions::default())
        .await
        .unwrap();
    let d = stream.next().await.unwrap().unwrap();
    d.settle(Settlement::Retry {
        delay: Duration::MAX,
    })
    .await
    .unwrap();
    assert_eq!(broker.depth("q"), Some(1), "still held, delayed");
}

#[tokio::test]
async fn dead_lettering_from_a_dead_letter_queue_creates_the_next_one() {
    let broker = MemoryTransport::new();
    broker
        .declare(&Topology::new().queue(QueueSpec::new("q")))
        .await
        .unwrap();
    broker
        .publish("q.dlq", Envelope::new("t", "x"))
        .await
        .unwrap();
    let mut stream = broker
        .subscribe("q.dlq", SubscribeOptions::default())
        .await
        .unwrap();
    let d = stream.next().await.unwrap().unwrap();
    d.settle(Settlement::DeadLetter {
        reason: switchyard_core::DeadLetterReason::Permanent,
        detail: "still broken".into(),
        attempts: 1,
    })
    .await
    .unwrap();
    assert_eq!(broker.depth("q.dlq"), Some(0));
    assert_eq!(broker.depth("q.dlq.dlq"), Some(1));
}

#[tokio::test]
async fn release_does_not_count_an_attempt_but_a_drop_does() {
    let broker = MemoryTransport::new();
    broker
        .declare(&Topology::new().queue(QueueSpec::new("q")))
        .await
        .unwrap();
    broker.publish("q", Envelope::new("t", "x")).await.unwrap();
    let mut stream = broker
        .subscribe("q", SubscribeOptions::default())
        .await
        .unwrap();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.attempt(), 1);
    first.settle(Settlement::Release).await.unwrap();
    let second = stream.next().await.unwrap().unwrap();
    assert_eq!(second.attempt(), 1, "released: same attempt again");
    drop(second);
    let third = stream.next().await.unwrap().unwrap();
    assert_eq!(
        third.attempt(),
        2,
        "dropped unsettled: counts, as after a crash"
    );
    third.ack().await.unwrap();
}

#[tokio::test]
async fn prefetch_bounds_unsettled_deliveries_per_subscription() {
    let broker = MemoryTransport::new();
    broker
        .declare(&Topology::new().queue(QueueSpec::new("q")))
        .await
        .unwrap();
    for _ in 0..5 {
        broker.publish("q", Envelope::new("t", "x")).await.unwrap();
    }
    let mut stream = broker
        .subscribe("q", SubscribeOptions::default().prefetch(2))
        .await
        .unwrap();
    let a = stream.next().await.unwrap().unwrap();
    let _b = stream.next().await.unwrap().unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(50), stream.next())
            .await
            .is_err(),
        "a third delivery while two are unsettled"
    );
    a.ack().await.unwrap();
    assert!(tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .is_ok());
}

#[tokio::test]
async fn queues_get_a_default_dead_letter_queue_and_conflicting_redeclares_fail() {
    let broker = MemoryTransport::new();
    broker
        .declare(&Topology::new().queue(QueueSpec::new("orders")))
        .await
        .unwrap();
    assert_eq!(broker.depth("orders.dlq"), Some(0));
    // Idempotent.
    broker
        .declare(&Topology::new().queue(QueueSpec::new("orders")))
        .await
        .unwrap();
    let err = broker
        .declare(&Topology::new().queue(QueueSpec::new("orders").dead_letter("elsewhere")))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Config);
}

#[tokio::test]
async fn a_topic_without_subscriptions_refuses_rather_than_drops() {
    let broker = MemoryTransport::new();
    broker
        .declare(&Topology::new().topic(TopicSpec::new("events")))
        .await
        .unwrap();
    let err = broker
        .publish("events", Envelope::new("t", "x"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::NotFound);
}

#[tokio::test]
async fn binding_an_undeclared_queue_is_a_config_error() {
    let broker = MemoryTransport::new();
    let err = broker
        .declare(&Topology::new().topic(TopicSpec::new("events").subscription("missing")))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Config);
    assert!(err.to_string().contains("\"missing\""));
}

#[tokio::test]
async fn settling_after_the_lease_ran_out_is_a_stale_delivery() {
    let broker = MemoryTransport::new();
    broker
        .declare(&Topology::new().queue(QueueSpec::new("q").lease(Duration::from_millis(50))))
        .await
        .unwrap();
    broker.publish("q", Envelope::new("t", "x")).await.unwrap();
    let mut stream = broker
        .subscribe("q", SubscribeOptions::default())
        .await
        .unwrap();
    let first = stream.next().await.unwrap().unwrap();
    let again = stream.next().await.unwrap().unwrap();
    assert_eq!(again.attempt(), 2);
    let err = first.ack().await.unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::StaleDelivery);
    again.ack().await.unwrap();
    assert_eq!(broker.depth("q"), Some(0));
}
