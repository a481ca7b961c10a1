"""Reading releases, the HAProxy minimum and the #2744 table (hpcserve/releases.py)."""

from __future__ import annotations

import pytest

from hpcserve import releases


@pytest.mark.parametrize(("text", "release"), [
    ("HAProxy version 2.6.12-1+deb12u2 2025/04/10 - https://haproxy.org/", (2, 6, 12)),
    ("HAProxy version 3.0.11-1+deb13u3 2026/05/20 - https://haproxy.org/", (3, 0, 11)),
    ("HAProxy version 3.2-dev5-e7b6c1a 2025/02/07", (3, 2, 0)),
    ("slurm 24.11.5", (24, 11, 5)),
    ("slurm-wlm 22.05.8", (22, 5, 8)),
    ("no version here", None),
])
def test_parse(text, release):
    assert releases.parse(text) == release


@pytest.mark.parametrize(("release", "refused"), [
    ((2, 4, 22), True), ((2, 5, 14), True), (None, True),
    ((2, 6, 0), False), ((2, 6, 12), False), ((3, 0, 11), False), ((3, 2, 26), False),
])
def test_haproxy_minimum(release, refused):
    refusal = releases.haproxy_refusal(release)
    assert (refusal is not None) == refused
    if refused:
        assert "hpcserve needs 2.6 or newer" in refusal and "idle-close-on-response" in refusal


@pytest.mark.parametrize(("release", "fixed"), [
    ((2, 6, 12), False), ((2, 6, 20), False), ((2, 6, 21), True), ((2, 8, 13), False), ((2, 8, 14), True),
    ((3, 0, 11), False), ((3, 1, 9), False), ((3, 2, 0), True), ((3, 2, 26), True), ((3, 3, 1), True), (None, False),
])
def test_queue_overshoot_table(release, fixed):
    assert releases.fixes_queue_overshoot(release) is fixed


def test_text():
    assert releases.text((3, 0, 11)) == "3.0.11" and releases.text(None) == "an unknown release"
    assert releases.text((22, 5, 8), slurm=True) == "22.05.8" and releases.text((24, 11), slurm=True) == "24.11"
