"""Pillow helpers for the report's example images: one model input as a picture a person can read,
boxes, masks and captions drawn on it, and PNG bytes within a bound. Pure functions of arrays."""

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ORIGINAL = (255, 140, 0)  # orange: the original model's answer
COMPRESSED = (30, 110, 255)  # blue: the compressed model's
DIFFERS = (220, 30, 30)  # red: where the two disagree
INK, PAPER = (29, 35, 48), (255, 255, 255)
# A picture's longer side: tiny inputs are enlarged by a whole factor (nearest: pixels stay pixels,
# so a mask cell maps to an exact block), large ones reduced to MAX_SIDE.
MIN_SIDE, MAX_SIDE = 320, 480
MAX_PNG_BYTES = 200 * 1024  # per image (4 at most in a report); a larger PNG is redrawn at half the size
# Mask classes 1, 2, ... in turn (class 0, the background by convention, is left untinted; an id
# past the end reuses a colour: the disagreement map stays exact). None is the models' or the map's colour.
PALETTE = ((60, 180, 75), (255, 225, 25), (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60),
           (0, 128, 128), (170, 110, 40), (128, 128, 0), (250, 190, 212))


def font(size: int = 12) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def as_picture(image: np.ndarray) -> Image.Image | None:
    """One input, (C, H, W), (H, W, C) or (H, W), as RGB; None when it is no image (a vector).
    The channel axis is the one of 1 or 3 entries (the first when both are); other counts show the
    first channel. Each channel is stretched min-max: it undoes any mean/std well enough to see."""
    array = np.asarray(image, dtype=np.float64)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        return None
    if array.shape[0] not in (1, 3) and array.shape[2] in (1, 3):
        array = array.transpose(2, 0, 1)
    if min(array.shape[1:]) < 2:
        return None
    if array.shape[0] != 3:
        array = array[:1]
    array = np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0)
    low = array.min(axis=(1, 2), keepdims=True)
    span = array.max(axis=(1, 2), keepdims=True) - low
    pixels = np.where(span > 0, (array - low) / np.where(span > 0, span, 1.0), 0.5)
    pixels = np.repeat(pixels, 3 // len(pixels), axis=0).transpose(1, 2, 0)
    return Image.fromarray(np.round(pixels * 255).astype(np.uint8), "RGB")


def display_scale(height: int, width: int, min_side: int = MIN_SIDE) -> float:
    """Pixels of the drawn picture per input pixel: a whole factor up, or a fraction down."""
    longer = max(height, width)
    if longer > MAX_SIDE:
        return MAX_SIDE / longer
    return float(max(1, min_side // longer))


def resized(picture: Image.Image, scale: float) -> Image.Image:
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    return picture.resize(size, Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BILINEAR)


def _overlaps(a: tuple, b: tuple) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def draw_boxes(picture: Image.Image, boxes: list[dict], colour: tuple, scale: float, *, below: bool = False,
               taken: list[tuple] | None = None) -> None:
    """Each {"box" xyxy in input pixels, "class", "score", "status"} as a rectangle with its label;
    a lost or new one drawn thicker and so named. `below`: labels under the box (the second model's,
    so the two models' labels of one object do not cover each other); `taken`: label rectangles
    already drawn, which a new label steps away from (a few tries) and then joins."""
    draw, text_font = ImageDraw.Draw(picture), font(11)
    taken = [] if taken is None else taken
    for entry in boxes:
        x0, y0, x1, y1 = (float(v) * scale for v in entry["box"])
        x0, x1 = sorted((x0, x1))
        y0, y1 = sorted((y0, y1))
        odd = entry["status"] in ("lost", "new")
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=3 if odd else 1)
        label = f"{entry['class']} {entry['score']:.2f}" + (f" {entry['status'].upper()}" if odd else "")
        left, top, right, bottom = draw.textbbox((0, 0), label, font=text_font)
        step = bottom - top + 3
        y = y1 + 1 if below else y0 - step
        x = min(max(0, x0), max(0, picture.width - (right - left) - 2))
        for _ in range(4):
            y = min(max(0, y), picture.height - step + 1)
            label_box = (x, y, x + right - left + 2, y + step - 1)
            if not any(_overlaps(label_box, other) for other in taken):
                break
            y += step if below or y - step < 0 else -step
        taken.append(label_box)
        draw.rectangle(label_box, fill=colour)
        draw.text((x + 1 - left, y + 1 - top), label, fill=PAPER, font=text_font)


def draw_points(picture: Image.Image, points: list[dict], colour: tuple, scale: float, *, ring: bool) -> None:
    """Each {"k", "x", "y"} (input pixels) as a ring (`ring`: the original's, with its number) or a
    dot (the compressed model's, drawn over the rings); a missed one joined to its `to` by a red line."""
    draw, text_font = ImageDraw.Draw(picture), font(11)
    for point in points:
        x, y = point["x"] * scale, point["y"] * scale
        if "to" in point:
            draw.line((x, y, point["to"][0] * scale, point["to"][1] * scale), fill=DIFFERS, width=2)
        if ring:
            draw.ellipse((x - 6, y - 6, x + 6, y + 6), outline=colour, width=2)
            draw.text((x + 7, y - 7), str(point["k"]), fill=colour, font=text_font)
        else:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)


def mask_overlay(picture: Image.Image, mask: np.ndarray) -> Image.Image:
    """The picture (already at the mask's size times a whole factor) half-covered by class colours."""
    mask = np.asarray(mask, np.int64)
    colours = np.asarray(PALETTE, dtype=np.uint8)[(mask - 1) % len(PALETTE)]
    coloured = Image.fromarray(colours, "RGB").resize(picture.size, Image.Resampling.NEAREST)
    tinted = Image.fromarray(np.asarray(mask != 0, np.uint8) * 255).resize(picture.size, Image.Resampling.NEAREST)
    return Image.composite(Image.blend(picture, coloured, 0.55), picture, tinted)


def disagreement_map(picture: Image.Image, reference: np.ndarray, candidate: np.ndarray) -> Image.Image:
    """Red exactly where the masks differ, the picture in dim grey (never red) elsewhere."""
    grey = np.asarray(picture.convert("L"), dtype=np.float64) * 0.35 + 20  # 20..109 on every channel
    differs = np.asarray(Image.fromarray(np.asarray(reference != candidate, np.uint8) * 255)
                         .resize(picture.size, Image.Resampling.NEAREST)) > 0
    pixels = np.repeat(grey[..., None], 3, axis=2).astype(np.uint8)
    pixels[differs] = DIFFERS
    return Image.fromarray(pixels, "RGB")


def side_by_side(panels: list[tuple[str, Image.Image]], gap: int = 8) -> tuple[Image.Image, dict]:
    """Panels in a row, each titled above; the sheet and each panel's [x, y, width, height] on it."""
    title_height = 18
    width = sum(p.width for _, p in panels) + gap * (len(panels) - 1)
    sheet = Image.new("RGB", (width, title_height + max(p.height for _, p in panels)), PAPER)
    draw, x, where = ImageDraw.Draw(sheet), 0, {}
    for title, panel in panels:
        draw.text((x, 2), title, fill=INK, font=font(12))
        sheet.paste(panel, (x, title_height))
        where[title] = [x, title_height, panel.width, panel.height]
        x += panel.width + gap
    return sheet, where


def with_caption(picture: Image.Image, lines: list[list[tuple[str, tuple]]]) -> Image.Image:
    """The picture over lines of text, each line segments of (text, colour): a mismatch in its own colour."""
    text_font, line_height = font(13), 18
    width = max([picture.width] + [8 + sum(round(text_font.getlength(text)) for text, _ in line) for line in lines])
    sheet = Image.new("RGB", (width, picture.height + 6 + line_height * len(lines)), PAPER)
    sheet.paste(picture, (0, 0))
    draw = ImageDraw.Draw(sheet)
    for row, line in enumerate(lines):
        x, y = 4.0, picture.height + 4 + row * line_height
        for text, colour in line:
            draw.text((x, y), text, fill=colour, font=text_font)
            x += text_font.getlength(text)
    return sheet


def png(picture: Image.Image, limit: int = MAX_PNG_BYTES) -> tuple[bytes, Image.Image] | None:
    """PNG bytes at most `limit` long and the picture they hold: redrawn at half the size up to three
    times, else None."""
    for _ in range(4):
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG", optimize=True)
        if buffer.tell() <= limit:
            return buffer.getvalue(), picture
        picture = picture.resize((max(1, picture.width // 2), max(1, picture.height // 2)), Image.Resampling.BILINEAR)
    return None
