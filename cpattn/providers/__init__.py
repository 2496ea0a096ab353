"""The provider registry: one adapter object per row of cpattn.names.PROVIDER_TABLE, built once, libraries
imported lazily.

Each kernel family lives in its own module or package and exports `make_providers()`. Adding a provider means
adding an adapter there (capabilities + kernel calls) and a row to the table; its place in suggestions, in
`auto`'s order, its agreement code and its torch.compile id all follow from that row.
"""

from __future__ import annotations

from ..contract import Provider
from ..errors import InvalidArgumentError
from ..names import ALIASES, AUTO_NAME, CODES, PROVIDER_TABLE, AttentionProvider, canonical_name
from . import auto, flash, flex, native, sage, xformers

_FAMILIES = (native, flex, flash, sage, xformers)


def _build() -> dict[str, Provider]:
    registry: dict[str, Provider] = {}
    for module in _FAMILIES:
        for provider in module.make_providers():
            registry[provider.name] = provider
    unknown = set(registry) - set(CODES)
    assert not unknown, f"providers without a row in cpattn.names.PROVIDER_TABLE: {unknown}"
    return registry


PROVIDERS: dict[str, Provider] = _build()
# "auto" chooses among the providers above per call; it is a name users may pass, not a kernel, so it is
# kept out of PROVIDERS (and of the AttentionProvider enum, whose values are the kernel providers).
AUTO = auto.make_auto(PROVIDERS)
AUTO_TUNED = auto.make_auto(PROVIDERS, autotune=True)  # attention_provider("auto", autotune=True)
# Suggestions in error messages: the table's order, where an adapter exists.
PREFERENCE = tuple(row.name for row in PROVIDER_TABLE if row.name in PROVIDERS)


def valid_names() -> str:
    alias_of = {name: alias for alias, name in ALIASES.items()}
    names = [f"{name} (or {alias_of[name]})" if name in alias_of else name for name in PROVIDERS]
    return ", ".join(names + [AUTO_NAME])


def get_provider(name: "str | AttentionProvider | Provider") -> Provider:
    """The adapter for a provider name, alias or enum member; a clear error names the valid choices."""
    if isinstance(name, Provider):
        return name
    key = name.value if isinstance(name, AttentionProvider) else name
    if isinstance(key, str):
        provider = PROVIDERS.get(key) or PROVIDERS.get(ALIASES.get(key, ""))  # per call: the common case first
        if provider is not None:
            return provider
        if key == AUTO_NAME:
            return AUTO
    if not isinstance(key, str) or canonical_name(key) not in CODES:
        raise InvalidArgumentError(f"unknown attention provider {name!r}; valid names: {valid_names()}")
    raise InvalidArgumentError(f"provider '{key}' is named but has no adapter in this build of cpattn")


def provider_code(provider: Provider) -> int:
    """A provider's position in the table (the same on every rank and process); auto comes after the table."""
    return CODES.get(provider.name, len(CODES))


def provider_of_code(code: int) -> Provider:
    return AUTO if code == len(CODES) else PROVIDERS[PROVIDER_TABLE[code].name]


def suggest(call, exclude: str, **need) -> str | None:
    """A provider that can take `call` (used in error messages; never used to run anything)."""
    for name in PREFERENCE:
        if name != exclude and not PROVIDERS[name].reasons(call, **need):
            return f"provider '{name}'"
    return None
