"""The device recipe (benchmarks/device/): the wheels a GPU machine needs beyond its image, the checker of a wheel
folder, and run.sh's one-line skip of a step whose package is missing. Fast and offline: the real wheels are checked by
check_wheels.py where they are downloaded (fetch_wheels.sh) and used (simulate.sh). Benchmarks run as scripts here,
never imported."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DEVICE = ROOT / "benchmarks" / "device"

#: written by hand, not read from any list: import name -> distribution, for what ``scdino-engine run`` (zarr, Dask,
#: the AnnData store), the plate writer (``scdino.engine.sample``: ome-zarr) and the device benchmarks import, directly
#: or through one of these, that the device image lacks
NOT_IN_IMAGE = {
    "zarr": "zarr",
    "numcodecs": "numcodecs",
    "donfig": "donfig",
    "google_crc32c": "google-crc32c",
    "dask": "dask",
    "distributed": "distributed",
    "partd": "partd",
    "locket": "locket",
    "tblib": "tblib",
    "tornado": "tornado",
    "zict": "zict",
    "anndata": "anndata",
    "array_api_compat": "array-api-compat",
    "legacy_api_wrap": "legacy-api-wrap",
    "natsort": "natsort",
    "scverse_misc": "scverse-misc",
    "session_info2": "session-info2",
    "pydantic_settings": "pydantic-settings",
    "dotenv": "python-dotenv",
    "ome_zarr": "ome-zarr",
    "ome_zarr_models": "ome-zarr-models",
    "pydantic_zarr": "pydantic-zarr",
    "pydantic": "pydantic",
    "pydantic_core": "pydantic-core",
    "annotated_types": "annotated-types",
    "typing_inspection": "typing-inspection",
    "deprecated": "deprecated",
    "RangeHTTPServer": "rangehttpserver",
}
#: ... and what they import that the image has (KINDS.md of the device tool)
IN_IMAGE = {
    "torch": "torch",
    "numpy": "numpy",
    "pandas": "pandas",
    "scipy": "scipy",
    "skimage": "scikit-image",
    "sklearn": "scikit-learn",
    "click": "click",
    "psutil": "psutil",
    "tqdm": "tqdm",
    "pyarrow": "pyarrow",
    "matplotlib": "matplotlib",
    "yaml": "pyyaml",
    "tifffile": "tifffile",
    "onnx": "onnx",
    "onnxruntime": "onnxruntime",
    "PIL": "pillow",
    "toolz": "toolz",
    "cloudpickle": "cloudpickle",
    "fsspec": "fsspec",
    "msgpack": "msgpack",
    "jinja2": "jinja2",
    "sortedcontainers": "sortedcontainers",
    "h5py": "h5py",
    "aiohttp": "aiohttp",
    "requests": "requests",
    "wrapt": "wrapt",
}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")


def pins() -> dict[str, str]:
    out = {}
    for line in (DEVICE / "wheels.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            m = PIN.match(line.strip())
            assert m, f"wheels.txt: {line!r} is not NAME==VERSION"
            assert canonicalize_name(m[1]) not in out, f"wheels.txt: {m[1]} twice"
            out[canonicalize_name(m[1])] = m[2]
    return out


def image() -> set[str]:
    lines = (DEVICE / "image.txt").read_text().splitlines()
    return {canonicalize_name(line.split("#")[0].split("==")[0].strip()) for line in lines if line[:1].isalnum()}


def test_wheels_txt_is_well_formed():
    got = pins()
    for version in got.values():
        Version(version)  # a version pip can compare
    assert len(got) >= 20
    for line in (DEVICE / "wheels.txt").read_text().splitlines():
        if line.startswith("# not carried:"):
            m = re.match(r"# not carried: (\S+) - \S", line)
            assert m, f"wheels.txt: {line!r} is not '# not carried: NAME - why'"
            assert canonicalize_name(m[1]) not in got


def test_wheels_cover_what_the_image_lacks():
    got, img = pins(), image()
    lacking = [d for d in NOT_IN_IMAGE.values() if canonicalize_name(d) not in got]
    assert not lacking, f"the device image lacks these and wheels.txt does not carry them: {lacking}"
    assert not [d for d in NOT_IN_IMAGE.values() if canonicalize_name(d) in img], "image.txt has what the test says not"
    absent = [d for d in IN_IMAGE.values() if canonicalize_name(d) not in img]
    assert not absent, f"neither carried nor in image.txt: {absent}"
    # anndata 0.12 declares pandas<3 and fails writing obs under the image's pandas 3; building scdino needs
    # setuptools>=77 and wheel where the image's are older
    assert Version(got["anndata"]) >= Version("0.13")
    assert Version(got["setuptools"]) >= Version("77") and "wheel" in got


def test_print_wheels_is_wheels_txt():
    p = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_pipeline.py"), "--print-wheels"],
        capture_output=True,
        text=True,
        check=True,
    )
    printed = dict(line.split("==") for line in p.stdout.split())
    assert {canonicalize_name(k): v for k, v in printed.items()} == pins()


def fake_wheel(folder: Path, name: str, version: str, requires: list[str]) -> None:
    """A wheel with only its METADATA: what check_wheels.py reads."""
    stem = f"{name.replace('-', '_')}-{version}"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires
    )
    with zipfile.ZipFile(folder / f"{stem}-py3-none-any.whl", "w") as z:
        z.writestr(f"{stem}.dist-info/METADATA", meta)


def test_check_wheels_finds_what_no_wheel_and_not_the_image_gives(tmp_path):
    """check_wheels.py on a folder of stand-in wheels at wheels.txt's versions: all met; then a build requirement that
    only the image has (pip's build isolation does not see it) and a runtime one nobody has are each named."""
    for name, version in pins().items():
        fake_wheel(tmp_path, name, version, [])
    script = [sys.executable, str(DEVICE / "check_wheels.py"), str(tmp_path)]
    ok = subprocess.run(script, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout
    assert "every requirement met" in ok.stdout

    (tmp_path / f"wheel-{pins()['wheel']}-py3-none-any.whl").unlink()
    fake_wheel(tmp_path, "wheel", pins()["wheel"], ["packaging>=24.0"])
    (tmp_path / f"zict-{pins()['zict']}-py3-none-any.whl").unlink()
    fake_wheel(tmp_path, "zict", pins()["zict"], ["no-such-package>=1", "numpy; python_version < '3.9'"])
    bad = subprocess.run(script, capture_output=True, text=True)
    assert bad.returncode == 1
    problems = [line for line in bad.stdout.splitlines() if line.startswith("problem:")]
    assert len(problems) == 2, bad.stdout
    assert "wheel requires packaging>=24.0" in problems[0] + problems[1]
    assert "zict requires no-such-package>=1" in problems[0] + problems[1]


@pytest.fixture
def no_pydantic(tmp_path) -> Path:
    """A folder that, first on PYTHONPATH, makes pydantic missing as Python says it (what ome-zarr imports)."""
    hide = tmp_path / "hide" / "pydantic"
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text('raise ModuleNotFoundError("No module named \'pydantic\'", name="pydantic")\n')
    return hide.parent


def test_run_sh_skips_a_step_in_one_line(tmp_path, no_pydantic):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(no_pydantic), "OUT": str(out)}
    p = subprocess.run(
        ["bash", str(DEVICE / "run.sh"), "--cpu-dry-run", "--no-install", "--only", "gpu_pipeline"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    said = [line for line in p.stdout.splitlines() if "pydantic" in line]
    assert said[0] == "== gpu_pipeline: skipped (pydantic is not installed (needed by ome_zarr.writer))"
    assert "Traceback" not in p.stdout + p.stderr
    steps = json.loads((out / "summary.json").read_text())["steps"]
    assert [(s["step"], s["status"]) for s in steps] == [("gpu_pipeline", "skipped")]
    assert steps[0]["why"].startswith("pydantic is not installed")
    assert sorted(f.name for f in out.iterdir()) == ["run.log", "summary.json"]


def test_gpu_pipeline_names_a_missing_package_before_any_work(tmp_path, no_pydantic):
    """The review's failure: ome-zarr present, its pydantic not: one line, a skipped JSON, no plate, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(no_pydantic)}
    p = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_pipeline.py"),
            "--cpu-dry-run",
            "--out",
            str(tmp_path / "g.json"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 0 and p.stderr == "", p.stderr
    (line,) = p.stdout.splitlines()
    assert json.loads(line)["why"].startswith("pydantic is not installed (needed by ome_zarr.writer)")
    assert json.loads((tmp_path / "g.json").read_text())["status"] == "skipped"
