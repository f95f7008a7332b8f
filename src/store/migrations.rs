//! Versioned schema changes, embedded in the binary and applied in order at start. Each
//! runs in one transaction with its version recorded; an advisory lock makes replicas that
//! start together apply each exactly once.

use super::StoreError;

/// `(version, SQL)`, in order. Never edit one that has shipped: add the next.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("migrations/0001_results.sql")),
    (2, include_str!("migrations/0002_deliveries.sql")),
    (3, include_str!("migrations/0003_delivery_payloads.sql")),
    (4, include_str!("migrations/0004_delivery_namespaces.sql")),
    (5, include_str!("migrations/0005_attempt_responses.sql")),
    (6, include_str!("migrations/0006_dispatcher.sql")),
    (7, include_str!("migrations/0007_event_bodies.sql")),
    (8, include_str!("migrations/0008_event_sequences.sql")),
    (9, include_str!("migrations/0009_idempotency_keys.sql")),
    (10, include_str!("migrations/0010_perceptual_hashes.sql")),
    (11, include_str!("migrations/0011_admissions.sql")),
    (12, include_str!("migrations/0012_trace_context.sql")),
    (13, include_str!("migrations/0013_trace_state.sql")),
    (14, include_str!("migrations/0014_work_orders.sql")),
    (15, include_str!("migrations/0015_carriers.sql")),
    (16, include_str!("migrations/0016_stored_counts.sql")),
];

/// Any fixed number: the key of the lock that serialises migrations across processes.
const MIGRATION_LOCK: i64 = 0x6b69_6e73_6967_6874;

pub(super) async fn apply(client: &mut deadpool_postgres::Client) -> Result<(), StoreError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await?;
    let applied: Vec<i32> = tx
        .query("SELECT version FROM schema_migrations", &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    if let Some(newest) = applied.iter().max()
        && !MIGRATIONS.iter().any(|(v, _)| v == newest)
    {
        return Err(StoreError::Config(format!(
            "the database has schema version {newest}, newer than this kinsight knows; \
             run a kinsight at least as new as the one that migrated it"
        )));
    }
    for (version, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO schema_migrations (version) VALUES ($1)",
            &[version],
        )
        .await?;
        tracing::info!(version, "database migration applied");
    }
    tx.commit().await?;
    Ok(())
}
