"""How a synthetic study's 25 grades are drawn, and how its reader strays from what the image shows.

Real grades are neither independent nor exact. A study with a tight canal at L4/L5 tends to have tight
recesses at L4/L5 and a tight canal at L3/L4; left and right go together; and one radiologist graded each
real study, with moderate agreement between readers (lowest on the lateral recesses). Both shape what a
real score rewards, so the generator draws both:

- **Joint grades.** The 25 grades of a study come from a Gaussian copula: 25 correlated standard normals
  (``COPULA_FILE``, derived from the real ``train.csv`` by ``scripts/derive_grade_copula.py``; only
  the derived matrix is kept) cut at each level's grade frequencies (``GRADE_PRIORS``). The same normal
  also places the graded narrowing within its grade's band, so a high Moderate is closer to Severe.
- **Rater noise.** The image's narrowing strays from the graded one by ``RATER_SPREAD`` (normal, per
  condition family): a perfect reader of the image cannot get every grade right, as no real reader does.
  The spreads were chosen so that such a reader (``spinegrade.oracle``) scores about 0.85 times the best
  published real loss-to-prior ratio per term (docs/data.md gives the figures).
- **Wrong labels.** About ``WRONG_LABEL_SHARE`` of the labels are wrong in one of three ways
  (``WRONG_LABEL_KINDS``): a grade one or two steps off, left and right swapped, or a level's grade
  written for its neighbour.

The noise and the wrong labels draw from a stream of their own (the study's ``rater`` stream), so a
set and its ``clean`` twin have the same studies and the same joint grades.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy.special import ndtr

from spinegrade.constants import CONDITION_SPECS, CONDITIONS, LEVELS, label_column

# Grade frequencies per condition family and level, close to the real training set's (spinal canal
# stenosis about 88/7/5 %, worst at L4/L5; foramina worst low; subarticular worst at L4/L5).
GRADE_PRIORS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "spinal_canal_stenosis": ((0.955, 0.034, 0.011), (0.897, 0.076, 0.027), (0.822, 0.117, 0.061),
                              (0.751, 0.120, 0.129), (0.965, 0.025, 0.010)),
    "neural_foraminal_narrowing": ((0.964, 0.032, 0.004), (0.910, 0.086, 0.004), (0.770, 0.209, 0.021),
                                   (0.612, 0.320, 0.068), (0.641, 0.258, 0.101)),
    "subarticular_stenosis": ((0.930, 0.056, 0.014), (0.827, 0.132, 0.041), (0.670, 0.231, 0.099),
                              (0.451, 0.316, 0.233), (0.714, 0.205, 0.081)),
}
# How much a grade narrows its structure (fraction of the normal size removed): the graded narrowing lies
# in its grade's band; neighbouring bands nearly touch.
NARROWING = ((0.0, 0.28), (0.32, 0.60), (0.56, 0.88))
# The narrowing at which a reader who saw it exactly would call the next grade (between the bands).
GRADE_CUTS = (0.30, 0.58)
# The image's narrowing is the graded one plus a normal error of this sd, per condition family.
RATER_SPREAD = {"spinal": 0.06, "foraminal": 0.105, "subarticular": 0.11}
NARROWING_RANGE = (0.0, 0.92)  # the image's narrowing is kept within this
WRONG_LABEL_SHARE = 0.02
# Kinds of wrong label and their shares: a grade off (one or two steps), left and right swapped at a
# level, a level given its neighbour's grade.
WRONG_LABEL_KINDS = {"grade": 0.5, "side": 0.25, "level": 0.25}
TWO_STEPS = 0.1  # share of the grade errors that are two steps off (Normal/Mild <-> Severe)

COPULA_FILE = Path(__file__).with_name("grade_copula.json")
TARGETS: tuple[str, ...] = tuple(label_column(c, lv) for c in CONDITIONS for lv in LEVELS)


def family(condition: str) -> str:
    """``GRADE_PRIORS``' key: the condition without its side."""
    return condition.replace("left_", "").replace("right_", "")


def marginals() -> np.ndarray:
    """(25, 3): each target's grade frequencies, in ``TARGETS`` order."""
    return np.array([GRADE_PRIORS[family(c)][k] for c in CONDITIONS for k in range(len(LEVELS))])


@lru_cache(maxsize=1)
def latent_cholesky() -> np.ndarray:
    """The Cholesky factor of the copula's correlation matrix (``COPULA_FILE``, read once)."""
    data = json.loads(COPULA_FILE.read_text())
    if tuple(data["targets"]) != TARGETS:
        raise ValueError(f"{COPULA_FILE}: its targets are not the 25 of train.csv in order")
    return np.linalg.cholesky(np.array(data["latent_correlation"], dtype=float))


@dataclass
class StudyGrades:
    """One study's grades, each array in ``TARGETS`` order (25)."""

    drawn: np.ndarray  # the joint grades (0, 1, 2): what the reader graded
    graded_narrowing: np.ndarray  # the narrowing the reader saw, within the drawn grade's band
    image_narrowing: np.ndarray  # what the image shows
    labels: np.ndarray  # what train.csv says: the drawn grade, or a wrong label
    wrong: list[str]  # per target: "" or the kind of wrong label

    def narrowing_of(self, condition: str) -> np.ndarray:
        """The image's narrowing per level for ``condition`` (what the phantom renders)."""
        i = CONDITIONS.index(condition) * len(LEVELS)
        return self.image_narrowing[i:i + len(LEVELS)]

    def drawn_of(self, condition: str) -> np.ndarray:
        i = CONDITIONS.index(condition) * len(LEVELS)
        return self.drawn[i:i + len(LEVELS)]

    def labels_of(self, condition: str) -> np.ndarray:
        i = CONDITIONS.index(condition) * len(LEVELS)
        return self.labels[i:i + len(LEVELS)]


def draw_joint_grades(rng: np.random.Generator, cholesky: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(grades, graded narrowing), each (25,): one draw of the copula from ``rng`` (25 normals).
    ``cholesky``: of another correlation matrix than the committed one (while deriving it)."""
    factor = latent_cholesky() if cholesky is None else cholesky
    u = ndtr(factor @ rng.standard_normal(len(TARGETS)))
    cumulative = np.cumsum(marginals(), axis=1)
    grades = np.minimum((u[:, None] > cumulative[:, :2]).sum(axis=1), 2)
    low = np.where(grades > 0, cumulative[np.arange(len(u)), np.maximum(grades - 1, 0)], 0.0)
    high = cumulative[np.arange(len(u)), grades]
    within = np.clip((u - low) / np.maximum(high - low, 1e-12), 0.0, 1.0)
    bands = np.array(NARROWING)[grades]
    return grades, bands[:, 0] + within * (bands[:, 1] - bands[:, 0])


def image_grade(narrowing: np.ndarray) -> np.ndarray:
    """The grade a reader who saw the narrowing exactly would give."""
    return np.searchsorted(np.array(GRADE_CUTS), np.asarray(narrowing), side="right")


def _partner(target: int) -> int | None:
    """The same condition and level on the patient's other side; None for a midline condition."""
    n_levels = len(LEVELS)
    condition, k = CONDITIONS[target // n_levels], target % n_levels
    if CONDITION_SPECS[condition].side is None:
        return None
    other = condition.replace("left_", "right_") if condition.startswith("left_") else condition.replace("right_", "left_")
    return CONDITIONS.index(other) * n_levels + k


def _wrong_labels(drawn: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """``drawn`` with about ``WRONG_LABEL_SHARE`` of its grades wrong, and each target's kind ("" if right).

    A swap of sides or of levels is drawn only where it changes a grade (among the targets whose partner
    or neighbour was graded otherwise); where the study has none left, the error is a grade off instead."""
    labels, wrong = drawn.copy(), [""] * len(drawn)
    n_levels = len(LEVELS)
    kinds, shares = list(WRONG_LABEL_KINDS), np.array(list(WRONG_LABEL_KINDS.values()))
    # a swap makes two wrong labels: fewer mistakes, so that about WRONG_LABEL_SHARE of the labels are wrong
    per_mistake = 1 + WRONG_LABEL_KINDS["side"] / sum(WRONG_LABEL_KINDS.values())
    for _ in range(int(rng.binomial(len(drawn), WRONG_LABEL_SHARE / per_mistake))):
        kind = kinds[int(rng.choice(len(kinds), p=shares / shares.sum()))]
        right = [t for t in range(len(drawn)) if not wrong[t]]
        if kind == "side":
            pairs = [(t, _partner(t)) for t in right if _partner(t) is not None and not wrong[_partner(t)]
                     and labels[_partner(t)] != labels[t]]
            if pairs:
                a, b = pairs[int(rng.integers(len(pairs)))]
                labels[a], labels[b] = labels[b], labels[a]
                wrong[a] = wrong[b] = "side"
                continue
        if kind == "level":
            moves = [(t, t + d) for t in right for d in (-1, 1)
                     if 0 <= t % n_levels + d < n_levels and drawn[t + d] != drawn[t]]
            if moves:
                t, source = moves[int(rng.integers(len(moves)))]
                labels[t], wrong[t] = drawn[source], "level"
                continue
        t = right[int(rng.integers(len(right)))]
        steps = 2 if rng.random() < TWO_STEPS else 1
        choices = [g for g in (labels[t] - steps, labels[t] + steps) if 0 <= g <= 2]
        if not choices:  # a Moderate is never two steps off: one step
            choices = [labels[t] - 1, labels[t] + 1]
        labels[t] = choices[int(rng.integers(len(choices)))]
        wrong[t] = "grade"
    return labels, wrong


def study_grades(rng: np.random.Generator, rater: np.random.Generator, clean: bool = False,
                 cholesky: np.ndarray | None = None) -> StudyGrades:
    """A study's grades: the joint draw from ``rng``, the noise and wrong labels from ``rater`` (its own
    stream). ``clean``: no rater noise and no wrong labels (the image shows the graded narrowing), with
    the same joint grades and the same draws from ``rng``."""
    drawn, graded = draw_joint_grades(rng, cholesky)
    spreads = np.array([RATER_SPREAD[CONDITION_SPECS[c].group] for c in CONDITIONS for _ in LEVELS])
    stray = rater.standard_normal(len(drawn)) * spreads
    labels, wrong = _wrong_labels(drawn, rater)
    if clean:
        return StudyGrades(drawn, graded, graded.copy(), drawn.copy(), [""] * len(drawn))
    image = np.clip(graded + stray, *NARROWING_RANGE)
    return StudyGrades(drawn, graded, image, labels, wrong)


# --- deriving the copula from real labels (scripts/derive_grade_copula.py) ---------------------------------


def grade_spearman(wide) -> np.ndarray:
    """(25, 25) Spearman correlation of every pair of targets over the studies labelling both, from a
    ``train.csv``-like frame (the 25 label columns, grade strings or 0/1/2)."""
    import pandas as pd

    from spinegrade.constants import SEVERITIES

    codes = {s: i for i, s in enumerate(SEVERITIES)}
    frame = pd.DataFrame({t: pd.to_numeric(wide[t].map(lambda v: codes.get(v, v)), errors="coerce")
                          for t in TARGETS})
    return frame.corr(method="spearman", min_periods=30).to_numpy()


def _ordinal_spearman(r: float, p: np.ndarray, q: np.ndarray) -> float:
    """The Spearman correlation (mid-ranks, so ties count) of two grades cut from a bivariate normal of
    correlation ``r`` at frequencies ``p`` and ``q``: exact, from the 3 x 3 table."""
    from scipy.stats import multivariate_normal
    from scipy.special import ndtri

    a = ndtri(np.clip(np.cumsum(p)[:2], 1e-12, 1 - 1e-12))
    b = ndtri(np.clip(np.cumsum(q)[:2], 1e-12, 1 - 1e-12))
    big = 10.0
    edges_a, edges_b = np.r_[-big, a, big], np.r_[-big, b, big]
    mvn = multivariate_normal(mean=[0, 0], cov=[[1, r], [r, 1]])
    cdf = np.array([[mvn.cdf([x, y]) if (x > -big and y > -big) else 0.0 for y in edges_b] for x in edges_a])
    table = np.diff(np.diff(cdf, axis=0), axis=1)
    table = np.clip(table, 0, None) / table.sum()
    pa, pb = table.sum(axis=1), table.sum(axis=0)
    sa = np.cumsum(pa) - pa / 2
    sb = np.cumsum(pb) - pb / 2
    ma, mb = pa @ sa, pb @ sb
    cov = (table * np.outer(sa - ma, sb - mb)).sum()
    return float(cov / np.sqrt((pa @ (sa - ma) ** 2) * (pb @ (sb - mb) ** 2)))


def copula_spearman(correlation: np.ndarray) -> np.ndarray:
    """(25, 25) Spearman correlations of the grades the copula with ``correlation`` gives (exact)."""
    m = marginals()
    out = np.eye(len(TARGETS))
    for i in range(len(TARGETS)):
        for j in range(i + 1, len(TARGETS)):
            out[i, j] = out[j, i] = _ordinal_spearman(correlation[i, j], m[i], m[j])
    return out


def latent_correlation(spearman: np.ndarray) -> np.ndarray:
    """The copula's correlation matrix whose grades have ``spearman``'s correlations: each pair solved on
    its own (bisection on the exact ordinal Spearman), then the nearest valid correlation matrix
    (eigenvalues kept positive, alternating projections)."""
    m = marginals()
    n = len(TARGETS)
    latent = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            target = spearman[i, j]
            if not np.isfinite(target):
                continue
            lo, hi = -0.99, 0.99
            for _ in range(30):
                mid = (lo + hi) / 2
                if _ordinal_spearman(mid, m[i], m[j]) < target:
                    lo = mid
                else:
                    hi = mid
            latent[i, j] = latent[j, i] = (lo + hi) / 2
    return nearest_correlation(latent)


def label_spearman(correlation: np.ndarray, studies: int = 20000, seed: int = 0) -> np.ndarray:
    """(25, 25) Spearman correlations of the labels (wrong ones included) that the copula with
    ``correlation`` gives, over ``studies`` simulated studies."""
    import pandas as pd

    rng, rater = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    cholesky = np.linalg.cholesky(correlation)
    labels = np.stack([study_grades(rng, rater, cholesky=cholesky).labels for _ in range(studies)])
    return grade_spearman(pd.DataFrame(labels, columns=list(TARGETS)))


def fitted_copula(real: np.ndarray, rounds: int = 3, studies: int = 20000) -> np.ndarray:
    """The copula correlation whose *labels* have ``real``'s Spearman correlations. The real ones already
    hold their readers' mistakes, and the generator's wrong labels weaken every correlation again (most
    at the rare upper levels), so the target is raised by what the wrong labels took, a few rounds."""
    target = real.copy()
    latent = latent_correlation(target)
    for _ in range(rounds):
        target = np.clip(target + (real - label_spearman(latent, studies)), -0.95, 0.95)
        np.fill_diagonal(target, 1.0)
        latent = latent_correlation(target)
    return latent


def nearest_correlation(matrix: np.ndarray, floor: float = 1e-3, iterations: int = 100) -> np.ndarray:
    """A positive definite matrix with unit diagonal close to ``matrix`` (Higham's alternating projections)."""
    y = matrix.copy()
    correction = np.zeros_like(y)
    for _ in range(iterations):
        r = y - correction
        values, vectors = np.linalg.eigh((r + r.T) / 2)
        x = (vectors * np.maximum(values, floor)) @ vectors.T
        correction = x - r
        y = x.copy()
        np.fill_diagonal(y, 1.0)
    values, vectors = np.linalg.eigh(y)
    y = (vectors * np.maximum(values, floor)) @ vectors.T
    d = np.sqrt(np.diag(y))
    return y / np.outer(d, d)
