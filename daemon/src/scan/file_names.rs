//! Which directory entries a scan looks at: the audio extensions and the names it skips. The
//! walker and the watcher both ask here, so they cannot disagree.

use std::path::Path;

/// Extensions of the files handed to the probe (case-insensitive). The content decides the
/// format; an extension only makes a file a candidate. Formats out of scope are listed too,
/// so that they are counted (as not indexed, with the reason) instead of vanishing.
pub const AUDIO_EXTENSIONS: &[&str] = &[
    // lofty reads these
    "mp3", "mp2", "mp1", "flac", "ogg", "oga", "opus", "spx", "m4a", "m4b", "m4p", "mp4", "3g2",
    "aac", "alac", "wav", "wave", "aif", "aiff", "aifc", "ape", "wv", "mpc", "mp+", "mpp",
    // FFmpeg reads these
    "wma", "asf", "dsf", "dff", "tta", "tak", "ofr", "ofs", "ac3", "eac3", "dts", "shn", "mka",
    "webm", "rf64", // out of scope, counted
    "mod", "s3m", "xm", "it", "mptm", "mid", "midi", "kar",
];

/// Whether a path looks like audio by its extension (case-insensitive). The content decides
/// the format later; this only chooses which files the walker hands to the probe.
pub fn is_audio_candidate(path: &Path) -> bool {
    let Some(ext) = path.extension().and_then(|e| e.to_str()) else {
        return false;
    };
    AUDIO_EXTENSIONS.iter().any(|e| e.eq_ignore_ascii_case(ext))
}

/// What a file of a format that corald counts but does not index is, by its extension.
pub fn out_of_scope_kind(path: &Path) -> Option<&'static str> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    Some(match ext.as_str() {
        "mod" | "s3m" | "xm" | "it" | "mptm" => "tracker module",
        "mid" | "midi" | "kar" => "MIDI file",
        _ => return None,
    })
}

/// Names a scan skips and the watcher ignores: hidden entries (and so editors' and
/// downloaders' temporary files), NAS metadata and recycle folders.
pub fn is_ignored_name(name: &[u8]) -> bool {
    name.first() == Some(&b'.') || name == b"@eaDir" || name == b"#recycle" || name == b"#snapshot"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_by_extension_ignore_case() {
        for name in [
            "a.mp3", "b.FLAC", "c.Ogg", "d.m4b", "e.WAVE", "f.aifc", "g.opus", "h.WMA", "i.wv",
            "j.dsf", "k.xm",
        ] {
            assert!(is_audio_candidate(Path::new(name)), "{name}");
        }
        for name in ["a.txt", "b", "c.mp3.part", "d.jpg", ".mp3"] {
            assert!(!is_audio_candidate(Path::new(name)), "{name}");
        }
        assert_eq!(out_of_scope_kind(Path::new("x.XM")), Some("tracker module"));
        assert_eq!(out_of_scope_kind(Path::new("x.mp3")), None);
    }

    #[test]
    fn hidden_and_nas_names_are_ignored() {
        assert!(is_ignored_name(b".hidden"));
        assert!(is_ignored_name(b".song.mp3.tmp"));
        assert!(is_ignored_name(b"@eaDir"));
        assert!(!is_ignored_name(b"Album"));
    }
}
