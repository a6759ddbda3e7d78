//! The metrics layer's names and labels, through a recorder that keeps
//! what it is given.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::{broker, eventually, Job};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use switchyard::middleware::deadline::DeadlinePolicy;
use switchyard::middleware::Stack;
use switchyard::{Consumer, Context, Envelope, HandleError, Router, Transport};

#[derive(Default)]
struct Kept {
    counters: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
    gauges: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
    histograms: Mutex<BTreeMap<String, Arc<Samples>>>,
}

#[derive(Default)]
struct Samples(Mutex<Vec<f64>>);

impl metrics::HistogramFn for Samples {
    fn record(&self, value: f64) {
        self.0.lock().unwrap().push(value);
    }
}

fn render(key: &Key) -> String {
    let mut labels: Vec<String> = key
        .labels()
        .map(|l| format!("{}={}", l.key(), l.value()))
        .collect();
    labels.sort();
    format!("{}{{{}}}", key.name(), labels.join(","))
}

#[derive(Clone, Default)]
struct KeepingRecorder(Arc<Kept>);

impl Recorder for KeepingRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let c = Arc::clone(
            self.0
                .counters
                .lock()
                .unwrap()
                .entry(render(key))
                .or_default(),
        );
        Counter::from_arc(c)
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        let g = Arc::clone(
            self.0
                .gauges
                .lock()
                .unwrap()
                .entry(render(key))
                .or_default(),
        );
        Gauge::from_arc(g)
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let h = Arc::clone(
            self.0
                .histograms
                .lock()
                .unwrap()
                .entry(render(key))
                .or_default(),
        );
        Histogram::from_arc(h)
    }
}

impl KeepingRecorder {
    fn counter(&self, key: &str) -> u64 {
        self.0
            .counters
            .lock()
            .unwrap()
            .get(key)
            .map_or(0, |c| c.load(Ordering::SeqCst))
    }

    fn samples(&self, key: &str) -> Vec<f64> {
        self.0
            .histograms
            .lock()
            .unwrap()
            .get(key)
            .map_or_else(Vec::new, |h| h.0.lock().unwrap().clone())
    }

    fn gauge(&self, key: &str) -> f64 {
        self.0
            .gauges
            .lock()
            .unwrap()
            .get(key)
            .map_or(f64::NAN, |g| f64::from_bits(g.load(Ordering::SeqCst)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stack_reports_what_it_decided() {
    let recorder = KeepingRecorder::default();
    metrics::set_global_recorder(recorder.clone()).expect("one recorder per test process");
    let broker = broker().await;
    let router = Router::builder()
        .route(|job: Job, _: Context| async move {
            match job.n {
                2 => Err(HandleError::rejected("no")),
                3 => Err(HandleError::transient("later")),
                _ => Ok(()),
            }
        })
        .build();
    let stack = Stack::new()
        .deadline(DeadlinePolicy::Drop)
        .retry_policy(switchyard::middleware::retry::ExponentialBackoff::new(
            Duration::from_millis(1),
            Duration::from_millis(2),
        ))
        .build(router);
    let consumer = Consumer::builder(broker.clone(), "jobs")
        .max_attempts(2)
        .serve(stack)
        .spawn();
    let hour_ago = SystemTime::now() - Duration::from_secs(3600);
    let mut handled = Envelope::new("test.job", r#"{"n":1}"#);
    handled.occurred_at = hour_ago;
    broker.publish("jobs", handled.clone()).await.unwrap();
    broker.publish("jobs", handled).await.unwrap(); // a duplicate
    broker
        .publish("jobs", Envelope::new("test.job", r#"{"n":2}"#))
        .await
        .unwrap();
    broker
        .publish("jobs", Envelope::new("test.job", r#"{"n":3}"#))
        .await
        .unwrap();
    broker
        .publish(
            "jobs",
            Envelope::new("test.job", r#"{"n":4}"#).with_deadline(hour_ago),
        )
        .await
        .unwrap();
    broker
        .publish("jobs", Envelope::new("attacker.chosen-type-1", "{}"))
        .await
        .unwrap();
    let stats = consumer.stats();
    eventually("all settled", || {
        stats.acked() == 4 && stats.dead_lettered() == 2
    })
    .await;
    consumer.shutdown().await.unwrap();

    let settled = |outcome: &str, reason: &str, ty: &str| {
        recorder.counter(&format!(
            "switchyard_messages_settled_total{{outcome={outcome},reason={reason},source=jobs,type={ty}}}"
        ))
    };
    assert_eq!(settled("acked", "", "test.job"), 1);
    assert_eq!(settled("duplicate", "", "test.job"), 1);
    assert_eq!(settled("rejected", "", "test.job"), 1);
    assert_eq!(settled("expired", "", "test.job"), 1);
    assert_eq!(settled("retried", "", "test.job"), 1);
    assert_eq!(settled("dead-lettered", "max-attempts", "test.job"), 1);
    assert_eq!(
        settled("dead-lettered", "unknown-type", "unknown"),
        1,
        "untrusted types are not labels"
    );
    assert_eq!(
        recorder.counter("switchyard_messages_received_total{source=jobs,type=test.job}"),
        6
    );
    assert_eq!(
        recorder.counter("switchyard_messages_expired_total{policy=drop,source=jobs}"),
        1
    );
    let latency =
        recorder.samples("switchyard_end_to_end_latency_seconds{source=jobs,type=test.job}");
    assert!(
        latency.iter().any(|s| *s >= 3600.0),
        "latency counts from occurred-at: {latency:?}"
    );
    assert_eq!(
        recorder
            .samples("switchyard_handler_duration_seconds{source=jobs,type=test.job}")
            .len(),
        6
    );
    let attempts = recorder.samples("switchyard_delivery_attempts{source=jobs,type=test.job}");
    assert!(attempts.contains(&2.0), "{attempts:?}");
    assert_eq!(
        recorder.gauge("switchyard_messages_in_flight{source=jobs}"),
        0.0
    );
    let names: Vec<String> = recorder
        .0
        .counters
        .lock()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert!(
        names.iter().all(|n| !n.contains("attacker")),
        "a type from the wire became a label: {names:?}"
    );
}
