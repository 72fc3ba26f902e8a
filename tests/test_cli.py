import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import tomllib
import torch

from conftest import make_tiny_plate
from scdino.engine.output import store_status
from scdino.engine.sample import FieldImage, write_plate

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, check=False) -> subprocess.CompletedProcess:
    """``scdino-engine ARGS`` run in this process (click's CliRunner): what a shell gets, without a new interpreter
    and cluster per call (the subprocess path is covered by the --help and kill -9 tests)."""
    from click.testing import CliRunner

    from scdino.engine.cli import main

    r = CliRunner().invoke(main, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    p = subprocess.CompletedProcess(["scdino-engine", *map(str, args)], r.exit_code, r.stdout, r.stderr)
    if check and p.returncode != 0:
        raise AssertionError(p.stderr)
    return p


def test_help_works_without_torch():
    code = (
        "import sys\n"
        "from scdino.engine.cli import main as engine\n"
        "from scdino.export.cli import main as export\n"
        "from scdino.training.cli import main as train\n"
        "for cli, args in ((engine, ['--help']), (engine, ['run', '--help']), (engine, ['knn', '--help']),\n"
        "                  (engine, ['evaluate', '--help']), (export, ['onnx', '--help']),\n"
        "                  (export, ['tensorrt', '--help']), (train, ['--help'])):\n"
        "    try:\n        cli(args)\n    except SystemExit as e:\n        assert e.code == 0, (args, e.code)\n"
        "heavy = [m for m in ('torch', 'dask', 'zarr', 'anndata', 'distributed', 'onnx', 'onnxruntime', 'tensorrt',\n"
        "                     'umap', 'cuml') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    for flag in (
        "--crop-um",
        "--scheduler",
        "random:ARCH",
        "--label-key",
        "--channel-sets",
        "--precision",
        "--fp16",
        "--batch-size-per-device",
    ):
        assert flag in p.stdout, flag


def test_every_subpackage_is_in_the_wheel():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = {name: ROOT / d for name, d in cfg["package-dir"].items()}
    found = set()
    for name, d in dirs.items():
        for init in d.rglob("__init__.py"):
            rel = init.parent.relative_to(d)
            found.add(".".join([name, *rel.parts]) if rel.parts else name)
    assert found <= set(cfg["packages"]), found - set(cfg["packages"])


@pytest.mark.slow
def test_end_to_end_on_the_real_sample_plates(tmp_path):
    neo = tmp_path / "neocortex.zarr"
    assert "wrote" in cli("sample-plate", neo, check=True).stdout
    p = cli(
        "run",
        neo,
        "--model",
        "random:vit_test16",
        "--out",
        tmp_path / "n.zarr",
        "--input-size",
        "64",
        check=True,
    )  # no cell options: the sample plate carries the README's --segment-channel CTIP2,BRN2,ROR --sigma 1 ...
    assert "untrained" in p.stdout
    a = ad.read_zarr(tmp_path / "n.zarr")
    u = a.uns["scdino"]
    assert (u["cells"]["segment_channel"], u["crop_size"]) == ("CTIP2,BRN2,ROR", 32)
    seg = u["cells"]["segment"]
    assert (seg["sigma"], seg["min_distance"], seg["min_area"], seg["threshold"]) == (1.0, 4, 15, "otsu")
    carried = ["segment_channel", "sigma", "min_distance", "min_area", "crop_size"]
    assert dict(u["cells_from"]) == dict.fromkeys(carried, "plate")
    assert a.n_obs > 500 and a.obsm["X_scdino"].shape == (a.n_obs, 32)
    assert set(a.obs["well"]) == {"A/1", "A/2"} and list(a.uns["scdino"]["channels"]) == ["CTIP2", "BRN2", "ROR"]
    assert np.isfinite(a.obsm["X_scdino"]).all()

    scratch = tmp_path / "scratch.zarr"
    cli("sample-plate", scratch, "--dataset", "scratch", "--ngff", "0.4", check=True)
    cli(
        "run",
        scratch,
        "--model",
        "random:vit_test8",
        "--out",
        tmp_path / "s.zarr",
        "--labels",
        "nuclei",
        "--channels",
        "H3342",
        "--crop-um",
        "20",
        "--input-size",
        "32",
        check=True,
    )
    s = ad.read_zarr(tmp_path / "s.zarr")
    from scdino.cells.plate import Plate

    plate = Plate(scratch)
    n_labels = sum(len(np.unique(plate.labels(r, "nuclei"))) - 1 for r in plate.fields())
    assert s.n_obs == n_labels  # exactly one row per labelled nucleus
    assert s.uns["scdino"]["crop_size"] == round(20 / 0.619)


def _bad(p: subprocess.CompletedProcess, *words: str) -> str:
    assert p.returncode == 2, (p.returncode, p.stderr)
    err = [ln for ln in p.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(err) == 1, p.stderr
    for w in words:
        assert w in err[0], (w, err[0])
    return err[0]


@pytest.fixture(scope="module")
def plate2(tmp_path_factory):
    return make_tiny_plate(tmp_path_factory.mktemp("p") / "tiny.zarr")


def test_bad_inputs_give_one_clear_line(plate2, tmp_path):
    out = tmp_path / "o.zarr"
    run = ("run", "--model", "random:vit_test8", "--input-size", "32", "--crop-size", "16", "--out", out)
    img = tmp_path / "image.zarr"
    import zarr

    zarr.open_group(img, mode="w").attrs["multiscales"] = [{"datasets": [{"path": "0"}]}]
    _bad(cli(*run, img), "image.zarr", "not an OME-Zarr HCS plate", "sample-plate")
    _bad(cli(*run, plate2, "--channels", "DAPI,CY5"), "A/1/0", "no channel 'CY5'", "DAPI, GFP", "--channels")
    _bad(cli(*run, plate2, "--labels", "cells"), "A/1/0", "no label image 'cells'", "--segment-channel")
    _bad(cli(*run, plate2, "--wells", "C/7"), "no well C/7")
    # a model trained on 5 channels given 2
    five = tmp_path / "five.pth"
    from scdino.models import arch_config, build_model

    torch.save(build_model(arch_config("vit_test8", in_chans=5)).state_dict(), five)
    _bad(cli("run", plate2, "--model", five, "--out", out, "--labels", "nuclei"), "expects 5 channels", "--channels")
    # truncated checkpoint
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(five.read_bytes()[:1000])
    _bad(cli("run", plate2, "--model", trunc, "--out", out), "trunc.pth", "truncated")
    assert store_status(str(out)) is None  # nothing written, nothing marked complete


def test_no_nuclei_and_unreadable_chunks(tmp_path):
    blank = write_plate(
        tmp_path / "blank.zarr", {"A/1": [FieldImage(np.full((1, 64, 64), 100, np.uint16))]}, ["DAPI"], ngff="0.4"
    )
    out = tmp_path / "o.zarr"
    _bad(
        cli("run", blank, "--model", "random:vit_test8", "--out", out),
        "blank.zarr",
        "no nuclei found in 1 fields",
        "--labels",
    )
    assert store_status(str(out)) is None
    plate = make_tiny_plate(tmp_path / "t.zarr")
    chunk = next(Path(plate, "B", "2", "0", "s0").rglob("c/*/*/*"))
    chunk.write_bytes(b"\x00" * 10)
    _bad(
        cli("run", plate, "--model", "random:vit_test8", "--labels", "nuclei", "--out", out, "--input-size", "32"),
        "t.zarr/B/2/0",
        "chunk cannot be read",
    )
    assert store_status(str(out)) is None  # the field is read while cells are found, before any store is made


def test_existing_foreign_output_is_not_overwritten(plate2, tmp_path):
    out = tmp_path / "x.zarr"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    _bad(
        cli("run", plate2, "--model", "random:vit_test8", "--labels", "nuclei", "--out", out),
        "not an unfinished scdino run",
        "--overwrite",
    )
    assert (out / "precious.txt").exists()


@pytest.mark.slow
def test_the_real_command_is_quiet_and_logs_progress_off_a_terminal(plate2, tmp_path):
    """As under nohup or a batch scheduler: stderr is a pipe. Progress comes as log lines; a successful run prints no
    warnings or Dask noise and says once that the model is untrained; a damaged chunk read inside a Dask task gives its
    one line and nothing else."""
    import os

    env = {**os.environ, "SCDINO_PROGRESS_SECONDS": "0"}
    cmd = [sys.executable, "-m", "scdino.engine", "run", plate2, "--model", "random:vit_test8", "--labels", "nuclei"]
    cmd += ["--input-size", "32", "--crop-size", "16", "--chunk-cells", "2"]
    p = subprocess.run([*cmd, "--out", str(tmp_path / "o.zarr")], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = p.stderr.strip().splitlines()
    assert any(ln.startswith("INFO scdino.progress: embedding: ") and "cells/s" in ln and "left" in ln for ln in lines)
    assert any("finding cells: 3/3 fields" in ln for ln in lines), p.stderr
    noise = [ln for ln in lines if not ln.startswith("INFO scdino")]
    assert not noise, noise
    assert (p.stdout + p.stderr).count("the model is untrained") == 1, p.stdout + p.stderr
    timing = ad.read_zarr(tmp_path / "o.zarr").uns["scdino"]["timing"]
    assert timing["find_cells_seconds"] > 0 and timing["embed_seconds"] > 0 and "cells_s" not in timing
    broken = make_tiny_plate(tmp_path / "broken.zarr")
    chunk = next(Path(broken, "B", "2", "0", "s0").rglob("c/*/*/*"))
    chunk.write_bytes(b"\x00" * 10)
    cmd[4] = broken
    p = subprocess.run([*cmd, "--out", str(tmp_path / "b.zarr")], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2
    others = [ln for ln in p.stderr.strip().splitlines() if not ln.startswith("INFO scdino")]
    assert len(others) == 1 and others[0].startswith("error:"), p.stderr
    assert "B/2/0" in p.stderr and "chunk cannot be read" in p.stderr


def test_every_numeric_option_has_its_bounds():
    """Each int or float option of every scdino-engine command has bounds, declared where its value lives (a config
    field, or the module of the command that takes it)."""
    import click

    import scdino.engine.attention  # noqa: F401  (these declare the bounds of their commands' own arguments)
    import scdino.engine.profiles  # noqa: F401
    import scdino.engine.umap  # noqa: F401
    from scdino.bounds import BOUNDS, option
    from scdino.engine.cli import main

    numeric = {
        (name, opt)
        for name, cmd in main.commands.items()
        for p in cmd.params
        if isinstance(p, click.Option) and isinstance(p.type, (click.types.IntParamType, click.types.FloatParamType))
        for opt in p.opts
        if opt.startswith("--")
    }
    assert len(numeric) >= 30
    assert {(n, o) for n, o in numeric if o not in {option(name) for name in BOUNDS}} == set()


def test_a_block_of_crops_must_fit_in_memory():
    from scdino.engine.config import check_block_memory
    from scdino.errors import ConfigError

    gib = 2**30
    # 256 crops x 3 channels x 1000 x 1000 px x (2 bytes uint16 + 4 bytes float32) = 4.608e9 bytes = 4.29 GiB
    with pytest.raises(ConfigError, match=r"takes 4\.29 GiB .* half of the 8\.00 GiB .*--chunk-cells or --crop-size"):
        check_block_memory(256, 3, 1000, 2, 8 * gib)
    check_block_memory(256, 3, 1000, 2, 10 * gib)  # 4.29 GiB is under half of 10


def test_a_missing_chunk_is_named_not_read_silently_as_zeros(tmp_path):
    """A writer may skip chunks that hold only the fill value, so a missing chunk is a warning naming the field (a
    refusal would reject such plates), never silent zeros."""
    plate = make_tiny_plate(tmp_path / "t.zarr")
    chunk = Path(plate, "B", "2", "0", "s0", "c", "1", "0", "0")  # GFP of field B/2/0: 1 of its 2 chunks (c, 512, 512)
    chunk.unlink()
    run = ("run", plate, "--model", "random:vit_test8", "--labels", "nuclei", "--crop-size", "16", "--input-size", "32")
    p = cli(*run, "--out", tmp_path / "o.zarr", check=True)
    warned = [ln for ln in p.stderr.splitlines() if "t.zarr/B/2/0" in ln]
    assert len(warned) == 1 and "1 of 2 image chunks are not stored" in warned[0], p.stderr
    assert "read as the fill value 0" in warned[0] and "copy it again" in warned[0]
    assert "A/1" not in p.stderr  # complete fields are not named


def test_a_model_onnx_runtime_cannot_load_leaves_no_store(plate2, tmp_path):
    """A model.onnx that parses but that ONNX Runtime refuses (here: an unknown operator) fails in the workers, after
    the store was made: one line, and no half-written store."""
    import onnx
    from onnx import TensorProto, helper

    from scdino.export.onnx_export import export_onnx

    m = tmp_path / "m.onnx"
    export_onnx("random:vit_test8", m, n_channels=2, crop_size=16, input_size=32)
    from scdino.models.checkpoint import sha256_of
    from scdino.models.sidecar import read_sidecar, sidecar_path

    side = read_sidecar(m)
    node = helper.make_node("NoSuchOperator", ["crops"], ["embeddings"], domain="")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("crops", TensorProto.FLOAT, ["n", 2, 16, 16])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["n", side["embed_dim"]])],
    )
    onnx.save(helper.make_model(graph), m)
    # a sidecar that describes this graph (its hash): the graph gets past the identity check, to ONNX Runtime
    sidecar_path(m).write_text(json.dumps({**side, "graph_sha256": sha256_of(m)}))
    out = tmp_path / "o.zarr"
    _bad(
        cli("run", plate2, "--model", m, "--labels", "nuclei", "--crop-size", "16", "--out", out),
        "m.onnx",
        "ONNX Runtime cannot load it",
        "export it again",
    )
    assert not out.exists() and not Path(f"{out}.lock").exists()


def test_the_lock_never_touches_a_users_file_and_goes_however_the_run_ends(plate2, tmp_path):
    run = (
        "run",
        plate2,
        "--model",
        "random:vit_test8",
        "--labels",
        "nuclei",
        "--crop-size",
        "16",
        "--input-size",
        "32",
    )
    out = tmp_path / "o.zarr"
    user = tmp_path / "o.zarr.lock"
    user.write_text("a user's notes that happen to have this name")
    _bad(cli(*run, "--out", out), "o.zarr.lock", "not a scdino lock", "never replaced or deleted")
    assert user.read_text() == "a user's notes that happen to have this name" and not out.exists()
    user.unlink()
    # a run that fails after taking the lock leaves neither the lock nor the folders made for it
    deep = tmp_path / "new" / "deeper" / "o.zarr"
    _bad(cli(*run, "--channels", "CY5", "--out", deep), "no channel 'CY5'")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    cli(*run, "--out", out, check=True)
    assert store_status(str(out))["status"] == "complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.zarr"]


def test_a_second_run_on_a_locked_output_is_refused_and_a_stale_lock_taken_over(plate2, tmp_path):
    import os
    import signal

    out = tmp_path / "o.zarr"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from scdino.outputs import output_lock\n"
            "lock = output_lock(sys.argv[1], 'scdino-engine run')\n"
            "lock.__enter__()\n"
            "print('locked', flush=True)\n"
            "time.sleep(300)\n",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        run = ("run", plate2, "--model", "random:vit_test8", "--labels", "nuclei", "--crop-size", "16")
        _bad(
            cli(*run, "--input-size", "32", "--out", out),
            "o.zarr",
            f"scdino-engine run (pid {holder.pid} on this host",
            "is writing it",
            "wait for it to finish",
        )
        assert not out.exists() and Path(f"{out}.lock").exists()  # the holder's lock is left as it was
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # as kill -9: no clean-up, the lock file stays
        holder.wait()
    assert Path(f"{out}.lock").exists()
    p = cli(*run, "--input-size", "32", "--out", out, check=True)
    assert "taking over the stale lock" in p.stderr and f"pid {holder.pid}" in p.stderr, p.stderr
    assert store_status(str(out))["status"] == "complete" and not Path(f"{out}.lock").exists()


def test_the_log_names_the_path_a_run_takes_once(plate2, tmp_path, monkeypatch):
    """One line says how the cells are embedded: the path the export cache finally chose, with its device (never an
    earlier guess that it then changes)."""
    from conftest import dino_full_checkpoint

    monkeypatch.setenv("SCDINO_CACHE_DIR", str(tmp_path / "cache"))
    dino_full_checkpoint(tmp_path / "ck.pth", arch="vit_test16", in_chans=2)
    args = ["--labels", "nuclei", "--input-size", "32", "--crop-size", "16", "--no-progress"]
    for model, out in [("random:vit_test8", "r.zarr"), (tmp_path / "ck.pth", "c.zarr")]:
        p = cli("-v", "run", plate2, "--model", model, *args, "--out", tmp_path / out, check=True)
        said = [ln for ln in p.stderr.splitlines() if "backend auto" in ln or " path: " in ln]
        assert len(said) == 1 and said[0].startswith("INFO scdino.engine.pipeline: path: "), p.stderr
        assert said[0].split(" (")[0].endswith(" on cpu") or ") on cpu (" in said[0], said


def test_the_cache_listing_names_partial_exports_as_such(tmp_path, monkeypatch):
    """An export a run left partial (it stopped while exporting) is not listed as an entry 'None (made None)'."""
    monkeypatch.setenv("SCDINO_CACHE_DIR", str(tmp_path / "cache"))
    left = tmp_path / "cache" / "onnx" / ".partial-20b1a86e4e45a98991881888-4242"
    left.mkdir(parents=True)
    (left / "model.onnx").write_bytes(b"\x08" * 1000)
    p = cli("cache", check=True)
    assert "None" not in p.stdout, p.stdout
    assert "0 cached export(s)" in p.stdout and "1 export(s) left partial by a run that stopped" in p.stdout
    assert "--clear" in p.stdout


def test_a_missing_extra_is_named_for_a_wheel_and_for_a_source_checkout(monkeypatch):
    """A source checkout is told the editable form (the index's scdino is not the one it runs)."""
    from scdino import _optional

    monkeypatch.setitem(_optional.EXTRAS, "no_such_module_for_scdino", ("trt", "the test"))
    root = _optional.source_checkout()
    assert root == ROOT  # the tests run from this checkout
    with pytest.raises(_optional.MissingDependencyError, match=r"run: pip install -e '\.\[trt\]' in "):
        _optional.require("no_such_module_for_scdino")
    monkeypatch.setattr(_optional, "source_checkout", lambda: None)  # a wheel
    with pytest.raises(_optional.MissingDependencyError, match=r"run: pip install 'scdino\[trt\]'$"):
        _optional.require("no_such_module_for_scdino")


def test_progress_lines_come_on_time_while_a_long_block_embeds(plate2, tmp_path, monkeypatch):
    """Off a terminal a line comes at least every SCDINO_PROGRESS_SECONDS, also while one block takes longer than
    that (a ViT-B block of 256 cells takes minutes on a CPU), from the start of the phase."""
    import time

    from scdino.engine import pipeline

    real = pipeline._embed_block

    def slow_block(crops, spec):
        time.sleep(2.0)
        return real(crops, spec)

    monkeypatch.setattr(pipeline, "_embed_block", slow_block)
    monkeypatch.setenv("SCDINO_PROGRESS_SECONDS", "0.5")
    args = ["--labels", "nuclei", "--input-size", "32", "--crop-size", "16"]
    p = cli("run", plate2, "--model", "random:vit_test8", *args, "--out", tmp_path / "o.zarr", check=True)
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("INFO scdino.progress: embedding: ")]
    assert "to do" in lines[0], lines  # said when the phase starts ("N+ cells to do" while cells are found)
    waiting = [ln for ln in lines if " 0/" in ln and "so far" in ln]
    assert len(waiting) >= 2, lines  # during the one block, about every 0.5 s
    assert " in " in lines[-1], lines


def test_a_growing_total_says_so_and_gives_no_time_left_until_it_is_final(monkeypatch, caplog):
    import logging
    import time

    from scdino import progress

    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    monkeypatch.setenv("SCDINO_PROGRESS_SECONDS", "0")
    with caplog.at_level(logging.INFO, logger="scdino.progress"):
        bar = progress.Progress(130, "embedding", growing=True)
        time.sleep(0.01)
        bar.update(100)
        bar.set_total(260, final=False)
        assert bar.line().startswith("embedding: 100/260+ cells (more being found)")
        assert bar.line().endswith("time left once all are found")
        bar.set_total(400)
        line = bar.line()
        bar.close()
    text = caplog.text
    assert "embedding: 130+ cells to do (more as they are found)" in text and "130/130" not in text
    assert "all 400 cells known, 300 to do" in text
    assert line.startswith("embedding: 100/400 cells (25%)") and line.endswith(" left")


def test_log_lines_are_written_above_a_terminals_progress_bar(monkeypatch):
    import io
    import logging

    import tqdm

    from scdino._cli import _StderrHandler

    class Tty(io.StringIO):
        def isatty(self):
            return True

    err = Tty()
    monkeypatch.setattr(sys, "stderr", err)
    bar = tqdm.tqdm(total=10, file=err)
    writes = []
    monkeypatch.setattr(tqdm.tqdm, "write", classmethod(lambda cls, s, file=None, **k: writes.append(s)))
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.emit(logging.LogRecord("scdino.x", logging.INFO, __file__, 1, "a line", None, None))
    bar.close()
    assert writes == ["INFO a line"]  # through tqdm, which clears the bar and draws it again below the line


def test_dask_shutdown_timeouts_are_not_shown_but_other_asyncio_errors_are(capsys):
    import logging

    from scdino._cli import configure_logging, not_dask_shutdown_noise

    def record(name, msg, exc):
        return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, None, (type(exc), exc, None))

    never = "Future exception was never retrieved\nfuture: <Future finished exception=TimeoutError('Timeout')>"
    assert not not_dask_shutdown_noise(record("asyncio", never, TimeoutError("Timeout")))
    assert not_dask_shutdown_noise(record("asyncio", never, ValueError("a real failure")))
    assert not_dask_shutdown_noise(record("asyncio", "Task was destroyed but it is pending!", TimeoutError()))
    assert not_dask_shutdown_noise(record("scdino.engine", never, TimeoutError("Timeout")))
    configure_logging(0)  # as the commands set it up: the filter sits on their stderr handler
    log = logging.getLogger("asyncio")
    for exc in (TimeoutError("Timeout"), ValueError("a real failure")):
        try:
            raise exc
        except Exception:
            log.error(never, exc_info=True)
    err = capsys.readouterr().err
    assert err.count("never retrieved") == 1 and "a real failure" in err and "TimeoutError: Timeout" not in err, err
