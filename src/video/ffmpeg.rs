//! Videos the built-in decoder does not read (WebM, MKV, AVI, MOV with other codecs, fragmented
//! MP4…), sampled through the system's `ffmpeg` and `ffprobe`: `ffprobe` gives the size, the
//! frame count (decoded frames, not packets: an interlaced stream has two per frame) and the
//! rate; `ffmpeg` decodes, keeps only the sampled frames (its `select`
//! filter) and pipes them as raw RGB, one frame at a time, so memory holds one frame. Where the
//! tools are not installed, the error says what the file is and what to install.
//!
//! `SD2_FFMPEG` and `SD2_FFPROBE` name the programs (default: `ffmpeg` and `ffprobe` on `PATH`);
//! `SD2_FFMPEG` alone also finds an `ffprobe` beside it.
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{fail, uniform_indices, Frame, VideoInfo};
use crate::clip::preprocess::{check_size, RgbImage};
use crate::{Error, Result};

/// The programs to run: (ffmpeg, ffprobe).
fn programs() -> (PathBuf, PathBuf) {
    let ffmpeg = std::env::var_os("SD2_FFMPEG").map(PathBuf::from);
    let ffprobe = std::env::var_os("SD2_FFPROBE")
        .map(PathBuf::from)
        .or_else(|| {
            let beside = ffmpeg.as_ref()?.with_file_name("ffprobe");
            beside.exists().then_some(beside)
        })
        .unwrap_or_else(|| "ffprobe".into());
    (ffmpeg.unwrap_or_else(|| "ffmpeg".into()), ffprobe)
}

fn not_installed(path: &Path, why: &str, program: &Path) -> Error {
    fail(
        path,
        format!(
            "{why}; sd2 decodes H.264 in MP4 itself and other videos with ffmpeg, but `{}` is \
             not installed (Debian/Ubuntu: `apt install ffmpeg`; or convert the video with \
             `ffmpeg -i IN -c:v libx264 OUT.mp4`)",
            program.display()
        ),
    )
}

/// Runs `cmd`, mapping "no such program" to `not_installed`.
fn spawn(cmd: &mut Command, path: &Path, why: &str, program: &Path) -> Result<std::process::Child> {
    cmd.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
            not_installed(path, why, program)
        }
        _ => fail(path, format!("cannot run {}: {e}", program.display())),
    })
}

/// The last `max` bytes of what `r` writes, read on a thread (so a chatty program cannot fill
/// its pipe and stall).
fn tail_of(mut r: impl Read + Send + 'static, max: usize) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut keep: Vec<u8> = vec![];
        let mut buf = [0u8; 4096];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            keep.extend_from_slice(&buf[..n]);
            if keep.len() > 2 * max {
                keep.drain(..keep.len() - max);
            }
        }
        // The last few lines say what went wrong; the ones before repeat it.
        last_lines(
            &String::from_utf8_lossy(&keep[keep.len().saturating_sub(max)..]),
            3,
        )
    })
}

/// The last `n` lines of a program's messages, on one line.
fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.trim().lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" / ")
}

/// `num/den` (or a plain number) as frames per second; 0 when it does not say.
fn parse_rate(s: &str) -> f64 {
    let r = match s.split_once('/') {
        Some((a, b)) => match (a.trim().parse::<f64>(), b.trim().parse::<f64>()) {
            (Ok(a), Ok(b)) if b > 0.0 => a / b,
            _ => 0.0,
        },
        None => s.trim().parse().unwrap_or(0.0),
    };
    if r.is_finite() && r > 0.0 {
        r
    } else {
        0.0
    }
}

/// The first video stream's facts from `ffprobe -show_entries` output (`key=value` lines).
fn parse_probe(out: &str) -> std::result::Result<VideoInfo, String> {
    let get = |key: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(str::trim)
            .unwrap_or("")
            .to_string()
    };
    let (w, h) = (get("width"), get("height"));
    let (w, h) = match (w.parse::<usize>(), h.parse::<usize>()) {
        (Ok(w), Ok(h)) if w > 0 && h > 0 => (w, h),
        _ => return Err("ffprobe found no video stream".into()),
    };
    let frames = get("nb_read_frames")
        .parse::<usize>()
        .map_err(|_| "ffprobe could not count its frames".to_string())?;
    let mut fps = parse_rate(&get("avg_frame_rate"));
    if fps == 0.0 {
        fps = parse_rate(&get("r_frame_rate"));
    }
    Ok(VideoInfo {
        width: w,
        height: h,
        frames,
        fps,
    })
}

/// `video::sample_frames` through ffmpeg, for a file the built-in decoder refused for `why`.
pub fn sample_frames(
    path: &Path,
    n: usize,
    why: &str,
    mut each: impl FnMut(&VideoInfo, Frame) -> Result<()>,
) -> Result<VideoInfo> {
    let (ffmpeg, ffprobe) = programs();
    let mut probe = spawn(
        Command::new(&ffprobe)
            .args(["-v", "error", "-select_streams", "v:0", "-count_frames"])
            .args([
                "-show_entries",
                "stream=width,height,avg_frame_rate,r_frame_rate,nb_read_frames",
            ])
            .args(["-of", "default=noprint_wrappers=1"])
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
        path,
        why,
        &ffprobe,
    )?;
    // Both pipes read at once and bounded: a damaged file can make ffprobe say a lot.
    let errors = probe.stderr.take().map(|e| tail_of(e, 2000));
    let mut out = vec![];
    if let Some(o) = probe.stdout.take() {
        o.take(64 << 10).read_to_end(&mut out).ok();
    }
    let status = probe
        .wait()
        .map_err(|e| fail(path, format!("ffprobe: {e}")))?;
    let errors = errors.and_then(|h| h.join().ok()).unwrap_or_default();
    if !status.success() {
        return Err(fail(
            path,
            format!("{why}, and ffprobe cannot read it either: {errors}"),
        ));
    }
    // ffprobe decoded every frame to count them; what it complained of is damage (a cut file,
    // corrupt frames) that would be judged on whatever frames survived.
    if !errors.is_empty() {
        return Err(fail(
            path,
            format!("{why}; ffprobe finds it damaged: {errors}"),
        ));
    }
    let info = parse_probe(&String::from_utf8_lossy(&out)).map_err(|e| fail(path, e))?;
    check_size(info.width as u32, info.height as u32).map_err(|e| fail(path, e))?;
    if info.frames == 0 {
        return Err(fail(path, "the video track has no frames"));
    }
    let wanted = uniform_indices(info.frames, n.max(1));
    let select = wanted
        .iter()
        .map(|i| format!("eq(n\\,{i})"))
        .collect::<Vec<_>>()
        .join("+");
    // FFmpeg ≥ 5.1 names the frame-timing option `-fps_mode`, older ones `-vsync`; either way
    // each selected frame once, none repeated to keep a rate.
    let mut emitted = 0usize;
    for sync in ["-fps_mode", "-vsync"] {
        match decode(
            &ffmpeg,
            path,
            why,
            &info,
            &wanted,
            &select,
            sync,
            &mut emitted,
            &mut each,
        ) {
            Err(Error::Media(m))
                if emitted == 0 && sync == "-fps_mode" && m.contains("fps_mode") =>
            {
                continue
            }
            r => return r.map(|()| info),
        }
    }
    Err(fail(path, "ffmpeg refused both -fps_mode and -vsync"))
}

/// One ffmpeg run handing the `wanted` frames (chosen by the `select` expression) to `each`.
#[allow(clippy::too_many_arguments)]
fn decode(
    ffmpeg: &Path,
    path: &Path,
    why: &str,
    info: &VideoInfo,
    wanted: &[usize],
    select: &str,
    sync: &str,
    emitted: &mut usize,
    each: &mut impl FnMut(&VideoInfo, Frame) -> Result<()>,
) -> Result<()> {
    // Frames as stored (no rotation applied), so they have ffprobe's size; scaled to it should
    // a stream change size midway (Matroska allows it), so every frame is the size read.
    let filter = format!("select={select},scale={}:{}", info.width, info.height);
    let mut child = spawn(
        Command::new(ffmpeg)
            .args(["-v", "error", "-nostdin", "-noautorotate", "-i"])
            .arg(path)
            .args(["-map", "0:v:0", "-vf", &filter, sync, "passthrough"])
            .args(["-pix_fmt", "rgb24", "-f", "rawvideo", "-"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
        path,
        why,
        ffmpeg,
    )?;
    let errors = child.stderr.take().map(|e| tail_of(e, 2000));
    let result = (|| -> Result<()> {
        let mut out = child
            .stdout
            .take()
            .ok_or_else(|| fail(path, "ffmpeg: no output pipe"))?;
        for (k, &index) in wanted.iter().enumerate() {
            let mut rgb = vec![0u8; info.width * info.height * 3];
            if let Err(e) = out.read_exact(&mut rgb) {
                return Err(fail(
                    path,
                    format!(
                        "ffmpeg gave {k} of the {} sampled frames (frame {index} is missing: {e})",
                        wanted.len()
                    ),
                ));
            }
            let time_s = if info.fps > 0.0 {
                index as f64 / info.fps
            } else {
                0.0
            };
            let image = RgbImage::new(info.width, info.height, rgb)?;
            *emitted += 1;
            each(
                info,
                Frame {
                    index,
                    time_s,
                    image,
                },
            )?;
        }
        Ok(())
    })();
    // The frames after the last sampled one are not needed.
    child.kill().ok();
    child.wait().ok();
    let errors = errors.and_then(|h| h.join().ok()).unwrap_or_default();
    match result {
        Err(Error::Media(m)) if !errors.is_empty() => {
            Err(Error::Media(format!("{m}; ffmpeg said: {errors}")))
        }
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_output_is_parsed() {
        let out = "width=1280\nheight=720\nr_frame_rate=30000/1001\navg_frame_rate=0/0\nnb_read_frames=300\n";
        let v = parse_probe(out).unwrap();
        assert_eq!((v.width, v.height, v.frames), (1280, 720, 300));
        assert!((v.fps - 29.97).abs() < 0.01, "{}", v.fps);
        assert!(parse_probe("width=0\nheight=0\n").is_err());
        assert!(parse_probe("width=640\nheight=480\nnb_read_frames=N/A\n").is_err());
        assert_eq!(parse_rate("25"), 25.0);
        assert_eq!(parse_rate("1/0"), 0.0);
    }
}
