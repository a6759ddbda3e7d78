//! The broker: named queues and topics in shared memory.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use futures_util::stream;
use switchyard_core::transport::BoxFuture;
use switchyard_core::{
    Capabilities, DeadLetterInfo, Delivery, DeliveryStream, Envelope, QueueSpec, Settlement,
    Settler, Settling, SubscribeOptions, Topology, Transport, TransportError, TransportErrorKind,
};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// Limits of a [`MemoryTransport`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct MemoryConfig {
    /// Capacity of a queue declared without one. Default 10,000.
    pub default_capacity: usize,
    /// Largest payload accepted, in bytes. Default 1 MiB.
    pub max_payload: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            default_capacity: 10_000,
            max_payload: 1024 * 1024,
        }
    }
}

impl MemoryConfig {
    /// Sets the default queue capacity.
    pub fn default_capacity(mut self, n: usize) -> Self {
        self.default_capacity = n.max(1);
        self
    }

    /// Sets the largest payload accepted.
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }
}

/// A handle to an in-process broker. Clones share the same broker.
#[derive(Clone, Default)]
pub struct MemoryTransport {
    broker: Arc<Broker>,
}

#[derive(Default)]
struct Broker {
    config: MemoryConfig,
    queues: RwLock<HashMap<String, Arc<Queue>>>,
    topics: RwLock<HashMap<String, Vec<Arc<Queue>>>>,
}

impl Broker {
    fn queue(&self, name: &str) -> Option<Arc<Queue>> {
        self.queues
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// The queue `name`, created (unbounded, without a lease) if missing.
    fn queue_or_create(self: &Arc<Self>, name: &str) -> Arc<Queue> {
        let mut queues = self.queues.write().unwrap_or_else(|p| p.into_inner());
        Arc::clone(queues.entry(name.to_owned()).or_insert_with(|| {
            Arc::new(Queue::new(
                name.into(),
                usize::MAX,
                None,
                None,
                Arc::downgrade(self),
            ))
        }))
    }
}

struct Queue {
    name: Arc<str>,
    /// Most messages waiting (ready or delayed); in-flight ones are bounded
    /// by the subscriptions' prefetch instead, so that a handler publishing
    /// to its own full queue cannot deadlock.
    capacity: usize,
    lease: Option<Duration>,
    /// Declared with the queue, or `<name>.dlq` created on first use.
    dead_letter: OnceLock<Arc<Queue>>,
    broker: Weak<Broker>,
    state: Mutex<QueueState>,
    /// Woken when a message becomes ready, and when one is delayed or
    /// leased (so that waiters arm a timer for it).
    readable: Notify,
    /// Woken when a full queue gets room, for waiting publishers.
    writable: Notify,
}

#[derive(Default)]
struct QueueState {
    ready: VecDeque<Stored>,
    delayed: BinaryHeap<Reverse<Delayed>>,
    in_flight: HashMap<u64, InFlight, BuildHasherDefault<TagHasher>>,
    /// Lease deadlines of in-flight deliveries, removed at settlement.
    leases: BTreeSet<(Instant, u64)>,
    next_tag: u64,
    next_seq: u64,
}

/// Delivery tags are sequential: a multiplicative hash spreads them at a
/// fraction of SipHash's cost.
#[derive(Default)]
struct TagHasher(u64);

impl Hasher for TagHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8 | u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

#[derive(Clone)]
struct Stored {
    envelope: Arc<Envelope>,
    deliveries: u32,
}

struct InFlight {
    stored: Stored,
    lease_deadline: Option<Instant>,
}

struct Delayed {
    due: Instant,
    seq: u64,
    stored: Stored,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Delayed {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

/// `now + d`, saturating far in the future instead of overflowing.
fn after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

impl QueueState {
    /// Messages waiting for a consumer (ready or delayed).
    fn waiting(&self) -> usize {
        self.ready.len() + self.delayed.len()
    }

    /// Moves due delayed messages and expired leases to the ready list, and
    /// returns when the next one falls due.
    fn promote(&mut self, now: Instant) -> Option<Instant> {
        while let Some(Reverse(d)) = self.delayed.peek() {
            if d.due > now {
                break;
            }
            let Reverse(d) = self.delayed.pop().expect("peeked");
            self.ready.push_back(d.stored);
        }
        while let Some(&(due, tag)) = self.leases.first() {
            if due > now {
                break;
            }
            self.leases.pop_first();
            if let Some(f) = self.in_flight.remove(&tag) {
                self.ready.push_front(f.stored);
            }
        }
        let next_delayed = self.delayed.peek().map(|Reverse(d)| d.due);
        let next_lease = self.leases.first().map(|(due, _)| *due);
        match (next_delayed, next_lease) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn remove_in_flight(&mut self, tag: u64) -> Option<InFlight> {
        let f = self.in_flight.remove(&tag)?;
        if let Some(deadline) = f.lease_deadline {
            self.leases.remove(&(deadline, tag));
        }
        Some(f)
    }
}

fn not_found(name: &str) -> TransportError {
    TransportError::new(
        TransportErrorKind::NotFound,
        format!("no queue or topic named {name:?} is declared"),
    )
}

fn stale(queue: &str) -> TransportError {
    TransportError::new(
        TransportErrorKind::StaleDelivery,
        format!("delivery from {queue:?} is no longer in flight (its lease ran out and it was redelivered)"),
    )
}

impl Queue {
    fn new(
        name: Arc<str>,
        capacity: usize,
        lease: Option<Duration>,
        dead_letter: Option<Arc<Queue>>,
        broker: Weak<Broker>,
    ) -> Self {
        let dlq = OnceLock::new();
        if let Some(d) = dead_letter {
            let _ = dlq.set(d);
        }
        Queue {
            name,
            capacity: capacity.max(1),
            lease,
            dead_letter: dlq,
            broker,
            state: Mutex::default(),
            readable: Notify::new(),
            writable: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // No code path panics half-way through an update, so a poisoned
        // lock still guards consistent state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn dead_letter_queue(&self) -> Result<Arc<Queue>, TransportError> {
        if let Some(dlq) = self.dead_letter.get() {
            return Ok(Arc::clone(dlq));
        }
        let broker = self.broker.upgrade().ok_or_else(|| {
            TransportError::new(TransportErrorKind::Closed, "the memory broker is gone")
        })?;
        let dlq = broker.queue_or_create(&default_dlq(&self.name));
        Ok(Arc::clone(self.dead_letter.get_or_init(|| dlq)))
    }

    /// Appends a message if there is room; hands it back otherwise.
    fn try_push(&self, envelope: Arc<Envelope>) -> Result<(), Arc<Envelope>> {
        let mut state = self.lock();
        if state.waiting() >= self.capacity {
            return Err(envelope);
        }
        state.ready.push_back(Stored {
            envelope,
            deliveries: 0,
        });
        drop(state);
        self.readable.notify_one();
        Ok(())
    }

    async fn publish(&self, mut envelope: Arc<Envelope>) {
        loop {
            // Fast path first: registering as a waiter takes a lock of its own.
            envelope = match self.try_push(envelope) {
                Ok(()) => return,
                Err(envelope) => envelope,
            };
            let writable = self.writable.notified();
            tokio::pin!(writable);
            writable.as_mut().enable();
            // Checked again after registering, so that room made in between
            // is not missed.
            envelope = match self.try_push(envelope) {
                Ok(()) => return,
                Err(envelope) => envelope,
            };
            writable.await;
        }
    }

    /// Takes the next ready message, or says when one may fall due.
    fn try_take(&self) -> Result<(u64, Stored, Option<Instant>), Option<Instant>> {
        let mut state = self.lock();
        let timed = !state.delayed.is_empty() || !state.leases.is_empty() || self.lease.is_some();
        let now = timed.then(Instant::now);
        let wake_at = match now {
            Some(now) => state.promote(now),
            None => None,
        };
        let was_full = state.waiting() >= self.capacity;
        let Some(mut stored) = state.ready.pop_front() else {
            return Err(wake_at);
        };
        stored.deliveries += 1;
        let tag = state.next_tag;
        state.next_tag += 1;
        let lease_deadline = match (self.lease, now) {
            (Some(lease), Some(now)) => Some(after(now, lease)),
            _ => None,
        };
        let first_lease = lease_deadline.is_some() && state.leases.is_empty();
        if let Some(deadline) = lease_deadline {
            state.leases.insert((deadline, tag));
        }
        state.in_flight.insert(
            tag,
            InFlight {
                stored: stored.clone(),
                lease_deadline,
            },
        );
        drop(state);
        if was_full {
            self.writable.notify_one();
        }
        if first_lease {
            // Waiters parked without a timer must arm one for this lease.
            self.readable.notify_waiters();
        }
        Ok((tag, stored, lease_deadline))
    }

    /// Takes the next ready message, waiting as long as needed.
    async fn next(&self) -> (u64, Stored, Option<Instant>) {
        loop {
            if let Ok(taken) = self.try_take() {
                return taken;
            }
            let readable = self.readable.notified();
            tokio::pin!(readable);
            readable.as_mut().enable();
            let wake_at = match self.try_take() {
                Ok(taken) => return taken,
                Err(wake_at) => wake_at,
            };
            match wake_at {
                Some(at) => {
                    tokio::select! {
                        _ = readable => {}
                        _ = tokio::time::sleep_until(at.into()) => {}
                    }
                }
                None => readable.await,
            }
        }
    }

    fn settle(&self, tag: u64, settlement: Settlement) -> Result<(), TransportError> {
        match settlement {
            Settlement::Ack => {
                self.lock()
                    .remove_in_flight(tag)
                    .ok_or_else(|| stale(&self.name))?;
                Ok(())
            }
            Settlement::Retry { delay } => {
                let mut state = self.lock();
                let stored = state
                    .remove_in_flight(tag)
                    .ok_or_else(|| stale(&self.name))?
                    .stored;
                if delay.is_zero() {
                    state.ready.push_back(stored);
                    drop(state);
                    self.readable.notify_one();
                } else {
                    let seq = state.next_seq;
                    state.next_seq += 1;
                    state.delayed.push(Reverse(Delayed {
                        due: after(Instant::now(), delay),
                        seq,
                        stored,
                    }));
                    drop(state);
                    // Every waiter re-arms its timer for the new due time.
                    self.readable.notify_waiters();
                }
                Ok(())
            }
            Settlement::Release => {
                let mut state = self.lock();
                let mut stored = state
                    .remove_in_flight(tag)
                    .ok_or_else(|| stale(&self.name))?
                    .stored;
                // Not an attempt: the next delivery gets the same number.
                stored.deliveries = stored.deliveries.saturating_sub(1);
                state.ready.push_front(stored);
                drop(state);
                self.readable.notify_one();
                Ok(())
            }
            Settlement::DeadLetter {
                reason,
                detail,
                attempts,
            } => {
                let dlq = self.dead_letter_queue()?;
                let envelope = {
                    let state = self.lock();
                    let f = state.in_flight.get(&tag).ok_or_else(|| stale(&self.name))?;
                    let mut envelope = Envelope::clone(&f.stored.envelope);
                    DeadLetterInfo {
                        reason,
                        detail,
                        attempts,
                        source: self.name.to_string(),
                        at: SystemTime::now(),
                    }
                    .write_to(&mut envelope.headers);
                    envelope
                };
                // Into the dead-letter queue first (it never refuses: a full
                // one must not stop settlement), then off this one.
                dlq.lock().ready.push_back(Stored {
                    envelope: Arc::new(envelope),
                    deliveries: 0,
                });
                dlq.readable.notify_one();
                self.lock().remove_in_flight(tag);
                Ok(())
            }
        }
    }

    fn extend(&self, tag: u64, lease: Duration) -> Result<Option<Instant>, TransportError> {
        let mut state = self.lock();
        let deadline = after(Instant::now(), lease);
        let f = state
            .in_flight
            .get_mut(&tag)
            .ok_or_else(|| stale(&self.name))?;
        let Some(old) = f.lease_deadline.replace(deadline) else {
            f.lease_deadline = None;
            return Ok(None);
        };
        state.leases.remove(&(old, tag));
        state.leases.insert((deadline, tag));
        Ok(Some(deadline))
    }

    /// Gives back a delivery dropped unsettled: it counts as an attempt, as
    /// after a consumer crash.
    fn requeue_dropped(&self, tag: u64) {
        let mut state = self.lock();
        if let Some(f) = state.remove_in_flight(tag) {
            state.ready.push_front(f.stored);
            drop(state);
            self.readable.notify_one();
        }
    }
}

struct MemorySettler {
    queue: Arc<Queue>,
    tag: u64,
    lease_deadline: Option<Instant>,
    settled: bool,
    _prefetch: OwnedSemaphorePermit,
}

impl MemorySettler {
    /// Settles in the queue's state (nothing to wait for).
    fn settle_in_queue(&mut self, settlement: Settlement) -> Result<(), TransportError> {
        let result = self.queue.settle(self.tag, settlement);
        // A refused settlement leaves the delivery unsettled: dropping the
        // settler gives it back.
        self.settled = match &result {
            Ok(()) => true,
            Err(e) => e.kind() == TransportErrorKind::StaleDelivery,
        };
        result
    }
}

impl Settler for MemorySettler {
    fn settle(
        mut self: Box<Self>,
        settlement: Settlement,
    ) -> BoxFuture<'static, Result<(), TransportError>> {
        Box::pin(std::future::ready(self.settle_in_queue(settlement)))
    }

    fn begin_settle(
        mut self: Box<Self>,
        settlement: Settlement,
        _: &mut std::task::Context<'_>,
    ) -> Settling {
        Settling::Done(self.settle_in_queue(settlement))
    }

    fn extend(&mut self, lease: Duration) -> BoxFuture<'_, Result<(), TransportError>> {
        let result = self.queue.extend(self.tag, lease).map(|deadline| {
            self.lease_deadline = deadline;
        });
        Box::pin(std::future::ready(result))
    }

    fn lease_deadline(&self) -> Option<Instant> {
        self.lease_deadline
    }
}

impl Drop for MemorySettler {
    fn drop(&mut self) {
        if !self.settled {
            self.queue.requeue_dropped(self.tag);
        }
    }
}

impl MemoryTransport {
    /// A new, empty broker with default limits.
    pub fn new() -> Self {
        Self::with_config(MemoryConfig::default())
    }

    /// A new, empty broker with the given limits.
    pub fn with_config(config: MemoryConfig) -> Self {
        MemoryTransport {
            broker: Arc::new(Broker {
                config,
                queues: RwLock::default(),
                topics: RwLock::default(),
            }),
        }
    }

    /// Messages a queue holds (ready, delayed and in flight), or `None` if
    /// no such queue is declared.
    pub fn depth(&self, queue: &str) -> Option<usize> {
        self.queue(queue).map(|q| {
            let state = q.lock();
            state.waiting() + state.in_flight.len()
        })
    }

    /// Messages of a queue that are in flight (delivered, not settled).
    pub fn in_flight(&self, queue: &str) -> Option<usize> {
        self.queue(queue).map(|q| q.lock().in_flight.len())
    }

    fn queue(&self, name: &str) -> Option<Arc<Queue>> {
        self.broker.queue(name)
    }

    fn declare_queue(&self, spec: &QueueSpec) -> Result<(), TransportError> {
        let mut queues = self
            .broker
            .queues
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(existing) = queues.get(&spec.name) {
            let dlq_differs = spec
                .dead_letter
                .as_deref()
                .is_some_and(|wanted| existing.dead_letter.get().map(|d| &*d.name) != Some(wanted));
            let capacity_differs = spec.capacity.is_some_and(|c| c.max(1) != existing.capacity);
            if dlq_differs || capacity_differs || existing.lease != spec.lease {
                return Err(TransportError::new(
                    TransportErrorKind::Config,
                    format!(
                        "queue {:?} is already declared with other settings",
                        spec.name
                    ),
                ));
            }
            return Ok(());
        }
        let dlq_name = spec
            .dead_letter
            .clone()
            .unwrap_or_else(|| default_dlq(&spec.name));
        let broker = Arc::downgrade(&self.broker);
        let dlq = queues
            .entry(dlq_name.clone())
            .or_insert_with(|| {
                Arc::new(Queue::new(
                    dlq_name.into(),
                    usize::MAX,
                    None,
                    None,
                    broker.clone(),
                ))
            })
            .clone();
        let capacity = spec.capacity.unwrap_or(self.broker.config.default_capacity);
        queues.insert(
            spec.name.clone(),
            Arc::new(Queue::new(
                spec.name.as_str().into(),
                capacity,
                spec.lease,
                Some(dlq),
                broker,
            )),
        );
        Ok(())
    }
}

fn default_dlq(name: &str) -> String {
    format!("{name}.dlq")
}

impl fmt::Debug for MemoryTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let queues = self.broker.queues.read().unwrap_or_else(|p| p.into_inner());
        let mut names: Vec<_> = queues.keys().collect();
        names.sort();
        f.debug_struct("MemoryTransport")
            .field("config", &self.broker.config)
            .field("queues", &names)
            .finish()
    }
}

impl Transport for MemoryTransport {
    fn dead_letter_of(&self, queue: &str) -> String {
        self.queue(queue)
            .and_then(|q| q.dead_letter.get().map(|d| d.name.to_string()))
            .unwrap_or_else(|| default_dlq(queue))
    }

    fn queue_stats<'a>(
        &'a self,
        queue: &'a str,
    ) -> BoxFuture<'a, Result<switchyard_core::QueueStats, TransportError>> {
        let stats = self
            .queue(queue)
            .map(|q| {
                let state = q.state.lock().unwrap_or_else(|p| p.into_inner());
                let mut stats = switchyard_core::QueueStats::default();
                stats.depth = Some(state.waiting() as u64);
                stats.in_flight = Some(state.in_flight.len() as u64);
                stats
            })
            .ok_or_else(|| {
                TransportError::new(TransportErrorKind::NotFound, format!("no queue {queue:?}"))
            });
        Box::pin(std::future::ready(stats))
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::full();
        caps.max_payload = Some(self.broker.config.max_payload);
        caps
    }

    fn declare<'a>(&'a self, topology: &'a Topology) -> BoxFuture<'a, Result<(), TransportError>> {
        let result = (|| {
            for q in &topology.queues {
                self.declare_queue(q)?;
            }
            for t in &topology.topics {
                let mut bound = Vec::with_capacity(t.subscriptions.len());
                for s in &t.subscriptions {
                    bound.push(self.queue(s).ok_or_else(|| {
                        TransportError::new(
                            TransportErrorKind::Config,
                            format!(
                                "topic {:?} binds queue {s:?}, which is not declared",
                                t.name
                            ),
                        )
                    })?);
                }
                let mut topics = self
                    .broker
                    .topics
                    .write()
                    .unwrap_or_else(|p| p.into_inner());
                let existing = topics.entry(t.name.clone()).or_default();
                for q in bound {
                    if !existing.iter().any(|e| Arc::ptr_eq(e, &q)) {
                        existing.push(q);
                    }
                }
            }
            Ok(())
        })();
        Box::pin(std::future::ready(result))
    }

    fn publish<'a>(
        &'a self,
        destination: &'a str,
        envelope: Envelope,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            let max = self.broker.config.max_payload;
            if envelope.payload.len() > max {
                return Err(TransportError::new(
                    TransportErrorKind::TooLarge,
                    format!(
                        "payload of {} bytes is over the {max}-byte limit of the memory transport",
                        envelope.payload.len()
                    ),
                ));
            }
            let envelope = Arc::new(envelope);
            if let Some(queue) = self.queue(destination) {
                queue.publish(envelope).await;
                return Ok(());
            }
            let subscribers = self
                .broker
                .topics
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(destination)
                .cloned()
                .ok_or_else(|| not_found(destination))?;
            if subscribers.is_empty() {
                return Err(TransportError::new(
                    TransportErrorKind::NotFound,
                    format!(
                        "topic {destination:?} has no subscriptions: the message would be lost"
                    ),
                ));
            }
            for queue in subscribers {
                queue.publish(Arc::clone(&envelope)).await;
            }
            Ok(())
        })
    }

    fn subscribe<'a>(
        &'a self,
        source: &'a str,
        options: SubscribeOptions,
    ) -> BoxFuture<'a, Result<DeliveryStream, TransportError>> {
        let result = self
            .queue(source)
            .ok_or_else(|| not_found(source))
            .map(|queue| {
                let prefetch = Arc::new(Semaphore::new(options.prefetch));
                let deliveries =
                    stream::unfold((queue, prefetch), |(queue, prefetch)| async move {
                        let permit = switchyard_core::transport::prefetch_slot(&prefetch).await;
                        let (tag, stored, lease_deadline) = queue.next().await;
                        // With a backlog, taking a message never waits: count
                        // it against the task's cooperative budget, as a
                        // broker client reading its socket does, so that
                        // the consumer yields now and then and a competing
                        // subscription gets its share.
                        tokio::task::consume_budget().await;
                        let settler = MemorySettler {
                            queue: Arc::clone(&queue),
                            tag,
                            lease_deadline,
                            settled: false,
                            _prefetch: permit,
                        };
                        let delivery =
                            Delivery::new(stored.envelope, stored.deliveries, Box::new(settler));
                        Some((Ok(delivery), (queue, prefetch)))
                    });
                Box::pin(deliveries) as DeliveryStream
            });
        Box::pin(std::future::ready(result))
    }
}
