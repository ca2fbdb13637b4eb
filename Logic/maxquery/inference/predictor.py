"""Whole-CT inference: one code path for the command line, the Slicer module and the evaluation.

image → reorient to LPS → resample to the model spacing → CT normalisation → Gaussian sliding
window (class probabilities and every requested score's per-patch map, aggregated with the same
weights, in the precision ``precision.select_precision`` picks) → finalised scores, calibrated
anomaly, lesion table on the model grid → back to the input grid (``input_grid``), whose geometry
every output reproduces exactly. Each stage's time is recorded in ``SegmentationResult.timings``.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import InputError, ResourceError, RunCancelled
from ..io import image_from_array, validate_ct
from ..metrics import case_score
from ..model_folder import load_model_folder
from ..network import MaskPrediction
from ..preprocessing import resample_to_spacing, to_canonical
from ..scores import ScoreContext, get_score, mc_dropout_prediction
from .input_grid import MapsOnInputGrid, labels_on_input_grid, map_on_input_grid, model_image
from .lesions import find_lesions, search_region
from .postprocessing import one_type_per_lesion, outside_largest_component
from ..precision import select_precision
from .resources import check_fits, cpu_threads, estimate_memory, select_device, torch_threads
from .result import SegmentationResult
from .sliding_window import mirror_axis_sets, mirrored, sliding_window

FAST_SPACING_FACTOR = 2.0  # fast mode: twice the model spacing per axis, about 8x fewer voxels

# Share of the progress bar per stage; the sliding window dominates the run time.
_STAGES = {"preprocessing": (0.0, 0.1), "sliding window": (0.1, 0.9), "postprocessing": (0.9, 0.93),
           "resampling to the input grid": (0.93, 1.0)}


class _Progress:
    """Turns (stage, fraction within the stage) into the caller's overall fraction; checks cancel."""

    def __init__(self, callback: Callable[[float, str], None] | None, cancel) -> None:
        self.callback, self.cancel = callback, cancel

    def __call__(self, stage: str, within: float = 0.0) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise RunCancelled("the run was cancelled; nothing was written")
        if self.callback is not None:
            low, high = _STAGES.get(stage, (1.0, 1.0))
            self.callback(low + (high - low) * within, stage)


class Predictor:
    """Loads a model folder once and segments any number of CTs with it.

    ``scores`` are registry names (``maxquery``, ``maxquery_post``, ``msp``, ``maxlogit``, ``sml``,
    ``mc_dropout``); the score the card's calibration describes is always computed as well.
    ``mirror`` averages over the flips along the axes the model was trained with (the card's
    ``mirror_axes``; 8x slower for all three). ``fast`` runs at
    ``FAST_SPACING_FACTOR`` times the model spacing. ``device``: ``auto`` (CUDA, then MPS, then
    CPU), ``cpu``, ``cuda`` or ``mps``; ``fell_back_to_cpu`` tells whether an accelerator was
    wanted but none could be used. ``precision``: ``auto``, ``fp32`` or ``bf16`` (see
    ``precision.select_precision``); ``self.precision`` says what is used and why.
    ``keep_largest_component`` and ``one_type_per_lesion``: the postprocessing steps
    (``postprocessing``); None applies each as the model card says.
    """

    def __init__(
        self, model_folder: str | Path, device: str = "auto", fast: bool = False,
        scores: Sequence[str] = ("maxquery",), overlap: float = 0.5, mirror: bool = False,
        batch_size: int = 2, mc_passes: int = 8, num_threads: int | None = None, precision: str = "auto",
        keep_largest_component: bool | None = None, one_type_per_lesion: bool | None = None,
    ) -> None:
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must lie in [0, 1), got {overlap}")
        self.device, self.fell_back_to_cpu = select_device(device)
        self.precision = select_precision(precision, self.device)
        loaded = load_model_folder(model_folder, device=self.device)
        self.card, self.network, self.folder = loaded.card, loaded.network, loaded.folder
        self.fast, self.overlap, self.mirror = fast, overlap, mirror
        self.keep_largest_component = (self.card.keep_largest_component if keep_largest_component is None
                                       else keep_largest_component)
        self.one_type_per_lesion = self.card.one_type_per_lesion if one_type_per_lesion is None else one_type_per_lesion
        self.batch_size, self.mc_passes = max(1, int(batch_size)), int(mc_passes)
        self._batch = self.batch_size  # lowered per case when memory is short
        self.num_threads = num_threads or cpu_threads()
        has_queries = self.card.architecture == "maxquery"
        calibration = self.card.calibration
        self.anomaly_score = calibration.score if calibration else ("maxquery" if has_queries else "maxlogit")
        names = list(dict.fromkeys([*scores, self.anomaly_score]))
        self.scores = [get_score(name) for name in names]
        for score in self.scores:
            if score.needs_queries and not has_queries:
                raise ValueError(f"the score {score.name!r} needs a MaxQuery network; this model is "
                                 f"{self.card.architecture!r}")
            if score.name == "sml" and self.card.sml_stats is None:
                raise ValueError("the 'sml' score needs max-logit statistics that this model card lacks")
        if mirror and not self.card.mirror_axes:
            raise ValueError(f"the model {self.card.name!r} was trained without mirroring, so test-time "
                             "mirroring would only hurt it; run without mirroring")
        self.spacing_zyx = tuple(s * (FAST_SPACING_FACTOR if fast else 1.0) for s in self.card.spacing_zyx)
        self.calibration_mismatch = (
            calibration.mismatches(self.calibration_conditions(), self.card.spacing_zyx) if calibration else [])

    def calibration_conditions(self) -> dict:
        """The settings that shape the raw scores; a calibration fitted with this predictor records them."""
        return {"spacing_zyx": [float(s) for s in self.spacing_zyx], "overlap": float(self.overlap),
                "mirror": bool(self.mirror)}

    # -- public -------------------------------------------------------------------------------

    def predict_array(
        self, array_zyx: np.ndarray, spacing_xyz: Sequence[float], origin: Sequence[float] = (0.0, 0.0, 0.0),
        direction: Sequence[float] = (1, 0, 0, 0, 1, 0, 0, 0, 1), **kwargs,
    ) -> SegmentationResult:
        """``predict`` for a (z, y, x) array with its geometry (x, y, z order, LPS, mm)."""
        return self.predict(image_from_array(array_zyx, spacing_xyz, origin, direction), **kwargs)

    def predict(
        self, image: sitk.Image, progress: Callable[[float, str], None] | None = None, cancel=None,
        anomaly_threshold: float = 0.99,
    ) -> SegmentationResult:
        """Segment one CT; every image of the result lies on ``image``'s grid exactly.

        Raises ``InputError`` for an image that is no CT volume, ``ResourceError`` when it would
        not fit in memory, ``RunCancelled`` when ``cancel.is_set()`` becomes true.
        """
        if not isinstance(image, sitk.Image):
            raise InputError(f"expected a SimpleITK image, got {type(image).__name__}")
        warnings = validate_ct(image)
        step = _Progress(progress, cancel)
        try:
            with torch_threads(self.num_threads) if self.device.type == "cpu" else contextlib.nullcontext():
                result = self._predict(image, step, cancel, anomaly_threshold)
                result.notes[:0] = warnings  # what the input check found, first
                return result
        except (torch.OutOfMemoryError, MemoryError) as err:
            if isinstance(err, ResourceError):
                raise
            raise ResourceError(self._out_of_memory_message()) from err
        except RuntimeError as err:
            if "out of memory" in str(err).lower() or "can't allocate memory" in str(err).lower():
                raise ResourceError(self._out_of_memory_message()) from err
            raise

    # -- steps ----------------------------------------------------------------------------------

    def _predict(self, image: sitk.Image, step: _Progress, cancel, threshold: float) -> SegmentationResult:
        timings: dict[str, float] = {}
        start = clock = time.perf_counter()
        step("preprocessing")
        grid = resample_to_spacing(to_canonical(image), self.spacing_zyx)
        clock = _lap(timings, "reorient and resample", clock)
        volume = torch.from_numpy(self.card.normalization(sitk.GetArrayViewFromImage(grid)))
        self._check_memory(image, volume.shape)
        clock = _lap(timings, "normalisation", clock)

        k = self.card.network.num_classes
        maps = sliding_window(
            volume, self._patch_fn(), k + len(self.scores), self.card.patch_size_zyx, self.overlap,
            self._batch, self._pad_value(), self.device,
            on_batch=lambda done, total: step("sliding window", done / total), cancel=cancel, timings=timings,
        )
        del volume
        clock = _lap(timings, "network", clock)
        timings["network"] = round(timings["network"] - timings["aggregation"], 3)

        step("postprocessing")
        probabilities = maps[:k].numpy()
        removed_ml = self._keep_largest_component(probabilities) if self.keep_largest_component else None
        retyped_ml = self._one_type_per_lesion(probabilities) if self.one_type_per_lesion else None
        indices = probabilities.argmax(axis=0).astype(np.uint8)
        label_values = np.asarray([c.value for c in self.card.classes], np.uint8)
        context = ScoreContext(labels=indices, sml_stats=self.card.sml_stats, spacing_zyx=self.spacing_zyx)
        raw = {}
        for i, score in enumerate(self.scores):
            aggregated = maps[k + i].numpy()
            raw[score.name] = score.finalize(aggregated, context) if score.finalize else aggregated
        primary = raw[self.anomaly_score]
        calibrated = self.card.calibration(primary) if self.card.calibration else _min_max(primary)
        tumour = np.isin(indices, self.card.tumor_indices)
        model_labels = model_image(label_values[indices], grid)
        lesions = find_lesions(model_labels, model_image(calibrated, grid), self.card, threshold)
        case_scores = {name: case_score(values, tumour) for name, values in raw.items()}
        score = float(self.card.calibration(np.asarray(case_scores[self.anomaly_score]))) if self.card.calibration \
            else case_score(calibrated, tumour)  # min-max is affine: the mean of the map is the mean's image
        region = search_region(label_values[indices], self.spacing_zyx)
        clock = _lap(timings, "scores and lesions", clock)

        step("resampling to the input grid")
        labels = labels_on_input_grid(probabilities, label_values, grid, image)
        del maps, probabilities
        clock = _lap(timings, "labels to input grid", clock)
        step("resampling to the input grid", 0.5)
        anomaly = map_on_input_grid(calibrated, grid, image, region)
        _lap(timings, "anomaly to input grid", clock)
        step("resampling to the input grid", 1.0)
        timings["total"] = round(time.perf_counter() - start, 3)
        calibrated_ok = self.card.calibration is not None and not self.calibration_mismatch
        notes = self._notes()
        if removed_ml:
            notes.append(f"{removed_ml:.1f} mL predicted apart from the largest organ region were set to background "
                         "(the model's postprocessing: keep the largest connected region)")
        if retyped_ml:
            notes.append(f"{retyped_ml:.1f} mL of lesions predicted with mixed types took the type most of the "
                         "lesion has (the model's postprocessing: one type per lesion)")
        return SegmentationResult(
            labels=labels, anomaly=anomaly, raw_scores=MapsOnInputGrid(raw, grid, image), case_score=score, case_scores=case_scores,
            lesions=lesions, card=self.card, anomaly_threshold=threshold, device=str(self.device),
            precision=self.precision.name, timings=timings, anomaly_score=self.anomaly_score,
            calibrated=calibrated_ok, notes=notes, image=image, removed_by_postprocessing_ml=removed_ml,
            retyped_by_postprocessing_ml=retyped_ml,
        )

    def _keep_largest_component(self, probabilities: np.ndarray) -> float:
        """Make the background certain wherever the argmax lies outside the largest foreground
        region (in place), so that labels on every grid agree; returns the volume removed in mL."""
        removed = outside_largest_component(probabilities.argmax(axis=0) != 0)
        probabilities[:, removed] = 0.0
        probabilities[0, removed] = 1.0
        return self._millilitres(removed)

    def _one_type_per_lesion(self, probabilities: np.ndarray) -> float:
        """Give each tumour voxel's whole tumour probability to the type its lesion voted for (in
        place), so that labels on every grid agree; returns the volume whose type changed in mL."""
        indices = probabilities.argmax(axis=0)
        tumour_indices = self.card.tumor_indices
        voted = one_type_per_lesion(indices, tumour_indices)
        tumour = np.isin(indices, tumour_indices)
        voxels = probabilities[:, tumour]  # (K, N), a copy
        total = voxels[tumour_indices].sum(axis=0)
        voxels[tumour_indices] = 0.0
        voxels[voted[tumour], np.arange(voxels.shape[1])] = total
        probabilities[:, tumour] = voxels
        return self._millilitres(voted != indices)

    def _millilitres(self, mask: np.ndarray) -> float:
        return float(mask.sum()) * float(np.prod(self.spacing_zyx)) / 1000.0

    def _patch_fn(self):
        """(B, 1, *P) patches → (B, K + S, *P): softmax probabilities, then one map per score."""
        deterministic = [s for s in self.scores if not s.stochastic_passes]
        stochastic = [s for s in self.scores if s.stochastic_passes]
        dtype = self.precision.dtype
        autocast = (lambda: torch.autocast(self.device.type, dtype=dtype)) if dtype else contextlib.nullcontext

        def predict(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                with autocast():
                    out = self.network(x)
                if isinstance(out, MaskPrediction):
                    prediction = MaskPrediction(out.logits.float(), out.query_responses.float())
                else:
                    prediction = MaskPrediction(out.float(), None)
                maps = [prediction.logits.softmax(dim=1)]
                maps += [s.per_patch(prediction).unsqueeze(1) for s in deterministic]
                if stochastic:
                    with autocast():
                        sampled = mc_dropout_prediction(self.network, x, self.mc_passes)
                    sampled = MaskPrediction(sampled.logits.float(), None)
                    maps += [s.per_patch(sampled).unsqueeze(1) for s in stochastic]
                return torch.cat(maps, dim=1).float().cpu()

        return mirrored(predict, mirror_axis_sets(self.card.mirror_axes)) if self.mirror else predict

    def _check_memory(self, image: sitk.Image, model_shape: Sequence[int]) -> None:
        """Pick the largest batch size (up to the requested one) that fits, or refuse."""
        batch = self.batch_size
        while True:
            estimate = estimate_memory(
                int(np.prod(image.GetSize())), model_shape, self.card.patch_size_zyx, batch, self.card.network,
                len(self.scores), self.card.architecture == "maxquery", self.mirror,
            )
            try:
                check_fits(estimate, self.device, self.fast)
                self._batch = batch
                return
            except ResourceError:
                if batch == 1:
                    raise
                batch = max(1, batch // 2)

    def _pad_value(self) -> float:
        """Normalised value of the lowest clipped intensity (air), for volumes smaller than a patch."""
        return float(self.card.normalization(np.asarray([self.card.normalization.clip_low]))[0])

    def _notes(self) -> list[str]:
        notes = []
        if self.card.calibration is None:
            notes.append("the model card has no anomaly calibration: 'anomaly' is the per-case min-max map, "
                         "so a threshold does not mean the same thing in every case")
        elif self.calibration_mismatch:
            notes.append("the anomaly map is not calibrated for this run (" + "; ".join(self.calibration_mismatch)
                         + "): a threshold does not give the stated false-alarm rate")
        if self.fast:
            spacing = " x ".join(f"{s:g}" for s in self.spacing_zyx)
            notes.append(f"fast mode: the network ran at {spacing} mm (z, y, x), coarser than it was trained on")
        if self.precision.slow:
            notes.append(f"{self.precision.reason}: expect it to be much slower than fp32")
        if self.fell_back_to_cpu:
            notes.append("no GPU could be used; the run was on the CPU")
        return notes

    def _out_of_memory_message(self) -> str:
        where = "GPU" if self.device.type != "cpu" else "the computer"
        return (f"{where} ran out of memory; try fast mode, a smaller batch size, cropping the CT"
                f"{', or the CPU' if self.device.type != 'cpu' else ''}")


def _lap(timings: dict[str, float], name: str, since: float) -> float:
    now = time.perf_counter()
    timings[name] = round(now - since, 3)
    return now


def _min_max(array: np.ndarray) -> np.ndarray:
    """The paper's per-case normalisation to [0, 1] (a constant map becomes all zeros)."""
    low, high = float(array.min()), float(array.max())
    return ((array - low) / (high - low) if high > low else np.zeros_like(array)).astype(np.float32)


