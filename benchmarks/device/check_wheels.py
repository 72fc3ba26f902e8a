"""Hold a wheel folder to wheels.txt: one wheel per line at its version, each installable on the device's Python 3.12
(CPython, manylinux x86_64), and every requirement of every wheel (and of scdino itself, pyproject.toml) met by
another wheel of the list or by the device image (image.txt), or named on a ``# not carried:`` line of wheels.txt
with the reason. Also the size of what travels to a device machine: the working tree plus the wheels (64 MiB at most).

    python benchmarks/device/check_wheels.py [.whl] [--quiet]

Needs only the standard library and ``packaging`` (pip's own copy where packaging is not installed). Exits 1 with one
line per problem.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import tomllib

try:
    from packaging.requirements import Requirement
    from packaging.tags import compatible_tags, cpython_tags
    from packaging.utils import canonicalize_name, parse_wheel_filename
    from packaging.version import Version
except ImportError:  # a bare Python: pip's vendored copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.tags import compatible_tags, cpython_tags
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename
    from pip._vendor.packaging.version import Version

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
#: what travels to a device machine at most (the device tool's limit on the working tree, carried wheels included)
LIMIT_MIB = 64
#: the device's Python: CPython 3.12.3 on Linux x86-64
DEVICE_ENV = {
    "implementation_name": "cpython",
    "implementation_version": "3.12.3",
    "os_name": "posix",
    "platform_machine": "x86_64",
    "platform_python_implementation": "CPython",
    "platform_release": "",
    "platform_system": "Linux",
    "platform_version": "",
    "python_full_version": "3.12.3",
    "python_version": "3.12",
    "sys_platform": "linux",
}
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(28, 4, -1)] + ["manylinux2014_x86_64", "manylinux1_x86_64"]
DEVICE_TAGS = {*cpython_tags((3, 12), ["cp312"], PLATFORMS), *compatible_tags((3, 12), "cp312", PLATFORMS)}
LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)$")
NOT_CARRIED = re.compile(r"^# not carried: ([A-Za-z0-9][A-Za-z0-9._-]*) (?:-|—) (.+)$")


def read_wheels_txt(path: Path) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """wheels.txt: {name: version}, {name: why it is not carried}, problems (malformed or repeated lines)."""
    pins: dict[str, str] = {}
    skipped: dict[str, str] = {}
    problems = []
    for i, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if m := NOT_CARRIED.match(line):
            skipped[canonicalize_name(m[1])] = m[2]
            continue
        if not line or line.startswith("#"):
            continue
        m = LINE.match(line)
        if not m:
            problems.append(f"{path.name}:{i}: {raw!r} is not NAME==VERSION")
            continue
        name = canonicalize_name(m[1])
        if name in pins:
            problems.append(f"{path.name}:{i}: {m[1]} is listed twice (two versions stop the whole install)")
        pins[name] = m[2]
    return pins, skipped, problems


def read_image_txt(path: Path) -> dict[str, str | None]:
    """image.txt: {name: version read on the image, or None}."""
    out: dict[str, str | None] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = version or None
    return out


def requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        msg = Parser().parsestr(z.read(meta).decode())
    return [Requirement(r) for r in msg.get_all("Requires-Dist") or []]


def project_requirements(root: Path) -> tuple[list[Requirement], list[Requirement]]:
    """scdino's own requirements: (to run, to build)."""
    project = tomllib.loads((root / "pyproject.toml").read_text())
    run = [Requirement(r) for r in project["project"]["dependencies"]]
    return run, [Requirement(r) for r in project["build-system"]["requires"]]


def applies(req: Requirement, extras: set[str]) -> bool:
    """Whether ``req`` is needed on the device by a wheel installed with ``extras``."""
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**DEVICE_ENV, "extra": e}) for e in extras | {""})


def travelling_mib(root: Path) -> float:
    """MiB of the files that travel with the working tree: tracked and untracked-not-ignored ones (.whl/ aside)."""
    files = subprocess.run(
        ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    paths = (root / f.decode() for f in files if f and not f.startswith(b".whl/"))
    return sum(p.stat().st_size for p in paths if p.is_file() and not p.is_symlink()) / 2**20


def check(folder: Path, root: Path = ROOT) -> tuple[list[str], list[str]]:
    """(problems, notes) of the wheel ``folder`` against wheels.txt and image.txt."""
    pins, skipped, problems = read_wheels_txt(HERE / "wheels.txt")
    image = read_image_txt(HERE / "image.txt")
    found: dict[str, Path] = {}
    for w in sorted(folder.glob("*.whl")):
        name, version, _, tags = parse_wheel_filename(w.name)
        if name in found:
            problems.append(f"{w.name}: a second wheel of {name} (two versions stop the whole install)")
        found[name] = w
        if name not in pins:
            problems.append(f"{w.name}: not in wheels.txt")
        elif Version(pins[name]) != version:
            problems.append(f"{w.name}: wheels.txt asks for {name}=={pins[name]}")
        if not tags & DEVICE_TAGS:
            problems.append(f"{w.name}: no tag installs on CPython 3.12 manylinux x86_64")
    problems += [f"{n}=={v}: no wheel in {folder}" for n, v in pins.items() if n not in found]
    notes = [f"{n}: carried, though the image has it too" for n in pins if n in image]

    run, build = project_requirements(root)
    # every requirement, from scdino's own down, with the extras asked for, met by the wheels or the image
    roots = [("scdino", r) for r in run] + [("wheels.txt", Requirement(n)) for n in found]
    p, notes_run = closure(roots, found, pins, image, skipped)
    # building scdino: pip's build isolation sees the wheels alone, not the image
    p_build, _ = closure([("scdino's build", r) for r in build], found, pins, {}, {})
    return problems + p + [f"{x} (building runs isolated from the image)" for x in p_build], notes + notes_run


def closure(
    roots: list[tuple[str, Requirement]],
    found: dict[str, Path],
    pins: dict[str, str],
    image: dict[str, str | None],
    skipped: dict[str, str],
) -> tuple[list[str], list[str]]:
    """(problems, notes) of ``roots`` and, through the wheels in ``found``, of everything they require."""
    problems: list[str] = []
    notes: list[str] = []
    wanted: list[tuple[str, Requirement, set[str]]] = [(who, r, {""}) for who, r in roots]
    seen: set[tuple[str, str]] = set()
    while wanted:
        who, req, extras = wanted.pop()
        if not applies(req, extras):
            continue
        name = canonicalize_name(req.name)
        for extra in [*req.extras, ""]:  # a requirement's extras add the requirements of that extra
            if name not in found:
                if extra:
                    notes.append(f"{who} requires {req}: what the extras of an image package need is not checked")
            elif (name, extra) not in seen:
                seen.add((name, extra))
                wanted += [(f"{name}[{extra}]" if extra else name, r, {extra}) for r in requirements(found[name])]
        if name in pins:
            if not req.specifier.contains(pins[name], prereleases=True):
                problems.append(f"{who} requires {req}; wheels.txt has {name}=={pins[name]}")
        elif name in image:
            version = image[name]
            if version and not req.specifier.contains(version, prereleases=True):
                problems.append(f"{who} requires {req}; the image has {name} {version}: carry a wheel")
        elif name in skipped:
            notes.append(f"{who} requires {req}: not carried ({skipped[name]})")
        else:
            where = "nor in the image (image.txt)" if image else "(nothing else is there)"
            problems.append(f"{who} requires {req}: neither in wheels.txt {where}")
    return problems, notes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", type=Path, default=ROOT / ".whl")
    ap.add_argument("--quiet", action="store_true", help="Only the exit status.")
    args = ap.parse_args(argv)
    problems, notes = check(args.folder)
    wheels_mib = sum(w.stat().st_size for w in args.folder.glob("*.whl")) / 2**20
    tree_mib = travelling_mib(ROOT)
    if tree_mib + wheels_mib > LIMIT_MIB:
        problems.append(
            f"tree {tree_mib:.1f} MiB + wheels {wheels_mib:.1f} MiB is over the {LIMIT_MIB} MiB that travel"
        )
    if args.quiet:
        return 1 if problems else 0
    for n in sorted(set(notes)):
        print(f"note: {n}")
    for p in problems:
        print(f"problem: {p}")
    n = len(list(args.folder.glob("*.whl")))
    print(
        f"{n} wheels, {wheels_mib:.1f} MiB; with the working tree ({tree_mib:.1f} MiB) {tree_mib + wheels_mib:.1f} "
        f"MiB of the {LIMIT_MIB} that travel; "
        + (f"{len(problems)} problem(s)" if problems else "every requirement met")
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
