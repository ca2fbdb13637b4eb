"""Train the tiny config, export a model folder, evaluate it: the researcher's path end to end."""

import csv
import json

import numpy as np
import pytest

from maxquery.model_folder import load_model_folder
from maxquery_training import cli, evaluate


@pytest.fixture(scope="module")
def exported(tiny_msd, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    assert cli.main(["train", "--config", "tiny", "--data", str(tiny_msd), "--work", str(work),
                     "--set", "stage1.epochs=1", "--set", "stage2.epochs=2"]) == 0
    out = work / "model"
    assert cli.main(["export", "--config", "tiny", "--data", str(tiny_msd), "--work", str(work),
                     "--out", str(out)]) == 0
    return work, out


def test_export_writes_a_calibrated_model_folder(exported, tiny_msd):
    work, out = exported
    loaded = load_model_folder(out)
    card = loaded.card
    assert card.architecture == "maxquery" and [c.name for c in card.classes] == ["background", "liver", "cyst", "hcc", "metastasis"]
    assert card.classes[1].terminology["type"]["code"] == "10200004"
    assert card.calibration.score == "maxquery"
    assert np.all(np.diff(card.calibration.values) >= 0)
    assert len(card.sml_stats["mean"]) == 5 and all(s > 0 for s in card.sml_stats["std"])
    assert card.training["epochs"] == 2 and card.training["qd_loss"] is True and card.name == "maxquery-tiny"
    # exporting again without --overwrite refuses and keeps the folder
    assert cli.main(["export", "--config", "tiny", "--data", str(tiny_msd), "--work", str(work), "--out", str(out)]) == 2
    assert load_model_folder(out).card.calibration == card.calibration


def test_evaluate_writes_the_tables(exported, tiny_msd, tmp_path):
    work, model = exported
    assert cli.main(["export", "--config", "tiny", "--data", str(tiny_msd), "--work", str(work),
                     "--run", "stage1", "--out", str(work / "plain")]) == 0
    report = tmp_path / "report"
    assert evaluate.main(["--data", str(tiny_msd), "--model", str(model), "--model", str(work / "plain"),
                          "--out", str(report), "--mc-passes", "2", "--record-in-card", "--subset", "ood=_005$"]) == 0
    rows = [r for r in csv.DictReader(open(report / "ood.csv")) if r["cases"] == "all"]
    maxquery_scores = {r["score"] for r in rows if r["model"] == "maxquery-tiny"}
    plain_scores = {r["score"] for r in rows if r["model"] == "maxquery-tiny-plain"}
    assert maxquery_scores == {"maxquery", "maxquery_post", "msp", "maxlogit", "sml", "mc_dropout"}
    assert plain_scores == {"msp", "maxlogit", "sml", "mc_dropout"}
    for row in rows:
        for key in ("auroc_organ", "aupr_organ", "fpr95_organ", "auroc_whole", "case_auc"):
            assert 0.0 <= float(row[key]) <= 1.0
    all_dice = list(csv.DictReader(open(report / "dice.csv")))
    dice = [d for d in all_dice if d["cases"] == "all"]
    assert {d["model"] for d in dice} == {"maxquery-tiny", "maxquery-tiny-plain"}
    assert float(dice[0]["liver"]) > 0  # the liver is large enough to be partly found even by a tiny model
    cases = list(csv.DictReader(open(report / "cases.csv")))
    mine = [c for c in cases if c["model"] == "maxquery-tiny"]
    assert len(mine) == len(cases) // 2 and {c["ood_case"] for c in mine} == {"True", "False"}
    livers = [float(c["dice_liver"]) for c in mine if c["dice_liver"] != "nan"]
    assert np.mean(livers) == pytest.approx(float(dice[0]["liver"]))  # the table is the mean of the rows
    assert float(mine[0]["case_score_maxquery"]) == float(mine[0]["case_score_maxquery"])  # a number, not NaN
    assert [c["case_score_maxquery"] for c in cases if c["model"] == "maxquery-tiny-plain"][0] == ""
    # the subset holds the one OOD case: its Dice row is that case's row
    subset_liver = [d["liver"] for d in all_dice if d["cases"] == "ood" and d["model"] == "maxquery-tiny"]
    assert subset_liver == [c["dice_liver"] for c in mine if c["case"] == "tiny_005"]
    text = (report / "report.md").read_text()
    assert "| maxquery-tiny | all | maxquery |" in text and "| maxquery-tiny | ood | maxquery |" in text
    assert (report / "roc.png").stat().st_size > 1000 and (report / "pr.png").stat().st_size > 1000
    recorded = load_model_folder(model).card.metrics
    assert {r["score"] for r in recorded["ood"] if r["cases"] == "all"} == maxquery_scores
    assert recorded["dice"]["all"]["liver"] == pytest.approx(float(dice[0]["liver"]))
    assert recorded["subsets"] == {"ood": "_005$"}
    json.loads((model / "model_card.json").read_text(), parse_constant=pytest.fail)  # strict JSON: no NaN


def test_evaluate_refuses_a_malformed_subset(exported, tiny_msd, tmp_path, capsys):
    _, model = exported
    assert evaluate.main(["--data", str(tiny_msd), "--model", str(model), "--out", str(tmp_path / "r"),
                          "--subset", "A_only"]) == 2
    assert "NAME=REGEX" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_evaluation_is_repeatable_including_mc_dropout(exported, tiny_msd, tmp_path):
    _, model = exported
    tables = []
    for run in ("first", "second"):
        assert evaluate.main(["--data", str(tiny_msd), "--model", str(model), "--out", str(tmp_path / run),
                              "--scores", "maxquery,mc_dropout", "--mc-passes", "2"]) == 0
        tables.append((tmp_path / run / "ood.csv").read_text())
    assert "mc_dropout" in tables[0] and tables[0] == tables[1]


def test_export_of_an_untrained_run_says_what_to_do(exported, tiny_msd, tmp_path, capsys):
    work, _ = exported
    assert cli.main(["export", "--config", "tiny", "--data", str(tiny_msd), "--work", str(tmp_path / "empty"),
                     "--out", str(tmp_path / "model")]) == 2
    assert "holds no training" in capsys.readouterr().err
    assert not (tmp_path / "empty").exists() and not (tmp_path / "model").exists()  # nothing made on the way
    assert cli.main(["export", "--config", "tiny", "--data", str(tiny_msd), "--work", str(work),
                     "--run", "stage2_noqd", "--out", str(tmp_path / "model")]) == 2
    assert "train the 'stage2_noqd' run first" in capsys.readouterr().err and not (tmp_path / "model").exists()
