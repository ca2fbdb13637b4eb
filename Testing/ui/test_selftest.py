"""The module's own self-test (what Slicer's test runner calls), run under the shim."""

import sys

import shim


def test_self_test_runs_the_demo_case_from_sample_data(app, scene):
    import MaxQuerySlicer

    test = MaxQuerySlicer.MaxQuerySlicerTest("test_demo_case")
    test.runTest()
    source = shim.SampleDataLogic.sources[MaxQuerySlicer.DEMO_SAMPLE]
    assert source["uris"].startswith("file://") and source["uris"].endswith("liverbench_A_0085.nii.gz")
    assert ("delay", "Running MaxQuery on the demo CT") in shim.MESSAGES
    assert ("delay", "MaxQuery self-test passed") in shim.MESSAGES
    assert scene.GetFirstNodeByName(MaxQuerySlicer.DEMO_SAMPLE) is not None


def test_self_test_passes_without_torch_and_says_what_it_skipped(app, scene, monkeypatch):
    """A factory Slicer has no torch: the self-test loads the demo case, then skips inference."""
    import MaxQuerySlicer
    from MaxQuerySlicerLib import dependencies

    factory = {name: version for name, version in dependencies.installed_versions().items() if name != "torch"}
    monkeypatch.setattr(dependencies, "installed_versions", lambda paths=None: factory)
    monkeypatch.setitem(sys.modules, "torch", None)  # and any attempt to import it fails
    test = MaxQuerySlicer.MaxQuerySlicerTest("test_demo_case")
    test.runTest()
    skipped = [text for kind, text in shim.MESSAGES if kind == "delay" and "skipped" in text]
    assert skipped and "torch" in skipped[0]
    assert ("delay", "Running MaxQuery on the demo CT") not in shim.MESSAGES
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
