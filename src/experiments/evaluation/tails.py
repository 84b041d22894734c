"""The tails of a bootstrap percentile interval, expanded for few resampled units: shared by
the per-metric intervals (`stats`) and the paired differences (`paired`)."""

from __future__ import annotations

import numpy as np
from scipy import stats as scipy_stats


def expanded_tail(confidence: float, units: int, strata: int) -> float:
    """The tail probability of each end of an expanded percentile interval (Hesterberg 2015):
    the plain percentile bootstrap is too narrow with few resampled units. Its 95% intervals
    of 8 of the 16 BreakHis patients held the other 8's accuracy in 56-79% of random halvings
    (an exact interval: about 83%; expanded: 73-88%), and those of simulated 8-patient
    cohorts the population's accuracy in 86% (expanded: 95%). The nominal z is replaced by
    sqrt(n / (n - k)) * t(n - k), n units (images, or patients) in k class strata: a
    16-patient cohort's intervals widen by about 1.17x, a hundred images' by 1.02x."""
    tail = (1 - confidence) / 2
    dof = units - strata
    if dof < 1:
        return tail
    z = np.sqrt(units / dof) * scipy_stats.t.ppf(1 - tail, dof)
    return float(scipy_stats.norm.sf(z))


def resampled_units(labels: np.ndarray, groups: np.ndarray | None) -> int:
    """How many units a bootstrap resamples: the images, or the groups (patients) when
    known - the n of `expanded_tail`."""
    return len(labels) if groups is None else len(np.unique(np.asarray(groups)))
