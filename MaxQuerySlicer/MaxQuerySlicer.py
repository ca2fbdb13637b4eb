"""MaxQuerySlicer: tumour segmentation and a continuous map of unseen lesions in CT (MaxQuery, CVPR 2023).

The widget only wires the Qt panel to ``MaxQueryLogic`` (MaxQuerySlicerLib/logic.py), which does
the work on the MRML scene and can be used from the Python console without this panel. Inference
runs in a child process (``maxquery segment`` under Slicer's Python), so Slicer stays responsive.
"""

import logging
import os
import tempfile

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from MaxQuerySlicerLib import dependencies
from MaxQuerySlicerLib.logic import DEMO_CASE, MaxQueryLogic, bundled
from MaxQuerySlicerLib.parameters import QUALITIES, available_devices

APPLY_TEXT = "Segment && Localize OOD"
POLL_MS = 100
DEMO_SAMPLE = "MaxQueryDemoLiverCT"
SETTINGS = {"ModelFolder": "MaxQuery/ModelFolder", "Device": "MaxQuery/Device"}  # remembered across sessions
EXPORTS = {  # kind: (button, dialog title, file filter, default suffix)
    "seg.nrrd": ("exportSegNrrdButton", "Save segmentation", "Segmentation (*.seg.nrrd)", ".seg.nrrd"),
    "labelmap": ("exportLabelmapButton", "Save labelmap", "NIfTI (*.nii.gz);;NRRD (*.nrrd)", ".nii.gz"),
    "anomaly": ("exportAnomalyButton", "Save anomaly map", "NRRD (*.nrrd);;NIfTI (*.nii.gz)", ".nrrd"),
    "dicom-seg": ("exportDicomSegButton", "Save DICOM SEG", "DICOM (*.dcm)", ".dcm"),
}


class MaxQuerySlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MaxQuery Segment and Localize OOD"  # no "&": Qt menus would eat it
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
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """The shipped demo CT in the Sample Data module (and for the self-test)."""
    import SampleData

    path = bundled(DEMO_CASE)
    if path is None:
        return
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="MaxQuery", sampleName=DEMO_SAMPLE, uris=path.as_uri(), fileNames=path.name,
        nodeNames=DEMO_SAMPLE, thumbnailFileName=os.path.join(os.path.dirname(__file__), "Resources", "Icons",
                                                              "MaxQuerySlicer.png"),
        loadFileType="VolumeFile")


class MaxQuerySlicerLogic(ScriptedLoadableModuleLogic):
    """Slicer's logic class: holds the GUI-free ``MaxQueryLogic`` bound to the application's scene
    and Slicer's parameter node, plus what needs the application (DICOM database)."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.core = MaxQueryLogic(slicer.mrmlScene, self.getParameterNode)

    def dicomFiles(self, volumeNode):
        """The files of the DICOM series a volume was loaded from, via Slicer's DICOM database."""
        from MaxQuerySlicerLib.export import dicom_instance_uids

        database = getattr(slicer, "dicomDatabase", None)
        if database is None:
            return []
        return [database.fileForInstance(uid) for uid in dicom_instance_uids(volumeNode)]

    def addToDicomDatabase(self, path):
        """Index an exported DICOM file, so it appears in the DICOM browser beside its CT."""
        import ctk

        database = getattr(slicer, "dicomDatabase", None)
        if database is None:
            return False
        ctk.ctkDICOMIndexer().addFile(database, str(path))
        return True


class MaxQuerySlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        # Everything setup() uses is made first: without a parent, Slicer's base __init__ calls setup().
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.params = None
        self.run = None
        self.runVolume = None
        self._updatingGUI = False
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.timeout.connect(self.onPoll)
        self.tableTimer = qt.QTimer()  # the table is recomputed once the threshold is applied
        self.tableTimer.setSingleShot(True)
        self.tableTimer.setInterval(200)
        self.tableTimer.timeout.connect(self.onThresholdSettled)
        ScriptedLoadableModuleWidget.__init__(self, parent)

    # --- set-up ---------------------------------------------------------------------------------
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MaxQuerySlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.inputSelector.setMRMLScene(slicer.mrmlScene)
        self.ui.outputSelector.setMRMLScene(slicer.mrmlScene)
        for slider, low, high, step in ((self.ui.thresholdSlider, 0.5, 1.0, 0.001),
                                        (self.ui.opacitySlider, 0.0, 1.0, 0.05)):
            # setProperty: the same call under PythonQt (Slicer) and PySide
            for name, value in (("decimals", 3), ("minimum", low), ("maximum", high), ("singleStep", step)):
                slider.setProperty(name, value)
        self.ui.deviceComboBox.addItems(available_devices())
        self.ui.candidatesTable.setColumnCount(6)
        self.ui.candidatesTable.setHorizontalHeaderLabels(["#", "Source", "Type", "Volume (ml)", "Mean", "Peak"])

        self.logic = MaxQuerySlicerLogic()
        self.ui.inputSelector.currentNodeChanged.connect(self.onInputChanged)
        self.ui.outputSelector.currentNodeChanged.connect(self.onOutputChanged)
        self.ui.modelPathLineEdit.textChanged.connect(self.onModelPathChanged)
        self.ui.browseModelButton.clicked.connect(self.onBrowseModel)
        self.ui.deviceComboBox.currentIndexChanged.connect(self.onDeviceChanged)
        self.ui.qualityComboBox.currentIndexChanged.connect(self.onQualityChanged)
        self.ui.applyButton.clicked.connect(self.onApplyOrCancel)
        self.ui.thresholdSlider.valueIsChanging.connect(self.onThresholdPreview)
        self.ui.thresholdSlider.valueChanged.connect(self.onThresholdChanged)
        self.ui.opacitySlider.valueChanged.connect(self.onOpacityChanged)
        self.ui.show3DCheckBox.toggled.connect(self.onShow3D)
        self.ui.candidatesTable.cellClicked.connect(self.onCandidateClicked)
        for kind, (button, *_rest) in EXPORTS.items():
            getattr(self.ui, button).clicked.connect(lambda _checked=False, kind=kind: self.onExport(kind))
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodeAdded)
        self.initializeParameterNode()

    def cleanup(self):
        """Module unloaded or reloaded: stop the run, the timers and every observer."""
        self.timer.stop()
        self.tableTimer.stop()
        self.cancelRun()
        self.removeObservers()
        if self.logic is not None:
            self.logic.core.close()

    def enter(self):
        self.initializeParameterNode()

    def onSceneStartClose(self, caller, event):
        self.cancelRun()

    def onSceneEndClose(self, caller, event):
        self.initializeParameterNode()

    def onNodeAdded(self, caller, event):
        qt.QTimer.singleShot(0, self.hideAnomalyVolumesFromInput)  # attributes are set after the node is added

    def hideAnomalyVolumesFromInput(self):
        """The module's own anomaly maps are results, never a CT to segment."""
        from MaxQuerySlicerLib.nodes import is_anomaly_volume

        scene = slicer.mrmlScene
        volumes = [scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
                   for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))]
        self.ui.inputSelector.sortFilterProxyModel().setHiddenNodeIDs([v.GetID() for v in volumes if is_anomaly_volume(v)])

    def initializeParameterNode(self):
        params = self.logic.core.parameters()
        if self.params is not None and self.params.node is not params.node:
            self.removeObserver(self.params.node, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        if self.params is None or self.params.node is not params.node:
            self.params = params
            self.addObserver(params.node, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        settings = qt.QSettings()
        for key, settingsKey in SETTINGS.items():  # a new scene starts from the last choices
            remembered = settings.value(settingsKey, "")
            if not params.node.GetParameter(key) and remembered:
                try:
                    setattr(params, "model_folder" if key == "ModelFolder" else "device", str(remembered))
                except ValueError:
                    pass
        if params.reference("InputVolume") is None:
            from MaxQuerySlicerLib.nodes import is_anomaly_volume

            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume is not None and not is_anomaly_volume(firstVolume):
                params.set_reference("InputVolume", firstVolume)
        self.hideAnomalyVolumesFromInput()
        self.updateGUIFromParameterNode()

    # --- parameter node ↔ GUI -----------------------------------------------------------------
    def updateGUIFromParameterNode(self, caller=None, event=None):
        if self.params is None or self._updatingGUI:
            return
        self._updatingGUI = True
        try:
            p = self.params
            self.ui.inputSelector.setCurrentNode(p.reference("InputVolume"))
            self.ui.outputSelector.setCurrentNode(p.reference("OutputSegmentation"))
            self.ui.modelPathLineEdit.setText(p.model_folder)
            if self.ui.deviceComboBox.findText(p.device) < 0:
                self.ui.deviceComboBox.addItem(p.device)
            self.ui.deviceComboBox.setCurrentIndex(self.ui.deviceComboBox.findText(p.device))
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
            for widget in (self.ui.inputSelector, self.ui.outputSelector, self.ui.modelPathLineEdit,
                           self.ui.browseModelButton, self.ui.deviceComboBox, self.ui.qualityComboBox):
                widget.setEnabled(not running)
        finally:
            self._updatingGUI = False

    def updateModelCard(self):
        try:
            folder = self.logic.core.model_folder(self.params)
            card = self.logic.core.read_card(folder)
        except ImportError as error:  # a factory Slicer: the packages come on the first run
            self.ui.modelCardLabel.setText(f"Python packages not installed yet ({error.name}); "
                                           "they are installed when you first click Segment.")
            return
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

    def onOutputChanged(self, node):
        if not self._updatingGUI:
            self.params.set_reference("OutputSegmentation", node)

    def onModelPathChanged(self, text):
        if not self._updatingGUI:
            self.params.model_folder = text.strip()
            qt.QSettings().setValue(SETTINGS["ModelFolder"], self.params.model_folder)

    def onBrowseModel(self):
        folder = qt.QFileDialog.getExistingDirectory(self.parent, "Choose a MaxQuery model folder")
        if folder:
            self.params.model_folder = folder
            qt.QSettings().setValue(SETTINGS["ModelFolder"], folder)

    def onDeviceChanged(self, index):
        if not self._updatingGUI and index >= 0:
            self.params.device = self.ui.deviceComboBox.itemText(index)
            qt.QSettings().setValue(SETTINGS["Device"], self.params.device)

    def onQualityChanged(self, index):
        if not self._updatingGUI:
            self.params.quality = QUALITIES[index]

    def log(self, text):
        self.ui.logTextEdit.appendPlainText(text)

    # --- running --------------------------------------------------------------------------------
    def onApplyOrCancel(self):
        if self.run is not None:
            self.cancelRun()
            return
        if not self.confirmOutputReplacement() or not self.ensureDependencies():
            return
        volume = self.params.reference("InputVolume")
        try:
            self.run = self.logic.core.start(volume, self.params)
        except Exception as error:
            slicer.util.errorDisplay(f"Cannot start: {error}")
            return
        self.runVolume = volume
        self.log(f"Started: {' '.join(self.run.command)}")
        self.ui.progressBar.setValue(0)
        self.ui.statusLabel.setText("Starting…")
        self.updateGUIFromParameterNode()
        self.timer.start()

    def confirmOutputReplacement(self):
        """Re-running into a segmentation replaces its segments: ask first if some were not made by MaxQuery."""
        from MaxQuerySlicerLib.nodes import ROLE_TAG, segment_tag

        target = self.params.reference("OutputSegmentation")
        if target is None:
            return True
        segmentation = target.GetSegmentation()
        foreign = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())
                   if not segment_tag(segmentation.GetNthSegment(i), ROLE_TAG)]
        return not foreign or slicer.util.confirmYesNoDisplay(
            f"{target.GetName()} holds segments MaxQuery did not make ({', '.join(foreign[:5])}). Replace all "
            "its segments with this run's?")

    def cancelRun(self):
        """Kill the child and delete its files; the scene stays as it was."""
        if self.run is None:
            return
        run, self.run = self.run, None
        run.cancel()
        if self.logic.core.active_run is run:
            self.logic.core.active_run = None
        self.timer.stop()
        self.log("Cancelled.")
        self.ui.progressBar.setValue(0)
        self.ui.statusLabel.setText("Cancelled; the scene was left as it was.")
        self.updateGUIFromParameterNode()

    def onPoll(self):
        """Runs on the GUI thread every POLL_MS: shows progress and the log, then builds nodes when done."""
        run = self.run
        if run is None:
            self.timer.stop()
            return
        for line in run.poll():
            self.log(line)
        fraction, stage = run.progress()
        self.ui.progressBar.setValue(int(1000 * fraction))
        if not run.done:
            self.ui.statusLabel.setText(f"{stage}… ({self.params.device})")
            return
        self.timer.stop()
        self.run = None
        try:
            self.logic.core.finish(run, self.runVolume, self.params)
            self.ui.progressBar.setValue(1000)
            self.ui.statusLabel.setText(self.finishedMessage(run))
            self.log(self.finishedMessage(run))
        except Exception as error:
            self.ui.progressBar.setValue(0)
            self.ui.statusLabel.setText(f"<span style='color:#c0392b'>Failed: {str(error).splitlines()[0]}</span>")
            self.log(f"Failed: {error}")
            slicer.util.errorDisplay(f"MaxQuery failed; the scene was left as it was.\n\n{error}")
        finally:
            self.hideAnomalyVolumesFromInput()
            self.updateGUIFromParameterNode()

    @staticmethod
    def finishedMessage(run):
        import time

        info = run.case_info
        message = f"Done in {time.monotonic() - run.started:.1f} s on {info.get('device', '?')}."
        for note in info.get("notes", []):
            message = f"<span style='color:#d35400'><b>{note}</b></span> " + message
        return message

    def ensureDependencies(self):
        """Ask before installing what the run needs; torch only through the PyTorch extension; never
        replace a package that is already installed."""
        plan = dependencies.make_plan()
        if plan.broken:
            slicer.util.errorDisplay(f"This Slicer lacks {', '.join(plan.broken)}; reinstall Slicer.")
            return False
        if not plan.needed:
            return True
        if not slicer.util.confirmOkCancelDisplay(
                f"MaxQuery needs {plan.describe()}. Install now? This downloads several hundred MB and may take "
                "minutes. Packages Slicer already has are kept as they are."):
            return False
        if plan.torch_from_extension and not self.installTorch():
            return False
        if plan.pip:
            self.pipInstall(plan)
        still = dependencies.make_plan()
        if still.needed:
            slicer.util.errorDisplay(f"Still missing after installation: {still.describe()}. Restart Slicer and "
                                     "try again.")
            return False
        return True

    def installTorch(self):
        """torch from the PyTorch extension, which picks the build for the GPU driver; never from PyPI here."""
        try:
            import PyTorchUtils
        except ImportError:
            slicer.util.errorDisplay("MaxQuery needs the PyTorch extension to install torch. Install 'PyTorch' "
                                     "from the Extensions Manager, restart Slicer and try again.")
            return False
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True,
                                                              torchVersionRequirement=">=2.1")
        if torch is None:
            slicer.util.errorDisplay("PyTorch was not installed, so MaxQuery cannot run. Install it from the "
                                     "PyTorch module (or click Segment again and accept).")
            return False
        return True

    @staticmethod
    def pipInstall(plan):
        """pip with a constraints file that pins every installed distribution to its present version."""
        import importlib.util

        with tempfile.TemporaryDirectory() as folder:
            constraints = str(plan.write_constraints(folder))
            with slicer.util.WaitCursor():
                if importlib.util.find_spec("slicer.packaging") is not None:  # Slicer 5.12+
                    importlib.import_module("slicer.packaging").pip_ensure(
                        plan.pip, constraints=constraints, prompt_install=False, requester="MaxQuery")
                else:
                    slicer.util.pip_install([*plan.pip, "-c", constraints])

    # --- review ----------------------------------------------------------------------------------
    def onThresholdPreview(self, value):
        """While the slider is dragged: only the overlay follows (the segment is rewritten on release)."""
        if not self._updatingGUI:
            self.logic.core.preview_threshold(value, self.params)

    def onThresholdChanged(self, value):
        if not self._updatingGUI and self.params.reference("Segmentation") is not None:
            self.logic.core.set_threshold(value, self.params)
            self.tableTimer.start()

    def onThresholdSettled(self):
        self.logic.core.update_table(self.params)
        self.fillCandidatesTable()

    def onOpacityChanged(self, value):
        if not self._updatingGUI:
            self.logic.core.set_opacity(value, self.params)

    def onShow3D(self, checked):
        if not self._updatingGUI:
            self.logic.core.set_show_3d(checked, self.params)

    def onCandidateClicked(self, row, column):
        self.logic.core.jump_to_row(row, self.params)

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
        dicomFiles = None
        if kind == "dicom-seg":
            if not self.ensureDicomSegPackages():
                return None
            dicomFiles = self.logic.dicomFiles(self.params.reference("InputVolume"))
        try:
            written = self.logic.core.export(kind, path, overwrite, self.params, dicom_files=dicomFiles)
        except Exception as error:
            slicer.util.errorDisplay(f"Export failed: {error}")
            return None
        if kind == "dicom-seg" and self.logic.addToDicomDatabase(written):
            self.log(f"Added {written} to the DICOM database")
        self.ui.statusLabel.setText(f"Saved {written}")
        return written

    def ensureDicomSegPackages(self):
        """highdicom on the first DICOM SEG export, in a release that works with Slicer's pydicom."""
        plan = dependencies.dicom_seg_plan()
        if not plan.needed:
            return True
        if not slicer.util.confirmOkCancelDisplay(f"DICOM SEG export needs {plan.describe()}. Install now?"):
            return False
        self.pipInstall(plan)
        return not dependencies.dicom_seg_plan().needed


class MaxQuerySlicerTest(ScriptedLoadableModuleTest):
    """Slicer's self-test: the shipped demo CT from Sample Data through the real logic and the bundled
    model. On a Slicer without the run-time packages (a factory install) it says so and skips the
    inference part, as installing packages from a test would change the user's Slicer."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_demo_case()

    def test_demo_case(self):
        import SampleData
        import SimpleITK as sitk

        from MaxQuerySlicerLib import geometry, nodes

        registerSampleData()
        self.delayDisplay("Loading the demo CT from Sample Data")
        volume = SampleData.downloadSample(DEMO_SAMPLE)
        self.assertIsNotNone(volume, "the demo CT is not installed with the extension")
        plan = dependencies.make_plan()
        if plan.needed:
            message = f"MaxQuery inference skipped: this Slicer lacks {plan.describe()} (the panel installs them)."
            logging.warning(message)
            self.delayDisplay(message)
            return

        logic = MaxQuerySlicerLogic()
        try:
            params = logic.core.parameters()
            self.delayDisplay("Running MaxQuery on the demo CT")
            created = logic.core.process(volume, params)
            card = logic.core.read_card(logic.core.model_folder(params))
            segmentation = created.segmentation.GetSegmentation()
            names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
            self.assertEqual(names, [c.name for c in card.classes[1:]] + [nodes.CANDIDATE_NAME])
            anomaly = geometry.array_from_node(created.anomaly)
            self.assertTrue(0.0 <= anomaly.min() and anomaly.max() <= 1.0)
            self.assertGreater(anomaly.max(), 0.5)
            self.assertGreaterEqual(logic.core.set_threshold(0.5, params), logic.core.set_threshold(0.999, params))
            with tempfile.TemporaryDirectory() as folder:
                path = logic.core.export("labelmap", os.path.join(folder, "labels.nii.gz"), params=params)
                labels = sitk.ReadImage(str(path))
                self.assertEqual(labels.GetSize(), geometry.image_from_node(volume).GetSize())
                self.assertGreater(sitk.GetArrayViewFromImage(labels).max(), 0)
        finally:
            logic.core.close()
        self.delayDisplay("MaxQuery self-test passed")
