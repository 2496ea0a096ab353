"""Helpers for adapters of optional libraries: versions, declared parameters, and test stand-ins.

Optional libraries are imported lazily inside a provider's `_probe()`, so `import cpattn` never fails because
one of them is missing or broken. A stand-in (a torch re-implementation of a library's Python API, used by
the tests to exercise adapter glue on CPU) declares itself with the module attribute named by
`STANDIN_DEVICES_ATTR`; only then may an adapter accept devices the real library does not run on.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import re
from types import ModuleType

import torch

from ..contract import Capabilities

STANDIN_DEVICES_ATTR = "__cpattn_standin_devices__"

_NOT_PARAMETERS = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def parse_version(text: str) -> tuple[int, ...]:
    """Comparable tuple of a release string: '2.1.1' -> (2, 1, 1, 0), '0.0.29.post3' -> (0, 0, 29, 3).

    Local labels ('+cu126') and pre-release tags are ignored; enough for the minimum-version checks here
    without depending on `packaging`.
    """
    release = re.match(r"\d+(?:\.\d+)*", text.strip())
    numbers = [int(part) for part in release.group(0).split(".")] if release else [0]
    numbers += [0] * (3 - len(numbers))
    post = re.search(r"\.?post(\d+)", text)
    return (*numbers, int(post.group(1)) if post else 0)


def installed_version(module: ModuleType, distribution: str) -> str | None:
    """The module's `__version__`, else the installed distribution's metadata version, else None."""
    version = getattr(module, "__version__", None)
    if isinstance(version, str):
        return version
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def declared_parameters(fn) -> set[str]:
    """Names `fn` declares explicitly. A name absent here would vanish into **kwargs without effect."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature: trust nothing
        return set()
    return {name for name, p in params.items() if p.kind not in _NOT_PARAMETERS}


def missing_parameters(fn, names) -> list[str]:
    declared = declared_parameters(fn)
    return [name for name in names if name not in declared]


def is_missing_module(exc: ImportError, module_name: str) -> bool:
    """True when the import failed because the package itself is absent (not because it is broken)."""
    missing = getattr(exc, "name", None)
    return isinstance(exc, ModuleNotFoundError) and missing is not None and module_name.startswith(missing)


def standin_devices(module: ModuleType | None) -> tuple[str, ...]:
    """Devices a test stand-in says it computes on; () for the real library."""
    return tuple(getattr(module, STANDIN_DEVICES_ATTR, ()) or ())


def standin_capabilities(cuda_caps: Capabilities) -> Capabilities:
    """What a provider offers on CPU through a stand-in: the CUDA capabilities without a compute capability,
    plus float32 (stand-ins compute in float32, so tests can hold them to float32 tolerances)."""
    return dataclasses.replace(
        cuda_caps,
        dtypes=cuda_caps.dtypes | {torch.float32},
        min_compute_capability=None,
        notes=cuda_caps.notes + ("CPU only through a test stand-in of the library, never the real kernels",),
    )
