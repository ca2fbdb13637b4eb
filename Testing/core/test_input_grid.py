"""Back to the input grid: the streamed, boxed argmax of resampled probabilities equals the brute
force over every class and voxel, and a region-limited map equals the full resampling inside."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from maxquery.inference.input_grid import MapsOnInputGrid, input_box, labels_on_input_grid, map_on_input_grid


def _grid(size_xyz, spacing, origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> sitk.Image:
    image = sitk.Image(list(size_xyz), sitk.sitkUInt8)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


@pytest.fixture
def model_grid():
    return _grid((20, 16, 12), (3.0, 3.0, 3.0), origin=(-30.0, -24.0, -18.0))


@pytest.fixture
def probabilities(model_grid):
    """Smooth class probabilities with a foreground blob and a tumour inside it."""
    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(*[np.arange(n) for n in reversed(model_grid.GetSize())], indexing="ij")
    organ = np.exp(-((x - 9) ** 2 / 20 + (y - 8) ** 2 / 12 + (z - 6) ** 2 / 8)) * 3
    tumour = np.exp(-((x - 10) ** 2 + (y - 8) ** 2 + (z - 6) ** 2) / 3) * 4
    logits = np.stack([np.ones_like(organ), organ, tumour, rng.normal(0, 0.3, organ.shape)])
    e = np.exp(logits - logits.max(0))
    return (e / e.sum(0)).astype(np.float32)


def _brute_force_labels(probabilities, values, grid, reference):
    maps = [sitk.GetArrayFromImage(sitk.Resample(
        sitk.ZeroFluxNeumannPad(_image(p, grid), [1, 1, 1], [1, 1, 1]), reference, sitk.Transform(), sitk.sitkLinear,
        0.0, sitk.sitkFloat32)) for p in probabilities]
    return np.asarray(values, np.uint8)[np.argmax(np.stack(maps), axis=0)]


def _image(array, grid):
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, np.float32))
    image.CopyInformation(grid)
    return image


@pytest.mark.parametrize("reference", [
    _grid((70, 50, 40), (0.8, 0.9, 1.25), origin=(-31.0, -25.0, -19.0)),  # finer, same axes
    _grid((50, 60, 30), (1.1, 0.8, 1.5), origin=(25.0, 20.0, 20.0), direction=(-1, 0, 0, 0, -1, 0, 0, 0, -1)),
])
def test_streamed_labels_equal_the_brute_force_argmax(probabilities, model_grid, reference):
    values = [0, 1, 2, 4]
    labels = labels_on_input_grid(probabilities, values, model_grid, reference)
    expected = _brute_force_labels(probabilities, values, model_grid, reference)
    assert labels.GetSize() == reference.GetSize() and labels.GetDirection() == reference.GetDirection()
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(labels), expected)
    assert {1, 2} <= set(np.unique(expected)) and (expected == 0).mean() > 0.3  # the box logic is exercised


def test_background_everywhere_needs_no_box(model_grid):
    probabilities = np.stack([np.full((12, 16, 20), 0.9, np.float32), np.full((12, 16, 20), 0.1, np.float32)])
    reference = _grid((30, 30, 30), (1.0, 1.0, 1.0))
    assert input_box(probabilities.argmax(0) != 0, model_grid, reference) is None
    assert not sitk.GetArrayViewFromImage(labels_on_input_grid(probabilities, [0, 1], model_grid, reference)).any()


def test_region_map_is_zero_outside_and_exact_inside(probabilities, model_grid):
    reference = _grid((70, 50, 40), (0.8, 0.9, 1.25), origin=(-31.0, -25.0, -19.0))
    values = probabilities[2] * 0.5 + 0.5
    region = probabilities.argmax(0) != 0
    limited = sitk.GetArrayFromImage(map_on_input_grid(values, model_grid, reference, region))
    full = sitk.GetArrayFromImage(map_on_input_grid(values, model_grid, reference))
    masked_full = sitk.GetArrayFromImage(map_on_input_grid(np.where(region, values, 0.0), model_grid, reference))
    np.testing.assert_allclose(limited, masked_full, atol=1e-6)  # the box loses nothing
    assert (limited == 0).mean() > 0.3 and np.allclose(limited[limited > 0.6], full[limited > 0.6], atol=0.2)


def test_raw_maps_are_resampled_once_when_first_read(model_grid):
    reference = _grid((30, 24, 18), (2.0, 2.0, 2.0), origin=(-30.0, -24.0, -18.0))
    maps = MapsOnInputGrid({"maxquery": np.ones((12, 16, 20), np.float32)}, model_grid, reference)
    assert list(maps) == ["maxquery"] and len(maps) == 1 and not maps._images
    first = maps["maxquery"]
    assert maps["maxquery"] is first and first.GetSize() == reference.GetSize()
    assert np.all(sitk.GetArrayViewFromImage(first) == 1.0)  # every voxel, edges included
