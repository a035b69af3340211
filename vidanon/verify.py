"""The privacy guard's loop: render, check every written face, escalate what still matches.

A track that still matches its original in any frame gets its next escalation (a larger
mask, then a key of its own, then a blur) and is re-rendered, alone, from the input onto the
output made so far, until every track passes or is blurred.

On a weak prior most steps do not help a face that matches far past its threshold, and a
whole re-render of a track costs as much as its first pass. So a step is tried in memory
first (``passes.probe``), on the track's frames in order of how close they came to matching:
its 3 worst, then 12 more, then 48, ... A step that fails anywhere is dropped at once for the
next one, having cost only the frames tried; a step that passes every frame has rendered the
whole track, and the re-render pass pastes those faces instead of transforming them again
(it still checks every written face). Where the renderer renders every face itself
(``Renderer.ready_faces`` 0: a Ray cluster), only the 3 worst frames are tried per step.

A pass also stops transforming a track as soon as the guard fails it (``LocalRenderer.hold``):
the escalation re-renders all of its faces anyway. So on a crowd the guard's run can take no
longer than ``--no-verify`` (``benchmarks/guard_cost.py``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from vidanon.guard import PROBE_FRAMES, Escalations, PrivacyGuard, escalated_plan
from vidanon.keys import Key
from vidanon.passes import Renderer, RenderPass
from vidanon.render import Crops, FaceJob

log = logging.getLogger("vidanon")

GROWTH = 4  # each round of a step tries 4x as many frames as the last


def render_verified(renderer: Renderer, first: RenderPass, guard: PrivacyGuard | None,
                    esc: Escalations, keys_now: Callable[[], dict[int, Key]],
                    new_temp: Callable[[], Path], quiet: bool) -> dict:
    """Render ``first`` into ``first.dst`` and escalate until the guard is satisfied.

    ``keys_now`` gives every track's key under its current escalation; ``new_temp`` a fresh
    temporary path (the caller removes it on failure). Returns counts and the first pass's
    seconds (with the guard's embedding seconds in it), for the run's timings.
    """
    t0 = time.perf_counter()
    renderer.render(first, guard, quiet)
    stats = {"passes": 1, "probes": 0, "probe_crops": 0, "first_s": time.perf_counter() - t0,
             "first_embed_s": guard.seconds if guard is not None else 0.0}
    if guard is None:
        return stats
    failing = guard.failing()
    while failing:
        log.info("privacy guard: %d track(s) still match the original; escalating",
                 len(failing))
        guard.forget(failing)
        esc.escalate(failing)
        ready = _try_steps(renderer, first, guard, esc, keys_now, failing, stats)
        guard.reset(failing)  # blurred ones too: a blur is checked like any written face
        redo = {f: [j for j in jobs if j.track_id in failing]
                for f, jobs in escalated_plan(first.plan, esc).items()}
        nxt = new_temp()
        renderer.render(replace(first, number=stats["passes"], dst=nxt, plan=redo,
                                keys=keys_now(), grow={t: esc.grow(t) for t in failing},
                                base=first.dst, ready=ready), guard, quiet)
        os.replace(nxt, first.dst)
        stats["passes"] += 1
        failing = [t for t in guard.failing() if not esc.blurred(t)]
    return stats


def _try_steps(renderer: Renderer, first: RenderPass, guard: PrivacyGuard,
               esc: Escalations, keys_now: Callable[[], dict[int, Key]], tracks: list[int],
               stats: dict) -> Crops:
    """Advance each of ``tracks`` past the steps that fail on some frame, trying each step on
    the track's frames worst first (``guard``'s record), in growing rounds. Returns the faces
    rendered under steps that passed, for the re-render pass to paste."""
    frames: dict[int, list[int]] = {}
    for f in sorted(first.plan):
        for j in first.plan[f]:
            if j.track_id in tracks:
                frames.setdefault(j.track_id, []).append(f)
    order = {t: guard.tracks[t].worst_first(frames.get(t, [])) for t in tracks}
    done = {t: 0 for t in tracks}  # frames of ``order`` passed under the current step
    size = dict.fromkeys(tracks, PROBE_FRAMES)
    ready: Crops = {}
    budget = renderer.ready_faces
    probe = guard.fresh()
    trying = [t for t in tracks if not esc.blurred(t)]
    while trying:
        want = {t: set(order[t][done[t]:done[t] + size[t]]) for t in trying}
        # Only the frames tried, not the whole plan: tracks still trying are never blurred,
        # so their jobs are the first pass's as they are.
        plan: dict[int, list[FaceJob]] = {}
        for f in sorted(set().union(*want.values())):
            plan[f] = [j for j in first.plan[f] if f in want.get(j.track_id, ())]
        probe.tracks = {}
        kept: Crops | None = {} if budget > 0 else None
        renderer.probe(replace(first, plan=plan, keys=keys_now(),
                               grow={t: esc.grow(t) for t in trying}), sorted(plan), probe, kept)
        stats["probes"] += 1
        stats["probe_crops"] += sum(len(v) for v in plan.values())
        still = [t for t in probe.failing() if t in want]
        esc.escalate(still)
        nxt = []
        for t in trying:
            if t in still:  # this step fails: start the next one from the worst frames
                for k in [k for k in ready if k[0] == t]:
                    del ready[k]
                done[t], size[t] = 0, PROBE_FRAMES
                if not esc.blurred(t):
                    nxt.append(t)
                continue
            if kept is None:
                continue  # the renderer transforms the rest itself
            ready.update((k, c) for k, c in kept.items() if k[0] == t)
            done[t] += len(want[t])
            size[t] = min(size[t] * GROWTH, max(budget - len(ready), 0))
            if done[t] < len(order[t]) and size[t] > 0:
                nxt.append(t)
        trying = nxt
    return ready
