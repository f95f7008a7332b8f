//! The worker Job of a group: one per generation of the group's spec, with a deterministic
//! name so a controller restart finds the Job it created instead of making a second one.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Container, EnvVar, PodSpec, PodTemplateSpec, ResourceRequirements, ServiceAccount,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};

use super::ControllerConfig;
use crate::crd::{GROUP, GROUP_LABEL, ImageGroup};
use crate::results::label_value;
use crate::worker::{WORK_ORDER_ENV, WorkOrder};

const EGRESS_ENV: &str = "KINSIGHT_ALLOW_EGRESS";

/// Job names end up in the pods' `job-name` label: at most 63 characters.
pub fn job_name(group: &str, generation: i64) -> String {
    let suffix = format!("-g{generation}");
    if group.len() + suffix.len() <= 63 {
        return format!("{group}{suffix}");
    }
    let digest = hex::encode(Sha256::digest(group.as_bytes()));
    let keep = 63 - suffix.len() - 9;
    format!(
        "{}-{}{suffix}",
        group[..keep].trim_end_matches(['-', '.']),
        &digest[..8]
    )
}

pub fn labels(group: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "kinsight".to_owned()),
        (
            "app.kubernetes.io/component".to_owned(),
            "worker".to_owned(),
        ),
        ("app.kubernetes.io/instance".to_owned(), label_value(group)),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "kinsight-controller".to_owned(),
        ),
        (GROUP_LABEL.to_owned(), label_value(group)),
    ])
}

pub fn build_job(
    group: &ImageGroup,
    name: &str,
    order: &WorkOrder,
    config: &ControllerConfig,
) -> Result<Job, serde_json::Error> {
    let group_name = group.name_any();
    let mut env = vec![EnvVar {
        name: WORK_ORDER_ENV.to_owned(),
        value: Some(serde_json::to_string(order)?),
        value_from: None,
    }];
    // Workers download images under the same egress rules the controller sends webhooks with.
    if !config.egress.allow.is_empty() && !config.worker_env.iter().any(|(k, _)| k == EGRESS_ENV) {
        env.push(EnvVar {
            name: EGRESS_ENV.to_owned(),
            value: Some(config.egress.to_string()),
            value_from: None,
        });
    }
    env.extend(config.worker_env.iter().map(|(k, v)| EnvVar {
        name: k.clone(),
        value: Some(v.clone()),
        value_from: None,
    }));
    let resources = ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_owned(), Quantity(config.worker_cpu.clone())),
            ("memory".to_owned(), Quantity(config.worker_memory.clone())),
        ])),
        limits: Some(BTreeMap::from([
            ("cpu".to_owned(), Quantity(config.worker_cpu.clone())),
            ("memory".to_owned(), Quantity(config.worker_memory.clone())),
        ])),
        ..ResourceRequirements::default()
    };
    Ok(Job {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: group.namespace(),
            labels: Some(labels(&group_name)),
            owner_references: group.controller_owner_ref(&()).map(|r| vec![r]),
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(config.worker_backoff_limit),
            ttl_seconds_after_finished: Some(3600),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(&group_name)),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".to_owned()),
                    service_account_name: Some(WORKER_ACCOUNT.to_owned()),
                    containers: vec![Container {
                        name: "worker".to_owned(),
                        image: Some(config.worker_image.clone()),
                        command: Some(vec!["kinsight".to_owned(), "worker".to_owned()]),
                        env: Some(env),
                        resources: Some(resources),
                        ..Container::default()
                    }],
                    ..PodSpec::default()
                }),
            },
            ..JobSpec::default()
        }),
        status: None,
    })
}

/// The worker's identity in a tenant namespace; it may only write ImageResults.
pub const WORKER_ACCOUNT: &str = "kinsight-worker";

pub fn worker_rbac(namespace: &str) -> (ServiceAccount, Role, RoleBinding) {
    let meta = || ObjectMeta {
        name: Some(WORKER_ACCOUNT.to_owned()),
        namespace: Some(namespace.to_owned()),
        labels: Some(BTreeMap::from([(
            "app.kubernetes.io/managed-by".to_owned(),
            "kinsight-controller".to_owned(),
        )])),
        ..ObjectMeta::default()
    };
    let account = ServiceAccount {
        metadata: meta(),
        ..ServiceAccount::default()
    };
    let role = Role {
        metadata: meta(),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![GROUP.to_owned()]),
            resources: Some(vec!["imageresults".to_owned()]),
            verbs: vec!["create".to_owned(), "get".to_owned(), "patch".to_owned()],
            ..PolicyRule::default()
        }]),
    };
    let binding = RoleBinding {
        metadata: meta(),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: "Role".to_owned(),
            name: WORKER_ACCOUNT.to_owned(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".to_owned(),
            name: WORKER_ACCOUNT.to_owned(),
            namespace: Some(namespace.to_owned()),
            ..Subject::default()
        }]),
    };
    (account, role, binding)
}

/// Whether the Job has finished, and how.
pub fn finished(job: &Job) -> Option<bool> {
    let conditions = job.status.as_ref()?.conditions.as_ref()?;
    conditions
        .iter()
        .find_map(|c| match (c.type_.as_str(), c.status.as_str()) {
            ("Complete", "True") => Some(true),
            ("Failed", "True") => Some(false),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_names_are_deterministic_and_fit_labels() {
        assert_eq!(job_name("grp-abc", 3), "grp-abc-g3");
        let long = "x".repeat(80);
        let name = job_name(&long, 12);
        assert!(name.len() <= 63, "{name}");
        assert!(name.ends_with("-g12"));
        assert_eq!(name, job_name(&long, 12));
        assert_ne!(job_name(&"y".repeat(80), 12), name);
    }
}
