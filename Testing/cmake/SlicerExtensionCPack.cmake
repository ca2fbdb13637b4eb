slicer_stub_record(extension CPACK "${PROJECT_NAME}")
