"""Fair share in HAProxy's queue (pure): each Slurm account's place in the cluster's fair share,
turned into the delay its requests are queued with.

The factor F of an account (0..1, 1 best) follows the algorithm the cluster runs:
- **Fair Tree** (Slurm's default since 19.05; slurm.schedmd.com/fair_tree.html): siblings in the
  association tree are ordered by their Level Fairshare (LevelFS = S / U, their shares over their
  usage among their siblings, "inf" for no usage), and the tree is walked depth first, higher
  LevelFS first, so every sub-account of a higher account comes before every sub-account of a lower
  one. Fair Tree ranks users that way and gives a user rank / user count; sshare prints no factor
  for an account's own line. hpcserve ranks the accounts the same way: F = (n - ahead) / n for n
  accounts, `ahead` those strictly before it in the walk (ties share a place, as in Fair Tree).
- **Classic** (PriorityFlags=NO_FAIR_TREE; classic_fair_share.html): sshare prints the account's
  own factor, 2^(-U/S), and hpcserve takes it as printed.
sshare prints an account's FairShare only under the classic algorithm (src/sshare/process.c: under
PRIORITY_FLAGS_FAIR_TREE only user lines get one), which tells the two apart.

An account's requests are queued as if they had arrived (1 - F) x max_delay later (HAProxy's
`set-priority-offset`, added to the class's delay). The bound: a request is overtaken only by
requests of its class that arrive less than max_delay after it, so no account starves, and the
most an account waits beyond a first-placed one is max_delay plus the service of those requests.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Iterable, Sequence


@dataclasses.dataclass(frozen=True)
class Share:
    """One account's line of `sshare -a -l` (sshare(1)), in sshare's order (the tree, depth first).

    Attributes:
        account: the Slurm account.
        depth: its depth in the association tree (1 under root; sshare indents the name by it).
        level_fs: its Level Fairshare among its siblings (Fair Tree), math.inf when it used nothing,
            None when sshare printed none (shares "parent": it stands in its parent's place).
        fair_share: the factor sshare printed for the account's own line (classic algorithm), or
            None (Fair Tree prints none for accounts).
    """

    account: str
    depth: int = 1
    level_fs: float | None = math.inf
    fair_share: float | None = None


def factors(shares: Sequence[Share]) -> dict[str, float]:
    """Each account's factor, 0..1 (1: served first), by the algorithm sshare's lines show.

    Args:
        shares: every account's line (root's left out), in sshare's order (Accounting.shares()).
    Returns:
        account -> factor: sshare's own where it printed one for every account (classic),
        else the account's place in Fair Tree's walk, (n - ahead) / n.
    """
    if shares and all(share.fair_share is not None for share in shares):
        return {share.account: float(share.fair_share or 0.0) for share in shares}
    paths: dict[str, tuple[float, ...]] = {}
    parents: list[tuple[int, tuple[float, ...]]] = []      # (depth, path) of the accounts above
    for share in shares:
        while parents and parents[-1][0] >= share.depth:
            parents.pop()
        above = parents[-1][1] if parents else ()
        # Descending LevelFS first; an account at its parent's shares takes its parent's place.
        path = above if share.level_fs is None else (*above, -share.level_fs)
        paths[share.account] = path
        parents.append((share.depth, path))
    ordered = sorted(paths.values())
    n = len(ordered)
    # bisect_left: the paths strictly before this one, so tied accounts share a place.
    return {account: (n - bisect.bisect_left(ordered, path)) / n for account, path in paths.items()}


def delays(shares: Iterable[Share], max_delay_ms: int) -> dict[str, int]:
    """Queue delay per account, ms: round((1 - factor) x max_delay_ms), 0..max_delay_ms.

    Args:
        shares: the accounts' lines of sshare (Accounting.shares()), in sshare's order.
        max_delay_ms: the delay of an account with factor 0 (accounts.fair_share_delay).
    Returns:
        account -> delay in ms, for every account given.
    """
    return {account: round((1.0 - f) * max_delay_ms) for account, f in factors(list(shares)).items()}
