//! PostgreSQL: connection pool, migrations, the managed private cluster, and one file per
//! table family.

pub mod libraries;
pub mod managed;
pub mod scan_errors;
pub mod scans;
pub mod tracks;

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::config::DatabaseConfig;
use managed::{ManagedPostgres, ManagedPostgresConfig, ManagedPostgresError};

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

/// The pool plus, when corald runs its own cluster, the handle that stops it.
pub struct Database {
    pub pool: PgPool,
    managed: Option<ManagedPostgres>,
    description: String,
}

impl Database {
    /// Connect to `database.url`, or start (or adopt) the managed cluster under `state_dir`.
    /// Runs the migrations either way.
    pub async fn open(cfg: &DatabaseConfig, state_dir: &std::path::Path) -> Result<Self, DbError> {
        let (options, managed, description, target) = match &cfg.url {
            Some(url) => {
                let options: PgConnectOptions = url.parse().map_err(DbError::BadUrl)?;
                let target = redact(url);
                (options, None, "external".to_owned(), target)
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
                    Some(managed),
                    "managed".to_owned(),
                    target,
                )
            }
        };
        let pool = PgPoolOptions::new()
            .max_connections(cfg.max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(|source| DbError::Connect {
                target: target.clone(),
                source,
            })?;
        let has_vector: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")
                .fetch_optional(&pool)
                .await?;
        if has_vector.is_none() {
            return Err(DbError::NoVector(target));
        }
        MIGRATOR.run(&pool).await?;
        Ok(Database {
            pool,
            managed,
            description,
        })
    }

    /// "managed" or "external".
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Close the pool and stop the managed cluster, if any.
    pub async fn close(mut self) {
        self.pool.close().await;
        if let Some(m) = self.managed.as_mut()
            && let Err(e) = m.stop().await
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
