"""Minitron (Muralidharan et al., "Compact Language Models via Pruning and Knowledge Distillation",
arXiv 2407.14679): activation-based importance, then depth and width trimmed for real.

    pruner: {_target_: prunebench.pruners.minitron.Minitron, target: {heads: 6, ffn: 1024}}

Modules: `pruner` (the `Minitron` pruner: knobs, checks, the prune-and-record procedure),
`importance` (the activation scores from one hooked pass), `plan` (shape arithmetic and the
trimming plan), `search` (the architecture search under a parameter budget), `experts` (MoE expert
scores and trimming).
"""

from prunebench.pruners.minitron.pruner import Minitron

__all__ = ["Minitron"]
