"""Decide a model's postprocessing on its validation cases, and record it in the card.

nnU-Net keeps only the largest foreground region when that raises the mean Dice of the foreground
classes on the validation cases; the same rule here, and then, on top of that decision, the same
rule for giving each lesion one type (``maxquery.inference.postprocessing``). The decisions are
taken on the labels of the input grid, where the Dice is measured; inference applies them on the
model grid, before the labels are resampled, so that the anomaly search agrees with them.

    maxquery-postprocess --data DATASET --model MODEL_DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from maxquery.errors import MaxQueryError
from maxquery.inference import Predictor
from maxquery.inference.postprocessing import keep_largest_component, one_type_per_lesion
from maxquery.metrics import DiceAccumulator
from maxquery.model_folder import ModelCard, read_model_card, write_model_card

from .dataset import DataError, list_cases, read_case
from .sml import sml_statistics


def determine_postprocessing(predictor: Predictor, cases) -> dict:
    """Mean foreground Dice of the validation cases without and with each step, and which steps
    to apply (a step must raise the Dice; one type per lesion is judged after the first step's
    decision). ``predictor`` must not postprocess."""
    if predictor.keep_largest_component or predictor.one_type_per_lesion:
        raise ValueError("the decision needs the labels before postprocessing "
                         "(keep_largest_component=False, one_type_per_lesion=False)")
    card = predictor.card
    values = tuple(card.foreground_values)
    steps = {(largest, vote): DiceAccumulator(values) for largest in (False, True) for vote in (False, True)}
    for case in tqdm(cases, desc="postprocessing", leave=False):
        image, label = read_case(case)
        predicted = sitk.GetArrayFromImage(predictor.predict(image).labels)
        reference = sitk.GetArrayFromImage(label)
        for largest in (False, True):
            kept = keep_largest_component(predicted) if largest else predicted
            steps[largest, False].update(kept, reference)
            steps[largest, True].update(one_type_per_lesion(kept, card.tumor_values), reference)
    dice = {key: float(np.nanmean(list(accumulator.mean().values()))) for key, accumulator in steps.items()}
    largest = dice[True, False] > dice[False, False]
    return {"keep_largest_component": bool(largest), "one_type_per_lesion": bool(dice[largest, True] > dice[largest, False]),
            "validation_cases": len(cases), "validation_dice_without": dice[False, False],
            "validation_dice_with": dice[True, False], "validation_dice_one_type_per_lesion": dice[largest, True]}


def decide_postprocessing(folder: Path, cases, card: ModelCard, device: str = "auto") -> dict:
    """Decide for the model in ``folder`` on ``cases`` and put the decision and its figures in ``card``."""
    predictor = Predictor(folder, device=device, scores=("maxlogit",), keep_largest_component=False,
                          one_type_per_lesion=False)
    decision = determine_postprocessing(predictor, cases)
    card.keep_largest_component = decision["keep_largest_component"]
    card.one_type_per_lesion = decision["one_type_per_lesion"]
    card.training = card.training | {"postprocessing": decision}
    return decision


def record_postprocessing(folder: Path, data_root: Path, device: str = "auto") -> tuple[dict, bool]:
    """Decide on ``data_root``'s validation cases and write the decision into the model's card.

    A changed decision changes the predicted classes, so the card's SML statistics are gathered
    again (from as many training cases as before), as the export would have gathered them.
    Returns the decision and whether they were."""
    card = read_model_card(folder)
    before = (card.keep_largest_component, card.one_type_per_lesion)
    decision = decide_postprocessing(folder, list_cases(data_root, "validation"), card, device)
    refresh_sml = card.sml_stats is not None and (card.keep_largest_component, card.one_type_per_lesion) != before
    if refresh_sml:
        predictor = Predictor(folder, device=device, scores=("maxlogit",),
                              keep_largest_component=card.keep_largest_component,
                              one_type_per_lesion=card.one_type_per_lesion)
        training_cases = list_cases(data_root, "training")[:card.sml_stats["cases"]]
        card.sml_stats = sml_statistics(predictor, training_cases)
    write_model_card(folder, card)
    return decision, refresh_sml


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="maxquery-postprocess", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="Decathlon-layout dataset with a validation split")
    parser.add_argument("--model", required=True, type=Path, help="model folder whose card records the decision")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)
    try:
        decision, sml_gathered_again = record_postprocessing(args.model, args.data, args.device)
    except (DataError, MaxQueryError, FileNotFoundError, ValueError) as err:
        print(f"maxquery-postprocess: error: {err}", file=sys.stderr)
        return 2
    verdict = "keeps" if decision["keep_largest_component"] else "does not keep"
    print(f"{args.model.name} {verdict} only the largest foreground region: mean validation Dice "
          f"{100 * decision['validation_dice_without']:.2f} without, {100 * decision['validation_dice_with']:.2f} "
          f"with ({decision['validation_cases']} cases)")
    verdict = "gives" if decision["one_type_per_lesion"] else "does not give"
    print(f"{args.model.name} {verdict} each lesion one type: mean validation Dice "
          f"{100 * decision['validation_dice_one_type_per_lesion']:.2f} with it")
    if sml_gathered_again:
        print(f"{args.model.name}: SML statistics gathered again under the new postprocessing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
