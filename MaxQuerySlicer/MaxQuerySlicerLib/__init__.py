"""Qt-free library of the MaxQuerySlicer module: everything that builds, updates or exports MRML nodes.

It imports only ``slicer`` (the MRML/VTK part that also ships as ``slicer-core`` on PyPI), vtk,
numpy and SimpleITK, never ``qt``/``ctk``/``slicer.app``, so it runs and is tested outside Slicer.

The extension ships the core package inside this folder (``core/maxquery``), not as a top-level
package beside other extensions' modules, where another ``maxquery`` could shadow it or be
shadowed by it. Importing this package puts that folder first on ``sys.path`` (the child process
gets the same folder through ``PYTHONPATH``); in the source tree ``Logic/`` provides the package.
"""

import sys
from pathlib import Path

CORE_DIR = Path(__file__).resolve().parent / "core"


def _use_shipped_core() -> None:
    if not (CORE_DIR / "maxquery" / "__init__.py").is_file():
        return
    loaded = sys.modules.get("maxquery")
    if loaded is not None and Path(loaded.__file__).resolve().parent.parent != CORE_DIR:
        raise ImportError(f"another 'maxquery' package ({loaded.__file__}) is already imported; "
                          "MaxQuery needs its own: remove the other one from Slicer's Python")
    if str(CORE_DIR) not in sys.path:
        sys.path.insert(0, str(CORE_DIR))


_use_shipped_core()
