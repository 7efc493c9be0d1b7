//! The durable record of which object versions are done, so a restart neither misses new
//! objects nor re-emits acknowledged ones.
//!
//! # What is recorded, and why not a high-water mark
//!
//! The checkpoint is the set of [`ObjectId`]s (16 bytes each: bucket, key and ETag hashed)
//! whose events were acknowledged (the Job exists) or rejected (dead-lettered). A high-water
//! mark by last-modified time would be smaller, but it is wrong for object stores: listings come
//! in key order, not time order, and an object can appear after others with a *later*
//! timestamp (S3 stamps a multipart upload with the time it was started; `cp -p` into a local
//! folder keeps an old mtime; S3-compatible clusters disagree on clocks). Any such object would
//! fall under the mark and be missed forever. The set is exact in every listing order.
//!
//! Each save writes the whole set. Acks that arrive while a save is running wait for the next
//! one and share it, so the engine's concurrent acks cost one write per batch, not per object.
//!
//! It stays compact: 16 bytes per live object (10,000 objects = 160 KB), and after every
//! complete listing the ids of objects no longer listed (deleted, or overwritten: a new ETag is
//! a new id) are dropped, so it tracks the bucket's size, not its history.
//!
//! # Delivery guarantee
//!
//! At least once, and exactly once per object version in the common case: an acknowledgement
//! returns only after a checkpoint holding it was saved (group commit: concurrent acks share
//! one save), so an acked object is never emitted again. An object emitted but not yet settled
//! when the process stops is emitted again after the restart; its id is the same, so it maps to
//! the same Job. `retry`, or a delivery dropped unsettled, makes the object eligible on the next
//! listing.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rand::Rng;

use super::object::ObjectId;
use crate::SourceError;
use crate::checkpoint::CheckpointStore;

/// First byte of a saved checkpoint; the rest is a sorted run of 16-byte ids.
const FORMAT_V1: u8 = 1;
/// A failed save is tried this many times in all before the ack reports the failure.
const SAVE_ATTEMPTS: u32 = 3;

/// Which objects are done (durably) and which are out with the engine (in memory).
pub struct Ledger {
    store: Arc<dyn CheckpointStore>,
    key: String,
    state: Mutex<State>,
    /// Held while saving; holds the generation the last successful save covered.
    saved: tokio::sync::Mutex<u64>,
}

#[derive(Default)]
struct State {
    done: HashSet<ObjectId>,
    in_flight: HashSet<ObjectId>,
    /// Ids listed by the listing in progress, to forget done objects that are gone.
    seen: Option<HashSet<ObjectId>>,
    /// Bumped on every change to `done`.
    generation: u64,
}

impl Ledger {
    /// Loads the checkpoint saved under `key`, or starts empty.
    pub async fn load(store: Arc<dyn CheckpointStore>, key: String) -> Result<Self, SourceError> {
        let done = match store.load(&key).await.map_err(SourceError::Checkpoint)? {
            Some(bytes) => decode(&bytes).map_err(|reason| {
                SourceError::Checkpoint(format!("checkpoint {key} is unreadable: {reason}"))
            })?,
            None => HashSet::new(),
        };
        Ok(Ledger {
            store,
            key,
            state: Mutex::new(State {
                done,
                ..State::default()
            }),
            saved: tokio::sync::Mutex::new(0),
        })
    }

    /// Starts a listing: ids seen from now on are the ones still in the bucket.
    pub fn begin_listing(&self) {
        self.state.lock().seen = Some(HashSet::new());
    }

    /// Notes that `id` is listed and claims it for emission: `true` when it is neither done
    /// nor already out with the engine.
    pub fn claim(&self, id: ObjectId) -> bool {
        let mut state = self.state.lock();
        if let Some(seen) = &mut state.seen {
            seen.insert(id);
        }
        !state.done.contains(&id) && state.in_flight.insert(id)
    }

    /// Ends a listing. A complete one forgets done ids that it did not list, and saves that.
    pub async fn end_listing(&self, complete: bool) -> Result<(), SourceError> {
        let pruned = {
            let mut state = self.state.lock();
            let seen = state.seen.take();
            match seen {
                Some(seen) if complete => {
                    let before = state.done.len();
                    state.done.retain(|id| seen.contains(id));
                    let pruned = before - state.done.len();
                    if pruned > 0 {
                        state.generation += 1;
                    }
                    pruned
                }
                _ => 0,
            }
        };
        if pruned > 0 {
            tracing::debug!(checkpoint = %self.key, pruned, "forgot objects no longer listed");
            self.commit().await?;
        }
        Ok(())
    }

    /// The object's event was acknowledged or rejected: never emit it again. Takes effect at
    /// once in memory; [`Ledger::commit`] makes it durable.
    pub fn mark_done(&self, id: ObjectId) {
        let mut state = self.state.lock();
        state.in_flight.remove(&id);
        if state.done.insert(id) {
            state.generation += 1;
        }
    }

    /// The object's event is to be tried again: the next listing emits it.
    pub fn release(&self, id: ObjectId) {
        self.state.lock().in_flight.remove(&id);
    }

    /// Saves the ledger unless a save that covers every change made so far has already
    /// happened: acks waiting on one save all return when it lands (group commit).
    pub async fn commit(&self) -> Result<(), SourceError> {
        let wanted = self.state.lock().generation;
        let mut saved = self.saved.lock().await;
        if *saved >= wanted {
            return Ok(());
        }
        let (bytes, generation) = {
            let state = self.state.lock();
            (encode(&state.done), state.generation)
        };
        let mut attempt = 1;
        loop {
            match self.store.save(&self.key, bytes.clone()).await {
                Ok(()) => {
                    *saved = generation;
                    return Ok(());
                }
                Err(reason) if attempt < SAVE_ATTEMPTS => {
                    let pause = Duration::from_millis(100 * 2u64.pow(attempt))
                        + Duration::from_millis(rand::rng().random_range(0..100));
                    tracing::warn!(
                        checkpoint = %self.key, attempt, %reason, retry_in = ?pause,
                        "cannot save the object-store checkpoint; retrying"
                    );
                    tokio::time::sleep(pause).await;
                    attempt += 1;
                }
                Err(reason) => {
                    return Err(SourceError::Checkpoint(format!(
                        "cannot save {} after {SAVE_ATTEMPTS} attempts: {reason}",
                        self.key
                    )));
                }
            }
        }
    }
}

fn encode(done: &HashSet<ObjectId>) -> Vec<u8> {
    // Sorted, so the same set always saves to the same bytes.
    let mut ids: Vec<&ObjectId> = done.iter().collect();
    ids.sort_unstable();
    let mut bytes = Vec::with_capacity(1 + ids.len() * 16);
    bytes.push(FORMAT_V1);
    for id in ids {
        bytes.extend_from_slice(&id.0);
    }
    bytes
}

fn decode(bytes: &[u8]) -> Result<HashSet<ObjectId>, String> {
    match bytes.split_first() {
        Some((&FORMAT_V1, ids)) if ids.len() % 16 == 0 => Ok(ids
            .chunks_exact(16)
            .map(|chunk| {
                let mut id = [0u8; 16];
                id.copy_from_slice(chunk);
                ObjectId(id)
            })
            .collect()),
        Some((&FORMAT_V1, ids)) => Err(format!("{} bytes of ids is not whole ids", ids.len())),
        Some((version, _)) => Err(format!("unknown format {version}")),
        None => Err("empty".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::FileCheckpoints;

    fn id(n: u8) -> ObjectId {
        ObjectId::new("b", &n.to_string(), "e")
    }

    #[tokio::test]
    async fn acked_objects_survive_a_restart_and_in_flight_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn CheckpointStore> = Arc::new(FileCheckpoints::new(dir.path()));
        let ledger = Ledger::load(store.clone(), "p".into()).await.unwrap();
        assert!(ledger.claim(id(1)));
        assert!(ledger.claim(id(2)));
        assert!(!ledger.claim(id(1)), "already out with the engine");
        ledger.mark_done(id(1));
        ledger.commit().await.unwrap();
        assert!(!ledger.claim(id(1)), "done");

        let reopened = Ledger::load(store, "p".into()).await.unwrap();
        assert!(!reopened.claim(id(1)));
        assert!(reopened.claim(id(2)), "never acked: emitted again");
    }

    #[tokio::test]
    async fn a_released_object_is_claimed_again() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::load(Arc::new(FileCheckpoints::new(dir.path())), "p".into())
            .await
            .unwrap();
        assert!(ledger.claim(id(1)));
        ledger.release(id(1));
        assert!(ledger.claim(id(1)));
    }

    #[tokio::test]
    async fn a_complete_listing_forgets_objects_that_are_gone() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn CheckpointStore> = Arc::new(FileCheckpoints::new(dir.path()));
        let ledger = Ledger::load(store.clone(), "p".into()).await.unwrap();
        for n in 0..3 {
            ledger.claim(id(n));
            ledger.mark_done(id(n));
            ledger.commit().await.unwrap();
        }
        ledger.begin_listing();
        assert!(!ledger.claim(id(0)));
        ledger.end_listing(false).await.unwrap();
        assert_eq!(
            decode(&store.load("p").await.unwrap().unwrap())
                .unwrap()
                .len(),
            3
        );

        ledger.begin_listing();
        assert!(!ledger.claim(id(0)));
        ledger.end_listing(true).await.unwrap();
        let saved = decode(&store.load("p").await.unwrap().unwrap()).unwrap();
        assert_eq!(saved, HashSet::from([id(0)]));
    }

    #[test]
    fn a_damaged_checkpoint_is_refused() {
        assert!(decode(&[]).is_err());
        assert!(decode(&[FORMAT_V1, 1, 2]).is_err());
        assert!(decode(&[9]).is_err());
        assert_eq!(decode(&[FORMAT_V1]).unwrap(), HashSet::new());
    }
}
