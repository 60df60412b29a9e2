"""Pruners: one file per method. A pruner is a callable `(model, calib) -> PruneStats`."""
