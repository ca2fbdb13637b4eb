"""Write what the scene shows: .seg.nrrd, NIfTI labelmap, anomaly volume, DICOM SEG.

Every writer refuses to replace an existing file unless ``overwrite=True`` (the widget asks the
user first). Labelmaps and volumes are written with SimpleITK from the node's voxels and geometry:
a segmentation storage node would write NRRD bytes even into a ``.nii.gz`` name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import geometry
from .nodes import CANDIDATE_SEGMENT_ID, ROLE_TAG, VALUE_TAG, segment_tag


class ExistingFileError(FileExistsError):
    """The target exists and the caller did not allow replacing it."""


def _target(path, overwrite: bool) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise ExistingFileError(f"{path} already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def segment_ids(segmentation_node, include_candidates: bool = True) -> list[str]:
    segmentation = segmentation_node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    return [i for i in ids if include_candidates or i != CANDIDATE_SEGMENT_ID]


def label_values(segmentation_node, ids: list[str]) -> dict[str, int]:
    """Each segment's value in an exported labelmap: the card's value, then the next free ones."""
    segmentation = segmentation_node.GetSegmentation()
    values = {}
    for segment_id in ids:
        tag = segment_tag(segmentation.GetSegment(segment_id), VALUE_TAG)
        if tag:
            values[segment_id] = int(tag)
    next_value = max(values.values(), default=0) + 1
    for segment_id in ids:
        if segment_id not in values:
            values[segment_id] = next_value
            next_value += 1
    return values


def labelmap_image(segmentation_node, reference_node, include_candidates: bool = False) -> tuple[sitk.Image, dict]:
    """The segments as one label image on the reference volume's grid, and segment id → value.

    Later segments win where segments overlap, so the candidates (added last) mark their voxels
    when included.
    """
    ids = segment_ids(segmentation_node, include_candidates)
    values = label_values(segmentation_node, ids)
    reference = geometry.image_from_node(reference_node)
    labels = np.zeros(sitk.GetArrayViewFromImage(reference).shape, dtype=np.uint8)
    for segment_id in ids:
        labels[segment_mask(segmentation_node, segment_id, reference_node)] = values[segment_id]
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(reference)
    return image, values


def segment_mask(segmentation_node, segment_id: str, reference_node) -> np.ndarray:
    """A segment's voxels on the reference volume's grid, (k, j, i) boolean."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    shape = geometry.array_from_node(reference_node).shape
    labelmap = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, labelmap)
    if labelmap.GetPointData().GetScalars() is None or labelmap.IsEmpty():
        return np.zeros(shape, dtype=bool)
    reference = slicer.vtkOrientedImageData()
    reference.SetDimensions(shape[::-1])
    matrix = vtk.vtkMatrix4x4()
    reference_node.GetIJKToRASMatrix(matrix)
    reference.SetImageToWorldMatrix(matrix)
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            labelmap, reference, resampled, False, True):
        raise RuntimeError(f"segment {segment_id!r} could not be resampled onto {reference_node.GetName()}")
    dims = resampled.GetDimensions()
    array = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(dims[::-1])
    if array.shape != shape:
        raise RuntimeError(f"segment {segment_id!r} resampled to {array.shape}, expected {shape}")
    return array > 0


def export_seg_nrrd(segmentation_node, path, overwrite: bool = False) -> Path:
    """Slicer's own segmentation file (names, colours, terminology kept)."""
    import slicer

    path = _target(path, overwrite)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    if not storage.WriteData(segmentation_node):
        raise OSError(f"could not write {path}")
    return path


def export_labelmap(segmentation_node, reference_node, path, overwrite: bool = False,
                    include_candidates: bool = False) -> tuple[Path, dict]:
    """A labelmap (NIfTI or NRRD by suffix) with the card's label values; returns the value map."""
    path = _target(path, overwrite)
    image, values = labelmap_image(segmentation_node, reference_node, include_candidates)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path, values


def export_volume(volume_node, path, overwrite: bool = False) -> Path:
    """A scalar volume (the anomaly map) as NRRD or NIfTI, geometry preserved."""
    path = _target(path, overwrite)
    sitk.WriteImage(geometry.image_from_node(volume_node), str(path), useCompression=True)
    return path


def dicom_instance_uids(volume_node) -> list[str]:
    """The SOP instance UIDs Slicer's DICOM loader records on a volume it loaded from DICOM."""
    return (volume_node.GetAttribute("DICOM.instanceUIDs") or "").split()


def export_dicom_seg(segmentation_node, reference_node, source_files, path, overwrite: bool = False,
                     model_name: str = "MaxQuery", model_version: str = "0") -> Path:
    """DICOM SEG (highdicom) referencing the source CT series the reference volume was loaded from.

    Frames are matched to source instances by slice position, so the stacking order of the
    volume does not matter; the volume must not have been resampled after loading.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    from . import terminology

    path = _target(path, overwrite)
    datasets = [_with_sop_uids(pydicom.dcmread(str(f))) for f in source_files]
    if not datasets:
        raise ValueError("no source DICOM files: DICOM SEG needs the CT series the volume came from")
    reference = geometry.image_from_node(reference_node)
    ids = segment_ids(segmentation_node)
    masks = np.zeros(sitk.GetArrayViewFromImage(reference).shape + (len(ids),), dtype=bool)
    descriptions = []
    segmentation = segmentation_node.GetSegmentation()
    algorithm = hd.AlgorithmIdentificationSequence(name=model_name, version=model_version,
                                                   family=codes.cid7162.ArtificialIntelligence)
    for number, segment_id in enumerate(ids, start=1):
        segment = segmentation.GetSegment(segment_id)
        masks[..., number - 1] = segment_mask(segmentation_node, segment_id, reference_node)  # overlaps kept
        codes_ = terminology.codes_for(segment_tag(segment, ROLE_TAG) or "organ", _codes_from_segment(segment))
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=segment.GetName(),
            segmented_property_category=hd.sr.CodedConcept(codes_["category"][1], codes_["category"][0],
                                                           codes_["category"][2]),
            segmented_property_type=hd.sr.CodedConcept(codes_["type"][1], codes_["type"][0], codes_["type"][2]),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm))
    frames = _frames_in_source_order(masks, reference, datasets)
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=900,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="MaxQuery for 3D Slicer",
        manufacturer_model_name=model_name, software_versions=model_version, device_serial_number="0",
        series_description=f"{model_name} segmentation")
    seg.save_as(str(path))
    return path


def _with_sop_uids(dataset):
    """Some de-identified files keep the SOP class/instance UIDs only in the file meta; SEG needs them."""
    meta = getattr(dataset, "file_meta", None)
    for name, meta_name in (("SOPClassUID", "MediaStorageSOPClassUID"), ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
        if not dataset.get(name) and meta is not None and meta.get(meta_name):
            setattr(dataset, name, meta.get(meta_name))
    return dataset


def _codes_from_segment(segment) -> dict:
    """The category/type codes back out of a segment's serialised terminology entry."""
    import slicer

    entry = slicer.vtkSlicerTerminologyEntry()
    text = segment_tag(segment, slicer.vtkSegment.GetTerminologyEntryTagName())
    if not text or not slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(text, entry):
        return {}
    result = {}
    for key, concept in (("category", entry.GetCategoryObject()), ("type", entry.GetTypeObject())):
        if concept.GetCodeValue():
            result[key] = (concept.GetCodingSchemeDesignator(), concept.GetCodeValue(), concept.GetCodeMeaning())
    return result


def _frames_in_source_order(labels: np.ndarray, reference: sitk.Image, datasets) -> np.ndarray:
    """Reorder the (k, j, i, segment) masks to one frame per source dataset, matched by slice position."""
    positions = np.array([reference.TransformIndexToPhysicalPoint((0, 0, k)) for k in range(labels.shape[0])])
    frames = []
    for dataset in datasets:
        if (int(dataset.Rows), int(dataset.Columns)) != labels.shape[1:3]:
            raise ValueError("the source DICOM images and the volume have different in-plane sizes")
        distance = np.linalg.norm(positions - np.array(dataset.ImagePositionPatient, dtype=float), axis=1)
        k = int(np.argmin(distance))
        if distance[k] > 1e-2 * max(reference.GetSpacing()) + 1e-3:
            raise ValueError("a source DICOM slice has no matching slice in the volume (was it resampled?)")
        frames.append(labels[k])
    return np.stack(frames)
