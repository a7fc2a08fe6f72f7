"""Sensitivity: what each candidate format costs each Linear, measured in one layer pass.

For every target Linear ``W`` and every candidate format ``f``, the Linear is quantized onto
``f`` (GPTQ by default, as the final model will be; RTN as a cheaper option) and two numbers are
kept: the stored bytes, and the *output error on the calibration activations*

    error(W, f) = mean over tokens t of ||(Q_f(W) - W) x_t||^2 = tr(dW H dW^T) / 2,

with ``H = 2 X X^T / n`` the Hessian the runner already collects for GPTQ: no extra forward.
The layer itself is left unchanged, so every layer is measured on the float model's
activations (the allocation then decides; :mod:`modelpress.fit.allocate`).

Linears that read one input (q/k/v; gate/up) form one *group*: engines fuse them into one
matmul and need one scheme for all of them (vLLM refuses a fused layer whose parts differ), so
they are quantized together and allocated together.

A candidate ``"keep"`` is the Linear left in its checkpoint dtype: zero error, its float bytes.

Bytes are those the compressed-tensors writer stores for the Linear (codes, scales, shape).
The result is plain data (:class:`Sensitivity`), saved as JSON and plotted by the report.

Simplification, stated: the error is each Linear's own output error, the quantity GPTQ
minimises; errors of different Linears are added as if independent. How an error propagates
to the loss differs between Linears (an error in ``v_proj`` passes through attention before it
reaches the residual stream); ``weights="kl"`` in :func:`modelpress.fit.allocate.allocate` rescales each
group by a measured end-to-end factor when that matters.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from modelpress.errors import UserError
from modelpress.export.compressed_tensors import compressed_tensors
from modelpress.pipeline.stages import HESSIAN, stackable

logger = logging.getLogger("modelpress")

KEEP = "keep"

# Candidates by target engine (module docstring of modelpress.fit.search says why). Every
# integer format is symmetric with fp16 scales (what vLLM's Marlin/Machete kernels and
# transformers' compressed-tensors path take); group sizes are 128 and 64, the ones vLLM's
# kernels accept for these shapes. A candidate whose group size does not divide a Linear's
# input is not offered for that Linear.
CANDIDATES = {
    "vllm": ("int8", "int4-g128", "int4-g64", "int3-g128", "int3-g64", "int2-g64", "fp8", KEEP),
    "transformers": ("int8", "int4-g128", "int4-g64", "int3-g128", "int3-g64", "int2-g64", KEEP),
}


@dataclass
class LinearSensitivity:
    """One Linear: where it is, and per candidate format its output error and stored bytes."""

    layer: int
    group: str  # the Linear whose input it shares (itself when alone): one format per group
    in_features: int
    numel: int
    energy: float  # mean ||W x||^2 over the calibration tokens: the scale its errors compare to
    errors: dict[str, float] = field(default_factory=dict)
    nbytes: dict[str, int] = field(default_factory=dict)
    # errors are the model's KL with this tensor alone rounded, measured end to end, not an output
    # error priced by a gain (the input embedding and output head, :mod:`modelpress.fit.gguf`)
    kl_measured: bool = False


@dataclass
class Sensitivity:
    """Per-Linear sensitivities of one model, plus the bytes outside them."""

    model: str
    method: str
    candidates: list[str]
    linears: dict[str, LinearSensitivity]
    fixed_bytes: int  # every tensor that is not a target Linear's weight, as the checkpoint stores it
    tokens: int = 0
    seconds: float = 0.0
    # group -> probed format -> measured KL (nats/token) and output error (:func:`probe_gains`)
    probes: dict[str, dict[str, dict]] = field(default_factory=dict)
    probe_codes: str = ""  # whose codes the probes rounded to: "gptq" (the layer pass's) or "rtn"
    calibration: dict = field(default_factory=dict)  # the text and windows measured on (:func:`calibration_key`)

    def gain(self, group: str, spec: str) -> float:
        """KL per unit of output error for ``group`` in ``spec``: that of the probed format nearest
        in bits per weight (the KL of a format far below the probe grows faster than its error)."""
        names = self._members[group]
        if self.linears[names[0]].kl_measured:  # its errors are measured KL already
            return 1.0
        probed = self.probes[group]
        numel = sum(self.linears[n].numel for n in names)

        def bits(f: str) -> float:
            return 8 * sum(self.linears[n].nbytes[f] for n in names) / numel

        nearest = min(probed, key=lambda f: abs(bits(f) - bits(spec)))
        p = probed[nearest]
        return p["kl"] / p["error"] if p["error"] > 0 else 0.0

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> Sensitivity:
        data = json.loads(Path(path).read_text())
        data["linears"] = {n: LinearSensitivity(**s) for n, s in data["linears"].items()}
        return cls(**data)

    @functools.cached_property
    def _members(self) -> dict[str, list[str]]:
        """:meth:`groups`, built once: :meth:`gain` runs for every group and format of an allocation."""
        return self.groups()

    def groups(self) -> dict[str, list[str]]:
        """Group name -> its Linears, in model order."""
        out: dict[str, list[str]] = {}
        for name, s in self.linears.items():
            out.setdefault(s.group, []).append(name)
        return out

    def bytes_of(self, choice: dict[str, str]) -> int:
        """Total model bytes when each Linear is stored in ``choice[name]``."""
        return self.fixed_bytes + sum(s.nbytes[choice[n]] for n, s in self.linears.items())

    def error_of(self, choice: dict[str, str]) -> float:
        return sum(s.errors[choice[n]] for n, s in self.linears.items())


class SensitivityStage:
    """A layer stage that measures and changes nothing: for each group of Linears sharing an
    input and each candidate that fits them, quantize (GPTQ or RTN) and record error and bytes."""

    needs = frozenset({HESSIAN})
    keeps_layer = True  # the runner passes on the statistics forward's outputs: one forward per layer

    def __init__(self, candidates: list[str], method: str, gptq_config, source_dtype, probe_dir: Path | None = None,
                 fused: bool = True):
        self.candidates = candidates
        self.fused = fused  # one format per group of Linears an engine fuses (vLLM); else per Linear (llama.cpp)
        self.method = method
        self.gptq_config = gptq_config
        self.source_dtype = source_dtype  # Linear name -> its weight's dtype in the checkpoint
        self.probe_dir = probe_dir  # where the probe formats' weights go (:func:`probe_gains`), if anywhere
        self.table: dict[str, LinearSensitivity] = {}
        self.tokens = 0

    def run(self, layer, prefix, modules, formats, stats) -> dict:
        i = int(re.search(r"\.(\d+)\.$", prefix)[1])
        probe_weights: dict[str, torch.Tensor] = {}
        for names in stackable(modules, formats, stats):
            Ws = [modules[n].weight.data.to(torch.float32) for n in names]
            H, n_tokens = stats.hessian(names[0])
            self.tokens = max(self.tokens, n_tokens)
            W_all = torch.cat(Ws)
            owner = stats.owner_of(names[0])
            for n, W in zip(names, Ws):
                self.table[n] = LinearSensitivity(layer=i, group=engine_group(n, owner, self.fused), in_features=W.shape[1],
                                                  numel=W.numel(), energy=_output_sq(W, H), errors={KEEP: 0.0},
                                                  nbytes={KEEP: W.numel() * self.source_dtype(n).itemsize})
            weights: dict[str, list[torch.Tensor]] = {}
            for spec in self.candidates:
                fmt = None if spec == KEEP else candidate_format(spec, self.gptq_config)
                if fmt is None or not fmt.divides(W_all.shape[1]):
                    continue
                weights[spec] = []
                for n, W, (Wq, nbytes) in zip(names, Ws, self._encode(Ws, W_all, H, n_tokens, fmt)):
                    s = self.table[n]
                    s.errors[spec] = _output_sq(Wq - W, H)
                    s.nbytes[spec] = nbytes
                    weights[spec].append(Wq.to(self.source_dtype(n)))
            if self.probe_dir is not None:
                for group in [names] if self.fused else [[n] for n in names]:
                    numel = sum(self.table[n].numel for n in group)
                    for spec in probe_formats(group_bytes({n: self.table[n] for n in group}), numel):
                        probe_weights.update({f"{spec}/{n}": weights[spec][names.index(n)] for n in group})
        if self.probe_dir is not None:
            _save(probe_weights, probe_file(self.probe_dir, i))
        return {}

    def _encode(self, Ws, W_all, H, n_tokens: int, fmt) -> list[tuple[torch.Tensor, int]]:
        """Each part's dequantized weight (float32) and stored bytes in ``fmt``, encoded as the
        writer will: row-wise formats on the stacked rows, per-tensor ones alone (as
        ``GPTQStage``); llama.cpp's block types as ``GGUFGPTQStage`` (per row the better of
        GPTQ's codes and llama.cpp's own)."""
        from modelpress.algorithms.gptq import gptq
        from modelpress.formats.gguf_blocks import GGUFBlockFormat

        c = self.gptq_config
        calibrated = self.method == "gptq" and H is not None and n_tokens > 0
        if isinstance(fmt, GGUFBlockFormat):
            from modelpress.algorithms.gguf_gptq import gguf_gptq
            from modelpress.pipeline.stages import better_rows

            data = fmt.quantize(W_all)
            if calibrated:
                data = better_rows(W_all, H.to(torch.float32), fmt, data,
                                   gguf_gptq(W_all, H, fmt, c.block_size, c.damp, c.act_order).data)
            rows = [data[r:r + W.shape[0]] for r, W in _offsets(Ws)]
            return [(fmt.dequantize(d, tuple(W.shape)), d.numel()) for d, W in zip(rows, Ws)]

        def quantize(W):
            return gptq(W, H, fmt, block_size=c.block_size, damp=c.damp, act_order=c.act_order).qt if calibrated \
                else fmt.quantize(W)

        if fmt.granularity == "tensor" or len(Ws) == 1:
            parts = [quantize(W) for W in Ws]
        else:
            qt = quantize(W_all)
            parts = [qt.rows(r, r + W.shape[0]) for r, W in _offsets(Ws)]
        return [(part.dequantize().to(torch.float32), stored_nbytes(part)) for part in parts]


def stored_nbytes(qt) -> int:
    """A quantized tensor's bytes as the compressed-tensors writer stores them: codes, scales and
    the shape tensor (``qt.nbytes`` counts codes and scales only). The name is a placeholder."""
    return sum(t.nbytes for t in compressed_tensors("w", qt).values())


def candidate_format(spec: str, config):
    """The format a candidate names: one of llama.cpp's block types (``q4_k``...) or a format
    spec of the compressed-tensors path (``int4-g128``, ``fp8``...)."""
    from modelpress.formats.gguf_blocks import GGUF_FORMATS

    return GGUF_FORMATS.get(spec.strip().lower()) or config.spec_format(spec)


def _offsets(Ws: list[torch.Tensor]):
    """``(first row, W)`` of each part of a row-stacked weight."""
    row = 0
    for W in Ws:
        yield row, W
        row += W.shape[0]


_EXPERT = re.compile(r"^(?P<experts>.+\.experts)\.\d+\.(?P<proj>[^.]+)$")


def engine_group(name: str, owner: str, fused: bool) -> str:
    """The group a Linear is allocated with (one format per group).

    ``fused`` (vLLM): the Linears reading one input (``owner``: q/k/v, gate/up), and every expert
    of a mixture-of-experts layer with all its projections (vLLM runs them as one fused kernel
    under one scheme). Otherwise (llama.cpp): each Linear alone, except experts, which a GGUF file
    stores as one 3-D tensor per layer and projection (``ffn_gate_exps``...) of one type.
    """
    m = _EXPERT.match(name)
    if m:
        return f"{m['experts']}.*" if fused else f"{m['experts']}.*.{m['proj']}"
    return owner if fused else name


def group_bytes(linears: dict[str, LinearSensitivity]) -> dict[str, int]:
    """Bytes of a group in every format all its Linears can take (except ``keep``)."""
    first = next(iter(linears.values()))
    return {f: sum(s.nbytes[f] for s in linears.values()) for f in first.nbytes
            if f != KEEP and all(f in s.nbytes for s in linears.values())}


def probe_file(probe_dir: Path, layer: int) -> Path:
    return Path(probe_dir) / f"layer-{layer:05d}.safetensors"


def _open_probes(probe_dir: str | Path, layer: int):
    from safetensors import safe_open

    path = probe_file(Path(probe_dir), layer)
    if not path.is_file():
        raise UserError(f"{path} is missing: measure the sensitivity again with the same probe folder")
    return safe_open(str(path), framework="pt")


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp))
    tmp.replace(path)


def _output_sq(dW: torch.Tensor, H: torch.Tensor | None) -> float:
    """Mean over the calibration tokens of ``||dW x||^2``, from ``H = 2 X X^T / n``."""
    if H is None:
        return 0.0
    H = H.to(torch.float32)
    return 0.5 * ((dW @ H) * dW).sum(dtype=torch.float64).item()


def measure_sensitivity(model: str, candidates: list[str], config, method: str = "gptq",
                        probe_dir: str | Path | None = None, fused: bool = True) -> Sensitivity:
    """One layer pass over ``model``: every target Linear's error and bytes in every candidate.

    Args:
        model: checkpoint folder (or anything ``compress`` reads).
        candidates: format specs (``int4-g128``, ``fp8``...), or llama.cpp block types
            (``q4_k``, ``q8_0``...), and ``"keep"``.
        config: the :class:`~modelpress.pipeline.recipe.GPTQConfig` the model will be quantized
            with: its observer, damping, act-order, exclusions and calibration text.
        method: ``"gptq"`` (the error of the codes GPTQ would write) or ``"rtn"`` (cheaper).
        probe_dir: where to keep each group's weights in its :func:`probe_formats`, in the
            checkpoint's dtype, for :func:`probe_gains` to probe with the codes the model will
            really have (up to twice the Linears' bytes on disk, until the probes are done).
        fused: Linears that read one input (q/k/v, gate/up) form one group, allocated one format
            (vLLM fuses them); ``False``: every Linear is its own group (llama.cpp stores and
            runs them apart, and its own mixes give ``attn_v`` more bits than ``attn_q``).
    """
    from modelpress.models import loading
    from modelpress.models.layers import LayerwiseModel
    from modelpress.models.tensors import plan_targets
    from modelpress.pipeline.runner import calibration_ids, run_layers
    from modelpress.pipeline.sinks import ObserveSink

    if method not in ("gptq", "rtn"):
        raise UserError(f"sensitivity method must be gptq or rtn, got {method!r}")
    for spec in candidates:
        if spec != KEEP:
            candidate_format(spec, config)
    t0 = time.monotonic()
    source = loading.resolve(model)
    lm = LayerwiseModel(source)
    targets = plan_targets(lm.model, config.model_copy(update={"format": "int8", "overrides": {}}))
    ids = calibration_ids(loading.load_tokenizer(source), config.calibration)
    stage = SensitivityStage(list(candidates), method, config, lambda n: lm.source_dtype(n + ".weight"),
                             None if probe_dir is None else Path(probe_dir), fused)
    run_layers(lm, [stage], targets.formats, ObserveSink(), ids, config.calibration.batch_size)
    target_weights = {n + ".weight" for n in targets.formats}
    state = lm.model.state_dict()  # shapes only by now (every layer is back on the meta device)
    fixed = sum(state[n].numel() * lm.source_dtype(n).itemsize for n in lm.names if n not in target_weights)
    return Sensitivity(model=str(model), method=method, candidates=list(candidates), linears=stage.table,
                       fixed_bytes=int(fixed), tokens=stage.tokens, seconds=round(time.monotonic() - t0, 1),
                       calibration=calibration_key(config.calibration))


def calibration_key(calibration) -> dict:
    """What of a :class:`~modelpress.pipeline.recipe.CalibrationConfig` decides the measured
    errors: the text (a file by its absolute path) and the windows; not the batch size."""
    data = calibration.model_dump(mode="json", exclude={"batch_size"})
    if data["text"] is not None and Path(data["text"]).exists():
        data["text"] = str(Path(data["text"]).resolve())
    return data


PROBE_MIN_BITS = 3.0


def probe_formats(nbytes: dict[str, int], numel: int) -> list[str]:
    """The formats a group of ``numel`` weights is probed in, given its bytes in each format
    (:func:`group_bytes`): its cheapest candidate of at least 3 bits per weight (errors well above
    the noise of a short text, short of the collapse of 2-bit formats), and its cheapest candidate
    when that has fewer bits (a 2-bit format's KL grows faster than its error: it is measured, not
    extrapolated)."""
    options = sorted((b, f) for f, b in nbytes.items())
    mid = next((f for b, f in options if 8 * b / numel >= PROBE_MIN_BITS), None)
    return [f for f in dict.fromkeys([options[0][1], mid]) if f is not None]


@torch.no_grad()
def probe_gains(sens: Sensitivity, config, windows: int = 2, probe_dir: str | Path | None = None) -> Sensitivity:
    """How much each group's output error costs at the model's output, measured.

    For each group alone, its Linears are set to each of :func:`probe_formats` and the whole model is
    run on ``windows`` calibration windows: the KL divergence of its next-token distribution
    from the float model's, divided by the group's output error on the same tokens, is the
    group's *gain* (:meth:`Sensitivity.gain`). The allocation's ``"kl"`` objective predicts a
    group's KL in every format as gain x error (to first order KL grows in proportion to the
    squared output error; the gain of the probe nearest in bits is used, so a 2-bit format is
    priced by its own measurement).

    The probed weights are those the layer pass kept in ``probe_dir`` (:func:`measure_sensitivity`):
    the codes the model will have. GPTQ's errors are smaller than round-to-nearest's at the same
    format and shaped differently, and pricing them by round-to-nearest probes misplaced the
    allocation: on SmolLM2 at the bytes of uniform int3-g64 it went from 37.26 to 35.61 ppl
    (uniform: 36.17) when the probes switched to GPTQ's codes (``benchmarks/mixed.py``). Without
    ``probe_dir`` they are rounded to nearest here.

    Costs one forward per probe (two per group at most) from the group's layer on
    (:class:`~modelpress.models.layers.TailForward`), with the model in memory (unlike the layer pass).
    """
    import torch.nn.functional as F

    from modelpress.models import loading
    from modelpress.pipeline.runner import calibration_ids
    from modelpress.progress import track
    from modelpress.train.losses import kl as kl_divergence

    from modelpress.models.arch import arch_for
    from modelpress.models.layers import TailForward
    from modelpress.models.moe import unfuse_experts

    t0 = time.monotonic()
    source = loading.resolve(sens.model)
    model = loading.load_model(source).eval()
    arch = arch_for(model.config)
    if arch.moe is not None:  # one Linear per expert and projection, named as the layer pass named them
        unfuse_experts(model, arch.layers, arch.moe, copy_weights=True)
    ids = calibration_ids(loading.load_tokenizer(source), config.calibration)[:windows]
    tail = TailForward(model, arch.layers, ids)
    base = F.log_softmax(tail.logits.float(), dim=-1)
    groups = {g: names for g, names in sens.groups().items() if not sens.linears[names[0]].kl_measured}
    jobs = [(group, spec) for group, names in groups.items()
            for spec in probe_formats(group_bytes({n: sens.linears[n] for n in names}),
                                      sum(sens.linears[n].numel for n in names))]
    sens.probes = {}
    stored, stored_layer = None, None  # one layer's probe file open at a time
    for group, spec in track(jobs, total=len(jobs), what="probe"):
        names = groups[group]
        layer = sens.linears[names[0]].layer
        if probe_dir is not None and layer != stored_layer:
            stored, stored_layer = _open_probes(probe_dir, layer), layer
        linears = {n: model.get_submodule(n) for n in names}
        saved = {n: m.weight.data for n, m in linears.items()}
        errors: list[float] = []

        def hook(module, args, output, dW=None):
            x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float32)
            errors.append((x @ dW.T).pow(2).sum(-1).mean().item())

        handles = []
        for n, m in linears.items():
            W = saved[n].to(torch.float32)
            if probe_dir is None:
                Wq = candidate_format(spec, config).fake_quantize(W).to(saved[n].dtype).to(torch.float32)
            else:
                Wq = stored.get_tensor(f"{spec}/{n}").to(torch.float32)
            handles.append(m.register_forward_hook(functools.partial(hook, dW=Wq - W)))
            m.weight.data = Wq.to(saved[n].dtype)
        try:
            logp = F.log_softmax(tail.logits_from(layer).float(), dim=-1)
        finally:
            for h in handles:
                h.remove()
            for n, m in linears.items():
                m.weight.data = saved[n]
        kl = kl_divergence(base, logp).mean().item()
        sens.probes.setdefault(group, {})[spec] = {"kl": kl, "error": sum(errors)}
    sens.probe_codes = "rtn" if probe_dir is None else sens.method
    sens.seconds = round(sens.seconds + time.monotonic() - t0, 1)
    return sens


def embedding_modules(model) -> list[str]:
    """Module names of ``model``'s input embedding and, when it is a tensor of its own (not tied
    to the embedding), its output head."""
    from modelpress.models.tensors import head_is_tied, head_name

    embedding = model.get_input_embeddings()
    out = [next(n for n, m in model.named_modules() if m is embedding)]
    if model.get_output_embeddings() is not None and not head_is_tied(model):
        out.append(head_name(model))
    return out


@torch.no_grad()
def measure_embeddings(sens: Sensitivity, config, windows: int = 2, head_only: bool = False) -> Sensitivity:
    """Add the input embedding and the untied output head (with ``head_only``, the untied head
    alone) to ``sens`` as allocation choices.

    For each of them and each candidate format whose groups divide its rows, the tensor alone is
    rounded (llama.cpp's block types as its quantizer rounds them, the GGUF writer's encoding of
    these tensors; other formats to nearest) and the model's KL from the float model is measured
    on the first ``windows`` calibration windows, the ones :func:`probe_gains` uses. That KL is
    the entry's error (``kl_measured``: the allocation takes it as the predicted loss as it is),
    beside the format's stored bytes and ``keep`` (the checkpoint's float type, no loss). A tied
    embedding is measured with the output head rounded with it, as llama.cpp uses the one tensor
    for both. *Simplification:* a head that ``compress`` will quantize with GPTQ is priced by
    round-to-nearest, an upper bound on its loss (GPTQ's output error is lower on the inputs it
    is calibrated on).

    Costs one forward per format and tensor, plus the encoding of the tensor in each (llama.cpp's
    k-quant parameter search is the slow part for a large vocabulary).
    """
    import torch.nn.functional as F

    from modelpress.formats.gguf_blocks import GGUFBlockFormat
    from modelpress.models import loading
    from modelpress.pipeline.runner import calibration_ids
    from modelpress.progress import track
    from modelpress.train.losses import kl as kl_divergence

    t0 = time.monotonic()
    source = loading.resolve(sens.model)
    stored = {n.removesuffix(".weight"): dtype for n, (_, dtype) in loading.tensor_headers(source).items()}
    model = loading.load_model(source).eval()
    ids = calibration_ids(loading.load_tokenizer(source), config.calibration)[:windows]
    base = F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
    n_layers = 1 + max((s.layer for s in sens.linears.values()), default=-1)
    names = embedding_modules(model)
    jobs = []
    for name in names[1:] if head_only else names:
        W = model.get_submodule(name).weight
        itemsize = 4 if stored.get(name) == "F32" else 2
        sens.linears[name] = LinearSensitivity(layer=-1 if name == names[0] else n_layers, group=name,
                                               in_features=W.shape[1],
                                               numel=W.numel(), energy=0.0, errors={KEEP: 0.0},
                                               nbytes={KEEP: W.numel() * itemsize}, kl_measured=True)
        for spec in sens.candidates:
            fmt = None if spec == KEEP else candidate_format(spec, config)
            if fmt is not None and fmt.divides(W.shape[1]):
                jobs.append((name, spec, fmt))
    for name, spec, fmt in track(jobs, total=len(jobs), what="embedding type"):
        weight = model.get_submodule(name).weight
        saved = weight.data
        if isinstance(fmt, GGUFBlockFormat):
            rounded, nbytes = fmt.fake_quantize(saved.to(torch.float32)), fmt.nbytes(saved.numel())
        else:  # what the compressed-tensors writer stores
            qt = fmt.quantize(saved.to(torch.float32))
            rounded, nbytes = qt.dequantize(), stored_nbytes(qt)
        weight.data = rounded.to(saved.dtype)
        try:
            logp = F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
        finally:
            weight.data = saved
        kl = kl_divergence(base, logp).mean().item()
        s = sens.linears[name]
        s.errors[spec], s.nbytes[spec] = kl, nbytes
        logger.debug("%s in %s: KL %.5f", name, spec, kl)
    sens.seconds = round(sens.seconds + time.monotonic() - t0, 1)
    return sens

