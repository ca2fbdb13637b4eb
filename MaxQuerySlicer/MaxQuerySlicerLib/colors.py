"""Colour tables built in code, so the module never depends on Slicer's file-based tables."""

from __future__ import annotations

import numpy as np

# matplotlib's "inferno" (perceptually uniform, colour-blind safe, readable in greyscale) at 17 stops.
INFERNO_STOPS = np.array([
    (0.0015, 0.0005, 0.0139), (0.0423, 0.0281, 0.1411), (0.1293, 0.0473, 0.2908), (0.2383, 0.0366, 0.3964),
    (0.3415, 0.0623, 0.4294), (0.4412, 0.0993, 0.4316), (0.5409, 0.1347, 0.4151), (0.6401, 0.1714, 0.3811),
    (0.7357, 0.2159, 0.3302), (0.8224, 0.2752, 0.2661), (0.8943, 0.3534, 0.1936), (0.9470, 0.4492, 0.1153),
    (0.9784, 0.5579, 0.0349), (0.9879, 0.6753, 0.0653), (0.9746, 0.7977, 0.2063), (0.9476, 0.9174, 0.4107),
    (0.9884, 0.9984, 0.6449),
])
ANOMALY_TABLE_NAME = "MaxQuery Inferno (anomaly)"
CANDIDATE_COLOR = (0.0, 0.9, 1.0)  # cyan: distinct from inferno's hues and from typical organ colours


def inferno_rgba(count: int = 256, transparent_fraction: float = 0.125) -> np.ndarray:
    """``count`` RGBA rows; alpha ramps from 0 over the lowest ``transparent_fraction`` so that
    inlier-like scores leave the CT visible under the overlay."""
    positions = np.linspace(0.0, 1.0, count)
    stops = np.linspace(0.0, 1.0, len(INFERNO_STOPS))
    rgb = np.stack([np.interp(positions, stops, INFERNO_STOPS[:, c]) for c in range(3)], axis=1)
    alpha = np.clip(positions / transparent_fraction, 0.0, 1.0) if transparent_fraction > 0 else np.ones(count)
    return np.column_stack([rgb, alpha])


def create_color_table(scene, name: str, rows: list[tuple[str, tuple[float, ...]]]):
    """A user colour table node: one named RGB(A) entry per row, index = row number."""
    table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
    table.SetTypeToUser()
    table.HideFromEditorsOn()
    table.SetNumberOfColors(len(rows))
    table.GetLookupTable().SetRange(0, len(rows) - 1)
    for index, (label, color) in enumerate(rows):
        rgba = tuple(color) + (1.0,) * (4 - len(color))
        table.SetColor(index, label, *rgba)
    return table


def anomaly_color_table(scene):
    """The shared inferno table for anomaly volumes; created once per scene."""
    existing = scene.GetFirstNodeByName(ANOMALY_TABLE_NAME)
    if existing is not None and existing.IsA("vtkMRMLColorTableNode"):
        return existing
    rows = [(f"{i / 255:.3f}", tuple(rgba)) for i, rgba in enumerate(inferno_rgba())]
    table = create_color_table(scene, ANOMALY_TABLE_NAME, rows)
    table.SetAttribute("MaxQuery.colormap", "inferno")
    return table
