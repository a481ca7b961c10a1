"""OpenWebUI's groups in the pool: users an admin marked batch, by e-mail (webui.batch_users) or by
OpenWebUI group (webui.batch_groups), and the Slurm account a group's members count for
(accounting.webui_group_accounts): the maps HAProxy reads, kept up to date by each reconcile step.

OpenWebUI forwards each request's user (X-OpenWebUI-User-Email), not the user's groups, so each
step reads the groups' members from OpenWebUI's API as its admin (clients/webui.group_members:
two calls and one per group, on a kept token) and changes HAProxy's maps at runtime: a user added
to or removed from a group counts from the next request after that step (cron: within a minute),
no reload. When OpenWebUI does not answer, the maps keep the members last read and
STATE_DIR/webui-groups.json says since when and why (`hpcserve status`).
"""

from __future__ import annotations

import dataclasses
import json
import time

from ..clients import webui
from ..config import Deployment
from ..errors import HpcserveError
from ..haproxy.process import HAProxy
from ..state import StateDir, write_private

@dataclasses.dataclass(frozen=True)
class GroupsState:
    """What the last read of OpenWebUI's batch groups found (STATE_DIR/webui-groups.json).

    Attributes:
        updated: epoch seconds of the last successful read (0: never).
        members: group name -> its members' e-mails (lower case), as HAProxy has them.
        error: why the last read failed (None: it did not), the members then being older.
        failing_since: epoch seconds of the first failure in a row (None: not failing).
        attempted: epoch seconds of the last try.
    """

    updated: float = 0.0
    members: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    error: str | None = None
    failing_since: float | None = None
    attempted: float = 0.0


def read_state(deployment: Deployment) -> GroupsState:
    """The last read's record; an empty one when there is none or it is unreadable."""
    try:
        data = json.loads(StateDir(deployment.state_dir).webui_groups_file.read_text())
        return GroupsState(float(data["updated"]), {str(g): [str(e) for e in m] for g, m in data["members"].items()},
                           data.get("error"), data.get("failing_since"), float(data.get("attempted", 0)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return GroupsState()


def batch_users(deployment: Deployment, state: GroupsState | None = None) -> list[str]:
    """E-mails (lower case, sorted) whose requests through OpenWebUI queue as batch: webui.batch_users
    and the members last read of the groups webui.batch_groups names now."""
    state = read_state(deployment) if state is None else state
    emails = {email.lower() for email in deployment.webui.batch_users}
    for group in deployment.webui.batch_groups:
        emails.update(state.members.get(group, []))
    return sorted(emails)


def user_accounts(deployment: Deployment, state: GroupsState | None = None) -> dict[str, str]:
    """OpenWebUI user (e-mail, lower case) -> Slurm account: accounting.webui_accounts, and the
    members last read of each group accounting.webui_group_accounts names; a user's own entry wins,
    then the group listed first."""
    state = read_state(deployment) if state is None else state
    entries: dict[str, str] = {}
    for group, account in deployment.accounting.webui_group_accounts.items():   # the file's order
        for email in state.members.get(group, []):
            entries.setdefault(email, account)
    return entries | deployment.accounting.webui_accounts


def groups(deployment: Deployment) -> list[str]:
    """The OpenWebUI groups the deployment names (batch_groups, then webui_group_accounts), once each."""
    return list(dict.fromkeys([*deployment.webui.batch_groups, *deployment.accounting.webui_group_accounts]))


def enabled(deployment: Deployment) -> bool:
    """OpenWebUI's groups are read: API keys (only OpenWebUI's key names users) and a group named."""
    return deployment.haproxy.auth == "keys" and bool(groups(deployment))


def refresh(deployment: Deployment, haproxy: HAProxy, now: float | None = None) -> GroupsState:
    """Read the members of the groups named (`groups`) from OpenWebUI and bring HAProxy's batch map
    and OpenWebUI users' account map to them and to the deployment file's own entries. A failure is
    recorded, never raised: the maps keep the members last read.

    Returns:
        the new record (also written to STATE_DIR/webui-groups.json).
    """
    now = time.time() if now is None else now
    state = read_state(deployment)
    try:
        state = GroupsState(now, webui.group_members(deployment, groups(deployment)), attempted=now)
    except HpcserveError as exc:      # OpenWebUI not answering or refusing
        state = dataclasses.replace(state, error=str(exc), failing_since=state.failing_since or now, attempted=now)
    try:   # also on a failed read: the deployment file's own entries may have changed
        haproxy.sync_webui_batch(batch_users(deployment, state))
        haproxy.sync_webui_accounts(user_accounts(deployment, state))
    except HpcserveError as exc:      # HAProxyError: the runtime API refused
        state = dataclasses.replace(state, error=str(exc), failing_since=state.failing_since or now)
    write_private(StateDir(deployment.state_dir).webui_groups_file, json.dumps(dataclasses.asdict(state), indent=2) + "\n")
    return state
