//! A model change without a gap in service: after a restart with another window choice (a new
//! model row), each library is re-embedded by a background job that progress shows with its
//! own counts, `track.similar` keeps answering from the previous model's vectors until the
//! library is complete under the new one, and then the old vectors and the old model go.
//! A restart in the middle resumes the job.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use coral_proto::{CoralApiClient, ScanPhase, ScanProgress, ScanTrigger, SimilarTrack, TrackRef};
use coral_tests::daemon::{Daemon, eventually, scan, traversable_tempdir, wait_scan};
use coral_tests::music::MusicKind;
use coral_tests::similarity::{Spec, daemon, embeddings_on, make, scan_all, spec, track_ids};

/// The first model: corald's default window choice.
const CONFIG_A: &str = "[embed]\nmin_duration_s = 10\n";
/// The second: six windows instead of the default four, so a new `models` row (and no watcher: the
/// test scans the file it adds itself).
const CONFIG_B: &str = "[embed]\nmin_duration_s = 10\nwindows = 6\n[watch]\nenabled = false\n";
/// The consumer's pause before each claim while the re-embed job is to be watched.
const SLOW: (&str, &str) = ("CORALD_TEST_EMBED_PAUSE_MS", "3000");

fn library() -> Vec<Spec> {
    use MusicKind::*;
    vec![
        spec("d0.flac", Drums, 0, 21.0, "A", "d0"),
        spec("d1.flac", Drums, 1, 22.0, "B", "d1"),
        spec("c0.flac", Chords, 0, 23.0, "C", "c0"),
        spec("c1.flac", Chords, 1, 24.0, "D", "c1"),
        spec("s0.flac", DistortedSaw, 0, 25.0, "E", "s0"),
    ]
}

/// A daemon with `library()` scanned and embedded under the first model (`CONFIG_A`).
struct Embedded {
    lib: tempfile::TempDir,
    specs: Vec<Spec>,
    d: Daemon,
    dir: tempfile::TempDir,
    library_id: i64,
}

/// `None` where this build cannot embed (the test then has nothing to check).
async fn embedded_library() -> Result<Option<Embedded>> {
    let lib = traversable_tempdir()?;
    let specs = library();
    make(lib.path(), &specs)?;
    let (d, dir) = daemon(&[]).await?;
    if !embeddings_on(&d).await? {
        return Ok(None);
    }
    let library_id = scan_all(&d, lib.path(), specs.len() as u64).await?;
    Ok(Some(Embedded {
        lib,
        specs,
        d,
        dir,
        library_id,
    }))
}

/// The neighbours of `id` as (path, score), every one kept.
async fn similar(d: &Daemon, id: i64) -> Result<Vec<(String, f64)>> {
    let near: Vec<SimilarTrack> = d
        .client()
        .await?
        .track_similar(TrackRef::Id(id), Some(10), None)
        .await?;
    Ok(near
        .into_iter()
        .map(|s| (s.track.relative_path, s.score))
        .collect())
}

fn same_answer(a: &[(String, f64)], b: &[(String, f64)]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.0 == y.0 && (x.1 - y.1).abs() < 1e-6)
}

/// The only model row (the first one's id).
async fn only_model(d: &Daemon) -> Result<i64> {
    let mut db = d.db().await?;
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM models ORDER BY id")
        .fetch_all(&mut db)
        .await?;
    ensure!(ids.len() == 1, "one model: {ids:?}");
    Ok(ids[0])
}

/// Restart `d` with `config` written to its configuration file and `env` as its hooks.
async fn restart(
    d: &mut Daemon,
    dir: &tempfile::TempDir,
    config: &str,
    env: &[(&str, &str)],
) -> Result<()> {
    d.terminate()?;
    std::fs::write(dir.path().join("corald.toml"), config)?;
    d.set_env(env);
    d.spawn().await
}

/// The library's re-embed job once it is embedding and has stored `at_least` vectors but not
/// all of them.
async fn reembedding(d: &Daemon, library_id: i64, at_least: u64) -> Result<ScanProgress> {
    let c = &d.client().await?;
    eventually(
        Duration::from_secs(120),
        "the re-embed job to be under way",
        || async move {
            c.scan_active().await.ok()?.into_iter().find(|p| {
                p.scan.library_id == library_id
                    && p.scan.trigger == ScanTrigger::ModelChange
                    && p.phase == ScanPhase::Embedding
                    && p.counts.embeddings_done >= at_least
                    && p.counts
                        .embeddings_expected
                        .is_some_and(|n| p.counts.embeddings_done < n)
            })
        },
    )
    .await
}

/// After the switch: one model, the new one; no vector, HNSW index or serving row of the old.
async fn old_model_gone(d: &Daemon, old: i64, library_id: i64, tracks: i64) -> Result<()> {
    let mut db = d.db().await?;
    let models: Vec<i64> = sqlx::query_scalar("SELECT id FROM models ORDER BY id")
        .fetch_all(&mut db)
        .await?;
    ensure!(models.len() == 1 && models[0] != old, "models: {models:?}");
    let new = models[0];
    let old_vectors: i64 =
        sqlx::query_scalar("SELECT count(*) FROM track_embeddings WHERE model_id <> $1")
            .bind(new)
            .fetch_one(&mut db)
            .await?;
    ensure!(old_vectors == 0, "{old_vectors} vectors of other models");
    let new_vectors: i64 =
        sqlx::query_scalar("SELECT count(*) FROM track_embeddings WHERE model_id = $1")
            .bind(new)
            .fetch_one(&mut db)
            .await?;
    ensure!(
        new_vectors == tracks,
        "{new_vectors} vectors of the new model"
    );
    let index: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_indexes WHERE indexname = $1")
        .bind(format!("track_embeddings_hnsw_{old}"))
        .fetch_one(&mut db)
        .await?;
    ensure!(index == 0, "the old model's HNSW index was dropped");
    let serving: Vec<(i64, i64)> =
        sqlx::query_as("SELECT library_id, model_id FROM library_models")
            .fetch_all(&mut db)
            .await?;
    ensure!(
        serving == vec![(library_id, new)],
        "serving rows: {serving:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn similar_answers_from_the_previous_model_until_the_library_is_re_embedded() -> Result<()> {
    let Some(mut e) = embedded_library().await? else {
        return Ok(());
    };
    let ids = track_ids(&e.d).await?;
    let query = *ids.get("d0.flac").context("d0.flac indexed")?;
    let before = similar(&e.d, query).await?;
    ensure!(before.len() == e.specs.len() - 1, "{before:?}");
    let old = only_model(&e.d).await?;

    restart(&mut e.d, &e.dir, CONFIG_B, &[SLOW]).await?;
    // Progress shows the re-embed job with its own counts: every track is to be embedded
    // again, and nothing is indexed.
    let job = reembedding(&e.d, e.library_id, 1).await?;
    ensure!(
        job.counts.embeddings_expected == Some(e.specs.len() as u64),
        "{job:?}"
    );
    ensure!(
        job.counts.tracks_indexed == 0 && job.counts.tracks_expected.is_none(),
        "{job:?}"
    );
    // Some vectors of the new model exist, yet the answer is the previous model's, unchanged.
    let during = similar(&e.d, query).await?;
    ensure!(
        same_answer(&during, &before),
        "during the re-embed: {during:?}, before: {before:?}"
    );
    let track = e.d.client().await?.track_get(query).await?;
    ensure!(track.has_embedding, "the track still has a serving vector");
    let still = e.d.client().await?.scan_get(job.scan.request_id).await?;
    ensure!(
        !still.phase.is_terminal(),
        "the job was still running while similar answered: {still:?}"
    );

    // A file added meanwhile: its scan's tracks pass the re-embed job in the queue, it is
    // embedded under the new model only, and similar answers for it from the new model.
    make(
        e.lib.path(),
        &[spec("n0.flac", MusicKind::Drums, 2, 21.0, "F", "n0")],
    )?;
    let c = e.d.client().await?;
    let added = scan(&c, e.library_id, None, false).await?;
    ensure!(
        added.phase == ScanPhase::Completed && added.counts.embeddings_done == 1,
        "{added:?}"
    );
    let running = c.scan_get(job.scan.request_id).await?;
    ensure!(
        !running.phase.is_terminal(),
        "the new file went before the re-embed job's tracks: {running:?}"
    );
    let new_track = *track_ids(&e.d).await?.get("n0.flac").context("n0.flac")?;
    let models: Vec<i64> = sqlx::query_scalar(
        "SELECT model_id FROM track_embeddings WHERE track_id = $1 ORDER BY model_id",
    )
    .bind(new_track)
    .fetch_all(&mut e.d.db().await?)
    .await?;
    ensure!(
        models.len() == 1 && models[0] != old,
        "the new model only: {models:?}"
    );
    let near_new = similar(&e.d, new_track).await?;
    ensure!(!near_new.is_empty(), "answered from the new model");

    let done = wait_scan(&e.d.client().await?, job.scan.request_id).await?;
    ensure!(
        done.phase == ScanPhase::Completed && done.counts.embeddings_done == e.specs.len() as u64,
        "{done:?}"
    );
    old_model_gone(&e.d, old, e.library_id, e.specs.len() as i64 + 1).await?;
    // Now the new model answers: the same tracks and the new one, other scores.
    let after = similar(&e.d, query).await?;
    ensure!(after.len() == before.len() + 1, "{after:?}");
    let earlier: Vec<(String, f64)> = after.into_iter().filter(|t| t.0 != "n0.flac").collect();
    ensure!(
        !same_answer(&earlier, &before),
        "the new model's scores: {earlier:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_embed_job_interrupted_by_a_restart_resumes_and_completes() -> Result<()> {
    let Some(mut e) = embedded_library().await? else {
        return Ok(());
    };
    let old = only_model(&e.d).await?;
    ensure!(std::fs::read_to_string(e.dir.path().join("corald.toml"))? == CONFIG_A);

    restart(&mut e.d, &e.dir, CONFIG_B, &[SLOW]).await?;
    let job = reembedding(&e.d, e.library_id, 1).await?;
    // Stopped in the middle, started again at full speed: the same job resumes.
    restart(&mut e.d, &e.dir, CONFIG_B, &[]).await?;
    let done = wait_scan(&e.d.client().await?, job.scan.request_id).await?;
    ensure!(done.scan.resumed, "{done:?}");
    ensure!(
        done.phase == ScanPhase::Completed
            && done.scan.trigger == ScanTrigger::ModelChange
            && done.counts.embeddings_done == e.specs.len() as u64
            && done.counts.embeddings_expected == Some(e.specs.len() as u64),
        "{done:?}"
    );
    let jobs = e.d.client().await?.scan_list(Some(50)).await?;
    let reembeds = jobs
        .iter()
        .filter(|p| p.scan.trigger == ScanTrigger::ModelChange)
        .count();
    ensure!(
        reembeds == 1,
        "one re-embed job, resumed, not a second: {jobs:?}"
    );
    old_model_gone(&e.d, old, e.library_id, e.specs.len() as i64).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_re_embed_job_keeps_the_previous_model_serving_until_the_next_start()
-> Result<()> {
    let Some(mut e) = embedded_library().await? else {
        return Ok(());
    };
    let query = *track_ids(&e.d).await?.get("c0.flac").context("c0.flac")?;
    let before = similar(&e.d, query).await?;
    let old = only_model(&e.d).await?;

    restart(&mut e.d, &e.dir, CONFIG_B, &[SLOW]).await?;
    let job = reembedding(&e.d, e.library_id, 1).await?;
    let c = e.d.client().await?;
    c.scan_cancel(job.scan.request_id).await?;
    let ended = wait_scan(&c, job.scan.request_id).await?;
    ensure!(ended.phase == ScanPhase::Cancelled, "{ended:?}");
    let during = similar(&e.d, query).await?;
    ensure!(same_answer(&during, &before), "{during:?} vs {before:?}");
    let serving: Vec<(i64, i64)> =
        sqlx::query_as("SELECT library_id, model_id FROM library_models")
            .fetch_all(&mut e.d.db().await?)
            .await?;
    ensure!(serving == vec![(e.library_id, old)], "{serving:?}");

    // The next start queues a new job, which completes the change.
    restart(&mut e.d, &e.dir, CONFIG_B, &[]).await?;
    let c = e.d.client().await?;
    let next = eventually(Duration::from_secs(60), "a new re-embed job", || {
        let c = &c;
        async move {
            c.scan_list(Some(50)).await.ok()?.into_iter().find(|p| {
                p.scan.trigger == ScanTrigger::ModelChange
                    && p.scan.request_id != job.scan.request_id
            })
        }
    })
    .await?;
    let done = wait_scan(&c, next.scan.request_id).await?;
    ensure!(
        done.phase == ScanPhase::Completed && !done.scan.resumed,
        "{done:?}"
    );
    old_model_gone(&e.d, old, e.library_id, e.specs.len() as i64).await?;
    Ok(())
}

/// An upgrade from a release without `library_models`, together with a model change:
/// migration 0006 records each library as served by the model of its newest vectors, so the
/// library is re-embedded by a background job while similarity answers from those vectors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrading_during_a_model_change_keeps_similarity_on_the_previous_vectors() -> Result<()> {
    let Some(mut e) = embedded_library().await? else {
        return Ok(());
    };
    let query = *track_ids(&e.d).await?.get("s0.flac").context("s0.flac")?;
    let before = similar(&e.d, query).await?;
    let old = only_model(&e.d).await?;
    // Back to the schema of migration 0005, the vectors kept: what an older release left.
    {
        let mut db = e.d.db().await?;
        for statement in [
            "DROP TABLE library_models",
            "DELETE FROM _sqlx_migrations WHERE version = 6",
        ] {
            sqlx::query(statement).execute(&mut db).await?;
        }
    }
    restart(&mut e.d, &e.dir, CONFIG_B, &[SLOW]).await?;
    let serving: Vec<(i64, i64)> =
        sqlx::query_as("SELECT library_id, model_id FROM library_models")
            .fetch_all(&mut e.d.db().await?)
            .await?;
    ensure!(serving == vec![(e.library_id, old)], "{serving:?}");
    let job = reembedding(&e.d, e.library_id, 1).await?;
    ensure!(
        job.counts.embeddings_expected == Some(e.specs.len() as u64),
        "{job:?}"
    );
    let during = similar(&e.d, query).await?;
    ensure!(same_answer(&during, &before), "{during:?} vs {before:?}");
    Ok(())
}

/// A file gone from the disk during the re-embed (not rescanned) cannot be embedded again: the
/// job counts it as failed, and the library still switches to the new model when the job ends
/// (an unreadable file is not recorded as an issue, so "every track has a vector or an issue"
/// alone would hold the library on the old model for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_gone_during_the_re_embed_does_not_hold_the_library_on_its_previous_model()
-> Result<()> {
    let Some(mut e) = embedded_library().await? else {
        return Ok(());
    };
    let old = only_model(&e.d).await?;

    restart(&mut e.d, &e.dir, CONFIG_B, &[SLOW]).await?;
    let job = reembedding(&e.d, e.library_id, 1).await?;
    // A track still waiting in the queue (not leased by the consumer): its file goes.
    let waiting: String = sqlx::query_scalar(
        "SELECT t.rel_path_text FROM embed_queue q JOIN tracks t ON t.id = q.track_id
         WHERE q.request_id = $1 AND q.state = 'queued' AND q.leased_by IS NULL
         ORDER BY q.track_id DESC LIMIT 1",
    )
    .bind(job.scan.request_id)
    .fetch_one(&mut e.d.db().await?)
    .await?;
    std::fs::remove_file(e.lib.path().join(&waiting))?;
    let done = wait_scan(&e.d.client().await?, job.scan.request_id).await?;
    ensure!(
        done.phase == ScanPhase::Completed
            && done.counts.embeddings_failed == 1
            && done.counts.embeddings_done == e.specs.len() as u64 - 1,
        "{waiting} failed, the others embedded: {done:?}"
    );
    old_model_gone(&e.d, old, e.library_id, e.specs.len() as i64 - 1).await?;
    Ok(())
}
