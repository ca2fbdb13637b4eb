"""The first-use install plan against a simulated Slicer Python: nothing installed is replaced,
torch never goes to pip, and only what the run-time path imports is asked for."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from MaxQuerySlicerLib import dependencies

REPO = Path(__file__).resolve().parents[2]
SLICER_5_8 = {  # what a Slicer 5.8 with the PyTorch extension's torch has, among others
    "numpy": "1.26.4", "SimpleITK": "2.4.0", "vtk": "9.3.0", "pydicom": "2.4.4", "torch": "2.4.0",
    "scipy": "1.11.4", "packaging": "24.1", "pip": "24.2", "requests": "2.32.3",
}


def fake_site_packages(folder: Path, distributions: dict[str, str]) -> Path:
    """A site-packages folder holding only the metadata of ``distributions`` (what importlib reads)."""
    for name, version in distributions.items():
        info = folder / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return folder


@pytest.fixture
def slicer_env(tmp_path) -> dict[str, str]:
    return dependencies.installed_versions([str(fake_site_packages(tmp_path / "site-packages", SLICER_5_8))])


def test_the_simulated_environment_is_read_from_its_metadata(slicer_env):
    assert slicer_env["torch"] == "2.4.0" and slicer_env["pydicom"] == "2.4.4"
    assert slicer_env["simpleitk"] == "2.4.0"  # canonical names, as pip compares them


def test_plan_installs_only_what_is_missing_and_pins_everything_installed(slicer_env, tmp_path):
    plan = dependencies.make_plan(installed=slicer_env)
    assert plan.pip == ["safetensors>=0.4", "psutil>=5.9", "pynrrd>=1.0"]
    assert not plan.torch_from_extension and not plan.broken
    assert {dependencies.canonical(d.split("==")[0]) for d in plan.constraints} == set(slicer_env)
    for pinned in ("torch==2.4.0", "pydicom==2.4.4", "numpy==1.26.4", "simpleitk==2.4.0", "scipy==1.11.4"):
        assert pinned in plan.constraints
    installed_names = set(slicer_env)
    assert not [r for r in plan.pip if dependencies.Requirement("", r).name in installed_names]
    lines = plan.write_constraints(tmp_path).read_text().splitlines()
    assert lines == plan.constraints


def test_torch_comes_only_from_the_pytorch_extension(slicer_env):
    factory = {name: version for name, version in slicer_env.items() if name != "torch"}
    plan = dependencies.make_plan(installed=factory)
    assert plan.torch_from_extension
    assert not any(r.startswith("torch") for r in plan.pip)
    assert "PyTorch extension" in plan.describe()


def test_a_slicer_without_its_own_packages_is_reported_broken(slicer_env):
    assert dependencies.make_plan(installed={k: v for k, v in slicer_env.items() if k != "numpy"}).broken == ["numpy"]


@pytest.mark.parametrize("pydicom, wanted", [("2.4.4", "highdicom>=0.22,<0.23"), ("3.0.1", "highdicom>=0.23")])
def test_highdicom_matches_the_installed_pydicom(slicer_env, pydicom, wanted):
    plan = dependencies.dicom_seg_plan({**slicer_env, "pydicom": pydicom})
    assert plan.pip == [wanted]
    assert f"pydicom=={pydicom}" in plan.constraints
    assert dependencies.make_plan(installed=slicer_env).pip.count(wanted) == 0  # not asked for before an export


def test_runtime_requirements_are_exactly_what_the_child_imports():
    """Walk the imports of ``maxquery.cli`` (the child) and of the module library: every third-party
    package they need at run time is either shipped by Slicer or in ``RUNTIME``; nothing more is asked."""
    logic = REPO / "Logic"
    imported, queue, seen = set(), ["maxquery.cli", "maxquery.inference.lesions", "maxquery.io"], set()
    while queue:
        name = queue.pop()
        path = logic.joinpath(*name.split("."))
        for candidate in (path.with_suffix(".py"), path / "__init__.py"):
            if candidate.is_file() and candidate not in seen:
                seen.add(candidate)
                package = name if candidate.name == "__init__.py" else name.rpartition(".")[0]
                for node in ast.walk(ast.parse(candidate.read_text())):
                    if isinstance(node, ast.ImportFrom) and node.level:
                        base = package.split(".")[: len(package.split(".")) - node.level + 1]
                        module = ".".join(base + ([node.module] if node.module else []))
                        queue.append(module)
                        queue.extend(f"{module}.{a.name}" for a in node.names)
                    elif isinstance(node, ast.ImportFrom):
                        imported.add(node.module.split(".")[0])
                    elif isinstance(node, ast.Import):
                        imported.update(a.name.split(".")[0] for a in node.names)
    third_party = imported - set(sys.stdlib_module_names) - {"maxquery"}
    runtime = {r.module for r in dependencies.RUNTIME}
    not_for_the_child = {"matplotlib", "tqdm"}  # --png and --progress bar, which the module never asks for
    assert third_party - not_for_the_child - runtime - set(dependencies.SHIPPED_WITH_SLICER) == set()
    assert runtime <= third_party, "a requirement nothing imports"
    assert "monai" not in runtime and "skimage" not in runtime


def test_the_child_process_imports_without_tqdm_monai_or_skimage():
    """Slicer has none of them and the plan does not install them (torch uses tqdm only if present)."""
    code = ("import sys\nfor name in ('tqdm', 'monai', 'skimage'): sys.modules[name] = None\n"
            "import maxquery.cli, maxquery.inference.predictor\nfrom maxquery.progress import reporter\n"
            "reporter('json').start(1)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == '{"event": "start", "cases": 1}'


def test_everything_is_found_in_the_test_environment():
    assert not dependencies.make_plan().needed
