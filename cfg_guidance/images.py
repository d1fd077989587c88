"""Model outputs in [-1, 1] → uint8 pictures: conversion, grids, PNG files."""

import io
import os

import numpy as np

from cfg_guidance import files


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats → uint8 [0, 255], rounding to nearest."""
  images = np.asarray(images, dtype=np.float32)
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, num_cols: int, pad: int = 1) -> np.ndarray:
  """Tiles images: [N, H, W, C] uint8 → [rows·(H+pad)+pad, cols·(W+pad)+pad, C] uint8."""
  images = np.asarray(images)
  n, h, w, c = images.shape
  num_rows = -(-n // num_cols)
  grid = np.full((num_rows * (h + pad) + pad, num_cols * (w + pad) + pad, c), 255,
                 dtype=images.dtype)
  for i in range(n):
    r, col = divmod(i, num_cols)
    y, x = pad + r * (h + pad), pad + col * (w + pad)
    grid[y:y + h, x:x + w] = images[i]
  return grid


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
  """Nearest-neighbour enlargement so 8×8 digits are visible: [H, W, C] → [fH, fW, C]."""
  return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def render(samples: np.ndarray, num_cols: int) -> np.ndarray:
  """[-1, 1] samples [N, H, W, C] → one uint8 grid, enlarged so small images show."""
  grid = make_grid(to_uint8(samples), num_cols)
  return upscale(grid, max(1, 32 // samples.shape[1]))


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
  """Saves a uint8 [H, W, C] (C = 1 or 3) image as PNG, atomically."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  files.atomic_write_bytes(path, buf.getvalue())
