"""The first-use dependency plan never hands Slicer's own packages (or torch, when the PyTorch
extension installs it) to pip."""

from MaxQuerySlicerLib import dependencies


def test_pip_plan_skips_slicer_packages_and_torch_from_extension():
    wanted = [dependencies.Requirement("torch", "torch>=2.1"), dependencies.Requirement("numpy", "numpy"),
              dependencies.Requirement("monai", "monai>=1.3")]
    assert dependencies.pip_requirements(wanted, torch_via_extension=True) == ["monai>=1.3"]
    assert dependencies.pip_requirements(wanted, torch_via_extension=False) == ["torch>=2.1", "monai>=1.3"]


def test_everything_is_found_in_the_test_environment():
    assert dependencies.missing() == []
    assert dependencies.missing_shipped() == []
