//! Bounded retries for API calls, shared by the controllers and the node agent.
//!
//! The simulator's API server injects 429s and 5xx (as a loaded real one does), so every write
//! goes through [`retry`]: transient failures are retried a few times with jittered exponential
//! backoff, anything else (404, 409, 422) is the caller's to interpret.

use std::{future::Future, time::Duration};

use rand::Rng;

/// Attempts per call before a transient error is handed back to the caller.
const MAX_ATTEMPTS: u32 = 6;
const FIRST_DELAY: Duration = Duration::from_millis(50);
const MAX_DELAY: Duration = Duration::from_secs(2);

/// Runs `op` until it succeeds, fails permanently or has failed transiently [`MAX_ATTEMPTS`] times.
pub(crate) async fn retry<T, F, Fut>(mut op: F) -> Result<T, kube::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, kube::Error>>,
{
    let mut delay = FIRST_DELAY;
    let mut attempt = 1;
    loop {
        match op().await {
            Err(error) if attempt < MAX_ATTEMPTS && is_transient(&error) => {
                tracing::debug!(%error, attempt, "transient API error, retrying");
                tokio::time::sleep(jittered(delay)).await;
                delay = (delay * 2).min(MAX_DELAY);
                attempt += 1;
            }
            outcome => return outcome,
        }
    }
}

/// Half to all of `delay`, so clients that failed together do not retry together.
pub(crate) fn jittered(delay: Duration) -> Duration {
    let factor = rand::rng().random_range(0.5..=1.0);
    delay.mul_f64(factor)
}

/// Throttling, server errors and broken connections are worth another try.
pub(crate) fn is_transient(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => status.code == 429 || status.code >= 500,
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

/// The API answered with `code` (404 not found, 409 conflict or already exists, ...).
pub(crate) fn has_code(error: &kube::Error, code: u16) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(Box::new(
            kube::core::Status::failure("injected", "Injected").with_code(code),
        ))
    }

    #[test]
    fn throttling_and_server_errors_are_transient_conflicts_are_not() {
        assert!(is_transient(&api_error(429)));
        assert!(is_transient(&api_error(503)));
        assert!(!is_transient(&api_error(409)));
        assert!(!is_transient(&api_error(404)));
        assert!(has_code(&api_error(404), 404));
    }

    #[tokio::test]
    async fn gives_up_after_bounded_attempts() {
        let mut calls = 0;
        let outcome: Result<(), _> = retry(|| {
            calls += 1;
            async { Err(api_error(500)) }
        })
        .await;
        assert!(outcome.is_err());
        assert_eq!(calls, MAX_ATTEMPTS);
    }

    #[tokio::test]
    async fn recovers_from_a_transient_error() {
        let mut calls = 0;
        let outcome = retry(|| {
            calls += 1;
            let attempt = calls;
            async move {
                if attempt < 3 {
                    Err(api_error(429))
                } else {
                    Ok(attempt)
                }
            }
        })
        .await;
        assert_eq!(outcome.ok(), Some(3));
    }
}
