//! Similarity latency on a large collection: `track.similar` (limit 10, over the HNSW index
//! with re-scoring, and by exact scan for comparison), `track.path` (count 25) and
//! `track.mix` (5 seeds, count 25), each run through `corald::similarity::Similarity` (the
//! service the API calls) against the harness daemon's managed PostgreSQL with pgvector.
//!
//! The vectors are **synthetic**: `CORAL_BENCH_VECTORS` (default 100,000) 200-dimensional unit
//! vectors drawn around 64 cluster centres that share one common direction (as real embeddings
//! do: raw cosines bunch high), one track row each, written straight into the database; the
//! model's HNSW index is built after the load, as `register_model` builds it. Prints p50, p90,
//! p99 and max over `CORAL_BENCH_QUERIES` (default 300) queries from random tracks.
//!
//! ```sh
//! source ~/.cache/coral/libtorch.env
//! cargo build --workspace --bins --features corald/embed
//! cargo bench -p coral-benches --features corald/embed --bench similarity
//! ```

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use coral_tests::daemon::Daemon;
use corald::embed::phase_5_store::{RegisteredModel, index_name};
use corald::similarity::{SimilarFilter, Similarity};
use pgvector::Vector;
use sqlx::{AssertSqlSafe, PgPool};

const DIM: usize = 200;
const CLUSTERS: usize = 64;

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// xorshift64*: deterministic noise.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }
}

fn unit(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= n);
}

/// Library, tracks, model, vectors, index: returns the model and the track ids.
async fn load(pool: &PgPool, n: usize) -> Result<(RegisteredModel, Vec<i64>)> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let common: Vec<f32> = (0..DIM).map(|_| 1.0 + rng.next()).collect();
    let centres: Vec<Vec<f32>> = (0..CLUSTERS)
        .map(|_| {
            (0..DIM)
                .map(|i| common[i] * 0.2 + rng.next() * 0.6)
                .collect()
        })
        .collect();
    let (lib,): (i64,) =
        sqlx::query_as("INSERT INTO libraries (path) VALUES ('/bench/synthetic') RETURNING id")
            .fetch_one(pool)
            .await?;
    let (model,): (i64,) = sqlx::query_as(
        "INSERT INTO models (name, version, params, dim, sample_rate, window_samples, sha256)
         VALUES ('synthetic', '1', 'bench', $1, 16000, 48000, 'none') RETURNING id",
    )
    .bind(DIM as i32)
    .fetch_one(pool)
    .await?;
    let mut ids = Vec::with_capacity(n);
    for start in (0..n).step_by(2_000) {
        let end = (start + 2_000).min(n);
        let rels: Vec<Vec<u8>> = (start..end)
            .map(|i| format!("t{i:06}.flac").into_bytes())
            .collect();
        let texts: Vec<String> = (start..end).map(|i| format!("t{i:06}.flac")).collect();
        let artists: Vec<String> = (start..end)
            .map(|i| format!("Artist {}", i % 5_000))
            .collect();
        let durations: Vec<i64> = (start..end)
            .map(|i| 120_000 + (i as i64 % 240) * 1_000)
            .collect();
        let batch: Vec<i64> = sqlx::query_scalar(
            "INSERT INTO tracks (library_id, rel_path, rel_path_text, size, mtime_ns, format,
                                 duration_ms, title, artist, artists)
             SELECT $1, u.rel, u.txt, 1, 0, 'flac', u.dur, u.txt, u.art, ARRAY[u.art]
             FROM UNNEST($2::bytea[], $3::text[], $4::bigint[], $5::text[]) AS u(rel, txt, dur, art)
             RETURNING id",
        )
        .bind(lib)
        .bind(&rels)
        .bind(&texts)
        .bind(&durations)
        .bind(&artists)
        .fetch_all(pool)
        .await?;
        let vectors: Vec<Vector> = (start..end)
            .map(|i| {
                let c = &centres[i % CLUSTERS];
                let mut v: Vec<f32> = c.iter().map(|x| x + rng.next() * 0.35).collect();
                unit(&mut v);
                Vector::from(v)
            })
            .collect();
        sqlx::query(
            "INSERT INTO track_embeddings (track_id, model_id, embedding, file_size, file_mtime_ns, windows)
             SELECT u.id, $1, u.v, 1, 0, 8 FROM UNNEST($2::bigint[], $3::vector[]) AS u(id, v)",
        )
        .bind(model)
        .bind(&batch)
        .bind(&vectors)
        .execute(pool)
        .await?;
        ids.extend(batch);
    }
    let started = Instant::now();
    sqlx::query("SET maintenance_work_mem = '1GB'")
        .execute(pool)
        .await?;
    sqlx::query(AssertSqlSafe(format!(
        "CREATE INDEX {} ON track_embeddings \
         USING hnsw ((embedding::vector({DIM})) vector_cosine_ops) WHERE model_id = {model}",
        index_name(model)
    )))
    .execute(pool)
    .await?;
    sqlx::query("ANALYZE track_embeddings")
        .execute(pool)
        .await?;
    sqlx::query("ANALYZE tracks").execute(pool).await?;
    println!(
        "loaded {n} synthetic vectors; HNSW index built in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok((
        RegisteredModel {
            id: model,
            dim: DIM,
        },
        ids,
    ))
}

fn report(what: &str, mut times: Vec<Duration>, sizes: &[usize]) {
    times.sort();
    let p = |q: f64| {
        let i = ((times.len() as f64 * q).ceil() as usize).clamp(1, times.len()) - 1;
        times[i].as_secs_f64() * 1e3
    };
    let avg = sizes.iter().sum::<usize>() as f64 / sizes.len().max(1) as f64;
    println!(
        "{what:<34} p50 {:7.2} ms  p90 {:7.2} ms  p99 {:7.2} ms  max {:7.2} ms  ({} queries, {avg:.1} tracks each)",
        p(0.5),
        p(0.9),
        p(0.99),
        p(1.0),
        times.len()
    );
}

async fn run() -> Result<()> {
    let n = env_usize("CORAL_BENCH_VECTORS", 100_000);
    let queries = env_usize("CORAL_BENCH_QUERIES", 300);
    let dir = coral_tests::daemon::traversable_tempdir()?;
    let config = dir.path().join("corald.toml");
    std::fs::write(
        &config,
        "[embed]\nenabled = false\n[watch]\nenabled = false\n",
    )?;
    let d = Daemon::start_with(&["--config", &config.to_string_lossy()]).await?;
    let pool = d.pool(4).await?;
    let (model, ids) = load(&pool, n).await?;
    let sim = Similarity::new(pool.clone(), model);
    let mut rng = Rng(42);
    let mut pick = || ids[((rng.next() + 0.5) * ids.len() as f32) as usize % ids.len()];
    let record = |id: i64| {
        let pool = pool.clone();
        async move {
            corald::db::tracks::get(&pool, id)
                .await?
                .context("track vanished")
        }
    };
    let filter = SimilarFilter::default();

    // Warm the index and the caches.
    for _ in 0..20 {
        let t = record(pick()).await?;
        sim.similar(&t, &filter, 10).await?;
    }
    let (mut times, mut sizes) = (Vec::new(), Vec::new());
    for _ in 0..queries {
        let t = record(pick()).await?;
        let started = Instant::now();
        let out = sim.similar(&t, &filter, 10).await?;
        times.push(started.elapsed());
        sizes.push(out.len());
    }
    report("similar (limit 10, HNSW + re-score)", times, &sizes);

    let scoped = SimilarFilter {
        min_ms: 200_000,
        max_ms: 240_000,
        max_per_artist: Some(1),
        ..SimilarFilter::default()
    };
    let (mut times, mut sizes) = (Vec::new(), Vec::new());
    for _ in 0..queries {
        let t = record(pick()).await?;
        let started = Instant::now();
        let out = sim.similar(&t, &scoped, 10).await?;
        times.push(started.elapsed());
        sizes.push(out.len());
    }
    report("similar (duration 1/6, 1 per artist)", times, &sizes);

    let (mut times, mut sizes) = (Vec::new(), Vec::new());
    for _ in 0..(queries / 10).max(5) {
        let (a, b) = (record(pick()).await?, record(pick()).await?);
        let started = Instant::now();
        let out = sim.path(&a, &b, 25, &filter).await?;
        times.push(started.elapsed());
        sizes.push(out.len());
    }
    report("path (count 25)", times, &sizes);

    let (mut times, mut sizes) = (Vec::new(), Vec::new());
    for _ in 0..(queries / 10).max(5) {
        let mut seeds = Vec::new();
        for _ in 0..5 {
            seeds.push(record(pick()).await?);
        }
        let started = Instant::now();
        let out = sim.mix(&seeds, 25, &filter).await?;
        times.push(started.elapsed());
        sizes.push(out.len());
    }
    report("mix (5 seeds, count 25)", times, &sizes);

    // For comparison: what the exact scan would cost at this size, and how many of its 10
    // best the index path (HNSW candidates re-scored) found.
    let (mut times, mut sizes, mut found) = (Vec::new(), Vec::new(), 0usize);
    for _ in 0..10 {
        let t = record(pick()).await?;
        let q = corald::embed::phase_5_store::embedding_of(&pool, model.id, t.id)
            .await?
            .context("no vector")?;
        let c = corald::similarity::vectors::centroid(&pool, model).await?;
        let scope = corald::similarity::vectors::Scope {
            exclude: vec![t.id],
            library_ids: None,
            min_ms: 0,
            max_ms: i64::MAX,
        };
        let started = Instant::now();
        let out =
            corald::similarity::vectors::candidates(&pool, model, &q, &c.mean, &scope, 100, true)
                .await?;
        times.push(started.elapsed());
        sizes.push(out.len());
        let fast: Vec<i64> = sim
            .similar(&t, &filter, 10)
            .await?
            .iter()
            .map(|(r, _)| r.id)
            .collect();
        found += out
            .iter()
            .take(10)
            .filter(|(id, _)| fast.contains(id))
            .count();
    }
    report("exact scan (100 candidates)", times, &sizes);
    println!(
        "recall of the index path against the exact scan: {found} of 100 (top 10 of 10 queries)"
    );
    Ok(())
}

fn main() -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run())
}
