//! Tag values, cleaned once where they enter: which tag wins, text cleaning, multi-valued
//! fields, numbers and years. Both readers (lofty and FFmpeg) hand their raw strings to
//! [`TagsBuilder`], so every value in the database went through [`clean_values`].
//!
//! # Text
//! A raw value is split at NUL (ID3v2.4 stores several values of one frame separated by NUL;
//! damaged files carry stray NULs), then each part has control characters replaced by spaces,
//! a byte-order mark removed, whitespace trimmed, and is cut at [`MAX_TAG_BYTES`] (at a character
//! boundary, with a warning). Invalid UTF-8 reaches us already replaced by U+FFFD (lofty and
//! [`String::from_utf8_lossy`]): kept, never dropped. Empty parts are dropped.
//!
//! # Multi-valued fields
//! Artists, album artists, genres and composers are lists: every NUL-separated part, every
//! repeated item (Vorbis `ARTIST=A`, `ARTIST=B`, several MP4 atoms, APEv2 multi-values), in
//! order, without duplicates, from the first tag of the file that has the field. Artists come
//! from the `ARTISTS` field when the file has one (MusicBrainz Picard writes the credited
//! string, "A feat. B", in `ARTIST` and the individual names in `ARTISTS`). The display string
//! of each list is the credited string when there is one, else its values joined with
//! [`DISPLAY_SEPARATOR`]. ID3v2.3's "/" is not split in `ARTIST`, `GENRE` and the like: it is
//! part of real names ("AC/DC"); only the `ARTISTS` list of an ID3v2.3 tag, which Picard joins
//! with "/", is split there.

use lofty::file::{TaggedFile, TaggedFileExt};
use lofty::tag::{ItemKey, ItemValue, Tag, TagType};

/// Longest tag string kept (bytes, cut at a character boundary): protects index limits in
/// the database from absurd tag values.
pub const MAX_TAG_BYTES: usize = 1024;
/// Most values kept per multi-valued field.
const MAX_VALUES: usize = 64;
/// Joins the values of a list into its display string.
pub const DISPLAY_SEPARATOR: &str = "; ";

pub use coral_proto::TrackTags;

/// A field of [`TrackTags`], as both readers name what they found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Title,
    Album,
    Artist,
    /// The list of individual artists (`ARTISTS`).
    Artists,
    AlbumArtist,
    Genre,
    Composer,
    TrackNumber,
    DiscNumber,
    /// A date or year: the first one that parses wins.
    Date,
    MusicBrainzRecordingId,
    MusicBrainzTrackId,
    MusicBrainzReleaseId,
    MusicBrainzArtistId,
    Isrc,
}

const ALL_FIELDS: [Field; 15] = [
    Field::Title,
    Field::Album,
    Field::Artist,
    Field::Artists,
    Field::AlbumArtist,
    Field::Genre,
    Field::Composer,
    Field::TrackNumber,
    Field::DiscNumber,
    Field::Date,
    Field::MusicBrainzRecordingId,
    Field::MusicBrainzTrackId,
    Field::MusicBrainzReleaseId,
    Field::MusicBrainzArtistId,
    Field::Isrc,
];

/// Collects raw values field by field. A field takes its values from the first source (tag)
/// that has any: call [`TagsBuilder::next_source`] between tags.
#[derive(Debug, Default)]
pub struct TagsBuilder {
    raw: Vec<(Field, Vec<String>)>,
    filled_before: Vec<Field>,
    /// A value was cut at [`MAX_TAG_BYTES`].
    pub truncated: bool,
}

impl TagsBuilder {
    /// Adds one raw value of `field` (it may hold several NUL-separated values).
    pub fn add(&mut self, field: Field, raw: &str) {
        if self.filled_before.contains(&field) {
            return;
        }
        let mut cut = false;
        let values = clean_values(raw, &mut cut);
        self.truncated |= cut;
        if values.is_empty() {
            return;
        }
        let at = match self.raw.iter().position(|(f, _)| *f == field) {
            Some(at) => at,
            None => {
                self.raw.push((field, Vec::new()));
                self.raw.len() - 1
            }
        };
        let list = &mut self.raw[at].1;
        for v in values {
            if !list.contains(&v) && list.len() < MAX_VALUES {
                list.push(v);
            }
        }
    }

    /// The values collected so far stay; fields that have values take none from later sources.
    pub fn next_source(&mut self) {
        for (f, _) in &self.raw {
            if !self.filled_before.contains(f) {
                self.filled_before.push(*f);
            }
        }
    }

    fn take(&mut self, field: Field) -> Vec<String> {
        self.raw
            .iter_mut()
            .find(|(f, _)| *f == field)
            .map(|(_, v)| std::mem::take(v))
            .unwrap_or_default()
    }

    pub fn build(mut self) -> TrackTags {
        let first = |v: Vec<String>| v.into_iter().next();
        let credited = self.take(Field::Artist);
        let listed = self.take(Field::Artists);
        let (artist, artists) = if listed.is_empty() {
            list_with_display(credited)
        } else {
            let display = if credited.is_empty() {
                join(&listed)
            } else {
                join(&credited)
            };
            (display, listed)
        };
        let (album_artist, album_artists) = list_with_display(self.take(Field::AlbumArtist));
        let (genre, genres) = list_with_display(self.take(Field::Genre));
        let (composer, composers) = list_with_display(self.take(Field::Composer));
        TrackTags {
            // Several titles (NUL-separated, repeated items) are all kept, joined.
            title: join(&self.take(Field::Title)),
            album: join(&self.take(Field::Album)),
            artist,
            artists,
            album_artist,
            album_artists,
            genre,
            genres,
            composer,
            composers,
            track_number: self
                .take(Field::TrackNumber)
                .iter()
                .find_map(|v| leading_number(v)),
            disc_number: self
                .take(Field::DiscNumber)
                .iter()
                .find_map(|v| leading_number(v)),
            year: self.take(Field::Date).iter().find_map(|v| parse_year(v)),
            musicbrainz_recording_id: first(self.take(Field::MusicBrainzRecordingId)),
            musicbrainz_track_id: first(self.take(Field::MusicBrainzTrackId)),
            musicbrainz_release_id: first(self.take(Field::MusicBrainzReleaseId)),
            musicbrainz_artist_ids: self.take(Field::MusicBrainzArtistId),
            isrc: first(self.take(Field::Isrc)),
        }
    }
}

fn join(values: &[String]) -> Option<String> {
    (!values.is_empty()).then(|| cap_len(values.join(DISPLAY_SEPARATOR), &mut false))
}

fn list_with_display(values: Vec<String>) -> (Option<String>, Vec<String>) {
    (join(&values), values)
}

/// lofty's keys for a field, in order of preference.
fn lofty_keys(field: Field) -> &'static [ItemKey] {
    match field {
        Field::Title => &[ItemKey::TrackTitle],
        Field::Album => &[ItemKey::AlbumTitle],
        Field::Artist => &[ItemKey::TrackArtist],
        Field::Artists => &[ItemKey::TrackArtists],
        Field::AlbumArtist => &[ItemKey::AlbumArtist],
        Field::Genre => &[ItemKey::Genre],
        Field::Composer => &[ItemKey::Composer],
        Field::TrackNumber => &[ItemKey::TrackNumber],
        Field::DiscNumber => &[ItemKey::DiscNumber],
        Field::Date => &[
            ItemKey::RecordingDate,
            ItemKey::Year,
            ItemKey::ReleaseDate,
            ItemKey::OriginalReleaseDate,
        ],
        Field::MusicBrainzRecordingId => &[ItemKey::MusicBrainzRecordingId],
        Field::MusicBrainzTrackId => &[ItemKey::MusicBrainzTrackId],
        Field::MusicBrainzReleaseId => &[ItemKey::MusicBrainzReleaseId],
        Field::MusicBrainzArtistId => &[ItemKey::MusicBrainzArtistId],
        Field::Isrc => &[ItemKey::Isrc],
    }
}

/// The tags of a file lofty read: the primary tag first, then every other tag, so a field
/// missing from the primary tag is taken from another one.
/// `id3v2_3`: the ID3v2 tag is version 2.3 or older, where one frame holds one string and
/// Picard joins the individual artists of `ARTISTS` with "/".
pub fn from_lofty(tf: &TaggedFile, id3v2_3: bool) -> (TrackTags, bool) {
    let primary = tf.primary_tag();
    let mut ordered: Vec<&Tag> = primary.into_iter().collect();
    ordered.extend(
        tf.tags()
            .iter()
            .filter(|t| primary.is_none_or(|p| p.tag_type() != t.tag_type())),
    );
    let mut b = TagsBuilder::default();
    for tag in ordered {
        for field in ALL_FIELDS {
            for key in lofty_keys(field) {
                for item in tag.get_items(*key) {
                    match item.value() {
                        ItemValue::Text(s)
                            if id3v2_3
                                && field == Field::Artists
                                && tag.tag_type() == TagType::Id3v2 =>
                        {
                            s.split('/').for_each(|part| b.add(field, part));
                        }
                        ItemValue::Text(s) | ItemValue::Locator(s) => b.add(field, s),
                        // UFID (MusicBrainz recording id in ID3v2) holds the id as bytes.
                        ItemValue::Binary(bytes) => b.add(field, &String::from_utf8_lossy(bytes)),
                    }
                }
            }
        }
        b.next_source();
    }
    let truncated = b.truncated;
    (b.build(), truncated)
}

/// FFmpeg's tag names (lower-cased) for each field: its generic names (`artist`, `date`, …) and
/// the native names it passes through (Vorbis comments, APEv2, ASF `WM/…`, MusicBrainz).
pub fn ffmpeg_field(key: &str) -> Option<Field> {
    Some(match key {
        "title" | "tit2" => Field::Title,
        "album" | "talb" => Field::Album,
        "artist" | "author" | "tpe1" => Field::Artist,
        "artists" | "wm/artists" => Field::Artists,
        "album_artist" | "albumartist" | "album artist" | "wm/albumartist" | "tpe2" => {
            Field::AlbumArtist
        }
        "genre" | "wm/genre" | "tcon" => Field::Genre,
        "composer" | "wm/composer" | "tcom" => Field::Composer,
        "track" | "tracknumber" | "wm/tracknumber" | "trck" => Field::TrackNumber,
        "disc" | "discnumber" | "wm/partofset" | "tpos" => Field::DiscNumber,
        "date" | "year" | "originaldate" | "wm/year" | "tdrc" | "tyer" => Field::Date,
        "musicbrainz_trackid" | "musicbrainz track id" | "musicbrainz/track id" => {
            Field::MusicBrainzRecordingId
        }
        "musicbrainz_releasetrackid"
        | "musicbrainz release track id"
        | "musicbrainz/release track id" => Field::MusicBrainzTrackId,
        "musicbrainz_albumid" | "musicbrainz album id" | "musicbrainz/album id" => {
            Field::MusicBrainzReleaseId
        }
        "musicbrainz_artistid" | "musicbrainz artist id" | "musicbrainz/artist id" => {
            Field::MusicBrainzArtistId
        }
        "isrc" | "tsrc" | "wm/isrc" => Field::Isrc,
        _ => return None,
    })
}

/// Splits a raw value at NUL and cleans each part (see the module docs); empty parts go.
/// Sets `truncated` when a part was cut at [`MAX_TAG_BYTES`].
pub fn clean_values(raw: &str, truncated: &mut bool) -> Vec<String> {
    raw.split('\0')
        .filter_map(|p| clean_one(p, truncated))
        .collect()
}

fn clean_one(part: &str, truncated: &mut bool) -> Option<String> {
    let cleaned: String = part
        .chars()
        .filter(|c| *c != '\u{FEFF}')
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let cleaned = cleaned.trim();
    (!cleaned.is_empty()).then(|| cap_len(cleaned.to_owned(), truncated))
}

/// Cuts `s` to at most [`MAX_TAG_BYTES`] at a character boundary.
fn cap_len(mut s: String, truncated: &mut bool) -> String {
    if s.len() > MAX_TAG_BYTES {
        *truncated = true;
        let mut cut = MAX_TAG_BYTES;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        let trimmed = s.trim_end().len();
        s.truncate(trimmed);
    }
    s
}

/// "3", "03", "3/12", " 7 of 9" → the leading number; 0 or none → None.
pub fn leading_number(raw: &str) -> Option<i32> {
    let digits: String = raw
        .trim()
        .chars()
        .take_while(char::is_ascii_digit)
        .take(9)
        .collect();
    digits.parse::<i32>().ok().filter(|n| *n > 0)
}

/// "2019", "2019-05-01", "2019-05-01T10:00:00Z" → 2019.
pub fn parse_year(raw: &str) -> Option<i32> {
    let raw = raw.trim();
    let digits = raw.get(..4)?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if raw.as_bytes().get(4).is_some_and(u8::is_ascii_digit) {
        return None; // not a 4-digit year
    }
    digits.parse::<i32>().ok().filter(|y| *y > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_years() {
        assert_eq!(leading_number("3/12"), Some(3));
        assert_eq!(leading_number(" 07 "), Some(7));
        assert_eq!(leading_number("0"), None);
        assert_eq!(leading_number("x"), None);
        assert_eq!(leading_number("99999999999999"), Some(999_999_999));
        assert_eq!(parse_year("2019-05-01"), Some(2019));
        assert_eq!(parse_year(" 1999 "), Some(1999));
        assert_eq!(parse_year("20190"), None);
        assert_eq!(parse_year("19"), None);
        assert_eq!(parse_year("0000"), None);
    }

    #[test]
    fn text_is_split_at_nul_and_cleaned() {
        let mut cut = false;
        assert_eq!(clean_values("  Title\0\0\0", &mut cut), ["Title"]);
        assert_eq!(clean_values("A\0B", &mut cut), ["A", "B"]);
        assert!(clean_values(" \0 ", &mut cut).is_empty());
        assert_eq!(clean_values("a\u{1}b", &mut cut), ["a b"]);
        assert_eq!(clean_values("\u{FEFF}Bom", &mut cut), ["Bom"]);
        assert_eq!(
            clean_values("bad \u{FFFD} utf8", &mut cut),
            ["bad \u{FFFD} utf8"]
        );
        assert!(!cut);
        let long = "é".repeat(2000);
        let capped = clean_values(&long, &mut cut);
        assert!(cut);
        assert!(capped[0].len() <= MAX_TAG_BYTES && capped[0].chars().all(|c| c == 'é'));
    }

    #[test]
    fn lists_keep_every_value_once_and_the_credit_for_display() {
        let mut b = TagsBuilder::default();
        b.add(Field::Artist, "Alpha feat. Beta");
        b.add(Field::Artists, "Alpha\0Beta");
        b.add(Field::Artists, "Beta");
        b.add(Field::Genre, "Rock");
        b.add(Field::Genre, "Jazz\0Rock");
        b.next_source();
        b.add(Field::Genre, "Ignored");
        b.add(Field::Title, "From the second tag");
        let t = b.build();
        assert_eq!(t.artist.as_deref(), Some("Alpha feat. Beta"));
        assert_eq!(t.artists, ["Alpha", "Beta"]);
        assert_eq!(t.genres, ["Rock", "Jazz"]);
        assert_eq!(t.genre.as_deref(), Some("Rock; Jazz"));
        assert_eq!(t.title.as_deref(), Some("From the second tag"));
    }

    #[test]
    fn nul_separated_artists_without_an_artists_field_become_the_list() {
        let mut b = TagsBuilder::default();
        b.add(Field::Artist, "Alpha\0Beta");
        let t = b.build();
        assert_eq!(t.artists, ["Alpha", "Beta"]);
        assert_eq!(t.artist.as_deref(), Some("Alpha; Beta"));
    }
}
