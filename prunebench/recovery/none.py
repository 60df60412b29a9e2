"""No recovery: the pruned model is evaluated as it is."""

from __future__ import annotations


class NoRecovery:
    needs_teacher = False
    supports_offload = True
    supports_stream = True

    def __init__(self, name: str = "none"):
        self.name = name

    def __call__(self, model, teacher=None, data=None) -> dict:
        return {}
