"""The provider table is the one spelling of the provider list: the enum, the registry, aliases, suggestions,
auto's order and the agreement/compile codes all come from it."""

from __future__ import annotations

import pytest
import torch

import cpattn
from cpattn.call import make_call
from cpattn.names import ALIASES, PROVIDER_TABLE, AttentionProvider, auto_order, canonical_name
from cpattn.providers import AUTO, PREFERENCE, PROVIDERS, get_provider, provider_code, provider_of_code, suggest
from cpattn.providers.auto import ORDER


def test_enum_registry_and_table_name_the_same_providers():
    table = [row.name for row in PROVIDER_TABLE]
    assert [p.value for p in AttentionProvider] == table
    assert sorted(PROVIDERS) == sorted(table)
    assert len(set(table)) == len(table)


@pytest.mark.parametrize("alias, name", [("cudnn", "_native_cudnn"), ("sdpa_flash", "_native_flash"),
                                         ("efficient", "_native_efficient"), ("math", "_native_math")])
def test_aliases_name_the_seed_providers(alias, name):
    assert ALIASES[alias] == name and canonical_name(alias) == name
    assert get_provider(alias) is get_provider(name) is PROVIDERS[name]
    with cpattn.attention_provider(alias):
        assert cpattn.current_provider() is PROVIDERS[name]


def test_alias_in_the_environment(monkeypatch):
    monkeypatch.setenv("CPATTN_PROVIDER", "math")
    assert cpattn.current_provider() is PROVIDERS["_native_math"]
    q = torch.randn(1, 2, 5, 8)
    out = cpattn.attention_dispatch(q, q, q, is_causal=True)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True))


def test_unknown_names_list_aliases_too():
    with pytest.raises(cpattn.InvalidArgumentError, match=r"_native_cudnn \(or cudnn\)"):
        get_provider("cudnn2")


def test_auto_order_and_suggestions_follow_the_table():
    table = [row.name for row in PROVIDER_TABLE]
    assert ORDER["cuda"] == auto_order("cuda") == tuple(n for n in table if "cuda" in dict(
        (row.name, row.auto_on) for row in PROVIDER_TABLE)[n])
    assert ORDER["cpu"] == ("_native_flash", "_native_math")
    assert list(PREFERENCE) == table
    assert not any(name.startswith(("sage", "_sage")) for name in ORDER["cuda"])  # quantised: opt-in only
    q = torch.randn(1, 2, 4, 8, requires_grad=True)
    call = make_call(q, q, q, None, 0.0, False, None, False)
    # On CPU the first provider in the table that takes a training call is suggested.
    expected = next(n for n in table if n != "flex" and not PROVIDERS[n].reasons(call))
    assert suggest(call, exclude="flex") == f"provider '{expected}'"


def test_codes_round_trip():
    for name, provider in PROVIDERS.items():
        assert provider_of_code(provider_code(provider)) is provider
    assert provider_of_code(provider_code(AUTO)) is AUTO
    assert len({provider_code(p) for p in PROVIDERS.values()}) == len(PROVIDERS)


def test_auto_puts_providers_with_native_windows_first_for_windowed_calls():
    """Without a window the measured order stands; with one, kernels that skip the work outside it (flash,
    flash_varlen, flex) come before those that would compute every score under a dense mask."""
    from types import SimpleNamespace

    plain = SimpleNamespace(device=torch.device("cuda"), kv_len=1 << 16, window=None)
    windowed = SimpleNamespace(device=torch.device("cuda"), kv_len=1 << 16, window=(4095, 0))
    assert AUTO.order(plain) == ORDER["cuda"]
    order = AUTO.order(windowed)
    native = [n for n in order if PROVIDERS[n].capabilities("cuda").window]
    assert set(native) >= {"flash", "flash_varlen", "flex"}
    assert list(order[:len(native)]) == native and sorted(order) == sorted(ORDER["cuda"])
    assert order.index("flex") < order.index("_native_cudnn")
