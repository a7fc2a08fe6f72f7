"""Put Jane Austen's six novels into data/austen/ as plain UTF-8 text, from Debian's package.

The texts every benchmark and integration test uses (protocol calib-128x512 on Emma, ppl-512
on Pride and Prejudice) come from Debian's ``r-cran-janeaustenr``, whose R lazy-load database
holds each novel as a character vector of lines. ``apt-get download`` fetches the .deb without
root and without installing R; ``dpkg-deb -x`` unpacks it; PyPI's ``rdata`` decodes the
serialized vectors. Each novel is its lines, missing values as empty strings, joined with "\n",
plus one final "\n", and must match the sha256 pinned in ``scripts/austen.sha256`` (the copies
every earlier benchmark used), or it is not written.

    python scripts/texts.py           # fetch what is missing, say what was done
    python scripts/texts.py --check   # exit 0 (and say so) only if every text is already there

Idempotent: when every file is present with its pinned hash, nothing is fetched. Exit status 1
when the texts could not be obtained (no apt, no network, changed package): the message says
what failed; the demo then falls back on modelpress's built-in text.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ROOT / "data" / "austen"
MANIFEST = Path(__file__).with_name("austen.sha256")
PACKAGE = "r-cran-janeaustenr"
INSTALLED = Path("/usr/lib/R/site-library/janeaustenr")  # where apt puts it, if it is installed
# R object name in the package -> our file name
NOVELS = {
    "emma": "emma.txt",
    "mansfieldpark": "mansfield_park.txt",
    "northangerabbey": "northanger_abbey.txt",
    "persuasion": "persuasion.txt",
    "prideprejudice": "pride_and_prejudice.txt",
    "sensesensibility": "sense_and_sensibility.txt",
}


class TextsUnavailable(Exception):
    pass


def pinned() -> dict[str, str]:
    """File name -> sha256, from the manifest (``sha256sum`` format)."""
    rows = (line.split() for line in MANIFEST.read_text().splitlines() if line.strip())
    return {name: digest for digest, name in rows}


def missing(hashes: dict[str, str]) -> list[str]:
    return [name for name, digest in hashes.items()
            if not (TEXTS / name).is_file() or hashlib.sha256((TEXTS / name).read_bytes()).hexdigest() != digest]


def _package_dir(scratch: Path) -> Path:
    """The janeaustenr R library folder: installed by apt, or unpacked from a downloaded .deb."""
    if (INSTALLED / "data" / "Rdata.rdb").is_file():
        return INSTALLED
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise TextsUnavailable("apt-get/dpkg-deb not found (not a Debian-like system)")
    def run(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, cwd=scratch, capture_output=True, text=True)

    got = run("apt-get", "download", PACKAGE)
    if got.returncode != 0 and os.geteuid() == 0:
        run("apt-get", "update", "-qq")  # a fresh machine may have no package lists yet
        got = run("apt-get", "download", PACKAGE)
    debs = sorted(scratch.glob(f"{PACKAGE}_*.deb"))
    if got.returncode != 0 or not debs:
        reason = (got.stderr.strip().splitlines() or ["no .deb"])[-1]
        raise TextsUnavailable(f"apt-get download {PACKAGE} failed: {reason}")
    unpacked = scratch / "deb"
    if run("dpkg-deb", "-x", str(debs[0]), str(unpacked)).returncode != 0:
        raise TextsUnavailable(f"dpkg-deb could not unpack {debs[0].name}")
    return unpacked / INSTALLED.relative_to("/")


def read_novels(package: Path) -> dict[str, list[str | None]]:
    """R object name -> lines, read from the package's lazy-load database (data/Rdata.rdb/.rdx).

    The .rdx index is an RDS file: ``variables`` maps each name to (offset, length) in the .rdb,
    where each object is a big-endian uint32 of its serialized length and a zlib stream.
    """
    try:
        import rdata
    except ImportError:
        raise TextsUnavailable("the rdata package is missing: pip install rdata") from None
    import warnings

    data = package / "data"
    with warnings.catch_warnings():  # rdata warns that this RDS data has no file extension it knows
        warnings.simplefilter("ignore")
        index = rdata.conversion.convert(rdata.parser.parse_file(data / "Rdata.rdx"))
        rdb = (data / "Rdata.rdb").read_bytes()
        novels = {}
        for name, (offset, length) in index["variables"].items():
            chunk = rdb[int(offset): int(offset) + int(length)]
            (size,) = struct.unpack(">I", chunk[:4])
            raw = zlib.decompress(chunk[4:])
            if len(raw) != size:
                raise TextsUnavailable(f"{data / 'Rdata.rdb'}: object {name} is {len(raw)} bytes, index says {size}")
            novels[str(name)] = list(rdata.conversion.convert(rdata.parser.parse_data(raw)))
    return novels


def as_text(lines: list[str | None]) -> bytes:
    """The lines joined as the reference copies were made: NA as "", "\n" between, one final "\n"."""
    return ("\n".join("" if x is None or x != x else str(x) for x in lines) + "\n").encode("utf-8")


def fetch(hashes: dict[str, str]) -> list[str]:
    """Write every pinned novel whose bytes match; returns the names written."""
    with tempfile.TemporaryDirectory() as scratch:
        package = _package_dir(Path(scratch))
        novels = read_novels(package)
    TEXTS.mkdir(parents=True, exist_ok=True)
    written, wrong = [], []
    for rname, fname in NOVELS.items():
        if fname not in hashes or rname not in novels:
            continue
        body = as_text(novels[rname])
        if hashlib.sha256(body).hexdigest() != hashes[fname]:
            wrong.append(fname)
            continue
        tmp = TEXTS / (fname + ".partial")
        tmp.write_bytes(body)
        tmp.replace(TEXTS / fname)
        written.append(fname)
    if wrong:
        raise TextsUnavailable(f"{PACKAGE} gave other bytes than the pinned sha256 for {', '.join(wrong)}")
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if any text is missing")
    args = parser.parse_args()
    hashes = pinned()
    rel = TEXTS.relative_to(ROOT)
    todo = missing(hashes)
    if not todo:
        print(f"texts: {rel}/ holds the {len(hashes)} Austen novels (sha256 checked)")
        return 0
    if args.check:
        return 1
    try:
        written = fetch(hashes)
    except (TextsUnavailable, OSError) as e:
        print(f"texts: no real texts in {rel}/ ({e}); the demo will calibrate and evaluate on modelpress's "
              f"built-in text, and tests that need Austen fail until `bash scripts/setup.sh` can fetch "
              f"{PACKAGE} with apt-get", file=sys.stderr)
        return 1
    still = missing(hashes)
    if still:
        print(f"texts: {PACKAGE} lacks {', '.join(still)}", file=sys.stderr)
        return 1
    print(f"texts: wrote {len(written)} Austen novels into {rel}/ from Debian's {PACKAGE} (sha256 checked)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
