"""The loss plot (`<stem>loss.png`), drawn with Pillow: each micro-step's loss as a faint point, a centred moving
mean over them as a line, the validation losses (and the EMA adapter's) as marked points, and axes with round
ticks, grid lines and labels. The image keeps ComfyUI's Plot Loss Graph size (840x520).

Per-micro-step diffusion losses are noisy (they depend on the sampled noise level) and the first steps are often
far above the rest, so the moving mean carries the trend, and the y range of a long run (50 points or more)
stops at the 98th percentile of its single losses: points above it (and the mean where a spike lifts it) are
drawn on the top edge, and the points are counted in the title.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 840, 520  # ComfyUI's LossGraphNode image size
LEFT, RIGHT, TOP, BOTTOM = 76, 24, 48, 58  # margins: y tick labels, the right edge, title and legend, x ticks
SMOOTHING = 20  # the moving mean spans 1/20 of the run (at least MIN_WINDOW micro-steps)
MIN_WINDOW, MIN_POINTS = 5, 10  # fewer points than MIN_POINTS: no moving mean
OUTLIER_QUANTILE, OUTLIER_POINTS = 0.98, 50  # the y range covers this quantile of single points of long runs
LINE, FAINT, WARN = (31, 74, 150), (160, 184, 224), (170, 40, 40)  # dark blue, light blue, red
VALIDATION, EMA_VALIDATION = (225, 120, 20), (30, 140, 70)  # orange, green
AXIS, TEXT, GRID = (60, 60, 60), (30, 30, 30), (228, 228, 228)


@dataclass(frozen=True)
class LossCurves:
    """What the plot shows, in its units: x counts optimizer steps (micro-step i of k per step at (i + 1) / k)."""

    x: np.ndarray
    raw: np.ndarray  # each micro-step's loss, NaN where not finite
    mean: np.ndarray  # the centred moving mean of the finite raw losses over `window` micro-steps
    window: int
    validation_steps: np.ndarray
    validation: np.ndarray
    ema_validation: np.ndarray | None


def smoothing_window(count: int) -> int:
    """Micro-steps per moving-mean window: 1 (no smoothing) below MIN_POINTS, else 1/SMOOTHING of the run, at least
    MIN_WINDOW."""
    return 1 if count < MIN_POINTS else max(MIN_WINDOW, count // SMOOTHING)


def moving_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the finite values in a centred window (shorter at the ends); NaN where the window has none."""
    finite = np.isfinite(values)
    sums = np.concatenate([[0.0], np.cumsum(np.where(finite, values, 0.0))])
    counts = np.concatenate([[0], np.cumsum(finite)])
    index = np.arange(len(values))
    lo, hi = np.clip(index - window // 2, 0, None), np.clip(index + window - window // 2, None, len(values))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sums[hi] - sums[lo]) / (counts[hi] - counts[lo])


def loss_curves(
    losses: Sequence[float], steps_per_optimizer_step: int, validation: Mapping[str, Sequence] | None = None
) -> LossCurves:
    """The plotted series of a history (`validation`: {"step", "loss"[, "ema_loss"]} as the loop records it)."""
    raw = np.asarray(losses, dtype=np.float64).reshape(-1)
    raw = np.where(np.isfinite(raw), raw, np.nan)
    window = smoothing_window(len(raw))
    validation = validation or {"step": [], "loss": []}
    ema = validation.get("ema_loss")
    return LossCurves(
        x=(np.arange(len(raw)) + 1) / steps_per_optimizer_step,
        raw=raw,
        mean=moving_mean(raw, window) if window > 1 else raw,
        window=window,
        validation_steps=np.asarray(validation["step"], dtype=np.float64),
        validation=np.asarray(validation["loss"], dtype=np.float64),
        ema_validation=None if ema is None else np.asarray(ema, dtype=np.float64),
    )


def nice_ticks(low: float, high: float, count: int = 6, integer: bool = False) -> np.ndarray:
    """About `count` round values (1, 2, 2.5 or 5 times a power of ten apart; whole numbers if `integer`) in
    [low, high]."""
    if not high > low:
        return np.asarray([low])
    rough = (high - low) / count
    power = 10.0 ** math.floor(math.log10(rough))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= rough)
    if integer:
        step = max(1.0, float(math.ceil(step)))
    first = math.ceil(low / step - 1e-9) * step
    return first + step * np.arange(int(math.floor((high - first) / step + 1e-9)) + 1)


def value_range(curves: LossCurves) -> tuple[float, float]:
    """(low, high) of the y axis: every finite loss and validation loss, except that a long run's range stops at
    the OUTLIER_QUANTILE of its single losses (a few spikes would flatten the rest); padded by 4%."""
    finite = curves.raw[np.isfinite(curves.raw)]
    others = [curves.validation, *([curves.ema_validation] if curves.ema_validation is not None else [])]
    others = np.concatenate([series[np.isfinite(series)] for series in others])
    top = np.quantile(finite, OUTLIER_QUANTILE) if len(finite) >= OUTLIER_POINTS else finite.max(initial=-np.inf)
    low = min(finite.min(initial=np.inf), others.min(initial=np.inf))
    high = max(top, others.max(initial=-np.inf))
    pad = (high - low) * 0.04 if high > low else max(abs(high) * 0.1, 0.5)
    return low - pad, high + pad


@dataclass(frozen=True)
class PlotArea:
    """The axes' box in pixels and the data range it shows."""

    x_range: tuple[float, float]
    y_range: tuple[float, float]
    box: tuple[int, int, int, int] = (LEFT, TOP, WIDTH - RIGHT, HEIGHT - BOTTOM)

    def to_x(self, x: np.ndarray) -> np.ndarray:
        (lo, hi), (left, _, right, _) = self.x_range, self.box
        return left + (np.asarray(x, np.float64) - lo) / (hi - lo) * (right - left)

    def to_y(self, y: np.ndarray) -> np.ndarray:
        """Pixel rows of values, clipped to the box (points outside the range sit on its edge)."""
        (lo, hi), (_, top, _, bottom) = self.y_range, self.box
        return np.clip(bottom - (np.asarray(y, np.float64) - lo) / (hi - lo) * (bottom - top), top, bottom)


def plot_area(curves: LossCurves, steps: int) -> PlotArea:
    """Steps 0 to the run's last on x; `value_range` on y."""
    return PlotArea((0.0, float(max(steps, 1))), value_range(curves))


def render_loss_plot(
    losses: Sequence[float],
    steps_per_optimizer_step: int,
    title: str = "",
    validation: Mapping[str, Sequence] | None = None,
) -> Image.Image:
    """The plot of a run's loss history (one loss per micro-step, `steps_per_optimizer_step` per optimizer step)
    and its validation losses. Non-finite losses leave gaps, red ticks on the top edge and a title note."""
    curves = loss_curves(losses, steps_per_optimizer_step, validation)
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = _font(13)
    steps = math.ceil(len(curves.raw) / steps_per_optimizer_step)
    left, top, right, bottom = PlotArea((0, 1), (0, 1)).box
    finite = np.isfinite(curves.raw)
    skipped = int((~finite).sum())
    if not finite.any():
        _heading(draw, font, title, [f"{steps} step" + "s" * (steps != 1)], WARN if skipped else TEXT)
        _frame(image, draw, font, steps_per_optimizer_step)
        message = "no finite losses" if len(curves.raw) else "no losses"
        draw.text(((left + right) / 2, (top + bottom) / 2), message, fill=WARN, font=font, anchor="mm")
        return image
    area = plot_area(curves, steps)
    above = int((curves.raw[finite] > area.y_range[1]).sum())
    _heading(draw, font, title, _details(curves, steps, steps_per_optimizer_step, skipped, above), TEXT)
    _axes(image, draw, font, area, steps_per_optimizer_step)
    xs = area.to_x(curves.x)
    for x in xs[~finite]:
        draw.line([(x, top), (x, top + 8)], fill=WARN, width=2)
    radius = 1.5 if len(xs) <= 2000 else 0.8
    for x, y in zip(xs[finite].tolist(), area.to_y(curves.raw[finite]).tolist(), strict=True):
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=FAINT)
    _polyline(draw, xs, area.to_y(curves.mean), fill=LINE, width=2)  # the raw losses joined, for short runs
    series = [(curves.validation, VALIDATION, "circle"), (curves.ema_validation, EMA_VALIDATION, "square")]
    for values, colour, shape in series:
        if values is not None and len(values):
            _markers(draw, area.to_x(curves.validation_steps), area.to_y(values), colour, shape)
    _legend(draw, font, curves)
    return image


def _details(curves: LossCurves, steps: int, per_step: int, skipped: int, above: int) -> list[str]:
    details = [f"{steps} step" + "s" * (steps != 1) + f" ({per_step} micro-steps each)" * (per_step > 1)]
    last = curves.mean[np.isfinite(curves.mean)]
    details.append(f"last {last[-1]:.4g}" + f" (mean of {curves.window})" * (curves.window > 1))
    if len(curves.validation):
        details.append(f"validation {curves.validation[-1]:.4g}")
    if skipped:
        details.append(f"{skipped} non-finite skipped")
    if above:
        details.append(f"{above} above the range")
    return details


def _heading(draw: ImageDraw.ImageDraw, font, title: str, details: list[str], colour) -> None:
    heading = " - ".join([title] * bool(title) + [", ".join(details)])
    if draw.textlength(heading, font=font) > WIDTH - 16:  # a long prefix: the numbers matter more
        heading = ", ".join(details)
    draw.text((WIDTH / 2, 8), heading, fill=colour, font=font, anchor="mt")


def _frame(image: Image.Image, draw: ImageDraw.ImageDraw, font, per_step: int) -> None:
    left, top, right, bottom = PlotArea((0, 1), (0, 1)).box
    draw.rectangle([left, top, right, bottom], outline=AXIS)
    label = "step" + f" ({per_step} micro-steps each)" * (per_step > 1)
    draw.text(((left + right) / 2, HEIGHT - 18), label, fill=TEXT, font=font, anchor="mb")
    _vertical_text(image, "loss", (16, (top + bottom) // 2), font)


def _axes(image: Image.Image, draw: ImageDraw.ImageDraw, font, area: PlotArea, per_step: int) -> None:
    """Grid lines and labelled ticks at round values, inside a frame."""
    left, top, right, bottom = area.box
    for value in nice_ticks(*area.y_range, count=6):
        y = float(area.to_y(value))
        draw.line([(left, y), (right, y)], fill=GRID)
        draw.line([(left - 5, y), (left, y)], fill=AXIS)
        draw.text((left - 8, y), f"{value:.4g}", fill=TEXT, font=font, anchor="rm")
    for value in nice_ticks(*area.x_range, count=8, integer=True):
        x = float(area.to_x(value))
        draw.line([(x, top), (x, bottom)], fill=GRID)
        draw.line([(x, bottom), (x, bottom + 5)], fill=AXIS)
        draw.text((x, bottom + 8), f"{value:.0f}", fill=TEXT, font=font, anchor="mt")
    _frame(image, draw, font, per_step)


def _legend(draw: ImageDraw.ImageDraw, font, curves: LossCurves) -> None:
    """One row above the plot's right end: a sample of each series shown, then its name."""
    entries = [("dot", FAINT, "each micro-step"), ("line", LINE, f"mean of {curves.window}")]
    if curves.window == 1:  # no smoothing: the line joins the single losses
        entries = [("line", LINE, "each micro-step")]
    if len(curves.validation):
        entries.append(("circle", VALIDATION, "validation"))
        if curves.ema_validation is not None:
            entries.append(("square", EMA_VALIDATION, "validation, EMA adapter"))
    x, y = WIDTH - RIGHT, TOP - 14
    for shape, colour, name in reversed(entries):
        x -= draw.textlength(name, font=font)
        draw.text((x, y), name, fill=TEXT, font=font, anchor="lm")
        x -= 22
        if shape == "line":
            draw.line([(x, y), (x + 16, y)], fill=colour, width=2)
        else:
            _markers(draw, np.asarray([x + 8.0]), np.asarray([float(y)]), colour, shape, line=False)
        x -= 14


def _markers(draw, xs: np.ndarray, ys: np.ndarray, colour, shape: str, line: bool = True) -> None:
    """Points joined by a thin line; "circle", "square" or a small "dot"."""
    if line and len(xs) > 1:
        draw.line(list(zip(xs.tolist(), ys.tolist(), strict=True)), fill=colour, width=1)
    size = {"circle": 4, "square": 3.5, "dot": 2}[shape]
    for x, y in zip(xs.tolist(), ys.tolist(), strict=True):
        box = [x - size, y - size, x + size, y + size]
        (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=colour)


def _polyline(draw: ImageDraw.ImageDraw, xs: np.ndarray, ys: np.ndarray, fill: tuple[int, int, int], width: int):
    """Draw the points as lines broken at non-finite ys; a lone finite point becomes a dot."""
    breaks = np.flatnonzero(~np.isfinite(ys))
    for run in np.split(np.arange(len(ys)), breaks):
        run = run[np.isfinite(ys[run])]
        if len(run) > 1:
            draw.line(list(zip(xs[run].tolist(), ys[run].tolist(), strict=True)), fill=fill, width=width, joint="curve")
        elif len(run) == 1:
            x, y = xs[run[0]], ys[run[0]]
            draw.ellipse([x - width, y - width, x + width, y + width], fill=fill)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font, scalable since Pillow 10.1; the fixed bitmap font before."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _vertical_text(image: Image.Image, text: str, at: tuple[int, int], font) -> None:
    """Draw `text` reading upwards, centred on `at`: the y axis's label."""
    _, _, width, height = font.getbbox(text)
    label = Image.new("RGB", (width + 2, height + 2), "white")
    ImageDraw.Draw(label).text((1, 1), text, fill=TEXT, font=font)
    label = label.rotate(90, expand=True)
    image.paste(label, (at[0] - label.width // 2, at[1] - label.height // 2))
