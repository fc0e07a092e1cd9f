"""Face-detection fixtures for tests/faces.rs and the reference boxes they are checked against.

Writes tests/fixtures/faces/:
  astronaut.jpg      scikit-image's `astronaut` (Eileen Collins, NASA, public domain), 512x512
  grace_hopper.jpg   matplotlib's sample `grace_hopper.jpg` (US Navy, public domain), 512x600
  group.jpg          both side by side on a grey canvas, Grace Hopper at 0.6x (two faces, two sizes)
  chelsea.jpg        scikit-image's `chelsea` (a cat: no human face), 451x300
  clip.mp4           H.264 1920x1080, 48 frames at 24 fps: the astronaut photo drifting across
                     a grey frame (one face, moving), encoded by imageio-ffmpeg's ffmpeg
  clip.webm          the first 12 frames of the same clip as VP9 (a codec sd2 does not decode
                     itself)
  reference.json     per image: MediaPipe face detection boxes (full-range model, the reference,
                     and short-range), OpenCV Haar boxes, in pixels [x0, y0, x1, y1]; per video
                     frame: the face's true box (known from how the clip was drawn)

The venv: python3 -m venv V && V/bin/pip install "mediapipe==0.10.14" scikit-image matplotlib \
          imageio-ffmpeg opencv-python-headless
Run:      V/bin/python scripts/reference/face_fixtures.py
"""
import json
import os
import subprocess

import cv2
import imageio_ffmpeg
import matplotlib
import mediapipe as mp
import numpy as np
import skimage.data
from PIL import Image

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "faces")


def mediapipe_boxes(rgb, model):
    h, w = rgb.shape[:2]
    fd = mp.solutions.face_detection.FaceDetection(model_selection=model, min_detection_confidence=0.5)
    with fd:
        r = fd.process(rgb)
    out = []
    for d in r.detections or []:
        b = d.location_data.relative_bounding_box
        out.append({
            "box": [round(b.xmin * w, 1), round(b.ymin * h, 1),
                    round((b.xmin + b.width) * w, 1), round((b.ymin + b.height) * h, 1)],
            "score": round(float(d.score[0]), 3),
        })
    return sorted(out, key=lambda f: f["box"][0])


def haar_boxes(rgb):
    path = os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml")
    c = cv2.CascadeClassifier(path)
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    found = c.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5, minSize=(30, 30))
    return sorted([[int(x), int(y), int(x + w), int(y + h)] for (x, y, w, h) in found])


def save_jpeg(name, rgb):
    Image.fromarray(rgb).save(os.path.join(OUT, name), quality=90)
    # What the tests decode is the JPEG, so the references are computed on it too.
    return np.array(Image.open(os.path.join(OUT, name)).convert("RGB"))


def main():
    os.makedirs(OUT, exist_ok=True)
    hopper_path = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data",
                               "grace_hopper.jpg")
    astronaut = skimage.data.astronaut()
    hopper = np.array(Image.open(hopper_path).convert("RGB"))
    canvas = np.full((600, 900, 3), 128, np.uint8)
    canvas[40:552, 20:532] = astronaut
    small = np.array(Image.fromarray(hopper).resize((307, 360), Image.BICUBIC))
    canvas[200:560, 570:877] = small
    images = {
        "astronaut.jpg": astronaut,
        "grace_hopper.jpg": hopper,
        "group.jpg": canvas,
        "chelsea.jpg": skimage.data.chelsea(),
    }
    ref = {"images": {}, "video": {}}
    for name, rgb in images.items():
        rgb = save_jpeg(name, rgb)
        ref["images"][name] = {
            "size": [rgb.shape[1], rgb.shape[0]],
            "mediapipe_full_range": mediapipe_boxes(rgb, 1),
            "mediapipe_short_range": mediapipe_boxes(rgb, 0),
            "opencv_haar": haar_boxes(rgb),
        }

    # The video: the astronaut photo scaled 1.5x (768 px) drifting right and down.
    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    w, h, n = 1920, 1080, 48
    face = ref["images"]["astronaut.jpg"]["mediapipe_full_range"][0]["box"]
    big = np.array(Image.fromarray(astronaut).resize((768, 768), Image.BICUBIC))
    frames, boxes = [], []
    for i in range(n):
        f = np.full((h, w, 3), 96, np.uint8)
        x, y = 200 + 12 * i, 100 + 3 * i
        f[y:y + 768, x:x + 768] = big
        frames.append(f)
        boxes.append([round(x + 1.5 * face[0], 1), round(y + 1.5 * face[1], 1),
                      round(x + 1.5 * face[2], 1), round(y + 1.5 * face[3], 1)])
    raw = b"".join(f.tobytes() for f in frames)
    for name, codec, count in [("clip.mp4", ["-c:v", "libx264", "-preset", "slow", "-crf", "28",
                                             "-pix_fmt", "yuv420p", "-profile:v", "high",
                                             "-movflags", "+faststart"], n),
                               ("clip.webm", ["-c:v", "libvpx-vp9", "-b:v", "300k"], 12)]:
        subprocess.run([ffmpeg, "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
                        "-s", f"{w}x{h}", "-r", "24", "-i", "-", "-frames:v", str(count), *codec,
                        os.path.join(OUT, name)],
                       input=raw, check=True)
    ref["video"]["clip.mp4"] = {"size": [w, h], "frames": n, "fps": 24,
                                "face_box_per_frame": boxes,
                                "note": "true boxes: the mediapipe full-range box of astronaut.jpg, "
                                        "scaled 1.5x and moved with the photo"}
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1)
    for name, r in ref["images"].items():
        print(name, r["mediapipe_full_range"], r["opencv_haar"])


if __name__ == "__main__":
    main()
