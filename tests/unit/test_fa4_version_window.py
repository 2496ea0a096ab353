"""The release window of FA4's sm90 fast paths (cpattn/providers/flash/fa4_release_window.py), on CPU.

Inside the window the fast paths load; below or above it (or on a release that cannot be read) they stay off
with one warning per process where an sm90 GPU is visible; CPATTN_FA4_FAST_PATHS=force and =off override the
window either way; `fast_path_status` and `python -m cpattn info` say which path runs and why.
"""

from __future__ import annotations

import types
import warnings

import pytest

from cpattn.providers.flash import FastPathStatus, fa4_release_window, fast_path_status
from cpattn.providers.flash import fa4_sm90_backward, fa4_sm90_forward
from cpattn.providers.flash.fa4_release_window import FAST_PATHS_ENV, FIRST_CHECKED_RELEASE, LAST_CHECKED_RELEASE

INSIDE = FIRST_CHECKED_RELEASE
BELOW = FIRST_CHECKED_RELEASE + ".dev0"  # the development release before the first checked one
JUST_ABOVE = LAST_CHECKED_RELEASE + ".post1"
ABOVE = "99.0"


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch):
    """Each test as a new process would see it: no warning given yet, no override, an sm90 GPU visible."""
    monkeypatch.setattr(fa4_release_window, "_warned", {"window": False, "setting": False})
    monkeypatch.delenv(FAST_PATHS_ENV, raising=False)
    monkeypatch.setattr(fa4_release_window, "sm90_visible", lambda: True)


def _api():
    """An interface module that has every name both fast paths read (they are never launched here)."""
    return types.SimpleNamespace(**{name: object() for name in
                                    fa4_sm90_forward.INTERFACE_NAMES + fa4_sm90_backward.INTERFACE_NAMES})


def _load_both(version):
    return (fa4_sm90_forward.Sm90Forward.load(_api(), version),
            fa4_sm90_backward.Sm90BackwardKernels.load(_api(), version))


@pytest.mark.parametrize("earlier, later", [
    ("4.0.0b35", "4.0.0b36"), ("4.0.0b36", "4.0.0b37"), ("4.0.0b9", "4.0.0b10"), ("4.0.0.dev1", "4.0.0a1"),
    ("4.0.0a9", "4.0.0b1"), ("4.0.0b36", "4.0.0rc1"), ("4.0.0rc1", "4.0.0"), ("4.0.0", "4.0.0.post1"),
    ("4.0.0b36.dev2", "4.0.0b36"), ("4.0.0.post1", "4.0.1"), ("4.0.9", "4.1.0"), ("4.9", "4.10"),
])
def test_releases_are_ordered_as_pip_orders_them(earlier, later):
    assert fa4_release_window.release_key(earlier) < fa4_release_window.release_key(later)


def test_equal_spellings_and_unreadable_versions():
    key = fa4_release_window.release_key
    assert key("4.0") == key("4.0.0") == key("4.0.0+cu128")
    assert key("unknown") is None and not fa4_release_window.in_window("unknown")


def test_inside_the_window_the_fast_paths_load_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        forward, backward = _load_both(INSIDE)
        assert forward is not None and backward is not None
        assert fa4_release_window.in_window(LAST_CHECKED_RELEASE)
    verdict = fa4_release_window.verdict(INSIDE)
    assert verdict.enabled and verdict.in_window and verdict.setting == "auto"


@pytest.mark.parametrize("version", [BELOW, JUST_ABOVE, ABOVE, "unknown"])
def test_outside_the_window_they_stay_off_with_one_warning(version):
    with pytest.warns(RuntimeWarning) as record:
        assert _load_both(version) == (None, None)  # forward and backward: two refusals, one warning
        assert _load_both(version) == (None, None)
    assert len(record) == 1
    message = str(record[0].message)
    assert f"flash-attn-4 {version} is outside" in message
    assert FIRST_CHECKED_RELEASE in message and LAST_CHECKED_RELEASE in message
    assert f"{FAST_PATHS_ENV}=force" in message and f"{FAST_PATHS_ENV}=off" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _load_both(ABOVE) == (None, None)  # another release later in the process: no second warning


def test_no_warning_where_no_sm90_gpu_is_visible(monkeypatch):
    monkeypatch.setattr(fa4_release_window, "sm90_visible", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _load_both(ABOVE) == (None, None)
    assert not fa4_release_window._warned["window"]


@pytest.mark.parametrize("value", ["force", "FORCE", " force "])
def test_force_runs_them_on_any_release_without_a_warning(monkeypatch, value):
    monkeypatch.setenv(FAST_PATHS_ENV, value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for version in (BELOW, INSIDE, ABOVE, "unknown"):
            forward, backward = _load_both(version)
            assert forward is not None and backward is not None, version
    assert "force" in fa4_release_window.verdict(ABOVE).reason


def test_force_still_needs_every_name_the_launches_read(monkeypatch):
    monkeypatch.setenv(FAST_PATHS_ENV, "force")
    api = _api()
    del api._tile_size_fwd_sm90
    assert fa4_sm90_forward.Sm90Forward.load(api, ABOVE) is None


def test_off_keeps_them_off_inside_the_window_without_a_warning(monkeypatch):
    monkeypatch.setenv(FAST_PATHS_ENV, "off")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _load_both(INSIDE) == (None, None)
        assert _load_both(ABOVE) == (None, None)
    assert fa4_release_window.verdict(INSIDE).reason == f"{FAST_PATHS_ENV}=off"


@pytest.mark.parametrize("value", ["", "auto", "AUTO"])
def test_auto_is_the_default(monkeypatch, value):
    monkeypatch.setenv(FAST_PATHS_ENV, value)
    assert fa4_release_window.setting() == "auto"
    assert _load_both(INSIDE)[0] is not None


def test_an_unknown_value_warns_once_and_counts_as_auto(monkeypatch):
    monkeypatch.setenv(FAST_PATHS_ENV, "on")
    with pytest.warns(RuntimeWarning, match=f"{FAST_PATHS_ENV}='on' is not one of auto, force, off") as record:
        assert fa4_release_window.setting() == "auto"
        assert fa4_release_window.setting() == "auto"
    assert len(record) == 1
    assert _load_both(INSIDE)[0] is not None


class _Provider:
    """A stand-in of the `flash` adapter: its availability and the generation it found."""

    name = "flash"

    def __init__(self, generation, ok=True):
        self._generation, self._ok = generation, ok

    def availability(self):
        return types.SimpleNamespace(ok=self._ok)

    def generation(self):
        return self._generation


def _fa4(version, api=None):
    """A FlashAttention-4 generation of a real (not stand-in) library, built around its fast paths only."""
    from cpattn.providers.flash import FlashAttention4

    gen = FlashAttention4.__new__(FlashAttention4)
    gen.version, gen.varlen, gen.standin_devices = version, False, ()
    gen._load_fast_paths(api or _api())
    return gen


def test_status_says_which_path_runs_and_why(monkeypatch):
    on = fast_path_status(_Provider(_fa4(INSIDE)))
    assert on.active and "direct kernel launches" in str(on) and f"flash-attn-4 {INSIDE} is inside" in str(on)
    with pytest.warns(RuntimeWarning):
        off = fast_path_status(_Provider(_fa4(ABOVE)))
    assert not off.active and "the library's functions" in str(off) and f"{FAST_PATHS_ENV}=force" in str(off)
    monkeypatch.setenv(FAST_PATHS_ENV, "off")
    assert str(fast_path_status(_Provider(_fa4(INSIDE)))) == f"the library's functions: {FAST_PATHS_ENV}=off"
    monkeypatch.setenv(FAST_PATHS_ENV, "force")
    forced = fast_path_status(_Provider(_fa4(ABOVE)))
    assert forced.active and f"{FAST_PATHS_ENV}=force" in forced.reason
    monkeypatch.setattr(fa4_release_window, "sm90_visible", lambda: False)
    assert "no sm90 GPU is visible here" in fast_path_status(_Provider(_fa4(INSIDE))).reason


def test_status_of_other_generations_and_of_a_missing_library():
    fa3 = types.SimpleNamespace(title="FlashAttention-3", version="3.0.0")
    assert fast_path_status(_Provider(fa3)) == FastPathStatus(False, "provider 'flash' runs FlashAttention-3 3.0.0")
    assert not fast_path_status(_Provider(None, ok=False)).active
    api = _api()
    del api._bwd_preprocess
    assert "lacks _bwd_preprocess" in fast_path_status(_Provider(_fa4(INSIDE, api))).reason


def test_info_prints_the_fa4_path(monkeypatch):
    from standins import flash_attn_standin as standin
    from test_provider_flash import install

    import cpattn.info

    install(monkeypatch, standin.fa4_modules())
    stand_in = "the library's functions: the flash-attn-4 module is a test stand-in"
    assert cpattn.info.fa4_path() == f"FA4 sm90 path: {stand_in}\nFA4 sm90 varlen path: {stand_in}"
    install(monkeypatch, {})
    assert cpattn.info.fa4_path() == (
        "FA4 sm90 path: the library's functions: provider 'flash' is not available\n"
        "FA4 sm90 varlen path: the library's functions: provider 'flash_varlen' is not available")


def test_the_varlen_status_names_the_varlen_launches():
    on = FastPathStatus(True, "checked", "varlen forward and backward")
    assert str(on) == "direct kernel launches on sm90 (varlen forward and backward): checked"
    assert "one dQ accumulator per ring rank" in str(FastPathStatus(True, "checked"))


@pytest.mark.parametrize("setting, listed, runs", [
    ("", False, False),  # auto, a release whose varlen launches were never checked on a GPU
    ("", True, True),
    ("force", False, True),
    ("off", True, False),
])
def test_varlen_launches_run_only_on_releases_that_passed_their_gpu_check(monkeypatch, setting, listed, runs):
    monkeypatch.setenv(fa4_release_window.FAST_PATHS_ENV, setting)
    monkeypatch.setattr(fa4_release_window, "VARLEN_CHECKED_RELEASES", (INSIDE,) if listed else ())
    assert fa4_release_window.allows(INSIDE) is (setting != "off")  # the dense fast paths: the window alone
    assert fa4_release_window.varlen_allows(INSIDE) is runs
    if not runs and setting != "off":
        assert "fa4_direct_check.py --only varlen" in fa4_release_window.varlen_reason(INSIDE)


@pytest.mark.parametrize("setting, varlen_listed, shared_listed, runs", [
    ("", True, False, False),  # auto: the varlen launches were checked, the shared accumulator was not
    ("", True, True, True),
    ("", False, True, False),  # no varlen launches, no accumulator over them
    ("force", False, False, True),
    ("off", True, True, False),
])
def test_the_packed_rings_shared_accumulator_runs_only_on_releases_that_passed_its_check(
        monkeypatch, setting, varlen_listed, shared_listed, runs):
    monkeypatch.setenv(fa4_release_window.FAST_PATHS_ENV, setting)
    monkeypatch.setattr(fa4_release_window, "VARLEN_CHECKED_RELEASES", (INSIDE,) if varlen_listed else ())
    monkeypatch.setattr(fa4_release_window, "SHARED_VARLEN_CHECKED_RELEASES", (INSIDE,) if shared_listed else ())
    assert fa4_release_window.shared_varlen_allows(INSIDE) is runs
    if not runs and setting == "" and varlen_listed:
        assert "shared_varlen_check.py" in fa4_release_window.shared_varlen_reason(INSIDE)


def test_the_generation_keeps_no_shared_accumulator_where_its_release_is_unchecked():
    """A generation whose accumulator is off hands the packed ring None before touching any tensor (each chain
    then runs its own backward)."""
    from cpattn.providers.flash.fa4 import FlashAttention4

    gen = FlashAttention4.__new__(FlashAttention4)
    gen._shared_varlen, gen._varlen_kernels = False, object()
    assert gen.shared_varlen_backward(None, None, None, None, None, None, True) is None


@pytest.mark.parametrize("shared_listed", [False, True])
def test_the_varlen_status_says_whether_the_shared_accumulator_runs(monkeypatch, shared_listed):
    """`python -m cpattn info`'s varlen line names the packed ring's accumulator: off, with the check to run,
    on an unchecked release; on where the release passed it."""
    from cpattn.providers.flash.fa4 import FlashAttention4

    monkeypatch.setenv(fa4_release_window.FAST_PATHS_ENV, "")
    monkeypatch.setattr(fa4_release_window, "VARLEN_CHECKED_RELEASES", (INSIDE,))
    monkeypatch.setattr(fa4_release_window, "SHARED_VARLEN_CHECKED_RELEASES", (INSIDE,) if shared_listed else ())
    gen = FlashAttention4.__new__(FlashAttention4)  # the attributes _load_fast_paths sets on a real library
    gen.version, gen.varlen, gen.standin_devices, gen._missing_fast_path_names = INSIDE, True, (), []
    gen.fast_path_verdict = fa4_release_window.verdict(INSIDE)
    gen._direct_forward = gen._backward_kernels = None
    gen._varlen_forward = gen._varlen_kernels = object()
    gen._shared_varlen = fa4_release_window.shared_varlen_allows(INSIDE)
    text = str(gen.fast_path_status())
    assert "varlen forward and backward" in text
    if shared_listed:
        assert "dQ accumulator per rank: on" in text
    else:
        assert "dQ accumulator per rank: off" in text and "shared_varlen_check.py" in text
