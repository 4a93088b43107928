//! Indexing: a real corald (managed PostgreSQL, Unix socket) indexing generated
//! libraries of every supported format.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use coral_proto::{CoralApiClient, LibrarySelector, ScanPhase, codes};
use coral_tests::daemon::{Daemon, add_and_scan, scan, traversable_tempdir};
use coral_tests::fixtures::{self, FixtureTrack};
use sqlx::Row;

fn write_track(root: &Path, rel: &str, format: &'static str, title: &str) -> Result<()> {
    fixtures::make_track(root, &FixtureTrack::simple(rel, format, title))?;
    Ok(())
}

/// (relative path → (title, xmin)) of every track, to see exactly which rows a scan wrote.
async fn rows(d: &Daemon) -> Result<BTreeMap<String, (Option<String>, String)>> {
    let mut db = d.db().await?;
    let rows = sqlx::query("SELECT rel_path_text, title, xmin::text AS x FROM tracks")
        .fetch_all(&mut db)
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.get("rel_path_text"), (r.get("title"), r.get("x"))))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_format_is_indexed_with_exact_tags_and_found_by_search() -> Result<()> {
    let lib = traversable_tempdir()?;
    let expected = fixtures::every_format_library(lib.path())?;
    let d = Daemon::start().await?;
    let c = d.client().await?;
    let (library_id, p) = add_and_scan(&c, lib.path()).await?;
    assert_eq!(p.phase, ScanPhase::Completed, "{p:?}");
    assert_eq!(p.counts.tracks_indexed, expected.len() as u64);
    assert_eq!(p.counts.tracks_failed, 0);
    assert_eq!(p.indexing_percent, Some(100.0));

    let mut db = d.db().await?;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM tracks WHERE library_id = $1")
        .bind(library_id)
        .fetch_one(&mut db)
        .await?;
    assert_eq!(n, expected.len() as i64);
    for t in &expected {
        let rel = t.rel_path.to_string_lossy().into_owned();
        let row = sqlx::query(
            "SELECT title, artist, album, album_artist, track_number, disc_number, year, genre,
                    duration_ms, sample_rate, channels, format
             FROM tracks WHERE rel_path_text = $1",
        )
        .bind(&rel)
        .fetch_one(&mut db)
        .await?;
        assert_eq!(
            row.get::<Option<String>, _>("title").as_deref(),
            Some(t.title.as_str()),
            "{rel}"
        );
        assert_eq!(
            row.get::<Option<String>, _>("artist").as_deref(),
            Some(t.artist.as_str()),
            "{rel}"
        );
        assert_eq!(
            row.get::<Option<String>, _>("album").as_deref(),
            Some(t.album.as_str()),
            "{rel}"
        );
        assert_eq!(
            row.get::<Option<String>, _>("album_artist"),
            t.album_artist,
            "{rel}"
        );
        assert_eq!(
            row.get::<Option<i32>, _>("track_number"),
            t.track_number.map(|v| v as i32),
            "{rel}"
        );
        assert_eq!(
            row.get::<Option<i32>, _>("disc_number"),
            t.disc_number.map(|v| v as i32),
            "{rel}"
        );
        assert_eq!(row.get::<Option<i32>, _>("year"), t.year, "{rel}");
        assert_eq!(row.get::<Option<String>, _>("genre"), t.genre, "{rel}");
        let ms: i64 = row.get("duration_ms");
        assert!(
            (ms as f64 - t.duration_s * 1000.0).abs() < 150.0,
            "{rel}: duration {ms} ms, expected {} s",
            t.duration_s
        );
        assert!(row.get::<Option<i32>, _>("sample_rate").is_some(), "{rel}");
        assert!(row.get::<Option<i32>, _>("channels").is_some(), "{rel}");
    }

    // Search: by title, by artist, accented and unaccented, case-insensitive, prefixes.
    let titles = |hits: Vec<coral_proto::Track>| -> Vec<String> {
        hits.into_iter().filter_map(|t| t.tags.title).collect()
    };
    assert_eq!(
        titles(c.track_search("crème brûlée".into(), None, None).await?),
        ["Crème Brûlée"]
    );
    assert_eq!(
        titles(c.track_search("CREME brulee".into(), None, None).await?),
        ["Crème Brûlée"]
    );
    assert_eq!(
        titles(c.track_search("zoe".into(), None, None).await?),
        ["Café del Mar"]
    );
    assert_eq!(
        titles(c.track_search("Zoë Ardent cafe".into(), None, None).await?),
        ["Café del Mar"]
    );
    assert_eq!(
        titles(c.track_search("strasse".into(), None, None).await?),
        ["Straße der Sterne"]
    );
    assert_eq!(
        titles(c.track_search("jokuls".into(), None, None).await?),
        ["Jökulsárlón"]
    );
    assert_eq!(
        titles(c.track_search("jazz".into(), None, None).await?),
        ["Smörgåsbord"]
    );
    assert!(
        c.track_search("nothing matches this".into(), None, None)
            .await?
            .is_empty()
    );
    let two = c.track_search("a".into(), Some(2), Some(0)).await?;
    let next = c.track_search("a".into(), Some(2), Some(2)).await?;
    assert_eq!(two.len(), 2);
    assert!(
        two.iter().all(|t| next.iter().all(|u| u.id != t.id)),
        "offset pages do not overlap"
    );

    // track.get returns the absolute path.
    let hit = &c.track_search("fjordur".into(), None, None).await?[0];
    let t = c.track_get(hit.id).await?;
    assert_eq!(
        Path::new(&t.path),
        lib.path().join("Þór Ragnarsson/Norður/08 Fjörður.aiff")
    );
    assert_eq!(t.format, "aiff");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_rescan_changes_exactly_the_changed_rows() -> Result<()> {
    let lib = traversable_tempdir()?;
    for (i, f) in ["mp3", "flac", "ogg_vorbis", "mp3"].iter().enumerate() {
        let ext = if *f == "ogg_vorbis" { "ogg" } else { f };
        write_track(
            lib.path(),
            &format!("album/{i}.{ext}"),
            f,
            &format!("Song {i}"),
        )?;
    }
    let d = Daemon::start().await?;
    let c = d.client().await?;
    let (id, first) = add_and_scan(&c, lib.path()).await?;
    assert_eq!(first.counts.tracks_indexed, 4);

    // A rescan of an unchanged library writes nothing.
    let before = rows(&d).await?;
    let p = scan(&c, id, None, false).await?;
    assert_eq!(
        (
            p.counts.tracks_indexed,
            p.counts.tracks_unchanged,
            p.counts.tracks_removed
        ),
        (0, 4, 0),
        "{p:?}"
    );
    assert_eq!(
        rows(&d).await?,
        before,
        "an unchanged library must not be rewritten"
    );

    // Add one, modify one, delete one.
    write_track(lib.path(), "album/new.flac", "flac", "Brand New")?;
    std::fs::remove_file(lib.path().join("album/1.flac"))?;
    write_track(lib.path(), "album/0.mp3", "mp3", "Song Zero Retagged")?;
    let p = scan(&c, id, None, false).await?;
    assert_eq!(p.phase, ScanPhase::Completed);
    assert_eq!(
        (
            p.counts.tracks_indexed,
            p.counts.tracks_unchanged,
            p.counts.tracks_removed,
            p.counts.tracks_failed
        ),
        (2, 2, 1, 0),
        "{p:?}"
    );
    let after = rows(&d).await?;
    assert_eq!(after.len(), 4);
    assert!(!after.contains_key("album/1.flac"));
    assert_eq!(after["album/new.flac"].0.as_deref(), Some("Brand New"));
    assert_eq!(
        after["album/0.mp3"].0.as_deref(),
        Some("Song Zero Retagged")
    );
    for untouched in ["album/2.ogg", "album/3.mp3"] {
        assert_eq!(
            after[untouched], before[untouched],
            "{untouched} must not be rewritten"
        );
    }

    // A full rescan re-reads everything.
    let p = scan(&c, id, None, true).await?;
    assert_eq!(
        (p.counts.tracks_indexed, p.counts.tracks_unchanged),
        (4, 0),
        "{p:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_emptied_root_deletes_nothing() -> Result<()> {
    let base = traversable_tempdir()?;
    let root = base.path().join("music");
    write_track(&root, "a/1.mp3", "mp3", "One")?;
    write_track(&root, "a/2.flac", "flac", "Two")?;
    let d = Daemon::start().await?;
    let c = d.client().await?;
    let (id, _) = add_and_scan(&c, &root).await?;

    // Unmounted: the root is gone.
    std::fs::rename(&root, base.path().join("elsewhere"))?;
    let p = scan(&c, id, None, false).await?;
    assert_eq!(p.phase, ScanPhase::Failed, "{p:?}");
    let err = p.error.unwrap_or_default();
    assert!(
        err.contains("nothing was deleted") && err.contains("does not exist"),
        "{err}"
    );
    assert_eq!(rows(&d).await?.len(), 2);

    // Mount point present but empty.
    std::fs::create_dir(&root)?;
    let p = scan(&c, id, None, false).await?;
    assert_eq!(p.phase, ScanPhase::Completed, "{p:?}");
    assert_eq!(p.counts.tracks_removed, 0);
    assert!(p.error.unwrap_or_default().contains("nothing was deleted"));
    assert_eq!(rows(&d).await?.len(), 2);

    // Back: an incremental scan finds everything unchanged.
    std::fs::remove_dir(&root)?;
    std::fs::rename(base.path().join("elsewhere"), &root)?;
    let p = scan(&c, id, None, false).await?;
    assert_eq!(
        (p.counts.tracks_unchanged, p.counts.tracks_removed),
        (2, 0),
        "{p:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_files_are_recorded_counted_and_do_not_stop_the_scan() -> Result<()> {
    let lib = traversable_tempdir()?;
    write_track(lib.path(), "good/ok.mp3", "mp3", "Fine")?;
    let bad = fixtures::corrupt_files(lib.path())?;
    // A FLAC stream named .mp3 is audio: indexed by its content.
    write_track(lib.path(), "good/flac-named.mp3", "flac", "Wrong Extension")?;
    let d = Daemon::start().await?;
    let c = d.client().await?;
    let (id, p) = add_and_scan(&c, lib.path()).await?;
    assert_eq!(p.phase, ScanPhase::Completed, "{p:?}");
    assert_eq!(p.counts.tracks_indexed, 2, "{p:?}");
    assert_eq!(p.counts.tracks_failed, bad.len() as u64, "{p:?}");
    assert_eq!(p.counts.tracks_expected, Some(2 + bad.len() as u64));

    let mut db = d.db().await?;
    let errs: Vec<(String, String)> = sqlx::query_as(
        "SELECT rel_path_text, message FROM scan_errors WHERE library_id = $1 ORDER BY 1",
    )
    .bind(id)
    .fetch_all(&mut db)
    .await?;
    assert_eq!(errs.len(), bad.len(), "{errs:?}");
    for (path, message) in &errs {
        assert!(path.starts_with("corrupt/"), "{path}");
        assert!(!message.is_empty());
    }
    let fmt: String =
        sqlx::query_scalar("SELECT format FROM tracks WHERE rel_path_text = 'good/flac-named.mp3'")
            .fetch_one(&mut db)
            .await?;
    assert_eq!(fmt, "flac");

    let libs = c.library_list().await?;
    assert_eq!(libs[0].failed_count, bad.len() as i64);
    assert_eq!(libs[0].track_count, 2);

    // Unchanged bad files are not re-read but still counted as failed; fixed ones leave the table.
    std::fs::remove_file(&bad[0])?;
    let p = scan(&c, id, None, false).await?;
    assert_eq!(p.counts.tracks_failed, bad.len() as u64 - 1, "{p:?}");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM scan_errors")
        .fetch_one(&mut db)
        .await?;
    assert_eq!(n, bad.len() as i64 - 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_targeted_scan_touches_only_its_subtree() -> Result<()> {
    let lib = traversable_tempdir()?;
    write_track(lib.path(), "one/a.mp3", "mp3", "A")?;
    write_track(lib.path(), "two/b.mp3", "mp3", "B")?;
    write_track(lib.path(), "one-more/c.mp3", "mp3", "C")?;
    let d = Daemon::start().await?;
    let c = d.client().await?;
    let (id, _) = add_and_scan(&c, lib.path()).await?;

    write_track(lib.path(), "one/new.mp3", "mp3", "New In One")?;
    write_track(lib.path(), "two/new.mp3", "mp3", "New In Two")?;
    std::fs::remove_file(lib.path().join("one-more/c.mp3"))?;
    let p = scan(&c, id, Some("one"), false).await?;
    assert_eq!(p.scan.path.as_deref(), Some("one"));
    assert_eq!(
        (
            p.counts.tracks_indexed,
            p.counts.tracks_unchanged,
            p.counts.tracks_removed
        ),
        (1, 1, 0),
        "{p:?}"
    );
    let r = rows(&d).await?;
    assert!(r.contains_key("one/new.mp3"));
    assert!(!r.contains_key("two/new.mp3"), "outside the subtree");
    assert!(
        r.contains_key("one-more/c.mp3"),
        "a sibling with the same prefix is untouched"
    );

    // An absolute path inside the library works too.
    let abs = lib.path().join("two").to_string_lossy().into_owned();
    let p = scan(&c, id, Some(&abs), false).await?;
    assert_eq!(p.counts.tracks_indexed, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_documented_errors() -> Result<()> {
    use jsonrpsee::core::client::{ClientT, Error};
    use jsonrpsee::rpc_params;
    let d = Daemon::start().await?;
    let c = d.client().await?;
    let code = |e: Error| match e {
        Error::Call(o) => (
            o.code(),
            format!(
                "{} {}",
                o.message(),
                o.data().map(|d| d.get()).unwrap_or_default()
            ),
        ),
        other => (0, other.to_string()),
    };
    let (k, m) = code(
        c.library_add("relative/dir".into())
            .await
            .expect_err("relative"),
    );
    assert_eq!(k, codes::INVALID_ARGUMENT, "{m}");
    let (k, m) = code(
        c.library_add("/nonexistent/coral".into())
            .await
            .expect_err("missing"),
    );
    assert_eq!(k, codes::PATH_NOT_DIRECTORY);
    assert!(m.contains("/nonexistent/coral"), "{m}");
    let file = traversable_tempdir()?;
    let f = file.path().join("f.txt");
    std::fs::write(&f, "x")?;
    let (k, m) = code(
        c.library_add(f.to_string_lossy().into_owned())
            .await
            .expect_err("file"),
    );
    assert_eq!(k, codes::PATH_NOT_DIRECTORY);
    assert!(m.contains("is not a directory"), "{m}");
    let (k, _) = code(
        c.scan_start(LibrarySelector::Id(999), None, None)
            .await
            .expect_err("nolib"),
    );
    assert_eq!(k, codes::LIBRARY_NOT_FOUND);
    let (k, _) = code(c.scan_get(uuid::Uuid::new_v4()).await.expect_err("noscan"));
    assert_eq!(k, codes::SCAN_NOT_FOUND);
    let (k, _) = code(c.track_get(12345).await.expect_err("notrack"));
    assert_eq!(k, codes::TRACK_NOT_FOUND);
    let (k, _) = code(
        c.track_search("  !! ".into(), None, None)
            .await
            .expect_err("empty query"),
    );
    assert_eq!(k, codes::INVALID_ARGUMENT);

    // Wrong types: the error names the parameter.
    let r: Result<serde_json::Value, _> = c.request("scan.get", rpc_params!["not-a-uuid"]).await;
    let (k, m) = code(r.expect_err("bad uuid"));
    assert_eq!(k, -32602, "{m}");
    assert!(
        m.to_lowercase().contains("uuid") || m.contains("request_id"),
        "{m}"
    );
    let r: Result<serde_json::Value, _> = c.request("track.get", rpc_params!["seven"]).await;
    assert_eq!(code(r.expect_err("bad id")).0, -32602);
    let r: Result<serde_json::Value, _> = c.request("library.nope", rpc_params![]).await;
    assert_eq!(code(r.expect_err("unknown method")).0, -32601);

    // Libraries may not nest or repeat.
    let lib = traversable_tempdir()?;
    std::fs::create_dir(lib.path().join("inner"))?;
    c.library_add(lib.path().to_string_lossy().into_owned())
        .await?;
    let (k, _) = code(
        c.library_add(lib.path().to_string_lossy().into_owned())
            .await
            .expect_err("dup"),
    );
    assert_eq!(k, codes::LIBRARY_EXISTS);
    let inner = lib.path().join("inner").to_string_lossy().into_owned();
    let (k, m) = code(c.library_add(inner).await.expect_err("nested"));
    assert_eq!(k, codes::LIBRARY_EXISTS, "{m}");
    Ok(())
}

#[test]
fn bad_config_names_the_key_and_line() -> Result<()> {
    let dir = traversable_tempdir()?;
    let cfg = dir.path().join("corald.toml");
    std::fs::write(&cfg, "log = \"info\"\n\n[scan]\nbatch_size = \"big\"\n")?;
    let out = std::process::Command::new(coral_tests::daemon::corald_bin())
        .arg("--config")
        .arg(&cfg)
        .arg("--check-config")
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 4") && err.contains("scan.batch_size"),
        "{err}"
    );
    assert!(err.contains(&cfg.to_string_lossy().into_owned()), "{err}");

    std::fs::write(&cfg, "[scan]\nthreads = 2\n")?;
    let out = std::process::Command::new(coral_tests::daemon::corald_bin())
        .arg("--config")
        .arg(&cfg)
        .arg("--check-config")
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
