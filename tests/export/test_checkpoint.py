"""The checkpoint writer: shards built tensor by tensor on disk, identical to safetensors' own."""

from __future__ import annotations

import gc
import json
import struct
import weakref

import pytest
import torch
from conftest import checkpoint_tensors
from safetensors import safe_open
from safetensors.torch import save_file

from modelpress.export.checkpoint import CheckpointWriter


def _mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(3, 5, generator=g).to(torch.bfloat16), "b.bias": torch.randn(7, generator=g),
            "c.codes": torch.arange(5, dtype=torch.int8), "d.double": torch.randn(4, 4, generator=g, dtype=torch.float64),
            "e.fp8": torch.randn(16, generator=g).to(torch.float8_e4m3fn), "f.scalar": torch.tensor(3.0),
            "g.flags": torch.tensor([True, False, True]), "h.half": torch.randn(3, generator=g).half()}


def _header(path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return n, json.loads(f.read(n))


def test_a_shard_is_byte_for_byte_what_safetensors_writes(tmp_path):
    """Added in the order safetensors stores them (wider dtypes first), the file equals
    ``save_file``'s: same header, same alignment, same bytes."""
    tensors = _mixed()
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    _, header = _header(tmp_path / "ref.safetensors")
    order = sorted(tensors, key=lambda n: header[n]["data_offsets"][0])
    with CheckpointWriter(tmp_path / "out") as w:
        for name in order:
            w.add_tensor(name, tensors[name])
        w.finish(config={})
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_any_order_and_many_shards_keep_every_tensor_aligned_and_exact(tmp_path):
    tensors = _mixed()
    with CheckpointWriter(tmp_path / "out", max_shard_bytes=64) as w:
        for name, t in tensors.items():  # arrival order mixes element sizes
            w.add_tensor(name, t)
        w.finish(config={})
    shards = sorted((tmp_path / "out").glob("*.safetensors"))
    assert len(shards) > 2 and not list((tmp_path / "out").glob("part-*"))
    seen = {}
    for shard in shards:
        n, header = _header(shard)
        assert (8 + n) % 8 == 0  # the data starts 8-byte aligned
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                assert header[name]["data_offsets"][0] % t.element_size() == 0, name
                seen[name] = t
    assert seen.keys() == tensors.keys()
    for name, t in tensors.items():
        assert seen[name].dtype == t.dtype and seen[name].shape == t.shape
        assert torch.equal(seen[name].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name


def test_the_writer_keeps_no_reference_to_a_tensor_it_was_given(tmp_path):
    """The shard goes to disk as tensors arrive: nothing of it stays in memory."""
    with CheckpointWriter(tmp_path / "out") as w:
        t = torch.randn(256, 256)
        alive = weakref.ref(t)
        w.add_tensor("t", t)
        del t
        gc.collect()
        assert alive() is None
        w.finish(config={})
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("t").shape == (256, 256)


def test_a_failed_run_leaves_no_parts_and_a_resume_drops_an_unclosed_shard(tmp_path):
    """An exception discards the open shard's parts; a killed run's are dropped by ``--resume``."""
    with pytest.raises(RuntimeError):
        with CheckpointWriter(tmp_path / "gone") as w:
            w.add_tensor("t", torch.ones(4))
            raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(KeyboardInterrupt):
        with CheckpointWriter(tmp_path / "out", resumable=True) as w:
            w.add_tensor("layer0", torch.ones(4))
            w.save_state({"next_layer": 1})
            w.add_tensor("layer1", torch.ones(4))  # in an open shard when the run stops
            raise KeyboardInterrupt
    partial = tmp_path / "out.partial"
    assert (partial / "shard-00000.safetensors").is_file() and not list(partial.glob("part-*"))
    save_file({"layer1": torch.ones(4)}, partial / "part-00001-000000.safetensors")  # as a SIGKILL leaves it
    with CheckpointWriter(tmp_path / "out", resume=True) as w:
        assert w.load_state()["next_layer"] == 1 and not list(partial.glob("part-*"))
        w.add_tensor("layer1", 2 * torch.ones(4))
        w.finish(config={})
    written = checkpoint_tensors(tmp_path / "out")
    assert sorted(written) == ["layer0", "layer1"] and written["layer1"][0] == 2
