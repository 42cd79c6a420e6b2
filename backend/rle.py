"""Label Studio brush RLE codec (the `@thi.ng/rle-pack` v3 bit format), plus mask cleanup before encoding.

Format (reference label_studio.md §9): a 32-bit word count N, a 5-bit word size - 1, four 4-bit run-size classes - 1,
then chunks `flag(1) class(2) count(sizes[class]) value(s)`; flag 1 repeats one word count+1 times, flag 0 is a
literal chunk of count+1 words. A mask of H×W becomes N = H·W·4 RGBA words; the alpha word marks the region.

`encode` is vectorised (runs → bit fields → bytes) and byte-identical to `label_studio_sdk.converter.brush.mask2rle`,
including its padding quirk (1..8 zero bits, so an aligned stream gains a whole zero byte). `decode` also reads the
literal chunks and anti-aliased alpha that masks drawn in the editor use.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from backend.errors import BadRequest

_WORD_BITS = 8
_RUN_SIZES = (3, 4, 8, 16)
_HEADER_BITS = 32 + 5 + 4 * 4
_MAX_CHUNK = 1 << 16
_FOREGROUND = np.ones((3, 3), dtype=bool)  # 8-connected objects
_BACKGROUND = ndimage.generate_binary_structure(2, 1)  # 4-connected holes (the complementary topology)


def encode(mask: np.ndarray) -> list[int]:
    """Encode an H×W mask as LS brush RLE bytes.

    bool masks become alpha 0/255; integer masks are encoded as given (clipped to 0..255), so
    `encode(m) == mask2rle(m)` for every uint8 `m` and `encode(b) == mask2rle(b.astype(np.uint8) * 255)` for bool `b`.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    if mask.dtype == bool:
        pixels = mask.ravel().view(np.uint8) * np.uint8(255)
    elif np.issubdtype(mask.dtype, np.integer):
        pixels = np.clip(mask.ravel(), 0, 255).astype(np.uint8, copy=False)
    else:
        raise ValueError(f"mask must be bool or integer, got dtype {mask.dtype}")
    if pixels.size == 0:
        return _pack(np.zeros(0, np.int64), np.zeros(0, np.uint8), 0)
    # Every pixel is 4 equal RGBA words, so runs of pixels are runs of words 4 times as long.
    ends = np.append(np.flatnonzero(pixels[1:] != pixels[:-1]), pixels.size - 1)
    lengths = np.diff(ends, prepend=-1).astype(np.int64) * 4
    return _pack(lengths, pixels[ends], pixels.size * 4)


def encode_words(words: Sequence[int] | np.ndarray) -> list[int]:
    """Encode a flat sequence of 8-bit words (RGBA values), byte-identical to the SDK's `encode_rle`."""
    values = np.asarray(words).ravel()
    if values.size and (not np.issubdtype(values.dtype, np.integer) or values.min() < 0 or values.max() > 255):
        raise ValueError("RLE words must be integers 0..255")
    values = values.astype(np.uint8)
    if values.size == 0:
        return _pack(np.zeros(0, np.int64), values, 0)
    ends = np.append(np.flatnonzero(values[1:] != values[:-1]), values.size - 1)
    return _pack(np.diff(ends, prepend=-1).astype(np.int64), values[ends], values.size)


def _pack(lengths: np.ndarray, values: np.ndarray, n_words: int) -> list[int]:
    """Bytes of the stream holding runs (`lengths[i]` words of `values[i]`), with the SDK's header and padding."""
    # Runs longer than 65536 words become several 16-bit-count tokens: full chunks of 65536, then the rest.
    extra = np.maximum(lengths - 1, 0) // _MAX_CHUNK
    if extra.any():
        run = np.repeat(np.arange(lengths.size), extra + 1)
        first = np.cumsum(extra + 1) - (extra + 1)
        is_full = (np.arange(run.size) - first[run]) < extra[run]
        lengths = np.where(is_full, _MAX_CHUNK, lengths[run] - extra[run] * _MAX_CHUNK)
        values, forced_long = values[run], (extra > 0)[run]
    else:
        forced_long = None
    cls = np.searchsorted(np.array([8, 16, 256]), lengths)  # 0: ≤8, 1: ≤16, 2: ≤256, 3: longer
    repeat = lengths > 1
    if forced_long is not None:
        # The SDK writes the rest of a split run as a repeat with a 16-bit count, even when it is short.
        cls[forced_long] = 3
        repeat |= forced_long
    count_bits = np.array(_RUN_SIZES, np.uint64)[cls]
    width = count_bits + np.uint64(3 + _WORD_BITS)
    flag = repeat.astype(np.uint64)
    field = ((flag << (width - np.uint64(1))) | (cls.astype(np.uint64) << (width - np.uint64(3)))
             | ((lengths - 1).astype(np.uint64) << np.uint64(_WORD_BITS)) | values.astype(np.uint64))

    end = np.cumsum(width) + np.uint64(_HEADER_BITS)
    offset = end - width
    total_bits = int(end[-1]) if end.size else _HEADER_BITS
    n_bytes = total_bits // 8 + 1  # the SDK pads with 8 - bits % 8 zeros: never 0
    # Each field (≤ 27 bits) sits in a 5-byte window starting at its first byte. A byte holds bits of at most two
    # fields (fields are ≥ 14 bits), so fields of one parity never share a byte: scatter each parity into its own
    # buffer (window bytes written last to first, so a later field's bytes overwrite an earlier window's zero tail)
    # and OR the two buffers.
    window = field << (np.uint64(40) - (offset & np.uint64(7)) - width)
    parts = window.astype(">u8").view(np.uint8).reshape(-1, 8)[:, 3:]
    first_byte = (offset >> np.uint64(3)).astype(np.intp)
    out = np.zeros(n_bytes + 5, np.uint8)
    for parity in (0, 1):
        buffer = np.zeros_like(out)
        starts, windows = first_byte[parity::2], parts[parity::2]
        for k in range(4, -1, -1):
            buffer[starts + k] = windows[:, k]
        out |= buffer
    out = out[:n_bytes]
    out[:4] = np.frombuffer(int(n_words).to_bytes(4, "big"), np.uint8)
    out[4], out[5] = 0b00111001, 0b00011011  # word size 8 (00111), sizes 3,4,8,16 (0010 0011 0111 1111)
    out[6] |= 0b11111000
    return out.tolist()


def _bad(message: str) -> BadRequest:
    return BadRequest(message, code="bad_rle", field="rle")


def decode_words(rle: Sequence[int]) -> np.ndarray:
    """All words of an RLE stream (repeat and literal chunks of any word size up to 32 bits), as uint32 (N,)."""
    try:
        data = bytes(rle)
    except (TypeError, ValueError) as error:
        raise _bad(f"brush RLE must be a list of integers 0..255 ({error})") from None
    if len(data) < 7:
        raise _bad(f"brush RLE of {len(data)} bytes is shorter than its 53-bit header")
    total = len(data) * 8
    padded = data + bytes(8)
    header = int.from_bytes(data[:7], "big") >> 3
    n, word_size = header >> 21, ((header >> 16) & 31) + 1
    sizes = [((header >> shift) & 15) + 1 for shift in (12, 8, 4, 0)]
    out = np.zeros(n, np.uint32)
    value_mask = (1 << word_size) - 1
    pos, i = _HEADER_BITS, 0
    while i < n:
        # One 64-bit window holds flag, class, count (≤ 16 bits) and one word (≤ 32 bits) of a chunk.
        window = int.from_bytes(padded[pos >> 3:(pos >> 3) + 8], "big") << (pos & 7)
        repeat = (window >> 63) & 1
        size = sizes[(window >> 61) & 3]
        end = i + 1 + ((window >> (61 - size)) & ((1 << size) - 1))
        pos += 3 + size
        if end > n:
            raise _bad(f"brush RLE chunk runs past its declared {n} values")
        if repeat:
            if pos + word_size > total:
                raise _bad("brush RLE is truncated in the middle of a chunk")
            out[i:end] = (window >> (61 - size - word_size)) & value_mask
            pos += word_size
        else:
            count = end - i
            if pos + count * word_size > total:
                raise _bad("brush RLE is truncated in the middle of a chunk")
            raw = np.frombuffer(padded, np.uint8, count=((pos & 7) + count * word_size + 7) // 8, offset=pos >> 3)
            bits = np.unpackbits(raw)[pos & 7:(pos & 7) + count * word_size].reshape(count, word_size)
            out[i:end] = bits.astype(np.uint64) @ (np.uint64(1) << np.arange(word_size - 1, -1, -1, dtype=np.uint64))
            pos += count * word_size
        i = end
    return out


def decode(rle: Sequence[int], height: int, width: int, *, alpha_threshold: int = 1) -> np.ndarray:
    """Decode LS brush RLE to a bool H×W mask: pixels whose alpha is ≥ `alpha_threshold` (1 = any non-zero alpha).

    Raises BadRequest (code "bad_rle") for a malformed stream or one whose size is not H·W·4 words.
    """
    words = decode_words(rle)
    if words.size != height * width * 4:
        raise BadRequest(f"brush RLE holds {words.size} values, but a {width}x{height} image needs "
                         f"{height * width * 4} (width x height x 4)", code="bad_rle", field="rle")
    return words.reshape(height, width, 4)[:, :, 3] >= alpha_threshold


def clean_mask(mask: np.ndarray, *, min_area: int = 0, fill_holes_below: int = 0) -> np.ndarray:
    """Drop 8-connected specks smaller than `min_area` pixels and fill 4-connected holes smaller than
    `fill_holes_below` pixels (background not touching the border). Returns a new bool mask."""
    mask = np.asarray(mask, dtype=bool).copy()
    if min_area > 1:
        labels, count = ndimage.label(mask, structure=_FOREGROUND)
        areas = np.bincount(labels.ravel(), minlength=count + 1)
        small = areas < min_area
        small[0] = False
        mask[small[labels]] = False
    if fill_holes_below > 0:
        labels, count = ndimage.label(~mask, structure=_BACKGROUND)
        areas = np.bincount(labels.ravel(), minlength=count + 1)
        hole = areas < fill_holes_below
        hole[0] = False
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        hole[border] = False
        mask[hole[labels]] = True
    return mask


def split_instances(mask: np.ndarray, *, min_area: int = 0, max_instances: int | None = None) -> list[np.ndarray]:
    """One full-size bool mask per 8-connected component of at least `min_area` pixels, largest first (ties in
    raster order); at most `max_instances` of them when given (a noisy mask can hold millions of components)."""
    labels, count = ndimage.label(np.asarray(mask, dtype=bool), structure=_FOREGROUND)
    if count == 0:
        return []
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    order = [int(i) for i in np.argsort(-areas, kind="stable") if areas[i] >= max(min_area, 1)]
    boxes = ndimage.find_objects(labels)
    parts = []
    for index in order[:max_instances]:
        part = np.zeros(labels.shape, dtype=bool)
        box = boxes[index]
        part[box] = labels[box] == index + 1
        parts.append(part)
    return parts
