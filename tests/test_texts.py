"""The real texts under data/austen/ are byte for byte the copies every benchmark so far used."""

from __future__ import annotations

import hashlib

import pytest
from conftest import REPO, austen

MANIFEST = REPO / "scripts" / "austen.sha256"
PINNED = dict(reversed(line.split()) for line in MANIFEST.read_text().splitlines() if line.strip())


def test_the_manifest_pins_the_protocol_texts():
    assert PINNED["emma.txt"] == "7c67b5985c6d0de1efaeb5d342d52cb82c38083c40e2295129e30e87ee690ebe"  # calib-128x512
    assert PINNED["pride_and_prejudice.txt"] == "dfc684d4f857fa938268f9ab9c5567b64bd0691251eca959644adeabe6287a4d"  # ppl-512
    assert len(PINNED) == 6


@pytest.mark.parametrize("name", sorted(PINNED))
def test_text_matches_its_pinned_sha256(name):
    assert hashlib.sha256(austen(name).read_bytes()).hexdigest() == PINNED[name]
