"""``maxquery-evaluate``: the paper's tables on your test set (Tables 1, 2 and 4).

    maxquery-evaluate --data DATASET --model MODEL_DIR [--model OTHER_DIR ...] --out REPORT_DIR

For every model and every anomaly score it can produce, OOD localisation (AUROC, AUPR, FPR95;
voxels of the test splits, OOD label positive) inside the organ region and over the whole volume,
and case-level AUC (case score = mean raw score inside the predicted tumour on the model grid,
``maxquery.metrics.case_score``, paper §4.2); for every model the Dice per organ and inlier
tumour type (OOD voxels excluded). Writes ``report.md``, ``ood.csv``, ``dice.csv``, ``cases.csv``
(per case: Dice, each class's reference, predicted and overlapping voxels as nnU-Net's summary has
them, and case scores, to see where a model fails: a Dice of 0 is a missed lesion or a false one),
``confusion.csv`` (voxels of each reference class by predicted class: which type is taken for
which), ``roc.png`` and ``pr.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from tqdm import tqdm

from maxquery.inference import Predictor
from maxquery.metrics import ConfusionCounts, DiceAccumulator, StreamingOODMetrics, rank_auc
from maxquery.model_folder import ModelCard, read_model_card, write_model_card
from maxquery.preprocessing import resample_to_spacing
from maxquery.query_usage import QueryUsage
from maxquery.scores import SCORES

from .dataset import PreprocessedCase, list_cases, read_case
from .diagnostics import measure_query_usage
from .regions import ORGAN_MARGIN_MM, organ_region

log = logging.getLogger(__name__)

REGIONS = ("organ", "whole")
METRIC_TOLERANCE = 0.001  # warn when merged score bins could move a figure by more
ALL_CASES = "all"
QUERY_SCORES = ("maxquery", "maxquery_post")
MC_DROPOUT = "mc_dropout"


@dataclass
class ScoreTally:
    voxels: dict[str, StreamingOODMetrics] = field(default_factory=lambda: {r: StreamingOODMetrics() for r in REGIONS})
    case_scores: list[float] = field(default_factory=list)
    case_is_ood: list[bool] = field(default_factory=list)

    def row(self) -> dict[str, float]:
        """The figures; NaN where a subset lacks OOD or inlier voxels (or cases)."""
        row = {}
        for region, metrics in self.voxels.items():
            summary = metrics.summary() if metrics.has_both_classes else dict.fromkeys(("auroc", "aupr", "fpr95"), np.nan)
            row.update({f"{k}_{region}": v for k, v in summary.items()})
            if metrics.has_both_classes and max(metrics.error_bounds().values()) > METRIC_TOLERANCE:
                print(f"maxquery-evaluate: warning: {region} figures may be off by up to "
                      f"{metrics.error_bounds()} (scores merged into {metrics.max_bins} bins)", file=sys.stderr)
        both_kinds = len(set(self.case_is_ood)) == 2
        row["case_auc"] = rank_auc(np.array(self.case_scores), np.array(self.case_is_ood)) if both_kinds else np.nan
        return row


@dataclass
class ModelEvaluation:
    """One model's figures on the test cases; ``query_usage`` for a MaxQuery model only."""

    card: ModelCard
    tallies: dict[tuple[str, str], ScoreTally]  # (case subset, score) → voxel and case tallies
    dice: dict[str, dict[str, float]]  # case subset → class name → mean Dice
    case_rows: list[dict]
    confusion_rows: list[dict]
    query_usage: QueryUsage | None


def scores_for(folder: Path, requested: list[str]) -> list[str]:
    """The requested scores this model folder can give: ``mc_dropout`` from an MC-dropout baseline
    only (and nothing else from it, as in the paper's Tab. 1), the query scores from MaxQuery only."""
    card = read_model_card(folder)
    if card.training.get("baseline") == MC_DROPOUT:
        return [s for s in requested if s == MC_DROPOUT]
    if MC_DROPOUT in requested:
        print(f"maxquery-evaluate: note: no {MC_DROPOUT} score for {card.name}: it is not an MC-dropout baseline; "
              "train one with 'maxquery-train train --baseline mc_dropout', export it with '--run mc_dropout' "
              "and pass it as another --model", file=sys.stderr)
    names = [s for s in requested if s != MC_DROPOUT and (card.architecture == "maxquery" or s not in QUERY_SCORES)]
    if card.sml_stats is None:
        names = [s for s in names if s != "sml"]
    return names


def evaluate_model(folder: Path, data_root: Path, score_names: list[str], ood_label: int, margin_mm: float,
                   mc_passes: int, overlap: float, device: str,
                   subsets: dict[str, re.Pattern] | None = None) -> ModelEvaluation:
    """Run the model on every test case and tally each figure per case subset: ``all`` holds every
    test case and each named subset the cases whose id matches its pattern (e.g. one anatomy)."""
    predictor = Predictor(folder, device=device, scores=score_names, mc_passes=mc_passes, overlap=overlap)
    card = predictor.card
    subsets = {ALL_CASES: re.compile(""), **(subsets or {})}
    tallies = {(subset, name): ScoreTally() for subset in subsets for name in score_names}
    labels = tuple(card.foreground_values)
    dice_by_subset = {subset: DiceAccumulator(labels) for subset in subsets}
    foreground = [*card.foreground_values, ood_label]
    confusion_by_subset = {subset: ConfusionCounts((0, *labels, ood_label), (0, *labels)) for subset in subsets}
    cases = [(c, False) for c in list_cases(data_root, "test_inlier")] + \
            [(c, True) for c in list_cases(data_root, "test_ood")]
    names = {c.value: c.name for c in card.classes}
    case_rows = []
    for index, (case, is_ood_case) in enumerate(tqdm(cases, desc=card.name)):
        image, label = read_case(case)
        torch.manual_seed(index)  # MC-dropout masks: the same report from the same models
        result = predictor.predict(image)
        reference = sitk.GetArrayFromImage(label)
        predicted = sitk.GetArrayFromImage(result.labels)
        ood = reference == ood_label
        region = organ_region(reference, foreground, tuple(reversed(label.GetSpacing())), margin_mm)
        member_of = [subset for subset, pattern in subsets.items() if pattern.search(case.case_id)]
        row = {"model": card.name, "case": case.case_id, "ood_case": is_ood_case}
        for name in score_names:
            raw = sitk.GetArrayViewFromImage(result.raw_scores[name])
            row[f"case_score_{name}"] = result.case_scores[name]
            voxels = {r: StreamingOODMetrics() for r in REGIONS}  # this case's, added to each subset
            voxels["organ"].update(raw, ood, region)
            voxels["whole"].update(raw, ood)
            for subset in member_of:
                tally = tallies[subset, name]
                for r in REGIONS:
                    tally.voxels[r].merge(voxels[r])
                tally.case_scores.append(row[f"case_score_{name}"])
                tally.case_is_ood.append(is_ood_case)
        inlier_predicted, inlier_reference = np.where(ood, 0, predicted), np.where(ood, 0, reference)
        case_dice = dice_by_subset[ALL_CASES].update(inlier_predicted, inlier_reference)
        case_confusion = confusion_by_subset[ALL_CASES].update(predicted, reference)
        for subset in member_of[1:]:
            dice_by_subset[subset].add(case_dice)
            confusion_by_subset[subset].add(case_confusion)
        case_rows.append(row | {f"dice_{names[v]}": d for v, d in case_dice.items()}
                         | class_voxel_counts(inlier_predicted, inlier_reference, {v: names[v] for v in labels}))
    dice_means = {subset: {names[v]: d for v, d in acc.mean().items()} for subset, acc in dice_by_subset.items()}
    usage = test_query_usage(predictor, data_root) if card.architecture == "maxquery" else None
    confusion = confusion_rows(card.name, confusion_by_subset, {**names, ood_label: "unseen"})
    return ModelEvaluation(card, tallies, dice_means, case_rows, confusion, usage)


def confusion_rows(model: str, confusion_by_subset: dict[str, ConfusionCounts], names: dict[int, str]) -> list[dict]:
    """One row per (subset, reference class): voxel counts per predicted class and the row's total."""
    rows = []
    for subset, confusion in confusion_by_subset.items():
        for value, counts in zip(confusion.reference_values, confusion.counts):
            rows.append({"model": model, "cases": subset, "reference": names[value], "voxels": int(counts.sum()),
                         **{names[p]: int(c) for p, c in zip(confusion.predicted_values, counts)}})
    return rows


def test_query_usage(predictor: Predictor, data_root: Path) -> QueryUsage:
    """Query usage of a MaxQuery model over the test cases, preprocessed as inference does."""
    card = predictor.card
    air = float(card.normalization(np.asarray([card.normalization.clip_low]))[0])
    cases = []
    for case in list_cases(data_root, "test_inlier") + list_cases(data_root, "test_ood"):
        image = resample_to_spacing(read_case(case)[0], card.spacing_zyx)
        cases.append(PreprocessedCase(case.case_id, card.normalization(sitk.GetArrayFromImage(image)), None, {}))
    return measure_query_usage(predictor.network, cases, tuple(card.patch_size_zyx), air, predictor.device)


def parse_subsets(specs: list[str]) -> dict[str, re.Pattern]:
    """``NAME=REGEX`` strings → patterns; a clear error for a malformed one."""
    subsets = {}
    for spec in specs:
        name, sep, pattern = spec.partition("=")
        if not sep or not name or name == ALL_CASES:
            raise ValueError(f"--subset {spec!r}: expected NAME=REGEX with a NAME other than {ALL_CASES!r}")
        try:
            subsets[name] = re.compile(pattern)
        except re.error as err:
            raise ValueError(f"--subset {spec!r}: bad regular expression ({err})") from err
    return subsets


def json_safe(value):
    """NaN (an undefined figure) → None, so the card stays strict JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return None if isinstance(value, float) and np.isnan(value) else value


def _percent(value: float) -> str:
    return "n/a" if np.isnan(value) else f"{100 * value:.2f}"


def class_voxel_counts(predicted: np.ndarray, reference: np.ndarray, names: dict[int, str]) -> dict[str, int]:
    """nnU-Net's per-case ``n_ref``, ``n_pred`` and ``TP`` of each class, which tell a missed lesion
    (n_pred 0) from a false one (n_ref 0) where the Dice of both is 0."""
    counts = {}
    for value, name in names.items():
        in_reference, in_prediction = reference == value, predicted == value
        counts |= {f"n_ref_{name}": int(in_reference.sum()), f"n_pred_{name}": int(in_prediction.sum()),
                   f"tp_{name}": int(np.count_nonzero(in_reference & in_prediction))}
    return counts


def write_report(out: Path, rows: list[dict], dice_rows: list[dict], case_rows: list[dict], confusion: list[dict],
                 curves: dict, margin_mm: float, data_root: Path, usage_tables: dict[str, str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    tables = ((out / "ood.csv", rows), (out / "dice.csv", dice_rows), (out / "cases.csv", case_rows),
              (out / "confusion.csv", confusion))
    for path, table in tables:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in table for k in r)))
            writer.writeheader()
            writer.writerows(table)
    lines = [f"# Evaluation on {data_root.name}", "",
             f"OOD localisation: voxels of the test_inlier and test_ood cases, OOD label positive. 'organ' = "
             f"inside the organ and its lesions dilated by {margin_mm:g} mm; 'whole' = the whole volume. "
             "Case AUC: case score = mean raw score inside the predicted tumour, on the model grid (paper §4.2), "
             "test_ood vs "
             f"test_inlier cases. 'cases': '{ALL_CASES}' or a subset given with --subset. Values in %.", "",
             "| model | cases | score | AUROC organ | AUPR organ | FPR95 organ | AUROC whole | AUPR whole | FPR95 whole "
             "| case AUC |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['cases']} | {r['score']} | " + " | ".join(
            _percent(r[k]) for k in ("auroc_organ", "aupr_organ", "fpr95_organ", "auroc_whole", "aupr_whole",
                                          "fpr95_whole", "case_auc")) + " |")
    classes = [k for k in dice_rows[0] if k not in ("model", "cases")]
    lines += ["", "Dice (%) per class on the test cases (OOD voxels excluded; mean over cases where the class "
              "is present in the reference or the prediction):", "",
              "| model | cases | " + " | ".join(classes) + " |", "|---|---|" + "---|" * len(classes)]
    for r in dice_rows:
        lines.append(f"| {r['model']} | {r['cases']} | " + " | ".join(_percent(r[c]) for c in classes) + " |")
    lines += confusion_lines(confusion)
    for model, table in (usage_tables or {}).items():
        lines += ["", f"Query usage of {model} on the test cases (queries of the group that win any voxel / "
                  "queries in the group, and the share of voxels the group wins; argmax over queries of every "
                  "kMaX block, coarse to fine, and of the final R):", "", table]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    for kind, axes in (("roc", ("false positive rate", "true positive rate")), ("pr", ("recall", "precision"))):
        fig, ax = plt.subplots(figsize=(5, 5))
        models = list(dict.fromkeys(label.split("/")[0] for label in curves[kind]))
        scores = list(dict.fromkeys(label.split("/")[1] for label in curves[kind]))
        for label, (x, y) in curves[kind].items():  # colour = score, line style = model
            model, score = label.split("/")
            ax.plot(x, y, label=label, linewidth=1.2, color=f"C{scores.index(score) % 10}",
                    linestyle=("-", "--", ":", "-.")[models.index(model) % 4])
        ax.set_xlabel(axes[0])
        ax.set_ylabel(axes[1])
        ax.set_title(f"OOD localisation ({kind.upper()}, organ region)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"{kind}.png", dpi=110)
        plt.close(fig)


def confusion_lines(confusion: list[dict]) -> list[str]:
    """Report section: each reference class's voxels split over the predicted classes, in %."""
    if not confusion:
        return []
    predicted = [k for k in confusion[0] if k not in ("model", "cases", "reference", "voxels")]
    lines = ["", "Confusion (%): each reference class's voxels on the test cases (row) by the class the model "
             "predicts there (columns); 'unseen' is the OOD lesion type, which no model can name:", "",
             "| model | cases | reference | voxels | " + " | ".join(predicted) + " |",
             "|---|---|---|---|" + "---|" * len(predicted)]
    for r in confusion:
        share = [_percent(r[p] / r["voxels"]) if r["voxels"] else "n/a" for p in predicted]
        lines.append(f"| {r['model']} | {r['cases']} | {r['reference']} | {r['voxels']} | " + " | ".join(share) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="maxquery-evaluate", description=__doc__.replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="Decathlon dataset with test_inlier/test_ood")
    parser.add_argument("--model", required=True, type=Path, action="append", help="model folder (repeatable)")
    parser.add_argument("--out", required=True, type=Path, help="report folder (report.md, csv tables, curves)")
    parser.add_argument("--scores", default=",".join(SCORES), help="comma-separated registry scores (default: all)")
    parser.add_argument("--ood-label", type=int, default=None, help="default: dataset.json's ood_label")
    parser.add_argument("--margin-mm", type=float, default=ORGAN_MARGIN_MM,
                        help="the organ region is the organ and its lesions grown by this margin (default: %(default)s)")
    parser.add_argument("--mc-passes", type=int, default=8,
                        help="dropout passes of the mc_dropout score (default: %(default)s)")
    parser.add_argument("--overlap", type=float, default=0.5,
                        help="sliding-window overlap between patches, in [0, 1) (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    parser.add_argument("--subset", action="append", default=[], metavar="NAME=REGEX",
                        help="also report the cases whose id matches REGEX (repeatable), e.g. one scanner")
    parser.add_argument("--record-in-card", action="store_true",
                        help="store each model's figures in its model card (the 'metrics' entry)")
    args = parser.parse_args(argv)
    ood_label = args.ood_label
    if ood_label is None:
        ood_label = json.loads((args.data / "dataset.json").read_text()).get("ood_label")
    if ood_label is None:
        print("maxquery-evaluate: error: the dataset has no ood_label; pass --ood-label", file=sys.stderr)
        return 2
    try:
        subsets = parse_subsets(args.subset)
    except ValueError as err:
        print(f"maxquery-evaluate: error: {err}", file=sys.stderr)
        return 2
    rows, dice_rows, case_rows, confusion_table, curves = [], [], [], [], {"roc": {}, "pr": {}}
    usage_tables: dict[str, str] = {}
    for folder in args.model:
        names = scores_for(folder, args.scores.split(","))
        evaluation = evaluate_model(
            folder, args.data, names, ood_label, args.margin_mm, args.mc_passes, args.overlap, args.device, subsets)
        card, dice, usage = evaluation.card, evaluation.dice, evaluation.query_usage
        case_rows += evaluation.case_rows
        confusion_table += evaluation.confusion_rows
        for (subset, name), tally in evaluation.tallies.items():
            rows.append({"model": card.name, "cases": subset, "score": name, **tally.row()})
            if subset == ALL_CASES:
                curves["roc"][f"{card.name}/{name}"] = tally.voxels["organ"].roc_curve()
                curves["pr"][f"{card.name}/{name}"] = tally.voxels["organ"].pr_curve()
        dice_rows += [{"model": card.name, "cases": subset, **values} for subset, values in dice.items()]
        if usage is not None:
            usage_tables[card.name] = usage.table()
            for unused in usage.unused_groups():
                log.warning("%s: the %s queries win no voxel on the test cases", card.name, unused)
        if args.record_in_card:
            card.metrics = json_safe({"dataset": args.data.name, "margin_mm": args.margin_mm,
                                      "subsets": {name: pattern.pattern for name, pattern in subsets.items()},
                                      "ood": [r for r in rows if r["model"] == card.name], "dice": dice,
                                      **({"query_usage": usage.summary()} if usage else {})})
            write_model_card(folder, card)
    write_report(args.out, rows, dice_rows, case_rows, confusion_table, curves, args.margin_mm, args.data,
                 usage_tables)
    print((args.out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
