"""Finding and loading models: a local checkpoint folder, a GGUF file, or a hub id.

Safe by default: safetensors and GGUF only (no pickle), never ``trust_remote_code``, and the
network is touched only when the user names a hub id that is not a local path.
"""

from __future__ import annotations

import copy
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from modelpress.errors import UserError

logger = logging.getLogger("modelpress")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from.

    Attributes:
        kind: ``"folder"`` (config.json + safetensors), ``"gguf"`` (a single .gguf file) or ``"hub"``.
        path: the folder, the .gguf file, or the hub id.
    """

    kind: Literal["folder", "gguf", "hub"]
    path: str

    @property
    def pretrained_args(self) -> tuple[str, dict]:
        """``(name_or_path, kwargs)`` for transformers' ``from_pretrained``."""
        if self.kind == "gguf":
            p = Path(self.path)
            return str(p.parent), {"gguf_file": p.name}
        return self.path, {}

    def safetensors_files(self) -> list[Path]:
        return sorted(Path(self.path).glob("*.safetensors")) if self.kind == "folder" else []


def resolve(spec: str | Path) -> ModelSource:
    """Decide what ``spec`` names, with a one-line error when it names nothing usable.

    Example:
        >>> resolve("HuggingFaceTB/SmolLM2-135M").kind  # not a local path: a hub id
        'hub'
    """
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return ModelSource("gguf", str(path))
        if path.name == "config.json":
            return resolve(path.parent)
        raise UserError(f"{path} is not a model: pass a checkpoint folder, a .gguf file, or a hub id")
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            hint = f" (it holds {ggufs[0].name}: pass that file)" if ggufs else ""
            raise UserError(f"{path} has no config.json, so it is not a Hugging Face checkpoint{hint}")
        if not any(path.glob("*.safetensors")):
            if any(p.suffix in _PICKLE_SUFFIXES for p in path.iterdir()):
                raise UserError(
                    f"{path} holds only pickle weights (.bin/.pt), which modelpress does not load; "
                    "convert them to safetensors first"
                )
            raise UserError(f"{path} has config.json but no .safetensors weights")
        return ModelSource("folder", str(path))
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")) and not path.parent.is_dir():
        return ModelSource("hub", spec)
    if path.parent.is_dir() and path.parent != Path("."):  # offline-first: a path under a real folder is local
        raise UserError(f"model not found: {spec} (no such file or folder in {path.parent}/)")
    raise UserError(f"model not found: {spec} (no such file or folder)")


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _wrap_load_error(source: ModelSource, e: Exception) -> UserError:
    first = _first_line(e)
    if source.kind == "gguf" and "json" in first.lower():  # transformers' fallback reader speaks of JSON
        return UserError(f"could not read {source.path} as a GGUF file; it is corrupt, truncated or not GGUF")
    return UserError(f"could not load {source.path}: {first}")


# Config fields that must be positive integers wherever they appear (a text config's own names).
_POSITIVE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "intermediate_size", "vocab_size", "head_dim", "max_position_embeddings")


def check_config(fields: dict, where: str) -> None:
    """Refuse config fields (``config.json`` as a dict) whose sizes cannot describe a model,
    before transformers or the planner divide by them; a nested ``text_config`` is checked too.

    Raises:
        UserError: a size that is not a positive integer, or heads that do not divide.
    """
    if isinstance(fields.get("text_config"), dict):
        check_config(fields["text_config"], where)
    values = {k: fields.get(k) for k in _POSITIVE_FIELDS}
    for key, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserError(f"{where}: {key} must be a positive integer, got {value!r}; fix config.json")
    heads, kv_heads, hidden = values["num_attention_heads"], values["num_key_value_heads"], values["hidden_size"]
    if heads and kv_heads and heads % kv_heads:
        raise UserError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    if heads and hidden and values["head_dim"] is None and hidden % heads:
        raise UserError(f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads} "
                        "(and no head_dim is given)")


def _config(name: str, where: str, **kwargs):
    import json

    from transformers import AutoConfig

    file = Path(name) if Path(name).is_file() else Path(name) / "config.json"
    if "gguf_file" not in kwargs and file.is_file():  # our checks first: transformers' own divide by zero
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{file} is not valid JSON ({e}); fix or replace it") from None
        if not isinstance(raw, dict):
            raise UserError(f"{file} is not a model config (a JSON object with model_type)")
        check_config(raw, where)
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=False, **kwargs)
    except Exception as e:  # transformers' config validators raise many types; all mean "this config is bad"
        first = _first_line(e)
        if "trust_remote_code" in str(e) or "custom code" in str(e):
            raise UserError(f"{where} needs its own Python code (trust_remote_code), which modelpress does "
                            "not run; use a model whose architecture transformers supports") from None
        if "gguf_file" in kwargs:
            raise UserError(f"could not read {where} as a GGUF model: {first}") from None
        raise UserError(f"cannot read {where} as a model config: {first}") from None
    check_config(config.to_dict(), where)
    return config


def load_config(source: ModelSource):
    """The model's ``PretrainedConfig``, without loading weights; never runs remote code, and
    refuses sizes that cannot describe a model (:func:`check_config`)."""
    name, kwargs = source.pretrained_args
    if source.kind == "gguf":
        return _config(name, source.path, **kwargs)
    return _config(name, source.path if source.kind == "hub" else str(Path(source.path) / "config.json"), **kwargs)


def load_config_file(path: str | Path):
    """A ``PretrainedConfig`` from a bare ``config.json`` (no weights needed), checked as :func:`load_config`."""
    return _config(str(path), str(path))


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    load_config(source)  # transformers reads the config too, and its validators raise tracebacks
    name, kwargs = source.pretrained_args
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=False, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise _wrap_load_error(source, e) from None


def compressed_tensors_config(source: ModelSource) -> dict:
    """The ``quantization_config`` of a compressed-tensors checkpoint folder, or ``{}``."""
    if source.kind != "folder":
        return {}
    import json

    qc = json.loads((Path(source.path) / "config.json").read_text()).get("quantization_config") or {}
    return qc if qc.get("quant_method") == "compressed-tensors" else {}


def _decompress_args(source: ModelSource, dequantize: bool = False) -> dict:
    """compressed-tensors decompresses FP4 (NVFP4 / MXFP4) weights to bfloat16 at every forward,
    which a float32 model cannot multiply on CPU: for those (or any, with ``dequantize``),
    decompress once at load instead, into plain float Linears."""
    qc = compressed_tensors_config(source)
    formats = [qc.get("format")] + [g.get("format") for g in (qc.get("config_groups") or {}).values()]
    if not qc or not (dequantize or any("fp4" in str(f) for f in formats)):
        return {}
    from transformers.utils.quantization_config import CompressedTensorsConfig

    return {"quantization_config": CompressedTensorsConfig(dequantize=True)}


def clean_config(hf_config):
    """A copy of the config without a GGUF ``quantization_config`` (the weights we write are ours)."""
    hf_config = copy.deepcopy(hf_config)
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config
    return hf_config


def meta_model(hf_config) -> torch.nn.Module:
    """The model's module tree on the ``meta`` device: names and shapes, no weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(clean_config(hf_config))


def shard_index(source: ModelSource) -> dict[str, str]:
    """Tensor name -> the safetensors shard holding it (empty for a GGUF file or a hub id).

    Raises:
        UserError: a shard cannot be read (corrupt or truncated).
    """
    from safetensors import SafetensorError, safe_open

    index: dict[str, str] = {}
    for path in source.safetensors_files():
        try:
            with safe_open(str(path), framework="pt") as f:
                index.update(dict.fromkeys(f.keys(), str(path)))
        except (SafetensorError, OSError) as e:
            raise UserError(f"cannot read {path}: {e}; the file is corrupt or truncated") from None
    return index


def tensor_headers(source: ModelSource) -> dict[str, tuple[tuple[int, ...], str]]:
    """Each tensor's shape and safetensors dtype (``"BF16"``...) in a checkpoint folder, from the
    file headers (nothing loaded)."""
    from safetensors import safe_open

    out = {}
    for path in source.safetensors_files():
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                out[name] = (tuple(sl.get_shape()), sl.get_dtype())
    return out


def _listed(names, n: int = 3) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def check_shapes(index: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse tensors whose shape in the shards (read from the headers) is not ``shapes``'.

    Raises:
        UserError: naming the tensors, their shapes and the config's.
    """
    from safetensors import safe_open

    wrong = []
    for path in sorted(set(index.values())):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                want = shapes.get(name)
                got = tuple(f.get_slice(name).get_shape())
                if want is not None and got != tuple(want):
                    wrong.append(f"{name} is {list(got)} where config.json implies {list(want)}")
    if wrong:
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise UserError(f"checkpoint does not match its config.json: {wrong[0]}{more}; "
                        "fix the config (hidden_size, intermediate_size, heads...) or the weights")


def _check_loading_info(source: ModelSource, info: dict) -> None:
    """Refuse a load that left parameters randomly initialised or dropped checkpoint tensors.

    A checkpoint with a ``kv_cache_scheme`` carries per-layer ``k_scale``/``v_scale`` that
    transformers may leave unplaced (it has no FP8 cache); they are the engine's, and the
    evaluator reads them from the file (:mod:`modelpress.kv_scales`), so they are not refused."""
    missing, unexpected = set(info.get("missing_keys") or ()), set(info.get("unexpected_keys") or ())
    if unexpected and compressed_tensors_config(source).get("kv_cache_scheme"):
        unexpected = {k for k in unexpected if not k.endswith((".k_scale", ".v_scale"))}
    mismatched = [k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys") or ()]
    problems = []
    if missing:
        problems.append(f"missing {_listed(missing)} (they would be random)")
    if unexpected:
        problems.append(f"unexpected {_listed(unexpected)} (they would be dropped)")
    if mismatched:
        problems.append(f"misshapen {_listed(mismatched)}")
    if problems:
        raise UserError(f"{source.path}: tensors do not match config.json: {'; '.join(problems)}; "
                        "fix the checkpoint or its config (num_hidden_layers, sizes)")


_FINITE_CHUNK = 1 << 22  # elements per isfinite call: its temporaries stay ~20 MB


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf in ``tensor`` (integer tensors trivially; FP8 ones checked in float32).

    Checked a chunk at a time: ``torch.isfinite`` makes an ``abs`` copy and two boolean tensors,
    which for Gemma-3's 671 MB float32 embedding was a 1 GB spike, the largest of a streaming run.
    """
    if not tensor.is_floating_point():
        return True
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), _FINITE_CHUNK):
        chunk = flat[start : start + _FINITE_CHUNK]
        if not bool(torch.isfinite(chunk if chunk.element_size() > 1 else chunk.float()).all()):
            return False
    return True


def checked(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, after refusing NaN or inf in a floating one (the error names it)."""
    if not all_finite(tensor):
        raise UserError(f"tensor {name} contains NaN or inf; the checkpoint is corrupt")
    return tensor


def load_model(source: ModelSource, dtype: torch.dtype = torch.float32, device: str = "cpu", dequantize: bool = False):
    """Load the whole model in ``dtype`` (evaluation; compression streams tensors instead).

    A GGUF file is dequantized to float by transformers; its quantizer is detached so the
    result behaves (and saves) like any float checkpoint. Checked before it is returned: every
    shard readable, every tensor where the config puts it with the config's shape (nothing
    randomly initialised, nothing dropped), no NaN or inf. With ``dequantize``, a
    compressed-tensors checkpoint comes back as plain float Linears holding ``(q - z)·s``
    (training starts from that; evaluation keeps the compressed modules).

    Raises:
        UserError: any of those checks fails, or transformers cannot load the model.
    """
    from transformers import AutoModelForCausalLM

    name, kwargs = source.pretrained_args
    if source.kind != "gguf":
        kwargs["use_safetensors"] = True
        kwargs.update(_decompress_args(source, dequantize))
        index = shard_index(source)
        check_shapes(index, {k: tuple(v.shape) for k, v in meta_model(load_config(source)).state_dict().items()})
    try:
        with warnings.catch_warnings():  # "the model already has a quantization_config": we replace it on purpose
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")
            model, info = AutoModelForCausalLM.from_pretrained(
                name, dtype=dtype, trust_remote_code=False, device_map=device, output_loading_info=True, **kwargs
            )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise _wrap_load_error(source, e) from None
    _check_loading_info(source, info)
    for tensor_name, tensor in model.state_dict().items():
        checked(tensor_name, tensor)
    if source.kind == "gguf":
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model.eval()
