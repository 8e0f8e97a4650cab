"""Near duplicates: recall on an injected set, no false removals, the earliest row kept, the library's MinHash used."""

import random

import numpy as np
from datasketch import MinHash
from test_curation_formats import all_rows, conversations, curated, filler

from stillhouse.data.dedup import MinHasher, first_occurrences, near_duplicates, shingles


def edited(text, rng, changes):
    words = text.split()
    for position in rng.sample(range(len(words)), changes):
        words[position] = "zz" + words[position][::-1]
    return " ".join(words)


def test_injected_near_duplicates_are_found_and_distinct_prompts_kept(tmp_path):
    rng = random.Random(0)
    originals = filler(300, seed=5, words=30)
    copies = [edited(text, rng, rng.randint(1, 3)) for text in originals[:60]]
    rows = [{"prompt": text, "group": str(i)} for i, text in enumerate(originals)] + [
        {"prompt": t, "group": str(i)} for i, t in enumerate(copies)
    ]
    rng.shuffle(rows)
    dataset, out = curated(tmp_path, rows, category_column="group", filters={"near_duplicates": {"enabled": True}})
    survivors = out.groupby("category").size()
    assert len(survivors) == 300  # every distinct prompt kept once: no wrong removals
    assert (survivors == 1).mean() >= 0.95  # recall of the injected near duplicates
    assert dataset.counts["dropped_near_duplicate"] >= 57


def test_near_duplicates_are_off_by_default_and_the_earliest_row_is_kept(tmp_path):
    base = "please write a detailed summary of the quarterly report for the finance team"
    rows = [{"prompt": base}, {"prompt": base.replace("detailed", "thorough")}] + [{"prompt": t} for t in filler(30)]
    _, out = curated(tmp_path, rows)
    assert len(out) == 32
    dataset, out = curated(tmp_path / "on", rows, filters={"near_duplicates": {"enabled": True}})
    assert dataset.counts["dropped_near_duplicate"] == 1 and base in [m[0]["content"] for m in conversations(out)]


def test_signatures_are_datasketch_minhashes_and_deterministic():
    hasher = MinHasher(num_perm=64, shingle_size=5)
    texts = [
        "the quick brown fox jumps over the lazy dog",
        "the quick brown fox jumped over the lazy dog",
        "something else entirely",
    ]
    signatures = hasher.signatures(texts)
    assert signatures.dtype == np.uint32 and signatures.shape == (3, 64)
    assert np.array_equal(signatures, MinHasher(num_perm=64, shingle_size=5).signatures(texts))
    import xxhash

    reference = MinHash(num_perm=64, seed=1, hashfunc=xxhash.xxh32_intdigest)
    reference.update_batch(shingles(texts[0], 5))
    assert np.array_equal(signatures[0], reference.hashvalues)


def test_clusters_chain_through_verified_pairs_only():
    rng = np.random.default_rng(0)
    signatures = rng.integers(0, 2**32, (6, 128), dtype=np.uint64).astype(np.uint32)
    signatures[3] = signatures[1]  # row 3 duplicates row 1
    signatures[5, :100] = signatures[3, :100]  # row 5 is ~0.78 similar to row 3 (and to row 1)
    found = near_duplicates(signatures, threshold=0.6)
    assert found.removed.tolist() == [False, False, False, True, False, True]
    assert found.representative[3] == 1 and found.representative[5] == 1
    only_some = near_duplicates(signatures, threshold=0.6, candidates=np.array([True, True, True, False, True, True]))
    assert only_some.removed.tolist() == [False, False, False, False, False, True]


def test_first_occurrences():
    assert first_occurrences(np.array([5, 3, 5, 7, 3], dtype=np.uint64)).tolist() == [True, True, False, True, False]


def test_dedup_across_batches_and_files_is_the_same(tmp_path):
    rows = [{"prompt": t} for t in filler(250, seed=8)] * 2
    small, _ = curated(tmp_path / "a", rows, batch_rows=100, filters={"near_duplicates": {"enabled": True}})
    large, _ = curated(tmp_path / "b", rows, batch_rows=1000, filters={"near_duplicates": {"enabled": True}})
    assert small.counts["dropped_duplicate"] == large.counts["dropped_duplicate"] == 250
    assert sorted(all_rows(small)["prompt_id"]) == sorted(all_rows(large)["prompt_id"])
