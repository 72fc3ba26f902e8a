"""Every exported model file proves what it is: a graph or plan beside another export's sidecar is refused by run,
quantize and the TensorRT build, in every direction of a swap; a sidecar written before hashes were recorded warns and
still has the graph's own shapes checked."""

import hashlib
import itertools
import json
import logging
import shutil

import pytest
from click.testing import CliRunner

from scdino.errors import CheckpointError
from scdino.export.onnx_export import export_onnx
from scdino.export.quantize import quantize
from scdino.models.card import describe_model
from scdino.models.sidecar import read_sidecar, sidecar_path


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Four exports: two 2-channel networks of other weights, a 3-channel one, and an int8 copy of the first."""
    d = tmp_path_factory.mktemp("exports")
    export_onnx(describe_model("random:vit_test16", n_channels=2, seed=1), d / "a.onnx", crop_size=32)
    export_onnx(describe_model("random:vit_test16", n_channels=2, seed=2), d / "b.onnx", crop_size=32)
    export_onnx(describe_model("random:vit_test16", n_channels=3, seed=1), d / "c.onnx", crop_size=32)
    quantize(d / "a.onnx", d / "a.int8.onnx")
    return d


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_each_sidecar_records_the_sha256_of_its_own_graph(exports):
    for name in ("a", "b", "c", "a.int8"):
        graph = exports / f"{name}.onnx"
        assert read_sidecar(graph)["graph_sha256"] == _sha(graph)  # hashed here, independently of the writer
    # the int8 copy names the graph it was made from
    assert read_sidecar(exports / "a.int8.onnx")["source_graph_sha256"] == _sha(exports / "a.onnx")


def _swapped(exports, tmp_path, graph, sidecar):
    """``graph``'s file under the name of ``sidecar``'s export, beside that export's sidecar."""
    target = tmp_path / f"{sidecar}.onnx"
    shutil.copyfile(exports / f"{graph}.onnx", target)
    shutil.copyfile(sidecar_path(exports / f"{sidecar}.onnx"), sidecar_path(target))
    return target


@pytest.mark.parametrize("graph,sidecar", list(itertools.permutations(["a", "b", "c", "a.int8"], 2)))
def test_a_graph_beside_another_exports_sidecar_is_refused_naming_both(exports, tmp_path, graph, sidecar):
    target = _swapped(exports, tmp_path, graph, sidecar)
    with pytest.raises(CheckpointError, match="not the model its sidecar") as err:
        describe_model(str(target))
    msg = str(err.value)
    assert _sha(exports / f"{graph}.onnx")[:16] in msg and read_sidecar(target)["graph_sha256"][:16] in msg
    if {graph, sidecar} & {"c"} and {graph, sidecar} - {"c"}:  # 3 against 2 channels: the shapes are named too
        assert "input channels" in msg
    # the right pair still opens
    assert describe_model(str(exports / f"{sidecar}.onnx")).in_chans == read_sidecar(target)["in_chans"]


def test_quantize_refuses_a_swapped_graph_before_any_work(exports, tmp_path):
    target = _swapped(exports, tmp_path, "b", "a")
    with pytest.raises(CheckpointError, match="not the model its sidecar"):
        quantize(target, tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()


def test_run_refuses_a_swapped_graph_with_one_line(exports, tmp_path, tiny_plate):
    from scdino.engine.cli import main

    target = _swapped(exports, tmp_path, "b", "a")
    r = CliRunner().invoke(
        main,
        [
            "run",
            tiny_plate,
            "--labels",
            "nuclei",
            "--crop-size",
            "32",
            "--model",
            str(target),
            "--out",
            str(tmp_path / "o.zarr"),
        ],
    )
    assert r.exit_code == 2, r.output
    assert "not the model its sidecar a.json describes" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o.zarr").exists()


def test_an_older_sidecar_without_a_hash_warns_and_its_shapes_are_checked(exports, tmp_path, caplog):
    old = tmp_path / "old.onnx"
    shutil.copyfile(exports / "a.onnx", old)
    meta = read_sidecar(exports / "a.onnx")
    del meta["graph_sha256"]
    sidecar_path(old).write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING):
        assert describe_model(str(old)).in_chans == 2
    assert "records no graph_sha256" in caplog.text
    # the 3-channel graph beside that old 2-channel sidecar: refused by the graph's own declared input
    shutil.copyfile(exports / "c.onnx", old)
    with pytest.raises(CheckpointError, match=r"input channels 3 \(sidecar: 2\)"):
        describe_model(str(old))
