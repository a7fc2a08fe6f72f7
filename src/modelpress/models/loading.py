"""Finding and loading models: a local checkpoint folder, a GGUF file, or a hub id.

Safe by default: safetensors and GGUF only (no pickle), never ``trust_remote_code``, and the
network is touched only when the user names a hub id that is not a local path.
"""

from __future__ import annotations

import logging
import re
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
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return ModelSource("hub", spec)
    raise UserError(f"model not found: {spec} (no such file or folder)")


def _wrap_load_error(source: ModelSource, e: Exception) -> UserError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return UserError(f"could not load {source.path}: {first}")


def load_config(source: ModelSource):
    """The model's ``PretrainedConfig``, without loading weights."""
    from transformers import AutoConfig

    name, kwargs = source.pretrained_args
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=False, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise _wrap_load_error(source, e) from None


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    name, kwargs = source.pretrained_args
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=False, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise _wrap_load_error(source, e) from None


def _fp4_load_args(source: ModelSource) -> dict:
    """compressed-tensors decompresses FP4 (NVFP4 / MXFP4) weights to bfloat16 at every forward,
    which a float32 model cannot multiply on CPU: for those, decompress once at load instead."""
    if source.kind != "folder":
        return {}
    import json

    qc = json.loads((Path(source.path) / "config.json").read_text()).get("quantization_config") or {}
    formats = [qc.get("format")] + [g.get("format") for g in (qc.get("config_groups") or {}).values()]
    if qc.get("quant_method") != "compressed-tensors" or not any("fp4" in str(f) for f in formats):
        return {}
    from transformers.utils.quantization_config import CompressedTensorsConfig

    return {"quantization_config": CompressedTensorsConfig(dequantize=True)}


def load_model(source: ModelSource, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load the whole model in ``dtype`` (evaluation; compression streams tensors instead).

    A GGUF file is dequantized to float by transformers; its quantizer is detached so the
    result behaves (and saves) like any float checkpoint.
    """
    from transformers import AutoModelForCausalLM

    name, kwargs = source.pretrained_args
    if source.kind != "gguf":
        kwargs["use_safetensors"] = True
        kwargs.update(_fp4_load_args(source))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, trust_remote_code=False, device_map=device, **kwargs
        )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise _wrap_load_error(source, e) from None
    if source.kind == "gguf":
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model.eval()
