"""Where a fixed budget of computed steps goes: a local search over the computed-step schedule.

MagCache's rule spends its budget as its magnitude-ratio curve says: with a large error budget, ``max_skips`` binds
and the schedule becomes a dense warm-up followed by evenly spaced computed steps. The error of a skipped span is not
even over the schedule, though (early spans change the image's layout, late ones its detail), so the same number of
computed steps placed elsewhere can be much closer to the dense output. This module searches for that placement:
a coordinate descent that moves one computed step at a time (by ``moves``) and keeps a move when the score
(the PSNR of calibration generations against their dense outputs, the caller's ``score``) gains at least
``min_gain``; step 0 always computes (a forecast needs a computed step). The score is the caller's, so the search is
exact and testable on any function; :mod:`dit_accel.bench.schedule_calibration` scores schedules on a pipeline.

Its result is a property of the model and the budget, like the magnitude curve it starts from: it is stored in the
calibration file (``"schedules"``) and used by magcache's ``schedule = "auto"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

Schedule = tuple[int, ...]


@dataclass(frozen=True)
class ScheduleSearch:
    """What :func:`search_schedule` found: the best ``schedule`` and its ``score``, the ``start`` schedule and its
    score, and every evaluated ``(schedule, score)`` in order."""

    schedule: Schedule
    score: float
    start: Schedule
    start_score: float
    evaluations: list[tuple[Schedule, float]] = field(default_factory=list)


def check_schedule(schedule: Sequence[int], num_steps: int) -> Schedule:
    """``schedule`` as a tuple; ``ValueError`` unless it is distinct increasing steps from 0, each below
    ``num_steps``."""
    steps = tuple(schedule)
    ok = (steps and steps[0] == 0 and steps[-1] < num_steps and list(steps) == sorted(set(steps))
          and all(isinstance(s, int) and not isinstance(s, bool) for s in steps))
    if not ok:
        raise ValueError(f"schedule {list(steps)} is invalid; allowed: distinct steps in increasing order, the first "
                         f"0, each below {num_steps}")
    return steps


def neighbours(schedule: Schedule, index: int, moves: Sequence[int], num_steps: int) -> list[Schedule]:
    """The schedules with computed step ``schedule[index]`` moved by each of ``moves`` (in that order), skipping
    moves onto step 0, past the last step or onto another computed step."""
    out = []
    for move in moves:
        moved = schedule[index] + move
        if 0 < moved < num_steps and moved not in schedule:
            out.append(tuple(sorted(schedule[:index] + (moved,) + schedule[index + 1:])))
    return out


def search_schedule(score: Callable[[Schedule], float], start: Sequence[int], num_steps: int, *,
                    moves: Sequence[int] = (-2, -1, 1, 2), sweeps: int = 3, min_gain: float = 0.05) -> ScheduleSearch:
    """Coordinate descent over the computed steps, keeping their number.

    Args:
        score: higher is better (e.g. PSNR in dB against dense); called once per distinct schedule.
        start: the schedule to start from (MagCache's rule for the budget); strictly increasing from 0.
        num_steps: steps of the generation.
        moves (defaults to ``(-2, -1, 1, 2)``): how far one computed step may move in one try.
        sweeps (defaults to ``3``): passes over the computed steps (each but step 0, in order); a pass that keeps no
            move ends the search. Recommended 2-4: each costs up to ``len(moves) * (len(start) - 1)`` scores.
        min_gain (defaults to ``0.05``): the least gain of the score that keeps a move (first improving move per
            step, then the next step); guards against chasing noise.
    """
    if sweeps < 1 or not moves or any(not isinstance(m, int) or m == 0 for m in moves):
        raise ValueError(f"search_schedule: sweeps = {sweeps!r} must be >= 1 and moves = {list(moves)!r} non-zero "
                         "integers")
    current = check_schedule(start, num_steps)
    seen: dict[Schedule, float] = {}
    evaluations: list[tuple[Schedule, float]] = []

    def evaluate(schedule: Schedule) -> float:
        if schedule not in seen:
            seen[schedule] = float(score(schedule))
            evaluations.append((schedule, seen[schedule]))
        return seen[schedule]

    best = start_score = evaluate(current)
    for _ in range(sweeps):
        improved = False
        for index in range(1, len(current)):
            for candidate in neighbours(current, index, moves, num_steps):
                value = evaluate(candidate)
                if value >= best + min_gain:
                    current, best, improved = candidate, value, True
                    break
        if not improved:
            break
    return ScheduleSearch(current, best, tuple(start), start_score, evaluations)
