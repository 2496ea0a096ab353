"""Placeholder: this family's adapters are being written."""


def make_providers():
    return []
