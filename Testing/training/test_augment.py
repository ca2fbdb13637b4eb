"""The augmentations for what differs between patients: contrast phase and field of view."""

import numpy as np
import pytest

from maxquery.preprocessing import CTNormalization
from maxquery_training.augment import RandContrastPhased, RandSlabd, build_augmentation
from maxquery_training.config import AugmentationConfig

NORM = CTNormalization(clip_low=-150.0, clip_high=350.0, mean=60.0, std=50.0)


def _patch():
    image = np.zeros((1, 16, 32, 32), np.float32)
    label = np.zeros((1, 16, 32, 32), np.uint8)
    label[:, 2:14, 1:19, 1:19] = 1  # organ
    label[:, 7:9, 9:11, 9:11] = 2  # a lesion inside it
    return {"image": image, "label": label}


def test_contrast_phase_shifts_organ_and_lesions_together_in_hu():
    transform = RandContrastPhased(NORM, organ_shift_hu=40.0, global_shift_hu=0.0, prob=1.0)
    transform.set_random_state(3)
    data = _patch()
    out = transform(data)["image"]
    organ_core, lesion, outside = out[0, 8, 14, 14], out[0, 8, 10, 10], out[0, 8, 30, 30]
    assert outside == 0.0  # away from the organ: unchanged
    assert organ_core != 0.0 and abs(organ_core) * NORM.std <= 40.0 + 1e-4  # at most 40 HU
    assert organ_core == pytest.approx(lesion, rel=1e-4)  # lesion-to-liver contrast kept


def test_contrast_phase_global_shift_moves_every_voxel():
    transform = RandContrastPhased(NORM, organ_shift_hu=0.0, global_shift_hu=20.0, prob=1.0)
    transform.set_random_state(4)
    out = transform(_patch())["image"]
    assert np.unique(out).size == 1 and out[0, 0, 0, 0] != 0.0 and abs(out[0, 0, 0, 0]) * NORM.std <= 20.0


def test_slab_keeps_a_few_slices_and_fills_air_and_background_beyond():
    air = float(NORM(np.asarray([NORM.clip_low]))[0])
    transform = RandSlabd(air, min_slices=3, max_slices=5, prob=1.0)
    transform.set_random_state(5)
    data = _patch()
    data["image"] += 1.0
    out = transform(data)
    kept = [z for z in range(16) if (out["image"][0, z] == 1.0).all()]
    assert 3 <= len(kept) <= 5 and kept == list(range(kept[0], kept[0] + len(kept)))
    others = [z for z in range(16) if z not in kept]
    assert (out["image"][0, others] == air).all() and (out["label"][0, others] == 0).all()


def test_build_augmentation_includes_phase_and_slab_only_when_enabled():
    off = build_augmentation(AugmentationConfig(), NORM).transforms
    on = build_augmentation(AugmentationConfig(slab_prob=0.2, contrast_prob=0.3), NORM).transforms
    assert not any(isinstance(t, RandSlabd) for t in off)
    assert any(isinstance(t, RandSlabd) for t in on)
    phase = [t for t in on if isinstance(t, RandContrastPhased)]
    assert len(phase) == 1 and phase[0].prob == 0.3


def test_fixed_ct_window_keeps_enhanced_liver_inside():
    unenhanced_liver = np.random.default_rng(0).normal(60, 10, 10_000)
    percentile = CTNormalization.from_foreground(unenhanced_liver)
    fixed = CTNormalization.from_foreground(unenhanced_liver, window=(-150, 350))
    portal_venous = np.array([110.0, 130.0])
    assert percentile(portal_venous)[0] == percentile(portal_venous)[1]  # both saturate
    assert fixed(portal_venous)[0] < fixed(portal_venous)[1]
    with pytest.raises(ValueError, match="ct_window"):
        CTNormalization.from_foreground(unenhanced_liver, window=(100, 50))
