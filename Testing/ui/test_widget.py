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
    status = widget.ui.statusLabel.text()  # the run's notes (e.g. the postprocessing's) come first
    assert "Done in" in status and "Failed" not in status, status

    segmentation = widget.params.reference("Segmentation")
    anomaly = widget.params.reference("AnomalyVolume")
    card = widget.logic.core.read_card(widget.logic.core.model_folder(widget.params))
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

    assert "Started:" in widget.ui.logTextEdit.toPlainText()  # the log box shows the child's command
    # Threshold: a typed or released value redraws the candidates segment, then the table.
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


def test_cancel_kills_the_child_and_removes_its_files(app, scene, widget, real_data):
    volume = load_ct(scene, real_data, "example_ct.nii.gz")
    widget.ui.inputSelector.setCurrentNode(volume)
    before = scene_node_ids(scene)
    widget.ui.applyButton.click()
    run = widget.run
    wait_for(app, lambda: widget.run is None or widget.run.progress()[1] == "sliding window")
    assert widget.run is not None, "the run finished before it could be cancelled"
    assert run.work_dir.is_dir() and run._process.poll() is None
    widget.ui.applyButton.click()  # the button is Cancel now
    assert widget.run is None and run._process.poll() is not None  # killed at once, not at the next poll
    assert not run.work_dir.exists()
    assert widget.ui.statusLabel.text().startswith("Cancelled")
    assert scene_node_ids(scene) == before
    assert widget.params.reference("Segmentation") is None
    assert widget.ui.applyButton.text() != "Cancel" and widget.ui.inputSelector.isEnabled()
    assert not [m for m in shim.MESSAGES if m[0] == "error"]


def test_a_failing_child_reports_its_log_and_leaves_the_scene(app, scene, widget, real_data, tmp_path):
    volume = load_ct(scene, real_data, "example_ct_sm.nii.gz")
    widget.ui.inputSelector.setCurrentNode(volume)
    broken = tmp_path / "broken-model"
    broken.mkdir()
    source = widget.logic.core.model_folder(widget.params)
    (broken / "model_card.json").write_bytes((source / "model_card.json").read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")  # the card reads fine; loading fails
    widget.params.model_folder = str(broken)
    before = scene_node_ids(scene)
    widget.ui.applyButton.click()
    run = widget.run
    wait_for(app, lambda: widget.run is None)
    assert scene_node_ids(scene) == before
    errors = [text for kind, text in shim.MESSAGES if kind == "error"]
    assert len(errors) == 1 and "exit status 2" in errors[0] and "model.safetensors" in errors[0], errors
    assert widget.ui.statusLabel.text().startswith("<span") and "Failed" in widget.ui.statusLabel.text()
    assert "model.safetensors" in widget.ui.logTextEdit.toPlainText()
    assert not run.work_dir.exists()


def test_input_selector_offers_only_plain_ct_volumes(app, scene, widget, real_data):
    selector = widget.ui.inputSelector
    # Slicer's defaults would list labelmaps and offer "Create new"/"Delete" on the input
    assert (selector.showChildNodeTypes, selector.addEnabled, selector.removeEnabled) == (False, False, False)
    volume = load_ct(scene, real_data, "example_ct_sm.nii.gz")
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    assert volume in selector.nodes() and labelmap not in selector.nodes()
    output = widget.ui.outputSelector
    assert output.noneEnabled and not output.addEnabled and not output.removeEnabled
    assert output.currentNode() is None and output.currentText() == "Create new segmentation"


def test_threshold_drag_previews_and_applies_once_on_release(app, scene, widget, real_data, monkeypatch):
    from MaxQuerySlicerLib import nodes

    volume = load_ct(scene, real_data, "example_ct_sm.nii.gz")
    widget.ui.inputSelector.setCurrentNode(volume)
    widget.ui.applyButton.click()
    wait_for(app, lambda: widget.run is None)
    anomaly = widget.params.reference("AnomalyVolume")
    assert anomaly not in widget.ui.inputSelector.nodes()  # the module's own maps are not offered as input
    writes = []
    real_write = nodes.set_segment_mask
    monkeypatch.setattr(nodes, "set_segment_mask", lambda *a: writes.append(a[1]) or real_write(*a))
    floors = []
    widget.ui.thresholdSlider.valueIsChanging.connect(
        lambda _v: floors.append(anomaly.GetDisplayNode().GetLowerThreshold()))
    widget.ui.thresholdSlider.drag([0.6 + 0.01 * i for i in range(30)])
    assert writes == [nodes.CANDIDATE_SEGMENT_ID]  # one rewrite of the full-volume labelmap, on release
    assert len(floors) >= 20 and floors[-1] > floors[0]  # the overlay followed the drag
    assert abs(widget.params.threshold - 0.89) < 2e-3
    assert anomaly.GetDisplayNode().GetLowerThreshold() == nodes.ANOMALY_WINDOW[0]  # back to the full map


def test_rerun_into_the_chosen_segmentation_under_the_input_transform(app, scene, widget, real_data):
    import vtk

    from MaxQuerySlicerLib import nodes

    volume = load_ct(scene, real_data, "example_ct_sm.nii.gz")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 25.0)
    transform.SetMatrixTransformToParent(matrix)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    widget.ui.inputSelector.setCurrentNode(volume)
    widget.ui.applyButton.click()
    wait_for(app, lambda: widget.run is None)
    first = widget.params.reference("Segmentation")
    anomaly = widget.params.reference("AnomalyVolume")
    for node in (first, anomaly):
        assert node.GetTransformNodeID() == transform.GetID()  # results sit where the CT is shown
    count = scene.GetNumberOfNodes()

    widget.ui.outputSelector.setCurrentNode(first)
    assert widget.params.reference("OutputSegmentation") is first
    widget.params.quality = "fast"
    widget.ui.applyButton.click()
    wait_for(app, lambda: widget.run is None)
    assert widget.ui.statusLabel.text().startswith("Done") or "Done" in widget.ui.statusLabel.text()
    assert widget.params.reference("Segmentation") is first and widget.params.reference("AnomalyVolume") is anomaly
    assert scene.GetNumberOfNodes() == count  # replaced in place, nothing new
    names = [first.GetSegmentation().GetNthSegment(i).GetName()
             for i in range(first.GetSegmentation().GetNumberOfSegments())]
    assert names[-1] == nodes.CANDIDATE_NAME and len(names) == len(set(names))
    if widget.ui.candidatesTable.rowCount():
        row = nodes.table_rows(widget.params.reference("LesionTable"))[0]
        widget.ui.candidatesTable.cellClicked.emit(0, 0)
        red = scene.GetFirstNodeByName("Red")
        assert abs(red.GetSliceToRAS().GetElement(0, 3) - (row["R"] + 25.0)) < 1e-3  # jumped in world space


def test_a_foreign_segmentation_is_replaced_only_when_the_user_agrees(app, scene, widget, real_data):
    volume = load_ct(scene, real_data, "example_ct_sm.nii.gz")
    mine = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my manual work")
    mine.GetSegmentation().AddEmptySegment("tumour", "my tumour")
    widget.ui.inputSelector.setCurrentNode(volume)
    widget.ui.outputSelector.setCurrentNode(mine)
    shim.ANSWERS["confirm"] = False
    try:
        widget.ui.applyButton.click()
    finally:
        shim.ANSWERS["confirm"] = True
    assert widget.run is None and mine.GetSegmentation().GetNumberOfSegments() == 1
    assert any("did not make" in text for kind, text in shim.MESSAGES if kind == "confirm")


def test_model_folder_and_device_are_remembered(app, scene, widget, model_folder):
    import MaxQuerySlicer

    devices = [widget.ui.deviceComboBox.itemText(i) for i in range(widget.ui.deviceComboBox.count())]
    assert devices[:2] == ["auto", "cpu"]
    for text, device in (("", "auto"), (str(model_folder), "cpu")):  # the user's choices, as typed and picked
        widget.ui.modelPathLineEdit.setText(text)
        widget.ui.deviceComboBox.setCurrentIndex(devices.index(device))
    scene.Clear(0)  # a new scene: the parameter node starts empty, the settings remain
    fresh = MaxQuerySlicer.MaxQuerySlicerWidget(shim.QtWidgets.QWidget())
    fresh.setup()
    try:
        assert fresh.params.model_folder == str(model_folder) and fresh.params.device == "cpu"
        assert fresh.ui.deviceComboBox.currentText() == "cpu"
    finally:
        fresh.cleanup()
