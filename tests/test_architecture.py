"""The package's shape: layers that point down (import-linter) and an install that adds only ``softcon``.

Both check the package as ``pip install`` lays it out, with the brief's folders ``flows/``, ``tasks/`` and
``models/`` inside ``softcon/``: import-linter finds a package's modules by walking its folder, so it runs on a
copy staged in that layout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("flows", "tasks", "models")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def stage_package(into: Path) -> Path:
    """Copy ``softcon/`` with ``flows/``, ``tasks/`` and ``models/`` inside it, as the wheel holds them."""
    package = into / "softcon"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "softcon", package, ignore=ignore)
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, package / folder, ignore=ignore)
    return package


def lint_imports(staged: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(staged)}
    command = [str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"]
    return subprocess.run(command, cwd=staged, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("staged")
    stage_package(root)
    return root


def test_import_contracts_hold(staged: Path) -> None:
    result = lint_imports(staged)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("tasks/grid.py", "from softcon.flows import tracking  # noqa: F401", "Layers point down"),
        ("models/loss.py", "import tasks  # noqa: F401", "through the softcon namespace only"),
    ],
)
def test_an_upward_or_top_level_import_breaks_a_contract(tmp_path: Path, module: str, line: str, broken: str) -> None:
    package = stage_package(tmp_path)
    path = package / module
    path.write_text(path.read_text() + f"\n{line}\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout
    assert "1 broken" in result.stdout and broken in result.stdout


@pytest.mark.slow
def test_install_adds_only_the_softcon_package(tmp_path: Path) -> None:
    """A non-editable install into a fresh venv puts one top-level package in site-packages, importable as such."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    fresh_site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    )  # fmt: skip
    before = set(os.listdir(fresh_site))
    source = tmp_path / "source"  # built from a copy: setuptools writes build/ beside the sources it builds
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("softcon", *FOLDERS):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip"]
    build = [*pip, "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", str(wheels), str(source)]
    subprocess.run(build, check=True, timeout=600, capture_output=True)
    (wheel,) = wheels.glob("softcon_pipeline-*.whl")
    install = [*pip, "--python", str(python), "install", "--quiet", "--no-deps", str(wheel)]
    subprocess.run(install, check=True, timeout=600, capture_output=True)
    added = {name for name in set(os.listdir(fresh_site)) - before if not name.endswith(".dist-info")}
    assert added == {"softcon"}, f"the install added top-level {sorted(added)}"
    # The dependencies come from the test venv's site-packages, on PYTHONPATH so that its .pth files (among them the
    # editable install's finder for this checkout) are not read: `softcon` can only come from the fresh install.
    env = {**os.environ, "PYTHONPATH": sysconfig.get_path("purelib")}
    check = (
        "import importlib, softcon, softcon.tasks.grid, softcon.flows.result, softcon.models.loss\n"
        "import softcon.compat.zarr_internals\n"
        f"assert softcon.__file__.startswith({str(fresh_site)!r}), softcon.__file__\n"
        "for name in ('tasks', 'flows', 'models'):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ModuleNotFoundError:\n"
        "        continue\n"
        "    raise SystemExit(f'top-level {name} is importable')\n"
    )
    result = subprocess.run([str(python), "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
