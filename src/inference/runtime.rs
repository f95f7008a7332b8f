//! Loading the ONNX Runtime shared library (ort's `load-dynamic` mode).
//!
//! The library is not linked at build time: it is loaded once per process from a path,
//! which lets the operator image ship the exact onnxruntime build it wants. ONNX Runtime
//! allows a single environment per process, so it is created here once and kept for the
//! life of the process; sessions borrow it.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use ort::environment::Environment;

use super::InferenceError;

/// Environment variable naming the ONNX Runtime library (the one ort itself uses).
pub const DYLIB_ENV: &str = "ORT_DYLIB_PATH";

struct Runtime {
    environment: Environment,
    path: PathBuf,
}

/// Guarded by a mutex rather than a `OnceLock` so that a failed initialisation (wrong
/// path) can be retried with another path.
static RUNTIME: Mutex<Option<Runtime>> = Mutex::new(None);

/// Where to find the ONNX Runtime library when no path is configured:
/// `$ORT_DYLIB_PATH` when set, otherwise the `onnxruntime` Python wheel of a virtual
/// environment in the current directory
/// (`./.venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so*`).
/// The returned path is absolute; `None` when nothing was found.
pub fn default_runtime_path() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(DYLIB_ENV).filter(|p| !p.is_empty()) {
        return std::path::absolute(PathBuf::from(path)).ok();
    }
    let cwd = std::env::current_dir().ok()?;
    find_in_venv(&cwd.join(".venv"))
}

/// Looks for the library in a Python virtual environment folder.
fn find_in_venv(venv: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(venv.join("lib"))
        .ok()?
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("python3"))
        .filter_map(|entry| {
            std::fs::read_dir(entry.path().join("site-packages/onnxruntime/capi")).ok()
        })
        .flat_map(|dir| dir.flatten())
        .map(|entry| entry.path())
        .filter(|path| {
            path.is_file()
                && path
                    .file_name()
                    .is_some_and(|name| name.to_string_lossy().starts_with("libonnxruntime.so"))
        })
        .collect();
    // Deterministic choice if several Python versions are present.
    found.sort();
    found.pop()
}

/// Loads the ONNX Runtime library and creates the process-wide environment.
///
/// `dylib`: the library file; `None` uses [`default_runtime_path`]. Calling it again after
/// a success does nothing (the library cannot be swapped within a process; a different
/// path is logged and ignored).
pub fn init_runtime(dylib: Option<&Path>) -> Result<(), InferenceError> {
    let mut runtime = RUNTIME.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(existing) = runtime.as_ref() {
        if let Some(requested) = dylib
            && std::path::absolute(requested).ok().as_deref() != Some(existing.path.as_path())
        {
            tracing::warn!(
                loaded = %existing.path.display(),
                requested = %requested.display(),
                "ONNX Runtime is already loaded; ignoring the other library"
            );
        }
        return Ok(());
    }

    let path = match dylib {
        Some(path) => std::path::absolute(path)
            .map_err(|e| InferenceError::Runtime(format!("invalid path {}: {e}", path.display())))?,
        None => default_runtime_path().ok_or_else(|| {
            InferenceError::Runtime(format!(
                "no ONNX Runtime library found: set {DYLIB_ENV} to libonnxruntime.so, or install \
                 the onnxruntime wheel into ./.venv (python3 -m venv .venv && .venv/bin/pip install onnxruntime)"
            ))
        })?,
    };
    if !path.is_file() {
        return Err(InferenceError::Runtime(format!(
            "ONNX Runtime library {} does not exist",
            path.display()
        )));
    }

    let environment = ort::init_from(&path)
        .map_err(|e| InferenceError::Runtime(e.to_string()))?
        .with_name("kinsight")
        .with_telemetry(false)
        .build()
        .map_err(|e| InferenceError::Runtime(format!("cannot create the environment: {e}")))?;
    tracing::info!(library = %path.display(), "ONNX Runtime loaded");
    *runtime = Some(Runtime { environment, path });
    Ok(())
}

/// The ONNX Runtime library loaded by this process, if any.
pub(crate) fn library_path() -> Option<PathBuf> {
    RUNTIME
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
        .map(|runtime| runtime.path.clone())
}

/// The process-wide environment, loading the runtime from [`default_runtime_path`] first
/// if [`init_runtime`] was not called.
pub(crate) fn environment() -> Result<Environment, InferenceError> {
    if let Some(runtime) = RUNTIME
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
    {
        return Ok(runtime.environment.clone());
    }
    init_runtime(None)?;
    RUNTIME
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
        .map(|runtime| runtime.environment.clone())
        .ok_or_else(|| InferenceError::Internal("runtime vanished after initialisation".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_library_in_a_venv_layout() {
        let dir = tempfile::tempdir().unwrap();
        let capi = dir
            .path()
            .join(".venv/lib/python3.11/site-packages/onnxruntime/capi");
        std::fs::create_dir_all(&capi).unwrap();
        assert_eq!(find_in_venv(&dir.path().join(".venv")), None);
        std::fs::write(capi.join("libonnxruntime_providers_shared.so"), b"").unwrap();
        assert_eq!(find_in_venv(&dir.path().join(".venv")), None);
        std::fs::write(capi.join("libonnxruntime.so.1.32.0"), b"").unwrap();
        assert_eq!(
            find_in_venv(&dir.path().join(".venv")),
            Some(capi.join("libonnxruntime.so.1.32.0"))
        );
        assert_eq!(find_in_venv(&dir.path().join("missing")), None);
    }
}
