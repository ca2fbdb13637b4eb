"""MaxQuery: mask-transformer segmentation and out-of-distribution localisation for CT.

The Slicer-free core: networks, anomaly scores, metrics, image I/O, model folders and inference.
"""

__version__ = "0.1.0"
