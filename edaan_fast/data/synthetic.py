"""Embedded two-domain re-ID data set: procedurally rendered pedestrians (numpy + PIL only).

Why it exists: the training command and the tests must run anywhere, without downloads, and
still show the effect EDAAN is about. So the data set is built around the paper's premise:

- **identity lives in the foreground** and is shared by both domains' distribution: body
  proportions (height, head size, torso length, shoulder/hip width, leg thickness), clothing
  colours (upper/lower/shoes), an upper-garment pattern (plain, horizontal stripes, vertical
  stripes, checks), lower-garment style (trousers, shorts, skirt) and accessories (hat, bag
  with strap, bag side). Source and target hold different people drawn from the same
  distribution, as in cross-domain re-ID.
- **the domain gap lives in the background**, where the paper puts it ("transform only the
  color and structure of the background"): the source domain ``S`` is a bright street (pale
  sky/facades with windows, grey pavement with tile lines); the target ``T`` is a dark indoor
  scene (navy/purple gradient, muted blue-violet columns, tiled floor with fine noise),
  under its own illumination (gain, gamma) and colour cast. The person is drawn from
  the same distribution in both domains and keeps their colours: only the per-camera tint and
  a per-image exposure jitter, the same spread in both domains, touch the whole image.
  Translating the background while preserving the person (eq. (1)'s mask) is exactly what
  closes the gap. (Cache version 2 lit the person with the domain's light too, so that the
  discriminators had a reason to want the person translated; the attention measurements that
  led to the change are in docs/attention.md. Version 3 also lit the target scene with lamp
  glows, a background detail the source domain has no counterpart for and which the cycle
  term cannot carry through a source-style image, and painted its columns in saturated
  clothing colours; the attention nets kept both as if they were people. Version 4 has no
  lamps and columns in the scene's own muted hues.)
- each domain has several cameras: a camera fixes its scene layout and a colour tint; each
  image jitters the pose (stride, arm swing), scale, position, facing (mirror) and noise.

Everything is deterministic from ``seed``: every identity, camera and image draws from its own
``numpy.random.default_rng([seed, domain, kind, ...])`` stream, so the bytes do not depend on
render order. The set is written once in the Market-1501 layout (so the Market reader serves
it) with the ground-truth foreground masks beside it::

    <cache>/<preset>_seed<seed>/
        source/bounding_box_train/0001_c1s1_000001_00.jpg   (train ids 1..n, distractors 0000)
        source/query/...  source/bounding_box_test/...
        source/masks/bounding_box_train/0001_c1s1_000001_00.png   8-bit foreground alpha
        target/...                                             same for the target domain
        .complete.json                                         written last (cache marker)

Query = one image per (test identity, camera); gallery = the rest plus pid-0 distractors.
"""

from __future__ import annotations

import colorsys
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from edaan_fast._progress import progress_bar

from .base import DatasetError, ReIDDataset, install_folder, read_mask
from .person_masks import person_mask_path
from .market_layout import MARKET_LAYOUT, MARKET_PATTERN, read_market_layout

logger = logging.getLogger(__name__)

CACHE_VERSION = 4
DOMAINS = ("source", "target")
MARKER = ".complete.json"
RENDER_CHUNK = 256  # images per parallel render task


@dataclass(frozen=True)
class SyntheticPreset:
    """Size of the rendered set (per domain)."""

    name: str
    height: int
    width: int
    num_train_ids: int
    num_test_ids: int
    num_cams: int
    images_per_cam: int
    num_distractors: int
    jpeg_quality: int = 92


PRESETS: dict[str, SyntheticPreset] = {
    "tiny": SyntheticPreset("tiny", 64, 32, num_train_ids=60, num_test_ids=40, num_cams=3,
                            images_per_cam=2, num_distractors=10),
    "small": SyntheticPreset("small", 128, 64, num_train_ids=200, num_test_ids=100,
                             num_cams=4, images_per_cam=3, num_distractors=50),
    "paper": SyntheticPreset("paper", 256, 128, num_train_ids=750, num_test_ids=750,
                             num_cams=6, images_per_cam=3, num_distractors=500),
}


@dataclass(frozen=True)
class DomainStyle:
    """What differs between the two domains (the background dominates)."""

    background: str
    gain: float  # illumination on the whole image
    gamma: float
    cast: tuple[float, float, float]  # domain colour cast
    tint_spread: float  # per-camera RGB gain spread


STYLES = {
    "source": DomainStyle("street", gain=1.0, gamma=1.0, cast=(1.0, 1.0, 1.0), tint_spread=0.05),
    "target": DomainStyle("indoor", gain=0.88, gamma=1.05, cast=(0.96, 0.98, 1.06),
                          tint_spread=0.05),
}


def default_cache_root() -> Path:
    """``$EDAAN_FAST_DATA`` if set, else ``~/.cache/edaan_fast``."""
    env = os.environ.get("EDAAN_FAST_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edaan_fast"


def resolve_preset(preset: str | SyntheticPreset) -> SyntheticPreset:
    if isinstance(preset, SyntheticPreset):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown synthetic preset {preset!r}; choices: "
                         f"{', '.join(PRESETS)}") from None


# ----------------------------------------------------------------------------- identities

def _colour(rng: np.random.Generator) -> np.ndarray:
    """A clothing colour: mostly chromatic, sometimes black/white/grey."""
    if rng.random() < 0.25:
        v = rng.choice([0.12, 0.3, 0.55, 0.85, 0.95])
        return np.full(3, v * 255, dtype=np.float32)
    h, s, v = rng.random(), rng.uniform(0.35, 0.95), rng.uniform(0.3, 0.95)
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32) * 255


@dataclass(frozen=True)
class Identity:
    """The foreground attributes that define a person (fixed across cameras)."""

    height: float
    head: float
    torso_len: float
    shoulder: float
    hip: float
    leg_w: float
    upper: np.ndarray
    upper2: np.ndarray
    pattern: str
    period: float
    lower: np.ndarray
    lower_style: str
    skin: np.ndarray
    hair: np.ndarray
    shoes: np.ndarray
    hat: np.ndarray | None
    bag: np.ndarray | None
    bag_side: int


def _identity(rng: np.random.Generator) -> Identity:
    skin_v = rng.uniform(0.35, 0.95)
    skin = np.array(colorsys.hsv_to_rgb(0.07, rng.uniform(0.3, 0.55), skin_v), np.float32) * 255
    return Identity(
        height=rng.uniform(0.76, 0.92), head=rng.uniform(0.055, 0.075),
        torso_len=rng.uniform(0.27, 0.34), shoulder=rng.uniform(0.10, 0.15),
        hip=rng.uniform(0.075, 0.11), leg_w=rng.uniform(0.032, 0.05),
        upper=_colour(rng), upper2=_colour(rng),
        pattern=str(rng.choice(["plain", "hstripes", "vstripes", "checks"], p=[.4, .25, .15, .2])),
        period=rng.uniform(0.035, 0.06), lower=_colour(rng),
        lower_style=str(rng.choice(["trousers", "shorts", "skirt"], p=[.6, .2, .2])),
        skin=skin, hair=_colour(rng) * 0.5, shoes=_colour(rng) * 0.6,
        hat=_colour(rng) if rng.random() < 0.3 else None,
        bag=_colour(rng) if rng.random() < 0.45 else None,
        bag_side=int(rng.choice([-1, 1])),
    )


# ----------------------------------------------------------------------------- drawing

def _window(shape, y0, y1, x0, x1) -> tuple[slice, slice]:
    """Pixel window covering ``[y0, y1] x [x0, x1]`` (clipped to the image)."""
    H, W = shape
    return (slice(min(max(int(np.floor(y0)), 0), H), min(max(int(np.ceil(y1)) + 1, 0), H)),
            slice(min(max(int(np.floor(x0)), 0), W), min(max(int(np.ceil(x1)) + 1, 0), W)))


def _capsule(yy, xx, y0, x0, y1, x1, r):
    """Anti-aliased coverage of a segment of radius ``r`` (circle when both ends coincide)."""
    out = np.zeros(yy.shape, np.float32)
    win = _window(yy.shape, min(y0, y1) - r - 1, max(y0, y1) + r + 1,
                  min(x0, x1) - r - 1, max(x0, x1) + r + 1)
    sy, sx = yy[win], xx[win]
    dy, dx = y1 - y0, x1 - x0
    length2 = dy * dy + dx * dx
    if length2 > 0:
        t = np.clip(((sy - y0) * dy + (sx - x0) * dx) / length2, 0.0, 1.0)
    else:
        t = 0.0
    d = np.hypot(sy - (y0 + t * dy), sx - (x0 + t * dx))
    out[win] = np.clip(r - d + 0.5, 0.0, 1.0)
    return out


def _trapezoid(yy, xx, top, bottom, cx, hw_top, hw_bottom):
    """Coverage of a vertical trapezoid centred on ``cx``."""
    out = np.zeros(yy.shape, np.float32)
    hw_max = max(hw_top, hw_bottom)
    win = _window(yy.shape, top - 1, bottom + 1, cx - hw_max - 1, cx + hw_max + 1)
    sy, sx = yy[win], xx[win]
    frac = np.clip((sy - top) / max(bottom - top, 1e-3), 0.0, 1.0)
    hw = hw_top + (hw_bottom - hw_top) * frac
    out[win] = (np.clip(hw - np.abs(sx - cx) + 0.5, 0.0, 1.0)
                * np.clip(sy - top + 0.5, 0.0, 1.0) * np.clip(bottom - sy + 0.5, 0.0, 1.0))
    return out


class _Canvas:
    def __init__(self, background: np.ndarray):
        self.rgb = background
        self.alpha = np.zeros(background.shape[:2], np.float32)

    def paint(self, cov: np.ndarray, colour, shade: np.ndarray | None = None) -> None:
        """Alpha-blend ``colour`` (RGB or a per-pixel map) with coverage ``cov``."""
        rows = np.flatnonzero(cov.any(1))
        if rows.size == 0:
            return
        cols = np.flatnonzero(cov.any(0))
        win = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        col = np.asarray(colour, np.float32)
        col = col[None, None, :] if col.ndim == 1 else col[win]
        if shade is not None:
            col = col * shade[win][..., None]
        c = cov[win]
        self.rgb[win] = self.rgb[win] * (1.0 - c[..., None]) + col * c[..., None]
        self.alpha[win] = self.alpha[win] + c * (1.0 - self.alpha[win])


def _head_and_bag(canvas: _Canvas, yy, xx, ident: Identity, h: float, top: float,
                  r_head: float, cx: float, facing: int, sw: float, shoulder_y: float,
                  hip_y: float, shade) -> None:
    """The head (hair, hat) and the bag with its strap, placed on the drawn body."""
    # head, hair, hat
    hy = top + r_head
    canvas.paint(_capsule(yy, xx, hy, cx, hy, cx, r_head), ident.skin)
    hair = _capsule(yy, xx, hy - r_head * 0.25, cx - facing * r_head * 0.15, hy - r_head * 0.25,
                    cx - facing * r_head * 0.15, r_head * 0.95) * (yy < hy - r_head * 0.1)
    canvas.paint(hair, ident.hair)
    if ident.hat is not None:
        crown = _trapezoid(yy, xx, top - r_head * 0.55, hy - r_head * 0.35, cx, r_head * 0.8,
                           r_head * 1.0)
        brim = _trapezoid(yy, xx, hy - r_head * 0.5, hy - r_head * 0.2, cx + facing * r_head * 0.4,
                          r_head * 1.4, r_head * 1.4)
        canvas.paint(np.maximum(crown, brim), ident.hat)

    # bag on one side (mirrors with the view) with its strap across the torso
    if ident.bag is not None:
        side = ident.bag_side * facing
        bx = cx + side * (sw + 0.02 * h)
        strap = _capsule(yy, xx, shoulder_y + 0.01 * h, cx - side * sw * 0.7, hip_y - 0.02 * h, bx,
                         max(0.012 * h, 0.6))
        canvas.paint(strap, ident.bag * 0.7)
        bag = _trapezoid(yy, xx, hip_y - 0.1 * h, hip_y + 0.04 * h, bx, 0.06 * h, 0.065 * h)
        canvas.paint(bag, ident.bag, shade=None)


def _person(canvas: _Canvas, yy, xx, ident: Identity, rng: np.random.Generator,
            cam_scale: float) -> None:
    H, W = canvas.alpha.shape
    h = H * ident.height * cam_scale * rng.uniform(0.93, 1.04)
    feet = H * 0.965 + rng.uniform(-0.025, 0.015) * H
    cx = W / 2 + rng.uniform(-0.07, 0.07) * W
    facing = 1 if rng.random() < 0.5 else -1  # mirror: left/right-facing views
    stride = rng.uniform(-1.0, 1.0)
    top = feet - h
    r_head = ident.head * h
    shoulder_y = top + 2.0 * r_head + 0.02 * h
    hip_y = shoulder_y + ident.torso_len * h
    sw, hw, lw = ident.shoulder * h, ident.hip * h, ident.leg_w * h
    shade = np.clip(1.0 - 0.35 * ((xx - cx) / max(sw, 1.0)) ** 2, 0.55, 1.0)

    # legs (lower garment), feet and shoes
    step = 0.09 * h * stride
    legs = []
    for side in (-1, 1):
        hx = cx + side * hw * 0.5
        fx = hx + side * step
        legs.append((hx, fx))
    leg_cov = np.maximum(*[_capsule(yy, xx, hip_y, hx, feet - lw, fx, lw) for hx, fx in legs])
    knee_y = hip_y + 0.45 * (feet - hip_y)
    if ident.lower_style == "trousers":
        canvas.paint(leg_cov, ident.lower, shade)
    else:
        canvas.paint(leg_cov, ident.skin, shade)
        if ident.lower_style == "shorts":
            upper_leg = np.maximum(*[_capsule(yy, xx, hip_y, hx, knee_y, hx + 0.45 * (fx - hx),
                                              lw * 1.15) for hx, fx in legs])
            canvas.paint(upper_leg, ident.lower, shade)
        else:
            skirt = _trapezoid(yy, xx, hip_y - 0.02 * h, knee_y + 0.04 * h, cx, hw * 1.05,
                               hw * 1.9)
            canvas.paint(skirt, ident.lower, shade)
    shoes = np.maximum(*[_capsule(yy, xx, feet - lw * 0.6, fx - facing * lw * 0.3, feet - lw * 0.6,
                                  fx + facing * lw * 1.2, lw * 0.75) for _, fx in legs])
    canvas.paint(shoes, ident.shoes)

    # torso with its pattern
    torso = _trapezoid(yy, xx, shoulder_y, hip_y, cx, sw, hw * 1.1)
    period = max(ident.period * h, 1.6)
    if ident.pattern == "plain":
        colour = ident.upper
    else:
        if ident.pattern == "hstripes":
            band = np.floor((yy - shoulder_y) / period) % 2
        elif ident.pattern == "vstripes":
            band = np.floor((xx - cx) / period) % 2
        else:
            band = (np.floor((yy - shoulder_y) / period) + np.floor((xx - cx) / period)) % 2
        colour = np.where(band[..., None] > 0, ident.upper2, ident.upper)
    canvas.paint(torso, colour, shade)

    # arms (sleeves in the upper colour, hands in skin), swinging against the legs
    arm_len = 0.36 * h
    aw = max(lw * 0.85, 0.8)
    for side in (-1, 1):
        sx = cx + side * (sw - aw * 0.6)
        swing = -side * stride * 0.12 * h
        hx, hy = sx + swing * 0.6 + side * 0.02 * h, shoulder_y + arm_len
        canvas.paint(_capsule(yy, xx, shoulder_y + aw, sx, hy - aw, hx, aw), ident.upper, shade)
        canvas.paint(_capsule(yy, xx, hy, hx, hy, hx, aw * 1.05), ident.skin)

    _head_and_bag(canvas, yy, xx, ident, h, top, r_head, cx, facing, sw, shoulder_y, hip_y,
                  shade)

def _camera(rng: np.random.Generator, style: DomainStyle) -> dict:
    """Scene layout and tint fixed per camera."""
    return {
        "tint": 1.0 + rng.uniform(-style.tint_spread, style.tint_spread, 3).astype(np.float32),
        "scale": rng.uniform(0.95, 1.03),
        "horizon": rng.uniform(0.45, 0.65),
        "hue": rng.random(),
        "blocks": rng.uniform(0, 1, (6, 4)).astype(np.float32),
        "period": rng.uniform(0.05, 0.1),
    }


def _static_background(style: DomainStyle, cam: dict, H: int, W: int, margin: int):
    """The camera's scene, ``margin`` pixels wider on each side than the image (no noise)."""
    yy, xx = np.mgrid[0:H, -margin:W + margin].astype(np.float32) + 0.5
    y = yy / H
    x = xx / W
    horizon = cam["horizon"]
    out = np.empty((*y.shape, 3), np.float32)
    if style.background == "street":
        sky_top = np.array([200, 212, 225], np.float32)
        sky_low = np.array([232, 228, 214], np.float32)
        out[:] = sky_top + (sky_low - sky_top) * np.clip(y / horizon, 0, 1)[..., None]
        for bx0, bw, bh, hue in cam["blocks"]:  # facades with windows
            x0, x1 = bx0 * 1.2 - 0.1, bx0 * 1.2 - 0.1 + 0.25 + 0.4 * bw
            y0 = horizon * (0.15 + 0.6 * bh)
            cov = ((x >= x0) & (x < x1) & (y >= y0) & (y < horizon)).astype(np.float32)
            col = np.array(colorsys.hsv_to_rgb(0.08 + 0.1 * hue, 0.18, 0.78), np.float32) * 255
            win = ((np.floor(xx / (0.12 * W)) % 2 == 0) & (np.floor(yy / (0.07 * H)) % 2 == 0))
            col_map = np.where(win[..., None], col * 0.72, col)
            out = out * (1 - cov[..., None]) + col_map * cov[..., None]
        ground = y >= horizon
        depth = np.clip((y - horizon) / max(1 - horizon, 1e-3), 0, 1)
        lines = (np.sin((depth ** 0.6) * np.pi / cam["period"]) > 0.85).astype(np.float32)
        pave = (172 - 22 * depth)[..., None] * np.array([1.0, 1.0, 0.97], np.float32)
        pave = pave - 30 * lines[..., None]
        out = np.where(ground[..., None], pave, out)
    else:  # "indoor": dark, saturated, high-frequency
        top = np.array([20, 24, 62], np.float32)
        low = np.array([58, 30, 74], np.float32)
        out[:] = top + (low - top) * y[..., None]
        for k, (bx0, bw, bh, hue) in enumerate(cam["blocks"]):  # columns in the scene's hues
            x0 = bx0 * 1.3 - 0.15
            cov = ((x >= x0) & (x < x0 + 0.05 + 0.12 * bw)).astype(np.float32)
            h_ = 0.6 + 0.15 * ((cam["hue"] + 0.35 * k + 0.1 * hue) % 1.0)  # blue to violet
            col = np.array(colorsys.hsv_to_rgb(h_, 0.3, 0.35 + 0.25 * bh), np.float32) * 255
            ridge = 0.75 + 0.25 * (np.floor(yy / (0.05 * H)) % 2)
            out = out * (1 - cov[..., None]) + (col * ridge[..., None]) * cov[..., None]
        floor = y >= horizon
        tiles = (np.floor(xx / (0.2 * W)) + np.floor(yy / (0.06 * H))) % 2
        out = np.where(floor[..., None], (30 + 35 * tiles)[..., None]
                       * np.array([0.8, 1.0, 1.1], np.float32), out)
    return np.clip(out, 0, 255)


def _background(style: DomainStyle, cam: dict, rng: np.random.Generator, H: int, W: int):
    """The camera's scene seen through a slightly shifted window, plus sensor noise."""
    margin = max(1, round(0.08 * W))
    key = ("static", H, W)
    if key not in cam:
        cam[key] = _static_background(style, cam, H, W, margin)
    shift = int(rng.integers(0, 2 * margin + 1))  # small per-image view change
    out = cam[key][:, shift:shift + W].copy()
    if style.background == "street":
        out += rng.normal(0, 3, (H, W, 1)).astype(np.float32)
    else:
        out += rng.normal(0, 14, (H, W, 3)).astype(np.float32)
    return np.clip(out, 0, 255)


def render_image(ident: Identity, style: DomainStyle, cam: dict, rng: np.random.Generator,
                 height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Render one image; returns ``(rgb uint8 [H, W, 3], foreground alpha uint8 [H, W])``."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    canvas = _Canvas(_background(style, cam, rng, height, width))
    _person(canvas, yy, xx, ident, rng, cam["scale"])
    img = np.clip(canvas.rgb / 255.0, 0, 1)
    scene = np.power(img, style.gamma) * style.gain * np.asarray(style.cast, np.float32)
    alpha = canvas.alpha[..., None]  # the domain's light and cast on the scene only
    img = alpha * img + (1.0 - alpha) * scene
    img = img * rng.uniform(0.95, 1.05) * cam["tint"]
    img = img * 255 + rng.normal(0, 2.0, img.shape)
    rgb = np.clip(np.round(img), 0, 255).astype(np.uint8)
    alpha = np.clip(np.round(canvas.alpha * 255), 0, 255).astype(np.uint8)
    return rgb, alpha


# ----------------------------------------------------------------------------- the set

def _plan(preset: SyntheticPreset, seed: int, d: int) -> list[tuple[str, int, int, int, str]]:
    """Every image of one domain: ``(split, pid, cam, k, name)``, Market-1501 naming."""
    items = []
    frame = 0
    n_train, n_test = preset.num_train_ids, preset.num_test_ids
    for pid in range(1, n_train + n_test + 1):
        rng = np.random.default_rng([seed, d, 3, pid])
        n_cams = int(rng.integers(min(2, preset.num_cams), preset.num_cams + 1))
        cams = sorted(rng.choice(preset.num_cams, n_cams, replace=False).tolist())
        for cam in cams:
            for k in range(preset.images_per_cam):
                frame += 1
                if pid <= n_train:
                    split = "bounding_box_train"
                else:
                    split = "query" if k == 0 else "bounding_box_test"
                items.append((split, pid, cam, k, f"{pid:04d}_c{cam + 1}s1_{frame:06d}_{k:02d}"))
    for j in range(preset.num_distractors):
        frame += 1
        cam = j % preset.num_cams
        items.append(("bounding_box_test", 0, cam, j, f"0000_c{cam + 1}s1_{frame:06d}_00"))
    return items


def _render_items(out: Path, d: int, preset: SyntheticPreset, seed: int,
                  chunk: list[int]) -> int:
    """Render the images ``chunk`` (indices into the domain's plan); safe to run in parallel."""
    style = STYLES[DOMAINS[d]]
    cams = [_camera(np.random.default_rng([seed, d, 1, c]), style) for c in range(preset.num_cams)]
    items = _plan(preset, seed, d)
    identities: dict[int, Identity] = {}
    for index in chunk:
        split, pid, cam, _, name = items[index]
        if pid == 0:  # distractor: a person of its own, never seen again
            ident = _identity(np.random.default_rng([seed, d, 4, index]))
        else:
            if pid not in identities:
                identities[pid] = _identity(np.random.default_rng([seed, d, 0, pid]))
            ident = identities[pid]
        rng = np.random.default_rng([seed, d, 2, index])
        rgb, alpha = render_image(ident, style, cams[cam], rng, preset.height, preset.width)
        Image.fromarray(rgb).save(out / split / f"{name}.jpg", quality=preset.jpeg_quality)
        Image.fromarray(alpha).save(out / "masks" / split / f"{name}.png")
    return len(chunk)


def _render_domain(out: Path, domain: str, preset: SyntheticPreset, seed: int, bar,
                   workers: int) -> int:
    d = DOMAINS.index(domain)
    n = len(_plan(preset, seed, d))
    for split in ("bounding_box_train", "query", "bounding_box_test"):
        (out / split).mkdir(parents=True, exist_ok=True)
        (out / "masks" / split).mkdir(parents=True, exist_ok=True)
    # contiguous chunks keep each identity's images together (its attributes are drawn once)
    size = RENDER_CHUNK
    chunks = [list(range(i, min(i + size, n))) for i in range(0, n, size)]
    if workers <= 1 or len(chunks) == 1:
        for chunk in chunks:
            bar.update(_render_items(out, d, preset, seed, chunk))
        return n
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=workers) as pool:
        jobs = [pool.submit(_render_items, out, d, preset, seed, c) for c in chunks]
        for job in as_completed(jobs):
            bar.update(job.result())
    return n


def _marker_matches(folder: Path, preset: SyntheticPreset, seed: int) -> bool:
    marker = folder / MARKER
    if not marker.is_file():
        return False
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return (data.get("version") == CACHE_VERSION and data.get("seed") == seed
            and data.get("preset") == asdict(preset))


def render(root: str | Path | None = None, preset: str | SyntheticPreset = "tiny",
           seed: int = 0, force: bool = False, workers: int | None = None) -> Path:
    """Render the two-domain set once and return its folder ``<root>/<preset>_seed<seed>``.

    A complete cache (its marker file matches version, preset and seed) is reused. Otherwise
    the set is rendered into a temporary sibling folder, the marker is written last, and the
    folder is renamed into place, so an interrupted render never looks complete and concurrent
    renders (e.g. one per DDP rank) do not corrupt each other. ``workers`` processes render in
    parallel (default: one for ``tiny``, every CPU core otherwise); the bytes do not depend on it.
    """
    preset = resolve_preset(preset)
    if workers is None:
        workers = 1 if preset.name == "tiny" else (os.cpu_count() or 1)
    root = Path(root).expanduser() if root is not None else default_cache_root()
    final = root / f"{preset.name}_seed{seed}"
    if not force and _marker_matches(final, preset, seed):
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(f"cannot create the synthetic data cache {root}: "
                           f"{exc.strerror or exc}") from None
    tmp = root / f".{final.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    total = sum(len(_plan(preset, seed, d)) for d in range(len(DOMAINS)))
    logger.info("rendering synthetic preset %r (seed %d, %d images) into %s",
                preset.name, seed, total, final)
    start = time.perf_counter()
    with progress_bar(total=total, desc=f"synthetic {preset.name}", unit="img") as bar:
        counts = {dom: _render_domain(tmp / dom, dom, preset, seed, bar, workers)
                  for dom in DOMAINS}
    (tmp / MARKER).write_text(json.dumps({
        "version": CACHE_VERSION, "seed": seed, "preset": asdict(preset), "counts": counts,
        "seconds": round(time.perf_counter() - start, 2)}, indent=1))
    # another process may have finished the same set meanwhile: its complete copy is kept
    install_folder(tmp, final, keep=lambda f: not force and _marker_matches(f, preset, seed))
    return final


def synthetic(root: str | Path | None = None, domain: str = "source",
              preset: str | SyntheticPreset = "tiny", seed: int = 0) -> ReIDDataset:
    """Render (if needed) and read one domain of the synthetic set."""

    if domain not in DOMAINS:
        raise ValueError(f"synthetic: domain must be one of {DOMAINS}, got {domain!r}")
    folder = render(root, preset, seed)
    dataset = read_market_layout(folder / domain, f"synthetic-{domain}", ("",), MARKET_PATTERN,
                                 MARKET_LAYOUT)
    dataset.info.update({"preset": resolve_preset(preset).name, "seed": seed, "domain": domain})
    return dataset


def mask_path(image_path: str | Path) -> Path:
    """Where the ground-truth mask of a synthetic image lives (``<domain>/masks/<split>/*.png``)."""
    p = Path(image_path)
    return person_mask_path(p.parent.parent / "masks", p)


def load_masks(records):
    """The ground-truth person masks ``[N, 1, H, W]`` (float32) of records of the synthetic
    set, or ``None`` when any of them has no mask (other data sets)."""
    import torch

    if not records or not all(mask_path(r.path).is_file() for r in records):
        return None
    return torch.stack([torch.from_numpy(load_mask(r.path)) for r in records])[:, None]


def load_mask(image_path: str | Path) -> np.ndarray:
    """Ground-truth foreground mask of a synthetic image: float32 ``[H, W]`` in ``[0, 1]``.

    Accepts the image's path (or the mask's own path). 1 = person, 0 = background; edges are
    anti-aliased, so threshold at 0.5 for a binary mask.
    """
    p = Path(image_path)
    path = p if p.parent.parent.name == "masks" else mask_path(p)
    if not path.is_file():
        raise DatasetError(f"no ground-truth mask for {image_path}: expected {path} (masks exist "
                           "only for the synthetic data set)")
    return read_mask(path)
