"""Low Rank Bridges (LoRB, MiniBridgeBERT, CUAI 2024): a transformer block replaced by a low-rank
linear map, the module, its least-squares initialisation, the surgery, and saving / loading.

A bridge of rank r on hidden size h maps a token's hidden state x (row vector) to

    residual:  x + (x·Dᵀ)·Uᵀ + b      (default)
    plain:         (x·Dᵀ)·Uᵀ + b

with D = `down.weight` (r × h) and U = `up.weight` (h × r), i.e. the product of two thin matrices;
b = `up.bias` (h; `bias=False` drops it). It costs 2·h·r (+ h) parameters: 393,984 at h = 768,
r = 256, against 7,087,872 for a BERT-base block, so each replaced block removes ≈ 6.69M (the
paper's 109.5 → 102.8 → … → 69.3M). `residual` is the default: a BERT block's output is
LayerNorm(x + f(x)), dominated by its input, and the identity is full rank, so a plain rank-256 map
would squeeze every later block's input into 256 of the 768 directions; the residual form keeps the
skip path whole and spends the rank on the block's change y − x.

`fit`: the bridge whose output best reproduces the block's output y from its input x over token
rows (padding excluded), by least squares with an intercept, then limited to rank r. Centred
statistics Cxx = Σ(x − x̄)ᵀ(x − x̄), Cxt = Σ(x − x̄)ᵀ(t − t̄), with t = y − x (residual) or y (plain):

    A = Cxx⁺ Cxt                          (h × h, the full least-squares map, x ↦ x·A)
    rrr (default):  A_r = A·V_r·V_rᵀ,     V_r = the top r eigenvectors of Aᵀ Cxx A (the fitted
                    values' covariance): reduced-rank regression, the best rank-r map on these
                    activations (hidden states are strongly anisotropic, so this beats truncating A)
    svd:            A_r = A truncated to its top r singular triplets (the plain reading)
    b = t̄ − x̄·A_r

and the factors split A_r's SVD P·S·Qᵀ evenly: Dᵀ = P·√S, Uᵀ = √S·Qᵀ. At r = h both are exact for
a block that is itself linear. Statistics accumulate in fp64 where the device has it (CPU, CUDA;
fp32 on MPS); the (h × h) solve runs in fp64 on the CPU.

`BridgeBlock` wraps a bridge with the encoder layer's call signature: it takes the hidden states
plus whatever masks and position biases the encoder passes (positionally or by keyword), ignores
them, and returns what the replaced layer returned: a tensor (BertLayer, DistilBERT's
TransformerBlock in transformers 5) or a 1-tuple (MPNetLayer).

Saved models: `save_bridged` writes config.json (num_hidden_layers unchanged: a bridge keeps its
block's slot), model.safetensors (the whole state dict), the tokenizer and `prunebench_bridges.json`
(which blocks are bridges and their shapes), and, when the model carries the classification head
MiniBridge trained (`model.prunebench_head`), classifier_head.safetensors (its pooling and size in
the spec; `classifier_logits` applies it). `load_bridged` rebuilds the bare model from
config.json, puts bridges of the stated shapes in place and loads the safetensors strictly: no
pickle, no remote code. `prunebench.models.load` does this for any `model.path` holding the spec.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from prunebench import PrunebenchError
from prunebench.models.blocks import find_blocks
from prunebench.models.forward import Stop
from prunebench.models.spec import WEIGHTS_FILE, folder_tokenizer, load_weights, read_folder

FORMS = ("residual", "plain")
FIT_METHODS = ("rrr", "svd")
SPEC_FILE = "prunebench_bridges.json"
HEAD_FILE = "classifier_head.safetensors"


class LowRankBridge(nn.Module):
    """x ↦ [x +] up(down(x)): `down` (hidden → rank, no bias), `up` (rank → hidden, bias optional)."""

    def __init__(self, hidden: int, rank: int, form: str = "residual", bias: bool = True):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"bridge form {form!r} must be one of {', '.join(FORMS)}")
        if not 0 < rank <= hidden:
            raise ValueError(f"bridge rank {rank} must be between 1 and the hidden size {hidden}")
        self.hidden, self.rank, self.form = hidden, rank, form
        self.down = nn.Linear(hidden, rank, bias=False)
        self.up = nn.Linear(rank, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.up(self.down(x))
        return x + out if self.form == "residual" else out

    def shape(self) -> dict:
        return {"hidden": self.hidden, "rank": self.rank, "form": self.form, "bias": self.up.bias is not None}

    @staticmethod
    def cost(hidden: int, rank: int, bias: bool = True) -> int:
        """Parameters of one bridge: 2·hidden·rank (+ hidden)."""
        return 2 * hidden * rank + (hidden if bias else 0)

    @torch.no_grad()
    def set_identity(self) -> None:
        """Residual: up = 0 (and b = 0), down keeps its random init (LoRA's start: the output is
        exactly x and both factors get gradients). Plain: only at full rank, down = up = I."""
        if self.form == "residual":
            self.up.weight.zero_()
        elif self.rank == self.hidden:
            self.down.weight.copy_(torch.eye(self.hidden))
            self.up.weight.copy_(torch.eye(self.hidden))
        else:
            raise PrunebenchError(
                f"a plain bridge of rank {self.rank} < hidden {self.hidden} cannot be the identity;"
                " use form=residual or init=fit"
            )
        if self.up.bias is not None:
            self.up.bias.zero_()

    @torch.no_grad()
    def set_map(self, A: torch.Tensor, b: torch.Tensor | None) -> None:
        """Load x ↦ x·A + b (A of rank ≤ self.rank, h × h) as balanced factors."""
        P, S, Qt = torch.linalg.svd(A.double(), full_matrices=False)
        r = self.rank
        root = S[:r].clamp_min(0).sqrt()
        dev, dt = self.down.weight.device, self.down.weight.dtype
        self.down.weight.copy_((P[:, :r] * root).T.to(dev, dt))  # Dᵀ = P·√S
        self.up.weight.copy_((root[:, None] * Qt[:r]).T.to(dev, dt))  # Uᵀ = √S·Qᵀ
        if self.up.bias is not None:
            self.up.bias.copy_((b if b is not None else torch.zeros(self.hidden)).to(dev, dt))


def _acc_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


class BridgeFit:
    """Streaming statistics of (block input x, block output y) token rows for `fit`: counts, sums,
    the centred-by-construction second moments, and the traces needed for the fit's relative error."""

    def __init__(self, hidden: int, form: str = "residual", device: torch.device | str = "cpu"):
        if form not in FORMS:
            raise ValueError(f"bridge form {form!r} must be one of {', '.join(FORMS)}")
        self.hidden, self.form = hidden, form
        device = torch.device(device)
        dt = _acc_dtype(device)
        z = lambda *shape: torch.zeros(*shape, dtype=dt, device=device)  # noqa: E731
        self.n = 0
        self.sx, self.st, self.sy = z(hidden), z(hidden), z(hidden)
        self.xx, self.xt = z(hidden, hidden), z(hidden, hidden)
        self.tt_trace, self.yy_trace = z(()), z(())

    @torch.no_grad()
    def add(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """x, y: (..., hidden) block input and output; mask (...) with 1 for the rows to use."""
        x, y = x.reshape(-1, self.hidden), y.reshape(-1, self.hidden)
        if mask is not None:
            keep = mask.reshape(-1).to(x.device).bool()
            x, y = x[keep], y[keep]
        dt = self.xx.dtype
        x, y = x.to(self.xx.device, dt), y.to(self.xx.device, dt)
        t = y - x if self.form == "residual" else y
        self.n += len(x)
        self.sx += x.sum(0)
        self.st += t.sum(0)
        self.sy += y.sum(0)
        self.xx += x.T @ x
        self.xt += x.T @ t
        self.tt_trace += (t * t).sum()
        self.yy_trace += (y * y).sum()

    def solve(self, rank: int, method: str = "rrr", bias: bool = True) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A_r (h × h), b (h), relative error Σ‖y − ŷ‖² / Σ‖y − ȳ‖² on the fitted rows), fp64 on the CPU."""
        if method not in FIT_METHODS:
            raise ValueError(f"fit method {method!r} must be one of {', '.join(FIT_METHODS)}")
        if self.n == 0:
            raise PrunebenchError("no token rows were collected to fit a bridge")
        n = self.n
        sx, st, sy = (v.double().cpu() for v in (self.sx, self.st, self.sy))
        xx, xt = self.xx.double().cpu(), self.xt.double().cpu()
        if bias:  # centre: the intercept is free, the rank limits only the map
            mx, mt = sx / n, st / n
            cxx, cxt = xx - n * torch.outer(mx, mx), xt - n * torch.outer(mx, mt)
        else:
            mx, mt = torch.zeros_like(sx), torch.zeros_like(st)
            cxx, cxt = xx, xt
        A = torch.linalg.lstsq(cxx, cxt, driver="gelsd").solution  # minimum-norm when Cxx is singular
        if rank < self.hidden:
            if method == "rrr":
                fitted = A.T @ cxx @ A
                _, vecs = torch.linalg.eigh((fitted + fitted.T) / 2)
                V = vecs[:, -rank:]  # eigh sorts ascending
                A = A @ V @ V.T
            else:
                P, S, Qt = torch.linalg.svd(A, full_matrices=False)
                A = (P[:, :rank] * S[:rank]) @ Qt[:rank]
        b = mt - mx @ A if bias else torch.zeros(self.hidden, dtype=torch.float64)
        # residual of t (= residual of y): Σ‖t − x·A − b‖² expanded over the moments
        tt = float(self.tt_trace.double().cpu())
        res = tt - 2 * float((A * xt).sum()) + float((A * (xx @ A)).sum())
        res += n * float(b @ b) - 2 * float(b @ st) + 2 * float((sx @ A) @ b)
        total = float(self.yy_trace.double().cpu()) - float(sy @ sy) / n
        return A, b, max(res, 0.0) / max(total, 1e-30)


def fit_bridge(
    x: torch.Tensor,
    y: torch.Tensor,
    rank: int,
    form: str = "residual",
    bias: bool = True,
    method: str = "rrr",
    mask: torch.Tensor | None = None,
) -> LowRankBridge:
    """The rank-`rank` bridge that best reproduces y from x over the token rows (see the module
    docstring), on x's device and dtype. Its relative fit error is in `bridge.fit_error`."""
    hidden = x.shape[-1]
    stats = BridgeFit(hidden, form, x.device)
    stats.add(x, y, mask)
    bridge = LowRankBridge(hidden, rank, form, bias).to(device=x.device, dtype=x.dtype)
    A, b, err = stats.solve(rank, method, bias)
    bridge.set_map(A, b)
    bridge.fit_error = err
    return bridge


class BridgeBlock(nn.Module):
    """A bridge in a transformer block's slot: same call signature (hidden states first, then any
    masks / position biases, which it ignores), same return type as the layer it replaced."""

    def __init__(self, bridge: LowRankBridge, returns: str = "tensor"):
        super().__init__()
        if returns not in ("tensor", "tuple"):
            raise ValueError(f"returns={returns!r} must be 'tensor' or 'tuple'")
        self.bridge, self.returns = bridge, returns

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = self.bridge(hidden_states)
        return (out,) if self.returns == "tuple" else out


def has_bridges(model: nn.Module) -> bool:
    return any(isinstance(m, BridgeBlock) for m in model.modules())


@torch.no_grad()
def block_returns(model: nn.Module, index: int) -> str:
    """'tuple' or 'tensor': what block `index` returns, seen on a two-token forward of the model
    (stopped right after that block)."""
    from prunebench.placement import compute_device

    seen: list[str] = []

    def grab(_module, _args, out):
        seen.append("tuple" if isinstance(out, (tuple, list)) else "tensor")
        raise Stop

    handle = find_blocks(model)[index].register_forward_hook(grab)
    was_training = model.training
    try:
        model.eval()
        with contextlib.suppress(Stop):
            model(input_ids=torch.tensor([[1, 2]], device=compute_device(model)))
    finally:
        handle.remove()
        model.train(was_training)
    if not seen:
        raise PrunebenchError(f"block {index} of {type(model).__name__} was not called on a forward pass")
    return seen[0]


def replace_block(model: nn.Module, index: int, bridge: LowRankBridge, returns: str | None = None) -> BridgeBlock:
    """Put `bridge` in block `index` (0-based) of the encoder's block list, on that block's device
    and dtype; `returns` (tensor/tuple) is probed from the replaced block when not given."""
    blocks = find_blocks(model)
    if not 0 <= index < len(blocks):
        raise PrunebenchError(f"block index {index} is outside the model's {len(blocks)} blocks (0-based)")
    old = blocks[index]
    if isinstance(old, BridgeBlock):
        raise PrunebenchError(f"block {index} is already a bridge")
    ref = next(old.parameters(), None)
    if ref is not None:
        bridge = bridge.to(device=ref.device, dtype=ref.dtype)
    block = BridgeBlock(bridge, returns or block_returns(model, index))
    blocks[index] = block
    return block


def bridge_spec(model: nn.Module) -> dict:
    """Which blocks (0-based) are bridges and their shapes, plus what rebuilding the model needs."""
    blocks = find_blocks(model)
    return {
        "format": "prunebench-bridges",
        "version": 1,
        "arch": type(model).__name__,
        "num_hidden_layers": len(blocks),
        "bridges": [
            {"index": i, **b.bridge.shape(), "returns": b.returns}
            for i, b in enumerate(blocks)
            if isinstance(b, BridgeBlock)
        ],
    }


def save_bridged(model: nn.Module, tokenizer, folder: str | Path) -> Path:
    """config.json + model.safetensors + tokenizer + prunebench_bridges.json (see the module docstring)."""
    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    save_model(model, str(folder / WEIGHTS_FILE))  # shared (tied) tensors stored once
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)
    spec = bridge_spec(model)
    head = getattr(model, "prunebench_head", None)  # (head, pooling): the classifier MiniBridge trained
    if head is not None:
        from safetensors.torch import save_file

        module, pooling = head
        save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, folder / HEAD_FILE)
        linear = module[-1]
        spec["head"] = {"pooling": pooling, "classes": linear.out_features, "dropout": module[0].p}
    (folder / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    return folder


def classifier_logits(model: nn.Module, enc) -> torch.Tensor:
    """Logits of the saved classifier (a model loaded from a folder with a head): the head on the
    pooled last hidden state, as MiniBridge trained it."""
    from prunebench.models.encoders import model_inputs, pool

    head, pooling = model.prunebench_head
    hidden = model(**model_inputs(model, enc)).last_hidden_state
    pooled = pool(hidden, enc["attention_mask"].to(hidden.device), pooling)
    return head(pooled.to(head[-1].weight.device, head[-1].weight.dtype))


def load_bridged(folder: str | Path, dtype: torch.dtype | None = None):
    """(model, tokenizer) from a `save_bridged` folder, in eval mode, on the CPU."""
    import transformers

    folder = Path(folder)
    spec, config = read_folder(folder, SPEC_FILE, "bridged")
    if spec.get("format") != "prunebench-bridges":
        raise PrunebenchError(f"{folder / SPEC_FILE} is not a prunebench bridge spec")
    cls = getattr(transformers, spec.get("arch", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        cls = None
    model = cls(config) if cls is not None else transformers.AutoModel.from_config(config)
    if dtype is not None:
        model = model.to(dtype)
    if len(find_blocks(model)) != spec["num_hidden_layers"]:
        raise PrunebenchError(f"{folder}: config.json and {SPEC_FILE} disagree on the number of blocks")
    for b in spec["bridges"]:
        bridge = LowRankBridge(int(b["hidden"]), int(b["rank"]), b["form"], bool(b["bias"]))
        replace_block(model, int(b["index"]), bridge, returns=b["returns"])
    load_weights(model, folder, SPEC_FILE)
    if "head" in spec:
        from safetensors.torch import load_file

        h = spec["head"]
        head = nn.Sequential(nn.Dropout(h["dropout"]), nn.Linear(config.hidden_size, int(h["classes"])))
        head.load_state_dict(load_file(folder / HEAD_FILE), strict=True)
        model.prunebench_head = (head.eval(), h["pooling"])
    return model.eval(), folder_tokenizer(folder)


def bridge_count(model: nn.Module) -> int:
    return sum(isinstance(b, BridgeBlock) for b in find_blocks(model))
