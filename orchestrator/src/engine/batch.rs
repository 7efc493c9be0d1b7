//! Groups deliveries into the events of one Job: one per Job in `perEvent` mode; in
//! `indexed` mode up to `batchSize`, flushed when full or when the oldest has waited
//! `maxWait`.

use std::time::Duration;

use spate_sources::Delivery;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Reads the next batch from `deliveries`. Returns `None` when the source has stopped and
/// nothing is left.
pub async fn next_batch(
    deliveries: &mut mpsc::Receiver<Delivery>,
    size: usize,
    max_wait: Duration,
) -> Option<Vec<Delivery>> {
    let first = deliveries.recv().await?;
    let mut batch = Vec::with_capacity(size.min(1024));
    batch.push(first);
    let deadline = Instant::now() + max_wait;
    while batch.len() < size {
        match tokio::time::timeout_at(deadline, deliveries.recv()).await {
            Ok(Some(delivery)) => batch.push(delivery),
            Ok(None) | Err(_) => break,
        }
    }
    Some(batch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;
    use spate_sources::{Ack, Event};

    fn delivery(id: usize) -> Delivery {
        Delivery {
            refusal: None,
            event: Event::new(id.to_string(), Map::new()).unwrap(),
            ack: Ack::none(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_leaves_at_once_and_a_partial_one_after_max_wait() {
        let (tx, mut rx) = mpsc::channel(100);
        for id in 0..7 {
            tx.send(delivery(id)).await.unwrap();
        }
        let started = Instant::now();
        let full = next_batch(&mut rx, 5, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(full.len(), 5);
        assert_eq!(started.elapsed(), Duration::ZERO);
        let partial = next_batch(&mut rx, 5, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(partial.len(), 2);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        drop(tx);
        assert!(
            next_batch(&mut rx, 5, Duration::from_secs(5))
                .await
                .is_none()
        );
    }
}
