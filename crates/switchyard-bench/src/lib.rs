//! The memory workloads that the `switchyard-bench` binary and the criterion
//! benches both measure.
//!
//! Not a public API: it exists so that the two measure the same thing.
#![forbid(unsafe_code)]

pub mod nats;
pub mod rabbit;
pub mod sqs;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use switchyard::memory::{MemoryConfig, MemoryTransport};
use switchyard::{
    Consumer, Context, Envelope, HandleError, Handler, Message, QueueSpec, Router,
    SubscribeOptions, Topology, Transport,
};
use tokio::sync::Notify;

/// The queue every workload uses.
pub const QUEUE: &str = "bench";

/// The benchmark's message: a sequence number; the payload pads it with
/// whitespace to the size asked for.
#[derive(Debug, Serialize, Deserialize)]
pub struct Tick {
    /// Not read: decoding it is the point.
    pub seq: u64,
}

impl Message for Tick {
    const TYPE: &'static str = "bench.tick";
}

/// A JSON payload of `size` bytes (at least 10) that decodes as a [`Tick`].
pub fn payload(size: usize) -> Bytes {
    let head = r#"{"seq":1}"#;
    // Whitespace is valid JSON and costs the decoder nothing to allocate.
    let padding = " ".repeat(size.saturating_sub(head.len()));
    Bytes::from(format!(r#"{{"seq":1{padding}}}"#))
}

/// A no-op handler that counts what it handled and wakes [`done`](Self::done)
/// once it has handled `target` messages.
#[derive(Clone)]
pub struct CountTo {
    handled: Arc<AtomicU64>,
    target: u64,
    done: Arc<Notify>,
}

impl CountTo {
    /// Counts up to `target`.
    pub fn new(target: u64) -> Self {
        CountTo {
            handled: Arc::default(),
            target,
            done: Arc::default(),
        }
    }

    /// Notified (once) when the target is reached.
    pub fn done(&self) -> Arc<Notify> {
        Arc::clone(&self.done)
    }
}

impl Handler<Tick> for CountTo {
    fn handle(
        &self,
        _tick: Tick,
        _cx: &Context,
    ) -> impl Future<Output = Result<(), HandleError>> + Send {
        if self.handled.fetch_add(1, Ordering::Relaxed) + 1 == self.target {
            self.done.notify_one();
        }
        std::future::ready(Ok(()))
    }
}

/// A broker with [`QUEUE`] declared, holding up to `capacity` messages.
pub async fn broker(capacity: usize) -> Result<MemoryTransport, String> {
    let broker = MemoryTransport::with_config(MemoryConfig::default().default_capacity(capacity));
    let topology = Topology::new().queue(QueueSpec::new(QUEUE).capacity(capacity));
    broker.declare(&topology).await.map_err(|e| e.to_string())?;
    Ok(broker)
}

/// Publishes `messages` envelopes with `payload` to [`QUEUE`], one after
/// the other, each with a fresh id as a producer would.
pub async fn publish(
    broker: &MemoryTransport,
    messages: u64,
    payload: &Bytes,
) -> Result<(), String> {
    for _ in 0..messages {
        let envelope = Envelope::new(Tick::TYPE, payload.clone());
        broker
            .publish(QUEUE, envelope)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Consumes `messages` from [`QUEUE`] through `subscribe` and `ack` alone,
/// one at a time: the floor the runtime is compared with. Returns how long
/// it took.
pub async fn consume_raw(broker: &MemoryTransport, messages: u64) -> Result<Duration, String> {
    let started = Instant::now();
    let mut deliveries = broker
        .subscribe(QUEUE, SubscribeOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    for _ in 0..messages {
        let delivery = deliveries.next().await.ok_or("the subscription ended")?;
        let delivery = delivery.map_err(|e| e.to_string())?;
        delivery.ack().await.map_err(|e| e.to_string())?;
    }
    Ok(started.elapsed())
}

/// Consumes `messages` from [`QUEUE`] through a [`Consumer`] with a
/// [`Router`] and a no-op handler, bare or inside the full default
/// middleware stack. Returns how long it took until the broker
/// held none of them any more (the graceful shutdown that follows is not
/// counted).
pub async fn consume_runtime(
    broker: &MemoryTransport,
    messages: u64,
    concurrency: usize,
    full_stack: bool,
) -> Result<Duration, String> {
    let handler = CountTo::new(messages);
    let done = handler.done();
    let router = Router::builder().route(handler).build();
    let started = Instant::now();
    let builder = Consumer::builder(broker.clone(), QUEUE).concurrency(concurrency);
    let consumer = if full_stack {
        builder.serve_default(router).spawn()
    } else {
        builder.serve(router).spawn()
    };
    done.notified().await;
    // Every handler has returned; the last settlements follow at once.
    while broker.depth(QUEUE) != Some(0) {
        tokio::task::yield_now().await;
    }
    let elapsed = started.elapsed();
    let report = consumer.shutdown().await.map_err(|e| e.to_string())?;
    if report.acked != messages || report.received != messages {
        return Err(format!("expected {messages} acked, got {report:?}"));
    }
    Ok(elapsed)
}

/// A tokio runtime like the bench's machine: two worker threads.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

/// CPU time a process has used so far, user and system, read from
/// `/proc/<pid>/stat` (`self` for this one); `None` where there is no such
/// file. For the diagnostics `SWITCHYARD_BENCH_DEBUG` prints: how much of a
/// workload's CPU the client took and how much the broker.
pub fn cpu_time(pid: &str) -> Option<(Duration, Duration)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count from its `)`.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15, in clock ticks (100 a second
    // on Linux).
    let ticks = |i: usize| -> Option<Duration> {
        Some(Duration::from_millis(
            fields.get(i)?.parse::<u64>().ok()? * 10,
        ))
    };
    Some((ticks(11)?, ticks(12)?))
}

/// Read and write system calls a process has made so far, from
/// `/proc/<pid>/io` (`self` for this one): how finely a workload's traffic
/// is cut into socket reads and writes.
pub fn syscalls(pid: &str) -> Option<(u64, u64)> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    let field = |name: &str| {
        io.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Some((field("syscr:")?, field("syscw:")?))
}

/// Context switches of every thread of this process so far (voluntary ones:
/// a thread that went to sleep waiting for something).
pub fn context_switches() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .sum()
}

/// The pid of the first process whose command name is `name`.
pub fn pid_of(name: &str) -> Option<String> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid = e.file_name().into_string().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == name).then_some(pid)
    })
}

/// Waits until the broker process has been idle (under 10% of a core)
/// for 200 ms, 5 s at most, so that a workload does not start while the
/// broker is still busy with the one before it (deleting a stream of
/// 100,000 messages keeps nats-server busy for about half a second). Returns
/// at once where the broker's CPU cannot be read.
pub async fn broker_quiet(broker: &str) {
    let Some(pid) = pid_of(broker) else { return };
    let busy = || cpu_time(&pid).map(|(user, sys)| user + sys);
    let Some(mut last) = busy() else { return };
    let until = Instant::now() + Duration::from_secs(5);
    let mut quiet_for = Duration::ZERO;
    let step = Duration::from_millis(100);
    while quiet_for < Duration::from_millis(200) && Instant::now() < until {
        tokio::time::sleep(step).await;
        let Some(now) = busy() else { return };
        // Clock ticks of 10 ms: at most one tick in 100 ms is idle.
        if now.saturating_sub(last) <= Duration::from_millis(10) {
            quiet_for += step;
        } else {
            quiet_for = Duration::ZERO;
        }
        last = now;
    }
}

/// Measures the CPU this process and the broker process use while `work`
/// runs, and prints them per message when `SWITCHYARD_BENCH_DEBUG` is set.
pub async fn with_cpu<T>(
    label: &str,
    broker: &str,
    n: u64,
    work: impl Future<Output = Result<Duration, T>>,
) -> Result<Duration, T> {
    if std::env::var_os("SWITCHYARD_BENCH_DEBUG").is_none() {
        return work.await;
    }
    let server = pid_of(broker);
    let cpu = |pid: Option<&str>| pid.and_then(cpu_time).unwrap_or_default();
    let io = |pid: Option<&str>| pid.and_then(syscalls).unwrap_or_default();
    let snapshot = || {
        (
            cpu(Some("self")),
            cpu(server.as_deref()),
            context_switches(),
            io(Some("self")),
            io(server.as_deref()),
        )
    };
    let (c0, s0, x0, i0, j0) = snapshot();
    let r = work.await;
    let (c1, s1, x1, i1, j1) = snapshot();
    if let Ok(wall) = &r {
        let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
        let each = |before: u64, after: u64| (after - before) as f64 / n as f64;
        eprintln!(
            "{label:<42} µs/msg: wall {:>5.2} · client user {:>5.2} sys {:>5.2} · {broker} {:>5.2} · client sleeps/msg {:.2} · reads/writes per msg: client {:.2}/{:.2} {broker} {:.2}/{:.2}",
            per(*wall),
            per(c1.0 - c0.0),
            per(c1.1 - c0.1),
            per((s1.0 + s1.1) - (s0.0 + s0.1)),
            each(x0, x1),
            each(i0.0, i1.0),
            each(i0.1, i1.1),
            each(j0.0, j1.0),
            each(j0.1, j1.1),
        );
    }
    r
}
