"""The module's own self-test (what Slicer's test runner calls), run under the shim.

Until the demo model is bundled, the session's model folder stands in for it.
"""

import shim


def test_module_self_test_passes(app, scene, model_folder, monkeypatch):
    import MaxQuerySlicer
    import MaxQuerySlicerLib.logic

    monkeypatch.setattr(MaxQuerySlicerLib.logic, "bundled_model_folder", lambda: model_folder)
    test = MaxQuerySlicer.MaxQuerySlicerTest("test_segment_review_export")
    test.runTest()
    assert ("delay", "MaxQuery self-test passed") in shim.MESSAGES
