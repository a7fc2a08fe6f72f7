"""Architecture knowledge as data: one table row per ``config.model_type``.

A row says where the decoder layers are and, inside a layer, which norm feeds which linears
(what activation-aware methods such as AWQ and SmoothQuant fold scales into). Adding an
architecture is adding a row; no code elsewhere names a model family.
"""

from __future__ import annotations

from dataclasses import dataclass

from modelpress.errors import UserError


@dataclass(frozen=True)
class MoESpec:
    """Where a layer's experts are, and how the checkpoint names them.

    Attributes:
        experts: path, inside a decoder layer, of transformers' fused experts module (3-D
            ``gate_up_proj`` / ``down_proj``); the runner swaps it for per-expert Linears.
        projections: the checkpoint's names of one expert's ``(gate, up, down)`` Linears.
        checkpoint_prefix: ``(in the model, in the checkpoint)``: the layer-relative name prefix
            transformers renames on load (Mixtral's ``block_sparse_moe.`` -> ``mlp.``); tensors are
            read and written under the checkpoint's names, which vLLM and transformers expect.
        kept: layer-relative Linears never quantized (gates that scale a whole branch).
    """

    experts: str
    projections: tuple[str, str, str]
    checkpoint_prefix: tuple[str, str] | None = None
    kept: tuple[str, ...] = ()

    def checkpoint_name(self, relative: str) -> str:
        """The checkpoint's name for a layer-relative model name."""
        if self.checkpoint_prefix and relative.startswith(self.checkpoint_prefix[0]):
            return self.checkpoint_prefix[1] + relative.removeprefix(self.checkpoint_prefix[0])
        return relative


@dataclass(frozen=True)
class Cut:
    """One weight that structured pruning slices: along ``axis`` (0: output rows, 1: input
    columns), made of consecutive ``parts``, each indexed by MLP channels (``"mlp"``), q heads
    (``"q"``) or kv heads (``"kv"``). A fused q/k/v projection is ``("q", "kv", "kv")``; a bias
    follows its weight's rows."""

    linear: str
    axis: int
    parts: tuple[str, ...]


@dataclass(frozen=True)
class StructureSpec:
    """What structured pruning may remove together in one decoder layer, and the config keys it edits.

    Attributes:
        mlp_out: the Linear that reads the MLP's channels (their importance is measured at its
            input); ``None``: MLP channels cannot be pruned in this architecture yet.
        attn_out: the Linear that reads the attention heads' outputs; ``None``: the head count
            cannot change (the model derives its head size from hidden size / heads).
        cuts: every weight sliced, and how.
        intermediate_size: the config key of the MLP width.
    """

    mlp_out: str | None
    attn_out: str | None
    cuts: tuple[Cut, ...]
    intermediate_size: str = "intermediate_size"


_ATTENTION_CUTS = (Cut("self_attn.q_proj", 0, ("q",)), Cut("self_attn.k_proj", 0, ("kv",)),
                   Cut("self_attn.v_proj", 0, ("kv",)), Cut("self_attn.o_proj", 1, ("q",)))
_GATED_MLP_CUTS = (Cut("mlp.gate_proj", 0, ("mlp",)), Cut("mlp.up_proj", 0, ("mlp",)), Cut("mlp.down_proj", 1, ("mlp",)))
_DENSE_STRUCTURE = StructureSpec(mlp_out="mlp.down_proj", attn_out="self_attn.o_proj",
                                 cuts=_ATTENTION_CUTS + _GATED_MLP_CUTS)
_MOE_STRUCTURE = StructureSpec(mlp_out=None, attn_out="self_attn.o_proj", cuts=_ATTENTION_CUTS)


@dataclass(frozen=True)
class ArchSpec:
    """Where things are in a ``*ForCausalLM`` of one model type.

    Attributes:
        layers: dotted path of the decoder layers' ``ModuleList``, from the causal-LM root.
        norm_to_linears: inside one layer, ``(norm, (linears it feeds...))`` pairs.
        linear_to_linears: ``(linear, (linears it feeds...))`` pairs where the consumers' input is
            the producer's output times something that does not depend on it, channel by channel
            (``act(gate) * up`` feeding ``down``; a ReLU, which commutes with positive scales;
            attention, whose output is a convex mix of v_proj's rows, feeding o_proj):
            a per-channel scale can move from the consumers' columns to the producer's rows exactly.
            A pair whose widths differ in a given model (v -> o under grouped-query attention,
            where one v channel feeds several o columns) is skipped for that model.
        moe: the mixture-of-experts blocks, or ``None`` for a dense model (see :class:`MoESpec`).
        norm_offset: the norms multiply by ``offset + weight`` (1 for Gemma's RMSNorm), which
            matters when a per-channel scale is folded into the norm.
        structure: what structured pruning removes together (:class:`StructureSpec`).
    """

    layers: str
    norm_to_linears: tuple[tuple[str, tuple[str, ...]], ...] = ()
    linear_to_linears: tuple[tuple[str, tuple[str, ...]], ...] = ()
    moe: MoESpec | None = None
    norm_offset: float = 0.0
    structure: StructureSpec = _DENSE_STRUCTURE

    def scale_pairs(self, layer) -> list[tuple[str, tuple[str, ...], float]]:
        """Every ``(producer, consumers, offset)`` a per-channel scale can be folded through in the
        decoder ``layer``: the table's pairs whose producer's output width is every consumer's
        input width there."""
        pairs = ([(n, c, self.norm_offset) for n, c in self.norm_to_linears]
                 + [(p, c, 0.0) for p, c in self.linear_to_linears])
        return [(p, cs, offset) for p, cs, offset in pairs
                if all(layer.get_submodule(c).in_features == layer.get_submodule(p).weight.shape[0] for c in cs)]


_ATTENTION_OUT = ("self_attn.v_proj", ("self_attn.o_proj",))  # o reads softmax(q k^T) v, per channel of v
_GATED_MLP_OUT = ("mlp.up_proj", ("mlp.down_proj",))  # down reads act(gate) * up
_LINEAR_PAIRS = (_ATTENTION_OUT, _GATED_MLP_OUT)

_LLAMA_LIKE = ArchSpec(
    layers="model.layers",
    norm_to_linears=(
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ),
    linear_to_linears=_LINEAR_PAIRS,
)
_GEMMA2_LIKE = ArchSpec(  # Gemma 2/3: sandwich norms; the MLP is fed by pre_feedforward_layernorm
    layers="model.layers",
    norm_to_linears=(
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ),
    linear_to_linears=_LINEAR_PAIRS,
    norm_offset=1.0,
)

_LLAMA_ATTENTION = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": ArchSpec(layers=_LLAMA_LIKE.layers, norm_to_linears=_LLAMA_LIKE.norm_to_linears,
                      linear_to_linears=_LINEAR_PAIRS, norm_offset=1.0),
    "gemma2": _GEMMA2_LIKE,
    "gemma3_text": _GEMMA2_LIKE,
    "phi3": ArchSpec(
        layers="model.layers",
        norm_to_linears=(
            ("input_layernorm", ("self_attn.qkv_proj",)),
            ("post_attention_layernorm", ("mlp.gate_up_proj",)),
        ),
        structure=StructureSpec(  # fused: qkv_proj rows are [q; k; v], gate_up_proj rows [gate; up]
            mlp_out="mlp.down_proj", attn_out="self_attn.o_proj",
            cuts=(Cut("self_attn.qkv_proj", 0, ("q", "kv", "kv")), Cut("self_attn.o_proj", 1, ("q",)),
                  Cut("mlp.gate_up_proj", 0, ("mlp", "mlp")), Cut("mlp.down_proj", 1, ("mlp",)))),
    ),
    # MoE: the router (mlp.gate) is not an nn.Linear in transformers 5, so it is never a target;
    # AWQ/SmoothQuant fold no scale into the experts (only into attention: q/k/v and o)
    "mixtral": ArchSpec(
        layers="model.layers", norm_to_linears=_LLAMA_ATTENTION, linear_to_linears=(_ATTENTION_OUT,),
        moe=MoESpec(experts="mlp.experts", projections=("w1", "w3", "w2"),
                    checkpoint_prefix=("mlp.", "block_sparse_moe.")),
        structure=_MOE_STRUCTURE,
    ),
    "qwen2_moe": ArchSpec(
        layers="model.layers", norm_to_linears=_LLAMA_ATTENTION, linear_to_linears=(_ATTENTION_OUT,),
        moe=MoESpec(experts="mlp.experts", projections=("gate_proj", "up_proj", "down_proj"),
                    kept=("mlp.shared_expert_gate",)),
        structure=_MOE_STRUCTURE,
    ),
    "qwen3_moe": ArchSpec(
        layers="model.layers", norm_to_linears=_LLAMA_ATTENTION, linear_to_linears=(_ATTENTION_OUT,),
        moe=MoESpec(experts="mlp.experts", projections=("gate_proj", "up_proj", "down_proj")),
        structure=_MOE_STRUCTURE,
    ),
    "opt": ArchSpec(
        layers="model.decoder.layers",
        norm_to_linears=(
            ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("final_layer_norm", ("fc1",)),
        ),
        linear_to_linears=(("self_attn.v_proj", ("self_attn.out_proj",)),
                           ("fc1", ("fc2",))),  # fc2 reads relu(fc1): relu(x / s) = relu(x) / s for s > 0
        structure=StructureSpec(mlp_out="fc2", attn_out=None,  # OPT's head size is hidden / heads, always
                                cuts=(Cut("fc1", 0, ("mlp",)), Cut("fc2", 1, ("mlp",))), intermediate_size="ffn_dim"),
    ),
}


def layer_index(name: str) -> int | None:
    """The decoder-layer number in a module or tensor name (``model.layers.12.mlp.down_proj`` -> 12),
    the first number in it; ``None`` outside the layers (embeddings, head)."""
    return next((int(p) for p in name.split(".") if p.isdigit()), None)


def text_config(config):
    """The language-model part of a config (multimodal configs nest it as ``text_config``)."""
    return getattr(config, "text_config", None) or config


def arch_for(config) -> ArchSpec:
    """The table row for ``config``, or a :class:`UserError` naming what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"architecture {model_type!r} is not supported yet; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]
