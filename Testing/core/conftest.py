"""Fixtures of the command-line tests: a light untrained model folder (real card, real weights)."""

import pytest

from maxquery.demo import build_untrained_model

LIGHT = dict(features=(8, 16, 32, 64, 96), query_dim=32, ffn_dim=64)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A small MaxQuery network with random weights at 5 mm: seconds per CT, every output real."""
    return build_untrained_model(tmp_path_factory.mktemp("light") / "m", seed=1, spacing_zyx=(5.0, 5.0, 5.0),
                                 patch_size_zyx=(16, 48, 48), **LIGHT)
