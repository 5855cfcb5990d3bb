"""Role assignment and stage balancing: pure functions, no process group."""
import itertools

import pytest

from calm_dist.distributed.topology import ANCHOR, AUGMENT, balance_stages, plan_topology


def test_roles_cover_the_world_once():
    topology = plan_topology(5, 3, 2, [10] * 4, [1, 3])
    roles = [topology.role_of(rank) for rank in range(5)]
    assert [(r.kind, r.index) for r in roles] == [(ANCHOR, 0), (ANCHOR, 1), (ANCHOR, 2), (AUGMENT, 0), (AUGMENT, 1)]
    assert [topology.stage_rank(s) for s in range(2)] == [3, 4]
    assert topology.anchor_group_ranks == [0, 1, 2]
    assert roles[1].name == "anchor-rank-1" and roles[4].name == "augment-stage-1"
    with pytest.raises(ValueError, match="outside"):
        topology.role_of(5)


def test_world_size_must_match_the_plan():
    with pytest.raises(ValueError, match="world size 3"):
        plan_topology(3, 2, 2, [1] * 4, [3])
    with pytest.raises(ValueError, match="anchor_ranks"):
        plan_topology(1, 0, 1, [1] * 4, [3])
    with pytest.raises(ValueError, match="augment_stages=5"):
        plan_topology(6, 1, 5, [1] * 4, [3])


def test_stages_only_cover_layers_up_to_the_deepest_tap():
    topology = plan_topology(3, 1, 2, [5] * 8, [1, 3])
    assert topology.stage_layers == (range(0, 2), range(2, 4))
    assert topology.taps_of_stage(0) == [(0, 1)] and topology.taps_of_stage(1) == [(1, 3)]
    assert topology.stage_of_layer(3) == 1


def test_a_layer_read_by_several_bridges_crosses_the_wire_once():
    topology = plan_topology(3, 1, 2, [5] * 4, [1, 3, 1, 0])
    assert topology.wire_layers == [0, 1, 3]
    assert topology.taps_of_stage(0) == [(0, 0), (1, 1)] and topology.taps_of_stage(1) == [(2, 3)]


def _brute_force(sizes, stages):
    best = None
    for cuts in itertools.combinations(range(1, len(sizes)), stages - 1):
        bounds = (0, *cuts, len(sizes))
        worst = max(sum(sizes[a:b]) for a, b in zip(bounds, bounds[1:]))
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize("sizes,stages", [([1, 1, 1, 1], 2), ([8, 1, 1, 1, 1, 1], 2), ([3, 1, 4, 1, 5, 9, 2, 6], 3),
                                          ([1, 2, 3], 3), ([7], 1), ([2, 2, 9, 2, 2], 3)])
def test_balance_is_contiguous_complete_and_optimal(sizes, stages):
    ranges = balance_stages(sizes, stages)
    assert len(ranges) == stages and all(len(r) > 0 for r in ranges)
    assert [i for r in ranges for i in r] == list(range(len(sizes)))
    assert max(sum(sizes[i] for i in r) for r in ranges) == _brute_force(sizes, stages)
