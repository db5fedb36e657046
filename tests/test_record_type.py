"""The record type (memprof.records): parsed once where it is read or made, read by typed field; the JSONL on disk
unchanged byte for byte; one configuration (RunSpec.config) every report pairs and labels records by; the words
(Status, Source, Phase, Category) equal to the strings they were; print(result) within 100 columns. Each check
has its negative control. Rendering and reading only: no prediction runs."""

import json
from pathlib import Path

import pytest

from memprof.errors import UsageError
from memprof.records import Record, Result, as_records
from memprof.results import environment, make_record, read_records
from memprof.spec import RunSpec
from memprof.vocabulary import Category, Phase, Source, Status

DATA = Path(__file__).parent / "data"


def lines(name: str) -> list[str]:
    return (DATA / name).read_text(encoding="utf-8").splitlines()


# --- the file stays the file ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["paper_grid.jsonl", "fit_vit_l14_rtx4090.jsonl"])
def test_a_file_read_and_written_again_is_the_same_bytes(name, tmp_path):
    from memprof.results import append

    records = read_records(str(DATA / name))
    assert all(isinstance(r, Record) for r in records)
    for r in records:
        append(str(tmp_path / "again.jsonl"), r)
    assert (tmp_path / "again.jsonl").read_text(encoding="utf-8").splitlines() == lines(name)


def test_a_new_record_is_the_object_memprof_always_wrote():
    """Record.make writes the fields (and only those) that make_record wrote before the type existed."""
    spec = RunSpec("test-vit", "adamw", precision="bf16-amp")
    env = environment("simulate", "cpu-simulated")
    rec = make_record(spec, Status.OK, Source.PREDICTED, env, {"peak_allocated_bytes": 5}, elapsed_s=1.23456)
    assert json.dumps(rec, sort_keys=True) == json.dumps({
        "schema_version": 1, "key": spec.key + "@simulate", "task": "run", "spec": spec.to_dict(), "status": "ok",
        "source": "predicted", "metrics": {"peak_allocated_bytes": 5}, "error": None, "skip_reason": None,
        "environment": env, "elapsed_s": 1.235}, sort_keys=True)


def test_an_old_record_without_the_newer_spec_fields_reads_with_their_defaults():
    old = json.loads(lines("paper_grid.jsonl")[1])
    for name in ("clear_grads", "resident", "parallel", "freeze", "input_shape"):
        old["spec"].pop(name, None)
    old["spec"]["from_a_newer_memprof"] = "kept"
    rec = Record.parse(old)
    assert (rec.spec.clear_grads, rec.spec.resident, rec.spec.parallel) == ("after-step", "tower", "none")
    assert rec["spec"]["from_a_newer_memprof"] == "kept" and rec.config == "/".join(rec.key.split("/")[:6])


# --- typed fields -----------------------------------------------------------------------------------------------

def test_fields_read_typed_and_the_words_equal_their_strings():
    rec = read_records(str(DATA / "paper_grid.jsonl"))[-1]
    assert isinstance(rec.spec, RunSpec) and isinstance(rec.status, Status) and isinstance(rec.source, Source)
    assert rec.status == rec["status"] and rec.source == "predicted" and rec.spec.model == rec["spec"]["model"]
    assert rec.metrics is rec["metrics"] and rec.device == "cpu-simulated" and rec.backend == "simulate"
    assert json.dumps({Status.OOM: [Phase.FORWARD, Category.WORKSPACE]}) == '{"oom": ["forward", "workspace"]}'
    assert f"{Status.OK} {Source.MEASURED}" == "ok measured" and {"ok": 1}[Status.OK] == 1
    assert Status.ERROR.failed and Status.CRASHED.failed and not Status.OOM.failed and Status.OOM.ran


def test_the_engine_s_categories_are_the_declared_ones():
    from memprof.simulation import CATEGORIES

    assert CATEGORIES == tuple(Category) and all(type(c) is str for c in CATEGORIES)


@pytest.mark.parametrize("edit, said", [
    (lambda r: r.update(status="fine"), "unknown status 'fine'"),
    (lambda r: r.update(source="guessed"), "unknown source 'guessed'"),
    (lambda r: r["spec"].pop("model"), "spec has no 'model'"),
    (lambda r: r["spec"].update(batch_size="1"), "spec 'batch_size' is \"1\", not a whole number"),
    (lambda r: r.update(task=3), "'task' is 3, not a string"),
])
def test_a_record_memprof_did_not_write_is_refused_naming_the_field(edit, said):
    rec = json.loads(lines("paper_grid.jsonl")[1])
    Record.parse(json.loads(json.dumps(rec)))  # negative control: as written, it reads
    edit(rec)
    with pytest.raises(UsageError, match=said.replace("(", r"\(")):
        Record.parse(rec, "results.jsonl:2")


# --- one configuration ------------------------------------------------------------------------------------------

def test_one_config_on_the_spec_whatever_the_card_and_the_steps():
    a = RunSpec("vit-b-16", "adamw", budget="titan-x", steps=2, parallel="fsdp", world_size=8, freeze="conv1")
    b = RunSpec("vit-b-16", "adamw", budget="h100-80g", steps=3, parallel="fsdp", world_size=8, freeze="conv1")
    assert a.config == b.config == "vit-b-16/adamw/ckpt-off/32bit/bs1/fp32/fsdp8/freeze-conv1"
    assert a.config != RunSpec("vit-b-16", "adamw", parallel="fsdp", world_size=8, freeze="ln_pre").config
    assert RunSpec("vit-b-16", "adamw").config == "vit-b-16/adamw/ckpt-off/32bit/bs1/fp32"  # default keys as before


def test_a_model_name_with_a_slash_keeps_its_configuration():
    """A hub name (`hf:org/name`, issue 33) has '/' in it: reading the key by position would cut it; the spec
    does not."""
    spec = RunSpec("hf:google/vit-base-patch16-224", "adamw", freeze="conv1")
    rec = Record.make(spec, "ok", "predicted", environment("simulate", "cpu-simulated"))
    assert rec.config.startswith("hf:google/vit-base-patch16-224/adamw/") and rec.config.endswith("/freeze-conv1")
    assert "/".join(rec.key.split("/")[:6]) != rec.config  # negative control: by position, the old reading


def test_the_reports_label_by_the_spec_s_config():
    from memprof.reports.table4 import render_floor, table_rows

    recs = as_records(read_records(str(DATA / "paper_grid.jsonl")))
    assert sorted(r["config"] for r in table_rows(recs)) == sorted(r.config for r in recs)
    spec = RunSpec("test-vit", "sgd", parallel="ddp", world_size=4)
    ddp = make_record(spec, "ok", "predicted", environment("simulate", "cpu-simulated"),
                      {"floor_bytes": 100, "peak_allocated_bytes": 200, "peak_to_floor_ratio": 2.0})
    floor = render_floor([ddp])
    assert "test-vit/sgd/ckpt-off/32bit/bs1/fp32/ddp4 " in floor and "steps2" not in floor


# --- the Python API's result ------------------------------------------------------------------------------------

def _long_result(**metrics) -> Result:
    spec = RunSpec("py:my_company.models.vision:build_a_rather_large_vision_transformer", "adamw",
                   precision="bf16-amp", optim_impl="fused", optim_in_backward=True, freeze="patch_embed,norm_pre",
                   input_shape="3x384x384", budget="a100-80g")
    breakdown = {c.value: 1 << 30 for c in Category}
    return Result(make_record(spec, "ok", "predicted", environment("simulate", "cpu-simulated"), {
        "peak_allocated_bytes": 7 << 30, "peak_reserved_bytes": 8 << 30, "fits": "yes", "peak_phase": "optimizer",
        "peak_step": 1, "peak_op": "aten._fused_adamw_.default", "breakdown_at_peak_bytes": breakdown, **metrics}))


def test_print_result_fits_100_columns():
    text = str(_long_result(oom={"phase": "backward", "step": 1, "op": "aten.mm.default"}))
    assert max(len(line) for line in text.splitlines()) <= 100, text
    assert "workspace 1.00 GiB" in text or "workspace 1.0 GiB" in text
    flat = " ".join(line.strip() for line in text.splitlines())
    for word in ("predicted (simulate)", "peak allocated", "at the peak: optimizer of step 1", "breakdown:",
                 "out of memory in backward of step 1", "3x384x384@simulate"):
        assert word in flat.replace("/ ", "/").replace(": ", ": "), word


def test_negative_control_the_same_lines_unwrapped_are_wider():
    result = _long_result()
    assert max(len(line) for line in result.lines()) > 100


def test_result_fields_read_as_before():
    result = _long_result()
    assert result.spec["grad_ckpt"] is False and result.spec.optim_impl == "fused"  # indexed as the dict was
    assert result.status == "ok" and result.source == Source.PREDICTED and result.peak_bytes == 7 << 30
    assert isinstance(result.record, dict) and json.loads(json.dumps(result.record)) == result.record
    assert result.parsed.config.endswith("/input-3x384x384") and result.fits and not result.may_not_fit
    assert Result({"status": "oom", "metrics": {"fits": "no"}}).fits is False  # a partial record still answers
    with pytest.raises(AttributeError, match="not a field"):
        result.peak_alocated_bytes
