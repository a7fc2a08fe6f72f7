"""``prune --method structured``: remove MLP channels, attention heads and decoder layers, so the
tensors, the config, the file and the compute all shrink (the pruning that fits a model onto a
smaller device; quality comes back with a short healing distillation).

Two steps:

1. **Score.** One pass of the layer runner over the calibration windows measures every layer's
   channel, head and layer importance on the unpruned model
   (:class:`~modelpress.pipeline.prune_stages.StructuredScoreStage`, hooks on the one forward per
   layer that the runner runs anyway); nothing is written.
2. **Cut.** The plan (which channels, heads and layers survive: plain data, saved in the record)
   is applied tensor by tensor while the source streams from its shards
   (:mod:`modelpress.models.surgery`) into a new checkpoint with an edited ``config.json``.
   Peak memory: the scoring pass's (one layer plus the calibration activations), or the cut's
   (about one tensor: the writer holds none), whichever is larger.

The output is an ordinary checkpoint: ``AutoModelForCausalLM.from_pretrained(OUT)`` loads it,
``export --to gguf`` writes it, and ``plan OUT`` sizes it.

Example::

    from modelpress.prune_structured import prune_structured
    from modelpress.pipeline.recipe import StructuredConfig
    record = prune_structured("smollm2-135m/", StructuredConfig(mlp_keep=0.75, drop_layers=4), "smollm2-small/")
"""

from __future__ import annotations

import logging
import time

from modelpress.algorithms.structured import StructuredPlan, choose_heads, closest_block, keep_count, lowest_influence, top
from modelpress.errors import UserError
from modelpress.eval.guard import guard_output
from modelpress.export.checkpoint import CheckpointWriter
from modelpress.models import loading
from modelpress.models.layers import LayerwiseModel
from modelpress.models.surgery import Surgery
from modelpress.models.tensors import tensor_stream
from modelpress.pipeline.prune_stages import StructuredScoreStage
from modelpress.pipeline.recipe import StructuredConfig
from modelpress.pipeline.runner import calibration_ids, run_layers
from modelpress.pipeline.sinks import ObserveSink
from modelpress.progress import track
from modelpress.record import record_header, to_json

logger = logging.getLogger("modelpress")

WHAT_IT_BUYS = ("smaller tensors: fewer parameters, a smaller file, less memory and less compute per "
                "token on every engine. Quality drops more than with quantization at the same size until "
                "the model is healed with a short distillation from the original.")


def prune_structured(model: str, config: StructuredConfig, out_dir: str, quality_guard: bool = True) -> dict:
    """Score, plan and cut ``model`` per ``config``; write the smaller checkpoint to ``out_dir``.

    Returns:
        The run record (also written as ``out_dir/modelpress.json``).
    """
    t0 = time.monotonic()
    source = loading.resolve(model)
    lm = LayerwiseModel(source)
    hf_config = loading.clean_config(lm.config).to_dict()
    shape = _Shape.of(hf_config, lm.arch.structure.intermediate_size)
    head_mode = check_feasible(config, lm.arch, shape, getattr(lm.config, "model_type", "?"))
    check_output_config(config, lm.arch.structure, hf_config, type(lm.config), shape, head_mode)
    tokenizer = loading.load_tokenizer(source)
    ids = calibration_ids(tokenizer, config.calibration)
    stage = StructuredScoreStage(config, lm.arch)
    logger.info("scoring channels, heads and layers on %d calibration windows", len(ids))
    run_layers(lm, [stage], {}, ObserveSink(), ids, config.calibration.batch_size)
    plan, layer_scores = make_plan(config, stage.scores, shape, head_mode)
    surgery = Surgery(plan, lm.arch.structure, hf_config, lm.arch.layers)
    before = after = 0
    with CheckpointWriter(out_dir) as writer:
        stream, n_tensors = tensor_stream(source, loading.meta_model(lm.config))
        for name, tensor in track(stream, total=n_tensors, what="tensor"):
            before += tensor.numel()
            cut = surgery.apply(name, tensor)
            if cut is not None:
                writer.add_tensor(*cut)
                after += cut[1].numel()
        new_config = surgery.edit_config()
        record = _record(source, config, plan, shape, new_config, head_mode, layer_scores, before, after,
                         time.monotonic() - t0, ids)
        writer.finish(config=new_config, tokenizer=tokenizer,
                      extra_files={"modelpress.json": to_json(record, indent=2)},
                      copy_files_from=source.path if source.kind == "folder" else None)
    logger.info("wrote %s in %.1fs: %d -> %d parameters", out_dir, time.monotonic() - t0, before, after)
    if quality_guard:
        record["quality_guard"] = guard_output(model, config.calibration, out_dir)
    return record


class _Shape:
    """The widths structured pruning works with, from a config dict."""

    def __init__(self, n_layers: int, intermediate: int | None, n_heads: int | None, n_kv: int | None):
        self.n_layers, self.intermediate, self.n_heads, self.n_kv = n_layers, intermediate, n_heads, n_kv

    @classmethod
    def of(cls, config: dict, intermediate_key: str) -> _Shape:
        n_heads = config.get("num_attention_heads")
        return cls(config["num_hidden_layers"], config.get(intermediate_key), n_heads,
                   config.get("num_key_value_heads") or n_heads)


def check_feasible(config: StructuredConfig, arch, shape: _Shape, model_type: str) -> str:
    """Refuse, before any work, what this model cannot do; return the head mode that applies
    (``auto``: whole groups when each kv head serves one q head, else within groups)."""
    spec = arch.structure
    if config.mlp_keep is not None:
        if spec.mlp_out is None:
            raise UserError(f"pruning the MLP channels of {model_type} (mixture of experts) is not supported yet; "
                            "use --heads-keep or --drop-layers")
        if round(shape.intermediate * config.mlp_keep) < 1:
            raise UserError(f"--mlp-keep {config.mlp_keep} keeps no channel of {shape.intermediate}; keep at least one")
    mode = config.head_mode
    if config.heads_keep is not None:
        if spec.attn_out is None:
            raise UserError(f"{model_type} derives its head size from hidden size / heads, so its head count cannot "
                            "change; use --mlp-keep or --drop-layers")
        group = shape.n_heads // shape.n_kv
        mode = ("whole-groups" if group == 1 else "within-groups") if mode == "auto" else mode
        if mode == "within-groups" and round(group * config.heads_keep) < 1:
            raise UserError(f"--heads-keep {config.heads_keep} keeps no q head of each group of {group} sharing a kv "
                            f"head; keep at least one (--heads-keep {0.5 / group + 0.01:.2f} or more), or remove "
                            "whole groups with --head-mode whole-groups")
        if mode == "whole-groups" and round(shape.n_kv * config.heads_keep) < 1:
            raise UserError(f"--heads-keep {config.heads_keep} keeps none of the {shape.n_kv} kv groups; keep at "
                            f"least one (--heads-keep {0.5 / shape.n_kv + 0.01:.2f} or more)")
    if config.drop_layers and config.drop_layers >= shape.n_layers:
        raise UserError(f"--drop-layers {config.drop_layers} removes every one of the model's {shape.n_layers} "
                        "decoder layers; drop fewer")
    return mode


def check_output_config(config: StructuredConfig, spec, hf_config: dict, config_class, shape: _Shape,
                        head_mode: str) -> None:
    """Refuse, before any work, a pruned shape that transformers' own config class rejects (some
    require the hidden size to be a multiple of the head count even with an explicit ``head_dim``),
    naming the head counts it would accept."""
    def refusal(n_q: int | None, n_kv: int | None) -> str | None:
        counts = _counts_plan(config, shape, n_q, n_kv)
        try:
            config_class.from_dict(Surgery(counts, spec, hf_config, "").edit_config())
        except Exception as e:  # transformers' validators raise many types; all mean "this config is bad"
            return str(e).strip().splitlines()[-1].strip()
        return None

    n_q = n_kv = None
    if config.heads_keep is not None:
        whole = head_mode == "whole-groups"
        n_q, n_kv = _head_counts(shape, config.heads_keep, whole)
    why = refusal(n_q, n_kv)
    if why is None:
        return
    if config.heads_keep is not None:
        options = [f / (shape.n_kv if whole else shape.n_heads // shape.n_kv)
                   for f in range(1, (shape.n_kv if whole else shape.n_heads // shape.n_kv) + 1)]
        accepted = [n for n in options if refusal(*_head_counts(shape, n, whole)) is None]
        raise UserError(f"transformers would not load the pruned config ({why}): {n_q} q heads; --heads-keep "
                        f"{', '.join(f'{f:.3g}' for f in accepted)} give head counts it accepts")
    raise UserError(f"transformers would not load the pruned config: {why}")


def _head_counts(shape: _Shape, keep: float, whole_groups: bool) -> tuple[int, int]:
    if whole_groups:
        n_kv = keep_count(shape.n_kv, keep)
        return n_kv * (shape.n_heads // shape.n_kv), n_kv
    return shape.n_kv * keep_count(shape.n_heads // shape.n_kv, keep), shape.n_kv


def _counts_plan(config: StructuredConfig, shape: _Shape, n_q: int | None, n_kv: int | None) -> StructuredPlan:
    """A plan with the right counts and placeholder indices: enough to build the output config."""
    channels = None
    if config.mlp_keep is not None:
        channels = {0: list(range(keep_count(shape.intermediate, config.mlp_keep, config.channel_multiple)))}
    return StructuredPlan(n_layers=shape.n_layers, dropped=list(range(config.drop_layers or 0)), channels=channels,
                          q_heads=None if n_q is None else {0: list(range(n_q))},
                          kv_heads=None if n_kv is None else {0: list(range(n_kv))})


def make_plan(config: StructuredConfig, scores: list, shape: _Shape, head_mode: str) -> tuple[StructuredPlan, dict]:
    """The plan from each layer's scores, and the layer scores behind its choice (for the record)."""
    plan = StructuredPlan(n_layers=shape.n_layers, dropped=[])
    if config.mlp_keep is not None:
        k = keep_count(shape.intermediate, config.mlp_keep, config.channel_multiple)
        plan.channels = {i: top(s.channels, k) for i, s in enumerate(scores)}
    if config.heads_keep is not None:
        chosen = [choose_heads(s.heads, shape.n_kv, config.heads_keep, head_mode == "whole-groups") for s in scores]
        plan.q_heads = {i: q for i, (q, _) in enumerate(chosen)}
        plan.kv_heads = {i: kv for i, (_, kv) in enumerate(chosen)}
        if len(chosen[0][0]) == shape.n_heads:
            logger.warning("--heads-keep %s keeps all %d heads (heads go in whole kv groups or the same number from "
                           "each group)", config.heads_keep, shape.n_heads)
    layer_scores = {"block_influence": [round(s.influence, 6) for s in scores]}
    if config.drop_layers:
        if config.layer_metric == "angular":
            boundaries = [scores[0].last_in] + [s.last_out for s in scores]
            start, distances = closest_block(boundaries, config.drop_layers)
            plan.dropped = list(range(start, start + config.drop_layers))
            layer_scores["angular_distance_by_start"] = [round(d, 6) for d in distances]
        else:
            plan.dropped = lowest_influence([s.influence for s in scores], config.drop_layers)
    return plan, layer_scores


def _record(source, config, plan, shape, new_config, head_mode, layer_scores, before, after, elapsed, ids) -> dict:
    structured = {
        "params": {"before": before, "after": after, "kept": after / before},
        "layers": {"before": shape.n_layers, "after": new_config["num_hidden_layers"], "dropped": plan.dropped,
                   "metric": config.layer_metric if plan.dropped else None, **layer_scores},
        "what_it_buys": WHAT_IT_BUYS,
    }
    if plan.channels is not None:
        structured["mlp_channels"] = {"before": shape.intermediate, "after": len(plan.channels[0])}
    if plan.q_heads is not None:
        structured["heads"] = {"q": [shape.n_heads, len(plan.q_heads[0])], "kv": [shape.n_kv, len(plan.kv_heads[0])],
                               "mode": head_mode}
    return {
        **record_header(source, config, elapsed),
        "structured": structured,
        "plan": plan.to_dict(),
        "calibration": {"windows": len(ids), "tokens_per_window": ids.shape[1],
                        "text": config.calibration.text or "built-in"},
    }
