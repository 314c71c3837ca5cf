"""Named crash points for the fault harness and the crash-safety tests.

``failpoint("after_ledger_write")`` kills the process with SIGKILL when the environment
variable ``OG_FAILPOINT`` names that point, and does nothing otherwise. SIGKILL, not an
exception: the point is to prove that a process dying at the worst moment, with no cleanup,
neither loses a record nor anchors one twice.

Points: ``before_ledger_write``, ``after_ledger_write`` (before the offset commit),
``after_batch_built`` (batch stored, no transaction yet), ``after_tx_sent`` (transaction
mined, not yet recorded in the ledger), ``after_batch_anchored`` (anchoring recorded, the
batch not yet published).
"""

from __future__ import annotations

import os
import signal

__all__ = ["POINTS", "failpoint"]

POINTS = frozenset(
    {
        "before_ledger_write",
        "after_ledger_write",
        "after_batch_built",
        "after_tx_sent",
        "after_batch_anchored",
    }
)
_ARMED = os.environ.get("OG_FAILPOINT", "")
if _ARMED and _ARMED not in POINTS:
    raise RuntimeError(f"OG_FAILPOINT={_ARMED!r} is not one of {sorted(POINTS)}")


def failpoint(name: str) -> None:
    if name == _ARMED:
        os.kill(os.getpid(), signal.SIGKILL)
