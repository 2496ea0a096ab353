"""The support matrix in the docs is generated from the code; it must not drift."""

import os

from cpattn.info import support_matrix_markdown

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs", "support-matrix.md")


def test_docs_support_matrix_matches_the_declared_capabilities():
    with open(DOC) as f:
        on_disk = f.read()
    assert on_disk == support_matrix_markdown(), "run: python -m cpattn matrix > docs/support-matrix.md"


def test_matrix_has_a_row_per_provider_and_device():
    text = support_matrix_markdown()
    import cpattn

    for name, provider in cpattn.PROVIDERS.items():
        for device in provider.supports:
            assert f"| {name} | {device} |" in text
    # a provider without LSE can never ring; one without backward can never train under ring
    assert "| sage_varlen | cuda |" in text and "| - | fwd | - |" in text
