"""Reference for sd2's aligned face crops (src/faces/align.rs): DeepfakeBench's alignment of
five landmarks onto ArcFace's template (scikit-image SimilarityTransform + OpenCV warpAffine),
on tests/fixtures/faces/astronaut.jpg with five fixed points.

Writes tests/fixtures/faces/aligned_astronaut.png and align_reference.json.
Run with the face-fixture venv (see face_fixtures.py): python scripts/reference/align_reference.py
"""
import json
import pathlib

import cv2
import numpy as np
from skimage import transform as trans

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures" / "faces"

# Left eye, right eye, nose tip, left and right mouth corner on the astronaut's face (by eye;
# the right eye a little higher, so the transform rotates).
POINTS = [[205.0, 108.0], [247.0, 103.0], [228.0, 128.0], [211.0, 150.0], [245.0, 146.0]]
OUT, SCALE = 256, 1.3


def template(out, scale):
    dst = np.array([[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366],
                    [33.5493, 92.3655], [62.7299, 92.2041]], dtype=np.float32)
    dst[:, 0] += 8.0
    dst[:, 0] = dst[:, 0] * out / 112
    dst[:, 1] = dst[:, 1] * out / 112
    margin = out * (scale - 1) / 2.0
    dst += margin
    dst *= out / (out + 2 * margin)
    return dst


def main():
    img = cv2.cvtColor(cv2.imread(str(FIX / "astronaut.jpg")), cv2.COLOR_BGR2RGB)
    src = np.array(POINTS, dtype=np.float32)
    dst = template(OUT, SCALE)
    tform = trans.SimilarityTransform()
    tform.estimate(src, dst)
    m = tform.params[0:2, :]
    warped = cv2.warpAffine(img, m, (OUT, OUT))
    cv2.imwrite(str(FIX / "aligned_astronaut.png"), cv2.cvtColor(warped, cv2.COLOR_RGB2BGR))
    ref = {"points": POINTS, "out": OUT, "scale": SCALE,
           "template": dst.astype(float).tolist(), "matrix": m.tolist()}
    (FIX / "align_reference.json").write_text(json.dumps(ref, indent=1) + "\n")
    print(json.dumps(ref))


if __name__ == "__main__":
    main()
