"""Three disjoint splits for a training job: train / select / test.

* **train**: the optimiser sees it.
* **select**: picks what training cannot: the best checkpoint (ultralytics' ``best.pt``,
  the embedder's best epoch) and the operating threshold (detector confidence, embedder
  match threshold).
* **test**: used once, for the baseline-vs-candidate comparison that decides promotion.
  Nothing that chose the candidate has seen it, so the comparison is not biased toward it.

The unit that is split is a *group*: an image for the detector (its faces travel
together), a person for the embedder (the same face must not be learnt and tested).
Only eligible groups go to select/test (an embedder needs people with two or more faces
to form same-person pairs); the rest always train. Seeded: the same groups, fractions and
seed give the same split.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

SPLITS = ("train", "select", "test")


@dataclass(frozen=True)
class GroupSplit:
    """Which groups went where (each list sorted as the input was ordered)."""

    train: list
    select: list
    test: list

    def of(self, name: str) -> list:
        return {"train": self.train, "select": self.select, "test": self.test}[name]

    def assert_disjoint(self) -> None:
        """Raise AssertionError if a group is in two splits (a guard, not a test device:
        the split below cannot produce overlaps, this keeps later edits honest)."""
        a, b, c = set(self.train), set(self.select), set(self.test)
        if a & b or a & c or b & c:
            raise AssertionError(f"splits overlap: train&select {len(a & b)}, train&test {len(a & c)}, "
                                 f"select&test {len(b & c)}")


def split_groups(
    groups: Sequence[Hashable],
    select_fraction: float,
    test_fraction: float,
    seed: int,
    eligible: Iterable[Hashable] | None = None,
) -> GroupSplit:
    """Split distinct ``groups`` three ways (see module docstring).

    ``select_fraction`` / ``test_fraction`` are shares of the *eligible* groups (all of
    them when ``eligible`` is None); rounding is to the nearest whole group. Raises
    ValueError for fractions outside [0, 1) or summing to 1 or more.
    """
    if not (0.0 <= select_fraction < 1.0 and 0.0 <= test_fraction < 1.0) or select_fraction + test_fraction >= 1.0:
        raise ValueError(f"select ({select_fraction}) and test ({test_fraction}) shares must be in [0, 1) "
                         "and leave something to train on")
    ordered = list(dict.fromkeys(groups))  # distinct, first-seen order
    allowed = set(ordered) if eligible is None else set(eligible)
    candidates = [g for g in ordered if g in allowed]
    order = np.random.default_rng(seed).permutation(len(candidates))
    shuffled = [candidates[i] for i in order]
    n_test = int(np.floor(len(candidates) * test_fraction + 0.5))
    n_select = int(np.floor(len(candidates) * select_fraction + 0.5))
    test = set(shuffled[:n_test])
    select = set(shuffled[n_test:n_test + n_select])
    split = GroupSplit(
        train=[g for g in ordered if g not in test and g not in select],
        select=[g for g in ordered if g in select],
        test=[g for g in ordered if g in test],
    )
    split.assert_disjoint()
    return split
