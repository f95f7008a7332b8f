//! Where `kinsight dev` runs its worker pods: a real node (containerd, runc, kubelet) beside
//! its control plane, with the project's image built from the `kinsight` binary beside
//! `kinsight-dev` by the same script and Dockerfile a release uses.

use std::path::Path;
use std::time::Instant;

use super::DevError;
use crate::controller::WorkerCatalog;
use crate::inference::Catalog;
use crate::testbed::container_started;

/// The image worker Jobs run under `kinsight dev` (rebuilt on every start; a rebuild
/// replaces the previous one in the project's buildah store).
pub const DEV_IMAGE: &str = "localhost/kinsight:dev";
const DEV_TAG: &str = "dev";

/// Builds [`DEV_IMAGE`] from `binary` with `scripts/build-image.sh` on the locally made
/// base, with ONNX Runtime's `ort_lib` (default: the script's, the project's wheel),
/// written to `archive` for the node's containerd. Blocking (a few seconds).
pub fn build_image(binary: &Path, ort_lib: Option<&Path>, archive: &Path) -> Result<(), DevError> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-image.sh");
    let started = Instant::now();
    let mut command = std::process::Command::new(&script);
    if let Some(lib) = ort_lib {
        command.arg("--ort-lib").arg(lib);
    }
    let output = command
        .arg("--binary")
        .arg(binary)
        .args(["--tag", DEV_TAG, "--base", "local", "--oci-archive"])
        .arg(archive)
        .output()
        .map_err(|e| DevError::Other(format!("running {}: {e}", script.display())))?;
    if !output.status.success() {
        return Err(DevError::Other(format!(
            "building the worker image failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        image = DEV_IMAGE,
        "worker image built"
    );
    Ok(())
}

/// Follows the log of every pod of `namespace` from the moment its container starts,
/// appending it to `{dir}/<pod>.log`: a pod deleted while `dev` runs (a standby replaced,
/// a Job's pod removed by hand) takes its log with it, and only this copy stays. Runs
/// until dropped; [`keep_pod_logs`] completes the copies of the pods still there.
pub async fn follow_pod_logs(client: kube::Client, namespace: String, dir: std::path::PathBuf) {
    use futures::TryStreamExt;
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::Api;
    use kube::runtime::{WatchStreamExt, watcher};
    let pods: Api<Pod> = Api::namespaced(client, &namespace);
    let mut followed = std::collections::HashSet::new();
    let mut streams = tokio::task::JoinSet::new();
    let events = watcher(pods.clone(), watcher::Config::default())
        .default_backoff()
        .applied_objects();
    let mut events = std::pin::pin!(events);
    loop {
        let pod = tokio::select! {
            pod = events.try_next() => pod,
            // Finished streams are reaped as they end.
            Some(_) = streams.join_next() => continue,
        };
        let pod = match pod {
            Ok(Some(pod)) => pod,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "watching the worker pods");
                continue;
            }
        };
        let (Some(name), Some(uid)) = (pod.metadata.name.clone(), pod.metadata.uid.clone()) else {
            continue;
        };
        if !container_started(&pod) || !followed.insert(uid) {
            continue;
        }
        let (pods, path) = (pods.clone(), dir.join(format!("{name}.log")));
        streams.spawn(async move {
            if let Err(e) = copy_log(&pods, &name, &path).await {
                tracing::debug!(pod = %name, error = %e, "following a worker pod's log");
            }
        });
    }
}

/// Appends pod `name`'s log, followed until its container ends, to `path`.
async fn copy_log(
    pods: &kube::Api<k8s_openapi::api::core::v1::Pod>,
    name: &str,
    path: &Path,
) -> Result<(), DevError> {
    use futures::AsyncBufReadExt;
    use futures::TryStreamExt;
    use tokio::io::AsyncWriteExt;
    let params = kube::api::LogParams {
        follow: true,
        timestamps: true,
        ..kube::api::LogParams::default()
    };
    let mut lines = pods.log_stream(name, &params).await?.lines();
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await
        .map_err(|e| DevError::Other(format!("opening {}: {e}", path.display())))?;
    while let Some(line) = lines
        .try_next()
        .await
        .map_err(|e| DevError::Other(format!("reading pod {name}'s log: {e}")))?
    {
        file.write_all(format!("{line}\n").as_bytes())
            .await
            .map_err(|e| DevError::Other(format!("writing {}: {e}", path.display())))?;
    }
    Ok(())
}

/// Writes what each pod of `namespace` logged, with the kubelet's timestamps, to
/// `{dir}/<pod>.log` (the node and its logs go when `dev` stops), beside the copies
/// [`follow_pod_logs`] made of pods gone since, and the namespace's events to
/// `{dir}/events.txt` (why a pod went, when it did); how many pods' logs are kept.
pub async fn keep_pod_logs(
    client: &kube::Client,
    namespace: &str,
    dir: &Path,
) -> Result<usize, DevError> {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, ListParams, LogParams};
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let listed = pods.list(&ListParams::default()).await?;
    std::fs::create_dir_all(dir)
        .map_err(|e| DevError::Other(format!("creating {}: {e}", dir.display())))?;
    let params = LogParams {
        timestamps: true,
        ..LogParams::default()
    };
    for pod in listed.items {
        // The kubelet knows a container it started before the pod's status says so (a
        // second or so on a fresh node): every pod is asked. One whose container never
        // started has no log, and nothing is kept of it.
        let started = container_started(&pod);
        let Some(name) = pod.metadata.name else {
            continue;
        };
        // Read whole, it replaces the followed copy (whose last lines may be in flight).
        let text = match pods.logs(&name, &params).await {
            Ok(text) => text,
            Err(e) => {
                if started {
                    println!("no log of worker pod {name} to keep: {e}");
                }
                continue;
            }
        };
        let path = dir.join(format!("{name}.log"));
        std::fs::write(&path, text)
            .map_err(|e| DevError::Other(format!("writing {}: {e}", path.display())))?;
    }
    let events = namespace_events(client, namespace).await?;
    let path = dir.join("events.txt");
    std::fs::write(&path, events)
        .map_err(|e| DevError::Other(format!("writing {}: {e}", path.display())))?;
    let kept = std::fs::read_dir(dir)
        .map_err(|e| DevError::Other(format!("reading {}: {e}", dir.display())))?
        .flatten()
        .filter(|entry| entry.path().extension().is_some_and(|e| e == "log"))
        .count();
    Ok(kept)
}

/// `namespace`'s events, oldest first, one a line: when, type, reason, object, reporter,
/// message.
async fn namespace_events(client: &kube::Client, namespace: &str) -> Result<String, DevError> {
    use k8s_openapi::api::core::v1::Event;
    use kube::api::{Api, ListParams};
    let listed = Api::<Event>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await?;
    let mut lines: Vec<(Option<jiff::Timestamp>, String)> = listed
        .items
        .into_iter()
        .map(|event| {
            let when = event
                .last_timestamp
                .map(|t| t.0)
                .or_else(|| event.event_time.map(|t| t.0));
            let shown = when.map(|t| t.to_string()).unwrap_or_default();
            let object = format!(
                "{}/{}",
                event.involved_object.kind.unwrap_or_default(),
                event.involved_object.name.unwrap_or_default()
            );
            // Who reported it: the kubelet, the Job controller, ...
            let by = event
                .source
                .and_then(|s| s.component)
                .or(event.reporting_component)
                .unwrap_or_default();
            let line = format!(
                "{shown} {} {} {object} (by {by}): {}",
                event.type_.unwrap_or_default(),
                event.reason.unwrap_or_default(),
                event.message.unwrap_or_default()
            );
            (when, line)
        })
        .collect();
    lines.sort();
    Ok(lines.into_iter().map(|(_, line)| line + "\n").collect())
}

/// The catalog as workers on the dev node see it: the catalog's folder on this machine,
/// mounted read-only at the same path (a `hostPath` volume, as a node-local model cache
/// would be), so a model file changed in the checkout is what the next Job loads. Model
/// files outside that folder (symbolic links out of it included) cannot be reached and are
/// refused here, not by the worker.
pub fn worker_catalog(catalog: &Catalog, catalog_path: &Path) -> Result<WorkerCatalog, DevError> {
    let folder = Catalog::default_models_dir(catalog_path);
    let folder = std::fs::canonicalize(folder)
        .map_err(|e| DevError::Other(format!("{}: {e}", folder.display())))?;
    let outside: Vec<String> = catalog
        .models()
        .iter()
        .filter(|model| {
            !std::fs::canonicalize(&model.model_path).is_ok_and(|file| file.starts_with(&folder))
        })
        .map(|model| format!("{} ({})", model.name, model.model_path.display()))
        .collect();
    if !outside.is_empty() {
        return Err(DevError::Other(format!(
            "worker pods mount the catalog's folder {}, and these models' files are outside it: {}; \
             put them beside the catalog",
            folder.display(),
            outside.join(", ")
        )));
    }
    let dir = folder.display().to_string();
    // The volume as `--worker-models-volume` would give it (named and checked the same way).
    let volume = serde_json::json!({ "hostPath": { "path": dir, "type": "Directory" } });
    Ok(WorkerCatalog {
        models_volume: Some(
            WorkerCatalog::parse_models_volume(&volume.to_string()).map_err(DevError::Other)?,
        ),
        ..WorkerCatalog::new(catalog, dir)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(path: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
    }

    #[test]
    fn the_bundled_catalogs_folder_is_mounted_where_it_is_on_this_machine() {
        let path = repo("models/catalog.yaml");
        let catalog = Catalog::load(&path).expect("bundled catalog");
        let worker = worker_catalog(&catalog, &path).expect("its files are beside it");
        let models = repo("models").display().to_string();
        assert_eq!(worker.models_dir, models);
        let volume = worker.models_volume.expect("a models volume");
        let host = volume.host_path.expect("hostPath");
        assert_eq!(host.path, models);
        assert_eq!(host.type_.as_deref(), Some("Directory"));
    }

    #[test]
    fn a_catalog_whose_models_are_elsewhere_is_refused_with_their_names() {
        let scratch = tempfile::tempdir().expect("temp dir");
        let test_models = repo("models/test");
        let path = scratch.path().join("catalog.yaml");
        let entry = std::fs::read_to_string(test_models.join("catalog.yaml"))
            .expect("test catalog")
            .replace("file: ", &format!("file: {}/", test_models.display()))
            .replace("labels: ", &format!("labels: {}/", test_models.display()));
        std::fs::write(&path, entry).expect("catalog written");
        let catalog = Catalog::load(&path).expect("a catalog naming files elsewhere");
        let error = worker_catalog(&catalog, &path).expect_err("outside its folder");
        let text = error.to_string();
        assert!(text.contains("quality_grade"), "{text}");
        assert!(text.contains("put them beside the catalog"), "{text}");
    }
}
