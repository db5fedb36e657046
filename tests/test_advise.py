"""`memprof advise`: candidates from one configuration, the cheapest change that fits first, changes this
version cannot model listed, not dropped."""

import pytest

from memprof import cli
from memprof.planning.advise import CHANGES, candidates
from memprof.spec import RunSpec


@pytest.mark.bitsandbytes
def test_candidates_cover_single_changes_and_cross_axis_pairs():
    cands, not_modelled, not_applicable = candidates(RunSpec("test-vit", "adamw", batch_size=4))
    labels = {c.label for c in cands}
    assert {"(as given)", "freeze-embed", "SGD (freeze-embed)", "8-bit optimizer states", "gradient checkpointing",
            "micro-batch 2 x 2 gradient accumulation", "SGD (freeze-embed) + gradient checkpointing"} <= labels
    assert not any("freeze-embed + SGD" in label for label in labels)  # one axis moves once
    assert ("SGD (freeze-embed, no momentum) + 8-bit optimizer states",
            "sgd-fe-nomom keeps no optimizer state, so 8-bit states change nothing") in not_applicable
    modelled = {c.name for c in CHANGES if c.modelled()}
    assert {c.name for c in not_modelled} == {c.name for c in CHANGES} - modelled


def test_batch_1_has_no_accumulation_change():
    cands, _, _ = candidates(RunSpec("test-vit", "adamw", batch_size=1))
    assert not any("accumulation" in c.label for c in cands)


def _advise(capsys, tmp_path, budget, *extra):
    code = cli.main(["advise", "--models", "test-vit", "--optims", "adamw", "--budget", budget, "--jobs", "1",
                     "--no-progress", "--out", str(tmp_path / budget), *extra])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.bitsandbytes
@pytest.mark.slow  # over 5 s on 2 cores: the slow set (CI gates on it too)
def test_the_first_line_answers_and_a_roomy_budget_needs_nothing(capsys, tmp_path):
    code, out, err = _advise(capsys, tmp_path, "423MiB")  # 23 MiB usable: AdamW on test-vit reserves 24 MiB
    assert code == 0, err
    first = out.splitlines()[0]
    assert first.startswith("cheapest change that fits: ") and "predicted" in first
    assert "GiB usable on 423MiB (0.41 GiB card)" in out  # the verdict names usable memory and the card
    assert "SGD (freeze-embed)" in (tmp_path / "423MiB" / "advise.md").read_text() and "| no " not in first
    code, out, err = _advise(capsys, tmp_path, "8GiB")  # negative control: nothing to change
    assert code == 0 and out.startswith("the configuration already fits 8GiB")


@pytest.mark.slow  # over 5 s on 2 cores: the slow set (CI gates on it too)
def test_the_terminal_gets_the_answer_and_a_short_list_the_file_gets_everything(capsys, tmp_path, monkeypatch):
    from memprof.planning.advise import SHOWN

    monkeypatch.setenv("COLUMNS", "100")
    code, out, err = _advise(capsys, tmp_path, "423MiB", "--state-bits", "32")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert max(len(line) for line in lines) <= 100 or str(tmp_path) in lines[-1], out  # a path does not split
    assert len(lines) <= 15 + SHOWN and "more candidates" in out and lines[-1].endswith("advise.md"), out
    full = (tmp_path / "423MiB" / "advise.md").read_text()  # negative control: the file is the long form
    assert len(full.splitlines()) > len(lines) and max(len(line) for line in full.splitlines()) > 100
    listed = [line for line in full.splitlines() if line.startswith("| ") and "GiB" not in line]
    assert len(listed) > SHOWN + 1  # every candidate


def test_advise_starts_from_one_configuration(capsys, tmp_path):
    code = cli.main(["advise", "--models", "test-vit", "--optims", "adamw,sgd", "--out", str(tmp_path / "o")])
    _, err = capsys.readouterr()
    assert code == 2 and "advise starts from one configuration: give one value to --optims" in err


@pytest.mark.slow
def test_vit_h14_adamw_on_the_papers_card(capsys, tmp_path):
    """The paper's question: ViT-H/14 with AdamW does not fit 12 GB; SGD (freeze-embed) does, and so does at
    least one other change (consistent with Table 4)."""
    code = cli.main(["advise", "--models", "vit-h-14", "--optims", "adamw", "--budget", "titan-x",
                     "--no-progress", "--out", str(tmp_path / "o")])
    out, _ = capsys.readouterr()
    assert code == 0 and out.startswith("cheapest change that fits: ")
    # the terminal's table is fitted to its width; advise.md keeps every row whole
    table = (tmp_path / "o" / "advise.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert " yes " in rows["SGD (freeze-embed)"] and " no " in rows["(as given)"]
    assert sum(" yes " in line for name, line in rows.items() if name != "SGD (freeze-embed)") >= 1


def test_without_bitsandbytes_8bit_states_are_listed_as_not_modelled(monkeypatch):
    """bitsandbytes is optional: advise lists 8-bit states as unavailable, with how to install it, instead of
    refusing to advise; with it installed the change is a candidate (control)."""
    import importlib.util

    from memprof.planning import advise
    from memprof.spec import RunSpec

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    cands, not_modelled, _ = advise.candidates(RunSpec("vit-b-16", "adamw"))
    assert "8-bit optimizer states" in [c.name for c in not_modelled]
    assert all(c.spec.state_bits == 32 for c in cands)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes" else real(name, *a))
    cands, not_modelled, _ = advise.candidates(RunSpec("vit-b-16", "adamw"))
    assert any(c.spec.state_bits == 8 for c in cands) and "8-bit optimizer states" not in [c.name for c in not_modelled]
