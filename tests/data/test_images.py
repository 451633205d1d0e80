"""contact_sheet: the grid's size for n images and cols, where each picture lands, and the
caption lines drawn under it."""

from __future__ import annotations

import pytest
from PIL import Image

from mmflow.data.images import contact_sheet

WHITE = (255, 255, 255)
COLOURS = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0), (0, 200, 200), (200, 0, 200)]


def solid(i: int, size=(7, 5)) -> Image.Image:
    return Image.new("RGB", size, COLOURS[i % len(COLOURS)])


def region(sheet: Image.Image, box: tuple[int, int, int, int]) -> set:
    """The distinct colours inside ``box`` (left, top, right, bottom)."""
    return {colour for _, colour in sheet.crop(box).getcolors(1 << 16)}


@pytest.mark.parametrize(
    ("n", "cols", "grid"), [(1, 8, (1, 1)), (5, 2, (2, 3)), (6, 3, (3, 2)), (7, 3, (3, 3))]
)
def test_size_follows_n_and_cols(n, cols, grid):
    cell = 20
    sheet = contact_sheet([solid(i) for i in range(n)], cols=cols, cell=cell)
    c, r = grid  # fewer images than cols: the sheet is only as wide as the images
    assert sheet.mode == "RGB"
    assert sheet.size == (c * (cell + 4) + 4, r * (cell + 4) + 4)


def test_each_image_is_scaled_into_its_cell_in_row_major_order():
    cell, images = 16, [solid(i, size=(3 + i, 9)) for i in range(5)]
    sheet = contact_sheet(images, cols=3, cell=cell)
    for i in range(5):
        r, c = divmod(i, 3)
        x, y = 4 + c * (cell + 4), 4 + r * (cell + 4)
        assert region(sheet, (x, y, x + cell, y + cell)) == {COLOURS[i]}
        # the 4 px gutter right of and below every cell stays white
        assert region(sheet, (x + cell, y, x + cell + 4, y + cell)) == {WHITE}
        assert region(sheet, (x, y + cell, x + cell, y + cell + 4)) == {WHITE}
    # the sixth cell of the 3x2 grid is empty
    assert region(
        sheet, (4 + 2 * (cell + 4), 4 + cell + 4, 4 + 2 * (cell + 4) + cell, 4 + 2 * cell + 8)
    ) == {WHITE}


def test_non_rgb_images_are_converted():
    grey, rgba = Image.new("L", (4, 4), 128), Image.new("RGBA", (4, 4), (10, 20, 30, 255))
    sheet = contact_sheet([grey, rgba], cell=8)
    assert region(sheet, (4, 4, 12, 12)) == {(128, 128, 128)}
    assert region(sheet, (16, 4, 24, 12)) == {(10, 20, 30)}


def test_captions_make_room_for_their_lines_and_are_drawn_under_their_image():
    cell, lines = 96, 3
    text_h = 11 * lines + 4
    long = "a red square on a white ground, drawn by the synthetic shapes stage for tests"
    sheet = contact_sheet([solid(0), solid(1), solid(2)], ["", "one line", long], cols=3, cell=cell)
    assert sheet.size == (3 * (cell + 4) + 4, cell + text_h + 4 + 4)

    def caption_band(col: int, line: int) -> set:
        x, y = 4 + col * (cell + 4), 4 + cell + 2 + 11 * line
        return region(sheet, (x, y, x + cell, y + 11))

    assert caption_band(0, 0) == {WHITE}  # an empty caption draws nothing
    assert caption_band(1, 0) != {WHITE} and caption_band(1, 1) == {WHITE}
    assert all(caption_band(2, j) != {WHITE} for j in range(lines))  # wrapped over 3 lines
    # the pictures themselves stay untouched by the text
    assert region(sheet, (4, 4, 4 + cell, 4 + cell)) == {COLOURS[0]}


def test_caption_lines_caps_the_wrapped_text():
    cell, long = 96, " ".join(["word"] * 60)
    one = contact_sheet([solid(0)], [long], cell=cell, caption_lines=1)
    assert one.size == (cell + 8, cell + 11 + 4 + 8)
    band = region(one, (4, 4 + cell + 2, 4 + cell, 4 + cell + 13))
    assert band != {WHITE}
    assert region(one, (0, 4 + cell + 14, one.width, one.height)) == {WHITE}  # nothing below


def test_no_captions_no_text_area_and_an_empty_list_gives_a_blank_cell():
    a = contact_sheet([solid(0), solid(1)], cell=10)
    b = contact_sheet([solid(0), solid(1)], captions=[], cell=10)
    assert a.size == b.size == (2 * 14 + 4, 14 + 4)
    blank = contact_sheet([], cell=33)
    assert blank.size == (33, 33) and region(blank, (0, 0, 33, 33)) == {WHITE}
