"""Packaging as a user meets it: the wheel installs one package, `noisewise`, in a fresh environment; the Bento
installs that wheel and its requirements cover every third-party import of the code; an MLflow model lists
requirements a package index serves and carries its own loader code.

All offline: the wheel is built without build isolation (setuptools from the dev extra) and `bentoml build`
does not lock (bentofile.yaml: lock_packages false), so neither reaches a package index.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "bentofile.yaml", "src", "models", "services", "monitoring")
PACKAGE_DIRS = ("src/noisewise", "models", "services", "monitoring")
# A module that comes with a declared distribution rather than its own: pydantic pins its core exactly, so
# declaring pydantic-core too would only fight that pin.
PROVIDED_BY = {"pydantic_core": "pydantic"}


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return {**env, "DO_NOT_TRACK": "true", "BENTOML_DO_NOT_TRACK": "true", **extra}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A copy of the sources (a build writes build/ and *.egg-info beside them) and the wheel built from it."""
    root = tmp_path_factory.mktemp("packaging") / "repo"
    root.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        else:
            shutil.copy2(REPO / name, root / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
                           "--no-build-isolation", "--no-index", "--wheel-dir", str(root / "dist"), str(root)],
                          capture_output=True, text=True, timeout=300, env=clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (root / "dist").glob("noisewise-*.whl")
    return root, wheel


def test_wheel_holds_one_package_with_its_data(built):
    _, wheel = built
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert {n.split("/")[0] for n in names} == {"noisewise", wheel.name.split("-py3")[0] + ".dist-info"}
    for path in ("noisewise/__init__.py", "noisewise/services/service.py", "noisewise/services/cli.py",
                 "noisewise/models/registry.py", "noisewise/models/pyfunc_model.py",
                 "noisewise/models/uncertainty/conformal.py", "noisewise/monitoring/migrations/env.py",
                 "noisewise/monitoring/migrations/script.py.mako", "noisewise/monitoring/prometheus/prometheus.yml"):
        assert path in names, path
    assert any(n.startswith("noisewise/models/recipes/") and n.endswith(".yaml") for n in names)
    assert any(n.startswith("noisewise/monitoring/migrations/versions/") for n in names)
    assert any(n.startswith("noisewise/monitoring/grafana/dashboards/") for n in names)
    # the Bento installs this very file: bentofile.yaml names it, version included
    config = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    assert config["python"]["wheels"] == [f"dist/{wheel.name}"]


def test_fresh_environment_imports_noisewise_and_no_generic_names(built, tmp_path):
    """`pip install --no-deps` of the wheel into a new virtual environment outside the repository: `models`,
    `services` and `monitoring` are not importable, `noisewise` and its subpackages are (and the package
    imports nothing heavy: no dependency is installed there)."""
    _, wheel = built
    home = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(home)
    python = str(home / "bin" / "python")
    proc = subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                           "--no-index", str(wheel)], capture_output=True, text=True, timeout=300, env=clean_env(),
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for generic in ("models", "services", "monitoring"):
        proc = subprocess.run([python, "-c", f"import {generic}"], capture_output=True, text=True, env=clean_env(),
                              cwd=tmp_path, timeout=60)
        assert proc.returncode == 1 and f"No module named '{generic}'" in proc.stderr, (generic, proc.stderr)
    script = ("import sys, importlib.resources as r, noisewise, noisewise.models, noisewise.models.uncertainty, "
              "noisewise.services, noisewise.monitoring; "
              "print(noisewise.__version__, noisewise.models.__file__.startswith(sys.prefix), "
              "r.files('noisewise.monitoring').joinpath('migrations/env.py').is_file(), 'torch' in sys.modules)")
    proc = subprocess.run([python, "-c", script], capture_output=True, text=True, env=clean_env(), cwd=tmp_path,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0.1.0", "True", "True", "False"]
    assert (home / "bin" / "noisewise").is_file()  # the console script


class _Imports(ast.NodeVisitor):
    """Top-level names of the modules a file imports, wherever the import statement stands (lazy imports inside
    functions count: they run when the code path does), except under ``if TYPE_CHECKING:`` and inside a ``try``
    whose handler catches ImportError (an optional import with a fallback)."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Try(self, node: ast.Try) -> None:
        def catches_import_error(handler: ast.ExceptHandler) -> bool:
            types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
            return any(isinstance(t, ast.Name) and t.id in ("ImportError", "ModuleNotFoundError") for t in types)

        if any(catches_import_error(h) for h in node.handlers):
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.names.update(alias.name.split(".")[0] for alias in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module:
            self.names.add(node.module.split(".")[0])


def third_party_imports() -> dict[str, list[str]]:
    """Module name -> files of noisewise (service, CLI, models, monitoring) that import it."""
    found: dict[str, list[str]] = {}
    for folder in PACKAGE_DIRS:
        for path in sorted((REPO / folder).rglob("*.py")):
            visitor = _Imports()
            visitor.visit(ast.parse(path.read_text(), filename=str(path)))
            for name in visitor.names - set(sys.stdlib_module_names) - {"noisewise", "__future__"}:
                found.setdefault(name, []).append(str(path.relative_to(REPO)))
    return found


def requirement_names(lines: list[str]) -> set[str]:
    """Canonical names of the requirements among ``lines`` that apply without extras."""
    names = set()
    for line in lines:
        line = line.split("#")[0].strip()
        if not line or line.startswith("-"):
            continue
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            names.add(canonicalize_name(requirement.name))
    return names


def test_bento_installs_the_wheel_and_its_requirements_cover_every_import(built, tmp_path):
    root, wheel = built
    home = tmp_path / "bentoml"
    proc = subprocess.run([sys.executable, "-m", "bentoml", "build", "-f", str(root / "bentofile.yaml"), str(root)],
                          capture_output=True, text=True, timeout=300, cwd=root,
                          env=clean_env(BENTOML_HOME=str(home)))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    (bento,) = [p for p in (home / "bentos" / "noisewise").iterdir() if p.name != "latest"]
    python_env = bento / "env" / "python"
    assert [w.name for w in (python_env / "wheels").glob("*.whl")] == [wheel.name]
    # nothing but the wheel brings code: the repository's folders would be importable as `models`, ...
    assert sorted(str(p.relative_to(bento / "src")) for p in (bento / "src").rglob("*") if p.is_file()) == \
        ["bentofile.yaml"]
    with zipfile.ZipFile(python_env / "wheels" / wheel.name) as archive:
        metadata = archive.read(f"{wheel.name.split('-py3')[0]}.dist-info/METADATA").decode()
    declared = [line.split(":", 1)[1] for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    # what the Bento installs: its requirements.txt, then the wheel with the requirements its metadata lists
    installed = requirement_names((python_env / "requirements.txt").read_text().splitlines()) | requirement_names(
        declared)
    assert {"torch", "mapie", "alembic", "psycopg"} <= installed
    # the one package the Bento adds to the wheel is the [postgres] extra, spelled as pyproject spells it
    extra = [line.split(":", 1)[1].split(";")[0].strip() for line in metadata.splitlines()
             if line.startswith("Requires-Dist:") and 'extra == "postgres"' in line]
    bentofile = yaml.safe_load((root / "bentofile.yaml").read_text())
    assert [Requirement(r) for r in bentofile["python"]["packages"]] == [Requirement(r) for r in extra]

    imports = third_party_imports()
    assert {"torch", "bentoml", "evidently", "alembic", "sqlalchemy", "httpx", "mlxtend", "cleanlab", "PIL",
            "yaml"} <= set(imports), sorted(imports)
    distributions = packages_distributions()
    uncovered = {}
    for module, files in sorted(imports.items()):
        names = {canonicalize_name(PROVIDED_BY.get(module, d)) for d in distributions.get(module, [])}
        if not names & installed:
            uncovered[module] = (sorted(names) or "not installed here", files[:3])
    assert not uncovered, f"imported but not in the Bento's requirements: {uncovered}"


def test_mlflow_model_installs_from_an_index_and_loads_without_noisewise(tmp_path):
    """The pyfunc model's requirements.txt names only distributions an index serves (pinned), and the model
    loads and predicts in a process where `noisewise` is importable only from the model's own code folder."""
    import numpy as np
    import torch
    from noisewise.models import registry
    from noisewise.models.nets import arch_name, build_net

    torch.manual_seed(0)
    net = build_net("mlp", (1, 8, 8), 3)
    spec = registry.ModelSpec(arch=arch_name(net), input_shape=[1, 8, 8], class_names=["a", "b", "c"])
    logged = registry.log_training_run(net, spec, {"seed": 0}, [], {}, register_as="packaging-pyfunc-test")
    uri = f"models:/{logged.name}/{logged.version}"
    local = Path(registry._mlflow().artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path)))
    lines = [line for line in (local / "requirements.txt").read_text().splitlines() if line.strip()]
    requirements = [Requirement(line) for line in lines]
    names = {canonicalize_name(r.name) for r in requirements}
    assert "noisewise" not in names and {"torch", "numpy", "safetensors", "mlflow"} <= names
    assert all(len(r.specifier) == 1 and next(iter(r.specifier)).operator == "==" for r in requirements), lines
    assert "torch==2.13.0" in lines  # no local +cpu tag: no index serves it
    assert (local / "code" / "noisewise" / "models" / "registry.py").is_file()

    x = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)
    with torch.no_grad():
        expected = torch.softmax(net.eval()(torch.as_tensor(x)), dim=1).numpy()
    np.save(tmp_path / "x.npy", x)
    # -S: no .pth files, so the editable install of noisewise is not on the path; the rest of the venv is
    script = (f"import sys; sys.path.append({sysconfig.get_paths()['purelib']!r})\n"
              "import importlib.util, json, numpy as np\n"
              "assert importlib.util.find_spec('noisewise') is None, 'noisewise importable before loading'\n"
              "import mlflow.pyfunc\n"
              f"out = mlflow.pyfunc.load_model({uri!r}).predict(np.load('x.npy'))\n"
              "import noisewise\n"
              "print(json.dumps({'from': noisewise.__file__, 'probs': np.asarray(out).tolist()}))\n")
    proc = subprocess.run([sys.executable, "-S", "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300, env=clean_env(MLFLOW_TRACKING_URI=registry.tracking_uri()))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "/code/noisewise/" in result["from"]
    np.testing.assert_allclose(result["probs"], expected, rtol=1e-5, atol=1e-6)
