"""The divergence guard's events (``FitResult.guard_events``: rollbacks and BatchNorm re-estimations) in words,
for the ledger notes and the report. Torch-free: the report renders them without importing torch."""

from __future__ import annotations

from typing import Any


def guard_event_text(event: dict[str, Any]) -> str:
    """One guard event (a rollback or a BatchNorm re-estimation, as ``fit`` records them) in words."""
    if event["action"] == "rollback":
        return f"epoch {event['epoch']} rolled back ({event['reason']}), peak lr {event['peak_lr']:.3g}"
    return (f"epoch {event['epoch']}: BatchNorm statistics re-estimated (val {event['val_before']:.1f}% -> "
            f"{event['val_after']:.1f}%)")
