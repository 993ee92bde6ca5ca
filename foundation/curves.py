"""A stage's training curves as one PNG beside its log (`<stage>/curves.png`), redrawn at every
evaluation: people would rather look at a curve than read a log. Drawn with PIL, so that it
needs nothing the project does not already install; TensorBoard or W&B (`--report-to`) give
interactive ones."""

import math
from pathlib import Path

from PIL import Image, ImageDraw

from foundation.training import read_log

PANEL = (360, 220)  # each panel's size in pixels
MARGIN = dict(left=58, right=12, top=26, bottom=30)
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]


def write_curves(log_path: Path, out: Path, panels: dict[str, list[str]]) -> Path | None:
    """One panel per title, each holding the log's series it names (e.g. "test MSE":
    ["train/mse", "test/mse"]), against the step; panels with no points yet are left out.
    None where the log has nothing to draw yet."""
    entries = read_log(log_path)
    drawn = {}
    for title, keys in panels.items():
        series = {key: [(entry["step"], entry[key]) for entry in entries if isinstance(entry.get(key), (int, float))
                        and math.isfinite(entry[key])] for key in keys}
        series = {key: points for key, points in series.items() if points}
        if series:
            drawn[title] = series
    if not drawn:
        return None
    width, height = PANEL
    gap = 24  # between panels, so that one's axis labels are not read as the last one's
    sheet = Image.new("RGB", ((width + gap) * len(drawn) - gap, height), "white")
    for i, (title, series) in enumerate(drawn.items()):
        sheet.paste(draw_panel(title, series), (i * (width + gap), 0))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_suffix(".tmp.png")
    sheet.save(staging)
    staging.replace(out)  # the page may be reading the last one
    return out


def draw_panel(title: str, series: dict[str, list[tuple[int, float]]]) -> Image.Image:
    """Lines of (step, value), on a log scale where every value is positive and they span a
    decade or more (a loss falling from 0.2 to 0.005 is flat at the end on a linear one)."""
    width, height = PANEL
    panel = Image.new("RGB", PANEL, "white")
    draw = ImageDraw.Draw(panel)
    values = [value for points in series.values() for _, value in points]
    steps = [step for points in series.values() for step, _ in points]
    logarithmic = min(values) > 0 and max(values) / min(values) >= 10
    scale = math.log10 if logarithmic else (lambda value: value)
    low, high = scale(min(values)), scale(max(values))
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    first, last = min(steps), max(steps)
    left, top = MARGIN["left"], MARGIN["top"]
    right, bottom = width - MARGIN["right"], height - MARGIN["bottom"]

    def at(step, value):
        x = left + (step - first) / max(1, last - first) * (right - left)
        y = bottom - (scale(value) - low) / (high - low) * (bottom - top)
        return x, y

    draw.rectangle((left, top, right, bottom), outline=(160, 160, 160))
    draw.text((left, 6), title + (" (log scale)" if logarithmic else ""), fill="black")
    for value, y in ((max(values), top), (min(values), bottom)):
        draw.text((4, y - 6), f"{value:.3g}", fill=(80, 80, 80))
    draw.text((left, bottom + 6), f"step {first}", fill=(80, 80, 80))
    draw.text((right - 60, bottom + 6), f"step {last}", fill=(80, 80, 80))
    for n, (key, points) in enumerate(series.items()):
        colour = COLOURS[n % len(COLOURS)]
        line = [at(step, value) for step, value in points]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for x, y in line if len(line) <= 40 else line[-1:]:  # sparse series (evaluations) as dots
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        draw.text((left + 6, top + 4 + 12 * n), key, fill=colour)
    return panel
