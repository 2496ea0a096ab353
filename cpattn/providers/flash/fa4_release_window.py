"""The flash-attn-4 releases the sm90 fast paths were checked against, and the override.

Why a window
    The fast paths (fa4_sm90_forward, fa4_sm90_backward) build FA4's private kernel classes and call the compiled
    kernels with positional argument lists written after `flash_attn.cute.interface` of the checked releases.
    A release that adds, drops or reorders one of those arguments, or changes a tile heuristic or the dQ
    accumulator's layout, may still run but compute something else. So, as xformers declares FLASH_VER_MIN and
    FLASH_VER_LAST for flash-attn, they run only on releases from FIRST_CHECKED_RELEASE to LAST_CHECKED_RELEASE
    (both included, pre-releases ordered as pip orders them). Outside it the library's own functions run, and
    one warning per process says so, where an sm90 GPU is visible (elsewhere the fast paths never run anyway).
    Widening the window means running tests/gpu/fa4_direct_check.py on the new release first.

The varlen launches (fa4_sm90_forward.launch_varlen, fa4_sm90_backward.launch_varlen_backward) have a list of
    their own, VARLEN_CHECKED_RELEASES: under 'auto' they run only on a release that passed their GPU check. So
    does the packed ring's one dQ accumulator per rank (SHARED_VARLEN_CHECKED_RELEASES).

Override: the environment variable CPATTN_FA4_FAST_PATHS, read when the `flash` provider first loads FA4
    auto   (default; also when unset or empty) the fast paths run on releases inside the window only
    force  they run on any release that has every name they read (an unchecked release: no warning)
    off    they never run; the library's functions do, without a warning
    Any other value warns once and counts as auto.

`python -m cpattn info` prints which path runs and why (`cpattn.providers.flash.fast_path_status`).
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass

import torch

FAST_PATHS_ENV = "CPATTN_FA4_FAST_PATHS"
SETTINGS = ("auto", "force", "off")
FIRST_CHECKED_RELEASE = "4.0.0b36"
LAST_CHECKED_RELEASE = "4.0.0b36"
# The releases on which the varlen launches (flash_varlen's calls with cu_seqlens) passed
# `tests/gpu/fa4_direct_check.py --only varlen` on a GPU (docs/packed-and-decode.md). Under 'auto' they run only on
# these releases; 'force' runs them anyway, e.g. to run that check on a new release.
VARLEN_CHECKED_RELEASES: tuple[str, ...] = ("4.0.0b36",)
# The releases on which the packed ring's one dQ accumulator per rank (fa4_sm90_backward.SharedVarlenAccumulator:
# the varlen main kernel with seqused lengths, adding into the diagonal call's accumulator) passed
# `tests/gpu/shared_varlen_check.py`. None yet: under 'auto' each chain runs its own varlen backward.
SHARED_VARLEN_CHECKED_RELEASES: tuple[str, ...] = ()

_RELEASE = re.compile(
    r"^v?(?P<release>\d+(?:\.\d+)*)"
    r"(?:[-_.]?(?P<pre>a|alpha|b|beta|rc|c)[-_.]?(?P<pre_n>\d*))?"
    r"(?:[-_.]?post[-_.]?(?P<post>\d*))?"
    r"(?:[-_.]?dev[-_.]?(?P<dev>\d*))?"
    r"(?:\+[a-z0-9.]+)?$",
    re.IGNORECASE,
)
_PRE_RANK = {"a": 0, "alpha": 0, "b": 1, "beta": 1, "rc": 2, "c": 2}
_FINAL = 3  # a release without a pre-release tag sorts after its pre-releases
_warned = {"window": False, "setting": False}  # one warning per process each


def release_key(version: str) -> tuple | None:
    """A sortable key of a release string that orders pre-, post- and dev releases as pip does
    ('4.0.0.dev1' < '4.0.0a1' < '4.0.0b36' < '4.0.0rc1' < '4.0.0' < '4.0.0.post1'); None if it is not one."""
    match = _RELEASE.match(version.strip())
    if match is None:
        return None
    numbers = [int(part) for part in match["release"].split(".")]
    while len(numbers) > 1 and numbers[-1] == 0:
        numbers.pop()  # 4.0 == 4.0.0
    pre, post, dev = match["pre"], match["post"], match["dev"]
    if pre is not None:
        pre_key = (_PRE_RANK[pre.lower()], int(match["pre_n"] or 0))
    else:
        pre_key = (-1, 0) if dev is not None and post is None else (_FINAL, 0)  # 4.0.0.dev1 precedes 4.0.0a1
    post_key = int(post or 0) if post is not None else -1
    dev_key = (0, int(dev or 0)) if dev is not None else (1, 0)
    return (tuple(numbers), pre_key, post_key, dev_key)


def in_window(version: str) -> bool:
    """Whether `version` lies from FIRST_CHECKED_RELEASE to LAST_CHECKED_RELEASE (an unreadable one does not)."""
    key = release_key(version)
    return key is not None and release_key(FIRST_CHECKED_RELEASE) <= key <= release_key(LAST_CHECKED_RELEASE)


def window_text() -> str:
    if FIRST_CHECKED_RELEASE == LAST_CHECKED_RELEASE:
        return f"flash-attn-4 {FIRST_CHECKED_RELEASE}"
    return f"flash-attn-4 {FIRST_CHECKED_RELEASE} to {LAST_CHECKED_RELEASE}"


def setting() -> str:
    """CPATTN_FA4_FAST_PATHS as one of SETTINGS; an unknown value warns once and counts as 'auto'."""
    raw = os.environ.get(FAST_PATHS_ENV, "")
    value = raw.strip().lower() or "auto"
    if value in SETTINGS:
        return value
    if not _warned["setting"]:
        _warned["setting"] = True
        warnings.warn(f"{FAST_PATHS_ENV}={raw!r} is not one of {', '.join(SETTINGS)}; cpattn uses 'auto'",
                      RuntimeWarning, stacklevel=3)
    return "auto"


@dataclass(frozen=True)
class ReleaseVerdict:
    """Whether the fast paths may run on an installed flash-attn-4 release, and why."""

    version: str
    setting: str  # one of SETTINGS
    in_window: bool
    enabled: bool

    @property
    def reason(self) -> str:
        where = "inside" if self.in_window else "outside"
        base = f"flash-attn-4 {self.version} is {where} the checked releases ({window_text()})"
        if self.setting == "off":
            return f"{FAST_PATHS_ENV}=off"
        if self.setting == "force":
            return f"{FAST_PATHS_ENV}=force ({base})"
        if self.in_window:
            return f"{base}, {FAST_PATHS_ENV}=auto"
        return f"{base}; {FAST_PATHS_ENV}=force runs them anyway"


def verdict(version: str) -> ReleaseVerdict:
    """The verdict for `version` under the current CPATTN_FA4_FAST_PATHS (no warning)."""
    mode, inside = setting(), in_window(version)
    return ReleaseVerdict(version, mode, inside, mode == "force" or (mode == "auto" and inside))


def allows(version: str) -> bool:
    """Whether the fast paths may run on `version`; the first refusal of a release outside the window under
    'auto' warns, once per process, where an sm90 GPU is visible."""
    result = verdict(version)
    if not result.enabled and result.setting == "auto" and not _warned["window"] and sm90_visible():
        _warned["window"] = True
        warnings.warn(
            f"cpattn: flash-attn-4 {result.version} is outside the releases its FA4 sm90 fast paths were checked "
            f"against ({window_text()}), so they are off and the library's functions run; set "
            f"{FAST_PATHS_ENV}=force to run them anyway (check first with tests/gpu/fa4_direct_check.py), or "
            f"{FAST_PATHS_ENV}=off to keep them off without this warning",
            RuntimeWarning, stacklevel=3,
        )
    return result.enabled


def varlen_allows(version: str) -> bool:
    """Whether the varlen launches may run on `version`: the fast paths may (`allows`), and the release is one of
    VARLEN_CHECKED_RELEASES or CPATTN_FA4_FAST_PATHS is 'force'."""
    return allows(version) and _checked_or_forced(version, VARLEN_CHECKED_RELEASES)


def varlen_reason(version: str) -> str:
    """Why the varlen launches run or not on `version` (after the fast paths' own verdict)."""
    return _checked_reason(version, VARLEN_CHECKED_RELEASES, "the varlen check",
                           "the varlen launches (tests/gpu/fa4_direct_check.py --only varlen)", "them")


def shared_varlen_allows(version: str) -> bool:
    """Whether the packed ring's one dQ accumulator per rank may run on `version`: the varlen launches may
    (`varlen_allows`), and the release is one of SHARED_VARLEN_CHECKED_RELEASES or CPATTN_FA4_FAST_PATHS is
    'force'."""
    return varlen_allows(version) and _checked_or_forced(version, SHARED_VARLEN_CHECKED_RELEASES)


def shared_varlen_reason(version: str) -> str:
    """Why the packed ring's one dQ accumulator per rank runs or not on `version` (the varlen launches run)."""
    return _checked_reason(version, SHARED_VARLEN_CHECKED_RELEASES, "the shared accumulator's check",
                           "the packed ring's shared dQ accumulator (tests/gpu/shared_varlen_check.py)", "it")


def _checked_or_forced(version: str, checked: tuple[str, ...]) -> bool:
    """A path with a GPU check of its own: on a release in `checked`, or everywhere under 'force'."""
    return verdict(version).setting == "force" or version in checked


def _checked_reason(version: str, checked: tuple[str, ...], check: str, path: str, pronoun: str) -> str:
    """Why such a path runs or not on `version`: 'force', `check` passed, or the GPU check of `path` to run."""
    if verdict(version).setting == "force":
        return f"{FAST_PATHS_ENV}=force"
    if version in checked:
        return f"flash-attn-4 {version} passed {check}"
    return (f"flash-attn-4 {version} has not passed the GPU check of {path}; {FAST_PATHS_ENV}=force runs "
            f"{pronoun} anyway")


def sm90_visible() -> bool:
    """Whether this process sees a CUDA device of compute capability 9.x (the only one the fast paths take)."""
    if not torch.cuda.is_available():
        return False
    return any(torch.cuda.get_device_capability(i)[0] == 9 for i in range(torch.cuda.device_count()))
