"""The reference corpus: Python source files that exist on every machine.

The corpus is the running interpreter's standard library (``*.py`` under ``sysconfig``'s ``stdlib`` dir,
``site-packages`` excluded). Test directories are *included*: they are ordinary Python and more than half of the
tokens. Files that are not valid UTF-8 (deliberately mis-encoded test inputs) are skipped. Optionally the sources of
installed packages (e.g. ``torch``, ``transformers``) are appended for models that need more tokens.

Each file goes to train or held-out by a hash of its relative path (``sha1(relpath) % 20 == 0`` -> held-out, ~5%),
so the split of a given file is the same on every Python version, even though the file set differs slightly.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

HELDOUT_MODULUS = 20  # 1 file in 20 is held out
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class SourceFile:
    relpath: str  # "stdlib/<path>" or "<package>/<path>", posix separators
    path: Path

    @property
    def split(self) -> str:
        digest = int(hashlib.sha1(self.relpath.encode()).hexdigest(), 16)
        return "heldout" if digest % HELDOUT_MODULUS == 0 else "train"


def _package_root(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"extra corpus package {name!r} is not an installed package")
    return Path(next(iter(spec.submodule_search_locations)))


def _roots(extra_packages: Sequence[str]) -> list[tuple[str, Path]]:
    roots = [("stdlib", Path(sysconfig.get_paths()["stdlib"]))]
    roots += [(name, _package_root(name)) for name in extra_packages]
    return roots


def _is_utf8(path: Path) -> bool:
    try:
        path.read_bytes().decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@functools.lru_cache(maxsize=4)
def _all_files(extra_packages: tuple[str, ...]) -> tuple[SourceFile, ...]:
    """Every corpus file, sorted by relpath (cached: the UTF-8 check reads ~30 MB)."""
    files = []
    for prefix, root in _roots(extra_packages):
        for path in root.rglob("*.py"):
            rel = path.relative_to(root)
            if prefix == "stdlib" and rel.parts[0] in ("site-packages", "dist-packages"):
                continue
            if "__pycache__" in rel.parts or not path.is_file() or not _is_utf8(path):
                continue
            files.append(SourceFile(f"{prefix}/{rel.as_posix()}", path))
    return tuple(sorted(files, key=lambda f: f.relpath))


def source_files(split: str | None = None, extra_packages: Sequence[str] = ()) -> list[SourceFile]:
    """Sorted corpus files; ``split`` is "train", "heldout" or None (both)."""
    if split not in (None, *SPLITS):
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    return [f for f in _all_files(tuple(extra_packages)) if split is None or f.split == split]


def iter_texts(split: str, extra_packages: Sequence[str] = ()) -> Iterator[str]:
    """File contents of one split, in sorted order."""
    for f in source_files(split, extra_packages):
        yield f.path.read_text(encoding="utf-8")


def count_tokens(tokenizer, texts: Iterable[str], batch_size: int = 256) -> int:
    """Number of tokens ``tokenizer`` makes of ``texts`` (no special tokens)."""
    total, batch = 0, []
    for text in texts:
        batch.append(text)
        if len(batch) == batch_size:
            total += sum(len(ids) for ids in tokenizer(batch, add_special_tokens=False)["input_ids"])
            batch = []
    if batch:
        total += sum(len(ids) for ids in tokenizer(batch, add_special_tokens=False)["input_ids"])
    return total


def corpus_stats(extra_packages: Sequence[str] = ()) -> dict:
    """Files and bytes per split: cheap numbers for model cards."""
    stats = {}
    for split in SPLITS:
        files = source_files(split, extra_packages)
        stats[split] = {"files": len(files), "bytes": sum(f.path.stat().st_size for f in files)}
    return stats


def token_stream(
    tokenizer, split: str, max_tokens: int | None = None, extra_packages: Sequence[str] = (), batch_size: int = 64
) -> torch.Tensor:
    """One 1-D int64 tensor: the split's files tokenized and joined, each followed by EOS.

    Stops reading files once ``max_tokens`` are collected (so evaluation on a prefix is cheap).
    """
    chunks, total = [], 0
    texts = iter_texts(split, extra_packages)
    while max_tokens is None or total < max_tokens:
        batch = [t for _, t in zip(range(batch_size), texts)]
        if not batch:
            break
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            chunks.append(torch.tensor(ids + [tokenizer.eos_token_id], dtype=torch.int64))
            total += len(ids) + 1
    stream = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.int64)
    return stream if max_tokens is None else stream[:max_tokens]
