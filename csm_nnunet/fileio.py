"""Atomic writes for every text/JSON file csm-nnunet produces (results, tables, CSVs, dataset.json edits).

Write to ``<path>.tmp`` and rename over ``path``: a crash or a full disk never leaves a half-written file for nnU-Net
or a user to read. Standard library only, so light commands (``import-labels``) stay fast.
"""

from __future__ import annotations

import json
import os


def write_text_atomically(path: str, text: str) -> None:
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def default_file_mode(path: str) -> None:
    """Give a file made by ``tempfile.mkstemp`` (always 0600) the mode a plain ``open`` would have given it (0666
    minus the umask), so renamed results are readable like the rest of nnU-Net's output."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_json_atomically(path: str, obj, indent: int = 2) -> None:
    write_text_atomically(path, json.dumps(obj, indent=indent))
