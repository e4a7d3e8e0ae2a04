"""Generated documentation stays in sync with the patch registry."""

from pathlib import Path

from attnplug.adapters.docs import matrix_cell, stale_docs
from tests.toy import toy_patch

REPO = Path(__file__).resolve().parent.parent


def test_generated_docs_are_up_to_date():
    assert stale_docs(REPO) == [], "run `attnplug docs` and commit the result"


def test_matrix_cells():
    patch = toy_patch(versions=">=0.5,<0.5.20", upstream_has_it=">=0.5.20")
    assert matrix_cell(patch, "0.5.9") == "applies"
    assert matrix_cell(patch, "0.5.23") == "upstream already has it"
    assert matrix_cell(patch, "0.4.0") == "not applicable"
    assert matrix_cell(toy_patch(versions=">=0.5", opt_in="slower"), "0.5.9") == "opt-in (applies when named)"
