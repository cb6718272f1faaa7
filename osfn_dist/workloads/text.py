"""A small causal transformer language model on text that ships with Python itself.

The corpus is the docstrings of a fixed list of standard-library modules (English technical
prose, ~0.5 MB on Python 3.11): offline, no package to install, the same on every worker of
one Python version. Character level: printable ASCII and newline (96 symbols), anything else
mapped to ``?``.
"""
from __future__ import annotations

import importlib
import inspect
from functools import lru_cache

import torch
from torch import nn
from torch.nn import functional as F

from .base import Workload

# modules with long, stable docstrings and no side effects on import
CORPUS_MODULES = (
    "argparse", "collections", "json", "logging", "typing", "pathlib", "functools", "itertools", "re",
    "subprocess", "unittest", "datetime", "decimal", "fractions", "statistics", "textwrap", "string",
    "heapq", "bisect", "random", "shutil", "tarfile", "zipfile", "csv", "configparser", "threading",
    "queue", "email.message", "http.client", "urllib.request", "calendar", "difflib", "inspect",
    "dataclasses", "enum", "contextlib", "pickle", "pprint", "socket", "tempfile", "gzip", "base64",
    "hashlib", "sqlite3", "optparse", "locale", "gettext", "codecs", "io", "ast", "tokenize",
    "traceback", "warnings", "doctest", "timeit", "mailbox", "mimetypes", "shlex", "uuid", "ipaddress",
)
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))  # 96 symbols
CONTEXT = 64


def _docstrings(module) -> list[str]:
    objs = [module] + [
        v for k, v in sorted(vars(module).items())
        if not k.startswith("_") and (inspect.isclass(v) or inspect.isfunction(v))
        and getattr(v, "__module__", None) == module.__name__
    ]
    docs = []
    for obj in objs:
        docs.append(inspect.getdoc(obj))
        if inspect.isclass(obj):
            docs += [inspect.getdoc(f) for k, f in sorted(vars(obj).items()) if not k.startswith("_") and inspect.isfunction(f)]
    return [d for d in docs if d]


@lru_cache(maxsize=1)
def corpus() -> str:
    seen: set[str] = set()
    parts = []
    for name in CORPUS_MODULES:
        for doc in _docstrings(importlib.import_module(name)):
            if doc not in seen:
                seen.add(doc)
                parts.append(doc)
    return "\n\n".join(parts)


def encode(text: str) -> torch.Tensor:
    index = {c: i for i, c in enumerate(VOCAB)}
    unknown = index["?"]
    return torch.tensor([index.get(c, unknown) for c in text], dtype=torch.long)


@lru_cache(maxsize=1)
def _windows(n_train: int = 1024, n_test: int = 256):
    """Non-overlapping (CONTEXT + 1)-character windows: the first 90% of the corpus for
    training, the rest for testing. Inputs are a window's first CONTEXT symbols, targets the
    next symbol at every position."""
    tokens = encode(corpus())
    cut = int(0.9 * len(tokens))
    span = CONTEXT + 1

    def windows(seq: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = seq[: (len(seq) // span) * span].view(-1, span)
        if w.shape[0] > n:  # spread over the whole split, not its first pages
            w = w[torch.linspace(0, w.shape[0] - 1, n).long()]
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    return windows(tokens[:cut], n_train), windows(tokens[cut:], n_test)


class _Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        b, t, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, w))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """Pre-LayerNorm causal transformer: token + learned position embeddings, ``layers``
    blocks, a final LayerNorm and an untied output layer. Returns logits (batch, time, vocab)."""

    def __init__(self, vocab: int = len(VOCAB), width: int = 64, layers: int = 2, heads: int = 4, context: int = CONTEXT):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(0.02 * torch.randn(context, width))
        self.blocks = nn.Sequential(*[_Block(width, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, idx):
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        return self.head(self.ln(self.blocks(x)))


def next_char_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def char_lm(seed: int = 0) -> Workload:
    train, test = _windows()

    def build():
        torch.manual_seed(seed)
        return CharTransformer()

    return Workload("char_lm", build, train, test, next_char_loss, batch_size=32, default_steps=600,
                    description="character-level causal transformer LM (2 layers, width 64, context 64, ~0.1M "
                                "parameters) on Python's standard-library docstrings")
