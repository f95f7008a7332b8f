//! Read-modify-write of objects the controller writes too. Every status write moves a
//! group's resourceVersion, so a conditional write from the API can meet a 409 although
//! nothing it changes was touched; the change is then made again on a fresh read (like
//! client-go's `RetryOnConflict`) instead of handing the client a conflict it did not cause.

use std::time::Duration;

use super::problem::ApiError;

/// Attempts before the conflict is the client's answer.
const TRIES: u32 = 8;
/// First pause between attempts; it doubles each time (with jitter), 10 ms to about 1.3 s
/// in all, so that two writers in step drift apart.
const FIRST_PAUSE: Duration = Duration::from_millis(10);

/// Runs `attempt` (read, change, conditional write) until it does not end in
/// [`ApiError::Conflict`], at most [`TRIES`] times.
pub(super) async fn on_conflict<T, F, Fut>(mut attempt: F) -> Result<T, ApiError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ApiError>>,
{
    let mut pause = FIRST_PAUSE;
    for _ in 1..TRIES {
        match attempt().await {
            Err(ApiError::Conflict) => {
                tokio::time::sleep(pause.mul_f64(rand::random_range(0.5..1.5))).await;
                pause *= 2;
            }
            done => return done,
        }
    }
    attempt().await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An attempt that conflicts `conflicts` times, then succeeds; counts its calls.
    async fn run(conflicts: u32) -> (Result<u32, ApiError>, u32) {
        let mut calls = 0;
        let result = on_conflict(|| {
            calls += 1;
            let call = calls;
            async move {
                if call <= conflicts {
                    Err(ApiError::Conflict)
                } else {
                    Ok(call)
                }
            }
        })
        .await;
        (result, calls)
    }

    #[tokio::test]
    async fn conflicts_are_retried_on_a_fresh_attempt() {
        let (result, calls) = run(3).await;
        assert_eq!(result.ok(), Some(4));
        assert_eq!(calls, 4);
    }

    #[tokio::test]
    async fn a_lasting_conflict_reaches_the_client_after_the_last_try() {
        let (result, calls) = run(u32::MAX).await;
        assert!(matches!(result, Err(ApiError::Conflict)), "{result:?}");
        assert_eq!(calls, TRIES);
    }

    #[tokio::test]
    async fn other_errors_are_not_retried() {
        let mut calls = 0;
        let result: Result<(), ApiError> = on_conflict(|| {
            calls += 1;
            async { Err(ApiError::NotFound("image group grp-x".into())) }
        })
        .await;
        assert!(matches!(result, Err(ApiError::NotFound(_))), "{result:?}");
        assert_eq!(calls, 1);
    }
}
