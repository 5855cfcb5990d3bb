"""Role assignment and stage balancing: pure functions, no process group."""
import itertools

import pytest

from calm_dist.distributed.topology import (ANCHOR, AUGMENT, AugmentSpec, balance_stages, plan_models_topology,
                                           plan_topology)


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


def _two_models(world_size=6):
    return plan_models_topology(world_size, 2, [
        AugmentSpec(2, (10,) * 4, (1, 3, 1), "parallel.augment_stages"),
        AugmentSpec(2, (5,) * 3, (1, 0), "augment[1].stages")])


def test_each_augmenting_model_gets_its_own_stage_ranks_after_the_anchor_ranks():
    topology = _two_models()
    roles = [topology.role_of(rank) for rank in range(6)]
    assert [(r.kind, r.model, r.index) for r in roles] == [
        (ANCHOR, 0, 0), (ANCHOR, 0, 1), (AUGMENT, 0, 0), (AUGMENT, 0, 1), (AUGMENT, 1, 0), (AUGMENT, 1, 1)]
    assert [r.name for r in roles[2:]] == ["augment-stage-0", "augment-stage-1", "augment1-stage-0", "augment1-stage-1"]
    assert [topology.stage_rank(s, model=1) for s in range(2)] == [4, 5] and topology.stage_rank(1) == 3
    assert topology.anchor_group_ranks == [0, 1] and topology.augment_stages == 2
    assert topology.pipeline_of(roles[5]).stage_layers == (range(0, 1), range(1, 2))  # layers above the tap never run
    with pytest.raises(ValueError, match="outside"):
        topology.role_of(6)


def test_tag_slots_are_distinct_across_models_and_each_bridge_reads_its_models_slot():
    topology = _two_models()
    first, second = topology.pipelines
    assert first.wire_slots == [(0, 1), (1, 3)] and second.wire_slots == [(2, 0), (3, 1)]
    assert topology.bridge_slots == [0, 1, 0, 3, 2]  # model 0's bridges (layers 1, 3, 1), then model 1's (1, 0)
    assert second.taps_of_stage(0) == [(2, 0)] and second.taps_of_stage(1) == [(3, 1)]
    assert topology.taps_of_stage(1) == [(1, 3)]  # the single-model view is model 0's


def test_a_multi_model_plan_names_the_key_at_fault():
    with pytest.raises(ValueError, match=r"augment\[1\].stages \(2\); launch 6"):
        _two_models(world_size=5)
    with pytest.raises(ValueError, match=r"augment\[1\].stages=3 must be between 1 and the 2"):
        plan_models_topology(6, 1, [AugmentSpec(2, (1,) * 4, (3,), "parallel.augment_stages"),
                                    AugmentSpec(3, (1,) * 4, (1,), "augment[1].stages")])
    too_many = [AugmentSpec(1, (1,) * 40, tuple(range(40)), key) for key in ("a", "b")]
    with pytest.raises(ValueError, match="80 distinct tapped augment layers"):
        plan_models_topology(3, 1, too_many)
