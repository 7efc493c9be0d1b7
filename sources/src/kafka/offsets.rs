//! Which offset of each partition may be committed: the contiguous watermark.
//!
//! Records are handed to the engine in offset order but their Jobs are created out of order,
//! so committing "the last record acknowledged" would skip records whose Job does not exist
//! yet, and a crash would lose them. Each partition instead keeps the offsets it has read and
//! not finished; the watermark is the lowest of them (or, when none is open, one past the
//! highest read). Everything below the watermark has its Job (or was dead-lettered), so it is
//! the offset to commit: Kafka's committed offset is the next record to read.
//!
//! Each assignment of a partition gets a new generation. A settlement from an earlier
//! generation (a record handed out before a rebalance took the partition away) is ignored:
//! the new owner reads that record again.

use std::collections::{BTreeMap, HashMap};

/// A partition of a topic.
pub type Partition = (String, i32);

/// Where one open record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    /// Read, waiting to be handed to the engine.
    Queued,
    /// Handed to the engine, not settled.
    InEngine,
    /// Handed back by the engine; waiting to be handed out again.
    Parked,
}

#[derive(Debug)]
struct PartitionOffsets {
    generation: u64,
    open: BTreeMap<i64, Open>,
    /// One past the highest offset read in this generation.
    next: Option<i64>,
    /// The offset last committed (or found committed) in this generation.
    committed: Option<i64>,
}

impl PartitionOffsets {
    fn watermark(&self) -> Option<i64> {
        self.open.keys().next().copied().or(self.next)
    }
}

/// The open records and watermarks of the partitions assigned to this consumer.
#[derive(Debug, Default)]
pub struct Offsets {
    partitions: HashMap<Partition, PartitionOffsets>,
    generations: u64,
}

impl Offsets {
    /// The partition is now ours; returns its generation.
    pub fn assign(&mut self, partition: Partition) -> u64 {
        self.generations += 1;
        self.partitions.insert(
            partition,
            PartitionOffsets {
                generation: self.generations,
                open: BTreeMap::new(),
                next: None,
                committed: None,
            },
        );
        self.generations
    }

    /// The partition is no longer ours; what was open in it is forgotten.
    pub fn revoke(&mut self, partition: &Partition) {
        self.partitions.remove(partition);
    }

    /// The generation the partition is assigned in, `None` when it is not assigned.
    pub fn generation(&self, partition: &Partition) -> Option<u64> {
        self.partitions.get(partition).map(|p| p.generation)
    }

    /// A record was read. Returns the generation to settle it with, `None` when the partition
    /// is not assigned (a record fetched just before a rebalance; the new owner reads it).
    pub fn read(&mut self, partition: &Partition, offset: i64) -> Option<u64> {
        let state = self.partitions.get_mut(partition)?;
        state.open.insert(offset, Open::Queued);
        state.next = Some(state.next.map_or(offset + 1, |next| next.max(offset + 1)));
        Some(state.generation)
    }

    /// Moves an open record to `to`; false when it is not open in `generation`.
    pub fn mark(&mut self, partition: &Partition, generation: u64, offset: i64, to: Open) -> bool {
        match self.open_record(partition, generation, offset) {
            Some(open) => {
                *open = to;
                true
            }
            None => false,
        }
    }

    /// The record is finished: its Job exists, or it was dead-lettered.
    pub fn done(&mut self, partition: &Partition, generation: u64, offset: i64) -> bool {
        match self.partitions.get_mut(partition) {
            Some(state) if state.generation == generation => state.open.remove(&offset).is_some(),
            _ => false,
        }
    }

    fn open_record(
        &mut self,
        partition: &Partition,
        generation: u64,
        offset: i64,
    ) -> Option<&mut Open> {
        let state = self.partitions.get_mut(partition)?;
        if state.generation != generation {
            return None;
        }
        state.open.get_mut(&offset)
    }

    /// Records of `partitions` still with the engine (not queued, not parked).
    pub fn in_engine<'a>(&self, partitions: impl IntoIterator<Item = &'a Partition>) -> usize {
        partitions
            .into_iter()
            .filter_map(|partition| self.partitions.get(partition))
            .map(|state| {
                state
                    .open
                    .values()
                    .filter(|open| **open == Open::InEngine)
                    .count()
            })
            .sum()
    }

    /// Records with the engine in every partition.
    pub fn in_engine_total(&self) -> usize {
        self.in_engine(self.partitions.keys().collect::<Vec<_>>())
    }

    /// The watermark of each partition whose watermark moved past its last commit.
    pub fn to_commit(&self) -> Vec<(Partition, i64)> {
        let mut due: Vec<(Partition, i64)> = self
            .partitions
            .iter()
            .filter_map(|(partition, state)| {
                let watermark = state.watermark()?;
                (state
                    .committed
                    .is_none_or(|committed| watermark > committed))
                .then(|| (partition.clone(), watermark))
            })
            .collect();
        due.sort();
        due
    }

    /// The watermark of one partition, when it has read anything in this generation.
    pub fn watermark(&self, partition: &Partition) -> Option<i64> {
        self.partitions
            .get(partition)
            .and_then(PartitionOffsets::watermark)
    }

    /// `offset` is committed for the partition (ignored if it is no longer assigned).
    pub fn committed(&mut self, partition: &Partition, offset: i64) {
        if let Some(state) = self.partitions.get_mut(partition) {
            state.committed = Some(state.committed.map_or(offset, |c| c.max(offset)));
        }
    }

    pub fn assigned(&self) -> Vec<Partition> {
        let mut partitions: Vec<Partition> = self.partitions.keys().cloned().collect();
        partitions.sort();
        partitions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: i32) -> Partition {
        ("t".to_string(), n)
    }

    #[test]
    fn the_watermark_stops_at_the_first_open_record() {
        let mut offsets = Offsets::default();
        let generation = offsets.assign(p(0));
        assert!(
            offsets.to_commit().is_empty(),
            "nothing read, nothing to commit"
        );
        for offset in 10..15 {
            assert_eq!(offsets.read(&p(0), offset), Some(generation));
            assert!(offsets.mark(&p(0), generation, offset, Open::InEngine));
        }
        assert_eq!(offsets.to_commit(), vec![(p(0), 10)]);
        // Jobs are created out of order: 12 and 14 first.
        assert!(offsets.done(&p(0), generation, 12));
        assert!(offsets.done(&p(0), generation, 14));
        assert_eq!(offsets.watermark(&p(0)), Some(10));
        assert!(offsets.done(&p(0), generation, 10));
        assert_eq!(offsets.watermark(&p(0)), Some(11));
        assert!(offsets.done(&p(0), generation, 11));
        assert_eq!(offsets.watermark(&p(0)), Some(13));
        offsets.committed(&p(0), 13);
        assert!(offsets.to_commit().is_empty(), "already committed");
        assert!(offsets.done(&p(0), generation, 13));
        assert_eq!(
            offsets.to_commit(),
            vec![(p(0), 15)],
            "one past the highest read"
        );
        assert!(!offsets.done(&p(0), generation, 13), "settled once");
    }

    #[test]
    fn parked_and_queued_records_hold_the_watermark_but_not_a_revocation() {
        let mut offsets = Offsets::default();
        let generation = offsets.assign(p(1));
        offsets.assign(p(2));
        offsets.read(&p(1), 0);
        offsets.read(&p(1), 1);
        offsets.read(&p(1), 2);
        offsets.mark(&p(1), generation, 1, Open::InEngine);
        offsets.mark(&p(1), generation, 2, Open::Parked);
        assert_eq!(offsets.in_engine([&p(1)]), 1);
        assert_eq!(offsets.in_engine_total(), 1);
        offsets.done(&p(1), generation, 1);
        assert_eq!(offsets.in_engine([&p(1), &p(2)]), 0);
        assert_eq!(offsets.watermark(&p(1)), Some(0), "queued 0 still open");
        offsets.done(&p(1), generation, 0);
        assert_eq!(offsets.watermark(&p(1)), Some(2), "parked 2 still open");
        assert_eq!(offsets.assigned(), vec![p(1), p(2)]);
    }

    #[test]
    fn settlements_of_an_earlier_assignment_are_ignored() {
        let mut offsets = Offsets::default();
        let first = offsets.assign(p(0));
        offsets.read(&p(0), 5);
        offsets.revoke(&p(0));
        assert_eq!(offsets.read(&p(0), 6), None, "not assigned");
        assert!(!offsets.done(&p(0), first, 5));
        let second = offsets.assign(p(0));
        assert_ne!(first, second);
        offsets.read(&p(0), 5);
        assert!(
            !offsets.done(&p(0), first, 5),
            "from the earlier generation"
        );
        assert!(!offsets.mark(&p(0), first, 5, Open::Parked));
        assert_eq!(offsets.watermark(&p(0)), Some(5));
        assert!(offsets.done(&p(0), second, 5));
        assert_eq!(offsets.generation(&p(0)), Some(second));
    }
}
