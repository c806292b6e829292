"""Guards for what the commands write and read: nothing a user already has is overwritten,
writes are atomic, and non-finite weights are never saved or scored. Every writer uses these (the
method's saves included), so this module imports only torch; a training run's own folder and its
Trainer callbacks live in ``mor.train.run_folder`` and ``mor.train.callbacks``.

- :func:`check_output_place`: an output is never one of the command's inputs.
- :func:`claim_output_folder` / :func:`check_output_file` (``merge``, ``analyze``, ``eval``):
  a non-empty folder or an existing file is replaced only with ``--overwrite``, and never when
  it is one of the command's own inputs.
- :func:`atomic_folder` / :func:`atomic_write_text`: write to a temporary sibling and rename,
  so a kill leaves the previous result intact.
- :func:`check_adapter_weights`, :func:`nonfinite_tensors`: NaN/inf (or absurdly large) weights
  are refused at load and never written.
- :class:`Stopped`: a command stopped by a signal, with the exit status the CLI returns.

Every refusal is an :class:`OutputError` or :class:`AdapterError` (both ``ValueError``), which
the CLI prints as one ``error:`` line with exit status 2.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from .errors import AdapterError, OutputError, SettingsError
from .stopping import EXIT_PREEMPTED, Stopped  # noqa: F401  (names of mor.safety too)

ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors",)


# -- the one output-ownership rule -------------------------------------------------------------------

def _input_paths(inputs: Mapping[str, Any] | None) -> Iterator[tuple[str, Path]]:
    """``(flag, path)`` of every input that exists on disk (a hub id or an unset flag has nothing to harm)."""
    for flag, value in (inputs or {}).items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item not in (None, "") and Path(item).exists():
                yield flag, Path(item)


def check_output_place(output: str | Path, flag: str = "--output", inputs: Mapping[str, Any] | None = None) -> Path:
    """The part of the ownership rule that ``--overwrite`` never lifts: ``output`` (resolved,
    symlinks followed) may not be, contain, or lie inside any of ``inputs`` (``{"--model": path,
    "--data": [paths], ...}``), nor be or contain the current folder, nor lie under a file."""
    path = Path(output)
    out = path.resolve()
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise OutputError(f"{flag} {output} is the current folder or holds it; a command replaces its output as a "
                          f"whole, so give a new folder such as {flag} {Path(output) / 'out'}.")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise OutputError(f"{flag} {output}: {parent} is a file, so nothing can be written under it; "
                              f"choose another {flag}.")
    for place in {_nearest_existing(out), _nearest_existing(out.parent)}:  # the output, and its temporary sibling
        if not os.access(place, os.W_OK):
            code = errno.EROFS if _read_only(place) else errno.EACCES
            raise OutputError(f"{flag} {output}: " + io_error_message(OSError(code, os.strerror(code), str(place)))
                              .replace("cannot write", "cannot write in", 1))
    for input_flag, item in _input_paths(inputs):
        source = item.resolve()
        relation = ("is" if out == source else "holds" if out in source.parents
                    else "lies inside" if source in out.parents else None)
        if relation:
            raise OutputError(f"{flag} {output} {relation} {input_flag} {item}, an input of this command; an output "
                              f"may not be, hold or lie inside an input, even with --overwrite. Choose another {flag}.")
    return path


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def claim_output(output: str | Path, overwrite: bool = False, inputs: Mapping[str, Any] | None = None,
                 flag: str = "--output", kind: str = "folder") -> Path:
    """The one output-ownership rule of every command that writes; call it before any work.

    ``kind`` is "folder" (the command replaces the folder as a whole, see :func:`atomic_folder`)
    or "file" (see :func:`atomic_write_text`). Refused, whatever ``overwrite`` says: the cases of
    :func:`check_output_place`, a folder path that is a file and a file path that is a folder.
    Refused without ``overwrite``: a non-empty folder, an existing file. Nothing on disk changes.
    """
    path = check_output_place(output, flag, inputs)
    if kind == "file":
        if path.is_dir():
            raise OutputError(f"{flag} {path} is a folder; give a file path such as {path / 'results.json'}.")
        if path.exists() and not overwrite:
            raise OutputError(f"{flag} {path} exists; choose another file, or add --overwrite to replace it.")
        return path
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path} is a file; give a folder path.")
    if _entries(path) and not overwrite:
        raise OutputError(f"{flag} {path} is not empty (it holds {_describe(path)}); choose a new folder, "
                          "or add --overwrite to replace it.")
    return path


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _describe(folder: Path) -> str:
    names = _entries(folder)
    return ", ".join(names[:4]) + (f", ... ({len(names)} entries)" if len(names) > 4 else "")


def claim_output_folder(folder: str | Path, overwrite: bool, flag: str = "--output",
                        inputs: Mapping[str, Any] | None = None) -> Path:
    """:func:`claim_output` of a folder the command replaces as a whole."""
    return claim_output(folder, overwrite, inputs, flag, kind="folder")


def check_output_file(path: str | Path, overwrite: bool, flag: str = "--output",
                      inputs: Mapping[str, Any] | None = None) -> Path:
    """:func:`claim_output` of a single file."""
    return claim_output(path, overwrite, inputs, flag, kind="file")


# -- atomic writes ---------------------------------------------------------------------------------

TEMP_SUFFIX = ".tmp"


def _temp_name(path: Path) -> str:
    return f".{path.name}."  # mkstemp/mkdtemp add a unique part: ".<name>.<random>.tmp"


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a unique temporary path next to ``path`` to write the file into; on success it is
    flushed to disk and renamed over ``path``. On an error (a full disk, a kill signal turned
    into an exception) ``path`` is left as it was and the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_name(path), suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@contextlib.contextmanager
def atomic_folder(folder: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to write into; on success it replaces ``folder`` as a
    whole (old files do not survive next to new ones). On an error, or a kill, ``folder`` is
    left as it was and the temporary folder is removed (or, after a kill -9, left as a hidden
    ``.name.*.tmp`` sibling)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_name(folder), suffix=TEMP_SUFFIX, dir=folder.parent))
    try:
        yield tmp
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=_temp_name(folder), suffix=".old", dir=folder.parent))
            os.replace(folder, old / folder.name)
            try:
                os.replace(tmp, folder)
            except BaseException:
                os.replace(old / folder.name, folder)  # put the previous result back
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_free_space(folder: str | Path, need_bytes: int, what: str, flag: str = "--output") -> None:
    """Refuse to start work whose output (about ``need_bytes``) cannot fit on the disk of ``folder``."""
    place = _nearest_existing(Path(folder).resolve())
    free = shutil.disk_usage(place).free
    if need_bytes > free:
        raise OutputError(f"{flag} {folder}: {what} needs about {_size(need_bytes)} but the disk holding {place} has "
                          f"{_size(free)} free; free some space or choose an {flag} on another disk.")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def check_training_space(output: str | Path, trainable_parameters: int, save_total_limit: int | None = 2,
                         bytes_per_parameter: int = 4) -> None:
    """Refuse a training run whose adapter and checkpoints will not fit on the disk of ``output``,
    before it trains: the adapter once, plus ``save_total_limit`` checkpoints of the adapter and
    Adam's two moments, plus 8 MiB per copy for the tokenizer and the trainer's state."""
    copies = 1 + (save_total_limit or 2)
    weights = trainable_parameters * bytes_per_parameter
    need = weights + (copies - 1) * 3 * weights + copies * 8 * 2**20
    check_free_space(output, need, f"training (the adapter and {copies - 1} checkpoints)")


# -- sizes that cannot fit -------------------------------------------------------------------------

TRAINING_BYTES_PER_PARAMETER = 16  # fp32 weight, gradient and Adam's two moments


def available_memory() -> int:
    """Bytes of memory this process may still take (``MemAvailable`` of /proc/meminfo, else all of it)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_adapter_fits(parameters: int, what: str, activation_floats: int = 0, training: bool = True) -> None:
    """Refuse an adapter of ``parameters`` parameters whose weights (and, when ``training``,
    gradients and Adam moments) plus ``activation_floats`` fp32 activations would not fit in the
    memory left, before any is allocated."""
    need = parameters * (TRAINING_BYTES_PER_PARAMETER if training else 4) + 4 * activation_floats
    free = available_memory()
    if need > free:
        raise SettingsError(f"{what} has {parameters:,} parameters: about {_size(need)} to "
                            f"{'train' if training else 'load'} (weights" + (", gradients, optimizer state" if training
                                                                              else "")
                            + (", activations" if activation_floats else "") + f"), but {_size(free)} of memory is "
                            "available. Lower --r or --num-experts (or --batch-size, --max-length, or the targets).")


# -- faults of the machine, as one line ------------------------------------------------------------

_OS_ERROR_CODE = re.compile(r"(?:code: |\[Errno |os error )(\d+)")
_TEMP_PART = re.compile(r"\.([^/]+?)\.[A-Za-z0-9_]+\.(?:tmp|old)(?=/|$)")


TORCH_SAVE_FAILED = ("file write failed", "inline_container.cc")
"""How torch.save reports a write that the disk refused (it drops the OS error code): on a full
disk, "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"."""


def io_error_message(err: BaseException) -> str | None:
    """One line for a fault of the machine met while reading or writing (a full disk, a
    read-only or unwritable folder, a busy path), or None when ``err`` is not such a fault.
    ``err`` is an ``OSError`` or an error of a writer (safetensors, torch.save) that carries an
    OS error code in its text. The line says that nothing was replaced: every write is atomic."""
    code = err.errno if isinstance(err, OSError) else None
    if code is None:
        found = _OS_ERROR_CODE.search(str(err))
        if found is None:
            if isinstance(err, RuntimeError) and any(sign in str(err) for sign in TORCH_SAVE_FAILED):
                code = errno.ENOSPC
            else:
                return None
        else:
            code = int(found.group(1))
    where = getattr(err, "filename", None)
    where = " " + _TEMP_PART.sub(r"\1", str(where)) if where else ""
    if code == errno.ENOSPC or code == errno.EDQUOT:
        return (f"no space left on the device while writing{where}; the previous result there is intact. "
                "Free some space, or choose an --output on a disk with more room, and run again.")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        kind = "read-only" if code == errno.EROFS else "not writable by this user"
        return (f"cannot write{where}: the folder is {kind} ({os.strerror(code)}); choose a writable folder "
                "for --output and run again.")
    if code == errno.EBUSY:
        return f"cannot replace{where}: {os.strerror(code)} (a mount point or the current folder); choose another --output."
    if isinstance(err, OSError):
        return f"{os.strerror(code) if code else type(err).__name__}{':' if where else ''}{where}"
    return None


# -- non-finite weights -------------------------------------------------------------------------------

def nonfinite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold NaN or inf."""
    return [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]


MAX_ADAPTER_WEIGHT = 1e4
"""Largest |value| accepted in an adapter file. Trained adapters hold values of order 1 (LoRA
factors, expert scales, router weights; DoRA's magnitudes are row norms of the base weight);
far larger ones overflow the forward pass (3e38, finite, made every log-likelihood NaN)."""


def oversized_tensors(tensors: Mapping[str, torch.Tensor], bound: float = MAX_ADAPTER_WEIGHT) -> list[tuple[str, float]]:
    """``(name, max |value|)`` of the floating-point tensors with a value beyond ``bound``."""
    out = []
    for name, t in tensors.items():
        if t.is_floating_point() and t.numel():
            peak = t.detach().abs().max().item()
            if peak > bound:
                out.append((name, peak))
    return out


def check_adapter_weights(folder: str | Path) -> None:
    """Refuse an adapter folder (MoR/MoE-LoRA or peft LoRA/DoRA) whose safetensors file cannot
    be read, holds NaN/inf values, or values beyond :data:`MAX_ADAPTER_WEIGHT`. A folder without
    a safetensors file is left to the loader."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for name in ADAPTER_WEIGHT_FILES:
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, RuntimeError) as err:
            raise AdapterError(f"{path}: cannot read the adapter weights ({err}); the file is corrupted or not a "
                               "safetensors file: re-save or retrain the adapter.") from None
        bad = nonfinite_tensors(tensors)
        if bad:
            raise AdapterError(f"{path}: {len(bad)} of {len(tensors)} adapter tensors hold NaN or inf (e.g. "
                               f"{bad[0]}); the training that wrote it diverged: retrain with a lower --lr.")
        huge = oversized_tensors(tensors)
        if huge:
            name, value = huge[0]
            raise AdapterError(f"{path}: {len(huge)} adapter tensors hold values far beyond any trained adapter "
                               f"(e.g. |{name}| up to {value:.3g}; the bound is {MAX_ADAPTER_WEIGHT:g}); such weights "
                               "make every score NaN. The file is corrupt or the training diverged: retrain it.")
