"""Fair share in HAProxy's queue (pure): Slurm's fair-share factor of each account, turned into the
delay its requests are queued with.

The factor is Slurm's own formula for an account under the root, F = 2^(-U/S), U its effective
(decayed, normalized) usage and S its normalized shares (slurm.schedmd.com classic_fair_share.html;
priority_multifactor3.html: "produces the same result for an account at the first level"):
1 for an account that used nothing, 0.5 for one that used exactly its share, towards 0 beyond.

An account's requests are queued as if they had arrived (1 - F) x max_delay later (HAProxy's
`set-priority-offset`, added to the class's delay). The bound: a request is overtaken only by
requests of its class that arrive less than max_delay after it, so no account starves, and the
most an account waits beyond a fresh one is max_delay plus the service of those requests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

@dataclasses.dataclass(frozen=True)
class Share:
    """One account's place in Slurm's fair share (sshare(1)).

    Attributes:
        account: the Slurm account.
        norm_shares: its normalized shares, 0..1 (its part of the machine).
        effective_usage: its normalized, decayed usage, 0..1.
    """

    account: str
    norm_shares: float
    effective_usage: float


#: The factor of an account with no shares (S = 0): it never has priority over others.
NO_SHARES_FACTOR = 0.0


def factor(share: Share) -> float:
    """Slurm's fair-share factor 2^(-U/S) of an account, 0..1 (NO_SHARES_FACTOR when S is 0)."""
    if share.norm_shares <= 0:
        return NO_SHARES_FACTOR
    return float(2.0 ** (-share.effective_usage / share.norm_shares))


def delays(shares: Iterable[Share], max_delay_ms: int) -> dict[str, int]:
    """Queue delay per account, ms: round((1 - factor) x max_delay_ms), 0..max_delay_ms.

    Args:
        shares: the accounts' shares (Accounting.shares()).
        max_delay_ms: the delay of an account with factor 0 (accounts.fair_share_delay).
    Returns:
        account -> delay in ms, for every account given.
    """
    return {share.account: round((1.0 - factor(share)) * max_delay_ms) for share in shares}
