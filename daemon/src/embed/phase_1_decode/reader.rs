//! Reading the regions of a file with symphonia: [`RegionReader`] seeks, skips, decodes and
//! downmixes packet by packet; [`RegionFill`] copies the decoded frames into the regions.
//! `decode_regions_symphonia` (in the parent) drives the two.

use std::io::ErrorKind;
use std::path::Path;

use symphonia::core::codecs::audio::AudioDecoder;
use symphonia::core::errors::Error as SymError;
use symphonia::core::formats::{FormatReader, SeekMode, SeekTo};
use symphonia::core::packet::Packet;
use symphonia::core::units::Timestamp;

use super::{
    Clock, DecodeError, MAX_DAMAGED_PACKETS, MIN_REGION_COVERAGE, Opened, Region, SEEK_GAP_S,
    SeekPolicy,
};

/// One region being filled.
struct Want {
    /// First frame (may be negative: that part stays silent).
    start: i64,
    buf: Vec<f32>,
    /// Frames of real audio written (contiguous from the region start or from frame 0).
    written: usize,
}

impl Want {
    fn end(&self) -> i64 {
        self.start + self.buf.len() as i64
    }
    /// Frames before the start of the track, which can never be written.
    fn silent_prefix(&self) -> usize {
        usize::try_from(-self.start.min(0))
            .unwrap_or(0)
            .min(self.buf.len())
    }
    fn complete(&self) -> bool {
        self.silent_prefix() + self.written >= self.buf.len()
    }
}

/// The regions being filled: in order of their start, reported in the order asked.
pub(super) struct RegionFill {
    wants: Vec<Want>,
    /// `wants[k]` is region `order[k]` of the request.
    order: Vec<usize>,
    /// First region not complete.
    first: usize,
}

impl RegionFill {
    pub(super) fn new(regions: &[Region], rate: f64) -> Self {
        let mut order: Vec<usize> = (0..regions.len()).collect();
        order.sort_by(|&a, &b| regions[a].start_s.total_cmp(&regions[b].start_s));
        let wants = order
            .iter()
            .map(|&i| Want {
                start: (regions[i].start_s * rate).round() as i64,
                buf: vec![0.0; (regions[i].len_s * rate).ceil() as usize],
                written: 0,
            })
            .collect();
        RegionFill {
            wants,
            order,
            first: 0,
        }
    }

    /// The frame the first incomplete region needs next; `None` once all are complete.
    pub(super) fn next_needed_frame(&mut self) -> Option<i64> {
        while self.first < self.wants.len() && self.wants[self.first].complete() {
            self.first += 1;
        }
        let w = self.wants.get(self.first)?;
        Some(w.start.saturating_add(w.written as i64))
    }

    /// Copies decoded mono frames starting at frame `p0` into the regions they overlap.
    pub(super) fn copy(&mut self, p0: i64, mono: &[f32]) {
        let p_end = p0 + mono.len() as i64;
        for w in self.wants.iter_mut().skip(self.first) {
            if w.start >= p_end {
                break;
            }
            let from = p0.max(w.start).max(0);
            let to = p_end.min(w.end());
            if from >= to {
                continue;
            }
            let src = usize::try_from(from - p0).unwrap_or(0);
            let dst = usize::try_from(from - w.start).unwrap_or(0);
            let n = usize::try_from(to - from).unwrap_or(0);
            w.buf[dst..dst + n].copy_from_slice(&mono[src..src + n]);
            let filled_to = dst + n - w.silent_prefix();
            w.written = w.written.max(filled_to);
        }
    }

    /// The regions in the order asked, or `Truncated` when the stream did not reach one.
    pub(super) fn finish(
        self,
        last_frame_seen: i64,
        rate: f64,
    ) -> Result<Vec<Vec<f32>>, DecodeError> {
        for w in &self.wants {
            let have = w.silent_prefix() + w.written;
            if (have as f64) < w.buf.len() as f64 * MIN_REGION_COVERAGE {
                return Err(DecodeError::Truncated {
                    ends_s: last_frame_seen as f64 / rate,
                    needed_s: w.end() as f64 / rate,
                });
            }
        }
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); self.wants.len()];
        for (w, &i) in self.wants.into_iter().zip(self.order.iter()) {
            out[i] = w.buf;
        }
        Ok(out)
    }
}

/// An opened file read packet by packet: seeks, skips, decodes to mono, counts.
pub(super) struct RegionReader<'a> {
    path: &'a Path,
    format: Box<dyn FormatReader>,
    decoder: Box<dyn AudioDecoder>,
    track_id: u32,
    pub(super) clock: Clock,
    opus_pre_skip: Option<i64>,
    can_seek: bool,
    seek_gap: i64,
    /// Frame after the last packet read.
    pos: Option<i64>,
    /// Packets were skipped undecoded: reset the decoder before decoding again.
    needs_reset: bool,
    /// Each seek goes further than the last: a seek that lands early is not repeated.
    last_seek: Option<i64>,
    /// After a seek: whether the first packet still has to be checked for landing too late.
    check_landing: bool,
    pub(super) seeks: u32,
    pub(super) decoded_frames: u64,
    pub(super) damaged: u64,
    pub(super) last_frame_seen: i64,
    planes: Vec<Vec<f32>>,
    /// The last decoded packet, downmixed.
    pub(super) mono: Vec<f32>,
}

impl<'a> RegionReader<'a> {
    pub(super) fn new(path: &'a Path, opened: Opened, policy: SeekPolicy) -> Self {
        let seek_gap = (SEEK_GAP_S * f64::from(opened.clock.rate)) as i64;
        RegionReader {
            path,
            format: opened.format,
            decoder: opened.decoder,
            track_id: opened.track_id,
            clock: opened.clock,
            opus_pre_skip: opened.opus_pre_skip,
            can_seek: policy == SeekPolicy::Seek,
            seek_gap,
            pos: None,
            needs_reset: false,
            last_seek: None,
            check_landing: false,
            seeks: 0,
            decoded_frames: 0,
            damaged: 0,
            last_frame_seen: 0,
            planes: Vec::new(),
            mono: Vec::new(),
        }
    }

    /// Seeks to `target` when it is far ahead and seeking is allowed and has not failed.
    pub(super) fn seek_near(&mut self, target: i64) {
        if !self.can_seek
            || target <= self.pos.unwrap_or(0) + self.seek_gap
            || self.last_seek.is_some_and(|l| target <= l)
        {
            return;
        }
        self.last_seek = Some(target);
        let ts = self.clock.frame_to_ts(target.max(0));
        let to = SeekTo::Timestamp {
            ts: Timestamp::new(ts),
            track_id: self.track_id,
        };
        match self.format.seek(SeekMode::Accurate, to) {
            Ok(_) => {
                self.decoder.reset();
                self.needs_reset = false;
                self.seeks += 1;
                self.pos = Some(target.max(0));
                self.check_landing = true;
            }
            Err(e) => {
                tracing::debug!(path = %self.path.display(), error = %e, "seek failed: reading on");
                self.can_seek = false;
            }
        }
    }

    /// A damaged packet: counted, an error once there are too many.
    fn damaged_packet(&mut self) -> Result<(), DecodeError> {
        self.damaged += 1;
        if self.damaged > MAX_DAMAGED_PACKETS {
            return Err(DecodeError::Damaged(self.damaged));
        }
        Ok(())
    }

    /// The next packet of the track; `None` at the end of the stream.
    pub(super) fn next_packet(&mut self) -> Result<Option<Packet>, DecodeError> {
        loop {
            let packet = match self.format.next_packet() {
                Ok(Some(p)) => p,
                Ok(None) => return Ok(None),
                Err(SymError::IoError(e)) if e.kind() == ErrorKind::UnexpectedEof => {
                    return Ok(None);
                }
                // A chained stream: the first part is enough.
                Err(SymError::ResetRequired) => return Ok(None),
                Err(SymError::DecodeError(_)) | Err(SymError::IoError(_)) => {
                    self.damaged_packet()?;
                    continue;
                }
                Err(e) => return Err(DecodeError::Stream(e.to_string())),
            };
            if packet.track_id == self.track_id {
                return Ok(Some(packet));
            }
        }
    }

    /// After a seek, a first packet starting past `need` (symphonia's Matroska reader can land
    /// a cluster late): seeking stops and the stream is read from the start instead (decoding
    /// only near regions). True when it rewound.
    pub(super) fn rewound_after_late_landing(
        &mut self,
        p0: i64,
        need: i64,
    ) -> Result<bool, DecodeError> {
        if !std::mem::take(&mut self.check_landing) || p0 <= need {
            return Ok(false);
        }
        let rate = f64::from(self.clock.rate);
        tracing::debug!(
            path = %self.path.display(),
            landed_s = p0 as f64 / rate,
            needed_s = need as f64 / rate,
            "seek landed late: reading from the start"
        );
        self.can_seek = false;
        let to = SeekTo::Timestamp {
            ts: Timestamp::new(0),
            track_id: self.track_id,
        };
        self.format.seek(SeekMode::Accurate, to).map_err(|e| {
            DecodeError::Stream(format!(
                "a seek landed past {:.1} s and the stream cannot rewind: {e}",
                need as f64 / rate
            ))
        })?;
        self.decoder.reset();
        self.needs_reset = false;
        self.pos = Some(0);
        Ok(true)
    }

    /// A packet ending at `end` passed without decoding.
    pub(super) fn skip_to(&mut self, end: i64) {
        self.needs_reset = true;
        self.pos = Some(end);
    }

    /// Decodes `packet` (starting at frame `p0`, `p_len` frames long) into `self.mono`; returns
    /// the frame its audio really starts at, or `None` for a damaged or empty packet.
    pub(super) fn decode_mono(
        &mut self,
        packet: &Packet,
        p0: i64,
        p_len: i64,
    ) -> Result<Option<i64>, DecodeError> {
        if std::mem::take(&mut self.needs_reset) {
            self.decoder.reset();
        }
        let buf = match self.decoder.decode(packet) {
            Ok(b) => b,
            Err(SymError::DecodeError(_)) | Err(SymError::IoError(_)) => {
                self.damaged_packet()?;
                return Ok(None);
            }
            Err(SymError::ResetRequired) => {
                self.decoder.reset();
                return Ok(None);
            }
            Err(e) => return Err(DecodeError::Stream(e.to_string())),
        };
        let frames = buf.frames();
        if frames == 0 {
            return Ok(None);
        }
        // Opus: timestamps include the pre-skip, and libopus drops it from the front of the
        // first packet it decodes (which is then shorter than its duration).
        let p0 = match self.opus_pre_skip {
            Some(skip) => p0 - skip + (p_len - frames as i64).max(0),
            None => p0,
        };
        if buf.spec().rate() != self.clock.rate {
            return Err(DecodeError::Stream(format!(
                "sample rate changes mid-stream ({} → {} Hz)",
                self.clock.rate,
                buf.spec().rate()
            )));
        }
        self.decoded_frames += frames as u64;
        buf.copy_to_vecs_planar::<f32>(&mut self.planes);
        let channels = self.planes.len().max(1);
        self.mono.clear();
        self.mono.resize(frames, 0.0);
        for plane in &self.planes {
            for (m, s) in self.mono.iter_mut().zip(plane.iter()) {
                *m += *s;
            }
        }
        let scale = 1.0 / channels as f32;
        for m in &mut self.mono {
            *m = if m.is_finite() { *m * scale } else { 0.0 };
        }
        let p_end = p0 + frames as i64;
        self.pos = Some(p_end);
        self.last_frame_seen = self.last_frame_seen.max(p_end);
        Ok(Some(p0))
    }
}
