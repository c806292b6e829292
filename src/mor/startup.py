"""What ``import mor`` does, cheaply (no torch, no peft: ``mor --help`` must stay instant):

- drops the warnings of other libraries that no user can act on (:func:`silence_unactionable_warnings`);
- registers MoR as a peft method as soon as peft is there (:func:`register_with_peft_when_imported`):
  at once if peft is already imported, else at the end of the import that first brings peft in —
  ``import peft`` anywhere, or a mor module that imports it (MoR's classes exist only once that
  import has finished, so registering halfway through it would find them half-defined).
"""

from __future__ import annotations

import importlib.abc
import logging
import sys
import threading

#: (logger, message start) of warnings nobody can act on: bitsandbytes, imported by peft, logs the first on
#: every import on a CPU with AVX512-BF16 when the optional `kernels` package (a hub download) is absent,
#: and then runs its own CPU kernel; DeepSpeed, imported by transformers' Trainer, the second on every
#: machine without a GPU.
UNACTIONABLE_WARNINGS = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    ("DeepSpeed", "Setting accelerator to CPU."),
)


class _DropMessage(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def silence_unactionable_warnings() -> None:
    """Drop exactly the messages of ``UNACTIONABLE_WARNINGS`` (the loggers' other messages still show).
    Must run before the library is imported: bitsandbytes logs at import time."""
    for name, start in UNACTIONABLE_WARNINGS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.start == start for f in logger.filters):
            logger.addFilter(_DropMessage(start))


def register_with_peft_when_imported() -> None:
    """``mor.model.register()`` now if peft is imported, else once the import that brings peft in ends."""
    if "peft" in sys.modules:
        from .model import register

        register()
    elif not any(isinstance(finder, _RegisterWithPeft) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterWithPeft())


class _RegisterWithPeft(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it hands back the spec the other finders give for ``peft`` and ``mor.*``
    modules, with a loader that counts the module bodies running; when the outermost one has run
    with peft imported, it registers MoR and removes itself (kept, to try again, if that raised)."""

    def __init__(self):
        self.running = 0  # peft / mor module bodies executing now (nested imports, any thread)
        self.registering = False
        self.lock = threading.Lock()

    def find_spec(self, name, path=None, target=None):
        if name != "peft" and not name.startswith("mor."):
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else getattr(finder, "find_spec", lambda *a: None)(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _CountedLoader(spec.loader, self)
                return spec
        return None

    def run(self, loader: importlib.abc.Loader, module) -> None:
        module.__loader__ = module.__spec__.loader = loader  # nothing after the import sees the wrapper
        with self.lock:
            self.running += 1
        try:
            loader.exec_module(module)
        finally:
            with self.lock:
                self.running -= 1
        with self.lock:  # the module ran without an exception
            register_now = self.running == 0 and not self.registering and "peft" in sys.modules
            self.registering |= register_now
        if register_now:  # the outermost import has ended
            from .model import register

            try:
                register()  # its own imports come back here, as nested ones: nothing registers twice
                sys.meta_path.remove(self)
            finally:
                self.registering = False


class _CountedLoader(importlib.abc.Loader):
    """The module's own loader, whose ``exec_module`` goes through ``_RegisterWithPeft.run``; the rest
    of its interface is the loader's (``python -m`` calls ``get_code``; resources, ``is_package`` ...)."""

    def __init__(self, loader: importlib.abc.Loader, finder: _RegisterWithPeft):
        self.loader, self.finder = loader, finder

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.finder.run(self.loader, module)

    def __getattr__(self, name: str):
        return getattr(self.loader, name)
