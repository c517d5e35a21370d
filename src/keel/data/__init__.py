"""Data: built-in corpora, documents from text, JSONL and Hugging Face datasets, tokenizers, token files, samplers."""

from keel.data.corpora import BUILTIN_CORPORA, builtin_documents, load_builtin, pydoc_topics, stdlib_source
from keel.data.documents import Documents, load_documents, split_documents
from keel.data.sampler import (BucketSampler, IndexSampler, RandomWindowSampler, document_spans, padded_batch,
                               sequential_buckets, sequential_windows)
from keel.data.sources import TokenSplits, load_tokens, train_token_count, unigram_cross_entropy
from keel.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer_file, train_bpe

__all__ = [
    "BUILTIN_CORPORA",
    "BucketSampler",
    "ByteTokenizer",
    "Documents",
    "HFTokenizer",
    "IndexSampler",
    "RandomWindowSampler",
    "TokenSplits",
    "builtin_documents",
    "document_spans",
    "load_builtin",
    "load_documents",
    "load_tokenizer_file",
    "load_tokens",
    "padded_batch",
    "pydoc_topics",
    "sequential_buckets",
    "sequential_windows",
    "split_documents",
    "stdlib_source",
    "train_bpe",
    "train_token_count",
    "unigram_cross_entropy",
]
