"""GGUF export for llama.cpp: the model's tensors in llama.cpp's names, block types and metadata.

Written with the ``gguf`` package's ``GGUFWriter``, streamed: the tensor directory is written
first from the model's shapes and the per-tensor types of the file type
(:mod:`modelpress.export.gguf_mix`, llama.cpp's rules), then each tensor is read from the
checkpoint, encoded (:mod:`modelpress.formats.gguf_blocks`, byte-exact with llama.cpp's reference
encoder, or the bytes a calibrated method chose) and written, one at a time. Tensors are written
in layer order, as llama.cpp's converter does (its mixes count layers in file order). The file is
written under a temporary name and renamed when complete.

The tokenizer comes from ``tokenizer.json`` through ``gguf.vocab``: byte-level BPE becomes
llama.cpp's ``gpt2`` tokenizer (vocab and merges); a BPE with byte fallback (SentencePiece
converted by Hugging Face) becomes llama.cpp's ``llama`` tokenizer, whose merge priorities are
token scores: we give each token minus the rank of the merge that makes it.

Per-architecture facts live in :data:`GGUF_ARCHITECTURES`, one row per ``model_type``:

- llama.cpp's LLAMA graph applies RoPE to interleaved pairs, so ``q_proj`` / ``k_proj`` rows are
  permuted from Hugging Face's half-split order, as llama.cpp's converter does (``permute_qk``);
- norms that multiply by ``1 + weight`` (``ArchSpec.norm_offset``) are stored as ``1 + weight``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from modelpress.errors import UserError
from modelpress.export.gguf_mix import FILE_TYPES, FLOAT_TYPES, file_type, tensor_types
from modelpress.formats.gguf_blocks import GGUF_FORMATS, BlockParams, gguf_format
from modelpress.models import loading
from modelpress.models.arch import arch_for, text_config
from modelpress.models.layers import WeightReader
from modelpress.models.loading import meta_model
from modelpress.progress import track

logger = logging.getLogger("modelpress")

_ENCODE_CHUNK = 1 << 22  # weights encoded at a time


@dataclass(frozen=True)
class GGUFArch:
    """How one ``model_type`` maps onto a llama.cpp architecture."""

    name: str  # gguf.MODEL_ARCH member
    permute_qk: bool = False  # q/k rows from HF's half-split RoPE order to llama.cpp's interleaved pairs
    sliding_window: bool = False  # per-layer sliding-window pattern and its RoPE base (Gemma 3)
    # llama.cpp builds attn_q as n_embd x n_embd for this architecture (heads x head_dim must be the
    # hidden size; llama's and qwen3's loaders use heads x head_dim)
    q_is_square: bool = False


GGUF_ARCHITECTURES: dict[str, GGUFArch] = {
    "llama": GGUFArch("LLAMA", permute_qk=True),
    "mistral": GGUFArch("LLAMA", permute_qk=True),
    "qwen2": GGUFArch("QWEN2", q_is_square=True),
    "qwen3": GGUFArch("QWEN3"),
    "gemma3_text": GGUFArch("GEMMA3", sliding_window=True),
}


@dataclass(frozen=True)
class GGUFEntry:
    """One tensor of the file: its checkpoint name, llama.cpp name, shape and GGUF type."""

    name: str
    gguf_name: str
    shape: tuple[int, ...]
    type: str

    @property
    def nbytes(self) -> int:
        numel = int(np.prod(self.shape))
        if self.type in FLOAT_TYPES:
            return numel * (4 if self.type == "f32" else 2)
        return gguf_format(self.type).nbytes(numel)


def _permute_rope(W: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q/k projection from half-split to interleaved RoPE pairs, per head."""
    rows = W.shape[0]
    return W.reshape(n_head, 2, rows // n_head // 2, *W.shape[1:]).swapaxes(1, 2).reshape(W.shape)


def _unpermute_rope(W: torch.Tensor, n_head: int) -> torch.Tensor:
    rows = W.shape[0]
    return W.reshape(n_head, rows // n_head // 2, 2, *W.shape[1:]).swapaxes(1, 2).reshape(W.shape)


class GGUFLayout:
    """The file a model becomes: entries in write order, and the weight transforms of its architecture."""

    def __init__(self, config, ftype: str, pure: bool = False, types: dict[str, str] | None = None,
                 overrides: dict[str, str] | None = None, warn: bool = True):
        """``types``: GGUF tensor name -> type, where they are given rather than chosen by
        llama.cpp's rules for ``ftype`` (an existing file's, :func:`layout_of_file`).
        ``overrides``: checkpoint module-name regex -> type (``q4_k``, ``q8_0``, ``f16``...), the
        first full match winning, for the weights of the modules they match (a per-tensor mix
        chosen by measurement, :mod:`modelpress.fit`). ``warn``: report llama.cpp's fallbacks."""
        import gguf

        tc = text_config(config)
        arch = GGUF_ARCHITECTURES.get(config.model_type)
        if arch is None:
            raise UserError(f"GGUF export does not support {config.model_type!r} yet; supported: "
                            f"{', '.join(GGUF_ARCHITECTURES)}")
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        if arch.q_is_square and tc.num_attention_heads * head_dim != tc.hidden_size:
            raise UserError(f"llama.cpp's {arch.name.lower()} architecture needs attention heads x head size = hidden "
                            f"size; this model has {tc.num_attention_heads} x {head_dim} = "
                            f"{tc.num_attention_heads * head_dim}, not {tc.hidden_size} (heads removed by structured "
                            "pruning?); keep it as safetensors, or prune only MLP channels and layers for GGUF")
        self.config, self.tc, self.arch, self.ftype = config, tc, arch, ftype
        self.norm_offset = arch_for(config).norm_offset
        model_arch = getattr(gguf.MODEL_ARCH, arch.name)
        self.arch_name = gguf.MODEL_ARCH_NAMES[model_arch]
        name_map = gguf.get_tensor_name_map(model_arch, tc.num_hidden_layers)
        rows = []
        for name, shape in _state_shapes(meta_model(config)):
            gname = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise UserError(f"tensor {name} has no llama.cpp name for {arch.name}; this checkpoint is not supported")
            rows.append((name, gname, shape))
        rows.sort(key=lambda r: _file_position(r[1]))
        n_layer = tc.num_hidden_layers
        n_gqa = tc.num_attention_heads // tc.num_key_value_heads
        large_attn_v = n_layer == 80 and n_gqa > 1  # llama.cpp's "70B" rule
        types = {**tensor_types([(g, s) for _, g, s in rows], ftype, n_layer, n_gqa, large_attn_v, pure, warn),
                 **(types or {}), **_override_types(rows, overrides or {})}
        self.entries = [GGUFEntry(n, g, s, types[g]) for n, g, s in rows]

    def to_gguf(self, name: str, W: torch.Tensor) -> torch.Tensor:
        """The float tensor llama.cpp expects for checkpoint tensor ``name``."""
        if self.norm_offset and W.ndim == 1 and re.search(r"norm\.weight$", name):
            W = W + self.norm_offset
        heads = self._rope_heads(name)
        return _permute_rope(W, heads) if heads else W

    def from_gguf(self, name: str, W: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_gguf`."""
        heads = self._rope_heads(name)
        W = _unpermute_rope(W, heads) if heads else W
        if self.norm_offset and W.ndim == 1 and re.search(r"norm\.weight$", name):
            W = W - self.norm_offset
        return W

    def _rope_heads(self, name: str) -> int | None:
        if self.arch.permute_qk and name.endswith("q_proj.weight"):
            return self.tc.num_attention_heads
        if self.arch.permute_qk and name.endswith("k_proj.weight"):
            return self.tc.num_key_value_heads
        return None


def _override_types(rows: list[tuple[str, str, tuple[int, ...]]], overrides: dict[str, str]) -> dict[str, str]:
    """GGUF name -> type for the weights whose module an override pattern fully matches (first wins)."""
    patterns = []
    for pattern, t in overrides.items():
        t = t.strip().lower()
        if t not in FLOAT_TYPES and t not in GGUF_FORMATS:
            raise UserError(f"GGUF override {pattern!r}: unknown type {t!r}; known: "
                            f"{', '.join([*GGUF_FORMATS, *FLOAT_TYPES])}")
        try:
            patterns.append((pattern, re.compile(pattern), t))
        except re.error as e:
            raise UserError(f"GGUF override {pattern!r} is not a regular expression: {e}") from None
    out, used = {}, set()
    for name, gname, shape in rows:
        module = name.removesuffix(".weight")
        hit = next(((p, t) for p, rx, t in patterns if rx.fullmatch(module)), None)
        if hit is None or module == name or len(shape) != 2:
            continue
        used.add(hit[0])
        t = hit[1]
        if t not in FLOAT_TYPES and not gguf_format(t).divides(shape[-1]):
            raise UserError(f"{module}: rows of {shape[-1]} weights are not whole {t} blocks of "
                            f"{gguf_format(t).block_size}; choose another type for it")
        out[gname] = t
    unmatched = [p for p in overrides if p not in used]
    if unmatched:
        raise UserError(f"GGUF overrides match no weight matrix of this model: {', '.join(unmatched)}")
    return out


def _state_shapes(meta: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """Checkpoint tensor names and shapes, each tied tensor once (under its first name)."""
    seen, out = set(), []
    for name, t in meta.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out.append((name, tuple(t.shape)))
    return out


def _file_position(gguf_name: str) -> tuple[int, str]:
    """Write order: token embedding, layers in order, then the rest (as llama.cpp's converter)."""
    m = re.match(r"blk\.(\d+)\.", gguf_name)
    if m:
        return 1 + int(m.group(1)), gguf_name
    return (0 if gguf_name.startswith("token_embd") else 1 << 30), gguf_name


def layout_of_file(gguf_file: str | Path, config) -> GGUFLayout:
    """The layout of an existing GGUF file of ``config``'s model: its file type and the type each
    tensor is stored in (a file's mixture may differ from the rules', e.g. another quantizer's)."""
    import gguf

    reader = gguf.GGUFReader(gguf_file)
    field = reader.fields.get("general.file_type")
    by_value = {}
    for name, (_, llama_name) in FILE_TYPES.items():
        by_value.setdefault(getattr(gguf.LlamaFileType, llama_name).value, name)
    ftype = by_value.get(int(field.parts[-1][0])) if field is not None else None
    types = {t.name: t.tensor_type.name.lower() for t in reader.tensors}
    unknown = sorted({t for t in types.values() if t not in FLOAT_TYPES and t not in GGUF_FORMATS})
    if ftype is None or unknown:
        raise UserError(f"{gguf_file} is stored in {', '.join(unknown) or 'a file type'} that modelpress does not "
                        f"encode; supported: {', '.join(FILE_TYPES)}")
    return GGUFLayout(config, ftype, types=types)


def read_gguf_params(gguf_file: str | Path, layout: GGUFLayout) -> dict[str, BlockParams]:
    """Checkpoint name -> the block params a GGUF file stores for each block-quantized tensor, rows
    in checkpoint order (q/k RoPE rows un-permuted, as :meth:`GGUFLayout.from_gguf`). The codes are
    not kept: the weights hold them, one tensor's at a time is decoded here."""
    from dataclasses import fields, replace

    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(gguf_file).tensors}
    out = {}
    for e in layout.entries:
        if e.type not in GGUF_FORMATS:
            continue
        data = torch.from_numpy(np.array(tensors[e.gguf_name].data)).reshape(e.shape[0], -1)
        _, params = gguf_format(e.type).unpack(data, e.shape)
        heads = layout._rope_heads(e.name)
        if heads:
            params = replace(params, **{f.name: _unpermute_rope(getattr(params, f.name), heads)
                                        for f in fields(params) if getattr(params, f.name) is not None})
        out[e.name] = params
    return out


def gguf_layout(model: str, out_file: str | Path, type_name: str, pure: bool = False,
                layout: GGUFLayout | None = None,
                overrides: dict[str, str] | None = None) -> tuple[loading.ModelSource, GGUFLayout]:
    """Check what an export needs before any work (a new output name, a checkpoint folder with a
    ``tokenizer.json``, a supported architecture and type); return the source and the file's layout
    (``layout`` when it is given)."""
    ftype = file_type(type_name)
    if Path(out_file).exists():
        raise UserError(f"output {out_file} already exists; choose a new file or remove it")
    source = loading.resolve(model)
    if source.kind != "folder" or not (Path(source.path) / "tokenizer.json").is_file():
        raise UserError("GGUF export reads a checkpoint folder with a tokenizer.json; "
                        "convert first with `modelpress export MODEL --to hf -o DIR`")
    return source, layout or GGUFLayout(loading.load_config(source), ftype, pure, overrides=overrides)


def export_gguf(model: str, out_file: str, type_name: str = "f16", pure: bool = False,
                encoded: dict[str, torch.Tensor] | None = None, layout: GGUFLayout | None = None,
                overrides: dict[str, str] | None = None) -> dict:
    """Write ``model`` as a GGUF file of llama.cpp file type ``type_name`` (``f16``, ``q4_k_m``...).

    Args:
        model: checkpoint folder with a ``tokenizer.json``.
        out_file: the ``.gguf`` file to write; must not exist.
        type_name: a llama.cpp file type (see :data:`~modelpress.export.gguf_mix.FILE_TYPES`).
        pure: one block type for every quantizable tensor (``llama-quantize --pure``).
        encoded: checkpoint weight name -> GGUF bytes (rows in checkpoint order) chosen by a
            calibrated method (:func:`modelpress.calibrated_gguf.export_calibrated_gguf`); every
            other tensor gets llama.cpp's plain round-to-nearest encoding.
        layout: the file's layout when the caller built it already (QAT trained on it).
        overrides: checkpoint module-name regex -> GGUF type, over llama.cpp's mix (:class:`GGUFLayout`).

    Returns:
        ``{"bytes": file size, "tensors": n, "types": {gguf type: count}}``.
    """
    import gguf

    out = Path(out_file)
    source, layout = gguf_layout(model, out, type_name, pure, layout, overrides)
    encoded = encoded or {}
    reader = WeightReader(source, {e.name: e.shape for e in layout.entries})
    tmp = out.with_name(out.name + f".partial-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, layout.arch_name)
    types: dict[str, int] = {}
    try:
        _write_metadata(writer, layout, Path(source.path))
        for e in layout.entries:
            raw = None if e.type in ("f32", "f16") else gguf_format(e.type).ggml_type if e.type != "bf16" \
                else gguf.GGMLQuantizationType.BF16
            writer.add_tensor_info(e.gguf_name, e.shape, np.float16 if e.type == "f16" else np.float32,
                                   e.nbytes, raw_dtype=raw)
            types[e.type] = types.get(e.type, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for e in track(layout.entries, total=len(layout.entries), what="tensor"):
            if e.name in encoded:
                data = encoded[e.name]
                heads = layout._rope_heads(e.name)
                writer.write_tensor_data((_permute_rope(data, heads) if heads else data).numpy())
                continue
            W = reader.get(e.name).to(torch.float32)  # NaN/inf refused by the reader
            reader.release([e.name])
            writer.write_tensor_data(_encode(layout.to_gguf(e.name, W), e.type))
        writer.close()
        tmp.replace(out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return {"bytes": out.stat().st_size, "tensors": len(layout.entries), "types": types}


def _encode(W: torch.Tensor, type_name: str) -> np.ndarray:
    if type_name == "f32":
        return W.numpy()
    if type_name == "f16":
        return W.to(torch.float16).numpy()
    if type_name == "bf16":
        return W.to(torch.bfloat16).view(torch.int16).numpy()
    fmt = gguf_format(type_name)
    rows = max(1, _ENCODE_CHUNK // W.shape[1])  # bounded temporaries for a large embedding
    return torch.cat([fmt.quantize(W[i:i + rows]) for i in range(0, W.shape[0], rows)]).numpy()


def read_gguf_weights(gguf_file: str | Path, layout: GGUFLayout) -> dict[str, torch.Tensor]:
    """Checkpoint name -> the float32 weight the GGUF file holds for it (decoded, in checkpoint layout)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    tensors = {t.name: t for t in GGUFReader(gguf_file).tensors}
    out = {}
    for e in layout.entries:
        t = tensors[e.gguf_name]
        W = torch.from_numpy(np.ascontiguousarray(dequantize(np.array(t.data), t.tensor_type), dtype=np.float32))
        out[e.name] = layout.from_gguf(e.name, W.reshape(e.shape))
    return out


def _write_metadata(writer, layout: GGUFLayout, folder: Path) -> None:
    import gguf

    tc = layout.tc
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    writer.add_context_length(tc.max_position_embeddings)
    writer.add_embedding_length(tc.hidden_size)
    writer.add_block_count(tc.num_hidden_layers)
    writer.add_feed_forward_length(tc.intermediate_size)
    writer.add_head_count(tc.num_attention_heads)
    writer.add_head_count_kv(tc.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(tc.rms_norm_eps)
    writer.add_vocab_size(tc.vocab_size)
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[layout.ftype][1]))
    if layout.ftype not in FLOAT_TYPES:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_rope(writer, tc, layout.arch)
    _write_tokenizer(writer, tc, folder)


def _rope_params(tc, layer_type: str | None = None) -> dict:
    rope = getattr(tc, "rope_parameters", None) or {}
    if layer_type and layer_type in rope:
        rope = rope[layer_type]
    return {"rope_theta": getattr(tc, "rope_theta", 10000.0), "rope_type": "default", **rope}


def _write_rope(writer, tc, arch: GGUFArch) -> None:
    import gguf

    full = _rope_params(tc, "full_attention")
    writer.add_rope_freq_base(float(full["rope_theta"]))
    if full["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(full["factor"]))
    elif full["rope_type"] != "default":
        raise UserError(f"GGUF export does not handle RoPE scaling {full['rope_type']!r} yet")
    if arch.sliding_window:
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        expected = tc.hidden_size // tc.num_attention_heads if tc.num_hidden_layers == 62 else head_dim
        if getattr(tc, "query_pre_attn_scalar", expected) != expected:
            raise UserError(f"query_pre_attn_scalar {tc.query_pre_attn_scalar} differs from the attention scale "
                            f"llama.cpp uses for this architecture ({expected}); it cannot run this model as trained")
        if getattr(tc, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(float(tc.final_logit_softcapping))
        layer_types = getattr(tc, "layer_types", None)
        if tc.sliding_window and layer_types:
            writer.add_sliding_window(tc.sliding_window)
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
            local = _rope_params(tc, "sliding_attention")
            if local["rope_type"] != "default":
                raise UserError(f"GGUF export does not handle sliding-window RoPE scaling {local['rope_type']!r} yet")
            writer.add_rope_freq_base_swa(float(local["rope_theta"]))


def _write_tokenizer(writer, tc, folder: Path) -> None:
    import gguf

    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(f"GGUF export handles BPE tokenizers (byte-level or with byte fallback); "
                        f"{folder / 'tokenizer.json'} is {model.get('type')!r}")
    if model.get("byte_fallback"):  # SentencePiece-style: llama.cpp's "llama" tokenizer, scores order merges
        vocab = gguf.vocab.LlamaHfVocab(folder)
        tokens, _, toktypes = zip(*vocab.all_tokens())
        scores = _merge_scores(tokens, toktypes, model.get("merges", []))
        writer.add_tokenizer_model("llama")
        writer.add_add_space_prefix(False)
    else:
        try:
            vocab = gguf.vocab.BpeVocab(folder)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f"cannot read the tokenizer in {folder}: {e}") from None
        tokens, scores, toktypes = zip(*vocab.all_tokens())
        writer.add_tokenizer_model("gpt2")
    tokens, scores, toktypes = list(tokens), list(scores), list(toktypes)
    if len(tokens) < tc.vocab_size:  # embedding rows beyond the tokenizer: padding tokens, as llama.cpp pads
        pad = tc.vocab_size - len(tokens)
        tokens += [f"[PAD{i}]".encode() for i in range(pad)]
        scores += [0.0] * pad
        toktypes += [gguf.TokenType.UNUSED] * pad
    writer.add_tokenizer_pre(_pre_tokenizer(spec) if not model.get("byte_fallback") else "default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(toktypes)
    gguf.SpecialVocab(folder, load_merges=not model.get("byte_fallback"), n_vocab=len(tokens)).add_to_gguf(
        writer, quiet=True)


# Hugging Face split patterns -> the llama.cpp pre-tokenizer that splits text the same way
_SPLIT_PATTERNS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "qwen2",
}


def _pre_tokenizer(spec: dict) -> str:
    """llama.cpp's name for the byte-level BPE pre-tokenizer of ``tokenizer.json``: plain ByteLevel
    splits with GPT-2's pattern; a Split by a known pattern before ByteLevel names its model's.
    Others get llama.cpp's default, with a warning (text may split differently there)."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        for p in pre.get("pretokenizers", []):
            pattern = (p.get("pattern") or {}).get("Regex") if p.get("type") == "Split" else None
            if pattern in _SPLIT_PATTERNS:
                return _SPLIT_PATTERNS[pattern]
    logger.warning("tokenizer pre-tokenizer %s is not one llama.cpp is known to match; the GGUF uses llama.cpp's "
                   "default, which may split some text differently from transformers", pre.get("type"))
    return "default"


def _merge_scores(tokens, toktypes, merges) -> list[float]:
    """Token scores that make llama.cpp's SentencePiece merging follow the BPE merge order:
    minus the rank of the first merge producing the token (lower rank merges first)."""
    import gguf

    rank: dict[bytes, int] = {}
    for r, m in enumerate(merges):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault((a + b).encode("utf-8"), r)
    never = -float(len(merges) + 1)
    return [-float(rank[t]) if t in rank else (0.0 if tt == gguf.TokenType.NORMAL and len(t.decode("utf-8", "replace")) == 1
                                               else never) for t, tt in zip(tokens, toktypes)]
