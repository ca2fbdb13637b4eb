"""Back from the model grid to the input grid, touching only the voxels that can change.

Labels come from the class probabilities resampled linearly and then argmax (as nnU-Net does), not
from the argmax resampled nearest-neighbour, which gives staircases of model-voxel size on fine
inputs. The classes are streamed one at a time, so only the running maximum and its index live at
input resolution, and only inside the box that can hold a foreground label: a linearly
interpolated probability vector is a convex combination of its (up to 8) model-grid neighbours,
so where all of them have the same argmax the interpolated one has it too. Outside the box
spanned by the foreground (grown by one model voxel) every input voxel is therefore background.
The same box logic places the anomaly map, which is zero outside its region.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Iterator, Sequence

import numpy as np
import SimpleITK as sitk

Box = tuple[slice, slice, slice]  # (z, y, x) slices of the input grid


def model_image(array: np.ndarray, grid: sitk.Image) -> sitk.Image:
    """A (z, y, x) array on the model grid as an image with that grid's geometry."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.CopyInformation(grid)
    return image


def _extended(image: sitk.Image) -> sitk.Image:
    """The image grown by one edge-valued voxel per side, so that input voxels beyond the last
    model voxel centre (up to half a model voxel) get a value instead of the default."""
    return sitk.ZeroFluxNeumannPad(image, [1, 1, 1], [1, 1, 1])


def input_box(mask: np.ndarray, grid: sitk.Image, reference: sitk.Image) -> Box | None:
    """The input-grid box whose linear interpolation can read a model voxel inside ``mask``.

    None when ``mask`` is empty. The model-grid bounding box is grown by one voxel (the
    interpolation's reach) and its corners are mapped through physical space, so any relative
    orientation of the two grids is handled.
    """
    if not mask.any():
        return None
    nonzero = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    low_zyx = [float(n[0]) - 1.0 for n in nonzero]
    high_zyx = [float(n[-1]) + 1.0 for n in nonzero]
    corners = []
    for corner_zyx in itertools.product(*zip(low_zyx, high_zyx)):
        point = grid.TransformContinuousIndexToPhysicalPoint([float(c) for c in reversed(corner_zyx)])
        corners.append(reference.TransformPhysicalPointToContinuousIndex(point))
    corners = np.asarray(corners)  # (8, 3) in x, y, z order
    size_xyz = np.asarray(reference.GetSize())
    start = np.clip(np.floor(corners.min(axis=0)).astype(int), 0, size_xyz)
    stop = np.clip(np.ceil(corners.max(axis=0)).astype(int) + 1, 0, size_xyz)
    if np.any(stop <= start):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(reversed(start), reversed(stop)))


def _resample_into_box(image: sitk.Image, reference: sitk.Image, box: Box, interpolator) -> np.ndarray:
    """``image`` resampled onto the ``box`` part of ``reference``'s grid, as a (z, y, x) array."""
    start_xyz = [b.start for b in reversed(box)]
    size_xyz = [b.stop - b.start for b in reversed(box)]
    origin = reference.TransformIndexToPhysicalPoint(start_xyz)
    resampled = sitk.Resample(image, size_xyz, sitk.Transform(), interpolator, origin, reference.GetSpacing(),
                              reference.GetDirection(), 0.0, image.GetPixelID())
    return sitk.GetArrayFromImage(resampled)


def _on_reference(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def labels_on_input_grid(
    probabilities: np.ndarray, label_values: Sequence[int], grid: sitk.Image, reference: sitk.Image,
) -> sitk.Image:
    """uint8 labels on ``reference``'s grid: argmax of the linearly resampled class probabilities.

    ``probabilities`` is (K, z, y, x) on ``grid``; class index 0 is the background. Ties resolve
    to the lower class index, as ``numpy.argmax`` does.
    """
    values = np.asarray(label_values, np.uint8)
    labels = np.full(tuple(reversed(reference.GetSize())), values[0], np.uint8)
    box = input_box(probabilities.argmax(axis=0) != 0, grid, reference)
    if box is not None:
        best = index = None
        for k, class_probabilities in enumerate(probabilities):
            resampled = _resample_into_box(_extended(model_image(class_probabilities, grid)), reference, box,
                                           sitk.sitkLinear)
            if best is None:
                best, index = resampled, np.zeros(resampled.shape, np.uint8)
                continue
            higher = resampled > best
            index[higher] = k
            np.maximum(best, resampled, out=best)
        labels[box] = values[index]
    return _on_reference(labels, reference)


def map_on_input_grid(array: np.ndarray, grid: sitk.Image, reference: sitk.Image, region: np.ndarray | None = None) -> sitk.Image:
    """A float32 map resampled linearly onto ``reference``'s grid.

    With ``region`` (a model-grid mask) the map is zero outside it and only the input voxels that
    can read the region are computed.
    """
    source = model_image(np.asarray(array, np.float32), grid)
    if region is None:
        return sitk.Resample(_extended(source), reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    output = np.zeros(tuple(reversed(reference.GetSize())), np.float32)
    box = input_box(region, grid, reference)
    if box is not None:
        masked = model_image(np.where(region, array, 0.0).astype(np.float32), grid)
        output[box] = _resample_into_box(_extended(masked), reference, box, sitk.sitkLinear)
    return _on_reference(output, reference)


class MapsOnInputGrid(Mapping):
    """Model-grid maps by name, each resampled onto the input grid (every voxel) when first read.

    The raw score maps are large at input resolution (4 bytes per voxel each) and most runs never
    read them, so they cost nothing until a consumer (``--raw-maps``, the evaluation) asks.
    """

    def __init__(self, arrays: dict[str, np.ndarray], grid: sitk.Image, reference: sitk.Image) -> None:
        self._arrays, self._grid, self._reference = arrays, grid, reference
        self._images: dict[str, sitk.Image] = {}

    def __getitem__(self, name: str) -> sitk.Image:
        if name not in self._images:
            self._images[name] = map_on_input_grid(self._arrays[name], self._grid, self._reference)
        return self._images[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)
