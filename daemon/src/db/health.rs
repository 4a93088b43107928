//! Database health: whether PostgreSQL answers right now, the outage record behind
//! `daemon.status` → `database_health` (one warning per outage, not per attempt), the bounded
//! exponential back-off every retried database operation uses, and the monitor that notices a
//! silent (hung) server and restarts a managed cluster whose postmaster died.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use coral_proto::{DatabaseHealth, DatabaseState};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgPool};
use tokio_util::sync::CancellationToken;

use super::managed::ManagedPostgres;
use crate::liveness::Heartbeat;

/// First pause after a failed attempt; doubled after each further failure.
pub const BACKOFF_INITIAL: Duration = Duration::from_millis(250);
/// Longest pause between two attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// One attempt of a retried operation that gets no answer for this long counts as failed (a
/// stopped or unreachable server can leave a query waiting forever otherwise).
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the monitor checks the database.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// A health check that gets no answer for this long marks the database unavailable.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Bounded exponential back-off: 250 ms, 500 ms, 1 s, 2 s, 4 s, 5 s, 5 s, …
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: BACKOFF_INITIAL,
        }
    }
}

impl Backoff {
    /// The pause before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        d
    }
}

/// Whether an error means "the database is not reachable right now" (worth retrying), rather
/// than a problem with the query or the data.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            // 08: connection exception; 57P01-57P03: admin shutdown, crash shutdown, cannot
            // connect now (starting or recovering); 53300: too many connections.
            c.starts_with("08") || matches!(&*c, "57P01" | "57P02" | "57P03" | "53300")
        }),
        _ => false,
    }
}

/// Whether the server refused an operation because of the data it was given (one row's
/// values), not because of the statement or the server's state: SQLSTATE class 22 (data
/// exception: NUL in text, bad encoding, out-of-range numbers), 23 (integrity constraint) and
/// 54 (program limit exceeded: an index row too large). Such a write is worth splitting to
/// find the row; retrying it unchanged is not.
pub fn is_data_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("22") || c.starts_with("23") || c.starts_with("54")),
        sqlx::Error::Encode(_) => true,
        _ => false,
    }
}

/// The error an attempt that got no answer is reported as (transient: an I/O timeout).
fn timed_out(after: Duration) -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("no answer from the database within {} s", after.as_secs()),
    ))
}

#[derive(Debug)]
struct State {
    available: bool,
    since: DateTime<Utc>,
    since_instant: Instant,
    last_error: Option<String>,
    outages: u64,
    retries_at_outage_start: u64,
}

/// Shared record of the database's reachability. Every database user reports to it; it logs
/// one warning when an outage begins and one line when it ends.
#[derive(Debug)]
pub struct DbHealth {
    /// What is connected to, for messages (a URL without its password, or the managed cluster).
    target: String,
    state: Mutex<State>,
    retries: AtomicU64,
    restarts: AtomicU64,
}

impl DbHealth {
    /// A record that starts as available.
    pub fn new(target: impl Into<String>) -> Arc<Self> {
        Arc::new(DbHealth {
            target: target.into(),
            state: Mutex::new(State {
                available: true,
                since: Utc::now(),
                since_instant: Instant::now(),
                last_error: None,
                outages: 0,
                retries_at_outage_start: 0,
            }),
            retries: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
        })
    }

    /// For users outside the daemon (tests, tools): reports go nowhere but the log.
    pub fn detached() -> Arc<Self> {
        Self::new("the database")
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn target(&self) -> &str {
        &self.target
    }

    pub fn is_available(&self) -> bool {
        self.lock().available
    }

    /// The last error recorded, if any.
    pub fn last_error(&self) -> Option<String> {
        self.lock().last_error.clone()
    }

    /// A query or check succeeded: ends the outage, if one is on.
    pub fn succeeded(&self) {
        let mut s = self.lock();
        if s.available {
            return;
        }
        let lasted = s.since_instant.elapsed();
        let retries = self
            .retries
            .load(Ordering::Relaxed)
            .saturating_sub(s.retries_at_outage_start);
        s.available = true;
        s.since = Utc::now();
        s.since_instant = Instant::now();
        drop(s);
        tracing::info!(
            database = %self.target,
            outage_ms = lasted.as_millis() as u64,
            retries,
            "database reachable again after {:.1} s",
            lasted.as_secs_f64()
        );
    }

    /// A query or check failed for a reason that looks like an outage: starts one (logged
    /// once) or updates the current one's last error.
    pub fn failed(&self, error: &str) {
        let mut s = self.lock();
        s.last_error = Some(error.to_owned());
        if !s.available {
            tracing::debug!(database = %self.target, error, "database still unavailable");
            return;
        }
        s.available = false;
        s.since = Utc::now();
        s.since_instant = Instant::now();
        s.outages += 1;
        s.retries_at_outage_start = self.retries.load(Ordering::Relaxed);
        drop(s);
        tracing::warn!(
            database = %self.target,
            error,
            "database unavailable; corald keeps its work and retries with back-off ({} ms doubling up to {} s) until it answers",
            BACKOFF_INITIAL.as_millis(),
            BACKOFF_MAX.as_secs()
        );
    }

    /// Mark the database unavailable at start-up, with the reason, without the outage warning
    /// (the caller logs its own error).
    pub fn start_unavailable(&self, error: &str) {
        let mut s = self.lock();
        s.last_error = Some(error.to_owned());
        if s.available {
            s.available = false;
            s.since = Utc::now();
            s.since_instant = Instant::now();
            s.outages += 1;
            s.retries_at_outage_start = self.retries.load(Ordering::Relaxed);
        }
    }

    /// Count one failed attempt that will be retried.
    pub fn retried(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// Count one restart of the managed cluster.
    pub fn restarted(&self) {
        self.restarts.fetch_add(1, Ordering::Relaxed);
    }

    /// How long the current outage has lasted (zero while available).
    pub fn outage_duration(&self) -> Duration {
        let s = self.lock();
        if s.available {
            Duration::ZERO
        } else {
            s.since_instant.elapsed()
        }
    }

    /// The wire form for `daemon.status`.
    pub fn snapshot(&self) -> DatabaseHealth {
        let s = self.lock();
        DatabaseHealth {
            state: if s.available {
                DatabaseState::Ok
            } else {
                DatabaseState::Unavailable
            },
            since: s.since,
            last_error: s.last_error.clone(),
            outages: s.outages,
            retries: self.retries.load(Ordering::Relaxed),
            restarts: self.restarts.load(Ordering::Relaxed),
        }
    }
}

/// Why a retried operation gave up.
#[derive(Debug, thiserror::Error)]
pub enum RetryError {
    /// Cancelled while waiting for the database to come back.
    #[error("cancelled while waiting for the database")]
    Cancelled,
    /// A failure that retrying cannot fix (or the last one when cancelled mid-attempt).
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

/// Run `op` until it succeeds, retrying transient failures (see [`is_transient`]) with
/// [`Backoff`] and reporting each to `health`; an attempt that gets no answer within
/// [`ATTEMPT_TIMEOUT`] counts as a transient failure. `op` must be safe to repeat (every write
/// corald retries is one transaction of upserts or deletes). Gives up when `cancel` fires
/// (after the attempt in flight) or on a non-transient error. `heartbeat`, when given, is
/// bumped while waiting, so the systemd watchdog does not take a worker that waits for its
/// database for a wedged one.
pub async fn retry<T, F, Fut>(
    health: &DbHealth,
    what: &str,
    cancel: &CancellationToken,
    heartbeat: Option<&Heartbeat>,
    mut op: F,
) -> Result<T, RetryError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, sqlx::Error>>,
{
    let mut backoff = Backoff::default();
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let result = {
            let fut = tokio::time::timeout(ATTEMPT_TIMEOUT, op());
            tokio::pin!(fut);
            let mut beat = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    r = &mut fut => break r.unwrap_or_else(|_| Err(timed_out(ATTEMPT_TIMEOUT))),
                    _ = beat.tick() => {
                        if let Some(hb) = heartbeat {
                            hb.beat();
                        }
                    }
                }
            }
        };
        match result {
            Ok(v) => {
                health.succeeded();
                return Ok(v);
            }
            Err(e) if is_transient(&e) => {
                health.failed(&e.to_string());
                if cancel.is_cancelled() {
                    return Err(RetryError::Cancelled);
                }
                health.retried();
                let delay = backoff.next_delay();
                tracing::debug!(what, attempt, delay_ms = delay.as_millis() as u64, error = %e, "database operation failed; retrying");
                let mut waited = Duration::ZERO;
                // Sleep in short steps so the heartbeat keeps beating.
                while waited < delay {
                    let step = (delay - waited).min(Duration::from_secs(1));
                    tokio::select! {
                        _ = cancel.cancelled() => return Err(RetryError::Cancelled),
                        _ = tokio::time::sleep(step) => {}
                    }
                    waited += step;
                    if let Some(hb) = heartbeat {
                        hb.beat();
                    }
                }
            }
            Err(e) => return Err(RetryError::Sql(e)),
        }
    }
}

/// One health check: `SELECT 1` through the pool while the database is available; while it is
/// not, on a fresh connection, so the error says why (refused, no such socket, auth) rather
/// than "pool timed out".
async fn probe(health: &DbHealth, pool: &PgPool, options: &PgConnectOptions) -> bool {
    let attempt = async {
        if health.is_available() {
            sqlx::query("SELECT 1").execute(pool).await.map(|_| ())
        } else {
            let mut c = sqlx::PgConnection::connect_with(options).await?;
            sqlx::query("SELECT 1").execute(&mut c).await?;
            c.close().await
        }
    };
    match tokio::time::timeout(PROBE_TIMEOUT, attempt).await {
        Ok(Ok(())) => {
            health.succeeded();
            true
        }
        Ok(Err(e)) => {
            health.failed(&e.to_string());
            false
        }
        Err(_) => {
            health.failed(&timed_out(PROBE_TIMEOUT).to_string());
            false
        }
    }
}

/// Check the database every [`PROBE_INTERVAL`] until `stop`: a server that stops answering
/// (hung, stopped, gone) shows as unavailable even when nothing else queries it, and recovery
/// is noticed at once. When corald runs its own cluster and its postmaster is gone, restart it
/// (back-off between attempts, one warning per outage).
pub async fn monitor(
    health: Arc<DbHealth>,
    pool: PgPool,
    options: PgConnectOptions,
    managed: Option<Arc<tokio::sync::Mutex<ManagedPostgres>>>,
    stop: CancellationToken,
) {
    let mut restart_backoff = Backoff::default();
    let mut next_restart = Instant::now();
    let mut restart_warned = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(PROBE_INTERVAL) => {}
        }
        if probe(&health, &pool, &options).await {
            restart_backoff = Backoff::default();
            restart_warned = false;
            continue;
        }
        let Some(managed) = &managed else { continue };
        if Instant::now() < next_restart {
            continue;
        }
        let mut m = tokio::select! {
            _ = stop.cancelled() => return,
            m = managed.lock() => m,
        };
        if m.is_running() {
            continue; // alive but not answering (busy, stopped, recovering): wait
        }
        if !restart_warned {
            tracing::warn!(
                data_dir = %m.data_dir().display(),
                "the managed PostgreSQL server is not running (its postmaster is gone): restarting it"
            );
            restart_warned = true;
        }
        let began = Instant::now();
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = m.restart() => r,
        };
        match result {
            Ok(()) => {
                health.restarted();
                tracing::info!(
                    elapsed_ms = began.elapsed().as_millis() as u64,
                    "managed PostgreSQL restarted"
                );
                restart_backoff = Backoff::default();
                restart_warned = false;
            }
            Err(e) => {
                let delay = restart_backoff.next_delay();
                next_restart = Instant::now() + delay;
                tracing::debug!(error = %e, retry_in_ms = delay.as_millis() as u64, "restarting the managed PostgreSQL failed");
                health.failed(&format!("restarting the managed PostgreSQL failed: {e}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_bound() {
        let mut b = Backoff::default();
        let delays: Vec<u64> = (0..8).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(delays, [250, 500, 1000, 2000, 4000, 5000, 5000, 5000]);
    }

    #[test]
    fn classifies_outage_errors_as_transient() {
        let refused = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(is_transient(&refused));
        assert!(is_transient(&sqlx::Error::PoolTimedOut));
        assert!(is_transient(&timed_out(Duration::from_secs(1))));
        assert!(!is_transient(&sqlx::Error::RowNotFound));
        assert!(!is_transient(&sqlx::Error::PoolClosed));
        assert!(!is_transient(&sqlx::Error::Protocol("bad".into())));
    }

    #[test]
    fn one_outage_is_counted_once_and_ends_on_success() {
        let h = DbHealth::new("test");
        assert_eq!(h.snapshot().state, DatabaseState::Ok);
        h.failed("refused");
        h.retried();
        h.failed("refused again");
        h.retried();
        let s = h.snapshot();
        assert_eq!(s.state, DatabaseState::Unavailable);
        assert_eq!(s.outages, 1);
        assert_eq!(s.retries, 2);
        assert_eq!(s.last_error.as_deref(), Some("refused again"));
        h.succeeded();
        let s = h.snapshot();
        assert_eq!(s.state, DatabaseState::Ok);
        assert_eq!(s.outages, 1);
        assert_eq!(s.last_error.as_deref(), Some("refused again"));
        h.failed("again");
        assert_eq!(h.snapshot().outages, 2);
    }

    #[tokio::test]
    async fn retry_repeats_transient_failures_and_stops_at_others() {
        let h = DbHealth::new("test");
        let cancel = CancellationToken::new();
        let mut calls = 0;
        let v = retry(&h, "test", &cancel, None, || {
            calls += 1;
            let n = calls;
            async move {
                if n < 3 {
                    Err(sqlx::Error::PoolTimedOut)
                } else {
                    Ok(n)
                }
            }
        })
        .await
        .expect("succeeds on the third attempt");
        assert_eq!(v, 3);
        let s = h.snapshot();
        assert_eq!((s.state, s.outages, s.retries), (DatabaseState::Ok, 1, 2));

        let mut calls = 0;
        let e = retry(&h, "test", &cancel, None, || {
            calls += 1;
            async { Err::<(), _>(sqlx::Error::RowNotFound) }
        })
        .await
        .expect_err("not retried");
        assert!(matches!(e, RetryError::Sql(sqlx::Error::RowNotFound)));
        assert_eq!(calls, 1);

        cancel.cancel();
        let e = retry(&h, "test", &cancel, None, || async {
            Err::<(), _>(sqlx::Error::PoolTimedOut)
        })
        .await
        .expect_err("cancelled");
        assert!(matches!(e, RetryError::Cancelled));
    }
}
