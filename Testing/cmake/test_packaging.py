"""Configure the extension against the stub Slicer config and check what it would ship.

Slicer's build tree is not available here, so the stub's macros record their arguments and copy
files like Slicer's would; the tests then check the listed files exist, every shipped Python file
compiles, and every module the Slicer module imports at run time is shipped.
"""

import ast
import json
import os
import py_compile
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STUB = Path(__file__).resolve().parent
OUR_PACKAGES = ("MaxQuerySlicer", "MaxQuerySlicerLib", "maxquery")
CORE_IN_TREE = Path("MaxQuerySlicerLib") / "core"  # where the extension ships the core package
SLICER_PROVIDED = {"slicer", "qt", "ctk", "vtk", "SimpleITK", "numpy", "pydicom", "PyTorchUtils", "SampleData",
                   "packaging"}
NOT_ON_THE_RUN_PATH = {"tqdm", "matplotlib"}  # the command line's --progress bar and --png; never used by the module


@pytest.fixture(scope="module")
def configured(tmp_path_factory):
    build = tmp_path_factory.mktemp("build")
    done = subprocess.run(["cmake", "-S", str(REPO), "-B", str(build), f"-DSlicer_DIR={STUB}", "-DBUILD_TESTING=ON"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    record: dict[tuple[str, str], list[str]] = {}
    for line in (build / "slicer_stub_record.txt").read_text().splitlines():
        macro, key, value = line.split("|", 2)
        record.setdefault((macro, key), []).append(value)
    return build, record, build / "lib" / "Slicer-5.9" / "qt-scripted-modules"


def resolve(tree: Path, name: str) -> Path | None:
    """The shipped file a dotted module name loads from, or None (the core from inside the library)."""
    root = tree / CORE_IN_TREE if name.split(".")[0] == "maxquery" and tree.name != "Logic" else tree
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_names(path: Path, tree: Path) -> set[str]:
    """Absolute names of every module ``path`` imports, at any depth of the file (incl. lazy imports)."""
    root = tree / CORE_IN_TREE if (tree / CORE_IN_TREE) in path.parents else tree
    package = ".".join(path.relative_to(root).parent.parts)  # what a relative import is relative to
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                parts = parts[:len(parts) - (node.level - 1)]
                module = ".".join(parts + ([node.module] if node.module else []))
            else:
                module = node.module
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)  # may be submodules
    return names


def walk_imports(tree: Path, starts=("MaxQuerySlicer", "maxquery.cli")) -> tuple[set[Path], set[str], set[str]]:
    """Follow imports from the module and from the child's command line through our packages:
    (files reached, missing, third-party)."""
    reached, missing, third_party = set(), set(), set()
    queue = list(starts)
    while queue:
        name = queue.pop()
        top = name.split(".")[0]
        if top not in OUR_PACKAGES:
            third_party.add(top)
            continue
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a, a.b and a.b.c
            prefix = ".".join(parts[:i])
            path = resolve(tree, prefix)
            if path is None:
                if resolve(REPO / "Logic", prefix) or resolve(REPO / "MaxQuerySlicer", prefix):
                    missing.add(prefix)  # exists in the source tree, not shipped
                continue
            if path not in reached:
                reached.add(path)
                queue.extend(imported_names(path, tree))
    return reached, missing, third_party


def test_listed_scripts_and_resources_exist(configured):
    _, record, _ = configured
    source = Path(record[("slicerMacroBuildScriptedModule", "SOURCE_DIR")][0])
    listed = record[("slicerMacroBuildScriptedModule", "SCRIPTS")] + record[("slicerMacroBuildScriptedModule", "RESOURCES")]
    assert "MaxQuerySlicer.py" in listed and "Resources/UI/MaxQuerySlicer.ui" in listed
    assert [f for f in listed if not (source / f).is_file()] == []
    on_disk = {str(p.relative_to(source)) for p in (source / "MaxQuerySlicerLib").glob("*.py")}
    assert on_disk <= set(listed), "a library file is not listed in MaxQuerySlicer/CMakeLists.txt"
    assert record[("slicer_add_python_unittest", "SCRIPT")] == [str(source / "MaxQuerySlicer.py")]


def test_every_shipped_python_file_compiles(configured, tmp_path):
    _, _, tree = configured
    files = sorted(tree.rglob("*.py"))
    assert len(files) > 20
    for path in files:
        py_compile.compile(str(path), cfile=str(tmp_path / "out.pyc"), doraise=True)


def test_everything_the_module_and_its_child_import_is_shipped(configured):
    _, _, tree = configured
    reached, missing, third_party = walk_imports(tree)
    assert missing == set()
    assert tree / CORE_IN_TREE / "maxquery" / "inference" / "predictor.py" in reached
    assert tree / CORE_IN_TREE / "maxquery" / "progress.py" in reached
    sys.path.insert(0, str(REPO / "MaxQuerySlicer"))
    from MaxQuerySlicerLib import dependencies

    installed_on_first_use = {r.module for r in dependencies.RUNTIME} | {"highdicom"}  # highdicom: DICOM SEG export
    allowed = SLICER_PROVIDED | installed_on_first_use | NOT_ON_THE_RUN_PATH | set(sys.stdlib_module_names)
    assert third_party - allowed == set(), "imported at run time but neither shipped by Slicer nor installed on first use"


def test_the_core_cannot_collide_with_another_extensions_package(configured, tmp_path):
    """No top-level ``maxquery`` beside other extensions' modules; the module uses its own copy even
    when another ``maxquery`` comes first on the path, and refuses one that is already imported."""
    _, _, tree = configured
    assert not (tree / "maxquery").exists()
    other = tmp_path / "other-extension"
    (other / "maxquery").mkdir(parents=True)
    (other / "maxquery" / "__init__.py").write_text("OTHER = True\n")
    env = {"PYTHONPATH": os.pathsep.join([str(other), str(tree)]), "PATH": os.environ.get("PATH", "")}
    uses_ours = "import MaxQuerySlicerLib, maxquery.progress; print(maxquery.__file__)"
    done = subprocess.run([sys.executable, "-c", uses_ours], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).parent.parent == tree / CORE_IN_TREE
    refuses = "import maxquery; import MaxQuerySlicerLib"
    done = subprocess.run([sys.executable, "-c", refuses], capture_output=True, text=True, env=env)
    assert done.returncode != 0 and "another 'maxquery' package" in done.stderr


def test_the_child_process_runs_from_the_shipped_tree(configured):
    """What ChildRun starts: ``python -m maxquery.cli`` with the shipped core on PYTHONPATH."""
    _, _, tree = configured
    env = {**os.environ, "PYTHONPATH": str(tree / CORE_IN_TREE)}
    done = subprocess.run([sys.executable, "-m", "maxquery.cli", "segment", "--help"], capture_output=True,
                          text=True, env=env, cwd=tree)
    assert done.returncode == 0 and "--progress" in done.stdout, done.stderr


def test_the_import_check_catches_a_missing_file(configured, tmp_path):
    _, _, tree = configured
    copy = tmp_path / "tree"
    shutil.copytree(tree, copy)
    (copy / CORE_IN_TREE / "maxquery" / "inference" / "lesions.py").unlink()
    assert walk_imports(copy)[1] == {"maxquery.inference.lesions"}


def test_demo_model_and_demo_case_are_shipped(configured):
    _, _, tree = configured
    for name in ("model_card.json", "model.safetensors"):
        assert (tree / "Resources" / "Models" / "maxquery-liver-demo" / name).is_file()
    assert (tree / "Resources" / "DemoData" / "liverbench_A_0085.nii.gz").is_file()
    code = ("import MaxQuerySlicerLib.logic as l; print(l.bundled(l.DEMO_CASE)); print(l.bundled_model_folder())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tree)}, cwd=tree)
    assert done.stdout.split() == [str(tree / "Resources" / "DemoData" / "liverbench_A_0085.nii.gz"),
                                   str(tree / "Resources" / "Models" / "maxquery-liver-demo")], done.stderr


def test_license_is_the_apache_2_text_that_pyproject_declares():
    text = (REPO / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text) > 11_000
    assert 'license = "Apache-2.0"' in (REPO / "pyproject.toml").read_text()


def test_extension_metadata_and_index_entry_agree(configured):
    _, record, _ = configured
    meta = {key: values[0] for (macro, key), values in record.items() if macro == "extension"}
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"):
        assert meta[key], key
    for url in [meta["ICONURL"], *meta["SCREENSHOTURLS"].split()]:
        assert (REPO / url.split("/main/", 1)[1]).is_file(), url
    entry = json.loads((REPO / "Resources" / "ExtensionsIndex" / f"{meta['CPACK']}.json").read_text())
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json#")
    assert entry["category"] == meta["CATEGORY"]
    assert sorted(entry["build_dependencies"]) == sorted(meta["DEPENDS"].split())
    assert entry["scm_url"].startswith("https://") and entry["scm_revision"] and entry["tier"] in (1, 3, 5)
