"""Picture helpers for MLflow: contact sheets with optional captions."""

from __future__ import annotations

import textwrap

from PIL import Image, ImageDraw


def contact_sheet(
    images: list[Image.Image],
    captions: list[str] | None = None,
    cols: int = 8,
    cell: int = 96,
    caption_lines: int = 3,
) -> Image.Image:
    """Images scaled to ``cell`` px in a grid, each with a few wrapped caption lines under it."""
    if not images:
        return Image.new("RGB", (cell, cell), "white")
    cols = min(cols, len(images))
    rows = (len(images) + cols - 1) // cols
    text_h = 11 * caption_lines + 4 if captions else 0
    sheet = Image.new("RGB", (cols * (cell + 4) + 4, rows * (cell + text_h + 4) + 4), "white")
    draw = ImageDraw.Draw(sheet)
    width_chars = max(8, cell // 6)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        x, y = 4 + c * (cell + 4), 4 + r * (cell + text_h + 4)
        sheet.paste(img.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        if captions:
            lines = textwrap.wrap(captions[i], width_chars)[:caption_lines]
            for j, line in enumerate(lines):
                draw.text((x, y + cell + 2 + 11 * j), line, fill="black")
    return sheet
