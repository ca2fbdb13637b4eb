"""Turn a ``SegmentationResult`` into MRML nodes, and update those nodes as the user reviews them.

Nodes are only ever created from a finished result on the main thread, so a cancelled or failed
run cannot leave anything half-built in the scene.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import vtk

from . import geometry, terminology
from .colors import CANDIDATE_COLOR, anomaly_color_table

CANDIDATE_SEGMENT_ID = "maxquery_unseen_candidates"
CANDIDATE_NAME = "Unseen lesion candidates"
ROLE_TAG = "MaxQuery.role"
VALUE_TAG = "MaxQuery.labelValue"
ANOMALY_WINDOW = (0.5, 1.0)  # calibrated units: the median inlier voxel and above get a colour
TABLE_COLUMNS = ("Region", "Source", "Type", "Volume (ml)", "Mean score", "Peak score", "R", "A", "S")


@dataclass
class ResultNodes:
    """The nodes one run created; ``remove`` takes them all out again."""

    segmentation: object
    anomaly: object
    table: object
    folder_item: int = 0

    def nodes(self) -> list:
        return [n for n in (self.segmentation, self.anomaly, self.table) if n is not None]

    def remove(self, scene) -> None:
        for node in self.nodes():
            if scene.IsNodePresent(node):
                scene.RemoveNode(node)
        shnode = scene.GetSubjectHierarchyNode()
        if self.folder_item and shnode.GetItemDataNode(self.folder_item) is None:
            shnode.RemoveItem(self.folder_item)


def segment_tag(segment, key: str) -> str:
    """A segment tag's value, "" when the segment has no such tag."""
    value = vtk.reference("")
    return str(value) if segment.GetTag(key, value) else ""


def ensure_converters() -> None:
    """Register the labelmap ↔ surface rules; Slicer's Segmentations module does this at startup,
    bare MRML (slicer-core, a script) does not, and segments cannot be created without them."""
    import slicer

    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if not factory.GetConverterRules():
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
        factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


def add_volume(scene, image: sitk.Image, name: str, class_name: str = "vtkMRMLScalarVolumeNode"):
    """A new volume node holding a copy of ``image``, named uniquely in the scene."""
    node = scene.AddNewNodeByClass(class_name, scene.GenerateUniqueName(name))
    geometry.update_node_from_image(node, image)
    node.CreateDefaultDisplayNodes()
    return node


def ras_matrix(image: sitk.Image) -> vtk.vtkMatrix4x4:
    """The IJK→RAS matrix that ``image``'s LPS geometry corresponds to."""
    holder = vtk.vtkMatrix4x4()
    direction = geometry.LPS_TO_RAS @ np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    origin = geometry.LPS_TO_RAS @ np.array(image.GetOrigin())
    for r in range(3):
        for c in range(3):
            holder.SetElement(r, c, float(direction[r, c]))
        holder.SetElement(r, 3, float(origin[r]))
    return holder


def oriented_mask(mask: np.ndarray, ijk_to_ras: vtk.vtkMatrix4x4):
    """A binary (k, j, i) mask as Slicer's vtkOrientedImageData on the given voxel grid."""
    import slicer
    from vtk.util import numpy_support

    data = slicer.vtkOrientedImageData()
    data.SetDimensions(mask.shape[::-1])
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(mask, dtype=np.uint8).ravel(), deep=True)
    data.GetPointData().SetScalars(scalars)
    data.SetImageToWorldMatrix(ijk_to_ras)
    return data


def set_segment_mask(segmentation_node, segment_id: str, mask: np.ndarray, ijk_to_ras) -> None:
    import slicer

    labelmap = oriented_mask(mask, ijk_to_ras)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.SetBinaryLabelmapToSegment(labelmap, segmentation_node, segment_id, logic.MODE_REPLACE,
                                            labelmap.GetExtent()):
        raise RuntimeError(f"could not write the voxels of segment {segment_id!r}")


def add_segment(segmentation_node, segment_id: str, name: str, color, role: str, codes: dict,
                mask: np.ndarray, ijk_to_ras, value: int | None = None) -> str:
    import slicer

    segmentation = segmentation_node.GetSegmentation()
    segmentation.AddEmptySegment(segment_id, name, list(color))
    segment = segmentation.GetSegment(segment_id)
    segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), terminology.serialize(codes))
    segment.SetTag(ROLE_TAG, role)
    if value is not None:
        segment.SetTag(VALUE_TAG, str(value))
    set_segment_mask(segmentation_node, segment_id, mask, ijk_to_ras)
    return segment_id


def candidate_region(result) -> np.ndarray:
    """Where candidates may lie: the core's lesion search region (predicted foreground plus margin)."""
    from maxquery.inference.lesions import search_region

    labels = sitk.GetArrayViewFromImage(result.labels)
    return search_region(labels, tuple(reversed(result.labels.GetSpacing())))


def create_segmentation(scene, result, reference_node, name: str, region: np.ndarray):
    """A new segmentation node filled by ``fill_segmentation``."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(name))
    node.CreateDefaultDisplayNodes()
    fill_segmentation(node, result, reference_node, region)
    return node


def fill_segmentation(node, result, reference_node, region: np.ndarray) -> None:
    """Replace the node's segments: one named, coloured segment per non-background class of the card,
    plus the candidates segment inside ``region`` (``candidate_region(result)``, computed once by the
    caller)."""
    ensure_converters()
    node.GetSegmentation().RemoveAllSegments()
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
    matrix = ras_matrix(result.labels)
    labels = sitk.GetArrayViewFromImage(result.labels)
    for info in result.card.classes:
        if info.role == "background":
            continue
        add_segment(node, f"class_{info.value}", info.name, info.color, info.role,
                    terminology.codes_for(info.role, info.terminology), labels == info.value, matrix, info.value)
    anomaly = sitk.GetArrayViewFromImage(result.anomaly)
    add_segment(node, CANDIDATE_SEGMENT_ID, CANDIDATE_NAME, CANDIDATE_COLOR, "candidate",
                terminology.codes_for("candidate", None),
                (anomaly >= result.anomaly_threshold) & region, matrix)
    node.SetAttribute("MaxQuery.threshold", repr(float(result.anomaly_threshold)))


def update_candidates(segmentation_node, anomaly_node, threshold: float, region: np.ndarray | None = None) -> int:
    """Redraw the candidates segment as calibrated anomaly ≥ ``threshold`` (inside ``region`` when
    given); returns the voxel count."""
    mask = geometry.array_from_node(anomaly_node) >= threshold
    if region is not None:
        mask &= region
    matrix = vtk.vtkMatrix4x4()
    anomaly_node.GetIJKToRASMatrix(matrix)
    set_segment_mask(segmentation_node, CANDIDATE_SEGMENT_ID, mask, matrix)
    segmentation_node.SetAttribute("MaxQuery.threshold", repr(float(threshold)))
    return int(mask.sum())


def create_anomaly_volume(scene, result, name: str, region: np.ndarray | None = None, node=None):
    """The calibrated anomaly map as a scalar volume with the inferno table and a fixed window
    (into ``node`` when given, e.g. on a re-run).

    With ``region`` (``candidate_region``) the map is kept only there and is 0 elsewhere: the
    calibration describes voxels in and around the organ, and over bone, air or bowel a high score
    would only distract the reader. The raw maps of the command line keep every voxel.
    """
    anomaly = sitk.Cast(result.anomaly, sitk.sitkFloat32)
    if region is not None:
        masked = sitk.GetImageFromArray(np.where(region, sitk.GetArrayViewFromImage(anomaly), 0.0).astype(np.float32))
        masked.CopyInformation(anomaly)
        anomaly = masked
    if node is None:
        node = add_volume(scene, anomaly, name)
    else:
        geometry.update_node_from_image(node, anomaly)
        if node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(anomaly_color_table(scene).GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(*ANOMALY_WINDOW)
    # Below the window the overlay is transparent, so the CT shows through where nothing stands out.
    set_overlay_floor(node, None)
    display.SetUpperThreshold(1.0)
    display.ApplyThresholdOn()
    display.SetInterpolate(False)
    node.SetAttribute(ROLE_TAG, "anomaly")
    node.SetAttribute("MaxQuery.caseScore", repr(float(result.case_score)))
    node.SetAttribute("MaxQuery.region", "organ and tumour + margin" if region is not None else "whole volume")
    node.SetAttribute("MaxQuery.model", f"{result.card.name} {result.card.version}")
    return node


def set_overlay_floor(anomaly_node, value: float | None) -> None:
    """Hide anomaly below ``value`` in the overlay (a cheap preview of a threshold being dragged);
    ``None`` goes back to the window's lower end."""
    display = anomaly_node.GetDisplayNode()
    display.SetLowerThreshold(ANOMALY_WINDOW[0] if value is None else max(float(value), ANOMALY_WINDOW[0]))


def is_anomaly_volume(node) -> bool:
    return node is not None and node.GetAttribute(ROLE_TAG) == "anomaly"


def create_lesion_table(scene, lesions, name: str):
    """One row per candidate region; the centre is stored in RAS so a click can jump the views."""
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
    fill_lesion_table(table, lesions)
    table.SetLocked(True)
    return table


def fill_lesion_table(table, lesions) -> None:
    """Replace the table's rows with ``lesions``."""
    table.RemoveAllColumns()
    columns = {}
    for title in TABLE_COLUMNS:
        array = vtk.vtkStringArray() if title in ("Source", "Type") else vtk.vtkDoubleArray()
        array.SetName(title)
        columns[title] = array
    for lesion in lesions:
        r, a, s = geometry.lps_to_ras(lesion.center_lps)
        values = (lesion.index, lesion.source, lesion.predicted_type, lesion.volume_ml,
                  lesion.mean_anomaly, lesion.peak_anomaly, r, a, s)
        for title, value in zip(TABLE_COLUMNS, values):
            array = columns[title]
            array.InsertNextValue(value if isinstance(array, vtk.vtkStringArray) else float(value))
    for array in columns.values():
        table.AddColumn(array)


def table_rows(table) -> list[dict]:
    """The table node's rows as dictionaries (what the widget lists and what a click jumps to)."""
    data = table.GetTable()
    rows = []
    for row in range(data.GetNumberOfRows()):
        rows.append({data.GetColumnName(c): data.GetValue(row, c).ToString() if data.GetColumn(c).IsA(
            "vtkStringArray") else data.GetValue(row, c).ToDouble() for c in range(data.GetNumberOfColumns())})
    return rows


def place_in_study(scene, reference_node, nodes, folder_name: str) -> int:
    """Put ``nodes`` in a folder next to the input volume (under its study when it has one)."""
    shnode = scene.GetSubjectHierarchyNode()
    reference_item = shnode.GetItemByDataNode(reference_node)
    parent = shnode.GetItemParent(reference_item) if reference_item else shnode.GetSceneItemID()
    folder = shnode.CreateFolderItem(parent, folder_name)
    for node in nodes:
        item = shnode.GetItemByDataNode(node)
        if item:
            shnode.SetItemParent(item, folder)
        else:
            shnode.CreateItem(folder, node)
    return folder


def slice_composite_nodes(scene) -> list:
    return [scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))]


def show_overlay(scene, background_node, foreground_node, opacity: float) -> None:
    """CT in the background and the anomaly map in the foreground of every slice view."""
    for composite in slice_composite_nodes(scene):
        composite.SetBackgroundVolumeID(background_node.GetID() if background_node else None)
        composite.SetForegroundVolumeID(foreground_node.GetID() if foreground_node else None)
        composite.SetForegroundOpacity(float(opacity))


def set_overlay_opacity(scene, opacity: float) -> None:
    for composite in slice_composite_nodes(scene):
        composite.SetForegroundOpacity(float(opacity))


def world_ras(node, ras) -> tuple[float, float, float]:
    """A point in ``node``'s local RAS (as stored in the table) in world RAS, through its parent transform."""
    transform_node = node.GetParentTransformNode() if node is not None else None
    if transform_node is None:
        return tuple(float(v) for v in ras)
    transform = vtk.vtkGeneralTransform()
    transform_node.GetTransformToWorld(transform)
    return tuple(transform.TransformPoint([float(v) for v in ras]))


def jump_to(scene, ras) -> None:
    """Centre every slice view on a RAS point (what a click on a table row does)."""
    import slicer

    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, *map(float, ras), slicer.vtkMRMLSliceNode.CenteredJumpSlice)


def set_3d_visibility(segmentation_node, visible: bool) -> None:
    """Show the segments as surfaces in 3D views (the surfaces are built the first time)."""
    if visible:
        segmentation_node.CreateClosedSurfaceRepresentation()
    segmentation_node.GetDisplayNode().SetVisibility3D(bool(visible))
