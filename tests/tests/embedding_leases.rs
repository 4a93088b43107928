//! Leases on the embedding queue: a consumer that renews its leases keeps its rows however long
//! they wait in its pipeline; rows whose consumer stopped renewing are taken over once the lease
//! runs out; a renewal touches only the renewing consumer's own rows.

use std::time::Duration;

use anyhow::Result;
use coral_tests::daemon::traversable_tempdir;
use corald::config::DatabaseConfig;
use corald::db::Database;
use corald::embed::queue::{self, QueueRow, QueueState};
use uuid::Uuid;

const LEASE_S: f64 = 1.0;

/// A managed PostgreSQL with the schema, one model and `n` queued rows of one request.
async fn queue_of(dir: &std::path::Path, n: i64) -> Result<(Database, i64, Uuid)> {
    let db = Database::connect(&DatabaseConfig::default(), dir).await?;
    db.prepare().await?;
    let model_id: i64 = sqlx::query_scalar(
        "INSERT INTO models (name, version, params, dim, sample_rate, window_samples, sha256)
         VALUES ('test', '1', 'windows=8,patches=1', 4, 16000, 48000, 'x') RETURNING id",
    )
    .fetch_one(&db.pool)
    .await?;
    let request = Uuid::new_v4();
    let rows: Vec<QueueRow> = (1..=n)
        .map(|track_id| QueueRow {
            track_id,
            state: QueueState::Queued,
            file_size: 1000,
            file_mtime_ns: 1,
        })
        .collect();
    queue::enqueue(&db.pool, request, model_id, n, &rows).await?;
    Ok((db, model_id, request))
}

#[tokio::test]
async fn renewed_leases_are_kept_and_lapsed_ones_are_taken_over() -> Result<()> {
    let dir = traversable_tempdir()?;
    let (db, model, request) = queue_of(dir.path(), 4).await?;
    let a = queue::claim(&db.pool, model, "consumer-a", LEASE_S, 2).await?;
    let b = queue::claim(&db.pool, model, "consumer-b", LEASE_S, 2).await?;
    assert_eq!((a.len(), b.len()), (2, 2), "no row is leased twice");

    // Consumer A keeps working and renews; consumer B stopped (killed) and does not.
    let held: Vec<(Uuid, i64)> = a.iter().map(|c| (c.request_id, c.track_id)).collect();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_secs_f64(LEASE_S / 2.0)).await;
        queue::renew(&db.pool, "consumer-a", LEASE_S, &held).await?;
    }
    // 2 s later: A's rows are still A's; B's lapsed and go to a third consumer.
    let c = queue::claim(&db.pool, model, "consumer-c", LEASE_S, 10).await?;
    let mut taken: Vec<i64> = c.iter().map(|r| r.track_id).collect();
    taken.sort_unstable();
    let mut lapsed: Vec<i64> = b.iter().map(|r| r.track_id).collect();
    lapsed.sort_unstable();
    assert_eq!(taken, lapsed, "only the lapsed leases are taken over");

    // A renewal names rows: A cannot renew what C now holds.
    let c_rows: Vec<(Uuid, i64)> = c.iter().map(|r| (r.request_id, r.track_id)).collect();
    assert_eq!(
        queue::renew(&db.pool, "consumer-a", LEASE_S, &c_rows).await?,
        0
    );
    assert_eq!(
        queue::renew(&db.pool, "consumer-c", LEASE_S, &c_rows).await?,
        2
    );
    assert_eq!(request, c[0].request_id);
    db.close().await;
    Ok(())
}
