"""Tags an audio file with mutagen, as real taggers (MusicBrainz Picard, foobar2000, iTunes)
write them. Reads one JSON object on stdin:

    {"path": "...", "flavour": "id3v24" | "id3v23" | "vorbis" | "mp4" | "ape" | "asf",
     "tags": {"title": ["..."], "artist": ["A", "B"], ...}}

Keys: title, artist, artists, album, albumartist, genre, composer, tracknumber, date,
musicbrainz_trackid (recording), musicbrainz_releasetrackid, musicbrainz_albumid,
musicbrainz_artistid, isrc. Every value is a list: several values are written the way the
flavour stores them (ID3v2.4: one frame, NUL-separated; ID3v2.3: joined with "/"; Vorbis and
APEv2: repeated or multi-valued items; MP4: several values in one atom; ASF: repeated
attributes). An existing tag of the flavour is replaced.
"""
import json
import sys

from mutagen import id3
from mutagen.apev2 import APEv2
from mutagen.asf import ASF
from mutagen.flac import FLAC
from mutagen.mp4 import MP4, MP4FreeForm
from mutagen.oggopus import OggOpus
from mutagen.oggvorbis import OggVorbis

ID3_TEXT = {
    "title": "TIT2", "artist": "TPE1", "album": "TALB", "albumartist": "TPE2",
    "genre": "TCON", "composer": "TCOM", "tracknumber": "TRCK", "date": "TDRC", "isrc": "TSRC",
}
ID3_TXXX = {
    "artists": "ARTISTS",
    "musicbrainz_releasetrackid": "MusicBrainz Release Track Id",
    "musicbrainz_albumid": "MusicBrainz Album Id",
    "musicbrainz_artistid": "MusicBrainz Artist Id",
}
MP4_ATOMS = {
    "title": "\xa9nam", "artist": "\xa9ART", "album": "\xa9alb", "albumartist": "aART",
    "genre": "\xa9gen", "composer": "\xa9wrt", "date": "\xa9day",
}
MP4_FREEFORM = {
    "artists": "ARTISTS", "isrc": "ISRC",
    "musicbrainz_trackid": "MusicBrainz Track Id",
    "musicbrainz_releasetrackid": "MusicBrainz Release Track Id",
    "musicbrainz_albumid": "MusicBrainz Album Id",
    "musicbrainz_artistid": "MusicBrainz Artist Id",
}
ASF_NAMES = {
    "title": "Title", "artist": "Author", "album": "WM/AlbumTitle",
    "albumartist": "WM/AlbumArtist", "genre": "WM/Genre", "composer": "WM/Composer",
    "tracknumber": "WM/TrackNumber", "date": "WM/Year", "isrc": "WM/ISRC",
    "artists": "WM/ARTISTS",
    "musicbrainz_trackid": "MusicBrainz/Track Id",
    "musicbrainz_releasetrackid": "MusicBrainz/Release Track Id",
    "musicbrainz_albumid": "MusicBrainz/Album Id",
    "musicbrainz_artistid": "MusicBrainz/Artist Id",
}
APE_NAMES = {"tracknumber": "Track", "date": "Year", "albumartist": "Album Artist"}


def tag_id3(path, tags, version):
    try:
        t = id3.ID3(path)
    except id3.ID3NoHeaderError:
        t = id3.ID3()
    t.delete(path)
    t = id3.ID3()
    for key, values in tags.items():
        if key in ID3_TEXT:
            t.add(getattr(id3, ID3_TEXT[key])(encoding=3, text=values))
        elif key in ID3_TXXX:
            t.add(id3.TXXX(encoding=3, desc=ID3_TXXX[key], text=values))
        elif key == "musicbrainz_trackid":
            t.add(id3.UFID(owner="http://musicbrainz.org", data=values[0].encode()))
        else:
            raise SystemExit(f"no ID3 frame for {key}")
    if version == 3:
        t.update_to_v23()
        t.save(path, v2_version=3, v23_sep="/")
    else:
        t.save(path, v2_version=4)


def tag_vorbis(path, tags):
    for cls in (FLAC, OggVorbis, OggOpus):
        try:
            f = cls(path)
            break
        except Exception:
            continue
    else:
        raise SystemExit(f"{path}: not FLAC, Ogg Vorbis or Opus")
    f.delete()
    for key, values in tags.items():
        f[key.upper()] = values
    f.save()


def tag_mp4(path, tags):
    f = MP4(path)
    f.delete()
    f = MP4(path)
    for key, values in tags.items():
        if key in MP4_ATOMS:
            f[MP4_ATOMS[key]] = values
        elif key == "tracknumber":
            f["trkn"] = [(int(values[0]), 0)]
        elif key in MP4_FREEFORM:
            f["----:com.apple.iTunes:" + MP4_FREEFORM[key]] = [
                MP4FreeForm(v.encode()) for v in values
            ]
        else:
            raise SystemExit(f"no MP4 atom for {key}")
    f.save()


def tag_ape(path, tags):
    try:
        f = APEv2(path)
        f.delete(path)
    except Exception:
        pass
    f = APEv2()
    for key, values in tags.items():
        name = APE_NAMES.get(key, key.title() if not key.startswith("musicbrainz") else key.upper())
        if key == "isrc":
            name = "ISRC"
        f[name] = values
    f.save(path)


def tag_asf(path, tags):
    f = ASF(path)
    f.tags.clear()
    for key, values in tags.items():
        f.tags[ASF_NAMES[key]] = values
    f.save()


def main():
    req = json.load(sys.stdin)
    path, flavour, tags = req["path"], req["flavour"], req["tags"]
    if flavour == "id3v24":
        tag_id3(path, tags, 4)
    elif flavour == "id3v23":
        tag_id3(path, tags, 3)
    elif flavour == "vorbis":
        tag_vorbis(path, tags)
    elif flavour == "mp4":
        tag_mp4(path, tags)
    elif flavour == "ape":
        tag_ape(path, tags)
    elif flavour == "asf":
        tag_asf(path, tags)
    else:
        raise SystemExit(f"unknown flavour {flavour}")


main()
