//! Scan types: what asked for a scan, its mode and phases, and the progress object of one scan
//! (`ScanInfo` and `ScanCounts` flattened into `ScanProgress`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What asked for a scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScanTrigger {
    Manual,
    FileSystemEvent,
    LibraryAdded,
    Startup,
    /// The active model changed: the library's tracks are embedded again in the background
    /// (no discovery or indexing; the job starts in its embedding phase). Similarity keeps
    /// answering from the library's previous model until the job has made it complete.
    ModelChange,
}

/// Full re-reads every file; incremental skips files whose size and mtime are unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScanMode {
    Full,
    Incremental,
}

/// Where a scan is. Terminal phases: completed, failed, cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScanPhase {
    Queued,
    Discovering,
    Indexing,
    Embedding,
    Completed,
    Failed,
    Cancelled,
}

impl ScanPhase {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            ScanPhase::Completed | ScanPhase::Failed | ScanPhase::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ScanPhase::Queued => "queued",
            ScanPhase::Discovering => "discovering",
            ScanPhase::Indexing => "indexing",
            ScanPhase::Embedding => "embedding",
            ScanPhase::Completed => "completed",
            ScanPhase::Failed => "failed",
            ScanPhase::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => ScanPhase::Queued,
            "discovering" => ScanPhase::Discovering,
            "indexing" => ScanPhase::Indexing,
            "embedding" => ScanPhase::Embedding,
            "completed" => ScanPhase::Completed,
            "failed" => ScanPhase::Failed,
            "cancelled" => ScanPhase::Cancelled,
            _ => return None,
        })
    }
}

impl ScanTrigger {
    pub fn as_str(self) -> &'static str {
        match self {
            ScanTrigger::Manual => "manual",
            ScanTrigger::FileSystemEvent => "file_system_event",
            ScanTrigger::LibraryAdded => "library_added",
            ScanTrigger::Startup => "startup",
            ScanTrigger::ModelChange => "model_change",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "manual" => ScanTrigger::Manual,
            "file_system_event" => ScanTrigger::FileSystemEvent,
            "library_added" => ScanTrigger::LibraryAdded,
            "startup" => ScanTrigger::Startup,
            "model_change" => ScanTrigger::ModelChange,
            _ => return None,
        })
    }
}

impl ScanMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ScanMode::Full => "full",
            ScanMode::Incremental => "incremental",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "full" => ScanMode::Full,
            "incremental" => ScanMode::Incremental,
            _ => return None,
        })
    }
}

/// Which scan: what it is and was asked to do, set when it is queued (and when a restart picks
/// it up again). Part of every [`ScanProgress`]; the daemon registers a scan with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanInfo {
    pub request_id: Uuid,
    pub library_id: i64,
    pub library_path: String,
    /// Subdirectory of a path-targeted scan, relative to the library root.
    pub path: Option<String>,
    pub trigger: ScanTrigger,
    /// Full or incremental. A queued incremental scan that a full request joins becomes full,
    /// so a snapshot shows the mode at its time.
    pub mode: ScanMode,
    pub started_at: DateTime<Utc>,
    /// Picked up again after a restart of corald.
    pub resumed: bool,
}

/// What a scan counted, phase by phase: the counters the daemon keeps for a running scan, the
/// columns of its `scans` row and part of every [`ScanProgress`]. A total is `None` until the
/// phase knows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanCounts {
    pub files_discovered: u64,
    pub tracks_expected: Option<u64>,
    pub tracks_indexed: u64,
    pub tracks_unchanged: u64,
    pub tracks_removed: u64,
    pub tracks_failed: u64,
    pub embeddings_expected: Option<u64>,
    pub embeddings_done: u64,
    pub embeddings_skipped: u64,
    pub embeddings_failed: u64,
}

impl ScanCounts {
    /// Files of the indexing phase that are dealt with (indexed, unchanged or failed).
    pub fn tracks_settled(&self) -> u64 {
        self.tracks_indexed + self.tracks_unchanged + self.tracks_failed
    }

    /// Tracks of the embedding phase that are dealt with.
    pub fn embeddings_settled(&self) -> u64 {
        self.embeddings_done + self.embeddings_skipped + self.embeddings_failed
    }
}

/// The progress of one scan: the object behind `scan.get`, `scan.active`, `scan.progress`
/// notifications and `coralctl --json`.
///
/// Invariants: `tracks_indexed + tracks_unchanged + tracks_failed <= tracks_expected`;
/// percentages are null until the phase's total is known, never go backwards within a phase,
/// never exceed 100 and are exactly 100 once the phase is over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScanProgress {
    /// Which scan this is; its fields stand at the top level of the JSON object.
    #[serde(flatten)]
    pub scan: ScanInfo,
    pub phase: ScanPhase,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// What the scan counted; its fields stand at the top level of the JSON object.
    #[serde(flatten)]
    pub counts: ScanCounts,
    pub indexing_percent: Option<f64>,
    pub embedding_percent: Option<f64>,
    pub tracks_per_second: Option<f64>,
    pub embeddings_per_second: Option<f64>,
    pub eta_seconds: Option<f64>,
    /// Why the scan failed, or a warning it ended with (e.g. "library root is empty: nothing
    /// was deleted").
    pub error: Option<String>,
}

impl ScanProgress {
    /// A scan that has counted nothing yet: every count zero, no percentages, rates, ETA or
    /// error, `updated_at` = `started_at`. A starting point for a snapshot.
    pub fn starting(
        request_id: Uuid,
        library_id: i64,
        library_path: String,
        trigger: ScanTrigger,
        mode: ScanMode,
        phase: ScanPhase,
        started_at: DateTime<Utc>,
    ) -> ScanProgress {
        ScanProgress {
            scan: ScanInfo {
                request_id,
                library_id,
                library_path,
                path: None,
                trigger,
                mode,
                started_at,
                resumed: false,
            },
            phase,
            updated_at: started_at,
            finished_at: None,
            counts: ScanCounts::default(),
            indexing_percent: None,
            embedding_percent: None,
            tracks_per_second: None,
            embeddings_per_second: None,
            eta_seconds: None,
            error: None,
        }
    }
}

/// Returned by `scan.start`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScanStarted {
    pub request_id: Uuid,
    pub library_id: i64,
    /// True when an identical job was already queued and this request joined it.
    pub merged: bool,
}

/// Optional filter of `scan.subscribe`: one scan, or one library's scans.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScanFilter {
    pub request_id: Option<Uuid>,
    pub library_id: Option<i64>,
}

impl ScanFilter {
    pub fn matches(&self, p: &ScanProgress) -> bool {
        self.request_id.is_none_or(|r| r == p.scan.request_id)
            && self.library_id.is_none_or(|l| l == p.scan.library_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_progress_json_keeps_the_scan_and_its_counts_at_the_top_level() {
        let mut p = ScanProgress::starting(
            Uuid::nil(),
            3,
            "/srv/music".into(),
            ScanTrigger::Manual,
            ScanMode::Full,
            ScanPhase::Indexing,
            DateTime::<Utc>::UNIX_EPOCH,
        );
        p.scan.path = Some("Jazz".into());
        p.counts.tracks_indexed = 7;
        p.counts.tracks_expected = Some(9);
        let json = serde_json::to_value(&p).unwrap_or_default();
        let keys: Vec<&str> = json
            .as_object()
            .map(|o| o.keys().map(String::as_str).collect())
            .unwrap_or_default();
        for key in [
            "request_id",
            "library_id",
            "library_path",
            "path",
            "trigger",
            "mode",
            "started_at",
            "resumed",
            "phase",
            "files_discovered",
            "tracks_expected",
            "tracks_indexed",
            "embeddings_expected",
            "indexing_percent",
            "error",
        ] {
            assert!(keys.contains(&key), "{key} missing from {json}");
        }
        assert!(
            !keys.contains(&"scan") && !keys.contains(&"counts"),
            "{json}"
        );
        assert_eq!(json["tracks_indexed"], 7);
        assert_eq!(json["embeddings_expected"], serde_json::Value::Null);
        let back: Option<ScanProgress> = serde_json::from_value(json).ok();
        assert_eq!(back, Some(p));
    }

    #[test]
    fn a_model_change_job_keeps_its_trigger_through_the_wire_and_the_scans_table() {
        let t = ScanTrigger::ModelChange;
        assert_eq!(
            serde_json::to_string(&t).ok().as_deref(),
            Some("\"model_change\"")
        );
        assert_eq!(ScanTrigger::parse(t.as_str()), Some(t));
        for t in [
            ScanTrigger::Manual,
            ScanTrigger::FileSystemEvent,
            ScanTrigger::LibraryAdded,
            ScanTrigger::Startup,
        ] {
            assert_eq!(ScanTrigger::parse(t.as_str()), Some(t));
        }
    }
}
