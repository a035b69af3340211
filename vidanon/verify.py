"""The privacy guard's loop: render, check every written face, escalate what still matches.

A track that still matches its original in any frame gets its next escalation (a larger
mask, then a key of its own, then a blur) and is re-rendered, alone, from the input onto the
output made so far, until every track passes or is blurred.

A whole re-render costs as much as the first pass for that track, and on a weak prior most
steps do not help a face that matches far past its threshold. So a step is first tried on the
track's few worst frames (``passes.probe``, in memory): if the face still matches there, the
track would fail the whole pass too, and it moves on to its next step without one. Only a
step that passes its probe is rendered over the whole track and checked on every frame.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from vidanon.guard import Escalations, PrivacyGuard, escalated_plan
from vidanon.keys import Key
from vidanon.passes import Renderer, RenderPass
from vidanon.render import FaceJob

log = logging.getLogger("vidanon")


def render_verified(renderer: Renderer, first: RenderPass, guard: PrivacyGuard | None,
                    esc: Escalations, keys_now: Callable[[], dict[int, Key]],
                    new_temp: Callable[[], Path], quiet: bool) -> dict:
    """Render ``first`` into ``first.dst`` and escalate until the guard is satisfied.

    ``keys_now`` gives every track's key under its current escalation; ``new_temp`` a fresh
    temporary path (the caller removes it on failure). Returns counts and the first pass's
    seconds, for the run's timings.
    """
    t0 = time.perf_counter()
    renderer.render(first, guard, quiet)
    stats = {"passes": 1, "probes": 0, "probe_crops": 0, "first_s": time.perf_counter() - t0}
    if guard is None:
        return stats
    failing = guard.failing()
    probe = None
    while failing:
        log.info("privacy guard: %d track(s) still match the original; escalating",
                 len(failing))
        esc.escalate(failing)
        probe = probe or PrivacyGuard(guard.spec, guard.threshold, guard.blur_floor)
        _probe_steps(renderer, first, guard, probe, esc, keys_now, failing, stats)
        guard.reset(failing)  # blurred ones too: a blur is checked like any written face
        redo = {f: [j for j in jobs if j.track_id in failing]
                for f, jobs in escalated_plan(first.plan, esc).items()}
        nxt = new_temp()
        renderer.render(replace(first, number=stats["passes"], dst=nxt, plan=redo,
                                keys=keys_now(), grow={t: esc.grow(t) for t in failing},
                                base=first.dst), guard, quiet)
        os.replace(nxt, first.dst)
        stats["passes"] += 1
        failing = [t for t in guard.failing() if not esc.blurred(t)]
    return stats


def _probe_steps(renderer: Renderer, first: RenderPass, guard: PrivacyGuard,
                 probe: PrivacyGuard, esc: Escalations, keys_now: Callable[[], dict[int, Key]],
                 tracks: list[int], stats: dict) -> None:
    """Advance each of ``tracks`` past the steps that still match on its worst frames
    (``guard``'s record); ``probe`` checks the trial renders."""
    frames = {t: [f for _, f in guard.tracks[t].worst] for t in tracks}
    trying = [t for t in tracks if not esc.blurred(t)]
    while trying:
        plan: dict[int, list[FaceJob]] = {}
        for f, jobs in escalated_plan(first.plan, esc).items():
            picked = [j for j in jobs if j.track_id in trying and f in frames[j.track_id]]
            if picked:
                plan[f] = picked
        probe.tracks = {}
        renderer.probe(replace(first, plan=plan, keys=keys_now(),
                               grow={t: esc.grow(t) for t in trying}), sorted(plan), probe)
        stats["probes"] += 1
        stats["probe_crops"] += sum(len(v) for v in plan.values())
        still = [t for t in probe.failing() if t in trying]
        if not still:
            return
        esc.escalate(still)
        trying = [t for t in still if not esc.blurred(t)]
