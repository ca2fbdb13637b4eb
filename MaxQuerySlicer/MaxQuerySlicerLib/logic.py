"""What the module does, without any GUI: run a model on a volume node and manage its result nodes.

``MaxQueryLogic(scene)`` works in Slicer's Python console, in a script on bare MRML, and behind the
widget. Inference runs in a child process (``ChildRun``); ``finish`` reads its files back and
builds the nodes on the calling thread. What a result keeps in memory (its labels and candidate
region, for the threshold and the table) is dropped as soon as its segmentation leaves the scene.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import export, geometry, nodes
from .outputs import read_case_outputs
from .parameters import Parameters
from .run import ChildRun

MODULE_NAME = "MaxQuerySlicer"
DEMO_MODEL = Path("Resources") / "Models" / "maxquery-liver-demo"
DEMO_CASE = Path("Resources") / "DemoData" / "liverbench_A_0085.nii.gz"
LIB_DIR = Path(__file__).resolve().parent
ANOMALY_REFERENCE = "MaxQuery.anomaly"  # segmentation → its anomaly volume and table, for a re-run
TABLE_REFERENCE = "MaxQuery.table"


def bundled(relative: Path) -> Path | None:
    """A file shipped with the extension: beside the installed scripted modules, or at the top of
    the source tree."""
    for base in (LIB_DIR.parent, LIB_DIR.parent.parent):
        if (base / relative).exists():
            return base / relative
    return None


def bundled_model_folder() -> Path | None:
    """The demo model folder, when it is installed."""
    card = bundled(DEMO_MODEL / "model_card.json")
    return card.parent if card is not None else None


@dataclass
class ResultRecord:
    """What the review needs beyond the nodes: labels (uint8) and the candidate search region."""

    labels: object  # SimpleITK image on the input grid
    region: np.ndarray
    card: object


class MaxQueryLogic:
    """``parameter_node`` returns the module's parameter node (Slicer's ``getParameterNode`` in the
    application; by default the same singleton lookup on ``scene``). Call ``close()`` when done."""

    def __init__(self, scene, parameter_node: Callable | None = None):
        self.scene = scene
        self._parameter_node = parameter_node or self._singleton_parameter_node
        self._records: dict[str, ResultRecord] = {}  # segmentation node ID → record
        self.active_run: ChildRun | None = None
        self._observations = [scene.AddObserver(scene.NodeRemovedEvent, self._on_node_removed),
                              scene.AddObserver(scene.StartCloseEvent, self._on_scene_start_close)]

    def close(self) -> None:
        """Stop observing the scene and cancel a run in flight (module cleanup, reload)."""
        self.cancel()
        for tag in self._observations:
            self.scene.RemoveObserver(tag)
        self._observations = []
        self._records.clear()

    # --- lifetime -----------------------------------------------------------------------------
    def _on_node_removed(self, caller, event) -> None:
        for node_id in [i for i in self._records if self.scene.GetNodeByID(i) is None]:
            del self._records[node_id]

    def _on_scene_start_close(self, caller, event) -> None:
        self.cancel()
        self._records.clear()

    def held_results(self) -> list[str]:
        """IDs of the segmentations whose labels and region are kept in memory."""
        return list(self._records)

    # --- settings -----------------------------------------------------------------------------
    def _singleton_parameter_node(self):
        """Slicer's ``getParameterNode`` on this scene: the singleton survives a scene clear."""
        node = self.scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = self.scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)
            node.SetSingletonTag(MODULE_NAME)
            node.SetName(self.scene.GenerateUniqueName(MODULE_NAME))
            node.SetAttribute("ModuleName", MODULE_NAME)
            node = self.scene.AddNode(node)
        elif node.GetAttribute("ModuleName") != MODULE_NAME:  # cleared with the scene
            node.SetAttribute("ModuleName", MODULE_NAME)
        return node

    def parameters(self) -> Parameters:
        return Parameters(self._parameter_node())

    def model_folder(self, params: Parameters) -> Path:
        if params.model_folder:
            return Path(params.model_folder)
        bundled = bundled_model_folder()
        if bundled is None:
            raise FileNotFoundError("the bundled demo model is not installed; choose a model folder")
        return bundled

    @staticmethod
    def read_card(folder):
        """The model card alone (fast; the child loads the weights)."""
        from maxquery.model_folder import read_model_card

        return read_model_card(folder)

    # --- running ------------------------------------------------------------------------------
    def start(self, volume_node, params: Parameters | None = None, python: str | None = None) -> ChildRun:
        """Write the volume to a temporary file and start the child; the scene is untouched."""
        params = params or self.parameters()
        if volume_node is None:
            raise ValueError("choose a CT volume first")
        if self.active_run is not None:
            raise RuntimeError("a run is already in progress; cancel it first")
        folder = self.model_folder(params)
        self.read_card(folder)  # a wrong folder is reported now, not by the child
        image = geometry.image_from_node(volume_node)
        self.active_run = ChildRun(image, folder, params.device, params.quality == "fast", params.threshold,
                                   python=python).start()
        return self.active_run

    def cancel(self) -> None:
        if self.active_run is not None:
            self.active_run.cancel()
            self.active_run = None

    def finish(self, run: ChildRun, volume_node, params: Parameters | None = None) -> nodes.ResultNodes:
        """Build the result nodes of a finished run, then delete its files. A failed run raises
        ``ChildRunError`` (with the tail of the child's log) and changes nothing in the scene."""
        params = params or self.parameters()
        if self.active_run is run:
            self.active_run = None
        try:
            paths = run.check()
            card = self.read_card(self.model_folder(params))
            result = read_case_outputs(paths, card, run.case_info)
            return self.add_result(result, volume_node, params, params.reference("OutputSegmentation"))
        finally:
            run.cleanup()

    def process(self, volume_node, params: Parameters | None = None, python: str | None = None) -> nodes.ResultNodes:
        """Run and wait (scripts, the self-test)."""
        params = params or self.parameters()
        run = self.start(volume_node, params, python)
        run.wait()
        return self.finish(run, volume_node, params)

    def add_result(self, result, volume_node, params: Parameters, target=None) -> nodes.ResultNodes:
        """Result → nodes, under the input's parent transform. With ``target`` (a segmentation node)
        its segments, and the anomaly volume and table it refers to, are replaced; otherwise new nodes
        are made, and removed again if any step fails."""
        base = f"{volume_node.GetName()} MaxQuery"
        region = nodes.candidate_region(result)
        reused = target is not None
        created = nodes.ResultNodes(target, None, None)
        if reused:
            created.anomaly = target.GetNodeReference(ANOMALY_REFERENCE)
            created.table = target.GetNodeReference(TABLE_REFERENCE)
        try:
            if reused:
                nodes.fill_segmentation(target, result, volume_node, region)
            else:
                created.segmentation = nodes.create_segmentation(self.scene, result, volume_node,
                                                                 f"{base} segmentation", region)
            created.anomaly = nodes.create_anomaly_volume(self.scene, result, f"{base} anomaly", region,
                                                          node=created.anomaly)
            if created.table is None:
                created.table = nodes.create_lesion_table(self.scene, result.lesions, f"{base} candidates")
            else:
                nodes.fill_lesion_table(created.table, result.lesions)
            if not reused:
                created.folder_item = nodes.place_in_study(self.scene, volume_node, created.nodes(), base)
        except Exception:
            if not reused:
                created.remove(self.scene)
            raise
        created.segmentation.SetNodeReferenceID(ANOMALY_REFERENCE, created.anomaly.GetID())
        created.segmentation.SetNodeReferenceID(TABLE_REFERENCE, created.table.GetID())
        for node in (created.segmentation, created.anomaly):
            node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
        self._records[created.segmentation.GetID()] = ResultRecord(result.labels, region, result.card)
        params.threshold = result.anomaly_threshold
        for role, node in (("InputVolume", volume_node), ("Segmentation", created.segmentation),
                           ("AnomalyVolume", created.anomaly), ("LesionTable", created.table)):
            params.set_reference(role, node)
        nodes.show_overlay(self.scene, volume_node, created.anomaly, params.opacity)
        nodes.set_3d_visibility(created.segmentation, params.show_3d)
        return created

    # --- review -------------------------------------------------------------------------------
    def _record(self, params: Parameters):
        segmentation = params.reference("Segmentation")
        return segmentation, (self._records.get(segmentation.GetID()) if segmentation is not None else None)

    def preview_threshold(self, value: float, params: Parameters | None = None) -> None:
        """While the slider moves: show only anomaly ≥ ``value`` in the overlay (cheap; no segment rewrite)."""
        params = params or self.parameters()
        anomaly = params.reference("AnomalyVolume")
        if anomaly is not None:
            nodes.set_overlay_floor(anomaly, value)

    def set_threshold(self, value: float, params: Parameters | None = None) -> int:
        """Apply the threshold: redraw the candidates segment; returns its voxel count."""
        params = params or self.parameters()
        params.threshold = value
        segmentation, record = self._record(params)
        anomaly = params.reference("AnomalyVolume")
        if segmentation is None or anomaly is None:
            return 0
        nodes.set_overlay_floor(anomaly, None)
        return nodes.update_candidates(segmentation, anomaly, value, record.region if record else None)

    def update_table(self, params: Parameters | None = None) -> int:
        """Recompute the candidate regions at the current threshold; returns the number of rows."""
        from maxquery.inference import find_lesions

        params = params or self.parameters()
        (_, record), table = self._record(params), params.reference("LesionTable")
        anomaly = params.reference("AnomalyVolume")
        if record is None or table is None or anomaly is None:
            return 0
        lesions = find_lesions(record.labels, geometry.image_from_node(anomaly), record.card, params.threshold)
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
        ras = nodes.world_ras(params.reference("Segmentation"), (entry["R"], entry["A"], entry["S"]))
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
