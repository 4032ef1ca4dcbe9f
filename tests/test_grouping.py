"""Position grouping by distance to the border (pure functions, synthetic costs)."""
import numpy as np

from krypton.grouping import MIN_GROUP, choose_groups, distance_classes, groups_for


def test_distance_classes_are_symmetric():
    classes = distance_classes(10, 4, [8, 16])
    assert classes.tolist() == [0, 0, 1, 1, 2, 2, 1, 1, 0, 0]


def test_groups_partition_the_grid():
    groups = groups_for((13, 9), 2, [4, 8])
    flat = np.sort(np.concatenate(groups))
    assert flat.tolist() == list(range(13 * 9))
    assert len(groups) == 9


def test_choose_groups_prefers_cheaper_groupings_with_large_batches():
    grid = (52, 52)

    def border_cheap(indices):  # positions near the border cost less; a group costs its worst member
        y, x = np.divmod(indices, grid[1])
        d = np.minimum(np.minimum(y, grid[0] - 1 - y), np.minimum(x, grid[1] - 1 - x))
        return len(indices) * (1.0 + min(d.max(), 10))

    groups = choose_groups(grid, 4, border_cheap)
    assert len(groups) > 1
    assert min(len(g) for g in groups) >= MIN_GROUP
    assert choose_groups(grid, 4, lambda idx: float(len(idx))) [0].size == 52 * 52  # flat cost: one group
