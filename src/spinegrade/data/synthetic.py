"""Write a complete dataset in the RSNA 2024 layout, with real DICOM files, from a 3D phantom.

Each study is a lumbar spine built in patient space (LPS millimetres: x to the patient's left,
y posterior, z superior): vertebral bodies T12 to S1 on a lordotic curve, discs with a nucleus,
the spinal canal full of CSF behind them, pedicles with a neural foramen at every disc level, the
lateral recesses, posterior elements, paraspinal muscles and subcutaneous fat. Every grade is a
narrowing of the structure the radiologist looks at:

- spinal canal stenosis: the canal's antero-posterior diameter pinched at the disc level;
- neural foraminal narrowing: the fat-filled foramen (bright on T1) shrinking around its nerve;
- subarticular stenosis: the canal's lateral recess on that side closed by facet tissue.

Three series are sampled from the same phantom (Sagittal T1, Sagittal T2/STIR, Axial T2), so
their geometry agrees in patient space exactly as in real scans, and the label coordinates are
the phantom's own landmarks projected on the right slice. Studies vary in size, pixel spacing,
intensity scale, noise, bias field, instance-number start, sagittal slice direction and axial
stack layout. A few studies have no Sagittal T1 (``T1_MISSING``: graded, without foraminal points) or
a second one (``T1_SECOND``, unlabelled), drawn from a stream of their own so that the rest of each
study is what the seed gave before. The Axial T2 has the real data's layouts, from a stream of
their own too: rows running from the patient's left to the right (``AXIAL_ROWS_REVERSED``: the
patient's left on the image's left), and a second axial series (``AXIAL_SECOND``) that takes over the
lower levels, one level imaged in both. The 25 grades are drawn jointly, as correlated as the real ones,
and read by a noisy reader who sometimes writes a wrong label (``grade_model``); the answers folder keeps
what each image shows beside what its label says. The same seed gives the same bytes.
"""

from __future__ import annotations

import csv
import hashlib
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, RLELossless, generate_uid

from spinegrade.constants import (
    AXIAL_T2,
    CONDITION_SERIES_KIND,
    CONDITIONS,
    LABEL_COLUMNS,
    LEVELS,
    PROBABILITY_COLUMNS,
    SAGITTAL_T1,
    SAGITTAL_T2,
    SEVERITIES,
    condition_title,
    label_column,
    level_title,
    row_id,
)
from spinegrade.data.grade_model import TARGETS, StudyGrades, image_grade, study_grades

# Tissue intensities (arbitrary units, 1 = CSF on T2) per contrast.
TISSUES = {
    "T2": dict(fat=0.55, muscle=0.22, abdomen=0.30, marrow=0.42, bone=0.32, ligament=0.07, csf=1.0,
               nerve=0.25, annulus=0.22, nucleus=0.80, nucleus_degenerate=0.35),
    "T1": dict(fat=0.90, muscle=0.30, abdomen=0.36, marrow=0.66, bone=0.55, ligament=0.12, csf=0.17,
               nerve=0.32, annulus=0.36, nucleus=0.42, nucleus_degenerate=0.36),
}
# RepetitionTime and EchoTime (ms) a scanner writes for each contrast.
CONTRAST_TIMING = {"T1": (600.0, 10.0), "T2": (3500.0, 100.0)}
BODIES = ("S1", "L5", "L4", "L3", "L2", "L1", "T12")  # bottom to top
# Disc i lies between BODIES[i] and BODIES[i + 1]; the first five are the graded levels.
DISC_LEVELS = ("l5_s1", "l4_l5", "l3_l4", "l2_l3", "l1_l2", "t12_l1")


# Shares of studies with a Sagittal T1 quirk the real data has: none at all, or a second T1 series.
T1_MISSING = 0.04
T1_SECOND = 0.06
# Shares of studies with an Axial T2 quirk: rows running the other way (per series), a second axial series.
AXIAL_ROWS_REVERSED = 0.3
AXIAL_SECOND = 0.2

# Posture: how a real spine departs from a straight one centred in the stack, drawn per study from a
# stream of its own (``sample_posture``). Calibrated so that the label geometry of a generated set matches
# the real train_label_coordinates.csv's (``data.label_geometry``): the spinal canal on several sagittal
# slices across the levels in about 22 % of studies, each foramen two or more slices apart in about 29 %.
OFF_CENTRE_MM = 4.0  # the spine's lateral offset from the stacks' centre, uniform in +-this
LEAN_SD = 0.004  # lateral lean, mm of x per mm of z (normal, sd)
SCOLIOSIS = 0.10  # share of studies with a lateral curve
SCOLIOSIS_MM = (4.0, 12.0)  # its amplitude, uniform
ROTATION_SD_DEG = 3.0  # axial rotation of each vertebra about the canal (normal, sd)
FORAMEN_WIDENING_MM = 1.0  # each foramen this much farther from the canal at L5/S1 than at L1/L2
FORAMEN_SCATTER_MM = (0.3, 3.2)  # per study, the sd of the foramina's lateral scatter by level and side
RECESS_SCATTER_MM = 1.5  # sd of each lateral recess's narrowest point above or below its disc, per side


@dataclass
class SynthSettings:
    """What ``spinegrade synth`` varies. Image sizes are drawn per series from ``image_size``."""

    studies: int = 40
    test_studies: int = 5
    seed: int = 0
    image_size: tuple[int, int] = (256, 384)
    workers: int = 0  # 0: one per CPU core (at most 8)
    compressed_fraction: float = 0.1  # share of studies written with RLE Lossless transfer syntax
    # Spines straight and centred in the stacks (no offset, lean, curve or rotation); the same seed
    # otherwise gives the same studies, so a curved set and its straight twin can be compared.
    straight: bool = False
    # No rater noise and no wrong labels (grade_model): every image shows its graded narrowing and every
    # label is right; the same studies and the same joint grades as the noisy set of the same seed.
    clean_grades: bool = False
    # The test studies' series each stored as one Enhanced MR Image file (``data/multiframe.py``); the
    # training split keeps one file per slice, since its labels name instance files.
    multiframe: bool = False


@dataclass
class Anatomy:
    """One study's phantom: every size in mm, grades as indices into SEVERITIES."""

    body_height: np.ndarray  # per body in BODIES
    disc_height: np.ndarray  # per disc in DISC_LEVELS
    body_z: np.ndarray = field(init=False)  # body centres
    disc_z: np.ndarray = field(init=False)  # disc centres
    lordosis: float = 10.0
    body_ry: float = 16.0  # antero-posterior half-depth of a vertebral body
    body_rx: float = 22.0  # left-right half-width
    canal_ap: float = 7.5  # canal antero-posterior radius
    canal_lr: float = 11.0  # canal left-right radius
    grades: dict[str, np.ndarray] = field(default_factory=dict)  # condition -> label per level (train.csv's)
    narrowing: dict[str, np.ndarray] = field(default_factory=dict)  # condition -> the image's fraction per level
    drawn: StudyGrades | None = None  # the joint grades, the rater's noise and wrong labels behind both
    # Posture (``sample_posture``; the defaults give a straight spine centred at x = 0). The phantom is
    # built in the spine's own frame; ``to_spine`` and ``from_spine`` carry points between it and patient space.
    offset_x: float = 0.0  # lateral offset of the whole spine, mm
    lean: float = 0.0  # lateral lean, mm of x per mm of z
    scoliosis_mm: float = 0.0  # amplitude of a lateral curve (signed)
    scoliosis_centre: float = 0.0  # its apex (z, mm)
    scoliosis_length: float = 200.0  # half its wavelength, mm
    rotation_deg: np.ndarray | None = None  # axial rotation per body in BODIES, degrees (+: x turns to +y)
    foramen_dx: dict[str, np.ndarray] = field(default_factory=dict)  # condition -> lateral shift per level, mm
    recess_dz: dict[str, np.ndarray] = field(default_factory=dict)  # condition -> z shift per level, mm
    _boxes: dict = field(default_factory=dict, repr=False)  # patient_box's answers: every slice asks again

    def __post_init__(self):
        z = 0.0
        body_z, disc_z = [], []
        for i, h in enumerate(self.body_height):
            body_z.append(z + h / 2)
            z += h
            if i < len(self.disc_height):
                disc_z.append(z + self.disc_height[i] / 2)
                z += self.disc_height[i]
        self.body_z = np.array(body_z) - body_z[0]  # S1 centre at z = 0
        self.disc_z = np.array(disc_z) - body_z[0]

    @property
    def z_mid(self) -> float:
        return float(self.body_z[3])  # L3

    def spine_y(self, z: np.ndarray) -> np.ndarray:
        """Centre line of the vertebral bodies: lordosis brings the mid-lumbar spine forward."""
        half = (self.body_z[-1] - self.body_z[0]) / 2
        t = np.clip((z - self.z_mid) / half, -1.5, 1.5)
        return -self.lordosis * (1 - t**2)

    def canal_y(self, z: np.ndarray) -> np.ndarray:
        return self.spine_y(z) + self.body_ry + 1.5 + self.canal_ap

    def level_z(self, level: str) -> float:
        return float(self.disc_z[DISC_LEVELS.index(level)])

    def centre_x(self, z: np.ndarray) -> np.ndarray:
        """Where the canal's centre line lies left to right (patient x) at height ``z``."""
        curve = self.scoliosis_mm * np.cos(np.pi * (z - self.scoliosis_centre) / self.scoliosis_length)
        return self.offset_x + self.lean * (z - self.z_mid) + curve

    def _twist(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin of the axial rotation at height ``z``, interpolated between the vertebrae."""
        if self.rotation_deg is None:
            return np.ones_like(z), np.zeros_like(z)
        angle = np.deg2rad(np.interp(z, self.body_z, self.rotation_deg))
        return np.cos(angle), np.sin(angle)

    def to_spine(self, points: np.ndarray) -> np.ndarray:
        """Patient-space points (..., 3) in the spine's frame, where the phantom is straight and centred."""
        x, y, z = points[..., 0], points[..., 1], points[..., 2]
        c, s = self._twist(z)
        centre_y = self.canal_y(z)
        dx, dy = x - self.centre_x(z), y - centre_y
        return np.stack([c * dx + s * dy, -s * dx + c * dy + centre_y, z], axis=-1).astype(points.dtype)

    def from_spine(self, points: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`to_spine`: spine-frame points (..., 3) in patient space."""
        points = np.asarray(points, dtype=float)
        x, y, z = points[..., 0], points[..., 1], points[..., 2]
        c, s = self._twist(z)
        centre_y = self.canal_y(z)
        dy = y - centre_y
        return np.stack([self.centre_x(z) + c * x - s * dy, centre_y + s * x + c * dy, z], axis=-1)

    def patient_box(self, centre, half_size) -> tuple[np.ndarray, np.ndarray]:
        """(centre, half size) of a patient-space box that holds the spine-frame box ``centre`` +- ``half_size``."""
        key = tuple(float(v) for v in (*centre, *half_size))
        if key in self._boxes:
            return self._boxes[key]
        centre, half = np.asarray(centre, dtype=float), np.asarray(half_size, dtype=float)
        grid = np.stack(np.meshgrid(*[np.linspace(c - h, c + h, n) for c, h, n in zip(centre, half, (2, 2, 5))],
                                    indexing="ij"), axis=-1).reshape(-1, 3)
        moved = self.from_spine(grid)
        lo, hi = moved.min(axis=0) - 0.5, moved.max(axis=0) + 0.5
        self._boxes[key] = (lo + hi) / 2, (hi - lo) / 2
        return self._boxes[key]

    def recess_z(self, condition: str, level: str) -> float:
        """The height of a lateral recess's narrowest point: its disc's, moved by this side's scatter."""
        shift = self.recess_dz.get(condition)
        return self.level_z(level) + (float(shift[LEVELS.index(level)]) if shift is not None else 0.0)

    def foramen_centre(self, level: str, side: int) -> np.ndarray:
        """In the spine's frame: lateral to the canal, a little farther at the lower levels."""
        z = self.level_z(level) + 1.5
        k = LEVELS.index(level)
        condition = "left_neural_foraminal_narrowing" if side > 0 else "right_neural_foraminal_narrowing"
        scatter = float(self.foramen_dx[condition][k]) if condition in self.foramen_dx else 0.0
        lateral = self.canal_lr + 3.5 + FORAMEN_WIDENING_MM * k / (len(LEVELS) - 1) + scatter
        return np.array([side * lateral, float(self.canal_y(np.array(z))) - 0.2 * self.canal_ap, z])

    def landmark(self, condition: str, level: str) -> np.ndarray:
        """Where a radiologist would click for this condition and level, in patient space."""
        z = self.level_z(level)
        side = 1 if condition.startswith("left") else -1
        if condition == "spinal_canal_stenosis":
            point = np.array([0.0, float(self.canal_y(np.array(z))), z])
        elif "foraminal" in condition:
            point = self.foramen_centre(level, side)
        else:
            z = self.recess_z(condition, level)
            point = np.array([side * 0.7 * self.canal_lr, float(self.canal_y(np.array(z))), z])
        return self.from_spine(point)


def sample_anatomy(rng: np.random.Generator, rater: np.random.Generator | None = None,
                   clean: bool = False) -> Anatomy:
    """A study's phantom: its sizes and joint grades from ``rng``, its reader's noise and wrong labels from
    ``rater`` (a stream of its own; None: a child stream of ``rng``'s seed, drawing nothing from ``rng``).
    ``clean``: the image shows the graded narrowing and every label is right."""
    anatomy = Anatomy(
        body_height=rng.uniform(25, 31, len(BODIES)),
        disc_height=np.concatenate([rng.uniform(7, 11, len(DISC_LEVELS) - 1), [rng.uniform(6, 8)]]) * 1.0,
        lordosis=rng.uniform(4, 16),
        body_ry=rng.uniform(14.5, 17.5),
        body_rx=rng.uniform(20, 25),
        canal_ap=rng.uniform(6.5, 8.5),
        canal_lr=rng.uniform(10, 12.5),
    )
    grades = study_grades(rng, rater if rater is not None else rng.spawn(1)[0], clean=clean)
    anatomy.drawn = grades
    for condition in CONDITIONS:
        anatomy.grades[condition] = grades.labels_of(condition)
        anatomy.narrowing[condition] = grades.narrowing_of(condition)
    return anatomy


def sample_posture(anatomy: Anatomy, rng: np.random.Generator, straight: bool = False) -> None:
    """Give ``anatomy`` a real spine's posture: off the stacks' centre, a lean, in some studies a lateral
    curve, each vertebra turned a few degrees, the foramina scattered by level and side, each lateral
    recess narrowest a little above or below its disc. ``rng`` is the study's posture stream.
    ``straight``: the same draws, but the spine keeps its straight, centred line (the scatter of the
    foramina and recesses stays: it is where this patient has them, not how the spine is held)."""
    offset, lean = rng.uniform(-OFF_CENTRE_MM, OFF_CENTRE_MM), rng.normal(0, LEAN_SD)
    curved = rng.random() < SCOLIOSIS
    amplitude, apex, length = rng.uniform(*SCOLIOSIS_MM), rng.uniform(-40, 40), rng.uniform(160, 260)
    sign = rng.choice([-1.0, 1.0])
    rotation = rng.normal(0, ROTATION_SD_DEG, len(BODIES))
    if not straight:
        anatomy.offset_x, anatomy.lean, anatomy.rotation_deg = float(offset), float(lean), rotation
        if curved:
            anatomy.scoliosis_mm = float(amplitude * sign)
            anatomy.scoliosis_centre, anatomy.scoliosis_length = anatomy.z_mid + float(apex), float(length)
    scatter = rng.uniform(*FORAMEN_SCATTER_MM)
    for condition in ("left_neural_foraminal_narrowing", "right_neural_foraminal_narrowing"):
        anatomy.foramen_dx[condition] = rng.normal(0, scatter, len(LEVELS))
    for condition in ("left_subarticular_stenosis", "right_subarticular_stenosis"):
        anatomy.recess_dz[condition] = rng.normal(0, RECESS_SCATTER_MM, len(LEVELS))


def _soft(q: np.ndarray, radius: float, edge: float) -> np.ndarray:
    """Soft inside-mask of a shape with normalised radius ``q`` (1 on the surface)."""
    return np.clip(0.5 - (q - 1.0) * (radius / edge), 0.0, 1.0)


def _superellipsoid(p, centre, radii, power=2):
    """Normalised radius of an ellipsoid (power 2) or a rounded box (power 4)."""
    d = [((p[..., i] - centre[i]) * (1.0 / radii[i])) ** 2 for i in range(3)]
    if power == 4:
        return np.sqrt(np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2))
    return np.sqrt(d[0] + d[1] + d[2])


_CORNER_SIGNS = np.array([[i, j, k] for i in (-1, 1) for j in (-1, 1) for k in (-1, 1)], dtype=float)


class _PlaneGrid:
    """A planar grid of patient-space points, able to find the pixel window a box can touch.

    Shapes are evaluated only in their window: most of them cover a small part of any slice.
    """

    def __init__(self, points: np.ndarray):
        self.shape = points.shape[:2]
        self.origin = points[0, 0].astype(float)
        self.down = (points[1, 0] - points[0, 0]).astype(float)
        self.across = (points[0, 1] - points[0, 0]).astype(float)
        self.normal = np.cross(self.across, self.down)
        self.down_scaled = self.down / float(self.down @ self.down)
        self.across_scaled = self.across / float(self.across @ self.across)

    def window(self, centre, half_size) -> tuple[slice, slice] | None:
        corners = np.asarray(centre, dtype=float) + _CORNER_SIGNS * np.asarray(half_size, dtype=float) - self.origin
        side = corners @ self.normal
        if side.min() > 0 or side.max() < 0:
            return None  # the plane misses the box
        rows, cols = corners @ self.down_scaled, corners @ self.across_scaled
        r0, r1 = max(int(np.floor(rows.min())), 0), min(int(np.ceil(rows.max())) + 1, self.shape[0])
        c0, c1 = max(int(np.floor(cols.min())), 0), min(int(np.ceil(cols.max())) + 1, self.shape[1])
        if r0 >= r1 or c0 >= c1:
            return None
        return slice(r0, r1), slice(c0, c1)


def render(anatomy: Anatomy, points: np.ndarray, contrast: str, edge: float = 0.8) -> np.ndarray:
    """Signal of the phantom on a planar grid of patient-space ``points`` (rows, cols, 3).

    Shapes are described in the spine's frame (straight, centred): the grid is carried there
    (``Anatomy.to_spine``), and each shape's window is found from its box carried back to patient space."""
    t = TISSUES[contrast]
    grid = _PlaneGrid(points)
    points = anatomy.to_spine(points)
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    img = np.zeros(points.shape[:-1], dtype=np.float32)

    def paint(mask, value):
        nonlocal img
        img = img * (1 - mask) + value * mask

    def paint_shape(centre, radii, power, value, edge_radius, clip_y=None):
        """Paint one ellipsoid or rounded box, evaluated only in its pixel window."""
        window = grid.window(*anatomy.patient_box(centre, [r * 1.05 + 2 * edge for r in radii]))
        if window is None:
            return
        sub = points[window]
        q = _superellipsoid(sub, centre, radii, power)
        mask = _soft(q, edge_radius, edge)
        if clip_y is not None:
            mask = mask * ((sub[..., 1] > clip_y[0]) & (sub[..., 1] < clip_y[1]))
        img[window] = img[window] * (1 - mask) + value * mask

    spine_y = anatomy.spine_y(z)
    canal_y = anatomy.canal_y(z)
    canal_back = canal_y + anatomy.canal_ap
    # Torso (subcutaneous fat), then muscle and abdomen inside it.
    torso_centre_y = float(anatomy.canal_y(np.array(anatomy.z_mid))) - 45
    q = np.sqrt((x / 150) ** 2 + ((y - torso_centre_y) / 118) ** 2)
    paint(_soft(q, 118, edge), t["fat"])
    q = np.sqrt((x / 136) ** 2 + ((y - torso_centre_y) / 104) ** 2)
    paint(_soft(q, 104, edge) * (y < canal_back + 10), t["abdomen"])
    for side in (-1, 1):  # paraspinal muscles
        q = np.sqrt(((x - side * 24) / 21) ** 2 + ((y - canal_back - 24) / 24) ** 2)
        paint(_soft(q, 21, edge), t["muscle"])
    # Posterior elements (lamina, spinous process) and pedicles, level by level.
    for zc, h in zip(anatomy.body_z, anatomy.body_height):
        back = float(anatomy.canal_y(np.array(zc - 2))) + anatomy.canal_ap
        paint_shape((0, back + 19, zc - 2), (4.5, 19.5, 0.36 * h), 4, t["bone"], 4.5, (back + 0.5, back + 38))
        paint_shape((0, back + 3.5, zc - 2), (anatomy.canal_lr + 9, 3.5, 0.32 * h), 4, t["bone"], 3.5)
    band = (np.abs(x) > anatomy.canal_lr + 1) & (np.abs(x) < anatomy.canal_lr + 13)
    band &= (y > spine_y + anatomy.body_ry - 1) & (y < canal_back + 4)
    band &= (z > anatomy.body_z[0]) & (z < anatomy.body_z[-1])
    paint(band.astype(np.float32), t["bone"])
    # Vertebral bodies and discs.
    for zc, h in zip(anatomy.body_z, anatomy.body_height):
        paint_shape((0, float(anatomy.spine_y(np.array(zc))), zc), (anatomy.body_rx, anatomy.body_ry, h / 2), 4,
                    t["marrow"], h / 2)
    for i, (zc, h) in enumerate(zip(anatomy.disc_z, anatomy.disc_height)):
        centre = (0, float(anatomy.spine_y(np.array(zc))), zc)
        paint_shape(centre, (anatomy.body_rx, anatomy.body_ry, h / 2), 4, t["annulus"], h / 2)
        # a severely narrowed canal's disc has lost its water (what the image shows, not what was graded)
        degenerate = i < len(LEVELS) and image_grade(
            anatomy.narrowing["spinal_canal_stenosis"][LEVELS.index(DISC_LEVELS[i])]) == 2
        paint_shape(centre, (anatomy.body_rx * 0.6, anatomy.body_ry * 0.6, h / 3), 2,
                    t["nucleus_degenerate" if degenerate else "nucleus"], h / 3)
    # Spinal canal: a ligament/epidural envelope, then CSF narrowed by the three canal conditions.
    q = np.sqrt((x / (anatomy.canal_lr + 1.5)) ** 2 + ((y - canal_y) / (anatomy.canal_ap + 1.5)) ** 2)
    in_lumbar = (z > anatomy.body_z[0]) & (z < anatomy.body_z[-1] + 20)
    paint(_soft(q, anatomy.canal_ap, edge) * in_lumbar, t["ligament"])
    ap = np.full_like(x, anatomy.canal_ap)
    lr_left = np.full_like(x, anatomy.canal_lr)
    lr_right = np.full_like(x, anatomy.canal_lr)
    for k, level in enumerate(LEVELS):
        g = np.exp(-(((z - anatomy.level_z(level)) / 5.0) ** 2))
        ap -= anatomy.canal_ap * anatomy.narrowing["spinal_canal_stenosis"][k] * g
        for lr, condition in ((lr_left, "left_subarticular_stenosis"), (lr_right, "right_subarticular_stenosis")):
            at = np.exp(-(((z - anatomy.recess_z(condition, level)) / 5.0) ** 2))
            lr -= anatomy.canal_lr * 0.55 * anatomy.narrowing[condition][k] * at
    ap = np.maximum(ap, 0.4)
    lr = np.where(x > 0, lr_left, lr_right)
    q = np.sqrt((x / lr) ** 2 + ((y - canal_y) / ap) ** 2)
    paint(_soft(q, 2.0, edge) * in_lumbar, t["csf"])
    # Neural foramina: fat around the exiting nerve root, shrinking with its grade.
    for k, level in enumerate(LEVELS):
        for side, condition in ((1, "left_neural_foraminal_narrowing"), (-1, "right_neural_foraminal_narrowing")):
            s = anatomy.narrowing[condition][k]
            c = anatomy.foramen_centre(level, side)
            radii = (5.0, 4.5 * (1 - 0.75 * s), 7.0 * (1 - 0.75 * s))
            paint_shape(c, radii, 2, t["fat"], radii[1])
            paint_shape(c + np.array([0, -0.5, 0.3 * radii[2]]), (4.0, 1.6, 1.8), 2, t["nerve"], 1.6)
    return img


@dataclass
class SeriesGeometry:
    """Where each slice of a series lies: its top-left pixel position and orientation."""

    positions: list[np.ndarray]
    orientations: list[np.ndarray]
    rows: int
    cols: int
    spacing: float
    thickness: float
    slice_levels: list[str] | None = None  # the level each slice images (axial series)

    def subset(self, keep: list[int]) -> "SeriesGeometry":
        """The same series with only the slices ``keep``."""
        return SeriesGeometry([self.positions[i] for i in keep], [self.orientations[i] for i in keep], self.rows,
                              self.cols, self.spacing, self.thickness,
                              [self.slice_levels[i] for i in keep] if self.slice_levels else None)

    def points(self, i: int) -> np.ndarray:
        o = self.orientations[i]
        r = np.arange(self.rows, dtype=np.float32)[:, None, None]
        c = np.arange(self.cols, dtype=np.float32)[None, :, None]
        return (self.positions[i][None, None, :] + c * self.spacing * o[:3] + r * self.spacing * o[3:]).astype(
            np.float32
        )

    def locate(self, point: np.ndarray) -> tuple[int, float, float]:
        """Nearest slice to ``point`` and the pixel (x, y) of its projection there."""
        best = None
        for i, (pos, o) in enumerate(zip(self.positions, self.orientations)):
            normal = np.cross(o[:3], o[3:])
            d = abs(float(np.dot(point - pos, normal)))
            if best is None or d < best[0]:
                best = (d, i)
        i = best[1]
        offset = point - self.positions[i]
        o = self.orientations[i]
        return i, float(np.dot(offset, o[:3]) / self.spacing), float(np.dot(offset, o[3:]) / self.spacing)


def _size(rng, settings: SynthSettings) -> int:
    lo, hi = settings.image_size
    return int(rng.integers(lo // 16, hi // 16 + 1) * 16)


def sagittal_geometry(anatomy: Anatomy, rng, settings: SynthSettings) -> SeriesGeometry:
    n = int(rng.integers(15, 20))
    gap = rng.uniform(3.4, 4.4)
    xs = (np.arange(n) - (n - 1) / 2) * gap + rng.uniform(-1.5, 1.5)
    size = _size(rng, settings)
    fov = rng.uniform(220, 270)
    spacing = fov / size
    centre_y = float(anatomy.canal_y(np.array(anatomy.z_mid))) - 10 + rng.uniform(-12, 12)
    centre_z = anatomy.z_mid + rng.uniform(-10, 10)
    orientation = np.array([0.0, 1.0, 0.0, 0.0, 0.0, -1.0])
    positions = [np.array([x, centre_y - fov / 2, centre_z + fov / 2]) for x in xs]
    return SeriesGeometry(positions, [orientation] * n, size, size, spacing, gap * 0.9)


def axial_geometry(anatomy: Anatomy, rng, settings: SynthSettings, levels: list[str],
                   rows_reversed: bool = False) -> SeriesGeometry:
    """Three to four slices through each disc; some studies get two stacks with different tilts.
    ``rows_reversed``: each row runs from the patient's left to the right (the usual runs right to left,
    so that the patient's left is on the image's right)."""
    size = _size(rng, settings)
    fov = rng.uniform(170, 220)
    spacing = fov / size
    two_stacks = rng.random() < 0.35
    tilts = (rng.uniform(-12, -4), rng.uniform(4, 12)) if two_stacks else (0.0, 0.0)
    per_level = int(rng.integers(3, 5))
    gap = rng.uniform(3.5, 4.5)
    positions, orientations, slice_levels = [], [], []
    centre_x = rng.uniform(-5, 5)
    for level in levels:
        tilt = np.deg2rad(tilts[0] if LEVELS.index(level) < 3 else tilts[1])
        row_dir = np.array([-1.0 if rows_reversed else 1.0, 0.0, 0.0])
        col_dir = np.array([0.0, np.cos(tilt), np.sin(tilt)])
        normal = np.cross(row_dir, col_dir)
        z = anatomy.level_z(level)
        centre = np.array([centre_x, float(anatomy.canal_y(np.array(z))) - 15, z])
        for j in range(per_level):
            c = centre + normal * (j - (per_level - 1) / 2) * gap
            positions.append(c - row_dir * spacing * size / 2 - col_dir * spacing * size / 2)
            orientations.append(np.concatenate([row_dir, col_dir]))
            slice_levels.append(level)
    return SeriesGeometry(positions, orientations, size, size, spacing, gap * 0.9, slice_levels)


def _acquire(anatomy, geometry: SeriesGeometry, contrast: str, rng, images: bool = True) -> list[np.ndarray | None]:
    """Render every slice with scanner-like noise, bias field and intensity scale, as uint16.
    ``images`` False: no image, but the same draws from ``rng`` (what follows stays as it was)."""
    noise = rng.uniform(0.015, 0.05)
    scale = rng.uniform(600, 3000)
    gradient = rng.uniform(-0.25, 0.25, 2)
    out: list[np.ndarray | None] = []
    for i in range(len(geometry.positions)):
        if not images:
            for _ in range(2):
                rng.normal(0, noise, (geometry.rows, geometry.cols))
            out.append(None)
            continue
        clean = render(anatomy, geometry.points(i), contrast, edge=max(0.6, geometry.spacing))
        rr, cc = np.meshgrid(np.linspace(-1, 1, geometry.rows), np.linspace(-1, 1, geometry.cols), indexing="ij")
        bias = 1 + gradient[0] * rr + gradient[1] * cc
        noisy = np.sqrt((clean * bias + rng.normal(0, noise, clean.shape)) ** 2 + rng.normal(0, noise, clean.shape) ** 2)
        out.append(np.clip(noisy * scale, 0, 65535).astype(np.uint16))
    return out


def _uid(*parts) -> str:
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def write_dicom(path: Path, pixels: np.ndarray, meta: dict, compressed: bool) -> None:
    """One MR Image Storage file, 16-bit MONOCHROME2, with the geometry tags set."""
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = MRImageStorage
    file_meta.MediaStorageSOPInstanceUID = meta["sop_uid"]
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=file_meta, preamble=b"\0" * 128)
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta["sop_uid"]
    ds.StudyInstanceUID = meta["study_uid"]
    ds.SeriesInstanceUID = meta["series_uid"]
    ds.FrameOfReferenceUID = meta["frame_uid"]
    ds.Modality = "MR"
    ds.PatientID = str(meta["study_id"])
    ds.StudyID = str(meta["study_id"])[-8:]
    ds.SeriesNumber = meta["series_number"]
    ds.InstanceNumber = meta["instance_number"]
    ds.SeriesDescription = meta["description"]
    ds.ImagePositionPatient = [round(float(v), 4) for v in meta["position"]]
    ds.ImageOrientationPatient = [round(float(v), 6) for v in meta["orientation"]]
    ds.PixelSpacing = [round(meta["spacing"], 6), round(meta["spacing"], 6)]
    ds.SliceThickness = round(meta["thickness"], 3)
    ds.RepetitionTime, ds.EchoTime = CONTRAST_TIMING[meta["contrast"]]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    if compressed:
        ds.compress(RLELossless, pixels, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)


@dataclass
class StudyRecord:
    """What a study contributes to the CSV files."""

    study_id: int
    series: list[tuple[int, str]]  # (series_id, description)
    labels: dict[str, str]  # train.csv column -> grade string ("" when unlabelled)
    coordinates: list[tuple[int, int, str, str, float, float]]  # series, instance, condition, level, x, y
    # per target: (condition, level, image narrowing, graded narrowing, drawn grade, image grade, label, wrong kind)
    answers: list[tuple] = field(default_factory=list)


def _study_rng(seed: int, index: int, split: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{split}:{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def make_study(images_dir: Path | None, study_id: int, index: int, split: str, settings: SynthSettings) -> StudyRecord:
    """Render and write one study's three series; return its labels and coordinates. ``images_dir``
    None: the same labels and coordinates, no image rendered or written (``label_records``)."""
    rng = _study_rng(settings.seed, index, split)
    # The reader's noise and wrong labels draw from a stream of their own: a clean twin differs in them only.
    anatomy = sample_anatomy(rng, _study_rng(settings.seed, index, f"{split}:rater"), settings.clean_grades)
    # The posture and the recess labels' series draw from a stream of their own, as the quirks below.
    posture = _study_rng(settings.seed, index, f"{split}:posture")
    sample_posture(anatomy, posture, settings.straight)
    compressed = rng.random() < settings.compressed_fraction
    axial_levels = list(LEVELS) if rng.random() > 0.06 else list(LEVELS[1:])  # axial may miss L1/L2
    # The axial quirks draw from a stream of their own, as the T1 ones below.
    axial = _study_rng(settings.seed, index, f"{split}:axial")
    reversed_rows = [axial.random() < AXIAL_ROWS_REVERSED for _ in range(2)]
    split_at = int(axial.integers(1, len(axial_levels) - 1)) if axial.random() < AXIAL_SECOND else None
    # A second axial series takes the levels below split_at; the level at split_at is in both.
    first_levels = axial_levels if split_at is None else axial_levels[:split_at + 1]
    plan = [
        (SAGITTAL_T1, "T1", sagittal_geometry(anatomy, rng, settings)),
        (SAGITTAL_T2, "T2", sagittal_geometry(anatomy, rng, settings)),
        # rendered whole, then cut to first_levels: the study's other draws stay as they were
        (AXIAL_T2, "T2", axial_geometry(anatomy, rng, settings, axial_levels, reversed_rows[0])),
    ]
    if split_at is not None:
        plan.append((AXIAL_T2, "T2", axial_geometry(anatomy, axial, settings, axial_levels[split_at:],
                                                    reversed_rows[1]), axial))
    # The T1 quirks draw from a stream of their own, so the rest of a study is what it was without them.
    quirks = _study_rng(settings.seed, index, f"{split}:t1")
    t1_missing = quirks.random() < T1_MISSING
    if not t1_missing and quirks.random() < T1_SECOND:  # a repeated T1 (the first one keeps the labels)
        plan.append((SAGITTAL_T1, "T1", sagittal_geometry(anatomy, quirks, settings), quirks))
    study_uid = _uid(settings.seed, split, study_id)
    series, coordinates = [], []
    located: dict[str, tuple[int, SeriesGeometry, list[int]]] = {}
    axial_series: list[tuple[int, SeriesGeometry, list[int]]] = []  # every axial series, in plan order
    for number, (description, contrast, geometry, *own) in enumerate(plan, start=1):
        draw = own[0] if own else rng
        series_id = int(draw.integers(10**7, 4 * 10**9))
        n = len(geometry.positions)
        first = int(draw.choice([1, 1, 1, int(draw.integers(2, 6000))]))
        order = np.arange(n) if draw.random() < 0.5 else np.arange(n)[::-1]  # either left-right direction
        instance_numbers = [first + int(k) for k in np.argsort(order)]
        images = _acquire(anatomy, geometry, contrast, draw, images=images_dir is not None)
        if description == AXIAL_T2 and not own and split_at is not None:  # the first axial series, cut
            keep = [i for i, level in enumerate(geometry.slice_levels) if level in first_levels]
            geometry, images = geometry.subset(keep), [images[i] for i in keep]
            instance_numbers = [instance_numbers[i] for i in keep]
        if description == SAGITTAL_T1 and t1_missing:
            continue  # rendered all the same: the study's other draws stay as they were
        series_dir = images_dir / str(study_id) / str(series_id) if images_dir is not None else None
        if series_dir is not None:
            series_dir.mkdir(parents=True, exist_ok=True)
        series_uid = _uid(settings.seed, split, study_id, series_id)
        for i, pixels in enumerate(images if series_dir is not None else []):
            meta = dict(
                sop_uid=_uid(settings.seed, split, study_id, series_id, i), study_uid=study_uid,
                series_uid=series_uid, frame_uid=study_uid, study_id=study_id, series_number=number,
                instance_number=instance_numbers[i], description=description, position=geometry.positions[i],
                orientation=geometry.orientations[i], spacing=geometry.spacing, thickness=geometry.thickness,
                contrast=contrast,
            )
            write_dicom(series_dir / f"{instance_numbers[i]}.dcm", pixels, meta, compressed)
        series.append((series_id, description))
        located.setdefault(description, (series_id, geometry, instance_numbers))
        if description == AXIAL_T2:
            axial_series.append((series_id, geometry, instance_numbers))

    labels = {}
    for condition in CONDITIONS:
        for k, level in enumerate(LEVELS):
            column = label_column(condition, level)
            if "subarticular" in condition and level not in axial_levels:
                labels[column] = ""  # the axial stack does not reach this level
                continue
            labels[column] = SEVERITIES[anatomy.grades[condition][k]]
            if CONDITION_SERIES_KIND[condition] not in located:  # a missing series: graded, but no point to show
                rng.normal(0, 0.8, 2)  # the draw the point would have taken
                continue
            series_id, geometry, instance_numbers = located[CONDITION_SERIES_KIND[condition]]
            if "subarticular" in condition:  # labelled on one of the axial series that image the level
                imaging = [a for a, levels in zip(axial_series, [first_levels, axial_levels[split_at or 0:]])
                           if level in levels]
                series_id, geometry, instance_numbers = imaging[int(posture.integers(len(imaging)))]
            i, px, py = geometry.locate(anatomy.landmark(condition, level))
            jitter = rng.normal(0, 0.8, 2)  # annotators click within a pixel or so
            coordinates.append(
                (series_id, instance_numbers[i], condition_title(condition), level_title(level),
                 round(px + jitter[0], 4), round(py + jitter[1], 4))
            )
    return StudyRecord(study_id, series, labels, coordinates, _answers(anatomy.drawn, labels))


def _answers(grades: StudyGrades, labels: dict[str, str]) -> list[tuple]:
    """What the reader and the image say of every labelled target (the answers folder's grades files)."""
    rows = []
    truth = image_grade(grades.image_narrowing)
    for t, column in enumerate(TARGETS):
        if not labels.get(column):
            continue  # unlabelled: the stack does not reach the level
        condition, level = column[: -len(LEVELS[0]) - 1], column[-len(LEVELS[0]):]
        rows.append((condition, level, round(float(grades.image_narrowing[t]), 4),
                     round(float(grades.graded_narrowing[t]), 4), SEVERITIES[grades.drawn[t]],
                     SEVERITIES[truth[t]], labels[column], grades.wrong[t]))
    return rows


def _study_ids(rng: np.random.Generator, n: int) -> list[int]:
    ids: set[int] = set()
    while len(ids) < n:
        ids.add(int(rng.integers(4_000_000, 4_290_000_000)))
    return sorted(ids)


def label_records(settings: SynthSettings, split: str = "train") -> list[StudyRecord]:
    """The labels and coordinates ``write_dataset`` would write for ``split``, without images: seconds
    for hundreds of studies, for comparing the label geometry with the real data's."""
    rng = np.random.default_rng(settings.seed)
    ids = _study_ids(rng, settings.studies + settings.test_studies)
    order = rng.permutation(len(ids))
    chosen = order[: settings.studies] if split == "train" else order[settings.studies:]
    return [make_study(None, sid, i, split, settings) for i, sid in enumerate(sorted(ids[i] for i in chosen))]


def grade_records(settings: SynthSettings, split: str = "train") -> list[tuple[int, StudyGrades]]:
    """(study_id, grades) of every study of ``split``: the very grades ``write_dataset`` would draw (the
    first draws of each study's stream, and its rater stream), without geometry or images: thousands of
    studies a second, for calibrating the rater's noise. Every target is listed, the few cells a short
    axial stack leaves unlabelled included."""
    rng = np.random.default_rng(settings.seed)
    ids = _study_ids(rng, settings.studies + settings.test_studies)
    order = rng.permutation(len(ids))
    chosen = order[: settings.studies] if split == "train" else order[settings.studies:]
    out = []
    for index, study_id in enumerate(sorted(ids[i] for i in chosen)):
        anatomy = sample_anatomy(_study_rng(settings.seed, index, split),
                                 _study_rng(settings.seed, index, f"{split}:rater"), settings.clean_grades)
        out.append((study_id, anatomy.drawn))
    return out


def coordinate_frames(records: list[StudyRecord]) -> tuple:
    """(coordinates, series descriptions) of ``records`` as the CSV files hold them (pandas frames)."""
    import pandas as pd

    coordinates = pd.DataFrame([(r.study_id, *c) for r in records for c in r.coordinates],
                               columns=["study_id", "series_id", "instance_number", "condition", "level", "x", "y"])
    series = pd.DataFrame([(r.study_id, sid, desc) for r in records for sid, desc in r.series],
                          columns=["study_id", "series_id", "series_description"])
    return coordinates, series


def _write_csv(path: Path, header: list[str], rows) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _run(args):
    return make_study(*args)


def write_dataset(data_dir: str | Path, settings: SynthSettings, answers_dir: str | Path | None = None) -> dict:
    """Write a dataset in the RSNA layout to ``data_dir``; the test split's true labels and
    coordinates go to ``answers_dir`` (``<data_dir>-answers`` by default), outside what a model reads.
    """
    data_dir = Path(data_dir)
    answers_dir = Path(answers_dir) if answers_dir else data_dir.parent / f"{data_dir.name}-answers"
    data_dir.mkdir(parents=True, exist_ok=True)
    answers_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(settings.seed)
    ids = _study_ids(rng, settings.studies + settings.test_studies)
    order = rng.permutation(len(ids))
    train_ids = sorted(ids[i] for i in order[: settings.studies])
    test_ids = sorted(ids[i] for i in order[settings.studies :])
    jobs = [(data_dir / "train_images", sid, i, "train", settings) for i, sid in enumerate(train_ids)]
    jobs += [(data_dir / "test_images", sid, i, "test", settings) for i, sid in enumerate(test_ids)]
    workers = settings.workers or min(8, os.cpu_count() or 1)
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers) as pool:
            records = list(pool.map(_run, jobs, chunksize=1))
    else:
        records = [_run(job) for job in jobs]
    train, test = records[: len(train_ids)], records[len(train_ids) :]
    if settings.multiframe:
        from spinegrade.data.multiframe import to_multiframe

        for series_dir in sorted(p for p in (data_dir / "test_images").glob("*/*") if p.is_dir()):
            to_multiframe(series_dir)

    label_header = ["study_id", *LABEL_COLUMNS]
    coord_header = ["study_id", "series_id", "instance_number", "condition", "level", "x", "y"]
    series_header = ["study_id", "series_id", "series_description"]
    for target_dir, name, recs in ((data_dir, "train", train), (answers_dir, "test", test)):
        _write_csv(target_dir / f"{name}.csv", label_header,
                   ([r.study_id, *(r.labels[c] for c in LABEL_COLUMNS)] for r in recs))
        _write_csv(target_dir / f"{name}_label_coordinates.csv", coord_header,
                   ([r.study_id, *c] for r in recs for c in r.coordinates))
    for name, recs in (("train", train), ("test", test)):
        _write_csv(data_dir / f"{name}_series_descriptions.csv", series_header,
                   ([r.study_id, sid, desc] for r in recs for sid, desc in r.series))
    grade_header = ["study_id", "condition", "level", "image_narrowing", "graded_narrowing", "drawn_grade",
                    "image_grade", "label", "wrong_label"]
    for name, recs in (("train", train), ("test", test)):
        _write_csv(answers_dir / f"{name}_grades.csv", grade_header,
                   ([r.study_id, *a] for r in recs for a in r.answers))
    _write_csv(answers_dir / "wrong_labels.csv",
               ["split", "study_id", "condition", "level", "kind", "drawn_grade", "label"],
               ([name, r.study_id, a[0], a[1], a[7], a[4], a[6]]
                for name, recs in (("train", train), ("test", test)) for r in recs for a in r.answers if a[7]))
    sample_rows = sorted(row_id(r.study_id, c, lv) for r in test for c in CONDITIONS for lv in LEVELS)
    _write_csv(data_dir / "sample_submission.csv", ["row_id", *PROBABILITY_COLUMNS],
               ([rid, 1 / 3, 1 / 3, 1 / 3] for rid in sample_rows))
    return {"data_dir": str(data_dir), "answers_dir": str(answers_dir),
            "train_studies": len(train), "test_studies": len(test)}
