"""Writing files so that nothing is half-written: each writer goes to a temporary file beside
the target, which is renamed over it only when complete (readers never see half a file); a
failed write (a full disk, Ctrl-C) removes the temporary file and keeps the old one."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import torch


def atomic_write(path: str | Path, write) -> Path:
    """Write through ``write(tmp_path)``, then rename the temporary file to ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # a failed write() names no file: name it
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    return path


def save_tensors(obj, path: str | Path) -> Path:
    """``torch.save``, atomically and through Python's file I/O, so that a full disk is an
    ``OSError`` naming the file (torch's own writer reports it as a C++ error)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write(path, lambda p: Path(p).write_bytes(buffer.getbuffer()))


def write_json(path: str | Path, obj) -> Path:
    text = json.dumps(obj, indent=2)
    return atomic_write(path, lambda p: Path(p).write_text(text))


def save_npz(path: str | Path, **arrays) -> Path:
    def write(p):
        with open(p, "wb") as f:
            np.savez(f, **arrays)
    return atomic_write(path, write)


def save_npy(path: str | Path, array: np.ndarray) -> Path:
    def write(p):
        with open(p, "wb") as f:
            np.save(f, array)
    return atomic_write(path, write)
