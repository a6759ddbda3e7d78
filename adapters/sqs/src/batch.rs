//! Settlements coalesced into batch requests: deletes into
//! `DeleteMessageBatch`, visibility changes (retry, release) into
//! `ChangeMessageVisibilityBatch`, ten entries a request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::types::{
    BatchResultErrorEntry, ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
};
use aws_sdk_sqs::Client;
use switchyard_core::{TransportError, TransportErrorKind};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;

use crate::transport::{receipt_error, with_timeout, Counters};

/// The most entries SQS takes in one batch request.
pub(crate) const BATCH: usize = 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Delete,
    /// Set the visibility timeout to this many seconds.
    Visibility(i32),
}

struct Job {
    receipt: String,
    op: Op,
    /// `None` for fire-and-forget releases of dropped deliveries.
    done: Option<oneshot::Sender<Result<(), TransportError>>>,
    /// A fire-and-forget release counts as background work until its
    /// request is answered (or it is dropped unsent).
    _busy: Option<Busy>,
}

/// Work a transport does in the background that must not be cut off when
/// the process exits: receives still on the wire for a dropped
/// subscription, and releases of deliveries dropped unsettled.
/// [`Transport::flush`](switchyard_core::Transport::flush) waits for it.
#[derive(Default)]
pub(crate) struct Pending {
    count: AtomicUsize,
    idle: Notify,
}

impl Pending {
    /// Counts one piece of work until the guard is dropped.
    pub(crate) fn busy(self: &Arc<Self>) -> Busy {
        self.count.fetch_add(1, Ordering::SeqCst);
        Busy(Arc::clone(self))
    }

    /// Returns once no work is counted.
    pub(crate) async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// One piece of background work, counted until dropped.
pub(crate) struct Busy(Arc<Pending>);

impl Drop for Busy {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// The settlement queue of one SQS queue. Cheap to clone; the worker ends
/// when the last clone is gone, after flushing what is queued.
#[derive(Clone)]
pub(crate) struct Batcher {
    tx: mpsc::UnboundedSender<Job>,
    pending: Arc<Pending>,
}

/// What a worker needs to send requests.
pub(crate) struct Target {
    pub(crate) client: Client,
    pub(crate) url: String,
    pub(crate) queue: String,
    pub(crate) counters: Arc<Counters>,
    pub(crate) timeout: Duration,
}

impl Batcher {
    /// Starts the worker. The channel is unbounded because every job belongs
    /// to a delivery that holds a prefetch permit: at most `prefetch` jobs
    /// of a subscription can wait at once.
    pub(crate) fn start(target: Target, linger: Duration, pending: Arc<Pending>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(Arc::new(target), linger, rx));
        Batcher { tx, pending }
    }

    /// Queues `op` for `receipt` and waits for SQS's answer.
    pub(crate) async fn settle(&self, receipt: String, op: Op) -> Result<(), TransportError> {
        let (done, answer) = oneshot::channel();
        self.tx
            .send(Job {
                receipt,
                op,
                done: Some(done),
                _busy: None,
            })
            .map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }

    /// Queues `op` without waiting (a dropped delivery's release); it
    /// counts as pending work until SQS has answered.
    pub(crate) fn detach(&self, receipt: String, op: Op) {
        let _ = self.tx.send(Job {
            receipt,
            op,
            done: None,
            _busy: Some(self.pending.busy()),
        });
    }
}

fn closed() -> TransportError {
    TransportError::new(
        TransportErrorKind::Closed,
        "the settlement worker stopped; SQS redelivers the message when its visibility timeout ends",
    )
}

async fn run(target: Arc<Target>, linger: Duration, mut rx: mpsc::UnboundedReceiver<Job>) {
    let mut deletes: Vec<Job> = Vec::with_capacity(BATCH);
    let mut changes: Vec<Job> = Vec::with_capacity(BATCH);
    let mut due: Option<Instant> = None;
    loop {
        let job = tokio::select! {
            job = rx.recv() => job,
            _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                due = None;
                flush(&target, &mut deletes);
                flush(&target, &mut changes);
                continue;
            }
        };
        let Some(job) = job else {
            flush(&target, &mut deletes);
            flush(&target, &mut changes);
            return;
        };
        let lane = match job.op {
            Op::Delete => &mut deletes,
            Op::Visibility(_) => &mut changes,
        };
        lane.push(job);
        if lane.len() >= BATCH {
            flush(&target, lane);
        }
        if deletes.is_empty() && changes.is_empty() {
            due = None;
        } else if due.is_none() {
            due = Some(Instant::now() + linger);
        }
    }
}

/// Sends one batch request in its own task, so that several can be in flight.
fn flush(target: &Arc<Target>, lane: &mut Vec<Job>) {
    if lane.is_empty() {
        return;
    }
    let jobs = std::mem::replace(lane, Vec::with_capacity(BATCH));
    let target = Arc::clone(target);
    tokio::spawn(async move {
        let all: Vec<&Job> = jobs.iter().collect();
        let mut results = send(&target, &all).await;
        // Entries that failed on SQS's side (not ours) get one more try.
        let retry: Vec<usize> = results
            .iter()
            .enumerate()
            .filter(|(_, r)| matches!(r, Err(f) if f.retryable))
            .map(|(i, _)| i)
            .collect();
        if !retry.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let again: Vec<&Job> = retry.iter().map(|&i| &jobs[i]).collect();
            let second = send(&target, &again).await;
            for (i, r) in retry.into_iter().zip(second) {
                results[i] = r;
            }
        }
        for (job, result) in jobs.into_iter().zip(results) {
            let result = result.map_err(|f| f.error);
            if let Err(e) = &result {
                if job.done.is_none() && e.kind() != TransportErrorKind::StaleDelivery {
                    tracing::debug!(queue = %target.queue, error = %e, "releasing a dropped delivery failed; SQS redelivers it after its visibility timeout");
                }
            }
            if let Some(done) = job.done {
                let _ = done.send(result);
            }
        }
    });
}

pub(crate) struct Failure {
    pub(crate) error: TransportError,
    pub(crate) retryable: bool,
}

/// The kind of a failed batch entry.
pub(crate) fn entry_kind(code: &str) -> TransportErrorKind {
    match code {
        "ReceiptHandleIsInvalid" | "MessageNotInflight" | "InvalidParameterValue" => {
            TransportErrorKind::StaleDelivery
        }
        c if c.contains("NonExistentQueue") || c.contains("QueueDoesNotExist") => {
            TransportErrorKind::NotFound
        }
        _ => TransportErrorKind::Rejected,
    }
}

/// The failed entries of a batch answer, by entry id: the error code and
/// whether the fault was the sender's. (SQS's message is not kept: it quotes
/// the receipt handle.)
fn failures(failed: &[BatchResultErrorEntry]) -> HashMap<String, (String, bool)> {
    failed
        .iter()
        .map(|f| (f.id().to_owned(), (f.code().to_owned(), f.sender_fault())))
        .collect()
}

async fn send(target: &Target, jobs: &[&Job]) -> Vec<Result<(), Failure>> {
    let op = jobs[0].op;
    let (what, outcome) = match op {
        Op::Delete => {
            target.counters.delete(jobs.len());
            let entries = jobs
                .iter()
                .enumerate()
                .map(|(i, j)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(&j.receipt)
                        .build()
                        .expect("id and receipt are set")
                })
                .collect();
            let request = target
                .client
                .delete_message_batch()
                .queue_url(&target.url)
                .set_entries(Some(entries))
                .send();
            let outcome = with_timeout(target.timeout, request)
                .await
                .and_then(|r| r.map_err(|e| receipt_error(e, "deleting messages")))
                .map(|out| failures(out.failed()));
            ("delete", outcome)
        }
        Op::Visibility(_) => {
            target.counters.change_visibility(jobs.len());
            let entries = jobs
                .iter()
                .enumerate()
                .map(|(i, j)| {
                    let Op::Visibility(secs) = j.op else {
                        unreachable!("one lane per op")
                    };
                    ChangeMessageVisibilityBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(&j.receipt)
                        .visibility_timeout(secs)
                        .build()
                        .expect("id and receipt are set")
                })
                .collect();
            let request = target
                .client
                .change_message_visibility_batch()
                .queue_url(&target.url)
                .set_entries(Some(entries))
                .send();
            let outcome = with_timeout(target.timeout, request)
                .await
                .and_then(|r| r.map_err(|e| receipt_error(e, "changing message visibility")))
                .map(|out| failures(out.failed()));
            ("visibility change", outcome)
        }
    };
    match outcome {
        Ok(mut failed) => (0..jobs.len())
            .map(|i| match failed.remove(&i.to_string()) {
                None => Ok(()),
                Some((code, sender_fault)) => Err(Failure {
                    retryable: !sender_fault,
                    error: TransportError::new(
                        entry_kind(&code),
                        // SQS's message quotes the receipt handle: only the
                        // code goes into the error.
                        format!(
                            "SQS refused the {what} of a message from {:?}: {code}",
                            target.queue
                        ),
                    ),
                }),
            })
            .collect(),
        Err(e) => {
            let kind = e.kind();
            let text = e.to_string();
            (0..jobs.len())
                .map(|_| {
                    Err(Failure {
                        retryable: false,
                        error: TransportError::new(
                            kind,
                            format!("the {what} request for {:?} failed: {text}", target.queue),
                        ),
                    })
                })
                .collect()
        }
    }
}
