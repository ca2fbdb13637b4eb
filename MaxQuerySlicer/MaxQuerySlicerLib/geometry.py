"""Volume node ↔ SimpleITK image, preserving geometry exactly.

Slicer stores a volume as voxels plus an IJK→RAS matrix; SimpleITK (and the core) use origin,
spacing and direction in LPS. The two differ by a flip of the first two physical axes, so every
conversion goes through one matrix here and nowhere else.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def ijk_to_ras_matrix(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def geometry_from_node(node) -> tuple[tuple, tuple, tuple]:
    """(origin, spacing, direction) of a volume node in SimpleITK's LPS convention."""
    ijk_to_ras = ijk_to_ras_matrix(node)
    columns = ijk_to_ras[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    direction_lps = LPS_TO_RAS @ (columns / spacing)
    origin_lps = LPS_TO_RAS @ ijk_to_ras[:3, 3]
    return tuple(origin_lps.tolist()), tuple(spacing.tolist()), tuple(direction_lps.ravel().tolist())


def array_from_node(node) -> np.ndarray:
    """Voxels in (k, j, i) order, the same order as ``sitk.GetArrayFromImage``; a view, not a copy."""
    image = node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise ValueError(f"volume {node.GetName()!r} holds no voxels")
    dims = image.GetDimensions()
    if image.GetNumberOfScalarComponents() != 1:
        raise ValueError(f"volume {node.GetName()!r} has {image.GetNumberOfScalarComponents()} components; a CT has one")
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])


def image_from_node(node) -> sitk.Image:
    """A geometry-preserving copy of a scalar volume node (parent transforms are not applied)."""
    image = sitk.GetImageFromArray(np.array(array_from_node(node)))
    origin, spacing, direction = geometry_from_node(node)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def set_node_geometry(node, image: sitk.Image) -> None:
    """Set a node's IJK→RAS matrix from an image's LPS origin, spacing and direction."""
    direction_ras = LPS_TO_RAS @ np.array(image.GetDirection()).reshape(3, 3)
    columns = direction_ras * np.array(image.GetSpacing())
    matrix = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, float(columns[r, c]))
        matrix.SetElement(r, 3, float((LPS_TO_RAS @ np.array(image.GetOrigin()))[r]))
    node.SetIJKToRASMatrix(matrix)


def update_node_from_image(node, image: sitk.Image) -> None:
    """Replace a volume node's voxels and geometry with those of ``image`` (deep copy)."""
    array = np.ascontiguousarray(sitk.GetArrayFromImage(image))
    vtk_image = vtk.vtkImageData()
    vtk_image.SetDimensions(array.shape[::-1])
    scalars = numpy_support.numpy_to_vtk(array.ravel(), deep=True)
    vtk_image.GetPointData().SetScalars(scalars)
    node.SetAndObserveImageData(vtk_image)
    set_node_geometry(node, image)


def lps_to_ras(point) -> tuple[float, float, float]:
    return tuple((LPS_TO_RAS @ np.asarray(point, dtype=float)).tolist())


def same_grid(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-4) -> bool:
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tolerance)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tolerance)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tolerance))
