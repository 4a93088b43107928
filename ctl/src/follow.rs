//! Following scans live: subscribe to `scan.progress`, draw indicatif bars on a terminal (one
//! per phase per scan), one line per update otherwise, or one JSON object per line with
//! `--json`. When corald restarts, reconnect with back-off and carry on from the snapshot.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use coral_proto::client::connect;
use coral_proto::{CoralApiClient, ScanFilter, ScanPhase, ScanProgress, ScanTrigger};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use uuid::Uuid;

use crate::output;

/// How updates are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Render {
    Json,
    Lines,
    Bars,
    /// Nothing until the end (`scan --wait`).
    Quiet,
}

/// What to follow.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    One(Uuid),
    AllActive,
}

/// Longest time to keep trying to reconnect after the daemon went away.
const RECONNECT_FOR: Duration = Duration::from_secs(120);

struct Bars {
    multi: MultiProgress,
    bars: HashMap<(Uuid, &'static str), ProgressBar>,
}

impl Bars {
    fn new() -> Self {
        Bars {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stdout_with_hz(10)),
            bars: HashMap::new(),
        }
    }

    fn bar(&mut self, id: Uuid, phase: &'static str, label: String) -> &ProgressBar {
        let multi = &self.multi;
        self.bars.entry((id, phase)).or_insert_with(|| {
            let style = ProgressStyle::with_template(
                "{prefix:.bold} {bar:30.cyan/blue} {percent:>3}% {pos}/{len} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            let b = multi.add(ProgressBar::new(0).with_style(style));
            b.set_prefix(format!("{label:<24}"));
            b
        })
    }

    fn update(&mut self, p: &ScanProgress) {
        let short = &p.scan.library_path;
        let label = |phase: &str| {
            let tail: String = short
                .chars()
                .rev()
                .take(12)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            format!("{phase} …{tail}")
        };
        let rate_eta = |rate: Option<f64>, unit: &str, failed: u64| {
            let mut m = String::new();
            if let Some(r) = rate {
                m.push_str(&format!("{r:.0} {unit}/s "));
            }
            if let Some(e) = p.eta_seconds {
                m.push_str(&format!("eta {} ", output::format_duration(e)));
            }
            if failed > 0 {
                m.push_str(&format!("{failed} failed "));
            }
            m
        };
        // A re-embed job after a model change has nothing to discover or index.
        match (p.scan.trigger, p.counts.tracks_expected) {
            (ScanTrigger::ModelChange, _) => {}
            (_, Some(total)) => {
                let b = self.bar(p.scan.request_id, "indexing", label("indexing"));
                // The same bar showed "discovering" until the total was known.
                b.set_prefix(format!("{:<24}", label("indexing")));
                b.set_length(total);
                b.set_position(
                    p.counts.tracks_indexed + p.counts.tracks_unchanged + p.counts.tracks_failed,
                );
                b.set_message(rate_eta(
                    p.tracks_per_second,
                    "files",
                    p.counts.tracks_failed,
                ));
            }
            (_, None) => {
                let b = self.bar(p.scan.request_id, "indexing", label("discovering"));
                b.set_message(format!("{} files found", p.counts.files_discovered));
            }
        }
        if let Some(total) = p.counts.embeddings_expected {
            let phase = match p.scan.trigger {
                ScanTrigger::ModelChange => "re-embedding",
                _ => "embedding",
            };
            let b = self.bar(p.scan.request_id, "embedding", label(phase));
            b.set_length(total);
            b.set_position(
                p.counts.embeddings_done + p.counts.embeddings_skipped + p.counts.embeddings_failed,
            );
            b.set_message(rate_eta(
                p.embeddings_per_second,
                "tracks",
                p.counts.embeddings_failed,
            ));
        }
        if p.phase.is_terminal() {
            for ((id, _), b) in self.bars.iter() {
                if *id == p.scan.request_id {
                    b.finish_with_message(p.phase.as_str().to_owned());
                }
            }
        }
    }
}

struct Renderer {
    mode: Render,
    bars: Option<Bars>,
}

impl Renderer {
    fn show(&mut self, p: &ScanProgress) {
        match self.mode {
            Render::Json => {
                if let Ok(s) = serde_json::to_string(p) {
                    println!("{s}");
                }
            }
            Render::Lines => println!("{}", output::progress_line(p)),
            Render::Bars => self.bars.get_or_insert_with(Bars::new).update(p),
            Render::Quiet => {}
        }
    }

    fn note(&self, msg: &str) {
        if self.mode != Render::Json {
            eprintln!("{msg}");
        }
    }
}

/// Follow until the target scan (or every active scan) ends. Returns the final states.
pub async fn follow(socket: &Path, target: Target, mode: Render) -> Result<Vec<ScanProgress>> {
    let mut r = Renderer { mode, bars: None };
    let filter = match target {
        Target::One(id) => Some(ScanFilter {
            request_id: Some(id),
            library_id: None,
        }),
        Target::AllActive => None,
    };
    let mut finals: HashMap<Uuid, ScanProgress> = HashMap::new();
    let mut tracked: HashSet<Uuid> = HashSet::new();
    let mut first = true;
    loop {
        let client = if first {
            connect(socket).await?
        } else {
            reconnect(socket, &r).await?
        };
        let mut sub = client
            .scan_subscribe(filter.clone())
            .await
            .context("subscribing to scan progress")?;
        // What happened while we were away (or before we subscribed).
        match target {
            Target::One(id) => {
                let p = client
                    .scan_get(id)
                    .await
                    .with_context(|| format!("looking up scan {id}"))?;
                if p.phase.is_terminal() {
                    r.show(&p);
                    return Ok(vec![p]);
                }
            }
            Target::AllActive => {
                let active = client.scan_active().await.context("listing active scans")?;
                if first && active.is_empty() {
                    r.note("no active scans");
                    return Ok(Vec::new());
                }
                for id in tracked.clone() {
                    if !active.iter().any(|p| p.scan.request_id == id)
                        && !finals.contains_key(&id)
                        && let Ok(p) = client.scan_get(id).await
                    {
                        r.show(&p);
                        finals.insert(id, p);
                    }
                }
                tracked.extend(active.iter().map(|p| p.scan.request_id));
                if !tracked.is_empty() && tracked.iter().all(|id| finals.contains_key(id)) {
                    return Ok(finals.into_values().collect());
                }
            }
        }
        first = false;
        while let Some(item) = sub.next().await {
            let p = match item {
                Ok(p) => p,
                Err(e) => {
                    r.note(&format!("ignoring an unreadable progress message: {e}"));
                    continue;
                }
            };
            r.show(&p);
            tracked.insert(p.scan.request_id);
            if p.phase.is_terminal() {
                finals.insert(p.scan.request_id, p.clone());
            }
            let done = match target {
                Target::One(id) => p.scan.request_id == id && p.phase.is_terminal(),
                Target::AllActive => tracked.iter().all(|id| finals.contains_key(id)),
            };
            if done {
                return Ok(finals.into_values().collect());
            }
        }
        r.note("connection to corald lost; reconnecting…");
    }
}

async fn reconnect(socket: &Path, r: &Renderer) -> Result<jsonrpsee::async_client::Client> {
    let start = std::time::Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        match connect(socket).await {
            Ok(c) => {
                r.note("reconnected");
                return Ok(c);
            }
            Err(e) if start.elapsed() > RECONNECT_FOR => {
                return Err(e).context("corald did not come back");
            }
            Err(_) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Exit status for a finished scan: 0 completed, 1 failed, 3 cancelled.
pub fn exit_code(p: &ScanProgress) -> u8 {
    match p.phase {
        ScanPhase::Completed => 0,
        ScanPhase::Cancelled => 3,
        _ => 1,
    }
}
