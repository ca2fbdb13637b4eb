"""MaxQuerySlicer: tumour segmentation and a continuous map of unseen lesions in CT (MaxQuery, CVPR 2023).

The widget only wires the Qt panel to ``MaxQueryLogic`` (MaxQuerySlicerLib/logic.py), which does
the work on the MRML scene and can be used from the Python console without this panel.
"""

import os

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from MaxQuerySlicerLib import dependencies
from MaxQuerySlicerLib.logic import MaxQueryLogic
from MaxQuerySlicerLib.parameters import DEVICES, QUALITIES

APPLY_TEXT = "Segment && Localize OOD"
POLL_MS = 100
EXPORTS = {  # kind: (button, dialog title, file filter, default suffix)
    "seg.nrrd": ("exportSegNrrdButton", "Save segmentation", "Segmentation (*.seg.nrrd)", ".seg.nrrd"),
    "labelmap": ("exportLabelmapButton", "Save labelmap", "NIfTI (*.nii.gz);;NRRD (*.nrrd)", ".nii.gz"),
    "anomaly": ("exportAnomalyButton", "Save anomaly map", "NRRD (*.nrrd);;NIfTI (*.nii.gz)", ".nrrd"),
    "dicom-seg": ("exportDicomSegButton", "Save DICOM SEG", "DICOM (*.dcm)", ".dcm"),
}


class MaxQuerySlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MaxQuery Segment & Localize OOD"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["MaxQuery for 3D Slicer contributors"]
        self.parent.helpText = (
            "Segments the organ and known tumour types in a CT with a MaxQuery mask transformer and shows a "
            "calibrated map of how unlike the training data each voxel is, to point at lesion types the model "
            "never saw. Research use only; not for clinical decisions.")
        self.parent.acknowledgementText = (
            "MaxQuery: Yuan et al., 'Devil is in the Queries: Advancing Mask Transformers for Real-world Medical "
            "Image Segmentation and Out-of-Distribution Localization', CVPR 2023.")


class MaxQuerySlicerLogic(ScriptedLoadableModuleLogic, MaxQueryLogic):
    """Slicer's logic class: MaxQueryLogic bound to the application's scene."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        MaxQueryLogic.__init__(self, slicer.mrmlScene)

    def dicomFiles(self, volumeNode):
        """The files of the DICOM series a volume was loaded from, via Slicer's DICOM database."""
        from MaxQuerySlicerLib.export import dicom_instance_uids

        database = getattr(slicer, "dicomDatabase", None)
        if database is None:
            return []
        return [database.fileForInstance(uid) for uid in dicom_instance_uids(volumeNode)]


class MaxQuerySlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.params = None
        self.run = None
        self.runVolume = None
        self.dependenciesChecked = False
        self._updatingGUI = False
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.timeout.connect(self.onPoll)
        self.tableTimer = qt.QTimer()  # the table is recomputed once the slider rests
        self.tableTimer.setSingleShot(True)
        self.tableTimer.setInterval(400)
        self.tableTimer.timeout.connect(self.onThresholdSettled)

    # --- set-up ---------------------------------------------------------------------------------
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MaxQuerySlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.inputSelector.nodeTypes = ["vtkMRMLScalarVolumeNode"]
        self.ui.inputSelector.setMRMLScene(slicer.mrmlScene)
        for slider, low, high, step in ((self.ui.thresholdSlider, 0.5, 1.0, 0.001),
                                        (self.ui.opacitySlider, 0.0, 1.0, 0.05)):
            # setProperty: the same call under PythonQt (Slicer) and PySide
            for name, value in (("decimals", 3), ("minimum", low), ("maximum", high), ("singleStep", step)):
                slider.setProperty(name, value)
        self.ui.candidatesTable.setColumnCount(6)
        self.ui.candidatesTable.setHorizontalHeaderLabels(["#", "Source", "Type", "Volume (ml)", "Mean", "Peak"])

        self.logic = MaxQuerySlicerLogic()
        self.ui.inputSelector.currentNodeChanged.connect(self.onInputChanged)
        self.ui.modelPathLineEdit.textChanged.connect(self.onModelPathChanged)
        self.ui.browseModelButton.clicked.connect(self.onBrowseModel)
        self.ui.deviceComboBox.currentIndexChanged.connect(self.onDeviceChanged)
        self.ui.qualityComboBox.currentIndexChanged.connect(self.onQualityChanged)
        self.ui.applyButton.clicked.connect(self.onApplyOrCancel)
        self.ui.thresholdSlider.valueChanged.connect(self.onThresholdChanged)
        self.ui.opacitySlider.valueChanged.connect(self.onOpacityChanged)
        self.ui.show3DCheckBox.toggled.connect(self.onShow3D)
        self.ui.candidatesTable.cellClicked.connect(self.onCandidateClicked)
        for kind, (button, *_rest) in EXPORTS.items():
            getattr(self.ui, button).clicked.connect(lambda _checked=False, kind=kind: self.onExport(kind))
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    def cleanup(self):
        self.cancelRun()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def onSceneEndClose(self, caller, event):
        self.initializeParameterNode()

    def initializeParameterNode(self):
        params = self.logic.parameters()
        if self.params is not None and self.params.node is not params.node:
            self.removeObserver(self.params.node, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        if self.params is None or self.params.node is not params.node:
            self.params = params
            self.addObserver(params.node, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        if params.reference("InputVolume") is None:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume is not None and firstVolume.GetAttribute("MaxQuery.caseScore") is None:
                params.set_reference("InputVolume", firstVolume)
        self.updateGUIFromParameterNode()

    # --- parameter node ↔ GUI -----------------------------------------------------------------
    def updateGUIFromParameterNode(self, caller=None, event=None):
        if self.params is None or self._updatingGUI:
            return
        self._updatingGUI = True
        try:
            p = self.params
            self.ui.inputSelector.setCurrentNode(p.reference("InputVolume"))
            self.ui.modelPathLineEdit.setText(p.model_folder)
            self.ui.deviceComboBox.setCurrentIndex(DEVICES.index(p.device))
            self.ui.qualityComboBox.setCurrentIndex(QUALITIES.index(p.quality))
            self.ui.thresholdSlider.setValue(p.threshold)
            self.ui.opacitySlider.setValue(p.opacity)
            self.ui.show3DCheckBox.setChecked(p.show_3d)
            self.ui.thresholdHelpLabel.setText(
                f"flags about {100 * (1 - p.threshold):.1f} % of inlier organ voxels")
            self.updateModelCard()
            self.updateResultsGUI()
            running = self.run is not None
            self.ui.applyButton.setEnabled(running or p.reference("InputVolume") is not None)
            self.ui.applyButton.setText("Cancel" if running else APPLY_TEXT)
            for widget in (self.ui.inputSelector, self.ui.modelPathLineEdit, self.ui.browseModelButton,
                           self.ui.deviceComboBox, self.ui.qualityComboBox):
                widget.setEnabled(not running)
        finally:
            self._updatingGUI = False

    def updateModelCard(self):
        try:
            folder = self.logic.model_folder(self.params)
            card = self.logic.read_card(folder)
        except Exception as error:  # an invalid folder is reported in the panel, not raised
            self.ui.modelCardLabel.setText(f"<span style='color:#c0392b'>{error}</span>")
            return
        classes = ", ".join(c.name for c in card.classes if c.role != "background")
        calibrated = "calibrated" if card.calibration else "<b>not calibrated</b>"
        self.ui.modelCardLabel.setText(f"<b>{card.name}</b> v{card.version} — {classes}; anomaly {calibrated}")

    def updateResultsGUI(self):
        segmentation = self.params.reference("Segmentation")
        anomaly = self.params.reference("AnomalyVolume")
        hasResult = segmentation is not None and anomaly is not None
        for widget in (self.ui.thresholdSlider, self.ui.opacitySlider, self.ui.show3DCheckBox,
                       self.ui.exportSegNrrdButton, self.ui.exportLabelmapButton, self.ui.exportAnomalyButton):
            widget.setEnabled(hasResult)
        volume = self.params.reference("InputVolume")
        self.ui.exportDicomSegButton.setEnabled(hasResult and volume is not None
                                                and bool(volume.GetAttribute("DICOM.instanceUIDs")))
        score = anomaly.GetAttribute("MaxQuery.caseScore") if hasResult else None
        self.ui.caseScoreLabel.setText(f"{float(score):.3f}" if score else "-")
        self.fillCandidatesTable()

    def fillCandidatesTable(self):
        from MaxQuerySlicerLib.nodes import table_rows

        table = self.params.reference("LesionTable")
        rows = table_rows(table) if table is not None else []
        self.ui.candidatesTable.setRowCount(len(rows))
        for r, row in enumerate(rows):
            values = (f"{int(row['Region'])}", row["Source"], row["Type"], f"{row['Volume (ml)']:.2f}",
                      f"{row['Mean score']:.3f}", f"{row['Peak score']:.3f}")
            for c, text in enumerate(values):
                self.ui.candidatesTable.setItem(r, c, qt.QTableWidgetItem(text))

    def onInputChanged(self, node):
        if not self._updatingGUI:
            self.params.set_reference("InputVolume", node)

    def onModelPathChanged(self, text):
        if not self._updatingGUI:
            self.params.model_folder = text.strip()

    def onBrowseModel(self):
        folder = qt.QFileDialog.getExistingDirectory(self.parent, "Choose a MaxQuery model folder")
        if folder:
            self.params.model_folder = folder

    def onDeviceChanged(self, index):
        if not self._updatingGUI:
            self.params.device = DEVICES[index]

    def onQualityChanged(self, index):
        if not self._updatingGUI:
            self.params.quality = QUALITIES[index]

    # --- running --------------------------------------------------------------------------------
    def onApplyOrCancel(self):
        if self.run is not None:
            self.cancelRun()
            return
        if not self.ensureDependencies():
            return
        volume = self.params.reference("InputVolume")
        try:
            self.run = self.logic.start(volume, self.params)
        except Exception as error:
            slicer.util.errorDisplay(f"Cannot start: {error}")
            return
        self.runVolume = volume
        self.ui.progressBar.setValue(0)
        self.ui.statusLabel.setText("Starting…")
        self.updateGUIFromParameterNode()
        self.timer.start()

    def cancelRun(self):
        if self.run is not None:
            self.run.cancel()
            self.ui.statusLabel.setText("Cancelling…")

    def onPoll(self):
        """Runs on the GUI thread every POLL_MS: shows progress, then builds nodes when done."""
        run = self.run
        fraction, stage = run.progress()
        self.ui.progressBar.setValue(int(1000 * fraction))
        if not run.done:
            if not run.cancel_event.is_set():
                self.ui.statusLabel.setText(f"{stage}… ({run.predictor.device if run.predictor else 'loading'})")
            return
        self.timer.stop()
        self.run = None
        try:
            if run.cancelled:
                self.ui.statusLabel.setText("Cancelled; the scene was left as it was.")
                self.ui.progressBar.setValue(0)
            else:
                self.logic.finish(run, self.runVolume, self.params)
                self.ui.progressBar.setValue(1000)
                self.ui.statusLabel.setText(self.finishedMessage(run))
        except Exception as error:
            self.ui.statusLabel.setText(f"<span style='color:#c0392b'>Failed: {error}</span>")
            slicer.util.errorDisplay(f"MaxQuery failed: {error}")
        finally:
            self.updateGUIFromParameterNode()

    def finishedMessage(self, run):
        import time

        message = f"Done in {time.monotonic() - run.started:.1f} s on {run.result.device}."
        if run.predictor.fell_back_to_cpu:
            message = ("<span style='color:#d35400'><b>No usable GPU: ran on the CPU</b> (slower).</span> "
                       + message)
        return message

    def ensureDependencies(self):
        """On first use: ask before installing missing packages inside Slicer; never replace Slicer's own."""
        if self.dependenciesChecked:
            return True
        broken = dependencies.missing_shipped()
        if broken:
            slicer.util.errorDisplay(f"This Slicer lacks {', '.join(broken)}; reinstall Slicer.")
            return False
        missing = dependencies.missing()
        if missing:
            if not slicer.util.confirmOkCancelDisplay(
                    f"MaxQuery needs {dependencies.describe(missing)}. Install now? This downloads several "
                    "hundred MB and may take minutes."):
                return False
            if not self.installDependencies(missing):
                return False
        self.dependenciesChecked = True
        return True

    def installDependencies(self, missing):
        torchViaExtension = False
        if any(r.module == "torch" for r in missing):
            try:
                import PyTorchUtils  # the PyTorch extension: picks the CUDA build matching the driver
                torchViaExtension = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True) is not None
            except ImportError:
                torchViaExtension = False
        requirements = dependencies.pip_requirements(missing, torchViaExtension)
        with slicer.util.WaitCursor():
            for requirement in requirements:
                slicer.util.pip_install(requirement)
        still = dependencies.missing()
        if still:
            slicer.util.errorDisplay(f"Still missing after installation: {dependencies.describe(still)}. "
                                     "Restart Slicer and try again.")
            return False
        slicer.util.infoDisplay("Packages installed. If MaxQuery fails to start, restart Slicer once.")
        return True

    # --- review ----------------------------------------------------------------------------------
    def onThresholdChanged(self, value):
        if not self._updatingGUI and self.params.reference("Segmentation") is not None:
            self.logic.set_threshold(value, self.params)
            self.tableTimer.start()

    def onThresholdSettled(self):
        self.logic.update_table(self.params)
        self.fillCandidatesTable()

    def onOpacityChanged(self, value):
        if not self._updatingGUI:
            self.logic.set_opacity(value, self.params)

    def onShow3D(self, checked):
        if not self._updatingGUI:
            self.logic.set_show_3d(checked, self.params)

    def onCandidateClicked(self, row, column):
        self.logic.jump_to_row(row, self.params)

    # --- export ----------------------------------------------------------------------------------
    def onExport(self, kind, path=None):
        """Ask for a file name (unless given), confirm replacing an existing file, then write."""
        _button, title, fileFilter, suffix = EXPORTS[kind]
        if path is None:
            volume = self.params.reference("InputVolume")
            default = os.path.join(qt.QDir.homePath(), f"{volume.GetName()}_maxquery{suffix}")
            path = qt.QFileDialog.getSaveFileName(self.parent, title, default, fileFilter)
            path = path[0] if isinstance(path, tuple) else path
            if not path:
                return None
        overwrite = False
        if os.path.exists(path):
            if not slicer.util.confirmYesNoDisplay(f"{path} exists. Replace it?"):
                return None
            overwrite = True
        dicomFiles = self.logic.dicomFiles(self.params.reference("InputVolume")) if kind == "dicom-seg" else None
        try:
            written = self.logic.export(kind, path, overwrite, self.params, dicom_files=dicomFiles)
        except Exception as error:
            slicer.util.errorDisplay(f"Export failed: {error}")
            return None
        self.ui.statusLabel.setText(f"Saved {written}")
        return written


class MaxQuerySlicerTest(ScriptedLoadableModuleTest):
    """Slicer's self-test: the real logic and the bundled model on a small volume."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_segment_review_export()

    def test_segment_review_export(self):
        import tempfile

        import numpy as np
        import SimpleITK as sitk

        from MaxQuerySlicerLib import nodes
        from MaxQuerySlicerLib.logic import bundled_model_folder

        self.delayDisplay("Building a small CT-like volume")
        array = np.full((24, 48, 48), -1000, np.int16)
        z, y, x = np.indices(array.shape)
        array[((y - 24) / 20.0) ** 2 + ((x - 24) / 22.0) ** 2 <= 1] = 40  # body
        array[((y - 20) / 9.0) ** 2 + ((x - 16) / 10.0) ** 2 + ((z - 12) / 8.0) ** 2 <= 1] = 60  # liver-like
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((3.0, 3.0, 3.0))
        volume = nodes.add_volume(slicer.mrmlScene, image, "SelfTestCT")

        logic = MaxQuerySlicerLogic()
        params = logic.parameters()
        self.assertIsNotNone(bundled_model_folder(), "the bundled demo model is missing")
        params.device = "cpu"
        self.delayDisplay("Running MaxQuery")
        created = logic.process(volume, params)
        card = logic.read_card(logic.model_folder(params))
        names = [created.segmentation.GetSegmentation().GetNthSegment(i).GetName()
                 for i in range(created.segmentation.GetSegmentation().GetNumberOfSegments())]
        self.assertEqual(names, [c.name for c in card.classes[1:]] + [nodes.CANDIDATE_NAME])
        anomaly = slicer.util.arrayFromVolume(created.anomaly)
        self.assertTrue(0.0 <= anomaly.min() and anomaly.max() <= 1.0)
        self.assertGreaterEqual(logic.set_threshold(0.5, params), logic.set_threshold(0.999, params))
        with tempfile.TemporaryDirectory() as folder:
            path = logic.export("labelmap", os.path.join(folder, "labels.nii.gz"), params=params)
            labels = sitk.ReadImage(str(path))
            self.assertEqual(labels.GetSize(), image.GetSize())
        self.delayDisplay("MaxQuery self-test passed")
