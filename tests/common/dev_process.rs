//! `kinsight dev` as its own process, the way a user runs it: on a free loopback port, with
//! a state folder of its own, ready once `/readyz` answers, stopped with SIGTERM. It is
//! never SIGKILLed, not even when the test or benchmark holding it fails: a killed dev would
//! leave its node's kubelet, containerd, mounts and host changes behind.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

pub struct DevProcess {
    child: tokio::process::Child,
    /// The API, e.g. `http://127.0.0.1:41234`.
    pub api_url: String,
    /// Its `--state-dir`: the kubeconfig, the control plane's files, and after a stop the
    /// worker pods' logs (`pod-logs/`).
    pub state_dir: PathBuf,
    /// Its stdout and stderr.
    pub log: PathBuf,
}

impl DevProcess {
    /// Starts `binary dev` with its state in `folder/dev`, its output in
    /// `folder/kinsight-dev.log` and `api_key` as the dev tenant's key; `configure` adds
    /// arguments and environment. Returns once the API is ready, else the log.
    pub async fn start(
        binary: &Path,
        folder: &Path,
        api_key: &str,
        ready_within: Duration,
        configure: impl FnOnce(&mut tokio::process::Command),
    ) -> Result<DevProcess, String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("a free port: {e}"))?
            .port();
        let log = folder.join("kinsight-dev.log");
        let file = std::fs::File::create(&log).map_err(|e| format!("log file: {e}"))?;
        let output = file.try_clone().map_err(|e| format!("log file: {e}"))?;
        let state_dir = folder.join("dev");
        let mut command = tokio::process::Command::new(binary);
        command
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .arg("dev")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--state-dir")
            .arg(&state_dir)
            .env("KINSIGHT_DEV_API_KEY", api_key)
            .stdin(Stdio::null())
            .stdout(output)
            .stderr(file);
        configure(&mut command);
        let child = command
            .spawn()
            .map_err(|e| format!("starting {}: {e}", binary.display()))?;
        let dev = DevProcess {
            child,
            api_url: format!("http://127.0.0.1:{port}"),
            state_dir,
            log,
        };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + ready_within;
        while Instant::now() < deadline {
            let ready = http.get(format!("{}/readyz", dev.api_url)).send().await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return Ok(dev);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(format!(
            "kinsight dev not ready in {ready_within:?}; its log:\n{}",
            dev.log_text()
        ))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops it as a user does (SIGTERM; it stops its node and control plane); whether it
    /// exited 0 within 60 s.
    pub async fn stop(mut self) -> bool {
        self.terminate();
        let exited = tokio::time::timeout(STOP_WAIT, self.child.wait()).await;
        exited.is_ok_and(|status| status.is_ok_and(|s| s.success()))
    }

    fn terminate(&self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
}

const STOP_WAIT: Duration = Duration::from_secs(60);

impl Drop for DevProcess {
    /// A failing holder unwinds through here: the process still gets its clean stop.
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        self.terminate();
        let deadline = Instant::now() + STOP_WAIT;
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
