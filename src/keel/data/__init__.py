"""Data: built-in corpora, text and token-file sources, deterministic samplers."""

from keel.data.corpora import BUILTIN_CORPORA, load_builtin, pydoc_topics, stdlib_source
from keel.data.sampler import IndexSampler, RandomWindowSampler, sequential_windows
from keel.data.sources import TokenSplits, load_tokens, train_token_count, unigram_cross_entropy

__all__ = [
    "BUILTIN_CORPORA",
    "IndexSampler",
    "RandomWindowSampler",
    "TokenSplits",
    "load_builtin",
    "load_tokens",
    "pydoc_topics",
    "sequential_windows",
    "stdlib_source",
    "train_token_count",
    "unigram_cross_entropy",
]
