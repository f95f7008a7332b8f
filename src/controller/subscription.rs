//! Reconciling a WebhookSubscription: it is `Ready` when its spec is valid and its
//! signing secret exists in `whsec_` form.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::{Context, ControllerError, MANAGER};
use crate::crd::{ConditionStatus, WebhookSubscription, set_condition};

pub async fn reconcile(
    sub: Arc<WebhookSubscription>,
    ctx: Arc<Context>,
) -> Result<Action, ControllerError> {
    let namespace = sub
        .namespace()
        .ok_or(ControllerError::MissingField("metadata.namespace"))?;
    let generation = sub.metadata.generation;
    let readiness = match sub.spec.validate() {
        Err(message) => Err(("InvalidSpec", message)),
        Ok(()) => check_secret(&ctx, &namespace, &sub).await?,
    };
    let original = sub.status.clone().unwrap_or_default();
    let mut status = original.clone();
    status.observed_generation = generation;
    let now = jiff::Timestamp::now();
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
    // A missing secret may be created later; look again now and then.
    Ok(if ready {
        Action::await_change()
    } else {
        Action::requeue(Duration::from_secs(30))
    })
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
    let Some(secret) = secret else {
        return Ok(Err((
            "SecretNotFound",
            format!("Secret {} not found", reference.name),
        )));
    };
    let value = secret.data.as_ref().and_then(|d| d.get(&reference.key));
    let Some(value) = value else {
        return Ok(Err((
            "SecretKeyMissing",
            format!("Secret {} has no key {}", reference.name, reference.key),
        )));
    };
    let text = String::from_utf8_lossy(&value.0);
    if text.split_whitespace().next().is_none()
        || !text.split_whitespace().all(|k| k.starts_with("whsec_"))
    {
        return Ok(Err((
            "InvalidSecret",
            "signing secrets must be whsec_<base64> values".to_owned(),
        )));
    }
    Ok(Ok(()))
}

pub fn error_policy(
    _sub: Arc<WebhookSubscription>,
    error: &ControllerError,
    ctx: Arc<Context>,
) -> Action {
    super::retry_after_error(error, &ctx)
}
