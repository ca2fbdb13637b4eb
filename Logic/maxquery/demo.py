"""``python -m maxquery.demo`` (``make demo``): segment a CT and show where the outputs are.

With the bundled model (``Resources/Models/maxquery-liver-demo``) it runs on the shipped demo
case (``Resources/DemoData/liverbench_A_0085.nii.gz``, a benchmark test case with an unseen-type
lesion). Until that model exists it builds an UNTRAINED small MaxQuery model
in a temporary folder and runs it on a real abdominal CT, to show the pipeline end to end: its
labels and anomaly map are then meaningless.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from .calibration import AnomalyCalibration
from .model_folder import ClassInfo, ModelCard, save_model_folder
from .network import build_network, small_config
from .preprocessing import CTNormalization

REPO = Path(__file__).resolve().parents[2]
DEMO_MODEL = REPO / "Resources" / "Models" / "maxquery-liver-demo"
DEMO_CASE = REPO / "Resources" / "DemoData" / "liverbench_A_0085.nii.gz"  # see PROVENANCE.md beside it
FALLBACK_CT = REPO.parent / "shared" / "data" / "real" / "totalsegmentator" / "example_ct_sm.nii.gz"

DEMO_CLASSES = (
    ClassInfo(0, "background", "background", (0.0, 0.0, 0.0)),
    ClassInfo(1, "liver", "organ", (0.87, 0.51, 0.42)),
    ClassInfo(2, "liver tumour type 1", "tumor", (0.2, 0.6, 1.0)),
    ClassInfo(3, "liver tumour type 2", "tumor", (0.3, 0.85, 0.3)),
)


def build_untrained_model(
    folder: str | Path, seed: int = 0, spacing_zyx=(3.0, 3.0, 3.0), patch_size_zyx=(32, 96, 96),
    calibration: AnomalyCalibration | None = None, architecture: str = "maxquery", **config_overrides,
) -> Path:
    """Write a model folder with random (seeded) weights: a real card and real safetensors.

    Used by the demo before a trained model ships, and by the tests. Its outputs mean nothing.
    """
    torch.manual_seed(seed)
    config = small_config(len(DEMO_CLASSES), **config_overrides)
    card = ModelCard(
        name="untrained-demo", architecture=architecture, network=config, classes=list(DEMO_CLASSES),
        spacing_zyx=tuple(spacing_zyx), patch_size_zyx=tuple(patch_size_zyx),
        normalization=CTNormalization(clip_low=-160.0, clip_high=240.0, mean=60.0, std=70.0),
        description="UNTRAINED network with random weights, for demonstrations and tests only",
        calibration=calibration,
    )
    return save_model_folder(folder, card, build_network(architecture, config), overwrite=True)


def main() -> int:
    from .cli import main as cli_main

    out = Path(tempfile.mkdtemp(prefix="maxquery-demo-"))
    if DEMO_MODEL.is_dir():
        model, case = DEMO_MODEL, DEMO_CASE
        print(f"demo: bundled model {model} on {case}")
    else:
        model, case = build_untrained_model(out / "untrained-model"), FALLBACK_CT
        print(
            "demo: the bundled model (Resources/Models/maxquery-liver-demo) is not there yet, so this runs an "
            "UNTRAINED MaxQuery network with random weights: the pipeline is real, its labels and anomaly "
            "map are not."
        )
    code = cli_main(["segment", str(case), "--model", str(model), "--out", str(out / "outputs"), "--png"])
    if code == 0:
        pictures = sorted((out / "outputs").glob("*.png"))
        print(f"demo: outputs in {out / 'outputs'}")
        print(f"demo: review picture {pictures[0] if pictures else '(none)'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
