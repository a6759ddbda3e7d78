//! Where processed message ids are remembered.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::envelope::MessageId;
use crate::transport::{BoxError, BoxFuture};

/// The future a [`DedupeStore`] returns: already resolved (an in-process
/// store, no allocation) or a boxed future (a networked one).
pub enum StoreFuture<'a, T> {
    /// The answer, at once.
    Ready(Option<T>),
    /// The answer, later.
    Pending(BoxFuture<'a, T>),
}

impl<T> StoreFuture<'_, T> {
    /// An answer that is already known.
    pub fn ready(value: T) -> Self {
        StoreFuture::Ready(Some(value))
    }
}

impl<T: Unpin> Future for StoreFuture<'_, T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        match self.get_mut() {
            StoreFuture::Ready(value) => {
                Poll::Ready(value.take().expect("polled after completion"))
            }
            StoreFuture::Pending(future) => future.as_mut().poll(cx),
        }
    }
}

/// Identifies one claim, so that a holder whose claim expired and was
/// taken over cannot complete or release its successor's.
pub type ClaimToken = u64;

/// What a [`DedupeStore`] says about a message id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// Not seen before (or released, or its holder's claim expired): the
    /// caller now holds it and must `complete` or `release` it with the token.
    Acquired(ClaimToken),
    /// Already processed with the same payload.
    Duplicate,
    /// Being processed right now by another delivery.
    InProgress,
    /// Already used for a different payload.
    Conflict,
}

/// Remembers which message ids a consumer has processed.
///
/// `scope` separates consumers (it is the consumer's source), `fingerprint`
/// identifies the payload, so that a reused id with another payload is told
/// apart from a duplicate. A store must make `claim` atomic: two concurrent
/// claims of one id never both get [`Claim::Acquired`].
///
/// ```
/// use switchyard_core::middleware::dedupe::{Claim, DedupeStore, MemoryDedupeStore};
/// use switchyard_core::MessageId;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let store = MemoryDedupeStore::new();
/// let id = MessageId::new();
/// let Claim::Acquired(token) = store.claim("orders", &id, 7).await.unwrap() else { panic!() };
/// assert_eq!(store.claim("orders", &id, 7).await.unwrap(), Claim::InProgress);
/// store.complete("orders", &id, 7, token).await.unwrap();
/// assert_eq!(store.claim("orders", &id, 7).await.unwrap(), Claim::Duplicate);
/// assert_eq!(store.claim("orders", &id, 8).await.unwrap(), Claim::Conflict);
/// # }
/// # fn _object_safe(_: &dyn DedupeStore) {}
/// ```
pub trait DedupeStore: Send + Sync + 'static {
    /// Claims `id` for processing.
    fn claim<'a>(
        &'a self,
        scope: &'a str,
        id: &'a MessageId,
        fingerprint: u64,
    ) -> StoreFuture<'a, Result<Claim, BoxError>>;

    /// Records `id` as processed (after the handler succeeded), if the
    /// claim `token` is still the current one.
    fn complete<'a>(
        &'a self,
        scope: &'a str,
        id: &'a MessageId,
        fingerprint: u64,
        token: ClaimToken,
    ) -> StoreFuture<'a, Result<(), BoxError>>;

    /// Gives up the claim `token` (the handler failed): the next delivery
    /// may run. A claim already taken over is left alone.
    fn release<'a>(
        &'a self,
        scope: &'a str,
        id: &'a MessageId,
        token: ClaimToken,
    ) -> StoreFuture<'a, Result<(), BoxError>>;
}

#[derive(Clone, Copy)]
struct Entry {
    fingerprint: u64,
    done: bool,
    since: Instant,
    token: ClaimToken,
}

/// A 64-bit digest of (scope, id) under the store's random key: entries
/// need no strings of their own. Two ids of 100,000 remembered collide with
/// a probability of about 3 in 10^10, an attacker cannot aim for a
/// collision without the key, and one would gain nothing over reusing an id.
type Key = u64;

/// The key is already a keyed hash: use its bits as they are.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(word);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[derive(Default)]
struct Entries {
    map: HashMap<Key, Entry, BuildHasherDefault<KeyHasher>>,
    /// Insertion order, for expiry and eviction; may hold keys that were
    /// released or re-claimed since (checked against `since`).
    order: VecDeque<(Instant, Key)>,
    next_token: ClaimToken,
}

/// A bounded, in-process [`DedupeStore`] whose entries expire.
///
/// It remembers at most `capacity` ids (the oldest processed ones are
/// forgotten first) for at most `ttl` each, counted from the claim; a claim
/// still in progress after `ttl` is treated as abandoned. Only deliveries seen by this process are
/// deduplicated: use a shared store (PostgreSQL, Redis) across processes.
#[derive(Clone)]
pub struct MemoryDedupeStore {
    entries: Arc<Mutex<Entries>>,
    keys: RandomState,
    capacity: usize,
    ttl: Duration,
}

impl Default for MemoryDedupeStore {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryDedupeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryDedupeStore")
            .field("capacity", &self.capacity)
            .field("ttl", &self.ttl)
            .field("len", &self.len())
            .finish()
    }
}

impl MemoryDedupeStore {
    /// 100,000 ids for an hour each.
    pub fn new() -> Self {
        Self::with_limits(100_000, Duration::from_secs(3600))
    }

    /// At most `capacity` ids, each for at most `ttl`.
    pub fn with_limits(capacity: usize, ttl: Duration) -> Self {
        MemoryDedupeStore {
            entries: Arc::default(),
            keys: RandomState::new(),
            capacity: capacity.max(1),
            ttl,
        }
    }

    /// How many ids it remembers now.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Whether it remembers none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn key(&self, scope: &str, id: &MessageId) -> Key {
        let mut h = self.keys.build_hasher();
        scope.hash(&mut h);
        id.as_str().hash(&mut h);
        h.finish()
    }

    fn evict(&self, entries: &mut Entries, now: Instant) {
        let mut rotated = 0;
        while let Some(&(since, key)) = entries.order.front() {
            let expired = now.duration_since(since) >= self.ttl;
            let entry = entries.map.get(&key).filter(|e| e.since == since).copied();
            match entry {
                // Superseded (re-claimed, completed or released since): drop
                // the stale order record.
                None => {}
                Some(_) if !expired && entries.map.len() <= self.capacity => break,
                // Over capacity, but in progress: never forget a live claim;
                // look past it (once round at most) for processed ones.
                Some(e) if !expired && !e.done => {
                    if rotated >= entries.order.len() {
                        break;
                    }
                    rotated += 1;
                    let record = entries.order.pop_front().expect("peeked");
                    entries.order.push_back(record);
                    continue;
                }
                Some(_) => {
                    entries.map.remove(&key);
                }
            }
            entries.order.pop_front();
        }
    }

    fn claim_now(&self, scope: &str, id: &MessageId, fingerprint: u64) -> Claim {
        let key = self.key(scope, id);
        let now = Instant::now();
        let mut entries = self.lock();
        if let Some(e) = entries.map.get(&key) {
            let stale = now.duration_since(e.since) >= self.ttl;
            if !stale {
                return match (e.fingerprint == fingerprint, e.done) {
                    (false, _) => Claim::Conflict,
                    (true, true) => Claim::Duplicate,
                    (true, false) => Claim::InProgress,
                };
            }
        }
        entries.next_token += 1;
        let token = entries.next_token;
        entries.map.insert(
            key,
            Entry {
                fingerprint,
                done: false,
                since: now,
                token,
            },
        );
        entries.order.push_back((now, key));
        self.evict(&mut entries, now);
        // Released claims leave order records behind; keep them bounded.
        if entries.order.len() > 2 * self.capacity.max(16) {
            let Entries { map, order, .. } = &mut *entries;
            order.retain(|(since, key)| map.get(key).is_some_and(|e| e.since == *since));
        }
        Claim::Acquired(token)
    }

    fn complete_now(&self, scope: &str, id: &MessageId, fingerprint: u64, token: ClaimToken) {
        let key = self.key(scope, id);
        let mut entries = self.lock();
        match entries.map.get_mut(&key) {
            // Completed in place: it keeps its claim's place in the order
            // (and is remembered for `ttl` from its claim).
            Some(e) if e.token == token => {
                e.fingerprint = fingerprint;
                e.done = true;
            }
            // Taken over by a later claim: that one decides.
            Some(_) => {}
            // Forgotten while in progress (its claim outlived `ttl`).
            None => {
                let now = Instant::now();
                entries.map.insert(
                    key,
                    Entry {
                        fingerprint,
                        done: true,
                        since: now,
                        token,
                    },
                );
                entries.order.push_back((now, key));
            }
        }
    }

    fn release_now(&self, scope: &str, id: &MessageId, token: ClaimToken) {
        let key = self.key(scope, id);
        let mut entries = self.lock();
        if entries
            .map
            .get(&key)
            .is_some_and(|e| !e.done && e.token == token)
        {
            entries.map.remove(&key);
        }
    }
}

impl DedupeStore for MemoryDedupeStore {
    fn claim<'a>(
        &'a self,
        scope: &'a str,
        id: &'a MessageId,
        fingerprint: u64,
    ) -> StoreFuture<'a, Result<Claim, BoxError>> {
        StoreFuture::ready(Ok(self.claim_now(scope, id, fingerprint)))
    }

    fn complete<'a>(
        &'a self,
        scope: &'a str,
        id: &'a MessageId,
        fingerprint: u64,
        token: ClaimToken,
    ) -> StoreFuture<'a, Result<(), BoxError>> {
        self.complete_now(scope, id, fingerprint, token);
        StoreFuture::ready(Ok(()))
    }

    fn release<'a>(
        &'a self,
        scope: &'a str,
        id: &'a MessageId,
        token: ClaimToken,
    ) -> StoreFuture<'a, Result<(), BoxError>> {
        self.release_now(scope, id, token);
        StoreFuture::ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acquired(claim: Claim) -> ClaimToken {
        match claim {
            Claim::Acquired(token) => token,
            other => panic!("expected Acquired, got {other:?}"),
        }
    }

    #[test]
    fn capacity_forgets_the_oldest_processed_ids() {
        let store = MemoryDedupeStore::with_limits(2, Duration::from_secs(60));
        let ids: Vec<_> = (0..3).map(|_| MessageId::new()).collect();
        for id in &ids {
            let token = acquired(store.claim_now("s", id, 1));
            store.complete_now("s", id, 1, token);
        }
        assert!(store.len() <= 2);
        assert_eq!(store.claim_now("s", &ids[2], 1), Claim::Duplicate);
        acquired(store.claim_now("s", &ids[0], 1));
    }

    #[test]
    fn in_progress_claims_are_never_evicted_for_capacity_but_do_not_pin_others() {
        let store = MemoryDedupeStore::with_limits(1, Duration::from_secs(60));
        let (a, b, c) = (MessageId::new(), MessageId::new(), MessageId::new());
        acquired(store.claim_now("s", &a, 1));
        let tb = acquired(store.claim_now("s", &b, 1));
        store.complete_now("s", &b, 1, tb);
        acquired(store.claim_now("s", &c, 1));
        assert_eq!(store.claim_now("s", &a, 1), Claim::InProgress);
        assert!(
            store.len() <= 2,
            "the processed id behind a live claim was evicted"
        );
    }

    #[test]
    fn expired_entries_are_forgotten() {
        let store = MemoryDedupeStore::with_limits(10, Duration::ZERO);
        let id = MessageId::new();
        let token = acquired(store.claim_now("s", &id, 1));
        store.complete_now("s", &id, 1, token);
        acquired(store.claim_now("s", &id, 1));
    }

    #[test]
    fn a_taken_over_claim_cannot_release_or_complete_its_successor() {
        let store = MemoryDedupeStore::with_limits(10, Duration::from_millis(50));
        let id = MessageId::new();
        let old = acquired(store.claim_now("s", &id, 1));
        // The old claim outlives the ttl and is taken over.
        std::thread::sleep(Duration::from_millis(60));
        let new = acquired(store.claim_now("s", &id, 1));
        assert_ne!(old, new);
        store.release_now("s", &id, old);
        store.complete_now("s", &id, 1, old);
        let e = store.lock().map.values().next().copied().unwrap();
        assert!(
            !e.done && e.token == new,
            "the successor's claim is untouched"
        );
    }

    #[test]
    fn released_claims_do_not_grow_the_order_records_without_bound() {
        let store = MemoryDedupeStore::with_limits(4, Duration::from_secs(60));
        let id = MessageId::new();
        for _ in 0..1000 {
            let token = acquired(store.claim_now("s", &id, 1));
            store.release_now("s", &id, token);
        }
        assert!(store.lock().order.len() <= 64);
    }

    #[test]
    fn scopes_are_separate() {
        let store = MemoryDedupeStore::new();
        let id = MessageId::new();
        acquired(store.claim_now("a", &id, 1));
        acquired(store.claim_now("b", &id, 1));
    }
}
