//! The controller's probes, served beside `/metrics`: `/healthz` says the process answers
//! (the kubelet restarts it otherwise); `/readyz` says it can reach what its work needs,
//! PostgreSQL and the API server, and turns 503 once it is stopping. A standby replica
//! (not the leader) is ready too: it only waits for the Lease, and a rollout must not hang
//! on it.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;

use crate::shutdown::Shutdown;
use crate::store::Store;

/// How long one dependency may take to answer a readiness check (the kubelet's own probe
/// timeout is 1 s by default; the chart gives the probe more).
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// What `/readyz` looks at.
#[derive(Clone)]
pub struct Readiness {
    checks: Arc<Vec<(&'static str, Check)>>,
    timeout: Duration,
    shutdown: Shutdown,
}

type Check = Box<
    dyn Fn() -> futures::future::BoxFuture<'static, Result<(), String>> + Send + Sync + 'static,
>;

impl Readiness {
    /// Ready while the database and the API server answer.
    pub fn new(client: kube::Client, store: Store, shutdown: Shutdown) -> Readiness {
        let database: Check = Box::new(move || {
            let store = store.clone();
            Box::pin(async move { store.ping().await.map_err(|e| e.to_string()) })
        });
        let apiserver: Check = Box::new(move || {
            let client = client.clone();
            Box::pin(async move {
                client
                    .apiserver_version()
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
        });
        Readiness::with_checks(
            vec![("database", database), ("apiserver", apiserver)],
            CHECK_TIMEOUT,
            shutdown,
        )
    }

    fn with_checks(
        checks: Vec<(&'static str, Check)>,
        timeout: Duration,
        shutdown: Shutdown,
    ) -> Readiness {
        Readiness {
            checks: Arc::new(checks),
            timeout,
            shutdown,
        }
    }

    /// 200 with one `name: ok` line per check, or 503 naming what failed.
    async fn report(&self) -> (StatusCode, String) {
        if self.shutdown.is_requested() {
            return (StatusCode::SERVICE_UNAVAILABLE, "stopping\n".to_owned());
        }
        let results = futures::future::join_all(self.checks.iter().map(|(name, check)| async {
            let outcome = match tokio::time::timeout(self.timeout, check()).await {
                Ok(outcome) => outcome,
                Err(_) => Err(format!("no answer within {:?}", self.timeout)),
            };
            (*name, outcome)
        }))
        .await;
        let ready = results.iter().all(|(_, outcome)| outcome.is_ok());
        let body: String = results
            .into_iter()
            .map(|(name, outcome)| match outcome {
                Ok(()) => format!("{name}: ok\n"),
                Err(e) => format!("{name}: {e}\n"),
            })
            .collect();
        if !ready {
            tracing::warn!(checks = %body.trim_end().replace('\n', "; "), "controller not ready");
        }
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        (status, body)
    }

    /// `GET /healthz` and `GET /readyz`.
    pub fn router(self) -> axum::Router {
        axum::Router::new()
            .route("/healthz", axum::routing::get(|| async { "ok\n" }))
            .route(
                "/readyz",
                axum::routing::get(move || {
                    let readiness = self.clone();
                    async move { readiness.report().await }
                }),
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(outcome: Result<(), &'static str>, delay: Duration) -> Check {
        Box::new(move || {
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                outcome.map_err(str::to_owned)
            })
        })
    }

    #[tokio::test]
    async fn ready_when_every_check_answers() {
        let readiness = Readiness::with_checks(
            vec![
                ("database", check(Ok(()), Duration::ZERO)),
                ("apiserver", check(Ok(()), Duration::ZERO)),
            ],
            CHECK_TIMEOUT,
            Shutdown::never(),
        );
        assert_eq!(
            readiness.report().await,
            (StatusCode::OK, "database: ok\napiserver: ok\n".to_owned())
        );
    }

    #[tokio::test]
    async fn not_ready_names_the_failing_check() {
        let readiness = Readiness::with_checks(
            vec![
                ("database", check(Err("connection refused"), Duration::ZERO)),
                ("apiserver", check(Ok(()), Duration::ZERO)),
            ],
            CHECK_TIMEOUT,
            Shutdown::never(),
        );
        let (status, body) = readiness.report().await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body, "database: connection refused\napiserver: ok\n");
    }

    #[tokio::test]
    async fn a_check_that_hangs_fails_after_the_timeout() {
        let readiness = Readiness::with_checks(
            vec![("apiserver", check(Ok(()), Duration::from_secs(60)))],
            Duration::from_millis(50),
            Shutdown::never(),
        );
        let (status, body) = readiness.report().await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body, "apiserver: no answer within 50ms\n");
    }

    #[tokio::test]
    async fn stopping_is_not_ready_and_healthz_still_answers() {
        let (trigger, shutdown) = Shutdown::new();
        let readiness = Readiness::with_checks(
            vec![("database", check(Ok(()), Duration::ZERO))],
            CHECK_TIMEOUT,
            shutdown,
        );
        trigger.fire();
        assert_eq!(
            readiness.report().await,
            (StatusCode::SERVICE_UNAVAILABLE, "stopping\n".to_owned())
        );

        crate::install_crypto_provider();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(axum::serve(listener, readiness.router()).into_future());
        let healthz = reqwest::get(format!("http://{addr}/healthz"))
            .await
            .expect("GET /healthz");
        assert_eq!(healthz.status(), StatusCode::OK);
        let readyz = reqwest::get(format!("http://{addr}/readyz"))
            .await
            .expect("GET /readyz");
        assert_eq!(readyz.status(), StatusCode::SERVICE_UNAVAILABLE);
        server.abort();
    }
}
