"""Science images shipped inside scikit-image, with facts computed from the pixels actually saved."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image
from skimage.filters import threshold_otsu

from scifm.data.corpus.common import SourceContext, figure_seg, package_file, render, text_seg
from scifm.data.documents import Document

# skimage.data loader name -> file shipped in the package (loaders that would download are not used)
IMAGES: dict[str, str] = {
    "cell": "cell.png", "coins": "coins.png", "moon": "moon.png", "camera": "camera.png",
    "hubble_deep_field": "hubble_deep_field.jpg", "retina": "retina.jpg", "microaneurysms": "microaneurysms.png",
    "immunohistochemistry": "ihc.png", "shepp_logan_phantom": "phantom.png", "brick": "brick.png",
    "grass": "grass.png", "gravel": "gravel.png", "horse": "horse.png", "page": "page.png", "text": "text.png",
    "astronaut": "astronaut.png", "rocket": "rocket.jpg", "checkerboard": "chessboard_GRAY.png",
    "clock": "clock_motion.png", "chelsea": "chelsea.png", "coffee": "coffee.png",
}  # fmt: skip
FULL_MAX_SIDE = 256
CROP_MAX_SIDE = 160
CROPS_PER_IMAGE = 3
DOCSTRING_SECTIONS = ("Returns", "Notes", "References", "Parameters")


def description(loader: str) -> str:
    """The loader's own docstring: its summary line and, when it is prose, the paragraph after it."""
    paragraphs = [" ".join(p.split()) for p in (getattr(skimage.data, loader).__doc__ or "").strip().split("\n\n")]
    text = paragraphs[0]
    if len(paragraphs) > 1:
        second = paragraphs[1]
        if not second.startswith(DOCSTRING_SECTIONS) and "http" not in second and "--" not in second:
            text += " " + second.replace("``", "")
    return text


def load(filename: str) -> Image.Image:
    """RGB where the image has colour, 8-bit grayscale otherwise (including RGB files with equal channels)."""
    with package_file("skimage", "data", filename).open("rb") as fh:
        image = Image.open(fh)
        image = image.convert("RGB" if image.mode in ("RGB", "P") else "L")
    pixels = np.asarray(image)
    if pixels.ndim == 3 and (pixels == pixels[..., :1]).all():
        image = image.convert("L")
    return image


def save_small(image: Image.Image, max_side: int, path: Path) -> np.ndarray:
    """Saves a downscaled copy as PNG (lossless) and returns exactly the pixels saved."""
    small = image.copy()
    small.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    small.save(path, format="PNG")
    return np.asarray(small)


def gray(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float64).mean(axis=2) if pixels.ndim == 3 else pixels.astype(np.float64)


def mode_word(pixels: np.ndarray) -> str:
    return "colour" if pixels.ndim == 3 else "grayscale"


def intensity_text(rng: random.Random, pixels: np.ndarray) -> str:
    mean = f"{pixels.mean():.1f}"
    if pixels.ndim == 3:
        r, g, b = (f"{pixels[..., c].mean():.1f}" for c in range(3))
        return rng.choice(
            (
                f"Its mean pixel value is {mean} on a 0-255 scale (red {r}, green {g}, blue {b}).",
                f"Question: what are the mean red, green and blue values of this image? Answer: {r}, {g} and {b}.",
            )
        )
    return rng.choice(
        (
            f"Its mean gray level is {mean} on a 0-255 scale.",
            f"Question: how bright is this image on average (0 = black, 255 = white)? Answer: {mean}.",
        )
    )


QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
MIN_QUADRANT_GAP = 3.0  # gray levels by which the brightest quadrant must lead, to be visible


def quadrant_text(rng: random.Random, pixels: np.ndarray) -> str | None:
    g = gray(pixels)
    h, w = g.shape[0] // 2, g.shape[1] // 2
    means = [round(float(q.mean()), 1) for q in (g[:h, :w], g[:h, w:], g[h:, :w], g[h:, w:])]
    runner_up, best = sorted(means)[-2:]
    if best - runner_up < MIN_QUADRANT_GAP:
        return None
    listing = ", ".join(f"{q} {m:.1f}" for q, m in zip(QUADRANTS, means))
    quadrant = QUADRANTS[means.index(best)]
    return rng.choice(
        (
            f"Question: which quadrant of this image is brightest? Answer: the {quadrant} quadrant "
            f"(mean gray levels: {listing}).",
            f"Split into quadrants, the mean gray levels are {listing}, so the {quadrant} one is brightest.",
        )
    )


def threshold_text(rng: random.Random, pixels: np.ndarray) -> str | None:
    g = gray(pixels)
    if np.unique(g).size < 2:
        return None
    t = threshold_otsu(g)
    share = f"{100 * (g > t).mean():.1f}"
    return rng.choice(
        (
            f"Otsu's method puts the threshold at gray level {t:.1f}; {share}% of the pixels lie above it.",
            f"Question: after Otsu thresholding, what share of the pixels is foreground (brighter than the "
            f"threshold)? Answer: {share}%.",
        )
    )


def image_docs(ctx: SourceContext) -> Iterator[Document]:
    """Per image: a description and an intensity fact on a downscaled copy, then questions on crops."""
    for loader, filename in IMAGES.items():
        if not package_file("skimage", "data", filename).is_file():
            ctx.skip("missing_file", f"img-{loader}")
            continue
        image = load(filename)
        path, rel = ctx.figure(f"img-{loader}")
        pixels = save_small(image, FULL_MAX_SIDE, path)
        name = loader.replace("_", " ")
        intro = render(
            ctx.rng.choice(
                (
                    "The scikit-image sample '{name}': {desc}",
                    "Image '{name}' from scikit-image's data module. {desc}",
                )
            ),
            name=name,
            desc=description(loader),
        )
        size = render(
            " The original is a {mode} image of {w} x {h} pixels; this copy is {sw} x {sh}.",
            mode=mode_word(pixels), w=image.width, h=image.height, sw=pixels.shape[1], sh=pixels.shape[0],
        )  # fmt: skip
        yield ctx.doc(f"img-{loader}", "fig.describe", intro + [figure_seg(rel)] + size)
        yield ctx.doc(
            f"img-{loader}-mean",
            "fig.intensity",
            render("The {name} image from scikit-image:", name=name)
            + [figure_seg(rel)]
            + [text_seg(" " + intensity_text(ctx.rng, pixels))],
        )
        for k in range(CROPS_PER_IMAGE):
            side = ctx.rng.randint(min(image.size) // 4, min(image.size) // 2)
            x, y = ctx.rng.randrange(image.width - side + 1), ctx.rng.randrange(image.height - side + 1)
            path, rel = ctx.figure(f"img-{loader}-crop{k}")
            crop = save_small(image.crop((x, y, x + side, y + side)), CROP_MAX_SIDE, path)
            skill, text = "fig.intensity", intensity_text(ctx.rng, crop)
            for candidate, make in ctx.rng.sample(
                [("fig.quadrant", quadrant_text), ("fig.threshold", threshold_text)], 2
            ):
                answer = make(ctx.rng, crop)
                if answer is not None:
                    skill, text = candidate, answer
                    break
            intro = render(
                "A {side} x {side} pixel crop of the scikit-image '{name}' image, taken at x = {x}, y = {y}:",
                side=side, name=name, x=x, y=y,
            )  # fmt: skip
            yield ctx.doc(f"img-{loader}-crop{k}", skill, intro + [figure_seg(rel), text_seg(" " + text)])
