"""Budget parsing: cards, sizes with compute capability, and one-line errors for bad input (negative controls)."""

import pytest

from memprof.budget import CONTEXT_ESTIMATE_BYTES, GiB, MiB, PROFILES, parse_budget
from memprof.errors import UsageError


def test_every_card_names_its_sources():
    for p in PROFILES.values():
        assert p.compute_capability is not None and p.l2_cache_bytes and p.source, p.name


def test_titan_x_budget_is_a_supported_12_gib_card():
    """The paper's 12 GiB, modelled as sm_75: torch 2.14 wheels ship sm_75 and newer, not the TITAN X's sm_52."""
    p = parse_budget("titan-x")
    assert p.total_bytes == 12 * GiB and p.compute_capability == (7, 5)
    assert "TITAN X" in p.label and "sm_75" in p.label


def test_l2_sizes():
    assert PROFILES["rtx4090"].l2_cache_bytes == 72 * MiB
    assert PROFILES["a100-80g"].l2_cache_bytes == 40 * MiB
    assert PROFILES["h100-80g"].l2_cache_bytes == PROFILES["h200"].l2_cache_bytes == 50 * MiB


def test_size_with_compute_capability():
    p = parse_budget("80GiB@9.0")
    assert p.total_bytes == 80 * GiB and p.compute_capability == (9, 0) and p.l2_cache_bytes is None
    assert parse_budget("11264MiB").compute_capability is None


@pytest.mark.parametrize("text, says", [
    ("12GiB@99.9", "no GPU has compute capability 99.9"),
    ("12GiB@2.0", "major of 3 to 12"),
    ("12GiB@13.0", "major of 3 to 12"),
    ("12GiB@8.10", "one minor digit"),
    ("titanx", "did you mean titan-x"),
    ("rtx-4090", "did you mean rtx4090"),
    ("zzzz", "`memprof list budgets`"),
    ("300MiB", "smaller than the CUDA context"),
    ("12GB", "malformed --budget"),
])
def test_bad_budgets_are_one_line_usage_errors(text, says):
    with pytest.raises(UsageError) as err:
        parse_budget(text)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_valid_edges_are_accepted():
    """Negative control for the checks above: the edges they must not reject."""
    assert parse_budget("12GiB@3.0").compute_capability == (3, 0)
    assert parse_budget("12GiB@12.1").compute_capability == (12, 1)
    assert parse_budget(f"{CONTEXT_ESTIMATE_BYTES // MiB + 1}MiB").total_bytes == CONTEXT_ESTIMATE_BYTES + MiB
