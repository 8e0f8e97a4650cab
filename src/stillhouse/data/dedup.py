"""Exact and near-duplicate detection over arrays, so a million prompts cost megabytes, not objects.

Exact duplicates: the 64-bit prompt id (a hash of the normalized messages); the first occurrence is
kept. Near duplicates: datasketch MinHash signatures of character shingles, banded as in
`datasketch.MinHashLSH` (its band/row split, weighted towards recall), but bucketed by sorting
numpy arrays instead of holding a Python dict per band (which costs ~6 KB per prompt). Every
candidate pair that shares a bucket is verified by its estimated Jaccard similarity; verified pairs
are joined into clusters and each cluster keeps its earliest row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import xxhash


def first_occurrences(keys: np.ndarray) -> np.ndarray:
    """Boolean mask of the first row of each distinct key, in row order."""
    _, first = np.unique(keys, return_index=True)
    mask = np.zeros(len(keys), dtype=bool)
    mask[first] = True
    return mask


def shingles(text: str, size: int) -> set[bytes]:
    """Character shingles of a normalized text; a text shorter than a shingle is one shingle."""
    encoded = text.encode()
    if len(encoded) <= size:
        return {encoded}
    return {encoded[i : i + size] for i in range(len(encoded) - size + 1)}


class MinHasher:
    """datasketch MinHash signatures (uint32, one row per text) with a fixed seed, so reruns agree."""

    def __init__(self, num_perm: int, shingle_size: int, seed: int = 1):
        # datasketch (0.3 s to import, with scipy) loads when a curation dedups, not when a check reads a split.
        from datasketch import MinHash

        self.shingle_size = shingle_size
        self.num_perm = num_perm
        self.empty = MinHash(num_perm=num_perm, seed=seed, hashfunc=xxhash.xxh32_intdigest)

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        rows = np.empty((len(texts), self.num_perm), dtype=np.uint32)
        for row, text in enumerate(texts):
            minhash = self.empty.copy()
            minhash.update_batch(shingles(text, self.shingle_size))
            rows[row] = minhash.hashvalues
        return rows


def band_parameters(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) as datasketch picks them, weighted 1:9 against missed pairs since
    candidates are verified."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.1, 0.9))
    return lsh.b, lsh.r


def band_keys(block: np.ndarray) -> np.ndarray:
    """One uint64 per row of a band (rows x values): an FNV-style mix of its signature values."""
    mixed = np.full(len(block), 0xCBF29CE484222325, dtype=np.uint64)
    for column in range(block.shape[1]):
        mixed = (mixed ^ block[:, column].astype(np.uint64)) * np.uint64(0x100000001B3)
    return mixed


@dataclass
class NearDuplicates:
    removed: np.ndarray  # bool per row: a later member of a cluster
    representative: np.ndarray  # int per row: the cluster's kept (earliest) row


def near_duplicates(signatures: np.ndarray, threshold: float, candidates: np.ndarray | None = None) -> NearDuplicates:
    """Cluster rows whose estimated Jaccard similarity reaches ``threshold``; only ``candidates`` rows take part."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    count, num_perm = signatures.shape
    rows_index = np.arange(count) if candidates is None else np.flatnonzero(candidates)
    bands, rows = band_parameters(threshold, num_perm)
    left, right = [], []
    for band in range(bands):
        keys = band_keys(signatures[rows_index, band * rows : (band + 1) * rows])
        order = np.argsort(keys, kind="stable")
        same = keys[order[1:]] == keys[order[:-1]]
        # Neighbours in a bucket (sorted by row): a bucket of k rows gives k-1 pairs, not k^2.
        a, b = rows_index[order[:-1][same]], rows_index[order[1:][same]]
        similar = np.empty(len(a), dtype=bool)
        for start in range(0, len(a), 65536):  # bounded memory: 64k pairs x num_perm at a time
            chunk = slice(start, start + 65536)
            similar[chunk] = (signatures[a[chunk]] == signatures[b[chunk]]).mean(axis=1) >= threshold
        left.append(a[similar])
        right.append(b[similar])
    left, right = np.concatenate(left), np.concatenate(right)
    graph = coo_matrix((np.ones(len(left), dtype=np.int8), (left, right)), shape=(count, count))
    _, labels = connected_components(graph, directed=False)
    earliest = np.full(labels.max() + 1, count, dtype=np.int64)
    np.minimum.at(earliest, labels, np.arange(count))
    representative = earliest[labels]
    removed = representative != np.arange(count)
    if candidates is not None:
        removed &= candidates
    return NearDuplicates(removed=removed, representative=representative)
