//! Frames from videos: H.264 in MP4 (the format of FF++, DFDC, Celeb-DF), demuxed by the `mp4`
//! crate and decoded by Cisco's OpenH264 (the `openh264` crate builds it from its bundled
//! source), sampled uniformly as DeepfakeBench does (32 frames by default). Other containers
//! and codecs go through the system's `ffmpeg` and `ffprobe` where they are installed (`ffmpeg`
//! module); without them they are a clear error naming what to install.
//!
//! Frames are handed to the caller one at a time, so memory holds one decoded frame whatever
//! the video's length; every frame up to the last sampled one is decoded (a P-frame needs the
//! ones before it).
use std::path::Path;

use crate::clip::preprocess::{check_size, RgbImage};
use crate::{Error, Result};

pub mod ffmpeg;

/// Largest compressed frame accepted (a 1080p I-frame is well under 1 MB).
pub const MAX_SAMPLE_BYTES: u32 = 64 << 20;

/// What a video holds.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct VideoInfo {
    /// Frame width in pixels.
    pub width: usize,
    /// Frame height in pixels.
    pub height: usize,
    /// Frames in the video track.
    pub frames: usize,
    /// Frames per second (from the track's timing; 0 when it does not say).
    pub fps: f64,
}

/// One sampled frame.
pub struct Frame {
    /// Its index in display order, from 0.
    pub index: usize,
    /// Its time from the start, in seconds (index / fps).
    pub time_s: f64,
    /// The decoded frame.
    pub image: RgbImage,
}

/// Whether `path` names a video sd2 reads (by its extension).
pub fn is_video(path: &Path) -> bool {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    matches!(ext.as_str(), "mp4" | "m4v" | "mov" | "mkv" | "webm" | "avi")
}

/// `n` frame indices spread evenly over `frames` (both ends included, as `np.linspace`
/// rounded down — DeepfakeBench's sampling); all of them when there are fewer.
pub fn uniform_indices(frames: usize, n: usize) -> Vec<usize> {
    if frames <= n {
        return (0..frames).collect();
    }
    if n == 1 {
        return vec![0];
    }
    (0..n).map(|k| k * (frames - 1) / (n - 1)).collect()
}

fn fail(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Media(format!("{}: {msg}", path.display()))
}

/// The video's facts and `n` uniformly sampled frames, each handed to `each` in order as soon
/// as it is decoded (`each` may stop the reading by returning an error). H.264 in MP4 is
/// decoded here; anything else by `ffmpeg` (see the `ffmpeg` module), or an error naming what
/// to install when it is not there.
pub fn sample_frames(
    path: &Path,
    n: usize,
    mut each: impl FnMut(&VideoInfo, Frame) -> Result<()>,
) -> Result<VideoInfo> {
    match sample_mp4(path, n, &mut each)? {
        Ok(info) => Ok(info),
        Err(why) => ffmpeg::sample_frames(path, n, &why, each),
    }
}

/// `sample_frames` by the built-in decoder: `Ok(Err(why))` when the file is not H.264 in MP4
/// (found before any frame is handed over).
fn sample_mp4(
    path: &Path,
    n: usize,
    each: &mut dyn FnMut(&VideoInfo, Frame) -> Result<()>,
) -> Result<std::result::Result<VideoInfo, String>> {
    let file = std::fs::File::open(path).map_err(|e| fail(path, e))?;
    let size = file.metadata().map_err(|e| fail(path, e))?.len();
    // The mp4 crate trusts some of what it reads (it has `unwrap`s on malformed tables): a
    // panic inside it is this file's error, not the process's end.
    let guarded = |f: &mut dyn FnMut() -> Result<()>| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
            .unwrap_or_else(|_| Err(fail(path, "malformed MP4 (the demuxer gave up)")))
    };
    let mut demux = None;
    let mut why_not = None;
    guarded(&mut || {
        let reader = std::io::BufReader::new(file.try_clone().map_err(|e| fail(path, e))?);
        match mp4::Mp4Reader::read_header(reader, size) {
            Ok(d) => demux = Some(d),
            Err(e) => why_not = Some(format!("not an MP4 file ({e})")),
        }
        Ok(())
    })?;
    if let Some(why) = why_not {
        return Ok(Err(why));
    }
    let Some(mut demux) = demux else {
        return Err(fail(path, "unreadable MP4"));
    };
    let mut tracks: Vec<&mp4::Mp4Track> = demux
        .tracks()
        .values()
        .filter(|t| matches!(t.track_type(), Ok(mp4::TrackType::Video)))
        .collect();
    tracks.sort_by_key(|t| t.track_id());
    let Some(track) = tracks.first() else {
        return Err(fail(path, "no video track"));
    };
    let avc1 = match (&track.trak.mdia.minf.stbl.stsd.avc1, track.media_type()) {
        (Some(a), _) => a,
        (None, Ok(t)) => return Ok(Err(format!("its video is {t}, not H.264"))),
        (None, Err(_)) => return Ok(Err("its video codec is not H.264".into())),
    };
    if !track.trafs.is_empty() || demux.is_fragmented() {
        return Ok(Err("a fragmented MP4".into()));
    }
    let (w, h) = (avc1.width as u32, avc1.height as u32);
    check_size(w, h).map_err(|e| fail(path, e))?;
    let track_id = track.track_id();
    let stsz = &track.trak.mdia.minf.stbl.stsz;
    let frames = track.sample_count() as usize;
    let (fixed_size, sizes) = (stsz.sample_size, stsz.sample_sizes.clone());
    let sample_size = |i: usize| -> u32 {
        if fixed_size > 0 {
            fixed_size
        } else {
            sizes.get(i).copied().unwrap_or(u32::MAX)
        }
    };
    // From the media header, not `Mp4Track::frame_rate`, which divides by a timescale the
    // file may give as 0.
    let mdhd = &track.trak.mdia.mdhd;
    let fps = if mdhd.timescale > 0 && mdhd.duration > 0 {
        frames as f64 * mdhd.timescale as f64 / mdhd.duration as f64
    } else {
        0.0
    };
    let info = VideoInfo {
        width: w as usize,
        height: h as usize,
        frames,
        fps: if fps.is_finite() && fps > 0.0 {
            fps
        } else {
            0.0
        },
    };
    if frames == 0 {
        return Err(fail(path, "the video track has no frames"));
    }
    let nal_len = avc1.avcc.length_size_minus_one as usize + 1;
    let mut headers = vec![];
    for nal in avc1
        .avcc
        .sequence_parameter_sets
        .iter()
        .chain(&avc1.avcc.picture_parameter_sets)
    {
        headers.extend_from_slice(&[0, 0, 0, 1]);
        headers.extend_from_slice(&nal.bytes);
    }
    let wanted = uniform_indices(frames, n.max(1));
    let last = *wanted.last().unwrap_or(&0);
    // No flush after each frame: with B-frames a picture may only come out after later ones
    // are in (flushing early loses the reference it needs).
    let mut decoder = openh264::decoder::Decoder::with_api_config(
        openh264::OpenH264API::from_source(),
        openh264::decoder::DecoderConfig::new()
            .flush_after_decode(openh264::decoder::Flush::NoFlush),
    )
    .map_err(|e| fail(path, format!("H.264 decoder: {e}")))?;
    let mut annexb = Vec::new();
    // Frames come out of the decoder in display order; `shown` counts them.
    let mut shown = 0usize;
    let mut next_wanted = 0usize;
    let mut emit = |yuv: &openh264::decoder::DecodedYUV,
                    shown: &mut usize,
                    next_wanted: &mut usize|
     -> Result<()> {
        use openh264::formats::YUVSource;
        let index = *shown;
        *shown += 1;
        if wanted.get(*next_wanted) != Some(&index) {
            return Ok(());
        }
        *next_wanted += 1;
        let (fw, fh) = yuv.dimensions();
        if (fw, fh) != (info.width, info.height) {
            return Err(fail(
                path,
                format!(
                    "frame {index} is {fw}x{fh}, the track says {}x{}",
                    info.width, info.height
                ),
            ));
        }
        let mut rgb = vec![0u8; fw * fh * 3];
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| yuv.write_rgb8(&mut rgb)))
            .map_err(|_| fail(path, format!("frame {index}: not 4:2:0 video")))?;
        let time_s = if info.fps > 0.0 {
            index as f64 / info.fps
        } else {
            0.0
        };
        each(
            &info,
            Frame {
                index,
                time_s,
                image: RgbImage::new(fw, fh, rgb)?,
            },
        )
    };
    for i in 0..frames {
        if next_wanted >= wanted.len() || shown > last {
            break;
        }
        let bytes = sample_size(i);
        if bytes > MAX_SAMPLE_BYTES || bytes as u64 > size {
            return Err(fail(
                path,
                format!("frame {i} claims {bytes} bytes (the limit is {MAX_SAMPLE_BYTES})"),
            ));
        }
        let mut sample = None;
        guarded(&mut || {
            sample = demux
                .read_sample(track_id, i as u32 + 1)
                .map_err(|e| fail(path, format!("frame {i}: {e}")))?;
            Ok(())
        })?;
        let Some(sample) = sample else {
            return Err(fail(path, format!("frame {i} is missing")));
        };
        annexb.clear();
        if i == 0 {
            annexb.extend_from_slice(&headers);
        }
        let mut rest: &[u8] = &sample.bytes;
        while !rest.is_empty() {
            if rest.len() < nal_len {
                return Err(fail(path, format!("frame {i}: truncated NAL length")));
            }
            let len = rest[..nal_len]
                .iter()
                .fold(0usize, |a, b| (a << 8) | *b as usize);
            let Some(nal) = rest.get(nal_len..nal_len + len) else {
                return Err(fail(
                    path,
                    format!("frame {i}: a NAL unit runs past the frame"),
                ));
            };
            annexb.extend_from_slice(&[0, 0, 0, 1]);
            annexb.extend_from_slice(nal);
            rest = &rest[nal_len + len..];
        }
        match decoder.decode(&annexb) {
            Ok(Some(yuv)) => emit(&yuv, &mut shown, &mut next_wanted)?,
            Ok(None) => {}
            Err(e) => return Err(fail(path, format!("frame {i}: cannot decode: {e}"))),
        }
    }
    if next_wanted < wanted.len() {
        let rest = decoder
            .flush_remaining()
            .map_err(|e| fail(path, format!("cannot decode the last frames: {e}")))?;
        for yuv in &rest {
            emit(yuv, &mut shown, &mut next_wanted)?;
            if next_wanted >= wanted.len() {
                break;
            }
        }
    }
    if next_wanted < wanted.len() {
        return Err(fail(
            path,
            format!(
                "only {shown} of its {frames} frames could be decoded (frame {} was sampled)",
                wanted[next_wanted]
            ),
        ));
    }
    Ok(Ok(info))
}
