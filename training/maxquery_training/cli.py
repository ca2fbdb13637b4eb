"""``maxquery-train``: preprocess, train both stages, and export a model folder.

    maxquery-train train  --config cpu_demo --data DATASET --work WORK [--no-qd] [--stage 1|2|all]
    maxquery-train train  --config cpu_demo --data DATASET --work WORK --baseline mc_dropout
    maxquery-train train  --config cpu_demo --data DATASET --work WORK --stage 2 --init-from MODEL_DIR
    maxquery-train export --config cpu_demo --data DATASET --work WORK --out MODEL_DIR [--run stage2]

Several GPUs (or CPU processes): ``torchrun --nproc_per_node 2 -m maxquery_training.cli train ...``.
Running ``train`` again resumes from the last checkpoint of each stage.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from maxquery.model_folder import read_model_card

from .config import load_config, read_yaml
from .dataset import DataError
from .distributed import init_distributed, shutdown
from .pipeline import MC_DROPOUT_RUN, load_split, make_plan, patch_validation, read_plan, train_stage1, train_stage2


def _parse_override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {text!r}")
    return key, read_yaml(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maxquery-train", description=__doc__.replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("train", "export"):
        p = sub.add_parser(name)
        p.add_argument("--config", required=True, help="YAML file or bundled name (paper, cpu_demo, tiny)")
        p.add_argument("--data", required=True, type=Path, help="Decathlon-layout dataset folder")
        p.add_argument("--work", required=True, type=Path, help="work directory (cache, checkpoints)")
        p.add_argument("--set", action="append", default=[], type=_parse_override, metavar="KEY=VALUE",
                       help="override a config value, e.g. --set stage2.epochs=5")
        p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                       help="where to train: auto (CUDA if available, else the CPU), cpu or cuda (default: auto)")
    train = sub.choices["train"]
    train.add_argument("--stage", default="all", choices=("1", "2", "all"),
                       help="1: pre-train the backbone; 2: train MaxQuery on it; all: both (default: all)")
    train.add_argument("--no-qd", action="store_true", help="ablation: stage 2 without the QD loss (folder stage2_noqd)")
    train.add_argument("--init-from", type=Path, metavar="MODEL_DIR",
                       help="stage 2 only: start from this MaxQuery model folder's weights instead of the stage-1 "
                            "backbone (fine-tuning; same config and spacing)")
    train.add_argument("--baseline", choices=(MC_DROPOUT_RUN,),
                       help="train only this baseline: the plain network with mc_dropout.dropout (folder mc_dropout)")
    export = sub.choices["export"]
    export.add_argument("--out", required=True, type=Path, help="model folder to write")
    export.add_argument("--run", default="stage2", choices=("stage2", "stage2_noqd", "stage1", MC_DROPOUT_RUN),
                        help="run folder in WORK to export: MaxQuery, MaxQuery without QD loss, plain backbone, "
                             "MC-dropout baseline")
    export.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    overrides = dict(args.set)
    if getattr(args, "no_qd", False):
        overrides["qd_loss"] = False
    try:
        if getattr(args, "init_from", None) and (args.stage != "2" or args.baseline):
            raise ValueError("--init-from fine-tunes MaxQuery from a model folder: use it with --stage 2 (and no "
                             "--baseline)")
        if getattr(args, "init_from", None):
            read_model_card(args.init_from)  # a missing or corrupt folder is refused before any preprocessing
        config = load_config(args.config, overrides)
        dist_info = init_distributed(args.device)
        if args.command == "train":
            plan = make_plan(config, args.data, args.work, dist_info)
            cases = load_split(config, args.data, args.work, plan, "training", dist_info).cases
            validation = patch_validation(config, args.data, args.work, plan, dist_info)
            if args.baseline:
                train_stage1(config, plan, cases, args.work, dist_info, validation, run=args.baseline)
            if args.stage in ("1", "all") and not args.baseline:
                train_stage1(config, plan, cases, args.work, dist_info, validation)
            if args.stage in ("2", "all") and not args.baseline:
                train_stage2(config, plan, cases, args.work, dist_info, tag="" if config.qd_loss else "noqd",
                             validation=validation, init_from=args.init_from)
        else:
            from .export import export_model

            export_model(config, args.data, args.work, read_plan(args.work, config), args.run, args.out, args.overwrite,
                         args.device)
        shutdown(dist_info)
    except (DataError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"maxquery-train: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
