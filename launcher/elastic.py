"""Elastic, fault-tolerant composition on Ray: restart from the latest complete checkpoint on what is left.

A worker or node loss (a dead process or node, and its peers' consequential communication errors) tears
the job down (every actor killed, the placement group released), then the
plan is made again with the resources still alive: the configured ``parallel.anchor_ranks`` if they fit,
else fewer, down to ``parallel.min_anchor_ranks``; training resumes from the latest complete checkpoint,
resharded when the anchor rank count changed. After shrinking, the job grows back to the configured
size at the next checkpoint once the cluster can hold it again (``ray.grow_back``). ``ray.max_failures``
bounds the restarts; past it, or when not even the minimum fits, the job stops with an error naming the
last good checkpoint, which stays intact. An error raised by the workers' own code (a bad path, a config or
data error) is not a loss: the job stops at once with it, and no restart is spent.
"""
from __future__ import annotations

import copy
import dataclasses
import time

from calm_dist.checkpoint import CheckpointStore, find_resume_point
from calm_dist.config import Config
from calm_dist.reports import CheckpointReport
from launcher.ray_driver import Restart, is_loss


class GrowBack(Restart):
    """The full plan fits again and a checkpoint was just published: restart at the configured size."""


def sized(config: Config, anchor_ranks: int) -> Config:
    resized = copy.deepcopy(config)
    resized.parallel.anchor_ranks = anchor_ranks
    return resized


def candidate_sizes(config: Config, after_failure: bool) -> list[int]:
    """Anchor rank counts to try, largest first: only the configured one at the first start."""
    parallel = config.parallel
    if not after_failure:
        return [parallel.anchor_ranks]
    return [n for n in range(parallel.anchor_ranks, parallel.min_anchor_ranks - 1, -1)
            if config.train.batch_size % n == 0]


def place(config: Config, after_failure: bool):
    """(anchor ranks, ready placement group) for the largest plan the live cluster holds.

    After a failure Ray may not yet have noticed a dead node, so a plan that looks feasible can stay
    pending: each size but the smallest gets a short wait before the next smaller one is tried, and
    when none fits the sizes are tried again until ``ray.placement_timeout_s`` has passed.
    """
    deadline = time.monotonic() + config.ray.placement_timeout_s
    while True:
        try:
            return _place_once(config, after_failure)
        except ValueError:
            if not after_failure or time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def _place_once(config: Config, after_failure: bool):
    from launcher.ray_cluster import reserve

    sizes = candidate_sizes(config, after_failure)
    errors = []
    for position, ranks in enumerate(sizes):
        last = position == len(sizes) - 1
        wait = config.ray.placement_timeout_s if last and not after_failure else 15
        try:
            return ranks, reserve(sized(config, ranks), timeout_s=wait)
        except ValueError as error:
            errors.append(f"{ranks} anchor ranks: {error}")
    if len(errors) == 1:
        raise ValueError(errors[0].split(": ", 1)[1])
    raise ValueError("the cluster left cannot hold even parallel.min_anchor_ranks="
                     f"{config.parallel.min_anchor_ranks}: " + " | ".join(errors))


def _full_plan_fits(config: Config) -> bool:
    from launcher.ray_cluster import check_feasible

    try:
        check_feasible(config)
        return True
    except ValueError:
        return False


def run_elastic(config: Config, inputs, logger, store: CheckpointStore | None) -> dict:
    """Runs the composition on Ray until it completes, restarting after lost workers or nodes; returns rank 0's
    result. An error raised by worker code stops the job at once with that error."""
    from ray.util.placement_group import remove_placement_group

    from launcher.ray_driver import run_composition_on_ray

    failures, restarts = 0, []
    while True:
        ranks, group = _place_or_give_up(config, failures, store)
        try:
            point = find_resume_point(store, inputs.checkpoint_meta, ranks, on_fallback=logger.note) \
                if store is not None else None
        except BaseException:
            remove_placement_group(group)
            raise
        if restarts:
            restarts[-1].update(resumed_step=point.step if point else 0, anchor_ranks=ranks)
        if restarts or point is not None:  # records after the point of restart are replaced
            logger.resume_at(point, store, config.train.max_steps)
        if point is not None:
            logger.note(f"resuming from checkpoint {point.name} (step {point.step}, written by {point.saved_ranks} "
                        f"anchor ranks) on {ranks} anchor ranks")
        run_config = sized(config, ranks)
        run_inputs = dataclasses.replace(inputs.with_anchor_ranks(ranks), resume=point)
        watch = _grow_back_watch(config, ranks, logger)
        try:
            return {**run_composition_on_ray(run_config, run_inputs, watch, group), "restarts": restarts}
        except GrowBack:
            logger.note(f"the cluster holds {config.parallel.anchor_ranks} anchor ranks again: growing back")
            restarts.append({"reason": "grow back", "at": time.time()})
        except Exception as error:
            if not is_loss(error):
                raise  # an error of the worker's own code: a restart would fail the same way
            failures += 1
            restarts.append({"reason": _last_line(error), "at": time.time()})
            latest = store.latest() if store is not None else None
            if failures > config.ray.max_failures:
                raise RuntimeError(
                    f"the job failed {failures} times (ray.max_failures={config.ray.max_failures}); last error: "
                    f"{_last_line(error)}. Latest complete checkpoint: "
                    f"{latest or 'none'} in {store.uri if store else '(checkpointing off)'}") from error
            logger.note(f"worker failure {failures}/{config.ray.max_failures}: {_last_line(error)}; restarting from "
                        f"{latest or 'the start (no checkpoint yet)'}")
            time.sleep(1.0)


def _place_or_give_up(config: Config, failures: int, store: CheckpointStore | None):
    try:
        return place(config, after_failure=failures > 0)
    except ValueError as error:
        if not failures:
            raise  # the first start: the plan as configured must fit
        latest = store.latest() if store is not None else None
        raise RuntimeError(f"cannot continue after {failures} failure(s): {error}. Latest complete checkpoint: "
                           f"{latest or 'none'}; rerun the same command to resume from it once the cluster "
                           "can hold parallel.min_anchor_ranks") from error


def _grow_back_watch(config: Config, ranks: int, logger):
    """The step stream: logs every report; after a published checkpoint, checks whether to grow back."""
    shrunk = ranks < config.parallel.anchor_ranks and config.ray.grow_back

    def on_report(report) -> None:
        logger(report)
        if shrunk and isinstance(report, CheckpointReport) and report.step < config.train.max_steps \
                and _full_plan_fits(config):
            raise GrowBack()

    return on_report


def _last_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return next((line for line in reversed(text) if line.strip()), type(error).__name__)[:300]
