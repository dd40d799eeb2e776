"""Image geometry: where a model's image-token grid sits on the original image.

Each model sees one rectangular region of the original image (the whole image for
MedGemma's square resize; the central square for LLaVA-Rad's shortest-side resize and
center crop), resized to a square input and cut into a rows x cols grid, row-major:
token j is cell (j // cols, j % cols). A Geometry maps cells back to original pixels so
overlays are drawn at the image's native aspect, with what the model never saw shown.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Geometry:
    """image_size  (width, height) of the original image in pixels
    crop_box    (x0, y0, x1, y1) of the region the model saw, in original pixels (floats)
    grid        (rows, cols) of the image-token grid
    input_size  side of the square model input in pixels (e.g. 518, 896)
    """

    image_size: tuple[int, int]
    crop_box: tuple[float, float, float, float]
    grid: tuple[int, int]
    input_size: int

    @property
    def n_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def to_record(self) -> dict:
        """The JSON form stored with each result record (lists, not tuples)."""
        return {"image_size": list(self.image_size), "crop_box": list(self.crop_box), "grid": list(self.grid),
                "input_size": self.input_size}  # fmt: skip

    @classmethod
    def from_record(cls, record) -> Geometry:
        """The Geometry a result record's "geometry" field holds (to_record's inverse)."""
        return cls(tuple(record["image_size"]), tuple(record["crop_box"]), tuple(record["grid"]),
                   int(record["input_size"]))  # fmt: skip

    def cell_box(self, row: int, col: int) -> tuple[float, float, float, float]:
        """The original-image box (x0, y0, x1, y1) that grid cell (row, col) covers."""
        rows, cols = self.grid
        if not (0 <= row < rows and 0 <= col < cols):
            raise ValueError(f"cell ({row}, {col}) outside the {rows} x {cols} grid")
        x0, y0, x1, y1 = self.crop_box
        cw, ch = (x1 - x0) / cols, (y1 - y0) / rows
        return (x0 + col * cw, y0 + row * ch, x0 + (col + 1) * cw, y0 + (row + 1) * ch)

    def point_to_cell(self, x: float, y: float) -> tuple[int, int] | None:
        """Grid cell holding original pixel (x, y), or None where the model never saw it."""
        x0, y0, x1, y1 = self.crop_box
        if not (x0 <= x < x1 and y0 <= y < y1):
            return None
        rows, cols = self.grid
        col = min(int((x - x0) / (x1 - x0) * cols), cols - 1)
        row = min(int((y - y0) / (y1 - y0) * rows), rows - 1)
        return row, col

    def token_index(self, row: int, col: int) -> int:
        return row * self.grid[1] + col

    def to_image(self, token_map: np.ndarray) -> np.ndarray:
        """Paint a per-token map (n_tokens,) or (rows, cols) onto the original pixel grid.

        Returns float [height, width]: each pixel carries the value of the cell it falls in
        (nearest cell, no smoothing that would invent detail), NaN where the model never saw.
        """
        rows, cols = self.grid
        grid_map = np.asarray(token_map, dtype=np.float64).reshape(rows, cols)
        width, height = self.image_size
        xs = np.arange(width) + 0.5
        ys = np.arange(height) + 0.5
        x0, y0, x1, y1 = self.crop_box
        col = np.floor((xs - x0) / (x1 - x0) * cols).astype(int)
        row = np.floor((ys - y0) / (y1 - y0) * rows).astype(int)
        col_ok = (col >= 0) & (col < cols)
        row_ok = (row >= 0) & (row < rows)
        out = np.full((height, width), np.nan)
        sub = grid_map[np.clip(row, 0, rows - 1)][:, np.clip(col, 0, cols - 1)]
        mask = row_ok[:, None] & col_ok[None, :]
        out[mask] = sub[mask]
        return out


def square_resize_geometry(width: int, height: int, input_size: int, grid: tuple[int, int]) -> Geometry:
    """The whole image stretched to input_size x input_size (MedGemma / SigLIP)."""
    _check_size(width, height)
    return Geometry((width, height), (0.0, 0.0, float(width), float(height)), grid, input_size)


def shortest_side_center_crop_geometry(
    width: int, height: int, input_size: int, grid: tuple[int, int]
) -> Geometry:
    """Resize the shortest side to input_size, then center-crop input_size x input_size
    (open_clip / torchvision eval transform: Resize(int) then CenterCrop(int)).

    torchvision's Resize keeps the aspect by truncating the long side,
    long' = int(input_size * long / short); CenterCrop's offset is
    int(round((long' - input_size) / 2)). The crop box is mapped back by the scale.
    """
    _check_size(width, height)
    short, long_ = min(width, height), max(width, height)
    scale = input_size / short
    long_resized = int(input_size * long_ / short)
    offset = int(round((long_resized - input_size) / 2.0))
    # resized pixel p covers original [p / s_long, (p + 1) / s_long) along the long side
    s_long = long_resized / long_
    lo, hi = offset / s_long, (offset + input_size) / s_long
    if width >= height:
        box = (lo, 0.0, hi, float(height))
    else:
        box = (0.0, lo, float(width), hi)
    del scale
    return Geometry((width, height), box, grid, input_size)


def _check_size(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width} x {height}")
