"""Where documents come from: source specs resolved to files, the data layer's error, and the document type.

A source spec is a text file, a directory (its files recursively, sorted), a glob, ``shared:<path>``
(``../shared/data``, or ``$HNET_SHARED_DATA``) or ``builtin:<name>``; local or ``gs://``. ``train.prepare``
turns the files into shards, ``train.data`` reads them back as ``Document``s.
"""

from __future__ import annotations

import glob
import os

from etils import epath

from train.storage import is_remote

SHARED_DATA = os.environ.get(
    "HNET_SHARED_DATA", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data"))


class DataError(ValueError):
    """A data source is missing, unreadable, corrupt or empty (raised before any compilation)."""


def shared_path(*parts: str) -> str:
    return os.path.normpath(os.path.join(SHARED_DATA, *parts))


def expand_source(src: str) -> list[str]:
    """Files of one source spec, in order (``builtin:`` names pass through)."""
    if src.startswith("builtin:"):
        return [src]
    if src.startswith("shared:"):
        src = shared_path(src[len("shared:"):])
    try:
        if any(c in src for c in "*?["):
            paths = _glob(src)
            if not paths:
                raise DataError(f"data source glob {src!r} matches no file")
            return [p for p in paths if epath.Path(p).is_file()]
        p = epath.Path(src)
        if p.is_dir():
            paths = sorted(_files_under(p))
            if not paths:
                raise DataError(f"data source directory {src!r} contains no file")
            return paths
        if not p.exists():
            raise DataError(f"data source {src!r} does not exist")
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - unreachable bucket, permissions, ...
        raise DataError(f"cannot reach data source {src!r}: {type(e).__name__}: {str(e)[:300]}") from e
    return [src]


def _files_under(p: epath.Path) -> list[str]:
    if not is_remote(str(p)):
        return [os.path.join(r, f) for r, _, fs in os.walk(str(p)) for f in fs]
    return [x for c in p.iterdir() for x in (_files_under(c) if c.is_dir() else [str(c)])]


def _glob(pattern: str) -> list[str]:
    if not is_remote(pattern):
        return sorted(glob.glob(pattern, recursive=True))
    base = pattern[:min(pattern.find(c) for c in "*?[" if c in pattern)].rsplit("/", 1)[0]
    return sorted(str(p) for p in epath.Path(base).glob(pattern[len(base) + 1:]))


class Document(bytes):
    """A document's bytes tagged with where they came from: ``source`` is the file path (or
    ``builtin:<name>``). Annotations that need a per-document label read it (``lang_routes_<set>``);
    everything else treats a Document as plain bytes."""

    source: str

    def __new__(cls, data: bytes, source: str = ""):
        doc = super().__new__(cls, data)
        doc.source = source
        return doc
