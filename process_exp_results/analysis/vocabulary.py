"""What each expert takes: per expert the frequent tokens of highest lift P(expert | token) / P(expert), how
consistently a token goes to one expert, and, for top-k >= 2, which experts are chosen together.
"""

from __future__ import annotations

import numpy as np

from process_exp_results.analysis.tables import LayerTables


def expert_vocabulary(layer: LayerTables, token_table: np.ndarray, id_to_token: list[str]) -> dict:
    """Lift top-10 per expert ([token, lift, occurrences of the token routed to that expert]) and consistency."""
    F, E = layer.n_frequent, layer.shape[3]
    table = token_table[:F]  # frequent tokens x experts
    total = token_table.sum()
    p_e = token_table.sum(0) / total if total > 0 else np.zeros(E)

    def name(i: int) -> str:
        tid = int(layer.frequent_ids[i])
        return str(id_to_token[tid]) if tid < len(id_to_token) else str(tid)

    lift_top = {}
    n_t = layer.frequent_counts.astype(np.float64)
    for ex in range(E):
        if F == 0 or p_e[ex] <= 0:
            lift_top[str(ex)] = []
            continue
        lift = table[:, ex] / n_t / p_e[ex]
        order = np.lexsort((layer.frequent_ids, -table[:, ex], -lift))
        order = [i for i in order[:10] if table[i, ex] > 0]
        lift_top[str(ex)] = [[name(i), float(lift[i]), int(table[i, ex])] for i in order]
    if F:
        share = table.max(1) / n_t
        consistency = float((share * n_t).sum() / n_t.sum())
        order = np.lexsort((layer.frequent_ids, -n_t, -share))[:10]
        most = [[name(i), float(share[i]), int(n_t[i])] for i in order]
    else:
        consistency, most = 0.0, []
    return {"lift_top": lift_top, "consistency": consistency, "most_consistent": most}


def coactivation(choices: np.ndarray, E: int) -> list[list[int]]:
    """E x E: off-diagonal [i][j] = tokens for which both i and j are among the chosen experts;
    diagonal [i][i] = tokens for which i is chosen at all."""
    k = choices.shape[1]
    co = np.zeros(E * E, dtype=np.int64)
    for a in range(k):
        ca = choices[:, a]
        for b in range(a + 1, k):
            cb = choices[:, b]
            ok = (ca >= 0) & (cb >= 0) & (ca != cb)
            co += np.bincount(ca[ok] * E + cb[ok], minlength=E * E)
    co = co.reshape(E, E)
    co = co + co.T
    # diagonal: tokens choosing expert i (a token listing i twice counts once)
    for i in range(E):
        co[i, i] = int(np.any(choices == i, axis=1).sum())
    return co.tolist()
