//! Reconciling a WebhookSubscription: it is `Ready` when its spec is valid and its
//! signing secret exists in `whsec_` form, marked for kinsight (and the endpoint is not
//! disabled), and `Healthy`
//! while its endpoint accepts deliveries. This reconciler is the only writer of the
//! subscription's status: the health the deliveries record in the endpoint's circuit is
//! copied here every `health_sync`.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::{Context, ControllerError, MANAGER};
use crate::crd::{
    CircuitState, ConditionStatus, EndpointHealth, WebhookSubscription, WebhookSubscriptionStatus,
    set_condition,
};
use crate::tenancy::{not_a_tenant, secret_headers, signing_keys};

pub async fn reconcile(
    sub: Arc<WebhookSubscription>,
    ctx: Arc<Context>,
) -> Result<Action, ControllerError> {
    let namespace = sub
        .namespace()
        .ok_or(ControllerError::MissingField("metadata.namespace"))?;
    let generation = sub.metadata.generation;
    // The periodic health copy need not read the Secret again once this spec was found
    // usable; a new spec, or one not usable yet, is checked.
    let usable = sub.status.as_ref().is_some_and(|s| {
        s.observed_generation == generation
            && s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
    });
    let readiness = match sub.spec.validate() {
        Err(message) => Err(("InvalidSpec", message)),
        Ok(()) if !ctx.tenants.contains(&namespace) => {
            Err(("NotATenant", not_a_tenant(&ctx.config.tenancy, &namespace)))
        }
        Ok(()) if usable => Ok(()),
        Ok(()) => check_secret(&ctx, &namespace, &sub).await?,
    };
    let original = sub.status.clone().unwrap_or_default();
    let mut status = original.clone();
    // The circuit the deliveries use; a new spec generation starts a fresh one, which is
    // how an operator enables a disabled endpoint again.
    let key = super::events::subscription_circuit(&sub);
    let recorded = original.observed_generation.zip(original.health.as_ref());
    let health = ctx
        .circuits
        .endpoint(&key, generation.unwrap_or(0), recorded)
        .health();
    status.observed_generation = generation;
    let now = jiff::Timestamp::now();
    let disabled = health.circuit == CircuitState::Disabled;
    let readiness = match readiness {
        Ok(()) if disabled => Err((
            "Disabled",
            health
                .disabled_reason
                .clone()
                .unwrap_or_else(|| "the endpoint was disabled".to_owned()),
        )),
        other => other,
    };
    set_health_condition(&mut status, &health, generation, now);
    status.health = Some(health);
    let ready = readiness.is_ok();
    match readiness {
        Ok(()) => set_condition(
            &mut status.conditions,
            "Ready",
            ConditionStatus::True,
            "Valid",
            "subscription is active",
            generation,
            now,
        ),
        Err((reason, message)) => set_condition(
            &mut status.conditions,
            "Ready",
            ConditionStatus::False,
            reason,
            message,
            generation,
            now,
        ),
    };
    if status != original {
        let api: Api<WebhookSubscription> = Api::namespaced(ctx.client.clone(), &namespace);
        let patch = json!({
            "apiVersion": WebhookSubscription::api_version(&()),
            "kind": WebhookSubscription::kind(&()),
            "status": status,
        });
        api.patch_status(
            &sub.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    }
    // The endpoint's health moves with every delivery; a missing secret may be created
    // later. Look again now and then.
    Ok(if ready {
        Action::requeue(ctx.config.health_sync)
    } else {
        Action::requeue(ctx.config.health_sync.max(Duration::from_secs(30)))
    })
}

fn set_health_condition(
    status: &mut WebhookSubscriptionStatus,
    health: &EndpointHealth,
    generation: Option<i64>,
    now: jiff::Timestamp,
) {
    let failures = health.consecutive_failures;
    let since = health
        .failing_since
        .map(|t| t.to_string())
        .unwrap_or_default();
    let last_error = health
        .last_delivery
        .as_ref()
        .and_then(|d| d.error.clone())
        .unwrap_or_default();
    let (state, reason, message) = match health.circuit {
        CircuitState::Disabled => (
            ConditionStatus::False,
            "Disabled",
            health
                .disabled_reason
                .clone()
                .unwrap_or_else(|| "the endpoint was disabled".to_owned()),
        ),
        CircuitState::Open | CircuitState::HalfOpen => (
            ConditionStatus::False,
            "CircuitOpen",
            format!(
                "{failures} consecutive failures since {since} (last: {last_error}); deliveries \
                 paused, next probe at {}",
                health
                    .next_probe_at
                    .map_or_else(|| "once the cool-down ends".to_owned(), |t| t.to_string())
            ),
        ),
        CircuitState::Closed if failures > 0 => (
            ConditionStatus::False,
            "Failing",
            format!("{failures} consecutive failures since {since} (last: {last_error})"),
        ),
        CircuitState::Closed if health.last_delivery.is_none() => (
            ConditionStatus::Unknown,
            "NoDeliveries",
            "nothing was sent to the endpoint yet".to_owned(),
        ),
        CircuitState::Closed => (
            ConditionStatus::True,
            "Delivering",
            "the endpoint accepts deliveries".to_owned(),
        ),
    };
    set_condition(
        &mut status.conditions,
        "Healthy",
        state,
        reason,
        message,
        generation,
        now,
    );
}

async fn check_secret(
    ctx: &Context,
    namespace: &str,
    sub: &WebhookSubscription,
) -> Result<Result<(), (&'static str, String)>, ControllerError> {
    let reference = &sub.spec.secret_ref;
    let secret = Api::<Secret>::namespaced(ctx.client.clone(), namespace)
        .get_opt(&reference.name)
        .await?;
    if let Err(e) = signing_keys(&reference.name, secret.as_ref(), &reference.key) {
        return Ok(Err((e.reason(), e.to_string())));
    }
    let Some(headers) = &sub.spec.headers_from else {
        return Ok(Ok(()));
    };
    let secret = Api::<Secret>::namespaced(ctx.client.clone(), namespace)
        .get_opt(&headers.name)
        .await?;
    Ok(secret_headers(&headers.name, secret.as_ref())
        .map(drop)
        .map_err(|e| (e.reason(), format!("headersFrom: {e}"))))
}

pub fn error_policy(
    _sub: Arc<WebhookSubscription>,
    error: &ControllerError,
    ctx: Arc<Context>,
) -> Action {
    super::retry_after_error(error, &ctx)
}
