//! Per-key rate limits: a token bucket per API key (governor's GCRA), sized by the key
//! record's `rate-limit` (requests per second, also the burst) or the API's default. Past it
//! the answer is 429 `rate_limited` with `Retry-After`; every limited answer carries the IETF
//! draft's `RateLimit-Policy` and `RateLimit` headers (draft-ietf-httpapi-ratelimit-headers).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use super::AppState;
use super::auth::{Tenant, authenticate};
use super::problem::ApiError;

/// The key record's field: requests per second for that key (a positive integer).
pub const RATE_LIMIT_FIELD: &str = "rate-limit";

const RATE_LIMIT: HeaderName = HeaderName::from_static("ratelimit");
const RATE_LIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

type Bucket = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

/// One bucket per API key, made on the key's first request; a changed limit in the key
/// record makes a new one.
pub struct RateLimits {
    default: NonZeroU32,
    clock: DefaultClock,
    buckets: Mutex<HashMap<String, (NonZeroU32, Arc<Bucket>)>>,
}

impl RateLimits {
    pub fn new(default: NonZeroU32) -> Self {
        Self {
            default,
            clock: DefaultClock::default(),
            buckets: Mutex::default(),
        }
    }

    /// Takes a token from `tenant`'s bucket: the limit and what is left, or the 429.
    fn take(&self, tenant: &Tenant) -> Result<(u32, u32), ApiError> {
        let limit = tenant.rate_limit.unwrap_or(self.default);
        let bucket = {
            let mut buckets = crate::sync::lock(&self.buckets);
            let fresh = || {
                (
                    limit,
                    Arc::new(RateLimiter::direct(Quota::per_second(limit)).with_middleware()),
                )
            };
            let entry = buckets.entry(tenant.key.clone()).or_insert_with(fresh);
            if entry.0 != limit {
                *entry = fresh();
            }
            entry.1.clone()
        };
        match bucket.check() {
            Ok(state) => Ok((limit.get(), state.remaining_burst_capacity())),
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now());
                Err(ApiError::RateLimited {
                    limit: limit.get(),
                    // Whole seconds, never 0: "retry now" would just be refused again.
                    retry_after: wait.as_secs_f64().ceil().max(1.0) as u64,
                })
            }
        }
    }
}

/// The headers of an answer under `limit` with `remaining` requests left, the bucket full
/// again within `reset` seconds.
pub(super) fn headers(headers: &mut HeaderMap, limit: u32, remaining: u32, reset: u64) {
    if let Ok(policy) = HeaderValue::from_str(&format!("\"per-key\";q={limit};w=1")) {
        headers.insert(RATE_LIMIT_POLICY, policy);
    }
    if let Ok(now) = HeaderValue::from_str(&format!("\"per-key\";r={remaining};t={reset}")) {
        headers.insert(RATE_LIMIT, now);
    }
}

/// The middleware of the customer routes. A request without a valid key passes through:
/// its handler answers 401 (or 503 while the keys load).
pub(super) async fn guard(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let Ok(tenant) = authenticate(&state.keys, request.headers()) else {
        return next.run(request).await;
    };
    match state.limits.take(&tenant) {
        Ok((limit, remaining)) => {
            let mut response = next.run(request).await;
            headers(response.headers_mut(), limit, remaining, 1);
            response
        }
        Err(refused) => refused.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(key: &str, rate_limit: Option<u32>) -> Tenant {
        Tenant {
            namespace: "tenant-a".into(),
            key: key.into(),
            rate_limit: rate_limit.and_then(NonZeroU32::new),
            in_flight_limit: None,
        }
    }

    #[test]
    fn each_key_has_its_own_bucket_of_its_own_size() {
        let limits = RateLimits::new(NonZeroU32::MIN.saturating_add(2));
        let small = tenant("a", Some(2));
        assert_eq!(limits.take(&small).ok(), Some((2, 1)));
        assert_eq!(limits.take(&small).ok(), Some((2, 0)));
        let refused = limits.take(&small).err();
        assert!(
            matches!(
                refused,
                Some(ApiError::RateLimited {
                    limit: 2,
                    retry_after: 1
                })
            ),
            "{refused:?}"
        );
        // Another key (the default, 3) is not held back by the first one's bucket.
        let other = tenant("b", None);
        for left in [2, 1, 0] {
            assert_eq!(limits.take(&other).ok(), Some((3, left)));
        }
        assert!(limits.take(&other).is_err());
        // A raised limit takes effect on the next request.
        assert_eq!(limits.take(&tenant("a", Some(5))).ok(), Some((5, 4)));
    }
}
