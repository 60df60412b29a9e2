"""Recovery after pruning: a callable `(model, teacher | None, data) -> dict` of training stats."""
