//! The state plane's database: PostgreSQL holds the high-volume records (per-image results,
//! webhook deliveries and their attempts) so that Kubernetes objects keep only intent and bounded summaries. This module is
//! the only code that speaks SQL. Migrations are embedded and applied at start.

mod admissions;
mod connection;
mod deliveries;
mod dispatch;
mod idempotency;
mod migrations;
mod notify;
mod results;
mod work_orders;

pub use admissions::Admission;
pub use deliveries::{Cursor, DeliveryCount, Plan, Saved};
pub use dispatch::{Claimed, Claims, GONE_ERROR, Outcomes, Settled, Stop};
pub use idempotency::{IDEMPOTENCY_KEEP, KeyClaim, StoredResponse};
pub use notify::{
    ALL_STORED, CARRIERS_CHANNEL, DISPATCH_CHANNEL, GROUPS_CHANNEL, RESULTS_CHANNEL, StoreNotice,
    carrier_key, listen,
};

use std::time::Duration;

use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

/// Connections per process: API handlers, reconciles and the ingest share them.
const POOL_SIZE: usize = 16;
/// How long a caller waits for a free connection before the store counts as unavailable.
const POOL_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database URL: {0}")]
    Config(String),
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("database: {}", describe(.0))]
    Query(#[from] tokio_postgres::Error),
    #[error("stored record unreadable: {0}")]
    Corrupt(String),
    /// Someone else changed what a write was based on: read again and retry.
    #[error("changed meanwhile: {0}")]
    Conflict(String),
}

/// The server's own message (`FATAL: no pg_hba.conf entry ...`), or the error with its
/// causes (`error performing TLS handshake: invalid peer certificate: UnknownIssuer`):
/// tokio-postgres alone says only "db error".
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {}", db.severity(), db.message());
    }
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

impl StoreError {
    /// Stable category for logs and metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Config(_) => "store_configuration",
            Self::Unavailable(_) => "store_unavailable",
            Self::Query(e) if e.is_closed() || e.as_db_error().is_none() => "store_unavailable",
            Self::Query(_) => "store_query",
            Self::Corrupt(_) => "store_corrupt",
            Self::Conflict(_) => "store_conflict",
        }
    }

    /// Whether trying again later may succeed (the database is restarting or unreachable).
    pub fn is_transient(&self) -> bool {
        self.category() == "store_unavailable"
    }
}

/// Makes sure the group has its row (what retention deletes by), inside `tx`.
async fn record_group(
    tx: &deadpool_postgres::Transaction<'_>,
    group: &crate::results::GroupRef,
) -> Result<(), StoreError> {
    tx.execute_cached(
        "INSERT INTO groups (uid, namespace, name) VALUES ($1, $2, $3)
         ON CONFLICT (uid) DO NOTHING",
        &[&group.uid, &group.namespace, &group.name],
    )
    .await?;
    Ok(())
}

/// kinsight's statements, run through each connection's cache of prepared statements
/// (deadpool's `prepare_cached`): the server parses and plans a statement once per
/// connection, not at every call, and a call is one round trip instead of two. The texts are
/// `'static` (literals and `concat!`, never a `format!` with values spliced in), so the cache
/// stays as small as this module's SQL.
pub(crate) trait Prepared: GenericClient + Sized {
    fn execute_cached<'a>(
        &'a self,
        sql: &'static str,
        params: &'a [&'a (dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<u64, tokio_postgres::Error>> + Send + 'a {
        async move { self.execute(&self.prepare_cached(sql).await?, params).await }
    }

    fn query_cached<'a>(
        &'a self,
        sql: &'static str,
        params: &'a [&'a (dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Vec<Row>, tokio_postgres::Error>> + Send + 'a {
        async move { self.query(&self.prepare_cached(sql).await?, params).await }
    }

    fn query_one_cached<'a>(
        &'a self,
        sql: &'static str,
        params: &'a [&'a (dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Row, tokio_postgres::Error>> + Send + 'a {
        async move {
            self.query_one(&self.prepare_cached(sql).await?, params)
                .await
        }
    }

    fn query_opt_cached<'a>(
        &'a self,
        sql: &'static str,
        params: &'a [&'a (dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Option<Row>, tokio_postgres::Error>> + Send + 'a {
        async move {
            self.query_opt(&self.prepare_cached(sql).await?, params)
                .await
        }
    }
}

impl<C: GenericClient> Prepared for C {}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => StoreError::Query(e),
            other => StoreError::Unavailable(other.to_string()),
        }
    }
}

/// A pool of connections to the kinsight database.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    url: String,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password.
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Connects to `url` (`postgres://user:password@host:port/db`) and applies every
    /// migration not applied yet. Waits up to `wait` for a database that is still starting.
    pub async fn connect(url: &str, wait: Duration) -> Result<Store, StoreError> {
        let store = Store::lazy(url)?;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match store.migrate().await {
                Ok(()) => return Ok(store),
                Err(e) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "database not reachable yet");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A store whose connections are made when first used; nothing is checked or migrated.
    pub fn lazy(url: &str) -> Result<Store, StoreError> {
        let connection::Connection { config, tls } = connection::parse(url)?;
        let manager = Manager::from_config(
            config,
            tls,
            ManagerConfig {
                // A connection that broke (a database restart) is found out before use.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(POOL_WAIT))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Config(e.to_string()))?;
        Ok(Store {
            pool,
            url: url.to_owned(),
        })
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.pool.get().await?;
        migrations::apply(&mut client).await
    }

    /// The URL this store connects to (for a LISTEN connection of its own).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Runs statements as they are: for diagnostics (benchmarks reading
    /// `pg_stat_statements`), never for kinsight's own records.
    pub async fn execute_batch(&self, sql: &str) -> Result<(), StoreError> {
        Ok(self.client().await?.batch_execute(sql).await?)
    }

    /// The rows of a diagnostic query whose columns are all text.
    pub async fn query_text(&self, sql: &str) -> Result<Vec<Vec<String>>, StoreError> {
        let rows = self.client().await?.query(sql, &[]).await?;
        rows.iter()
            .map(|row| {
                (0..row.len())
                    .map(|i| {
                        row.try_get::<_, Option<String>>(i)
                            .map(Option::unwrap_or_default)
                    })
                    .collect::<Result<Vec<String>, _>>()
                    .map_err(StoreError::from)
            })
            .collect()
    }

    /// Whether the database answers a trivial query (a readiness probe).
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.client().await?.simple_query("SELECT 1").await?;
        Ok(())
    }

    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        Ok(self.pool.get().await?)
    }
}
