"""maxquery segment: the Slicer-free command line.

Everything that can be checked is checked before the first case is computed: the options, the
output folder, the model folder, the case names, and every case's header (geometry, memory).
A user error ends with a one-line message and no traceback; nothing of a failed case is written.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import signal
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import SimpleITK as sitk

from . import __version__
from .cases import Case, find_cases
from .errors import (
    InputError, MaxQueryError, OutputError, ResourceError, RunCancelled, UsageError, WriteFailed,
)
from .inference import Predictor
from .inference.resources import MemoryEstimate, check_fits, estimate_memory
from .precision import PRECISIONS
from .inference.writer import check_free, planned_outputs, remove_stale_staging, write_outputs
from .io import ImageInfo, inspect_image, read_image, validate_ct
from .progress import KINDS as PROGRESS_KINDS, reporter
from .scores import SCORES

EXIT_OK = 0
EXIT_INTERNAL_ERROR = 1
EXIT_USER_ERROR = 2
EXIT_RESOURCES = 3
EXIT_INTERRUPTED = 130  # 128 + the signal's number: 130 for Ctrl-C (SIGINT), 143 for SIGTERM

DESCRIPTION = """\
Segment CT volumes with a MaxQuery model and localise what the model has never seen.
INPUT is a NIfTI/NRRD/MHA file, a folder holding a DICOM series, or a folder of cases (image
files and DICOM series, in the folder itself or one level below); every DICOM series is a case
of its own."""

EPILOG = """\
outputs, per case NAME (the file name without suffix, or the DICOM folder's name, plus
_seriesN when the folder holds several series):
  NAME_labels.nii.gz            labels (uint8, the model card's label values), on the input grid
  NAME_labels.seg.nrrd          the same as a 3D Slicer segmentation, with names and colours
  NAME_anomaly.nii.gz           calibrated anomaly score, 0-1, in the lesion search region, 0 elsewhere
                                (uint16 codes with scl_slope 1e-4; readers return floats)
  NAME_anomaly_SCORE.nii.gz     with --raw-maps: each raw score of --scores, higher = more anomalous
                                (float32, every voxel)
  NAME_summary.json             input path and DICOM SeriesInstanceUID, case score, lesion
                                table, model, warnings, timings
  NAME_review.png               a review picture (with --png)
Existing outputs are kept unless --overwrite. A case is written whole or not at all.

exit codes:
  0    every case was segmented and written
  1    internal error (a bug: the message ends with a traceback to report)
  2    bad input or usage: options, input file or folder, model folder, output folder;
       in folder mode, at least one case was refused (the others were written)
  3    not enough memory, or writing failed (disk full); in folder mode, for at least one case
  130  interrupted by Ctrl-C (SIGINT); 143 by SIGTERM. Nothing of the current case is kept."""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The default in every option's help that has one; description and epilog as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False):
            return action.help or ""
        return super()._get_help_string(action)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ----------------------------------------------------------------------------- option types

def _score_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCORES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown score(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(SCORES)}")
    return names


def _device(text: str) -> str:
    name = text.strip().lower()
    if name in ("auto", "cpu", "cuda", "mps") or (name.startswith("cuda:") and name[5:].isdigit()):
        return name
    raise argparse.ArgumentTypeError(f"unknown device {text!r}; choose auto, cpu, cuda, cuda:N (a GPU's index) or mps")


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _threshold(text: str) -> float:
    value = _number(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a calibrated score: give a value in (0, 1], e.g. 0.99")
    return value


def _overlap(text: str) -> float:
    value = _number(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 1): 0 means no overlap, 0.5 half a patch")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive whole number (1 or more)")
    return value


# ----------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maxquery", description=DESCRIPTION.splitlines()[0], formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"maxquery {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    seg = commands.add_parser("segment", help="segment CT(s) and write labels, anomaly maps and a summary",
                              description=DESCRIPTION, epilog=EPILOG, formatter_class=_Formatter)
    _add_input_output_arguments(seg.add_argument_group("input and output"))
    _add_output_arguments(seg.add_argument_group("what is written"))
    _add_inference_arguments(seg.add_argument_group("inference"))
    return parser


def _add_input_output_arguments(group) -> None:
    group.add_argument("input", nargs="?", type=Path, metavar="INPUT", help="the case(s) to segment (or use -i)")
    group.add_argument("-i", "--input", dest="input_option", type=Path, metavar="INPUT", help="same as INPUT")
    group.add_argument("-m", "--model", type=Path, required=True, help="model folder (model_card.json + model.safetensors)")
    group.add_argument("-o", "--out", type=Path, required=True,
                       help="output folder (created if missing; must not be the input folder)")
    group.add_argument("--overwrite", action="store_true", help="replace existing outputs of the same cases")


def _add_output_arguments(group) -> None:
    group.add_argument("--scores", type=_score_list, default="maxquery",
                       help=f"comma-separated raw scores for --raw-maps, from: {', '.join(SCORES)}")
    group.add_argument("--raw-maps", action="store_true",
                       help="also write each --scores map raw, float32, every voxel (large: ~4 bytes per voxel)")
    group.add_argument("--threshold", type=_threshold, default=0.99,
                       help="calibrated anomaly threshold for the lesion table, in (0, 1]: 0.99 flags about 1%% of "
                            "inlier organ voxels")
    group.add_argument("--png", action="store_true", help="also write a review picture")
    group.add_argument("--progress", choices=PROGRESS_KINDS, default="bar",
                       help="bar: a progress bar on stderr; json: one JSON object per line on stdout (for a parent "
                            "process, see maxquery/progress.py)")


def _add_inference_arguments(group) -> None:
    group.add_argument("--device", type=_device, default="auto",
                       help="auto (a GPU if one can be used, else the CPU), cpu, cuda, cuda:N or mps")
    group.add_argument("--fast", action="store_true", help="run at twice the model spacing (about 8x faster, coarser)")
    group.add_argument("--overlap", type=_overlap, default=0.5, help="sliding-window overlap between patches, in [0, 1)")
    group.add_argument("--mirror", action="store_true",
                       help="average over the axis flips the model was trained with (up to 8x slower)")
    group.add_argument("--batch-size", type=_positive_int, default=2, help="patches per forward pass")
    group.add_argument("--precision", default="auto", choices=PRECISIONS,
                       help="network precision: auto = bf16 where the CPU or GPU computes it natively, else fp32")
    group.add_argument("--keep-all-regions", action="store_true",
                       help="skip the model's postprocessing (keeping only the largest organ region): show every "
                            "predicted region")
    group.add_argument("--keep-mixed-lesion-types", action="store_true",
                       help="skip the model's postprocessing that gives each lesion the type most of it has: show "
                            "each voxel's own type")


# ----------------------------------------------------------------------------- checks before the work

def _input_path(args: argparse.Namespace) -> Path:
    if (args.input is None) == (args.input_option is None):
        raise UsageError("give the input once: as INPUT or as -i INPUT")
    return args.input if args.input is not None else args.input_option


def _check_output_folder(out: Path, input_path: Path) -> None:
    """``--out`` must be a folder (or creatable) that this process can write into, and not the
    input folder (the outputs would be taken for cases on the next run)."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"the output folder {out} is an existing file; give a folder")
    if input_path.is_dir() and out.resolve() == input_path.resolve():
        raise OutputError(f"the output folder {out} is the input folder; choose another folder")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot create the output folder {out}: {existing} is a file")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".maxquery-probe-"):
            pass
    except OSError as err:
        raise OutputError(f"cannot write into {existing} ({err.strerror or err}); choose an output folder you can "
                          f"write to") from err


def _check_device(device: str) -> None:
    if device.startswith("cuda:"):
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count and int(device[5:]) >= count:
            raise UsageError(f"there is no GPU {device}: this computer has {count} (cuda:0 to cuda:{count - 1})")


def _load_predictor(args: argparse.Namespace) -> Predictor:
    _check_device(args.device)
    try:
        predictor = Predictor(args.model, device=args.device, fast=args.fast, scores=_raw_maps(args),
                              overlap=args.overlap, mirror=args.mirror, batch_size=args.batch_size,
                              precision=args.precision,
                              keep_largest_component=False if args.keep_all_regions else None,
                              one_type_per_lesion=False if args.keep_mixed_lesion_types else None)
    except ValueError as err:
        if isinstance(err, MaxQueryError):
            raise
        raise UsageError(str(err)) from err
    if predictor.fell_back_to_cpu and args.device != "auto":
        print(f"maxquery: no {args.device} device is available; running on the CPU", file=sys.stderr)
    return predictor


def _raw_maps(args: argparse.Namespace) -> list[str]:
    return list(args.scores) if args.raw_maps else []


def _check_outputs_distinct(planned: dict[str, dict[str, Path]]) -> None:
    owner: dict[str, str] = {}
    for name, paths in planned.items():
        for path in paths.values():
            other = owner.setdefault(path.name.casefold(), name)
            if other != name:
                raise OutputError(f"the cases {other!r} and {name!r} would both write {path.name}; rename one of them")


def _check_memory(predictor: Predictor, info: ImageInfo) -> None:
    """The predictor's memory estimate from the header alone (batch 1, the least it can use)."""
    extent = np.abs(np.asarray(info.direction, float).reshape(3, 3)) @ (
        np.asarray(info.size_xyz[:3], float) * np.asarray(info.spacing_xyz[:3], float))
    model_shape = [max(1, round(e / s)) for e, s in zip(extent[::-1], predictor.spacing_zyx)]
    card = predictor.card
    estimate = estimate_memory(int(np.prod(info.size_xyz, dtype=np.int64)), model_shape, card.patch_size_zyx, 1,
                               card.network, len(predictor.scores), card.architecture == "maxquery", predictor.mirror)
    check_fits(MemoryEstimate(estimate.host_bytes + info.voxel_bytes, estimate.network_bytes), predictor.device,
               predictor.fast)


def _preflight(cases: list[Case], predictor: Predictor, planned: dict[str, dict[str, Path]],
               overwrite: bool) -> tuple[list[tuple[Case, ImageInfo]], dict[str, MaxQueryError]]:
    """Every case's cheap checks (existing outputs, headers, memory) before any is computed."""
    ready, refused = [], {}
    for case in cases:
        try:
            check_free(planned[case.name], overwrite)
            info = inspect_image(case.path, case.series)
            _check_memory(predictor, info)
            ready.append((case, info))
        except FileExistsError as err:
            refused[case.name] = OutputError(str(err))
        except (InputError, ResourceError) as err:
            refused[case.name] = err
    return ready, refused


# ----------------------------------------------------------------------------- the run

def _segment(args: argparse.Namespace) -> int:
    input_path = _input_path(args)
    cases = find_cases(input_path)
    _check_output_folder(args.out, input_path)
    predictor = _load_predictor(args)
    planned = {case.name: planned_outputs(args.out, case.name, _raw_maps(args), args.png) for case in cases}
    _check_outputs_distinct(planned)
    remove_stale_staging(args.out)
    ready, failed = _preflight(cases, predictor, planned, args.overwrite)
    if len(cases) == 1 and failed:
        raise next(iter(failed.values()))
    for name, err in failed.items():
        print(f"maxquery: {name}: error: {err}", file=sys.stderr)
    report, outputs = reporter(args.progress), {}
    report.start(len(ready))
    for case, info in ready:
        try:
            result, written = _run_case(case, info, predictor, args, report)
        except (InputError, ResourceError) as err:
            if len(cases) == 1:
                raise
            print(f"maxquery: {case.name}: error: {err}", file=sys.stderr)
            failed[case.name] = err
            continue
        report.case_done(case.name, result, written)
        outputs[case.name] = written
    report.done(outputs)
    if not failed:
        return EXIT_OK
    print(f"maxquery: {len(failed)} of {len(cases)} cases were not segmented: {', '.join(failed)}", file=sys.stderr)
    return EXIT_RESOURCES if any(isinstance(e, ResourceError) for e in failed.values()) else EXIT_USER_ERROR


def _run_case(case: Case, info: ImageInfo, predictor: Predictor, args: argparse.Namespace, report):
    image = read_image(case.path, case.series, info=info)
    validate_ct(image)  # before the progress bar, so that a refusal is one clean line
    with report.case(case.name) as progress:
        result = predictor.predict(image, progress=progress, anomaly_threshold=args.threshold)
    written = write_outputs(result, args.out, case.name, overwrite=args.overwrite, png=args.png, source=case.source(),
                            raw_maps=_raw_maps(args))
    return result, written


@contextlib.contextmanager
def _interrupt_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM (cluster time limits, ``docker stop``) both raise ``Interrupted``, so
    that the case being written is cleaned up; a second signal is ignored while that happens."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGINT, signal.SIGTERM)

    def interrupt(signum, _frame):
        for s in signals:
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, interrupt) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def _itk_warnings_off() -> Iterator[None]:
    """ITK's warnings name its build paths; the checks here report what matters in plain words."""
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with _interrupt_on_signals(), _itk_warnings_off():
        try:
            return _segment(args)
        except KeyboardInterrupt as err:
            signum = err.signum if isinstance(err, Interrupted) else signal.SIGINT
            print(f"maxquery: interrupted ({signal.Signals(signum).name}); nothing of the current case was kept",
                  file=sys.stderr)
            return 128 + signum
        except RunCancelled as err:
            print(f"maxquery: {err}", file=sys.stderr)
            return EXIT_INTERRUPTED
        except (ResourceError, WriteFailed) as err:
            print(f"maxquery: error: {err}", file=sys.stderr)
            return EXIT_RESOURCES
        except MaxQueryError as err:  # input, output folder, model folder, options
            print(f"maxquery: error: {err}", file=sys.stderr)
            return EXIT_USER_ERROR
        except Exception:  # a bug: show where, so that it can be reported
            traceback.print_exc()
            print(f"maxquery {__version__}: internal error; please report it with the lines above", file=sys.stderr)
            return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
