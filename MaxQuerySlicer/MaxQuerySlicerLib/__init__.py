"""Qt-free library of the MaxQuerySlicer module: everything that builds, updates or exports MRML nodes.

It imports only ``slicer`` (the MRML/VTK part that also ships as ``slicer-core`` on PyPI), vtk,
numpy and SimpleITK, never ``qt``/``ctk``/``slicer.app``, so it runs and is tested outside Slicer.
"""
