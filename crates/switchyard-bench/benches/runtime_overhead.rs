//! Per-message overhead of the consumer runtime on the memory transport.
//!
//! ```sh
//! cargo bench -p switchyard-bench --bench runtime_overhead
//! ```
//!
//! - `router/*`: the innermost service alone on a prepared `Incoming`
//!   (`call`), the same through the full default stack (`stack-call`); for
//!   scale, the JSON decode it contains and the `Envelope::new` every
//!   publish starts with;
//! - `batch/*`: 10,000 messages published, consumed and acknowledged, through
//!   a `Consumer` at concurrency 1 and 32 with a bare router (`runtime-*`)
//!   and with the full default stack (`stack-*`), consumer start and
//!   graceful shutdown included, and through the transport alone (`raw`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard::middleware::Stack;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use futures_util::FutureExt;
use switchyard::memory::MemoryTransport;
use switchyard::{Codec, Envelope, Incoming, JsonCodec, Message, Publisher, Router};
use switchyard_bench::{
    broker, consume_raw, consume_runtime, payload, publish, runtime, CountTo, Tick,
};
use tower::Service;

const BATCH: u64 = 10_000;

fn router(c: &mut Criterion) {
    let payload = payload(64);
    let publisher = Publisher::new(Arc::new(MemoryTransport::new()));
    // A fresh message each time: the dedupe layer must not see duplicates.
    let incoming = || {
        Incoming::new(
            Arc::new(Envelope::new(Tick::TYPE, payload.clone())),
            publisher.clone(),
            "bench",
        )
    };
    let rt = runtime().expect("a tokio runtime");
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
            incoming,
            |incoming| {
                router
                    .call(incoming)
                    .now_or_never()
                    .expect("a no-op handler is ready at once")
            },
            BatchSize::SmallInput,
        )
    });
    // The same call through the full default stack (metrics, trace,
    // validate, deadline, dedupe, ordering, retry, timeout): the difference
    // to `call` is what the stack adds per message.
    let mut stack = Stack::new().build(Router::builder().route(CountTo::new(u64::MAX)).build());
    let _entered = rt.enter();
    group.bench_function("stack-call", |b| {
        b.iter_batched(
            incoming,
            |incoming| {
                stack
                    .call(incoming)
                    .now_or_never()
                    .expect("a no-op handler is ready at once")
                    .expect("the stack never fails")
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
    let mut measure = |name: &str, concurrency: Option<usize>, full_stack: bool| {
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
                                Some(n) => consume_runtime(&broker, BATCH, n, full_stack).await,
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
    measure("raw", None, false);
    measure("runtime-1", Some(1), false);
    measure("runtime-32", Some(32), false);
    measure("stack-1", Some(1), true);
    measure("stack-32", Some(32), true);
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
