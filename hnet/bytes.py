"""Byte vocabulary and document framing shared by every model and data path.

A document is its UTF-8 bytes framed as ``[BOS, bytes..., EOS]``. BOS = 254 and EOS = 255 never occur
in valid UTF-8, so the vocabulary stays at 256 byte values. There is no PAD byte: 0 (NUL) is a real
byte, and padding in packed windows is signalled by ``segment_ids == 0``.

Raw (invalid UTF-8) documents may contain 0xFE/0xFF themselves; they are kept as bytes, so code that
must tell framing from content uses a flag or the document offsets (see ``train/data.py``), not the
byte value.
"""

from __future__ import annotations

BOS: int = 254
EOS: int = 255
VOCAB_SIZE: int = 256
