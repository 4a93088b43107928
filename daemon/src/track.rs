//! The one shape of what a probe reads from an audio file — its format, audio properties and
//! tags — from the probe (`scan::phase_2_probe`) through the row written to `tracks`
//! (`db::tracks::TrackRow` holds it as it is) and back (`db::tracks::TrackRecord` reads the
//! audio properties as `AudioProperties` and the tags as `TrackTags`). The tags' shape,
//! `TrackTags`, is the wire's (`coral_proto`, which derives its `FromRow` for corald). A leaf: it
//! imports nothing else of corald.

use std::fmt;

use coral_proto::TrackTags;

/// The container/stream format of an audio file, decided from its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AudioFormat {
    /// MPEG-1/2/2.5 audio (layer III, or layer I/II with the same framing).
    Mp3,
    Flac,
    OggVorbis,
    Opus,
    /// Speex in Ogg.
    Speex,
    /// FLAC in Ogg (read with FFmpeg).
    OggFlac,
    /// MPEG-4 container (m4a, m4b, mp4): AAC, ALAC, …
    Mp4,
    /// Raw AAC stream (`.aac`): ADTS, or ADIF (read with FFmpeg).
    Aac,
    /// WAV, including RF64/BW64 and stream-written WAV (those read with FFmpeg).
    Wav,
    /// AIFF and AIFC.
    Aiff,
    /// Monkey's Audio.
    Ape,
    WavPack,
    Musepack,
    /// Windows Media Audio in ASF (read with FFmpeg).
    Wma,
    /// DSD stream files (read with FFmpeg).
    Dsf,
    /// DSDIFF (read with FFmpeg).
    Dff,
    /// TrueAudio (read with FFmpeg).
    TrueAudio,
    /// Tom's lossless Audio Kompressor (read with FFmpeg).
    Tak,
    /// OptimFROG (read with FFmpeg where it has a decoder; counted otherwise).
    OptimFrog,
    /// Raw AC-3 / E-AC-3 (read with FFmpeg).
    Ac3,
    /// Raw DTS (read with FFmpeg).
    Dts,
    /// Shorten (read with FFmpeg).
    Shorten,
    /// Matroska / WebM with an audio track (read with FFmpeg).
    Matroska,
}

impl AudioFormat {
    /// Stable lower-case name, as stored in the database and shown to users.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mp3 => "mp3",
            Self::Flac => "flac",
            Self::OggVorbis => "ogg_vorbis",
            Self::Opus => "opus",
            Self::Speex => "speex",
            Self::OggFlac => "ogg_flac",
            Self::Mp4 => "mp4",
            Self::Aac => "aac",
            Self::Wav => "wav",
            Self::Aiff => "aiff",
            Self::Ape => "ape",
            Self::WavPack => "wavpack",
            Self::Musepack => "musepack",
            Self::Wma => "wma",
            Self::Dsf => "dsf",
            Self::Dff => "dff",
            Self::TrueAudio => "tta",
            Self::Tak => "tak",
            Self::OptimFrog => "optimfrog",
            Self::Ac3 => "ac3",
            Self::Dts => "dts",
            Self::Shorten => "shorten",
            Self::Matroska => "matroska",
        }
    }
}

impl fmt::Display for AudioFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a probe learns about one audio file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbedTrack {
    pub format: AudioFormat,
    pub audio: AudioProperties,
    pub tags: TrackTags,
}

/// The audio stream's properties: what the probe reads, what `tracks` stores (read back
/// into `db::tracks::TrackRecord` as these columns).
#[derive(Debug, Clone, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct AudioProperties {
    /// Codec inside the container, e.g. "mp3", "flac", "vorbis", "opus", "aac", "alac",
    /// "pcm_s16le", "pcm_s16be", "wmav2".
    pub codec: Option<String>,
    pub duration_ms: i64,
    pub sample_rate: Option<i32>,
    pub channels: Option<i32>,
    pub bit_depth: Option<i32>,
    pub bitrate_kbps: Option<i32>,
}
