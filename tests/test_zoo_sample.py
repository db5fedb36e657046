"""A small sample of the zoo sweep (benchmarks/zoo_sweep.py): a model predicts and its ops are matched against the
audit; a name that cannot be predicted is refused in one line."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import zoo_sweep  # noqa: E402


def test_a_timm_cnn_predicts_and_every_op_is_audited():
    row = zoo_sweep.one("timm:resnet18", "fp32", "h100-80g", 2)
    assert row["status"] == "ok" and row["peak_allocated_bytes"] > 0
    assert "aten.convolution.default" in row["ops"]
    assert row["unaudited"] == []


def test_an_op_missing_from_the_audit_is_reported(monkeypatch):
    """Negative control: with an empty audit, the same trace's ops (ReLU's backward among them) are listed as
    unaudited, not hidden."""
    from memprof.simulation import audit

    monkeypatch.setattr(audit, "audited_ops", lambda scan=None: frozenset())
    row = zoo_sweep.one("timm:resnet18", "fp32", "h100-80g", 2)
    assert {"aten.threshold_backward.default", "aten.convolution.default"} <= set(row["unaudited"])


def test_a_name_that_cannot_be_predicted_is_refused_in_one_line():
    row = zoo_sweep.one("timm:no_such_model", "fp32", "h100-80g", 2)
    assert row["status"] == "refused" and "\n" not in row["why"] and "no_such_model" in row["why"]
