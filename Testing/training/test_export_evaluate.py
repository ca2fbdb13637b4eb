"""Train the tiny config, export a model folder, evaluate it: the researcher's path end to end."""

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from maxquery.inference import Predictor
from maxquery.inference.lesions import search_region
from maxquery.model_folder import load_model_folder, write_model_card
from maxquery.scores import sml_parameters
from maxquery_training import cli, evaluate
from maxquery_training.dataset import list_cases, read_case
from maxquery_training.regions import organ_region


@pytest.fixture(scope="module")
def exported(tiny_msd, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    assert cli.main(["train", "--config", "tiny", "--data", str(tiny_msd), "--work", str(work),
                     "--set", "stage1.epochs=1", "--set", "stage2.epochs=2"]) == 0
    out = work / "model"
    assert cli.main(["export", "--config", "tiny", "--data", str(tiny_msd), "--work", str(work),
                     "--out", str(out), "--set", "version=1.2.3"]) == 0
    return work, out


@pytest.fixture(scope="module")
def mc_dropout_model(exported, tiny_msd):
    work, _ = exported
    assert cli.main(["train", "--config", "tiny", "--data", str(tiny_msd), "--work", str(work),
                     "--baseline", "mc_dropout", "--set", "stage1.epochs=1"]) == 0
    assert cli.main(["export", "--config", "tiny", "--data", str(tiny_msd), "--work", str(work),
                     "--run", "mc_dropout", "--out", str(work / "mc_dropout_model")]) == 0
    return work / "mc_dropout_model"


def test_export_writes_a_calibrated_model_folder(exported, tiny_msd):
    work, out = exported
    loaded = load_model_folder(out)
    card = loaded.card
    assert card.architecture == "maxquery" and [c.name for c in card.classes] == ["background", "liver", "cyst", "hcc", "metastasis"]
    assert card.classes[1].terminology["type"]["code"] == "10200004"
    assert card.calibration.score == "maxquery"
    # fitted with the predictor's default settings, and the card says so (issue 10, item 9)
    assert card.calibration.conditions == {"spacing_zyx": list(card.spacing_zyx), "overlap": 0.5, "mirror": False}
    assert np.all(np.diff(card.calibration.values) >= 0)
    stats = card.sml_stats
    assert len(stats["mean"]) == 5 and stats["cases"] == 3  # every training case
    assert np.all(sml_parameters(stats)[1] > 0)
    assert all(stats["voxels"][i] >= 1000 for i in range(5) if i not in stats["fallback"])
    assert len({stats["std"][i] for i in stats["fallback"]}) <= 1  # the rare classes share the pooled values
    assert card.network.dropout == 0.0  # MaxQuery trains without dropout (paper: drop path only)
    assert card.training["epochs"] == 2 and card.training["qd_loss"] is True and card.name == "maxquery-tiny"
    assert card.version == "1.2.3"  # the config's, so that a retrained model is told apart
    decision = card.training["postprocessing"]  # nnU-Net's rule, on the validation case
    assert decision["validation_cases"] == 1
    assert card.keep_largest_component == (decision["validation_dice_with"] > decision["validation_dice_without"])
    chosen = decision["validation_dice_with" if card.keep_largest_component else "validation_dice_without"]
    assert card.one_type_per_lesion == (decision["validation_dice_one_type_per_lesion"] > chosen)
    # exporting again without --overwrite refuses and keeps the folder
    assert cli.main(["export", "--config", "tiny", "--data", str(tiny_msd), "--work", str(work), "--out", str(out)]) == 2
    assert load_model_folder(out).card.calibration == card.calibration


def test_mc_dropout_baseline_is_its_own_model(exported, mc_dropout_model):
    work, _ = exported
    card = load_model_folder(mc_dropout_model).card
    assert card.training["baseline"] == "mc_dropout" and "MC-dropout baseline" in card.description
    assert card.architecture == "plain" and card.network.dropout == 0.1 and card.name == "maxquery-tiny-mc-dropout"
    assert card.calibration.score == "mc_dropout"
    assert (work / "mc_dropout" / "checkpoint.pt").is_file() and (work / "stage1" / "checkpoint.pt").is_file()


def test_dropout_in_the_network_config_is_refused(tiny_msd, tmp_path, capsys):
    assert cli.main(["train", "--config", "tiny", "--data", str(tiny_msd), "--work", str(tmp_path / "w"),
                     "--set", "network.dropout=0.1"]) == 2
    assert "mc_dropout.dropout" in capsys.readouterr().err and not (tmp_path / "w").exists()


def test_evaluate_writes_the_tables(exported, mc_dropout_model, tiny_msd, tmp_path, capsys):
    work, model = exported
    assert cli.main(["export", "--config", "tiny", "--data", str(tiny_msd), "--work", str(work),
                     "--run", "stage1", "--out", str(work / "plain")]) == 0
    assert load_model_folder(work / "plain").card.network.dropout == 0.0  # the nnU-Net baseline: no dropout
    report = tmp_path / "report"
    assert evaluate.main(["--data", str(tiny_msd), "--model", str(model), "--model", str(work / "plain"),
                          "--model", str(mc_dropout_model), "--out", str(report), "--mc-passes", "2",
                          "--record-in-card", "--subset", "ood=_005$"]) == 0
    assert "no mc_dropout score for maxquery-tiny: it is not an MC-dropout baseline" in capsys.readouterr().err
    rows = [r for r in csv.DictReader(open(report / "ood.csv")) if r["cases"] == "all"]
    maxquery_scores = {r["score"] for r in rows if r["model"] == "maxquery-tiny"}
    plain_scores = {r["score"] for r in rows if r["model"] == "maxquery-tiny-plain"}
    assert maxquery_scores == {"maxquery", "maxquery_post", "msp", "maxlogit", "sml"}
    assert plain_scores == {"msp", "maxlogit", "sml"}
    assert {r["score"] for r in rows if r["model"] == "maxquery-tiny-mc-dropout"} == {"mc_dropout"}
    for row in rows:
        for key in ("auroc_organ", "aupr_organ", "fpr95_organ", "auroc_whole", "case_auc"):
            assert 0.0 <= float(row[key]) <= 1.0
    all_dice = list(csv.DictReader(open(report / "dice.csv")))
    dice = [d for d in all_dice if d["cases"] == "all"]
    assert {d["model"] for d in dice} == {"maxquery-tiny", "maxquery-tiny-plain", "maxquery-tiny-mc-dropout"}
    assert float(dice[0]["liver"]) > 0  # the liver is large enough to be partly found even by a tiny model
    cases = list(csv.DictReader(open(report / "cases.csv")))
    mine = [c for c in cases if c["model"] == "maxquery-tiny"]
    assert len(mine) == len(cases) // 3 and {c["ood_case"] for c in mine} == {"True", "False"}
    livers = [float(c["dice_liver"]) for c in mine if c["dice_liver"] != "nan"]
    assert np.mean(livers) == pytest.approx(float(dice[0]["liver"]))  # the table is the mean of the rows
    assert float(mine[0]["case_score_maxquery"]) == float(mine[0]["case_score_maxquery"])  # a number, not NaN
    assert [c["case_score_maxquery"] for c in cases if c["model"] == "maxquery-tiny-plain"][0] == ""
    # each row's voxel counts are the case's own (OOD voxels excluded) and give its Dice
    first = next(c for c in list_cases(tiny_msd, "test_ood") if c.case_id == mine[-1]["case"])
    first_reference = sitk.GetArrayFromImage(read_case(first)[1])
    assert int(mine[-1]["n_ref_liver"]) == int((first_reference == 1).sum()) > 0
    for row in mine:
        n_ref, n_pred, tp = (int(row[f"{k}_liver"]) for k in ("n_ref", "n_pred", "tp"))
        assert 0 <= tp <= min(n_ref, n_pred)
        if n_ref + n_pred:
            assert float(row["dice_liver"]) == pytest.approx(2 * tp / (n_ref + n_pred))
    # the subset holds the one OOD case: its Dice row is that case's row
    subset_liver = [d["liver"] for d in all_dice if d["cases"] == "ood" and d["model"] == "maxquery-tiny"]
    assert subset_liver == [c["dice_liver"] for c in mine if c["case"] == "tiny_005"]
    # confusion: every reference voxel counted once; on the one-case subset the liver cells give its Dice
    confusion = [r for r in csv.DictReader(open(report / "confusion.csv")) if r["model"] == "maxquery-tiny"]
    ood_case = {r["reference"]: r for r in confusion if r["cases"] == "ood"}
    assert list(ood_case) == ["background", "liver", "cyst", "hcc", "metastasis", "unseen"]
    ood_case_files = [c for c in list_cases(tiny_msd, "test_ood") if c.case_id == "tiny_005"]
    reference = sitk.GetArrayFromImage(read_case(ood_case_files[0])[1])
    assert int(ood_case["unseen"]["voxels"]) == int((reference == 9).sum()) > 0
    assert int(ood_case["liver"]["voxels"]) == int((reference == 1).sum())
    true_liver = int(ood_case["liver"]["liver"])
    predicted_liver = sum(int(r["liver"]) for name, r in ood_case.items() if name != "unseen")
    assert 2 * true_liver / (predicted_liver + int(ood_case["liver"]["voxels"])) == pytest.approx(float(subset_liver[0]))
    text = (report / "report.md").read_text()
    assert "Confusion (%)" in text and "| maxquery-tiny | ood | unseen |" in text
    assert "| maxquery-tiny | all | maxquery |" in text and "| maxquery-tiny | ood | maxquery |" in text
    assert (report / "roc.png").stat().st_size > 1000 and (report / "pr.png").stat().st_size > 1000
    recorded = load_model_folder(model).card.metrics
    assert {r["score"] for r in recorded["ood"] if r["cases"] == "all"} == maxquery_scores
    assert recorded["dice"]["all"]["liver"] == pytest.approx(float(dice[0]["liver"]))
    assert recorded["subsets"] == {"ood": "_005$"}
    # query usage of the MaxQuery model on the test cases: every stage, the three groups, in the card too
    assert "Query usage of maxquery-tiny on the test cases" in text and "| final |" in text
    usage = recorded["query_usage"]
    assert list(usage) == ["block1", "block2", "final"]
    assert sum(g["voxel_share"] for g in usage["final"].values()) == pytest.approx(1.0)
    assert "query_usage" not in load_model_folder(work / "plain").card.metrics
    json.loads((model / "model_card.json").read_text(), parse_constant=pytest.fail)  # strict JSON: no NaN


def test_evaluate_refuses_a_malformed_subset(exported, tiny_msd, tmp_path, capsys):
    _, model = exported
    assert evaluate.main(["--data", str(tiny_msd), "--model", str(model), "--out", str(tmp_path / "r"),
                          "--subset", "A_only"]) == 2
    assert "NAME=REGEX" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_evaluation_is_repeatable_including_mc_dropout(exported, mc_dropout_model, tiny_msd, tmp_path):
    _, model = exported
    tables = []
    for run in ("first", "second"):
        assert evaluate.main(["--data", str(tiny_msd), "--model", str(model), "--model", str(mc_dropout_model),
                              "--out", str(tmp_path / run), "--scores", "maxquery,mc_dropout", "--mc-passes", "2"]) == 0
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


def test_case_score_has_one_definition(exported, tiny_msd, tmp_path):
    """The predictor's raw case scores (model grid) are what the evaluation ranks; the case score a
    user sees is the calibrated value of the same number."""
    _, model = exported
    case = list_cases(tiny_msd, "test_inlier")[0]
    result = Predictor(model, device="cpu", scores=("maxquery", "msp")).predict(read_case(case)[0])
    card = load_model_folder(model).card
    assert result.case_score == pytest.approx(float(card.calibration(np.asarray(result.case_scores["maxquery"]))))
    assert result.summary()["raw_case_scores"] == result.case_scores
    assert evaluate.main(["--data", str(tiny_msd), "--model", str(model), "--out", str(tmp_path / "r"),
                          "--scores", "maxquery,msp"]) == 0
    row = next(r for r in csv.DictReader(open(tmp_path / "r" / "cases.csv")) if r["case"] == case.case_id)
    assert float(row["case_score_maxquery"]) == pytest.approx(result.case_scores["maxquery"], rel=1e-6)
    assert float(row["case_score_msp"]) == pytest.approx(result.case_scores["msp"], rel=1e-6)


def test_lesion_search_and_organ_region_share_one_margin(tiny_msd):
    """The lesion search looks exactly where the calibration was fitted and the evaluation scores."""
    label = read_case(list_cases(tiny_msd, "training")[0])[1]
    array = sitk.GetArrayFromImage(label)
    spacing = tuple(reversed(label.GetSpacing()))
    evaluated = organ_region(array, [1, 2, 3, 4], spacing)
    assert evaluated.sum() > (array > 0).sum()  # a real margin
    np.testing.assert_array_equal(search_region(array, spacing), evaluated)


def test_mc_dropout_can_fine_tune_from_stage1(exported, tiny_msd, tmp_path):
    import shutil

    work, _ = exported
    fine = tmp_path / "work"
    shutil.copytree(work, fine, ignore=shutil.ignore_patterns("mc_dropout*", "stage2*", "model"))
    # at a vanishing learning rate the baseline keeps the stage-1 weights it starts from
    assert cli.main(["train", "--config", "tiny", "--data", str(tiny_msd), "--work", str(fine), "--baseline", "mc_dropout",
                     "--set", "mc_dropout.from_stage1=true", "--set", "mc_dropout.epochs=1",
                     "--set", "mc_dropout.learning_rate=1e-12"]) == 0
    stage1 = torch.load(fine / "stage1" / "checkpoint.pt", weights_only=True)
    tuned = torch.load(fine / "mc_dropout" / "checkpoint.pt", weights_only=True)
    assert len(tuned["history"]) == 1
    for key, value in stage1["model"].items():
        torch.testing.assert_close(tuned["model"][key], value, rtol=0, atol=1e-6)
    assert cli.main(["export", "--config", "tiny", "--data", str(tiny_msd), "--work", str(fine), "--run", "mc_dropout",
                     "--set", "mc_dropout.from_stage1=true", "--set", "mc_dropout.epochs=1",
                     "--out", str(fine / "model")]) == 0
    assert load_model_folder(fine / "model").card.training["fine_tuned_from_stage1"] is True


def test_mc_dropout_fine_tuning_needs_stage1_and_epochs(tiny_msd, tmp_path, capsys):
    assert cli.main(["train", "--config", "tiny", "--data", str(tiny_msd), "--work", str(tmp_path / "w"),
                     "--baseline", "mc_dropout", "--set", "mc_dropout.from_stage1=true"]) == 2
    assert "mc_dropout.epochs" in capsys.readouterr().err
    assert cli.main(["train", "--config", "tiny", "--data", str(tiny_msd), "--work", str(tmp_path / "w"),
                     "--baseline", "mc_dropout", "--set", "mc_dropout.from_stage1=true",
                     "--set", "mc_dropout.epochs=1"]) == 2
    assert "run stage 1 first" in capsys.readouterr().err


def test_sml_statistics_can_use_fewer_training_cases(exported, tiny_msd, tmp_path):
    work, _ = exported
    assert cli.main(["export", "--config", "tiny", "--data", str(tiny_msd), "--work", str(work), "--run", "stage1",
                     "--set", "training_cases_for_sml=1", "--set", "validation_cases_for_calibration=1",
                     "--out", str(tmp_path / "plain")]) == 0
    assert load_model_folder(tmp_path / "plain").card.sml_stats["cases"] == 1


def _export(train_args, out):
    assert cli.main(["export", *train_args, "--out", str(out)]) == 0
    return out


def test_stage2_can_fine_tune_from_a_model_folder(exported, tiny_msd, tmp_path):
    """nnU-Net's -pretrained_weights: no stage 1 in the new work folder; the card names the start."""
    _, model = exported
    fine = tmp_path / "work"
    # at a vanishing learning rate the run keeps the weights of the model folder it starts from
    args = ["--config", "tiny", "--data", str(tiny_msd), "--work", str(fine), "--set", "stage2.epochs=1",
            "--set", "stage2.learning_rate=1e-12", "--set", "stage2.freeze_backbone_epochs=0"]
    assert cli.main(["train", *args, "--stage", "2", "--init-from", str(model)]) == 0
    start = load_model_folder(model)
    tuned = load_model_folder(_export(args, fine / "model"))
    for key, value in start.network.state_dict().items():
        torch.testing.assert_close(tuned.network.state_dict()[key], value, rtol=0, atol=1e-6)
    assert tuned.card.training["initialized_from"]["model"] == start.card.name
    assert tuned.card.training["initialized_from"]["weights_sha256"] == start.card.weights_sha256
    assert tuned.card.training["epochs"] == 1


def test_fine_tuning_refuses_a_model_for_other_input(exported, mc_dropout_model, tiny_msd, tmp_path, capsys):
    _, model = exported
    base = ["train", "--config", "tiny", "--data", str(tiny_msd), "--set", "stage2.epochs=1"]
    assert cli.main([*base, "--work", str(tmp_path / "a"), "--stage", "2", "--init-from", str(mc_dropout_model)]) == 2
    assert "not a MaxQuery one" in capsys.readouterr().err
    assert cli.main([*base, "--work", str(tmp_path / "b"), "--stage", "2", "--init-from", str(model),
                     "--set", "data.ct_window=[-100, 200]"]) == 2
    assert "CT normalisation" in capsys.readouterr().err
    assert not (tmp_path / "b" / "stage2").exists()
    assert cli.main([*base, "--work", str(tmp_path / "c"), "--init-from", str(model)]) == 2
    assert "use it with --stage 2" in capsys.readouterr().err


def test_postprocessing_is_decided_again_for_a_model_folder(exported, tiny_msd, tmp_path, capsys):
    """maxquery-postprocess rewrites the card alone: the decision, from the validation labels."""
    import shutil

    from maxquery_training import postprocessing

    model = shutil.copytree(exported[1], tmp_path / "model")
    card = load_model_folder(model).card
    card.keep_largest_component = not card.keep_largest_component
    card.one_type_per_lesion = not card.one_type_per_lesion
    card.sml_stats = card.sml_stats | {"mean": [0.0] * len(card.sml_stats["mean"])}  # stale statistics
    card.training.pop("postprocessing")
    write_model_card(model, card)
    assert postprocessing.main(["--data", str(tiny_msd), "--model", str(model)]) == 0
    decided = load_model_folder(model).card  # the weights still match the card's digest
    assert decided.keep_largest_component == load_model_folder(exported[1]).card.keep_largest_component
    assert decided.one_type_per_lesion == load_model_folder(exported[1]).card.one_type_per_lesion
    assert decided.training["postprocessing"] == load_model_folder(exported[1]).card.training["postprocessing"]
    exported_stats = load_model_folder(exported[1]).card.sml_stats  # gathered again under the decision
    assert decided.sml_stats["cases"] == exported_stats["cases"]
    np.testing.assert_allclose(decided.sml_stats["mean"], exported_stats["mean"], rtol=1e-5)
    printed = capsys.readouterr().out
    assert "only the largest foreground region" in printed and "each lesion one type" in printed
    assert "SML statistics gathered again" in printed
    assert postprocessing.main(["--data", str(tmp_path / "nothing"), "--model", str(model)]) == 2
    assert "maxquery-postprocess: error:" in capsys.readouterr().err


def test_a_missing_start_folder_is_refused_before_any_preprocessing(tiny_msd, tmp_path, capsys):
    work = tmp_path / "w"
    assert cli.main(["train", "--config", "tiny", "--data", str(tiny_msd), "--work", str(work), "--stage", "2",
                     "--init-from", str(tmp_path / "no_model")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not work.exists()
