# A stand-in for Slicer's build-tree SlicerConfig.cmake, for configuring the extension in tests.
# Its macros do not build anything: they record their arguments, one "macro|key|value" line each,
# in ${CMAKE_BINARY_DIR}/slicer_stub_record.txt, and copy scripts and resources the way Slicer would.
set(Slicer_FOUND TRUE)
set(Slicer_USE_FILE "${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake")
set(Slicer_EXTENSION_GENERATE_CONFIG "${CMAKE_CURRENT_LIST_DIR}/SlicerExtensionGenerateConfig.cmake")
set(Slicer_EXTENSION_CPACK "${CMAKE_CURRENT_LIST_DIR}/SlicerExtensionCPack.cmake")
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR "lib/Slicer-5.9/qt-scripted-modules")
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR "${Slicer_QTSCRIPTEDMODULES_LIB_DIR}")
