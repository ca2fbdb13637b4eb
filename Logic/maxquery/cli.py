"""``maxquery segment INPUT --model DIR --out DIR``: the Slicer-free command line.

INPUT is a NIfTI/NRRD/MHA file, a DICOM series folder, or a folder of such cases (processed one
by one). User errors end with a one-line message and a non-zero exit status; nothing of a failed
case is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from . import __version__
from .errors import MaxQueryError, RunCancelled
from .inference import Predictor
from .inference.writer import check_free, planned_outputs, write_outputs
from .io import case_name, dicom_series, is_image_file, read_image, validate_ct
from .model_folder import ModelFolderError
from .scores import SCORES

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def find_cases(path: Path) -> list[tuple[str, Path]]:
    """(name, path) of every case INPUT stands for."""
    if path.is_file():
        return [(case_name(path), path)]
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist")
    if dicom_series(path):
        return [(path.name, path)]
    cases = [(case_name(p), p) for p in sorted(path.iterdir()) if is_image_file(p)]
    cases += [(p.name, p) for p in sorted(path.iterdir()) if p.is_dir() and dicom_series(p)]
    if not cases:
        raise FileNotFoundError(f"{path} holds no image file and no DICOM series")
    return cases


def _score_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCORES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown score(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(SCORES)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maxquery", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"maxquery {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    seg = commands.add_parser("segment", help="segment CT(s) and write labels, anomaly maps and a summary")
    seg.add_argument("input", type=Path, help="NIfTI/NRRD/MHA file, DICOM series folder, or a folder of cases")
    seg.add_argument("--model", type=Path, required=True, help="model folder (model_card.json + model.safetensors)")
    seg.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    seg.add_argument("--scores", type=_score_list, default=["maxquery"],
                     help=f"comma-separated raw scores to write, from: {', '.join(SCORES)} (default: maxquery)")
    seg.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    seg.add_argument("--fast", action="store_true", help="run at twice the model spacing (about 8x faster, coarser)")
    seg.add_argument("--png", action="store_true", help="also write a review picture")
    seg.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    seg.add_argument("--threshold", type=float, default=0.99,
                     help="calibrated anomaly threshold for the lesion table (0.99: ~1%% of inlier organ voxels above)")
    seg.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1) (default 0.5)")
    seg.add_argument("--mirror", action="store_true", help="average over the axis flips the model was trained with (up to 8x slower)")
    seg.add_argument("--batch-size", type=int, default=2, help="patches per forward pass (default 2)")
    return parser


def _segment(args: argparse.Namespace) -> int:
    cases = find_cases(args.input)
    predictor = Predictor(args.model, device=args.device, fast=args.fast, scores=args.scores,
                          overlap=args.overlap, mirror=args.mirror, batch_size=args.batch_size)
    if predictor.fell_back_to_cpu and args.device != "auto":
        print(f"maxquery: no {args.device} device is available; running on the CPU", file=sys.stderr)
    score_names = [s.name for s in predictor.scores]
    failures = 0
    for name, path in cases:
        paths = planned_outputs(args.out, name, score_names, args.png)
        try:
            check_free(paths, args.overwrite)
            image = read_image(path)
            validate_ct(image)  # before the progress bar, so a refusal is one clean line
            with tqdm(total=100, desc=name, unit="%", bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}",
                      file=sys.stderr, leave=False) as bar:
                def progress(fraction: float, stage: str) -> None:
                    bar.set_description(f"{name} ({stage})")
                    bar.update(max(0.0, 100 * fraction - bar.n))

                result = predictor.predict(image, progress=progress, anomaly_threshold=args.threshold)
            written = write_outputs(result, args.out, name, overwrite=args.overwrite, png=args.png)
        except (MaxQueryError, FileExistsError, ValueError) as err:
            if isinstance(err, RunCancelled) or len(cases) == 1:
                raise
            print(f"maxquery: {name}: {err}", file=sys.stderr)
            failures += 1
            continue
        print(f"{name}: case score {result.case_score:.3f}, {len(result.lesions)} region(s), "
              f"{result.timings['total']:.1f} s on {result.device} -> {written['summary'].parent}")
        for note in result.notes:
            print(f"  note: {note}")
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _segment(args)
    except KeyboardInterrupt:
        print("maxquery: interrupted; nothing of the current case was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (MaxQueryError, ModelFolderError, FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"maxquery: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
