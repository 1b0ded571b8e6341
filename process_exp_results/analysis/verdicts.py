"""When a routing claim is made: the significance level, and the rule that a layer is specialized on a factor only
when its index interval is clear of 0 and its permutation test has p <= ALPHA.
"""

from __future__ import annotations

import math

ALPHA = 0.01  # significance level for the plain-language verdicts and "explained_by"


def permutations_needed(alpha: float = ALPHA) -> int:
    """The fewest permutations whose smallest p-value, 1 / (n_perm + 1), reaches alpha."""
    return math.ceil(1.0 / alpha - 1.0 - 1e-9)


def is_specialized(reference: dict | None, p_value: float | None, alpha: float = ALPHA) -> bool:
    """A layer is specialized on a factor when its index interval is clear of 0 (more than routers that learned
    nothing) and its permutation test has p <= alpha (the second condition: at scale it always passes)."""
    ci = (reference or {}).get("index_ci")
    return ci is not None and ci[0] > 0 and p_value is not None and p_value <= alpha
