"""Rebuild the committed corpora and the split manifest from Debian packages.

Why: the compressed texts under moa_search/data/corpora/ are the source of truth
at run time (CI never calls apt), but anyone must be able to regenerate them from
their public origin and check that the result matches the committed hashes.

Usage (needs apt-get and dpkg-deb; run from the repository root):

    python scripts/build_corpora.py --check          # rebuild in a temp dir, compare hashes
    python scripts/build_corpora.py --write          # overwrite committed files
    python scripts/build_corpora.py --debs DIR ...   # use .deb files already in DIR

The package versions used for the committed files are pinned in PACKAGES; if
the Debian mirror no longer serves them, pass --debs with the old .deb files
(snapshot.debian.org keeps every version).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moa_search.data.rdata import read_lazyload_db  # noqa: E402

PACKAGES = {
    "r-cran-janeaustenr": "1.0.0-1",
    "python3.11-doc": "3.11.2-6+deb12u9",
    "libpython3.11-stdlib": "3.11.2-6+deb12u9",
}
AUSTEN_TITLES = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
AUSTEN_SPLIT = {
    "sensesensibility": "calibration",
    "prideprejudice": "calibration",
    "mansfieldpark": "calibration",
    "northangerabbey": "calibration",
    "persuasion": "validation",
    "emma": "test",
}
DOC_MIN_BYTES = 20_000  # long reST pages only: we need long contexts
CODE_MIN_BYTES = 30_000
CODE_EXCLUDE = {"pydoc_data/topics.py", "html/entities.py"}  # data tables, not code
OUT_DIR = REPO / "moa_search" / "data" / "corpora"
SPLITS = REPO / "moa_search" / "data" / "splits.json"


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def hash_split(corpus: str, doc_id: str) -> str:
    """70/10/20 split by a hash of the document id: stable as documents come and go."""
    bucket = int(hashlib.sha256(f"{corpus}:{doc_id}".encode()).hexdigest()[:8], 16) % 10
    return "calibration" if bucket < 7 else "validation" if bucket == 7 else "test"


def fetch_debs(debs: Path | None, work: Path) -> dict[str, Path]:
    """Find or ``apt-get download`` each pinned package, and unpack it."""
    roots = {}
    for pkg, version in PACKAGES.items():
        pattern = f"{pkg}_{version.replace(':', '%3a')}_*.deb"
        found = sorted((debs or work).glob(pattern))
        if not found:
            subprocess.run(["apt-get", "download", f"{pkg}={version}"], cwd=work, check=True)
            found = sorted(work.glob(pattern))
        root = work / "x" / pkg
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg-deb", "-x", str(found[0]), str(root)], check=True)
        roots[pkg] = root
    return roots


def unwrap(text: str) -> str:
    """Undo Gutenberg's hard line wrap: one line per paragraph, blank line between."""
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    return "\n\n".join(p for p in paras if p) + "\n"


def austen_docs(root: Path) -> list[dict]:
    db = read_lazyload_db(root / "usr/lib/R/site-library/janeaustenr/data/Rdata")
    docs = []
    for key, title in AUSTEN_TITLES.items():
        text = unwrap("\n".join(line or "" for line in db[key]))
        docs.append({"id": key, "title": title, "text": text})
    return docs


def pydoc_docs(root: Path) -> list[dict]:
    base = root / "usr/share/doc/python3.11/html/_sources"
    docs = []
    for path in sorted(base.rglob("*.rst.txt")):
        if path.stat().st_size >= DOC_MIN_BYTES:
            rel = path.relative_to(base).as_posix().removesuffix(".rst.txt")
            docs.append({"id": rel, "title": rel, "text": path.read_text("utf-8")})
    return docs


def stdlib_docs(root: Path) -> list[dict]:
    base = root / "usr/lib/python3.11"
    docs = []
    for path in sorted(base.rglob("*.py")):
        rel = path.relative_to(base).as_posix()
        if path.is_symlink() or rel in CODE_EXCLUDE:
            continue
        if path.stat().st_size >= CODE_MIN_BYTES:
            docs.append({"id": rel, "title": rel, "text": path.read_text("utf-8")})
    return docs


CORPORA = {
    "austen": ("r-cran-janeaustenr", austen_docs),
    "pydocs": ("python3.11-doc", pydoc_docs),
    "pystdlib": ("libpython3.11-stdlib", stdlib_docs),
}


def write_jsonl_xz(path: Path, docs: list[dict]) -> None:
    lines = "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in docs)
    path.write_bytes(lzma.compress(lines.encode("utf-8"), preset=9))


def build(out_dir: Path, splits_path: Path, debs: Path | None) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"version": 1, "sources": {}, "documents": []}
    with tempfile.TemporaryDirectory() as tmp:
        roots = fetch_debs(debs, Path(tmp))
        for corpus, (pkg, extract) in CORPORA.items():
            docs = extract(roots[pkg])
            write_jsonl_xz(out_dir / f"{corpus}.jsonl.xz", docs)
            manifest["sources"][corpus] = {"debian_package": pkg, "version": PACKAGES[pkg]}
            for d in docs:
                split = AUSTEN_SPLIT[d["id"]] if corpus == "austen" else hash_split(corpus, d["id"])
                manifest["documents"].append(
                    {
                        "corpus": corpus,
                        "id": d["id"],
                        "split": split,
                        "chars": len(d["text"]),
                        "sha256": sha256_text(d["text"]),
                    }
                )
    splits_path.write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="rebuild to a temp dir and compare")
    mode.add_argument("--write", action="store_true", help="overwrite the committed files")
    ap.add_argument("--debs", type=Path, help="folder holding the pinned .deb files")
    args = ap.parse_args()
    if args.write:
        manifest = build(OUT_DIR, SPLITS, args.debs)
        print(f"wrote {len(manifest['documents'])} documents to {OUT_DIR.relative_to(REPO)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = build(Path(tmp), Path(tmp) / "splits.json", args.debs)
    committed = json.loads(SPLITS.read_text())
    if fresh["documents"] != committed["documents"]:
        print("MISMATCH: rebuilt corpora differ from moa_search/data/splits.json")
        return 1
    print(f"OK: {len(fresh['documents'])} documents match the committed hashes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
