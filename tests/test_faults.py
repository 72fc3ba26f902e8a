"""Every writer pointed at what it must never delete, and every bad input: one line, exit code 2, nothing lost
(the cases and the printable table are in fault_injection.py)."""

import shutil

import fault_injection as fi
import pytest


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return fi.make_workspace(tmp_path_factory.mktemp("faults") / "ws")


@pytest.mark.parametrize("case", fi.cases(), ids=lambda c: c.name)
def test_fault_gives_one_clear_line_and_loses_nothing(case, workspace, tmp_path, monkeypatch):
    ws = tmp_path / "ws"
    shutil.copytree(workspace, ws)
    if case.before_work or case.name in (
        "unknown label image",
        "unknown channel",
        "unknown segmentation channel",
        "text file as checkpoint",
    ):
        # found before any cluster is asked for
        from scdino.engine import pipeline

        def no_cluster(*a, **k):
            raise AssertionError("a cluster was started before the bad input was found")

        monkeypatch.setattr(pipeline, "dask_client", no_cluster)
    o = fi.run_case(case, ws)
    assert o.code == 2, o.stderr
    assert len(o.errors) == 1, o.stderr
    for w in case.words:
        assert w in o.errors[0], (w, o.errors[0])
    assert not o.left, o.left  # no partial file, no empty folder where the output was to go
    assert o.kept, (o.before, o.after)
    if case.before_work:
        assert not o.new, o.new  # nothing made: no output, no report folder, no lock left behind
    for out in ws.glob("o*.zarr"):  # nothing half-made is ever marked complete
        from scdino.engine.output import store_status

        assert (store_status(str(out)) or {}).get("status") != "complete"


def test_another_tools_run_folder_is_not_taken_for_scdinos(tmp_path):
    import scdino.training.config  # noqa: F401  (declares what an older scdino-train run folder holds)
    from scdino.outputs import written_by

    other = tmp_path / "other_project_run"
    other.mkdir()
    (other / "config.json").write_text('{"lr": 0.1, "epochs": 3}')
    (other / "log.jsonl").write_text("{}\n")
    (other / "checkpoint.pth").write_bytes(b"PK\x03\x04")
    assert written_by(other) is None  # so no --overwrite of any scdino command deletes it
    (other / "config.json").write_text(
        '{"global_size": 224, "local_crops": 8, "out_dim": 65536, "teacher_temp": 0.04, "intensity_scaling": "crop"}'
    )
    assert written_by(other) == "scdino-train"  # a run folder of an older scdino (before the marker)


def test_run_refuses_its_output_before_the_export_cache(workspace, tmp_path, monkeypatch):
    """The output is checked before the export cache exports and times the model (tens of seconds on a ViT)."""
    from scdino.engine import pipeline

    def no_export(*a, **k):
        raise AssertionError("the export cache was asked before the output was checked")

    monkeypatch.setattr(pipeline, "choose", no_export)
    ws = tmp_path / "ws"
    shutil.copytree(workspace, ws)
    case = fi.Case(
        "run onto a user's folder",
        "engine",
        ["run", "{ws}/crops.zarr", "--model", "random:vit_test16", "--out", "{ws}/precious"],
        ("precious", "not written by scdino"),
    )
    o = fi.run_case(case, ws)
    assert o.code == 2 and len(o.errors) == 1 and "not an unfinished scdino run" in o.errors[0], o.stderr


def test_evaluate_refuses_a_channel_set_before_embedding(workspace, tmp_path, monkeypatch):
    """A channel set the model cannot take is refused before the first grid cell is embedded, and the advice names
    evaluate's own option (it has no --channels)."""
    from scdino.engine import evaluate

    def no_embedding(*a, **k):
        raise AssertionError("a grid cell was embedded before the channel sets were checked")

    monkeypatch.setattr(evaluate, "embed_with_run", no_embedding)
    ws = tmp_path / "ws"
    shutil.copytree(workspace, ws)
    case = next(c for c in fi.cases() if c.name == "evaluate with a channel set the model was not trained on")
    o = fi.run_case(case, ws)
    assert o.code == 2 and len(o.errors) == 1, o.stderr
    assert "--channel-sets" in o.errors[0] and "--channels " not in o.errors[0], o.errors[0]
