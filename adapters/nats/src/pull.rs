//! The JetStream pull loop: pull requests for a durable consumer, and the
//! messages and status replies they bring, on an inbox of the
//! subscription's own.
//!
//! It asks for messages by async-nats' rule (the next request once half of
//! what was asked for has arrived or been given up by the server), with
//! three differences that matter on a busy consumer:
//!
//! - the next pull request is queued to the connection from the consuming
//!   task itself, the moment half of the batch is received, where
//!   async-nats wakes a task of its own to send it;
//! - a message is handed over as it arrived (async-nats' copy of the
//!   JetStream context, which the settler does not use, is not made for
//!   every message);
//! - the heartbeat timer is armed once and moved forward when the stream
//!   goes idle, instead of a new boxed timer each time.
//!
//! Unlike async-nats' stream it does not watch the connection: a request
//! lost to a reconnect, or never answered, is noticed as two heartbeats of
//! silence, and the subscription then makes its pull anew (see
//! `subscribe_to` in `transport.rs`).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::message::OutboundMessage;
use async_nats::{StatusCode, Subject};
use futures_util::{Sink, Stream};
use tokio::time::{Instant, Sleep};

/// The JetStream API prefix of the default domain.
const API_PREFIX: &str = "$JS.API";

/// Why a pull loop stopped.
#[derive(Debug)]
pub(crate) enum PullError {
    /// Nothing, not even a heartbeat, for two heartbeats while a request
    /// was waiting on the server: pull anew.
    MissingHeartbeat,
    /// The server refused the pull or ended it (consumer deleted, request
    /// over the consumer's limits, no JetStream), or the connection did.
    Failed(String),
}

impl std::fmt::Display for PullError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PullError::MissingHeartbeat => f.write_str("missed idle heartbeat"),
            PullError::Failed(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for PullError {}

/// Pulls from one durable consumer, `batch` messages a request.
pub(crate) struct Puller {
    /// The connection, as the sink pull requests are queued to (a handle of
    /// this loop's own).
    requests: async_nats::Client,
    /// The inbox the server answers on.
    inbox: async_nats::Subscriber,
    inbox_subject: Subject,
    /// `$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`.
    next_subject: Subject,
    /// The request's JSON: batch, expiry and heartbeat.
    request: bytes::Bytes,
    heartbeat: Duration,
    asked: Asked,
    /// Fires two heartbeats after the stream last went idle.
    idle: Pin<Box<Sleep>>,
    /// Whether anything arrived since the timer was last moved.
    heard: bool,
}

impl Puller {
    /// Subscribes an inbox for the consumer `consumer` of stream `stream`.
    /// Requests expire after `expires`, with heartbeats every half of it.
    pub(crate) async fn new(
        client: &async_nats::Client,
        stream: &str,
        consumer: &str,
        batch: usize,
        expires: Duration,
    ) -> Result<Puller, async_nats::SubscribeError> {
        let batch = batch.max(1);
        let heartbeat = expires / 2;
        let inbox_subject = Subject::from(client.new_inbox());
        let inbox = client.subscribe(inbox_subject.clone()).await?;
        let request = request_body(batch, expires);
        Ok(Puller {
            requests: client.clone(),
            inbox,
            inbox_subject,
            next_subject: Subject::from(format!(
                "{API_PREFIX}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
            )),
            request: bytes::Bytes::from(request),
            heartbeat,
            asked: Asked { batch, pending: 0 },
            idle: Box::pin(tokio::time::sleep(heartbeat * 2)),
            heard: true,
        })
    }

    /// Queues the next pull request once half of what was asked for has
    /// arrived. `Err` if the connection is closed; a full command queue
    /// leaves it for the next poll (the sink wakes this task).
    fn request_more(&mut self, cx: &mut Context<'_>) -> Result<(), PullError> {
        if !self.asked.wants_more() {
            return Ok(());
        }
        let mut sink = Pin::new(&mut self.requests);
        match sink.as_mut().poll_ready(cx) {
            Poll::Pending => Ok(()),
            Poll::Ready(Err(e)) => Err(PullError::Failed(format!(
                "cannot send a pull request: {e}"
            ))),
            Poll::Ready(Ok(())) => {
                sink.start_send(OutboundMessage {
                    subject: self.next_subject.clone(),
                    reply: Some(self.inbox_subject.clone()),
                    payload: self.request.clone(),
                    headers: None,
                })
                .map_err(|e| PullError::Failed(format!("cannot send a pull request: {e}")))?;
                self.asked.requested();
                Ok(())
            }
        }
    }
}

/// How many messages the pull requests sent have asked for and not yet
/// brought: received, or given up by the server.
#[derive(Debug)]
struct Asked {
    batch: usize,
    pending: usize,
}

impl Asked {
    /// Whether to ask for more: half of what was asked for has come.
    fn wants_more(&self) -> bool {
        self.pending <= self.batch / 2
    }

    /// A request of a batch was sent.
    fn requested(&mut self) {
        self.pending += self.batch;
    }

    /// A message arrived.
    fn received(&mut self) {
        self.pending = self.pending.saturating_sub(1);
    }

    /// Accounts for a status reply; `Err` for one that ends the pull.
    fn status(
        &mut self,
        status: StatusCode,
        description: Option<&str>,
        headers: Option<&async_nats::HeaderMap>,
    ) -> Result<(), PullError> {
        match status {
            StatusCode::IDLE_HEARTBEAT => Ok(()),
            // A request that expired (408) or was cut short (409, e.g. by a
            // leadership change): the server says how many of its messages
            // it will not send.
            StatusCode::TIMEOUT | StatusCode::REQUEST_TERMINATED => {
                let description = description.unwrap_or_default();
                if description == "Consumer Deleted"
                    || description == "Consumer is push based"
                    || description.starts_with("Exceeded MaxRequest")
                {
                    return Err(PullError::Failed(format!(
                        "the server ended the pull: {status} {description}"
                    )));
                }
                let left = headers
                    .and_then(|h| h.get("Nats-Pending-Messages"))
                    .and_then(|v| v.as_str().parse::<usize>().ok())
                    .unwrap_or(self.batch);
                self.pending = self.pending.saturating_sub(left);
                Ok(())
            }
            // Only a request that asked not to wait gets this (these never
            // do): nothing to deliver, nothing left waiting.
            StatusCode::NOT_FOUND => {
                self.pending = 0;
                Ok(())
            }
            StatusCode::NO_RESPONDERS => Err(PullError::Failed(
                "no JetStream answered the pull request".into(),
            )),
            status => Err(PullError::Failed(format!(
                "unexpected status from the server: {status} {description:?}"
            ))),
        }
    }
}

/// A pull request's JSON: `batch` messages, expiring after `expires`,
/// heartbeats every half of it (all durations in nanoseconds).
fn request_body(batch: usize, expires: Duration) -> String {
    format!(
        r#"{{"batch":{batch},"expires":{},"idle_heartbeat":{}}}"#,
        expires.as_nanos(),
        (expires / 2).as_nanos()
    )
}

impl Stream for Puller {
    type Item = Result<async_nats::Message, PullError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Err(e) = this.request_more(cx) {
                return Poll::Ready(Some(Err(e)));
            }
            match Pin::new(&mut this.inbox).poll_next(cx) {
                Poll::Ready(Some(message)) => {
                    this.heard = true;
                    match message.status {
                        None | Some(StatusCode::OK) => {
                            this.asked.received();
                            return Poll::Ready(Some(Ok(message)));
                        }
                        Some(status) => {
                            let description = message.description.as_deref();
                            if let Err(e) =
                                this.asked
                                    .status(status, description, message.headers.as_ref())
                            {
                                return Poll::Ready(Some(Err(e)));
                            }
                        }
                    }
                }
                // The client is gone.
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => break,
            }
        }
        // Idle: two heartbeats from now without a word, a request is lost.
        // The timer moves only when something arrived since it last did
        // (moving it later is an atomic store, not a new timer).
        if std::mem::take(&mut this.heard) {
            let at = Instant::now() + this.heartbeat * 2;
            this.idle.as_mut().reset(at);
        }
        if this.idle.as_mut().poll(cx).is_ready() {
            // Moved forward on the next idle turn either way.
            this.heard = true;
            // With nothing asked for (the command queue was full) there is
            // nothing to hear: wait on.
            if this.asked.pending > 0 {
                this.asked.pending = 0;
                return Poll::Ready(Some(Err(PullError::MissingHeartbeat)));
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pull_request_asks_for_the_batch_with_heartbeats_every_half_expiry() {
        assert_eq!(
            request_body(64, Duration::from_secs(1)),
            r#"{"batch":64,"expires":1000000000,"idle_heartbeat":500000000}"#
        );
    }

    /// Two requests of 64 sent, 10 messages received: 118 pending.
    fn asked() -> Asked {
        let mut asked = Asked {
            batch: 64,
            pending: 0,
        };
        assert!(asked.wants_more());
        asked.requested();
        asked.requested();
        for _ in 0..10 {
            asked.received();
        }
        assert_eq!(asked.pending, 118);
        assert!(!asked.wants_more());
        asked
    }

    #[test]
    fn the_next_request_goes_out_once_half_the_batch_has_arrived() {
        let mut a = Asked {
            batch: 64,
            pending: 0,
        };
        a.requested();
        for _ in 0..31 {
            a.received();
        }
        assert!(!a.wants_more(), "33 of 64 still to come");
        a.received();
        assert!(a.wants_more(), "32 of 64 still to come");
    }

    fn pending_messages(n: &str) -> async_nats::HeaderMap {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Pending-Messages", n);
        h.insert("Nats-Pending-Bytes", "0");
        h
    }

    #[test]
    fn a_request_that_expired_or_was_cut_short_gives_back_what_it_left() {
        let mut a = asked();
        let h = pending_messages("54");
        a.status(StatusCode::TIMEOUT, Some("Request Timeout"), Some(&h))
            .unwrap();
        assert_eq!(a.pending, 64);
        assert!(!a.wants_more());
        a.status(
            StatusCode::REQUEST_TERMINATED,
            Some("Leadership Change"),
            Some(&pending_messages("40")),
        )
        .unwrap();
        assert_eq!(a.pending, 24);
        assert!(a.wants_more());
        // Without the header, the whole batch is taken as given up.
        let mut a = asked();
        a.status(StatusCode::TIMEOUT, None, None).unwrap();
        assert_eq!(a.pending, 54);
        a.status(StatusCode::TIMEOUT, None, Some(&pending_messages("x")))
            .unwrap();
        assert_eq!(a.pending, 0);
    }

    #[test]
    fn heartbeats_change_nothing_and_no_messages_clears_what_is_pending() {
        let mut a = asked();
        a.status(StatusCode::IDLE_HEARTBEAT, Some("Idle Heartbeat"), None)
            .unwrap();
        assert_eq!(a.pending, 118);
        a.status(StatusCode::NOT_FOUND, Some("No Messages"), None)
            .unwrap();
        assert_eq!(a.pending, 0);
    }

    #[test]
    fn statuses_that_end_the_pull_are_errors() {
        for (status, description) in [
            (StatusCode::REQUEST_TERMINATED, "Consumer Deleted"),
            (StatusCode::REQUEST_TERMINATED, "Consumer is push based"),
            (
                StatusCode::REQUEST_TERMINATED,
                "Exceeded MaxRequestBatch of 10",
            ),
            (
                StatusCode::REQUEST_TERMINATED,
                "Exceeded MaxRequestExpires of 1s",
            ),
            (StatusCode::NO_RESPONDERS, ""),
            (StatusCode::from_u16(400).unwrap(), "Bad Request"),
        ] {
            let mut a = asked();
            let h = pending_messages("54");
            let result = a.status(status, Some(description), Some(&h));
            assert!(
                matches!(result, Err(PullError::Failed(_))),
                "{status} {description}: {result:?}"
            );
            assert_eq!(a.pending, 118, "{status} {description}");
        }
    }
}
