"""Progress inside AutoAttack's components (helper of :mod:`attacks.autoattack`, not an attack).

``pyautoattack`` 0.2.0 reports progress only through ``print`` (``verbose=True``) and only
per component. :func:`traced` wraps, on one ``pyautoattack.AutoAttack`` instance and for the
duration of one component, the method each sub-attack calls once per restart or target class
(APGD/APGD-T: ``attack_single_run``, or ``decr_eps_pgd`` on the l1 schedule; FAB:
``attack_single_run``) and Square's per-query loss, and logs a line at INFO with the points
still robust at that moment (the points the call is given are exactly those every earlier
restart/target left robust). The wrappers only count and log, call the original with the
same arguments and return its result, and use no randomness, so x' is unchanged.

Log lines (logger ``attacks.aa_trace``)::

    AutoAttack apgd-t: target 3/9, restart 1/1: 41 of 87 points still robust (12.3 s)
    AutoAttack square: query 1000/5000: 12 of 87 points still robust (40.1 s)
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from benchmark.cores import follow as follow_share

logger = logging.getLogger(__name__)

#: Square logs every this share of its query budget
SQUARE_EVERY = 0.1


def _sub_attack(aa: Any, component: str) -> tuple[Any, str]:
    """The sub-attack object running ``component`` and the method it calls per restart."""
    if component in ("apgd-ce", "apgd-dlr", "apgd-t"):
        sub = aa.apgd_targeted if component == "apgd-t" else aa.apgd
        return sub, "decr_eps_pgd" if getattr(sub, "use_largereps", False) else \
            "attack_single_run"
    if component in ("fab", "fab-t"):
        return aa.fab, "attack_single_run"
    return aa.square, "margin_and_loss"


def _loops(aa: Any, component: str) -> tuple[int, int]:
    """(target classes, restarts) of one component as ``run_standard_evaluation`` sets them."""
    if component == "apgd-t":
        return int(aa.apgd_targeted.n_target_classes), int(aa.apgd_targeted.n_restarts)
    if component == "fab-t":
        return int(aa.fab.n_target_classes), 1  # run_standard_evaluation sets 1 restart
    if component in ("fab",):
        return 1, int(aa.fab.n_restarts)
    if component == "square":
        return 1, int(aa.square.n_restarts)
    return 1, int(aa.apgd.n_restarts)


@contextmanager
def traced(aa: Any, component: str, n_points: int) -> Iterator[None]:
    """Log per-restart/target (Square: per 10% of queries) progress of ``component``."""
    sub, method = _sub_attack(aa, component)
    original: Callable[..., Any] = getattr(sub, method)
    targets, restarts = _loops(aa, component)
    t0, calls = time.perf_counter(), [0]
    every = max(1, int(getattr(aa.square, "n_queries", 5000) * SQUARE_EVERY))

    def wrapper(x: Any, *args: Any, **kwargs: Any) -> Any:
        c = calls[0]
        calls[0] += 1
        follow_share()  # a sweep's job takes the cores of jobs that ended
        left = int(x.shape[0])
        if component == "square":
            # call 0 scores the start; call q is query q, on the points not yet fooled
            if c and c % every == 0:
                logger.info("AutoAttack square: query %d/%d: %d of %d points still robust "
                            "(%.1f s)", c, aa.square.n_queries, left, n_points,
                            time.perf_counter() - t0)
        elif targets > 1:
            logger.info("AutoAttack %s: target %d/%d, restart %d/%d: %d of %d points still "
                        "robust (%.1f s)", component, c // restarts + 1, targets,
                        c % restarts + 1, restarts, left, n_points, time.perf_counter() - t0)
        else:
            logger.info("AutoAttack %s: restart %d/%d: %d of %d points still robust (%.1f s)",
                        component, c + 1, restarts, left, n_points, time.perf_counter() - t0)
        return original(x, *args, **kwargs)

    setattr(sub, method, wrapper)  # instance attribute shadows the class's method
    try:
        yield
    finally:
        delattr(sub, method)
