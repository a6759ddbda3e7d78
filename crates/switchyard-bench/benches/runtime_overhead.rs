//! Per-message overhead of the consumer runtime on the memory transport.
//!
//! ```sh
//! cargo bench -p switchyard-bench --bench runtime_overhead
//! ```
//!
//! - `router/*`: the innermost service alone on a prepared `Incoming`; for
//!   scale, the JSON decode it contains and the `Envelope::new` every
//!   publish starts with;
//! - `batch/*`: 10,000 messages published, consumed and acknowledged, through
//!   a `Consumer` at concurrency 1 and 32 (`runtime-*`, its start and
//!   graceful shutdown included) and through the transport alone (`raw`);
//!   the difference per element is what the runtime costs per message.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use futures_util::FutureExt;
use switchyard::memory::MemoryTransport;
use switchyard::{Codec, Envelope, Incoming, JsonCodec, Message, Publisher, Router};
use switchyard_bench::{
    broker, consume_raw, consume_runtime, payload, publish, runtime, CountTo, Tick,
};
use tokio_util::sync::CancellationToken;
use tower::Service;

const BATCH: u64 = 10_000;

fn router(c: &mut Criterion) {
    let payload = payload(64);
    let incoming = Incoming {
        envelope: Arc::new(Envelope::new(Tick::TYPE, payload.clone())),
        attempt: 1,
        max_attempts: 5,
        received_at: Instant::now(),
        cancel: CancellationToken::new(),
        publisher: Publisher::new(Arc::new(MemoryTransport::new())),
        source: "bench".into(),
    };
    // Never reaches its target: counting is all it does.
    let mut router = Router::builder().route(CountTo::new(u64::MAX)).build();

    let mut group = c.benchmark_group("router");
    group.throughput(Throughput::Elements(1));
    // What every publish pays before the transport sees the message.
    group.bench_function("envelope-new", |b| {
        b.iter(|| Envelope::new(Tick::TYPE, payload.clone()))
    });
    group.bench_function("decode-only", |b| {
        b.iter(|| JsonCodec.decode::<Tick>(std::hint::black_box(&payload)))
    });
    group.bench_function("call", |b| {
        b.iter_batched(
            || incoming.clone(),
            |incoming| {
                router
                    .call(incoming)
                    .now_or_never()
                    .expect("a no-op handler is ready at once")
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn batch(c: &mut Criterion) {
    let rt = runtime().expect("a tokio runtime");
    let payload = payload(64);
    let capacity = BATCH as usize;

    let mut group = c.benchmark_group("batch");
    group.throughput(Throughput::Elements(BATCH));
    // Setting up a broker is part of neither; publishing is part of both.
    let mut measure = |name: &str, concurrency: Option<usize>| {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let payload = payload.clone();
                rt.block_on(async move {
                    tokio::spawn(async move {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            let broker = broker(capacity).await.expect("declared");
                            let started = Instant::now();
                            publish(&broker, BATCH, &payload).await.expect("published");
                            match concurrency {
                                None => consume_raw(&broker, BATCH).await,
                                Some(n) => consume_runtime(&broker, BATCH, n).await,
                            }
                            .expect("consumed");
                            total += started.elapsed();
                        }
                        total
                    })
                    .await
                    .expect("the bench task does not panic")
                })
            })
        });
    };
    measure("raw", None);
    measure("runtime-1", Some(1));
    measure("runtime-32", Some(32));
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = router, batch
}
criterion_main!(benches);
