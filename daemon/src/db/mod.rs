//! PostgreSQL: connection pool, migrations, the managed private cluster, database health
//! (outages, retries, back-off), and one file per table family.

pub mod health;
pub mod libraries;
pub mod managed;
pub mod scan_errors;
pub mod scans;
pub mod tracks;

/// `text` as a message column can always hold it: control characters (NUL, which PostgreSQL
/// refuses in `text`, among them) become spaces, and it is cut at 2000 characters. For reasons
/// and messages that quote what a reader found in a damaged file.
pub fn storable_text(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(2000)
        .collect()
}

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::config::DatabaseConfig;
use health::DbHealth;
use managed::{ManagedPostgres, ManagedPostgresConfig, ManagedPostgresError};

/// How long one start-up connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Migrations embedded from `migrations/`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// A database problem at start-up, worded for the operator.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("managed PostgreSQL: {0}")]
    Managed(#[from] ManagedPostgresError),
    #[error("invalid database.url: {0}")]
    BadUrl(sqlx::Error),
    #[error("cannot connect to PostgreSQL at {target}: {source}")]
    Connect { target: String, source: sqlx::Error },
    #[error(
        "the PostgreSQL server at {0} has no `vector` extension: install pgvector there \
         (or remove database.url to let corald run its own PostgreSQL with pgvector)"
    )]
    NoVector(String),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Sql(#[from] sqlx::Error),
}

impl DbError {
    /// Whether retrying may help: the server could not be reached (yet), as opposed to a bad
    /// configuration, a server without pgvector or a failed migration.
    pub fn is_transient(&self) -> bool {
        match self {
            // A server that answers but has no such database yet: provisioning creates the
            // database after the server comes up (PostgreSQL's own initdb scripts, a container
            // entrypoint, corald's managed cluster). Waiting costs nothing; the reason is shown.
            DbError::Connect {
                source: sqlx::Error::Database(db),
                ..
            } if db.code().as_deref() == Some("3D000") => true,
            DbError::Connect { source, .. } | DbError::Sql(source) => health::is_transient(source),
            DbError::Migrate(
                sqlx::migrate::MigrateError::Execute(e)
                | sqlx::migrate::MigrateError::ExecuteMigration(e, _),
            ) => health::is_transient(e),
            _ => false,
        }
    }
}

/// The pool plus, when corald runs its own cluster, the handle that stops (and restarts) it.
pub struct Database {
    /// Connects lazily: it exists before the server answers.
    pub pool: PgPool,
    options: PgConnectOptions,
    managed: Option<Arc<tokio::sync::Mutex<ManagedPostgres>>>,
    description: String,
    /// The server, for messages: the URL without its password, or the managed cluster.
    target: String,
    pub health: Arc<DbHealth>,
}

impl Database {
    /// Parse `database.url`, or start (or adopt) the managed cluster under `state_dir`, and
    /// make the pool, without connecting to an external server yet ([`Database::prepare`]
    /// does). Errors here are configuration problems: retrying would not help.
    pub async fn connect(
        cfg: &DatabaseConfig,
        state_dir: &std::path::Path,
    ) -> Result<Self, DbError> {
        let (options, managed, description, target) = match &cfg.url {
            Some(url) => {
                let options: PgConnectOptions = url.parse().map_err(DbError::BadUrl)?;
                (options, None, "external".to_owned(), redact(url))
            }
            None => {
                let managed = ManagedPostgres::start(ManagedPostgresConfig {
                    data_dir: state_dir.join("postgres"),
                    install_dir: cfg.postgres_dir.clone(),
                    run_as: cfg.managed_user.clone(),
                })
                .await?;
                let target = format!(
                    "the managed cluster in {}",
                    state_dir.join("postgres").display()
                );
                (
                    managed.connect_options(),
                    Some(Arc::new(tokio::sync::Mutex::new(managed))),
                    "managed".to_owned(),
                    target,
                )
            }
        };
        let pool = PgPoolOptions::new()
            .max_connections(cfg.max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect_lazy_with(options.clone());
        Ok(Database {
            pool,
            options,
            managed,
            description,
            health: DbHealth::new(target.clone()),
            target,
        })
    }

    /// One attempt to make the database usable: connect, check for pgvector, run the
    /// migrations. A [`DbError::is_transient`] error means "not reachable yet".
    pub async fn prepare(&self) -> Result<(), DbError> {
        let mut conn = tokio::time::timeout(
            CONNECT_TIMEOUT,
            sqlx::PgConnection::connect_with(&self.options),
        )
        .await
        .unwrap_or_else(|_| {
            Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
            )))
        })
        .map_err(|source| DbError::Connect {
            target: self.target.clone(),
            source,
        })?;
        let has_vector: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")
                .fetch_optional(&mut conn)
                .await?;
        if has_vector.is_none() {
            return Err(DbError::NoVector(self.target.clone()));
        }
        MIGRATOR.run(&mut conn).await?;
        let _ = conn.close().await;
        Ok(())
    }

    /// [`Database::prepare`] until it succeeds, with back-off, recording the outage in
    /// [`Database::health`] (one warning, then quiet retries). Returns the first error that
    /// retrying cannot fix, or `Ok(false)` when `stop` fired first.
    pub async fn wait_until_ready(&self, stop: &CancellationToken) -> Result<bool, DbError> {
        let mut backoff = health::Backoff::default();
        loop {
            match self.prepare().await {
                Ok(()) => {
                    self.health.succeeded();
                    return Ok(true);
                }
                Err(e) if e.is_transient() => {
                    self.health.failed(&e.to_string());
                    self.health.retried();
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(false),
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The health monitor task (see [`health::monitor`]).
    pub fn monitor(
        &self,
        stop: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + use<> {
        health::monitor(
            Arc::clone(&self.health),
            self.pool.clone(),
            self.options.clone(),
            self.managed.clone(),
            stop,
        )
    }

    /// "managed" or "external".
    pub fn description(&self) -> &str {
        &self.description
    }

    /// The server, for messages (never with a password).
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Close the pool and stop the managed cluster, if any.
    pub async fn close(self) {
        self.pool.close().await;
        if let Some(m) = &self.managed
            && let Err(e) = m.lock().await.stop().await
        {
            tracing::warn!(error = %e, "stopping the managed PostgreSQL failed");
        }
    }
}

/// A database URL with its password hidden, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_passwords() {
        assert_eq!(
            super::redact("postgres://me:secret@db:5432/coral"),
            "postgres://me:***@db:5432/coral"
        );
        assert_eq!(super::redact("postgres://db/coral"), "postgres://db/coral");
    }
}
