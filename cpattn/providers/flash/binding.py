"""Binding FlashAttention's functions by parameter name, checked once when a generation loads.

The contract's forward needs the log-sum-exp and its backward takes an external (out, lse): only the libraries'
private functions give both, and their parameters changed between releases. `bind` reads a function's
parameters (from the custom-op schema where the library registers one, else the Python signature) and refuses
it with a message naming the generation, the function and the parameter, instead of a TypeError deep inside a
kernel call. Calls pass keywords only; parameters without a default that cpattn does not set get values that
switch their feature off (no window, softcap or ALiBi).

Score modifications are features a function may lack (`FEATURES`): `bind` records which of them it takes and
under which parameters, a generation refuses the calls that need one its functions lack, and a call that passes
one to a function without it raises: a window or softcap is never dropped.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

# Values for kernel parameters that have no default and that cpattn never sets: each switches a feature off.
NEUTRAL_ARGS = {
    "window_size": (-1, -1),
    "window_size_left": -1,
    "window_size_right": -1,
    "softcap": 0.0,
    "alibi_slopes": None,
    "return_softmax": False,
    "block_table": None,
    "rng_state": None,
    "leftpad_k": None,
    "seqused_q": None,
    "seqused_k": None,
}


# Score modifications the adapters pass by cpattn's name, and the library parameters that take them, in the order
# they are looked for. A window is (left, right) in the library's convention: one `window_size` pair (FA2 <= 2.6's
# private functions, every public function) or two sides (FA2 >= 2.7's and FA3's private functions, FA4's).
FEATURES = {
    "window": (("window_size",), ("window_size_left", "window_size_right")),
    "softcap": (("softcap",),),
    "learnable_sink": (("learnable_sink",),),
}


class FlashApiError(Exception):
    """An installed FlashAttention cannot be used as found (its private API changed, or it is too old)."""


def parameters(fn: Callable) -> dict[str, bool] | None:
    """Parameter name -> whether it has a default. flash-attn >= 2.7 and FA3 wrap their private functions in
    torch custom ops, whose Python signature is (*args, **kwargs): read the op schema there instead."""
    schema = getattr(getattr(fn, "_opoverload", None), "_schema", None)
    if schema is not None:
        return {arg.name: arg.has_default_value() for arg in schema.arguments}
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return {
        p.name: p.default is not inspect.Parameter.empty
        for p in signature.parameters.values()
        if p.kind not in variadic
    }


@dataclass(frozen=True)
class BoundFunction:
    """One library function whose parameters were checked when it was bound; called with keywords only."""

    fn: Callable
    where: str
    renames: dict[str, str]  # the adapter's name -> the library's, where releases differ (causal / is_causal)
    accepted: frozenset[str]
    optional: frozenset[str]  # names the adapter passes only where the library has them
    fill: dict[str, Any]  # neutral values for parameters without default that the adapter does not set
    features: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)  # FEATURES it takes, and how

    def __call__(self, **kwargs):
        return self.fn(**self._arguments(kwargs))

    def takes(self, feature: str) -> bool:
        """Whether the function has the parameters of `feature` (a name in FEATURES)."""
        return feature in self.features

    def lacks(self, feature: str) -> str:
        """`feature`'s missing parameter in words, e.g. "flash_attn.cute.interface._flash_attn_fwd has no
        parameter 'softcap'"."""
        names = " or ".join("/".join(f"'{name}'" for name in spelling) for spelling in FEATURES[feature])
        return f"{self.where} has no parameter {names}"

    def partial(self, **fixed) -> Callable:
        """The function with `fixed` bound once (renamed and filled as a call would): a cached runner calls it
        with the remaining keywords and pays for no renaming."""
        return functools.partial(self.fn, **self._arguments(fixed))

    def _arguments(self, kwargs: dict) -> dict:
        """The library's keywords for the adapter's: renamed, filled with neutral values, checked."""
        args = dict(self.fill)
        for name, value in kwargs.items():
            if name in FEATURES:
                self._put_feature(args, name, value)
                continue
            actual = self.renames.get(name, name)
            if actual in self.accepted:
                args[actual] = value
            elif name not in self.optional:
                raise TypeError(f"cpattn passes '{name}' to {self.where}, which was not checked when it was bound")
        return args

    def _put_feature(self, args: dict, feature: str, value) -> None:
        spelling = self.features.get(feature)
        if spelling is None:  # the generation refuses such calls first; never drop the argument silently
            raise TypeError(f"cpattn passes '{feature}' to {self.lacks(feature)}")
        if len(spelling) == 1:
            args[spelling[0]] = value
        else:
            args.update(zip(spelling, value))


def bind(
    title: str, module: Any, module_name: str, fn_name: str, needs: Sequence[str | tuple[str, ...]],
    optional: Sequence[str] = (), features: Sequence[str] = (),
) -> BoundFunction:
    """Check that `module.fn_name` takes every parameter in `needs` (a tuple lists accepted spellings, the
    adapter's first) and nothing required beyond them; raise FlashApiError naming what differs. `features`
    (names in FEATURES) are looked up too; the function may lack them (see BoundFunction.takes)."""
    where = f"{module_name}.{fn_name}"
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise FlashApiError(f"{title}: {where} does not exist in this version (its private API changed)")
    params = parameters(fn)
    if params is None:
        raise FlashApiError(f"{title}: cannot read the parameters of {where}")
    renames, passed = _spellings(title, where, params, needs)
    passed |= {name for name in optional if name in params}
    # a feature's parameters stay out of `passed`: a call without the feature still needs their neutral fill
    return BoundFunction(fn, where, renames, frozenset(params), frozenset(optional),
                         _neutral_fill(title, where, params, passed), _features(params, features))


def _spellings(title: str, where: str, params: dict[str, bool],
               needs: Sequence[str | tuple[str, ...]]) -> tuple[dict[str, str], set[str]]:
    """The library's spelling of every needed parameter (adapter's name -> library's where they differ) and the
    set of library names the adapter passes."""
    renames, passed = {}, set()
    for need in needs:
        spellings = (need,) if isinstance(need, str) else need
        found = next((name for name in spellings if name in params), None)
        if found is None:
            raise FlashApiError(
                f"{title}: {where} has no parameter '{spellings[0]}' (its private API changed; cpattn's adapter "
                f"cannot call it safely)"
            )
        if found != spellings[0]:
            renames[spellings[0]] = found
        passed.add(found)
    return renames, passed


def _features(params: dict[str, bool], features: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Each feature the function takes -> the first of its spellings whose parameters it has."""
    found = {}
    for feature in features:
        spelling = next((s for s in FEATURES[feature] if all(name in params for name in s)), None)
        if spelling is not None:
            found[feature] = spelling
    return found


def _neutral_fill(title: str, where: str, params: dict[str, bool], passed: set[str]) -> dict[str, Any]:
    """Neutral values for the required parameters the adapter does not pass; FlashApiError for an unknown one."""
    fill = {}
    for name, has_default in params.items():
        if has_default or name in passed:
            continue
        if name not in NEUTRAL_ARGS:
            raise FlashApiError(
                f"{title}: {where} has a new required parameter '{name}' that cpattn does not know how to set"
            )
        fill[name] = NEUTRAL_ARGS[name]
    return fill


def distribution_version(*names: str) -> str | None:
    """The version of the first of these pip distributions that is installed, else None."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def import_library(title: str, name: str):
    """The module, ModuleNotFoundError if it (or a parent package) is not installed, FlashApiError if it is
    installed but fails to import (a missing CUDA extension, a driver error): that one is worth reporting."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
            raise ModuleNotFoundError(f"{title}: {name} is not installed") from exc
        raise FlashApiError(f"{title}: importing {name} failed ({type(exc).__name__}: {exc})") from exc
    except Exception as exc:
        raise FlashApiError(f"{title}: importing {name} failed ({type(exc).__name__}: {exc})") from exc


def first_output(result):
    """Public functions return out, or (out, lse, ...) depending on generation and release."""
    return result[0] if isinstance(result, (tuple, list)) else result
