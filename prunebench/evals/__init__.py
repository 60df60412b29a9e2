"""Evaluators: one file per evaluator, each a callable `(model, tokenizer) -> dict[str, float]`."""
