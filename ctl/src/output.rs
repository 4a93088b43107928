//! Human output: aligned tables and one-line summaries of the API's objects.

use coral_proto::{DaemonStatus, Library, ScanProgress, SimilarTrack, Track};

/// Print rows as a table whose columns are as wide as their widest cell.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            if i + 1 == cells.len() {
                out.push_str(c);
            } else {
                out.push_str(c);
                out.push_str(&" ".repeat(w.saturating_sub(c.chars().count()) + 2));
            }
        }
        println!("{}", out.trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

pub fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref()
        .map_or_else(|| "-".to_owned(), ToString::to_string)
}

fn short_id(id: &uuid::Uuid) -> String {
    id.to_string()
}

pub fn scan_summary(p: &ScanProgress) -> String {
    let mut s = format!(
        "{} {} {}: {} indexed, {} unchanged, {} removed, {} failed",
        p.phase.as_str(),
        p.scan.mode.as_str(),
        p.scan.library_path,
        p.counts.tracks_indexed,
        p.counts.tracks_unchanged,
        p.counts.tracks_removed,
        p.counts.tracks_failed
    );
    if let Some(e) = p.counts.embeddings_expected {
        s.push_str(&format!(
            "; embeddings {} done, {} skipped, {} failed of {e}",
            p.counts.embeddings_done, p.counts.embeddings_skipped, p.counts.embeddings_failed
        ));
    }
    if let Some(err) = &p.error {
        s.push_str(&format!(" ({err})"));
    }
    s
}

/// One line per progress update, for logs and pipes.
pub fn progress_line(p: &ScanProgress) -> String {
    let pct = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}%"));
    let mut s = format!(
        "{} {:<11} indexing {} ({}/{}) failed {}",
        p.scan.request_id,
        p.phase.as_str(),
        pct(p.indexing_percent),
        p.counts.tracks_indexed + p.counts.tracks_unchanged + p.counts.tracks_failed,
        opt(&p.counts.tracks_expected),
        p.counts.tracks_failed,
    );
    if p.counts.embeddings_expected.is_some() {
        s.push_str(&format!(
            " embedding {} ({}/{})",
            pct(p.embedding_percent),
            p.counts.embeddings_done + p.counts.embeddings_skipped + p.counts.embeddings_failed,
            opt(&p.counts.embeddings_expected)
        ));
    }
    if let Some(eta) = p.eta_seconds {
        s.push_str(&format!(" eta {eta:.0}s"));
    }
    if let Some(err) = &p.error {
        s.push_str(&format!(" — {err}"));
    }
    s
}

pub fn status(s: &DaemonStatus) {
    println!("corald {} (pid {})", s.version, s.pid);
    println!("  socket     {}", s.socket);
    println!("  state dir  {}", s.state_dir);
    println!("  database   {}", database_line(s));
    println!("  libraries  {}", s.libraries);
    println!("  tracks     {}", s.tracks);
    println!(
        "  embedding  {}",
        if s.embedding.enabled {
            format!(
                "{} on {} ({} tracks; queued {} to decode, {} to infer; {:.1} tracks/s)",
                opt(&s.embedding.model),
                opt(&s.embedding.device),
                s.embedding.tracks_embedded,
                s.embedding.decode_queue,
                s.embedding.inference_queue,
                s.embedding.tracks_per_second
            )
        } else {
            "disabled".to_owned()
        }
    );
    if !s.embedding.workers.is_empty() {
        println!("  workers    {}", s.embedding.workers.len());
    }
    for w in &s.embedding.workers {
        let ago = (chrono::Utc::now() - w.last_seen_at).num_seconds().max(0);
        println!(
            "    {} on {} ({}): {} tracks, {:.1} tracks/s, seen {ago} s ago",
            w.id, w.host, w.device, w.tracks_done, w.tracks_per_second
        );
    }
    println!(
        "  scans      {} active, {} queued",
        s.active_scans.len(),
        s.queued_scans
    );
    for p in &s.active_scans {
        println!("    {}", progress_line(p));
    }
    watch_lines(&s.watch, &s.warnings);
    for w in &s.warnings {
        println!("  warning: {w}");
    }
}

/// "managed, ok" / "external, UNAVAILABLE since 12:00:03 (42 s): <error>", with the outage
/// history when there was one.
fn database_line(s: &DaemonStatus) -> String {
    let Some(h) = &s.database_health else {
        return s.database.clone();
    };
    let mut line = format!("{}, {}", s.database, h.state.as_str());
    match h.state {
        coral_proto::DatabaseState::Unavailable => {
            let secs = (chrono::Utc::now() - h.since).num_seconds().max(0);
            line = format!(
                "{}, UNAVAILABLE since {} ({secs} s), retrying",
                s.database,
                h.since.format("%H:%M:%S")
            );
            if let Some(e) = &h.last_error {
                line.push_str(&format!(": {e}"));
            }
        }
        coral_proto::DatabaseState::Ok if h.outages > 0 => {
            line.push_str(&format!(
                " ({} outage{} since start, {} retr{}",
                h.outages,
                if h.outages == 1 { "" } else { "s" },
                h.retries,
                if h.retries == 1 { "y" } else { "ies" },
            ));
            if h.restarts > 0 {
                line.push_str(&format!(
                    ", {} restart{}",
                    h.restarts,
                    if h.restarts == 1 { "" } else { "s" }
                ));
            }
            line.push(')');
        }
        coral_proto::DatabaseState::Ok => {}
    }
    line
}

/// One line per library: how it is watched, watches held, pending changes, last event, and
/// why it is polled or paused (unless that is already one of the `warnings`).
fn watch_lines(watch: &[coral_proto::LibraryWatch], warnings: &[String]) {
    if watch.is_empty() {
        return;
    }
    println!("  watching");
    for w in watch {
        let mut line = format!("    {:<8} {}", w.mode.as_str(), w.path);
        match w.mode {
            coral_proto::WatchMode::Inotify => line.push_str(&format!(
                ": {} watches, {} pending, {} open for writing",
                w.watches, w.pending_paths, w.open_files
            )),
            coral_proto::WatchMode::Polling => {
                if let Some(s) = w.poll_interval_seconds {
                    line.push_str(&format!(": every {s} s"));
                }
            }
            _ => {}
        }
        if let Some(t) = w.last_event_at {
            line.push_str(&format!(", last change {}", t.format("%Y-%m-%d %H:%M:%S")));
        }
        println!("{line}");
        if let Some(msg) = &w.warning
            && !warnings.iter().any(|g| g.ends_with(msg.as_str()))
        {
            println!("             {msg}");
        }
    }
}

pub fn libraries(libs: &[Library]) {
    if libs.is_empty() {
        println!("no libraries; add one with `coralctl library add PATH`");
        return;
    }
    let rows: Vec<Vec<String>> = libs
        .iter()
        .map(|l| {
            let last = l.last_scan.as_ref().map_or_else(
                || "never".to_owned(),
                |p| {
                    format!(
                        "{} {}",
                        p.phase.as_str(),
                        p.finished_at
                            .unwrap_or(p.scan.started_at)
                            .format("%Y-%m-%d %H:%M:%S")
                    )
                },
            );
            vec![
                l.id.to_string(),
                l.track_count.to_string(),
                l.failed_count.to_string(),
                last,
                l.path.clone(),
            ]
        })
        .collect();
    table(&["ID", "TRACKS", "FAILED", "LAST SCAN", "PATH"], &rows);
}

/// A phase's percentage, or `-` while unknown (a re-embed job has no indexing phase).
fn percent(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}%"))
}

pub fn scans(list: &[ScanProgress]) {
    if list.is_empty() {
        println!("no scans yet");
        return;
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|p| {
            vec![
                short_id(&p.scan.request_id),
                p.phase.as_str().to_owned(),
                p.scan.trigger.as_str().to_owned(),
                percent(p.indexing_percent),
                format!("{}", p.counts.tracks_indexed),
                format!("{}", p.counts.tracks_failed),
                percent(p.embedding_percent),
                p.scan.started_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                match &p.scan.path {
                    Some(sub) => format!("{}/{}", p.scan.library_path, sub),
                    None => p.scan.library_path.clone(),
                },
            ]
        })
        .collect();
    table(
        &[
            "REQUEST ID",
            "PHASE",
            "TRIGGER",
            "INDEXED%",
            "NEW",
            "FAILED",
            "EMBEDDED%",
            "STARTED",
            "PATH",
        ],
        &rows,
    );
}

pub fn tracks(list: &[Track]) {
    if list.is_empty() {
        println!("no tracks found");
        return;
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|t| {
            vec![
                t.id.to_string(),
                opt(&t.tags.artist),
                opt(&t.tags.album),
                opt(&t.tags.title),
                format_duration(t.duration_seconds),
                t.format.clone(),
            ]
        })
        .collect();
    table(&["ID", "ARTIST", "ALBUM", "TITLE", "TIME", "FORMAT"], &rows);
}

pub fn similar(list: &[SimilarTrack]) {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            vec![
                format!("{:.3}", s.score),
                s.track.id.to_string(),
                opt(&s.track.tags.artist),
                opt(&s.track.tags.title),
                s.track.path.clone(),
            ]
        })
        .collect();
    table(&["SCORE", "ID", "ARTIST", "TITLE", "PATH"], &rows);
}

/// `track.lookup`'s answers.
pub fn matches(list: &[coral_proto::TrackMatch]) {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|m| {
            vec![
                serde_json::to_value(m.rule)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                m.track.id.to_string(),
                opt(&m.track.tags.artist),
                opt(&m.track.tags.title),
                format_duration(m.track.duration_seconds),
                m.track.path.clone(),
            ]
        })
        .collect();
    table(&["RULE", "ID", "ARTIST", "TITLE", "TIME", "PATH"], &rows);
}

/// An M3U8 playlist (UTF-8, `#EXTM3U`): per track an `#EXTINF` line (whole seconds, "artist -
/// title") and its absolute path. Line breaks in tags would end a line early, so they become
/// spaces.
pub fn m3u(tracks: &[&Track]) -> String {
    let one_line = |s: &str| s.replace(['\r', '\n'], " ");
    let mut out = String::from("#EXTM3U\n");
    for t in tracks {
        let name = match (&t.tags.artist, &t.tags.title) {
            (Some(a), Some(ti)) => format!("{a} - {ti}"),
            (None, Some(ti)) => ti.clone(),
            _ => t.relative_path.clone(),
        };
        out.push_str(&format!(
            "#EXTINF:{},{}\n{}\n",
            t.duration_seconds.round() as i64,
            one_line(&name),
            one_line(&t.path)
        ));
    }
    out
}

pub fn track(t: &Track) {
    let kv = |k: &str, v: String| println!("{k:<13} {v}");
    kv("id", t.id.to_string());
    kv("path", t.path.clone());
    kv("title", opt(&t.tags.title));
    kv("artist", opt(&t.tags.artist));
    kv("album", opt(&t.tags.album));
    kv("album artist", opt(&t.tags.album_artist));
    kv("track", opt(&t.tags.track_number));
    kv("disc", opt(&t.tags.disc_number));
    kv("year", opt(&t.tags.year));
    kv("genre", opt(&t.tags.genre));
    kv("composer", opt(&t.tags.composer));
    // The lists, when the display strings above hold several values.
    if t.tags.artists.len() > 1 {
        kv("artists", t.tags.artists.join(" | "));
    }
    if t.tags.genres.len() > 1 {
        kv("genres", t.tags.genres.join(" | "));
    }
    kv("isrc", opt(&t.tags.isrc));
    kv("mb recording", opt(&t.tags.musicbrainz_recording_id));
    kv("mb release", opt(&t.tags.musicbrainz_release_id));
    kv("duration", format_duration(t.duration_seconds));
    kv("format", format!("{} ({})", t.format, opt(&t.codec)));
    kv("sample rate", opt(&t.sample_rate));
    kv("channels", opt(&t.channels));
    kv(
        "bitrate",
        t.bitrate_kbps
            .map_or_else(|| "-".into(), |b| format!("{b} kb/s")),
    );
    kv("size", t.size.to_string());
    kv(
        "embedding",
        if t.has_embedding { "yes" } else { "no" }.to_owned(),
    );
}

pub fn format_duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}
