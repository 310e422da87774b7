"""Paths that may be local or in object storage (``gs://``): one place for what a run writes and reads.

Every client honours ``STORAGE_EMULATOR_HOST`` (a local GCS-API server such as fake-gcs-server): gcsfs (which
etils.epath and orbax use) reads it itself; ``use_emulator`` points tensorstore (orbax's array storage) at it
too and turns off gcsfs's gRPC bucket-type probe, which only a real GCS answers (against an emulator it
blocks for 60 s per call). TensorBoard events for a remote logdir are written locally and uploaded
(``train.logger.MetricWriter``): tensorboardX's own GCS writer hung against the emulator.
"""

from __future__ import annotations

import json
import os

from etils import epath


class StorageError(OSError):
    """The workdir (or another output location) cannot be created or written."""


def use_emulator() -> None:
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if host:
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", host if "://" in host else f"http://{host}")
        os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")


def is_remote(path) -> bool:
    return "://" in str(path)


def absolute(path: str) -> str:
    """A local path made absolute; a URL unchanged (``os.path.abspath('gs://b/x')`` would break it)."""
    return str(path) if is_remote(path) else os.path.abspath(path)


def join(path: str, *parts: str) -> str:
    return str(epath.Path(path).joinpath(*parts))


def make_dirs(path: str) -> None:
    """Create a directory (a no-op prefix on object storage); raise StorageError with the reason."""
    try:
        if not is_remote(path):
            os.makedirs(path, exist_ok=True)
            return
        scheme, rest = str(path).split("://", 1)
        bucket = f"{scheme}://{rest.split('/')[0]}"
        ok = epath.Path(bucket).exists()  # buckets have no directories; never create a bucket implicitly
    except Exception as e:  # noqa: BLE001 - no permission, unreachable endpoint
        raise StorageError(f"cannot create or reach {path}: {type(e).__name__}: {str(e)[:300]}") from e
    if not ok:
        raise StorageError(f"cannot reach {path}: bucket {bucket} does not exist")


def write_text(path: str, text: str) -> None:
    """Write then rename: a kill never leaves a half-written file (an object store's objects appear whole)."""
    p = epath.Path(path)
    if is_remote(path):
        p.write_text(text)
        return
    tmp = p.parent / f"{p.name}.tmp-{os.getpid()}"
    tmp.write_text(text)
    tmp.replace(p)


def write_bytes(path: str, data: bytes) -> None:
    epath.Path(path).write_bytes(data)


def read_text(path: str) -> str:
    return epath.Path(path).read_text()


def exists(path: str) -> bool:
    return epath.Path(path).exists()


def read_json(path: str):
    """A JSON file's content, or None when it is missing or unreadable."""
    try:
        return json.loads(read_text(path))
    except (OSError, ValueError):
        return None


def upload(local_paths: list[str], directory: str) -> list[str]:
    """Copy local files into ``directory`` (no-op when it is the same local directory); their new paths."""
    out = []
    for p in local_paths:
        dst = join(directory, os.path.basename(p))
        if dst != p:
            epath.Path(p).copy(epath.Path(dst), overwrite=True)
        out.append(dst)
    return out


def local_copy(path: str, directory: str) -> str:
    """``path`` itself when local, else a copy of it in ``directory`` (for readers that need a local file)."""
    if not is_remote(path):
        return path
    local = os.path.join(directory, os.path.basename(path))
    epath.Path(path).copy(epath.Path(local), overwrite=True)
    return local


use_emulator()
