"""What the module does, without any GUI: run a model on a volume node and manage its result nodes.

``MaxQueryLogic(scene)`` works in Slicer's Python console, in a script on bare MRML, and behind the
widget. Inference runs in a ``BackgroundRun``; nodes are built by ``finish`` on the calling thread.
"""

from __future__ import annotations

from pathlib import Path

from . import export, geometry, nodes
from .parameters import Parameters
from .run import BackgroundRun

MODULE_NAME = "MaxQuerySlicer"
DEMO_MODEL = Path("Resources") / "Models" / "maxquery-liver-demo"
LIB_DIR = Path(__file__).resolve().parent


def bundled_model_folder() -> Path | None:
    """The demo model: beside the installed scripted modules, or at the top of the source tree."""
    for base in (LIB_DIR.parent, LIB_DIR.parent.parent):
        if (base / DEMO_MODEL / "model_card.json").is_file():
            return base / DEMO_MODEL
    return None


class MaxQueryLogic:
    def __init__(self, scene):
        self.scene = scene
        self._predictors: dict[tuple, object] = {}
        self._results: dict[str, tuple] = {}  # segmentation node ID → (result, candidate region)

    # --- settings -----------------------------------------------------------------------------
    def parameter_node(self):
        """The scene's single parameter node of this module (created on first use)."""
        for i in range(self.scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode")):
            node = self.scene.GetNthNodeByClass(i, "vtkMRMLScriptedModuleNode")
            if node.GetAttribute("ModuleName") == MODULE_NAME:
                return node
        node = self.scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", MODULE_NAME)
        node.SetAttribute("ModuleName", MODULE_NAME)
        node.SetSingletonTag(MODULE_NAME)
        node.HideFromEditorsOn()
        return node

    def parameters(self) -> Parameters:
        return Parameters(self.parameter_node())

    def model_folder(self, params: Parameters) -> Path:
        if params.model_folder:
            return Path(params.model_folder)
        bundled = bundled_model_folder()
        if bundled is None:
            from maxquery.model_folder import ModelFolderError

            raise ModelFolderError("the bundled demo model is not installed; choose a model folder")
        return bundled

    @staticmethod
    def read_card(folder):
        """The model card alone (fast; the weights are loaded when a run starts)."""
        from maxquery.model_folder import read_model_card

        return read_model_card(folder)

    # --- running ------------------------------------------------------------------------------
    def predictor(self, folder: Path, device: str, fast: bool):
        """Predictors are cached per (folder, device, quality) so a second run skips loading."""
        from maxquery.inference import Predictor

        key = (str(Path(folder).resolve()), device, fast)
        if key not in self._predictors:
            self._predictors.clear()  # keep at most one network in memory
            self._predictors[key] = Predictor(folder, device=device, fast=fast)
        return self._predictors[key]

    def start(self, volume_node, params: Parameters | None = None) -> BackgroundRun:
        """Copy the volume's voxels and start inference in a worker thread; the scene is untouched."""
        params = params or self.parameters()
        if volume_node is None:
            raise ValueError("choose a CT volume first")
        folder = self.model_folder(params)
        image = geometry.image_from_node(volume_node)
        make = lambda: self.predictor(folder, params.device, params.quality == "fast")  # noqa: E731
        return BackgroundRun(make, image, params.threshold).start()

    def finish(self, run: BackgroundRun, volume_node, params: Parameters | None = None) -> nodes.ResultNodes:
        """Build the result nodes of a finished run; re-raises the run's error (incl. RunCancelled)."""
        params = params or self.parameters()
        if not run.done:
            raise RuntimeError("the run has not finished")
        if run.error is not None:
            raise run.error
        return self.add_result(run.result, volume_node, params)

    def process(self, volume_node, params: Parameters | None = None) -> nodes.ResultNodes:
        """Run and wait (scripts, the self-test)."""
        params = params or self.parameters()
        run = self.start(volume_node, params)
        run.wait()
        return self.finish(run, volume_node, params)

    def add_result(self, result, volume_node, params: Parameters) -> nodes.ResultNodes:
        """Result → nodes; if any step fails, the nodes made so far are removed again."""
        base = f"{volume_node.GetName()} MaxQuery"
        created = nodes.ResultNodes(None, None, None)
        region = nodes.candidate_region(result)
        try:
            created.segmentation = nodes.create_segmentation(self.scene, result, volume_node, f"{base} segmentation",
                                                             region)
            created.anomaly = nodes.create_anomaly_volume(self.scene, result, f"{base} anomaly", region)
            created.table = nodes.create_lesion_table(self.scene, result.lesions, f"{base} candidates")
            created.folder_item = nodes.place_in_study(self.scene, volume_node, created.nodes(), base)
        except Exception:
            created.remove(self.scene)
            raise
        self._results[created.segmentation.GetID()] = (result, region)
        params.threshold = result.anomaly_threshold
        for role, node in (("InputVolume", volume_node), ("Segmentation", created.segmentation),
                           ("AnomalyVolume", created.anomaly), ("LesionTable", created.table)):
            params.set_reference(role, node)
        nodes.show_overlay(self.scene, volume_node, created.anomaly, params.opacity)
        nodes.set_3d_visibility(created.segmentation, params.show_3d)
        return created

    # --- review -------------------------------------------------------------------------------
    def set_threshold(self, value: float, params: Parameters | None = None) -> int:
        """Move the threshold and redraw the candidates segment; returns its voxel count."""
        params = params or self.parameters()
        params.threshold = value
        segmentation, anomaly = params.reference("Segmentation"), params.reference("AnomalyVolume")
        if segmentation is None or anomaly is None:
            return 0
        _, region = self._results.get(segmentation.GetID(), (None, None))
        return nodes.update_candidates(segmentation, anomaly, value, region)

    def update_table(self, params: Parameters | None = None) -> int:
        """Recompute the candidate regions at the current threshold (slower than the segment, so the
        widget calls it when the slider is released); returns the number of rows."""
        from maxquery.inference import find_lesions

        params = params or self.parameters()
        segmentation, table = params.reference("Segmentation"), params.reference("LesionTable")
        if segmentation is None or table is None or segmentation.GetID() not in self._results:
            return 0
        result, _ = self._results[segmentation.GetID()]
        lesions = find_lesions(result.labels, result.anomaly, result.card, params.threshold)
        nodes.fill_lesion_table(table, lesions)
        return len(lesions)

    def set_opacity(self, value: float, params: Parameters | None = None) -> None:
        params = params or self.parameters()
        params.opacity = value
        nodes.set_overlay_opacity(self.scene, params.opacity)

    def set_show_3d(self, visible: bool, params: Parameters | None = None) -> None:
        params = params or self.parameters()
        params.show_3d = visible
        segmentation = params.reference("Segmentation")
        if segmentation is not None:
            nodes.set_3d_visibility(segmentation, visible)

    def jump_to_row(self, row: int, params: Parameters | None = None) -> tuple[float, float, float]:
        params = params or self.parameters()
        entry = nodes.table_rows(params.reference("LesionTable"))[row]
        ras = (entry["R"], entry["A"], entry["S"])
        nodes.jump_to(self.scene, ras)
        return ras

    # --- export -------------------------------------------------------------------------------
    def export(self, kind: str, path, overwrite: bool = False, params: Parameters | None = None,
               dicom_files=None) -> Path:
        """``kind`` is one of ``seg.nrrd``, ``labelmap``, ``anomaly`` or ``dicom-seg``."""
        params = params or self.parameters()
        segmentation, volume = params.reference("Segmentation"), params.reference("InputVolume")
        if kind == "seg.nrrd":
            return export.export_seg_nrrd(segmentation, path, overwrite)
        if kind == "labelmap":
            return export.export_labelmap(segmentation, volume, path, overwrite)[0]
        if kind == "anomaly":
            return export.export_volume(params.reference("AnomalyVolume"), path, overwrite)
        if kind == "dicom-seg":
            card = self.read_card(self.model_folder(params))
            return export.export_dicom_seg(segmentation, volume, dicom_files, path, overwrite, card.name, card.version)
        raise ValueError(f"unknown export kind {kind!r}")
