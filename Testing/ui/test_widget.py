"""The module's widget under the PySide6 shim, driving the real logic and the real predictor."""

import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

import shim

SCREENSHOTS = Path(__file__).resolve().parents[2] / "Resources" / "Screenshots"


def wait_for(app, condition, timeout=120.0):
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("the run did not reach the expected state in time")
        app.processEvents()
        time.sleep(0.02)


def load_ct(scene, real_data, name):
    from MaxQuerySlicerLib import nodes

    return nodes.add_volume(scene, sitk.ReadImage(str(real_data / "totalsegmentator" / name)), name.split(".")[0])


def scene_node_ids(scene):
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def test_segment_review_and_screenshots(app, scene, widget, real_data):
    from MaxQuerySlicerLib import export, geometry, nodes

    volume = load_ct(scene, real_data, "example_ct_sm.nii.gz")
    widget.ui.inputSelector.setCurrentNode(volume)
    assert widget.params.reference("InputVolume") is volume
    assert widget.ui.modelCardLabel.text().startswith("<b>")
    widget.ui.applyButton.click()
    assert widget.ui.applyButton.text() == "Cancel"
    assert not widget.ui.inputSelector.isEnabled()
    seen_stages = set()
    wait_for(app, lambda: seen_stages.add(widget.ui.statusLabel.text().split("…")[0]) or widget.run is None)
    assert {"preprocessing", "sliding window"} <= seen_stages, seen_stages
    assert widget.ui.applyButton.text() != "Cancel" and widget.ui.inputSelector.isEnabled()
    assert widget.ui.statusLabel.text().startswith("Done"), widget.ui.statusLabel.text()

    segmentation = widget.params.reference("Segmentation")
    anomaly = widget.params.reference("AnomalyVolume")
    card = widget.logic.read_card(widget.logic.model_folder(widget.params))
    names = [segmentation.GetSegmentation().GetNthSegment(i).GetName()
             for i in range(segmentation.GetSegmentation().GetNumberOfSegments())]
    assert names == [c.name for c in card.classes[1:]] + [nodes.CANDIDATE_NAME]
    values = geometry.array_from_node(anomaly)
    assert values.shape == geometry.array_from_node(volume).shape
    assert 0.0 <= values.min() and values.max() <= 1.0
    assert widget.ui.caseScoreLabel.text() == f"{float(anomaly.GetAttribute('MaxQuery.caseScore')):.3f}"
    table_rows = nodes.table_rows(widget.params.reference("LesionTable"))
    assert widget.ui.candidatesTable.rowCount() == len(table_rows)
    composite = scene.GetFirstNodeByClass("vtkMRMLSliceCompositeNode")
    assert composite.GetForegroundVolumeID() == anomaly.GetID()
    assert composite.GetBackgroundVolumeID() == volume.GetID()

    # Threshold slider: the candidates segment follows live, the table once the slider rests.
    widget.ui.thresholdSlider.setValue(0.5)
    low = int(export.segment_mask(segmentation, nodes.CANDIDATE_SEGMENT_ID, volume).sum())
    widget.ui.thresholdSlider.setValue(0.999)
    high = int(export.segment_mask(segmentation, nodes.CANDIDATE_SEGMENT_ID, volume).sum())
    assert low > high and widget.params.threshold == 0.999
    widget.ui.opacitySlider.setValue(0.7)
    assert abs(composite.GetForegroundOpacity() - 0.7) < 1e-6
    widget.ui.thresholdSlider.setValue(0.9)
    wait_for(app, lambda: not widget.tableTimer.isActive(), timeout=5)
    app.processEvents()
    assert widget.ui.candidatesTable.rowCount() == len(nodes.table_rows(widget.params.reference("LesionTable")))

    if widget.ui.candidatesTable.rowCount():
        row = nodes.table_rows(widget.params.reference("LesionTable"))[0]
        widget.ui.candidatesTable.cellClicked.emit(0, 0)
        red = scene.GetFirstNodeByName("Red")
        matrix = red.GetSliceToRAS()
        assert abs(matrix.GetElement(2, 3) - row["S"]) < 1e-3  # the axial view moved to the region

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    assert widget.parent.grab().save(str(SCREENSHOTS / "panel.png"))
    render_slice(scene, volume, segmentation, SCREENSHOTS / "slice_view.png")


def render_slice(scene, volume, segmentation, path):
    """CT + anomaly overlay + segments through slice-core's slice logic (no OpenGL): the segments go
    into the label layer as an exported labelmap with the segment colours."""
    from vtk.util import numpy_support

    from MaxQuerySlicerLib import colors, export, geometry, nodes

    image, values = export.labelmap_image(segmentation, volume, include_candidates=True)
    labelmap = nodes.add_volume(scene, image, "screenshot labels", "vtkMRMLLabelMapVolumeNode")
    seg = segmentation.GetSegmentation()
    rows = [("background", (0, 0, 0, 0))] + [("", (0, 0, 0, 0))] * max(values.values())
    for segment_id, value in values.items():
        rows[value] = (seg.GetSegment(segment_id).GetName(), tuple(seg.GetSegment(segment_id).GetColor()) + (1.0,))
    labelmap.GetDisplayNode().SetAndObserveColorNodeID(colors.create_color_table(scene, "labels", rows).GetID())
    logic = scene.slice_logics[0]
    composite = logic.GetSliceCompositeNode()
    composite.SetLabelVolumeID(labelmap.GetID())
    composite.SetLabelOpacity(0.4)
    volume.GetDisplayNode().SetAndObserveColorNodeID(colors.create_color_table(
        scene, "grey", [(str(i), (i / 255, i / 255, i / 255)) for i in range(256)]).GetID())
    volume.GetDisplayNode().AutoWindowLevelOff()
    volume.GetDisplayNode().SetWindowLevel(400, 50)
    slice_node = logic.GetSliceNode()
    slice_node.SetDimensions(512, 512, 1)
    logic.FitSliceToAll()
    centre = geometry.array_from_node(volume).shape[0] // 2
    logic.SetSliceOffset(nodes.ras_matrix(geometry.image_from_node(volume)).MultiplyPoint((0, 0, centre, 1))[2])
    logic.UpdateImageData()
    port = logic.GetImageDataConnection()
    port.GetProducer().Update()
    rendered = port.GetProducer().GetOutputDataObject(port.GetIndex())
    dims = rendered.GetDimensions()
    rgba = numpy_support.vtk_to_numpy(rendered.GetPointData().GetScalars()).reshape(dims[1], dims[0], -1)
    assert rgba[..., :3].std() > 5, "the slice view rendered blank"
    out = sitk.GetImageFromArray(np.ascontiguousarray(rgba[::-1, :, :3]), isVector=True)
    sitk.WriteImage(out, str(path))


def test_cancel_leaves_scene_unchanged(app, scene, widget, real_data):
    volume = load_ct(scene, real_data, "example_ct.nii.gz")
    widget.ui.inputSelector.setCurrentNode(volume)
    before = scene_node_ids(scene)
    widget.ui.applyButton.click()
    wait_for(app, lambda: widget.run is None or widget.run.progress()[1] == "sliding window")
    assert widget.run is not None, "the run finished before it could be cancelled"
    widget.ui.applyButton.click()  # the button is Cancel now
    wait_for(app, lambda: widget.run is None, timeout=60)
    assert widget.ui.statusLabel.text().startswith("Cancelled")
    assert scene_node_ids(scene) == before
    assert widget.params.reference("Segmentation") is None
    assert widget.ui.applyButton.text() != "Cancel" and widget.ui.inputSelector.isEnabled()
    assert not [m for m in shim.MESSAGES if m[0] == "error"]
