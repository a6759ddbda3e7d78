//! The suite's own tests: a transport that breaks a rule fails the case for
//! that rule. Each broken transport wraps the (conforming) memory transport
//! and changes exactly one behaviour.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use switchyard_core::transport::BoxFuture;
use switchyard_core::{
    Capabilities, Delivery, DeliveryStream, Envelope, Settlement, Settler, SubscribeOptions,
    Topology, Transport, TransportError,
};
use switchyard_memory::MemoryTransport;
use switchyard_testkit::{run_case, Case, CaseResult, Harness, SuiteConfig};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Defect {
    /// Retry { delay } redelivers at once.
    IgnoresRetryDelay,
    /// Waits out a retry delay inside `settle`, then redelivers at once.
    SleepsInSettle,
    /// DeadLetter acknowledges instead: the message is lost.
    DeadLetterDrops,
    /// Ack does nothing; the message comes back.
    AckIsRelease,
    /// Every 100th publish is silently dropped.
    LosesMessages,
    /// Declares a smaller payload limit than it enforces.
    OverstatesLimit,
    /// Lease extension is accepted but does nothing.
    ExtensionIgnored,
    /// Strips extra headers on the way.
    DropsHeaders,
}

#[derive(Clone)]
struct Broken {
    inner: MemoryTransport,
    defect: Defect,
    published: Arc<AtomicUsize>,
}

struct BrokenSettler {
    inner: Box<dyn Settler>,
    defect: Defect,
}

impl Settler for BrokenSettler {
    fn settle(
        self: Box<Self>,
        settlement: Settlement,
    ) -> BoxFuture<'static, Result<(), TransportError>> {
        if let (Defect::SleepsInSettle, Settlement::Retry { delay }) = (self.defect, &settlement) {
            let delay = *delay;
            return Box::pin(async move {
                tokio::time::sleep(delay).await;
                self.inner
                    .settle(Settlement::Retry {
                        delay: Duration::ZERO,
                    })
                    .await
            });
        }
        let settlement = match (self.defect, settlement) {
            (Defect::IgnoresRetryDelay, Settlement::Retry { .. }) => Settlement::Retry {
                delay: Duration::ZERO,
            },
            (Defect::DeadLetterDrops, Settlement::DeadLetter { .. }) => Settlement::Ack,
            (Defect::AckIsRelease, Settlement::Ack) => Settlement::Release,
            (_, s) => s,
        };
        self.inner.settle(settlement)
    }

    fn extend(&mut self, lease: Duration) -> BoxFuture<'_, Result<(), TransportError>> {
        if self.defect == Defect::ExtensionIgnored {
            return Box::pin(async { Ok(()) });
        }
        self.inner.extend(lease)
    }

    fn lease_deadline(&self) -> Option<Instant> {
        self.inner.lease_deadline()
    }
}

impl Transport for Broken {
    fn capabilities(&self) -> Capabilities {
        let mut caps = self.inner.capabilities();
        if self.defect == Defect::OverstatesLimit {
            caps.max_payload = caps.max_payload.map(|m| m / 2);
        }
        caps
    }

    fn declare<'a>(&'a self, topology: &'a Topology) -> BoxFuture<'a, Result<(), TransportError>> {
        self.inner.declare(topology)
    }

    fn publish<'a>(
        &'a self,
        destination: &'a str,
        mut envelope: Envelope,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        let n = self.published.fetch_add(1, Ordering::Relaxed);
        if self.defect == Defect::LosesMessages && n % 100 == 99 {
            return Box::pin(async { Ok(()) });
        }
        if self.defect == Defect::DropsHeaders {
            envelope.headers = Default::default();
        }
        self.inner.publish(destination, envelope)
    }

    fn subscribe<'a>(
        &'a self,
        source: &'a str,
        options: SubscribeOptions,
    ) -> BoxFuture<'a, Result<DeliveryStream, TransportError>> {
        let defect = self.defect;
        Box::pin(async move {
            let stream = self.inner.subscribe(source, options).await?;
            let wrapped = stream.map(move |d| {
                d.map(|d| {
                    let (env, attempt, received_at, settler) = d.into_parts();
                    Delivery::new(
                        env,
                        attempt,
                        Box::new(BrokenSettler {
                            inner: settler,
                            defect,
                        }),
                    )
                    .with_received_at(received_at)
                })
            });
            Ok(Box::pin(wrapped) as DeliveryStream)
        })
    }
}

struct BrokenHarness(Broken);

impl Harness for BrokenHarness {
    type Transport = Broken;

    async fn connect(&self) -> Broken {
        self.0.clone()
    }

    fn config(&self) -> SuiteConfig {
        SuiteConfig::default()
            .messages(300)
            .lease(Duration::from_millis(300))
            .retry_delay(Duration::from_millis(300))
            .receive_timeout(Duration::from_secs(2))
            .quiet_period(Duration::from_millis(200))
    }
}

async fn result_with(defect: Defect, case: Case) -> CaseResult {
    let harness = BrokenHarness(Broken {
        inner: MemoryTransport::new(),
        defect,
        published: Arc::default(),
    });
    run_case(&harness, case).await
}

async fn assert_fails(defect: Defect, case: Case, expected: &str) {
    match result_with(defect, case).await {
        CaseResult::Failed(msg) => assert!(
            msg.contains(expected),
            "{case:?} failed for {defect:?}, but with {msg:?} (expected it to mention {expected:?})"
        ),
        other => panic!("{case:?} should fail for a transport that {defect:?}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignoring_the_retry_delay_fails_retry_with_delay() {
    assert_fails(
        Defect::IgnoresRetryDelay,
        Case::RetryWithDelay,
        "ahead of a message published during",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_out_the_delay_in_the_consumer_fails_retry_with_delay() {
    assert_fails(
        Defect::SleepsInSettle,
        Case::RetryWithDelay,
        "not waited out in the consumer",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_dead_letters_fails_the_dead_letter_case() {
    assert_fails(
        Defect::DeadLetterDrops,
        Case::DeadLetterKeepsMetadata,
        "did not arrive",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_that_does_not_remove_fails_ack_removes() {
    assert_fails(Defect::AckIsRelease, Case::AckRemoves, "was acknowledged").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_messages_fails_the_volume_cases() {
    assert_fails(
        Defect::LosesMessages,
        Case::CompetingConsumers,
        "never delivered",
    )
    .await;
    assert_fails(
        Defect::LosesMessages,
        Case::ConcurrentConsumption,
        "never handled",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untruthful_payload_limit_fails_max_payload() {
    assert_fails(Defect::OverstatesLimit, Case::MaxPayload, "was accepted").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fake_lease_extension_fails_the_lease_case() {
    assert_fails(
        Defect::ExtensionIgnored,
        Case::LeaseExtension,
        "lease was being extended",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_headers_fails_round_trip_and_dead_letter() {
    assert_fails(
        Defect::DropsHeaders,
        Case::EnvelopeRoundTrip,
        "header x-custom",
    )
    .await;
    assert_fails(
        Defect::DropsHeaders,
        Case::DeadLetterKeepsMetadata,
        "x-original",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unbroken_cases_still_pass_through_the_wrapper() {
    // The wrapper itself is faithful: with a defect that does not touch a
    // case, that case passes.
    assert_eq!(
        result_with(Defect::DeadLetterDrops, Case::RetryWithDelay).await,
        CaseResult::Passed
    );
    assert_eq!(
        result_with(Defect::IgnoresRetryDelay, Case::AckRemoves).await,
        CaseResult::Passed
    );
}
