"""The deploy writer: DEPLOY/ with plan.json, predictors, the weights and the tokenizer/config files.

Everything is written into a hidden temporary directory beside DEPLOY and renamed into place at the end,
plan.json last, so an interrupted run never leaves a directory that looks like a deploy: either the old
DEPLOY (or nothing) is there, or the complete new one. A failed run removes its temporary directory.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Callable

from engine.errors import PlanError
from engine.executors.predictor import save_predictors

_COPY_CHUNK = 8 << 20
# What an HF directory needs besides the weights: config, tokenizer and chat template files.
_HF_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "tokenizer.model", "chat_template.jinja", "chat_template.json")


def check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise PlanError(f"{out} already exists; choose another -o or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise PlanError(f"{out} exists and is not a directory")


def write(out: Path, source: Path, plan_text_fn: Callable[[str, list[str]], str], predictors: dict, hidden: int,
          ffn: int, overwrite: bool = False, progress: Callable[[str, int, int], None] | None = None,
          bundles_fn: Callable[[Path], None] | None = None, extra_fn: Callable[[Path], None] | None = None) -> Path:
    """Write DEPLOY. plan_text_fn(weights_name, copied_files) returns plan.json's text, made once the
    files are in place (their names go into the plan). bundles_fn(directory), for plans below 100%,
    writes the FFN bundle file into the directory being built (planner/bundles.py); extra_fn(directory)
    any other file the plan names (the 2:4-pruned matrices)."""
    out = Path(out)
    check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        copied = []
        if source.is_dir():
            weights_name = "model"
            (tmp / weights_name).mkdir()
            files = sorted(source.glob("*.safetensors")) + [source / n for n in _HF_SIDE_FILES if (source / n).exists()]
            for f in files:
                _copy(f, tmp / weights_name / f.name, progress)
                copied.append(f"{weights_name}/{f.name}")
        else:
            # GGUF: tokenizer, chat template and config are inside the file.
            weights_name = "model.gguf"
            _copy(source, tmp / weights_name, progress)
            copied.append(weights_name)
        save_predictors(tmp / "predictors.npz", predictors, hidden, ffn)
        if bundles_fn is not None:
            bundles_fn(tmp)
        if extra_fn is not None:
            extra_fn(tmp)
        _write_text(tmp / "plan.json", plan_text_fn(weights_name, copied))
        _fsync_dir(tmp)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _publish(tmp: Path, out: Path) -> None:
    """Rename tmp to out; an existing out (only with overwrite) is moved aside first and removed after."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(out.parent)


def _copy(src: Path, dst: Path, progress) -> None:
    total = src.stat().st_size
    done = 0
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while chunk := fi.read(_COPY_CHUNK):
            fo.write(chunk)
            done += len(chunk)
            if progress:
                progress(f"copy {src.name}", done, total)
        fo.flush()
        os.fsync(fo.fileno())


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return   # some platforms cannot open directories; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass     # fsync on a directory is not supported everywhere
    finally:
        os.close(fd)
