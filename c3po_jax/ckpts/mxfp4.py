"""MXFP4 weights (gpt-oss's published experts) dequantized while the shards stream.

A quantized weight W is stored as two tensors, `<name>_blocks` [E, Out, G,
16] uint8 and `<name>_scales` [E, Out, G] uint8 (G = In / 32 groups): each
byte holds two e2m1 (FP4) codes, the even element in the low nibble, and
each group of 32 elements shares the scale 2 ** (scale - 127). Dequantized, W
is [E, In, Out]: the layout of the unquantized `<name>` tensor, which the
family's name table then places. This is transformers'
`integrations/mxfp4.convert_moe_packed_tensors`, in numpy.

`Pairer` holds the first of the two halves until its partner arrives (in the
same shard or a later one), so at most one weight's packed halves wait
beside the converter's tree.

Dimensions: E experts, In/Out the weight's input/output width, G groups.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from models.hf_mapping import ConversionError as CheckpointError

FP4_VALUES = np.array(
  [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
  np.float32,
)
SUFFIXES = ('_blocks', '_scales')


def dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
  """blocks [E, Out, G, 16] uint8, scales [E, Out, G] uint8 -> W [E, G*32, Out] float32."""
  if blocks.dtype != np.uint8 or scales.dtype != np.uint8 or blocks.shape[:-1] != scales.shape:
    raise CheckpointError(
      f'MXFP4 blocks {blocks.dtype}{list(blocks.shape)} and scales '
      f'{scales.dtype}{list(scales.shape)} do not pair (uint8 [..., G, 16] and [..., G])'
    )
  codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1)  # [E, Out, G, 16, 2] low nibble first
  values = FP4_VALUES[codes].reshape(scales.shape + (-1,))  # [E, Out, G, 32]
  values = np.ldexp(values, scales.astype(np.int32)[..., None] - 127)
  w = values.reshape(scales.shape[:-1] + (-1,))  # [E, Out, In]
  return np.ascontiguousarray(np.swapaxes(w, -1, -2))


class Pairer:
  """Joins `<name>_blocks` and `<name>_scales` into `<name>` as tensors stream past."""

  def __init__(self):
    self._waiting: dict[str, tuple[str, np.ndarray]] = {}

  def feed(self, name: str, array: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, array) ready for the name table: plain tensors at once, a pair when whole."""
    suffix = next((s for s in SUFFIXES if name.endswith(s)), None)
    if suffix is None:
      yield name, array
      return
    base = name[: -len(suffix)]
    if base not in self._waiting:
      self._waiting[base] = (suffix, array)
      return
    other_suffix, other = self._waiting.pop(base)
    if other_suffix == suffix:
      raise CheckpointError(f'MXFP4 tensor {name!r} appears twice')
    blocks, scales = (array, other) if suffix == '_blocks' else (other, array)
    yield base, dequantize(blocks, scales)

  def finish(self) -> None:
    """Refuses a half whose partner never came."""
    if self._waiting:
      base, (suffix, _) = next(iter(self._waiting.items()))
      missing = '_scales' if suffix == '_blocks' else '_blocks'
      raise CheckpointError(f'MXFP4 tensor {base + suffix!r} has no {base + missing!r}')
