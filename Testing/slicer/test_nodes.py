"""The Qt-free node library against real slicer-core MRML: geometry, result nodes, threshold, exports."""

import numpy as np
import pytest
import SimpleITK as sitk

from MaxQuerySlicerLib import colors, export, geometry, nodes
from MaxQuerySlicerLib.logic import MaxQueryLogic


def oblique(image: sitk.Image) -> sitk.Image:
    """The same voxels with a flipped, rotated direction and a moved origin."""
    rotation = sitk.VersorTransform((0.3, -0.2, 1.0), 0.6).GetMatrix()
    flip = np.diag([-1.0, 1.0, -1.0])
    direction = (np.array(rotation).reshape(3, 3) @ flip).ravel()
    out = sitk.Image(image)
    out.SetDirection(tuple(direction))
    out.SetOrigin((12.5, -40.0, 230.0))
    return out


@pytest.mark.parametrize("make", [lambda i: i, oblique], ids=["axial", "oblique-flipped"])
def test_volume_node_round_trip_keeps_geometry(scene, ct_image, make):
    image = make(ct_image)
    node = nodes.add_volume(scene, image, "ct")
    back = geometry.image_from_node(node)
    assert geometry.same_grid(back, image, 1e-6)
    assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))
    # Slicer's IJK→RAS maps a voxel to the same physical point as SimpleITK, with L and P negated.
    ijk_to_ras = geometry.ijk_to_ras_matrix(node)
    for index in [(0, 0, 0), (121, 3, 29), (17, 100, 5)]:
        ras = ijk_to_ras @ np.array([*index, 1.0])
        lps = image.TransformIndexToPhysicalPoint(index)
        assert np.allclose(ras[:3], [-lps[0], -lps[1], lps[2]], atol=1e-6)


def test_segmentation_node_has_named_coloured_segments_with_card_values(scene, ct_image, result):
    volume = nodes.add_volume(scene, ct_image, "ct")
    seg = nodes.create_segmentation(scene, result, volume, "seg", nodes.candidate_region(result))
    segmentation = seg.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    assert ids == ["class_1", "class_2", "class_3", nodes.CANDIDATE_SEGMENT_ID]
    for info in result.card.classes[1:]:
        segment = segmentation.GetSegment(f"class_{info.value}")
        assert segment.GetName() == info.name
        assert np.allclose(segment.GetColor(), info.color)
        assert nodes.segment_tag(segment, nodes.ROLE_TAG) == info.role
        mask = export.segment_mask(seg, f"class_{info.value}", volume)
        assert np.array_equal(mask, sitk.GetArrayViewFromImage(result.labels) == info.value)
    liver_terms = nodes.segment_tag(segmentation.GetSegment("class_1"), "TerminologyEntry")
    assert "SCT^10200004^Liver" in liver_terms
    expected = (sitk.GetArrayViewFromImage(result.anomaly) >= result.anomaly_threshold) & nodes.candidate_region(result)
    assert np.array_equal(export.segment_mask(seg, nodes.CANDIDATE_SEGMENT_ID, volume), expected)


def test_anomaly_node_uses_inferno_table_and_fixed_window(scene, result):
    node = nodes.create_anomaly_volume(scene, result, "anomaly")
    display = node.GetDisplayNode()
    table = display.GetColorNode()
    assert table.GetName() == colors.ANOMALY_TABLE_NAME and table.GetNumberOfColors() == 256
    rgba = [0.0] * 4
    table.GetColor(255, rgba)
    assert np.allclose(rgba[:3], colors.INFERNO_STOPS[-1], atol=2 / 255) and rgba[3] == 1.0
    table.GetColor(0, rgba)
    assert rgba[3] == 0.0  # the lowest scores are transparent over the CT
    assert not display.GetAutoWindowLevel()
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == nodes.ANOMALY_WINDOW
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == nodes.ANOMALY_WINDOW[0]
    assert float(node.GetAttribute("MaxQuery.caseScore")) == pytest.approx(result.case_score)
    assert nodes.create_anomaly_volume(scene, result, "anomaly").GetName() != node.GetName()  # never replaced
    region = nodes.candidate_region(result)
    assert 0 < region.sum() < region.size
    shown = geometry.array_from_node(nodes.create_anomaly_volume(scene, result, "anomaly", region))
    full = sitk.GetArrayViewFromImage(result.anomaly)
    assert np.array_equal(shown[region], full[region]) and not shown[~region].any()
    assert scene.GetNodesByName(colors.ANOMALY_TABLE_NAME).GetNumberOfItems() == 1


def test_logic_threshold_table_jump_and_study_placement(scene, ct_image, result):
    shnode = scene.GetSubjectHierarchyNode()
    study = shnode.CreateStudyItem(shnode.CreateSubjectItem(shnode.GetSceneItemID(), "patient"), "study")
    volume = nodes.add_volume(scene, ct_image, "ct")
    shnode.CreateItem(study, volume)
    slice_logic = __import__("slicer").vtkMRMLSliceLogic()
    slice_logic.SetMRMLScene(scene)
    red = slice_logic.AddSliceNode("Red")
    logic = MaxQueryLogic(scene)
    params = logic.parameters()
    created = logic.add_result(result, volume, params)
    assert shnode.GetItemParent(shnode.GetItemParent(shnode.GetItemByDataNode(created.anomaly))) == study
    counts = [logic.set_threshold(t, params) for t in (0.2, 0.5, 0.9)]
    anomaly = sitk.GetArrayViewFromImage(result.anomaly)
    region = nodes.candidate_region(result)
    assert counts == [int(((anomaly >= t) & region).sum()) for t in (0.2, 0.5, 0.9)]
    assert counts[0] > counts[1] > counts[2]
    rows = logic.update_table(params)
    assert rows == len(nodes.table_rows(created.table)) > 0
    ras = logic.jump_to_row(0, params)
    assert red.GetSliceToRAS().GetElement(2, 3) == pytest.approx(ras[2])
    assert logic.parameters().node is params.node and params.threshold == 0.9
    created.remove(scene)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


def test_exports_read_back_voxel_for_voxel(scene, ct_image, result, tmp_path):
    import slicerio

    volume = nodes.add_volume(scene, oblique(ct_image), "ct")
    logic = MaxQueryLogic(scene)
    params = logic.parameters()
    resampled = type(result)(**{**result.__dict__, "labels": oblique(result.labels), "anomaly": oblique(result.anomaly)})
    logic.add_result(resampled, volume, params)

    labelmap = logic.export("labelmap", tmp_path / "labels.nii.gz", params=params)
    with open(labelmap, "rb") as f:
        assert f.read(2) == b"\x1f\x8b"  # gzip, i.e. really NIfTI, not NRRD bytes in a .nii.gz
    read = sitk.ReadImage(str(labelmap))
    assert geometry.same_grid(read, resampled.labels, 1e-4)
    assert np.array_equal(sitk.GetArrayViewFromImage(read), sitk.GetArrayViewFromImage(resampled.labels))

    for suffix in (".nrrd", ".nii.gz"):
        path = logic.export("anomaly", tmp_path / f"anomaly{suffix}", params=params)
        read = sitk.ReadImage(str(path))
        assert geometry.same_grid(read, resampled.anomaly, 1e-4)
        shown = np.where(nodes.candidate_region(resampled), sitk.GetArrayViewFromImage(resampled.anomaly), 0)
        assert np.array_equal(sitk.GetArrayViewFromImage(read), shown)  # the map as the node holds it

    seg_path = logic.export("seg.nrrd", tmp_path / "result.seg.nrrd", params=params)
    segmentation = slicerio.read_segmentation(str(seg_path))
    names = [s["name"] for s in segmentation["segments"]]
    assert names == [c.name for c in result.card.classes[1:]] + [nodes.CANDIDATE_NAME]
    liver = slicerio.extract_segments(segmentation, [("liver", 1)])
    voxels = liver["voxels"]
    assert voxels.sum() == (sitk.GetArrayViewFromImage(result.labels) == 1).sum()

    with pytest.raises(export.ExistingFileError):
        logic.export("labelmap", labelmap, params=params)
    assert logic.export("labelmap", labelmap, overwrite=True, params=params) == labelmap


def test_dicom_seg_export_matches_source_slices(scene, real_data, card, tmp_path):
    import highdicom as hd
    import pydicom

    from maxquery.inference.result import SegmentationResult

    folder = real_data / "totalsegmentator" / "example_ct_dicom"
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(folder))
    reader.SetFileNames(files)
    ct = reader.Execute()
    volume = nodes.add_volume(scene, ct, "dicom ct")
    array = sitk.GetArrayFromImage(ct)
    labels = np.zeros(array.shape, np.uint8)
    labels[(array > 40) & (array < 80)] = 1
    labels[5:8, 200:260, 200:260] = 2
    images = []
    for a in (labels, np.clip((array + 1000) / 2000.0, 0, 1).astype(np.float32)):
        image = sitk.GetImageFromArray(a)
        image.CopyInformation(ct)
        images.append(image)
    result = SegmentationResult(images[0], images[1], {}, 0.1, [], card, 0.52)
    seg_node = nodes.create_segmentation(scene, result, volume, "seg", nodes.candidate_region(result))
    path = export.export_dicom_seg(seg_node, volume, files, tmp_path / "seg.dcm", model_name="test", model_version="1")
    seg = hd.seg.segread(str(path))
    assert seg.number_of_segments == 4
    assert [d.SegmentLabel for d in seg.SegmentSequence][:2] == ["liver", "hepatocellular carcinoma"]
    slice_of = {}
    for f in files:
        dataset = export._with_sop_uids(pydicom.dcmread(f))
        position = [float(v) for v in dataset.ImagePositionPatient]
        slice_of[dataset.SOPInstanceUID] = ct.TransformPhysicalPointToIndex(position)[2]
    expected = {n + 1: labels == n + 1 for n in range(3)}
    expected[4] = export.segment_mask(seg_node, nodes.CANDIDATE_SEGMENT_ID, volume)
    assert (expected[4] & expected[1]).any()  # overlapping segments must both survive
    checked = 0
    for frame, item in zip(seg.pixel_array, seg.PerFrameFunctionalGroupsSequence):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert np.array_equal(frame.astype(bool), expected[number][slice_of[uid]])
        checked += 1
    assert checked > 0
