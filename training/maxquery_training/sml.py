"""SML's statistics for a model folder: the max logit's mean and standard deviation per predicted
class over the voxels of training cases (Jung et al. 2021; ``maxquery.scores.MaxLogitStatistics``).

They are gathered with the predictor a user runs, postprocessing included, because the predicted
class of a voxel picks the statistics it is standardised with.
"""

from __future__ import annotations

import logging

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from maxquery.inference import Predictor
from maxquery.scores import SML_MIN_CLASS_VOXELS, MaxLogitStatistics

from .dataset import read_case

log = logging.getLogger(__name__)


def sml_statistics(predictor: Predictor, cases) -> dict:
    """Per predicted class: voxels, mean and std of the max logit over every training case."""
    statistics = MaxLogitStatistics(len(predictor.card.classes))
    index_of_value = np.zeros(256, np.intp)
    index_of_value[[c.value for c in predictor.card.classes]] = np.arange(len(predictor.card.classes))
    for case in tqdm(cases, desc="SML statistics", leave=False):
        image, _ = read_case(case)
        result = predictor.predict(image)
        max_logit = -sitk.GetArrayViewFromImage(result.raw_scores["maxlogit"])
        statistics.update(max_logit, index_of_value[sitk.GetArrayViewFromImage(result.labels)])
    stats = statistics.to_dict()
    if stats["fallback"]:
        names = [predictor.card.classes[i].name for i in stats["fallback"]]
        log.info("SML: %s use the pooled statistics (fewer than %d voxels or no spread)", names, SML_MIN_CLASS_VOXELS)
    return stats
