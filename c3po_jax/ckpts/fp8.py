"""FP8 weights with block scales (DeepSeek-V3's published checkpoint) dequantized while streaming.

A quantized weight W [Out, In] is stored as `<name>` in float8 e4m3 and
`<name>_scale_inv` [ceil(Out / 128), ceil(In / 128)] float32: every 128 x 128
block of W shares one scale, W = fp8 * scale_inv (DeepSeek's
`weight_dequant`, transformers' FP8 integration). The dequantized float32 W
has the layout of an unquantized `<name>`, which the family's name table then
places. Tensors stored in another dtype pass through.

`Pairer` holds the first of the two halves until its partner arrives (the
same shard or a later one); `finish` refuses a half left alone.

Dimensions: Out/In the weight's output/input width, Bo/Bi the block counts.
"""

from __future__ import annotations

from collections.abc import Iterator

import ml_dtypes
import numpy as np

from models.hf_mapping import ConversionError as CheckpointError

SCALE_SUFFIX = '_scale_inv'
BLOCK = 128
FP8_DTYPES = (np.dtype(ml_dtypes.float8_e4m3fn),)


def dequantize(weight: np.ndarray, scale_inv: np.ndarray, block: int = BLOCK) -> np.ndarray:
  """weight [Out, In] float8, scale_inv [Bo, Bi] -> W [Out, In] float32."""
  out, inp = weight.shape
  want = (-(-out // block), -(-inp // block))
  if weight.ndim != 2 or scale_inv.shape != want:
    raise CheckpointError(
      f'FP8 weight {list(weight.shape)} and scale_inv {list(scale_inv.shape)} do not pair '
      f'({block} x {block} blocks: expected scale_inv {list(want)})'
    )
  scales = np.repeat(np.repeat(scale_inv.astype(np.float32), block, 0), block, 1)[:out, :inp]
  return weight.astype(np.float32) * scales


class Pairer:
  """Joins an FP8 `<name>` and its `<name>_scale_inv` into a float32 `<name>`."""

  def __init__(self):
    self._waiting: dict[str, tuple[str, np.ndarray]] = {}

  def feed(self, name: str, array: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, array) ready for the name table: other tensors at once, a pair when whole."""
    if name.endswith(SCALE_SUFFIX):
      base, kind = name[: -len(SCALE_SUFFIX)], 'scale'
    elif array.dtype in FP8_DTYPES:
      base, kind = name, 'weight'
    else:
      yield name, array
      return
    if base not in self._waiting:
      self._waiting[base] = (kind, array)
      return
    other_kind, other = self._waiting.pop(base)
    if other_kind == kind:
      raise CheckpointError(f'FP8 tensor {name!r} appears twice')
    weight, scale_inv = (array, other) if kind == 'weight' else (other, array)
    if weight.dtype not in FP8_DTYPES:
      raise CheckpointError(f'{base!r} has a scale_inv but is stored as {weight.dtype}, not FP8')
    yield base, dequantize(weight, scale_inv)

  def stream(self, tensors: Iterator[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
    """`feed` over a stream of (name, array)."""
    for name, array in tensors:
      yield from self.feed(name, array)

  def finish(self) -> None:
    """Refuses a half whose partner never came."""
    if self._waiting:
      base, (kind, _) = next(iter(self._waiting.items()))
      if kind == 'weight':
        raise CheckpointError(f'FP8 tensor {base!r} has no {base + SCALE_SUFFIX!r}')
      raise CheckpointError(f'{base + SCALE_SUFFIX!r} has no FP8 tensor {base!r}')
