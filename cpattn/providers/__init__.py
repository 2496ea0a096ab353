"""The provider registry: one adapter object per provider name, built once, libraries imported lazily.

Each kernel family lives in its own module and exports `make_providers()`. Adding a provider means adding
an adapter there (capabilities + kernel calls) and its name to `cpattn.names.AttentionProvider`.
"""

from __future__ import annotations

from ..contract import Provider
from ..errors import InvalidArgumentError
from ..names import AttentionProvider
from . import auto, flash, flex, native, sage, xformers

_FAMILIES = (native, flex, flash, sage, xformers)


def _build() -> dict[str, Provider]:
    registry: dict[str, Provider] = {}
    for module in _FAMILIES:
        for provider in module.make_providers():
            registry[provider.name] = provider
    unknown = set(registry) - {p.value for p in AttentionProvider}
    assert not unknown, f"providers without an AttentionProvider name: {unknown}"
    return registry


PROVIDERS: dict[str, Provider] = _build()
# "auto" chooses among the providers above per call; it is a name users may pass, not a kernel, so it is
# kept out of PROVIDERS (and of the AttentionProvider enum, whose values are the kernel providers).
AUTO_NAME = "auto"
AUTO = auto.make_auto(PROVIDERS)
AUTO_TUNED = auto.make_auto(PROVIDERS, autotune=True)  # attention_provider("auto", autotune=True)

# Order in which an error message suggests alternatives (fast and general first).
PREFERENCE = (
    "flash", "_native_cudnn", "flash_varlen", "xformers", "_native_flash", "_native_efficient", "flex",
    "native", "_native_math", "sage", "sage_varlen",
)


def get_provider(name: "str | AttentionProvider | Provider") -> Provider:
    """The adapter for a provider name or enum member; a clear error names the valid choices."""
    if isinstance(name, Provider):
        return name
    key = name.value if isinstance(name, AttentionProvider) else name
    if isinstance(key, str) and key in PROVIDERS:  # attention_provider(...) per call: the common case first
        return PROVIDERS[key]
    if key == AUTO_NAME:
        return AUTO
    if not isinstance(key, str) or key not in {p.value for p in AttentionProvider}:
        valid = ", ".join([p.value for p in AttentionProvider] + [AUTO_NAME])
        raise InvalidArgumentError(f"unknown attention provider {name!r}; valid names: {valid}")
    if key not in PROVIDERS:
        raise InvalidArgumentError(f"provider '{key}' is named but has no adapter in this build of cpattn")
    return PROVIDERS[key]


def suggest(call, exclude: str, **need) -> str | None:
    """A provider that can take `call` (used in error messages; never used to run anything)."""
    order = list(PREFERENCE) + [n for n in PROVIDERS if n not in PREFERENCE]
    for name in order:
        provider = PROVIDERS.get(name)
        if provider is None or name == exclude:
            continue
        if not provider.reasons(call, **need):
            return f"provider '{name}'"
    return None
