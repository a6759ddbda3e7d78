//! Acknowledgements coalesced on the wire: settled one by one in the API,
//! sent as one `basic.ack` with `multiple=true` over the longest contiguous
//! run of settled delivery tags. The per-ack round trip is the throughput
//! limit of a RabbitMQ consumer.
//!
//! Rules: a run is flushed once it holds [`BATCH`] acks (or a quarter of
//! the prefetch), after [`LINGER`] without reaching that, and whenever a flush
//! is asked for; a tag still in flight ends the run, so a nack or
//! dead-letter in the middle never acks the deliveries after it, and a nack
//! is sent before any ack that covers its position. An ack not yet flushed
//! when the process dies is redelivered (and deduplicated), never lost.
//!
//! Settling records the tag in shared state under a short lock; the
//! channel's worker task, the only one that sends frames, is woken once
//! per batch (and for nacks and flushes), not once per message.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::Channel;
use tokio::sync::{oneshot, Notify};

/// Most acks sent as one (or a quarter of the prefetch, if smaller: the
/// broker sends no more while the prefetch is used up, so the acks must
/// reach it well before; a full prefetch's worth would stall it for a
/// round trip each time).
pub(crate) const BATCH: usize = 64;
/// How long a shorter run may wait for more.
pub(crate) const LINGER: Duration = Duration::from_millis(5);

/// One delivery tag's state.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Slot {
    /// Handed out, not settled.
    InFlight,
    /// Acknowledged, not yet sent.
    Acked,
    /// A nack is queued for it: nothing may be acked past it until sent.
    NackQueued,
    /// Nacked: settled on the wire, a run may pass it.
    Done,
}

struct Nack {
    tag: u64,
    requeue: bool,
    done: Option<oneshot::Sender<Result<(), lapin::Error>>>,
}

/// The tags of one channel. Delivery tags are consecutive from 1 on a
/// channel, and each consumer has a channel of its own, so slot `i` is
/// tag `base + i`.
#[derive(Debug, Default)]
struct Tags {
    /// The first tag not yet sent or settled on the wire.
    base: u64,
    slots: VecDeque<Slot>,
    /// How many slots at the front are `Acked` or `Done` (the run).
    run: usize,
    /// How many of those are `Acked`.
    run_acked: usize,
}

impl Tags {
    fn new() -> Self {
        Tags {
            base: 1,
            ..Default::default()
        }
    }

    /// Records `slot` for `tag`; `false` for a tag already off the books.
    fn set(&mut self, tag: u64, slot: Slot) -> bool {
        let Some(index) = tag
            .checked_sub(self.base)
            .and_then(|i| usize::try_from(i).ok())
        else {
            return false;
        };
        if index >= self.slots.len() {
            self.slots.resize(index + 1, Slot::InFlight);
        }
        self.slots[index] = slot;
        while let Some(s) = self.slots.get(self.run) {
            match s {
                Slot::Acked => self.run_acked += 1,
                Slot::Done => {}
                Slot::InFlight | Slot::NackQueued => break,
            }
            self.run += 1;
        }
        true
    }

    /// Takes the run off the books if it holds at least `min_acks` acks
    /// (at least one); returns the last acked tag in it, to be sent as one
    /// `multiple` ack. A run of nacked tags alone is dropped.
    fn take_run(&mut self, min_acks: usize) -> Option<u64> {
        if self.run_acked > 0 && self.run_acked < min_acks.max(1) {
            return None;
        }
        let last = (0..self.run)
            .rev()
            .find(|&i| self.slots[i] == Slot::Acked)
            .map(|i| self.base + i as u64);
        self.slots.drain(..self.run);
        self.base += self.run as u64;
        self.run = 0;
        self.run_acked = 0;
        last
    }
}

#[derive(Default)]
struct State {
    tags: Tags,
    nacks: Vec<Nack>,
    flushes: Vec<oneshot::Sender<()>>,
    /// The worker has been told that acks are waiting (it lingers for more).
    armed: bool,
    /// Every `Acks` handle is gone: flush and stop.
    closed: bool,
    /// The worker has stopped.
    stopped: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Notify,
    /// Wakes flushes waiting for a worker that is stopping.
    stopped: Notify,
    channel: Channel,
    batch: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Marks the state closed once the last [`Acks`] is dropped.
struct Alive(Arc<Shared>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.wake.notify_one();
    }
}

/// The settling side, one per consumer channel; cheap to clone.
#[derive(Clone)]
pub(crate) struct Acks {
    shared: Arc<Shared>,
    _alive: Arc<Alive>,
}

impl Acks {
    /// Starts the worker that owns `channel`'s acknowledgements.
    pub(crate) fn spawn(channel: Channel, prefetch: usize) -> Acks {
        let state = State {
            tags: Tags::new(),
            ..State::default()
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            wake: Notify::new(),
            stopped: Notify::new(),
            channel,
            batch: BATCH.min((prefetch / 4).max(1)),
        });
        tokio::spawn(worker(Arc::clone(&shared)));
        Acks {
            _alive: Arc::new(Alive(Arc::clone(&shared))),
            shared,
        }
    }

    /// A handle that does not keep the worker (or its channel) alive.
    pub(crate) fn downgrade(&self) -> WeakAcks {
        WeakAcks(Arc::downgrade(&self.shared))
    }

    /// Queues an ack; `false` if the channel is closed (the broker
    /// redelivers what it held, so the ack could only be lost).
    pub(crate) fn ack(&self, tag: u64) -> bool {
        if !self.shared.channel.status().connected() {
            return false;
        }
        let wake = {
            let mut state = self.shared.lock();
            if state.stopped || !state.tags.set(tag, Slot::Acked) {
                return false;
            }
            if state.tags.run_acked >= self.shared.batch {
                true
            } else if state.tags.run_acked > 0 && !state.armed {
                // The first ack of a run: the worker starts lingering.
                state.armed = true;
                true
            } else {
                false
            }
        };
        if wake {
            self.shared.wake.notify_one();
        }
        true
    }

    fn queue_nack(&self, tag: u64, requeue: bool, done: Option<oneshot::Sender<NackResult>>) {
        {
            let mut state = self.shared.lock();
            if state.stopped {
                // Dropping `done` answers the waiter with `None`.
                return;
            }
            state.tags.set(tag, Slot::NackQueued);
            state.nacks.push(Nack { tag, requeue, done });
        }
        self.shared.wake.notify_one();
    }

    /// Sends a nack and waits for it; `None` if the worker is gone.
    pub(crate) async fn nack(&self, tag: u64, requeue: bool) -> Option<NackResult> {
        let (done, answer) = oneshot::channel();
        self.queue_nack(tag, requeue, Some(done));
        answer.await.ok()
    }

    /// Sends a nack without waiting (from `Drop`).
    pub(crate) fn nack_later(&self, tag: u64, requeue: bool) {
        self.queue_nack(tag, requeue, None);
    }
}

type NackResult = Result<(), lapin::Error>;

/// A handle to a channel's ack worker that does not keep it alive, for
/// [`flush`](WeakAcks::flush).
pub(crate) struct WeakAcks(std::sync::Weak<Shared>);

impl WeakAcks {
    /// Sends the acks settled so far and waits until RabbitMQ has processed
    /// them; `false` once the worker is gone (a stopping worker flushes
    /// what is left first: that is waited for too).
    pub(crate) async fn flush(&self) -> bool {
        // Gone once the worker has finished and every settler is dropped.
        let Some(shared) = self.0.upgrade() else {
            return false;
        };
        let sent = {
            let mut state = shared.lock();
            if state.stopped {
                return false;
            }
            if state.closed {
                None
            } else {
                let (done, sent) = oneshot::channel();
                state.flushes.push(done);
                Some(sent)
            }
        };
        match sent {
            Some(sent) => {
                shared.wake.notify_one();
                sent.await.is_ok()
            }
            None => {
                // Stopping: wait until it has.
                loop {
                    let stopped = shared.stopped.notified();
                    if shared.lock().stopped {
                        return false;
                    }
                    stopped.await;
                }
            }
        }
    }
}

/// Waits until RabbitMQ has processed everything sent on `channel` so far:
/// acks have no reply, and a process that exits right after sending them
/// could lose them with its socket. A method with a reply (a passive declare
/// of a built-in exchange) is answered only after the frames before it.
async fn barrier(channel: &Channel) {
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        channel.exchange_declare(
            "amq.direct".into(),
            lapin::ExchangeKind::Direct,
            lapin::options::ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        ),
    )
    .await;
}

/// Marks the worker stopped however it ends (returned, panicked, or
/// dropped with its runtime): queued nacks and flushes are answered (their
/// senders dropped), and later acks and nacks report the worker gone
/// instead of waiting for it.
struct Stopped(Arc<Shared>);

impl Drop for Stopped {
    fn drop(&mut self) {
        {
            let mut state = self.0.lock();
            state.nacks.clear();
            state.flushes.clear();
            state.stopped = true;
        }
        self.0.stopped.notify_waiters();
    }
}

async fn worker(shared: Arc<Shared>) {
    let _stopped = Stopped(Arc::clone(&shared));
    let channel = &shared.channel;
    let mut linger_until: Option<tokio::time::Instant> = None;
    loop {
        let lingered = match linger_until {
            Some(deadline) => tokio::select! {
                _ = shared.wake.notified() => false,
                _ = tokio::time::sleep_until(deadline) => true,
            },
            None => {
                shared.wake.notified().await;
                false
            }
        };
        // Take the work under the lock; send it after, in order: nacks
        // first (a run cannot pass a queued nack, so no ack covers them).
        let (nacks, ack, flushes, closed) = {
            let mut state = shared.lock();
            let nacks = std::mem::take(&mut state.nacks);
            for n in &nacks {
                state.tags.set(n.tag, Slot::Done);
            }
            let flushes = std::mem::take(&mut state.flushes);
            let closed = state.closed;
            let min = if lingered || closed || !flushes.is_empty() {
                1
            } else {
                shared.batch
            };
            let ack = state.tags.take_run(min);
            state.armed = state.tags.run_acked > 0;
            (nacks, ack, flushes, closed)
        };
        for n in nacks {
            let options = BasicNackOptions {
                requeue: n.requeue,
                multiple: false,
            };
            let result = channel.basic_nack(n.tag, options).await;
            if let Some(done) = n.done {
                let _ = done.send(result);
            }
        }
        if let Some(last) = ack {
            // Sent or not, these tags are done here: if the channel is
            // gone, RabbitMQ redelivers them.
            if let Err(e) = channel
                .basic_ack(last, BasicAckOptions { multiple: true })
                .await
            {
                tracing::debug!(error = %e, last, "coalesced ack failed; RabbitMQ redelivers those messages");
            }
        }
        if closed || !flushes.is_empty() {
            barrier(channel).await;
            for done in flushes {
                let _ = done.send(());
            }
        }
        if closed {
            // `Stopped` answers anything queued meanwhile.
            return;
        }
        linger_until = if shared.lock().armed {
            linger_until
                .filter(|_| !lingered)
                .or_else(|| Some(tokio::time::Instant::now() + LINGER))
        } else {
            None
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_stops_at_the_first_tag_in_flight_or_queued_for_a_nack() {
        let mut tags = Tags::new();
        assert!(tags.set(1, Slot::Acked));
        assert!(tags.set(2, Slot::Acked));
        assert!(tags.set(4, Slot::Acked));
        assert_eq!((tags.run, tags.run_acked), (2, 2));
        assert_eq!(tags.take_run(3), None, "fewer acks than asked for");
        assert_eq!(tags.take_run(1), Some(2));
        assert!(!tags.set(2, Slot::Acked), "already sent");
        assert!(tags.set(3, Slot::NackQueued));
        assert_eq!(tags.take_run(1), None, "3 waits for its nack");
        assert!(tags.set(3, Slot::Done));
        assert_eq!((tags.run, tags.run_acked), (2, 1));
        assert_eq!(tags.take_run(1), Some(4), "the run passes the nacked tag");
        assert_eq!(tags.base, 5);
    }

    #[test]
    fn a_run_of_nacked_tags_alone_is_dropped_without_an_ack() {
        let mut tags = Tags::new();
        tags.set(1, Slot::Done);
        tags.set(2, Slot::Done);
        assert_eq!(tags.take_run(64), None);
        assert_eq!(tags.base, 3);
        assert!(tags.slots.is_empty());
    }
}
