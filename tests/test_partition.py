"""Shards: disjoint, equal, seeded; Dirichlet skew is measurably non-uniform."""

from __future__ import annotations

import numpy as np
import pytest

from fedsweep import FedsweepError
from fedsweep.partition import (Shards, dirichlet_shards, iid_shards, label_histogram, partition, read_shards,
                                write_shards)


def test_iid_shards_disjoint_equal_and_drop_remainder():
    shards = iid_shards(1003, 8, seed=0)
    assert [len(s) for s in shards] == [125] * 8  # floor(1003 / 8); 3 rows dropped
    union = np.concatenate(shards)
    assert len(np.unique(union)) == len(union) == 1000
    assert union.min() >= 0 and union.max() < 1003


def test_iid_shards_deterministic_per_seed():
    a, b, c = iid_shards(500, 4, 0), iid_shards(500, 4, 0), iid_shards(500, 4, 1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_dropped_rows_are_a_random_choice():
    dropped = [set(range(103)) - set(np.concatenate(iid_shards(103, 10, seed))) for seed in range(20)]
    assert all(len(d) == 3 for d in dropped)
    assert len({frozenset(d) for d in dropped}) > 15  # not always the tail of the file
    assert any(min(d) < 100 for d in dropped)


def test_dirichlet_is_skewed_and_iid_is_not():
    labels = np.repeat(np.arange(4), 500)
    iid = Shards(iid_shards(len(labels), 8, 0), {})
    skew = Shards(dirichlet_shards(labels, 8, alpha=0.1, seed=0), {})
    def max_share(s):
        h = label_histogram(s, labels, 4)
        return (h / h.sum(1, keepdims=True)).max(1).mean()
    assert max_share(iid) < 0.4  # near 1/4 everywhere
    assert max_share(skew) > 0.7  # most clients dominated by one class
    union = np.concatenate(skew.indices)
    assert len(np.unique(union)) == len(union) == len(labels)  # a partition: every row exactly once
    assert len({len(s) for s in skew.indices}) > 1  # unequal sizes: weighting matters


def test_write_read_roundtrip(tmp_path):
    shards = iid_shards(100, 3, seed=4)
    write_shards(tmp_path / "s.parquet", shards, {"scheme": "iid", "seed": 4})
    back = read_shards(tmp_path / "s.parquet")
    assert back.info["clients"] == 3 and back.info["sizes"] == [33, 33, 33]
    assert all(np.array_equal(x, y) for x, y in zip(shards, back.indices))  # order kept too


@pytest.mark.parametrize("kwargs, message", [
    ({"clients": 0}, "clients=0"),
    ({"clients": 200}, "clients=200 exceeds"),
    ({"clients": 2, "scheme": "zipf"}, "scheme='zipf'"),
    ({"clients": 2, "scheme": "dirichlet"}, "needs alpha"),
    ({"clients": 2, "scheme": "dirichlet", "alpha": -1.0}, "alpha=-1.0"),
])
def test_partition_errors(kwargs, message):
    with pytest.raises(FedsweepError, match=message):
        partition(np.zeros(100, dtype=int), seed=0, **kwargs)
