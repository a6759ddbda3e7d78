//! Acknowledgements coalesced on the wire: settled one by one in the API,
//! sent as one `basic.ack` with `multiple=true` over the longest contiguous
//! run of acknowledged delivery tags. The per-ack round trip is the
//! throughput limit of a RabbitMQ consumer.
//!
//! Rules: a run is flushed once it is [`BATCH`] long (or half the
//! prefetch), after [`LINGER`]
//! without more, and before any negative acknowledgement; a tag still in
//! flight ends the run, so a nack or dead-letter in the middle never acks
//! the deliveries after it. An ack not yet flushed when the process dies is
//! redelivered (and deduplicated), never lost.

use std::collections::BTreeMap;
use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::Channel;
use tokio::sync::{mpsc, oneshot};

/// Longest run sent as one ack (or half the prefetch, if smaller: the
/// broker sends no more while the prefetch is used up, so waiting for a
/// full prefetch's worth would stall it).
pub(crate) const BATCH: usize = 64;
/// How long a shorter run may wait for more.
pub(crate) const LINGER: Duration = Duration::from_millis(5);

enum Command {
    /// A delivery was handed out (sent before it reaches the consumer).
    Delivered(u64),
    /// It was acknowledged.
    Ack(u64),
    /// It goes back to the queue (or not): sent at once, after flushing
    /// the acknowledged run before it.
    Nack {
        tag: u64,
        requeue: bool,
        done: Option<oneshot::Sender<Result<(), lapin::Error>>>,
    },
    /// Send the acknowledged run now, and say when it is sent.
    Flush(oneshot::Sender<()>),
}

/// The sending side, one per consumer channel; cheap to clone.
#[derive(Clone)]
pub(crate) struct Acks {
    tx: mpsc::UnboundedSender<Command>,
    /// Becomes true when the worker has stopped (after its last flush).
    stopped: tokio::sync::watch::Receiver<bool>,
}

impl Acks {
    /// Starts the worker that owns `channel`'s acknowledgements.
    pub(crate) fn spawn(channel: Channel, prefetch: usize) -> Acks {
        let (tx, rx) = mpsc::unbounded_channel();
        let (stopped_tx, stopped) = tokio::sync::watch::channel(false);
        let batch = BATCH.min((prefetch / 2).max(1));
        tokio::spawn(async move {
            worker(channel, rx, batch).await;
            let _ = stopped_tx.send(true);
        });
        Acks { tx, stopped }
    }

    /// A handle that does not keep the worker alive.
    pub(crate) fn downgrade(&self) -> WeakAcks {
        WeakAcks(self.tx.downgrade(), self.stopped.clone())
    }

    /// Records a delivery handed out; `false` if the worker is gone.
    pub(crate) fn delivered(&self, tag: u64) -> bool {
        self.tx.send(Command::Delivered(tag)).is_ok()
    }

    /// Queues an ack; `false` if the channel's worker is gone.
    pub(crate) fn ack(&self, tag: u64) -> bool {
        self.tx.send(Command::Ack(tag)).is_ok()
    }

    /// Sends a nack (after the acks before it) and waits for it.
    pub(crate) async fn nack(&self, tag: u64, requeue: bool) -> Option<Result<(), lapin::Error>> {
        let (done, answer) = oneshot::channel();
        self.tx
            .send(Command::Nack {
                tag,
                requeue,
                done: Some(done),
            })
            .ok()?;
        answer.await.ok()
    }

    /// Sends a nack without waiting (from `Drop`).
    pub(crate) fn nack_later(&self, tag: u64, requeue: bool) {
        let _ = self.tx.send(Command::Nack {
            tag,
            requeue,
            done: None,
        });
    }
}

/// A weak handle to a channel's ack worker, for [`flush`](WeakAcks::flush).
pub(crate) struct WeakAcks(
    mpsc::WeakUnboundedSender<Command>,
    tokio::sync::watch::Receiver<bool>,
);

impl WeakAcks {
    /// Sends the acks queued so far; `false` once the worker is gone. A
    /// worker whose senders are all gone flushes what is left as it stops:
    /// that is waited for too.
    pub(crate) async fn flush(&self) -> bool {
        let Some(tx) = self.0.upgrade() else {
            let mut stopped = self.1.clone();
            let _ = stopped.wait_for(|s| *s).await;
            return false;
        };
        let (done, sent) = oneshot::channel();
        if tx.send(Command::Flush(done)).is_err() {
            return false;
        }
        drop(tx);
        sent.await.is_ok()
    }
}

/// The acknowledged run at the front: its last tag, and its length.
fn acked_run(tags: &BTreeMap<u64, bool>) -> Option<(u64, usize)> {
    let mut last = None;
    let mut len = 0;
    for (tag, acked) in tags {
        if !acked {
            break;
        }
        last = Some(*tag);
        len += 1;
    }
    last.map(|tag| (tag, len))
}

async fn flush(channel: &Channel, tags: &mut BTreeMap<u64, bool>) {
    let Some((last, _)) = acked_run(tags) else {
        return;
    };
    let result = channel
        .basic_ack(last, BasicAckOptions { multiple: true })
        .await;
    // Sent or not, these tags are done here: if the channel is gone,
    // RabbitMQ redelivers them.
    let rest = tags.split_off(&(last + 1));
    *tags = rest;
    if let Err(e) = result {
        tracing::debug!(error = %e, last, "coalesced ack failed; RabbitMQ redelivers those messages");
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

async fn worker(channel: Channel, mut rx: mpsc::UnboundedReceiver<Command>, batch: usize) {
    // Delivery tag -> acknowledged yet.
    let mut tags: BTreeMap<u64, bool> = BTreeMap::new();
    let mut pending = false;
    loop {
        let next = if pending {
            match tokio::time::timeout(LINGER, rx.recv()).await {
                Ok(next) => next,
                Err(_) => {
                    flush(&channel, &mut tags).await;
                    pending = false;
                    continue;
                }
            }
        } else {
            rx.recv().await
        };
        let Some(command) = next else {
            // Every sender is gone: flush what is left and stop.
            flush(&channel, &mut tags).await;
            barrier(&channel).await;
            return;
        };
        match command {
            Command::Delivered(tag) => {
                tags.insert(tag, false);
            }
            Command::Ack(tag) => {
                if let Some(acked) = tags.get_mut(&tag) {
                    *acked = true;
                    pending = true;
                }
                if acked_run(&tags).is_some_and(|(_, len)| len >= batch) {
                    flush(&channel, &mut tags).await;
                    pending = false;
                }
            }
            Command::Flush(done) => {
                flush(&channel, &mut tags).await;
                barrier(&channel).await;
                pending = false;
                let _ = done.send(());
            }
            Command::Nack { tag, requeue, done } => {
                flush(&channel, &mut tags).await;
                tags.remove(&tag);
                let options = BasicNackOptions {
                    requeue,
                    multiple: false,
                };
                let result = channel.basic_nack(tag, options).await;
                if let Some(done) = done {
                    let _ = done.send(result);
                }
                // Acks waiting behind this tag may form a run now.
                pending = acked_run(&tags).is_some();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_stops_at_the_first_tag_in_flight() {
        let tags: BTreeMap<u64, bool> = [(1, true), (2, true), (3, false), (4, true)].into();
        assert_eq!(acked_run(&tags), Some((2, 2)));
        let tags: BTreeMap<u64, bool> = [(1, false), (2, true)].into();
        assert_eq!(acked_run(&tags), None);
    }
}
