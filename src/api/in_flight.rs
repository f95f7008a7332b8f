//! Bounded images in flight per tenant: images posted (`POST /v1/images`,
//! `POST /v1/image-groups`, images added by `PATCH`) and not yet finished (a result stored,
//! a failure included) count against the tenant's cap: its key record's
//! `max-in-flight-images` or the API's `--max-in-flight-images`. A request that would pass
//! it is answered 429 `in_flight_limited` with `Retry-After`, one that alone has more images
//! than the cap 422 `over_in_flight_cap`; both name the limit, the count and the cap.
//! The count lives in the store (see `crate::store::Admission`), so replicas share it.

use std::num::NonZeroU32;

use super::AppState;
use super::auth::Tenant;
use super::problem::ApiError;
use crate::store::Admission;

/// The key record's field: images in flight at most for that tenant (a positive integer).
pub const IN_FLIGHT_LIMIT_FIELD: &str = "max-in-flight-images";

/// Images in flight per tenant unless its record or `--max-in-flight-images` says otherwise:
/// one largest group at a time, or a long queue of small ones.
pub const DEFAULT_IN_FLIGHT_LIMIT: NonZeroU32 = NonZeroU32::new(10_000).unwrap();

/// Refuses a request that alone has more images than the tenant's cap (before anything
/// else about it is looked at: no retry can make it fit). Returns the cap.
pub(super) fn fits(state: &AppState, tenant: &Tenant, images: usize) -> Result<u32, ApiError> {
    let limit = tenant
        .in_flight_limit
        .unwrap_or(state.config.in_flight_limit)
        .get();
    let requested = u32::try_from(images).unwrap_or(u32::MAX);
    if requested > limit {
        return Err(ApiError::OverInFlightCap { requested, limit });
    }
    Ok(limit)
}

/// Counts `images` in flight for the tenant's group `name` (`uid` once it exists), or the
/// problem telling the client which limit it met.
pub(super) async fn admit(
    state: &AppState,
    tenant: &Tenant,
    name: &str,
    uid: Option<&str>,
    images: usize,
) -> Result<(), ApiError> {
    let limit = fits(state, tenant, images)?;
    let requested = u32::try_from(images).unwrap_or(u32::MAX);
    match state
        .store
        .admit_images(&tenant.namespace, name, uid, requested, limit)
        .await?
    {
        Admission::Admitted(_) => Ok(()),
        Admission::Full(in_flight) => Err(ApiError::InFlightLimited {
            in_flight,
            requested,
            limit,
        }),
    }
}

/// Takes back what [`admit`] counted when the request failed after all. A failure here is
/// logged: the count is then high until the group's row is swept (see the store's retention).
pub(super) async fn withdraw(state: &AppState, tenant: &Tenant, name: &str, images: usize) {
    let images = u32::try_from(images).unwrap_or(u32::MAX);
    if let Err(e) = state
        .store
        .withdraw_images(&tenant.namespace, name, images)
        .await
    {
        tracing::warn!(error = %e, group = name, "taking back images in flight");
    }
}
