"""Exact and near-duplicate detection across a whole corpus, in bounded memory.

Documents are checked in corpus order and the first of each duplicate group is kept. Exact
duplicates share a content hash; near duplicates share a MinHash LSH band (datasketch computes
the MinHash signatures and picks the band layout for the similarity threshold). The index of
content hashes and band hashes lives in SQLite on disk, so memory stays at SQLite's page cache
however many documents pass; the same database keeps the pipeline's checkpoint, committed in
one transaction with the index so a killed run resumes from a consistent state.
"""

import hashlib
import json
import sqlite3
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import xxhash
from datasketch import MinHash, MinHashLSH

from llmscale.prep.units import ngram_hashes

# MinHash permutation seed; fixed so signatures agree between processes and runs.
_MINHASH_SEED = 1
_PAGE_CACHE_KIB = 64 * 1024


@dataclass(frozen=True)
class DedupConfig:
    # Drop documents whose cleaned text equals an earlier one.
    exact: bool = True
    # Estimated Jaccard similarity of shingle sets above which a document is a near duplicate
    # of an earlier one; 0 turns near-duplicate detection off.
    near_threshold: float = 0.8
    num_perm: int = 128
    # Units (words, or CJK characters) per shingle.
    shingle_size: int = 5

    def __post_init__(self) -> None:
        if not 0.0 <= self.near_threshold < 1.0:
            raise ValueError(f"near_threshold must be in [0, 1), got {self.near_threshold}.")
        if self.num_perm < 2 or self.shingle_size < 1:
            raise ValueError(
                f"need num_perm >= 2 and shingle_size >= 1, got {self.num_perm} and "
                f"{self.shingle_size}."
            )

    @property
    def near(self) -> bool:
        return self.near_threshold > 0.0


def content_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def minhash_signature(units: list[str], config: DedupConfig) -> np.ndarray | None:
    """The document's MinHash over its unit shingles, or None for a text without units."""
    shingles = ngram_hashes(units, config.shingle_size)
    if shingles.size == 0:
        return None
    minhash = MinHash(permutations=_permutations(config.num_perm), scheme="affine32", hashfunc=int)
    # affine32 hashes 32-bit inputs; the low half of a 64-bit n-gram hash is one.
    minhash.update_batch(np.unique(shingles & np.uint64(0xFFFFFFFF)))
    return minhash.hashvalues


@lru_cache(maxsize=4)
def _permutations(num_perm: int) -> np.ndarray:
    return MinHash(num_perm=num_perm, seed=_MINHASH_SEED, scheme="affine32").permutations


class DedupIndex:
    """The seen-documents index and pipeline checkpoint, in one SQLite file."""

    def __init__(self, path: Path, config: DedupConfig) -> None:
        self.config = config
        self.connection = sqlite3.connect(path, isolation_level="DEFERRED")
        self.connection.executescript(
            f"""
            PRAGMA journal_mode = WAL;
            PRAGMA synchronous = NORMAL;
            PRAGMA cache_size = -{_PAGE_CACHE_KIB};
            CREATE TABLE IF NOT EXISTS exact (digest BLOB PRIMARY KEY) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS bands (
                band INTEGER, hash INTEGER, document INTEGER, PRIMARY KEY (band, hash)
            ) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS clusters (
                representative INTEGER PRIMARY KEY, duplicates INTEGER
            );
            CREATE TABLE IF NOT EXISTS checkpoint (
                id INTEGER PRIMARY KEY CHECK (id = 0), state TEXT
            );
            """
        )
        self.bands, self.rows = (0, 0)
        if config.near:
            lsh = MinHashLSH(threshold=config.near_threshold, num_perm=config.num_perm)
            self.bands, self.rows = lsh.b, lsh.r

    def check(self, document: int, digest: bytes, signature: np.ndarray | None) -> str | None:
        """ "exact_duplicate" or "near_duplicate" when an earlier document matches; otherwise
        None, and `document` (a corpus-wide number) joins the index."""
        cursor = self.connection.cursor()
        if self.config.exact:
            cursor.execute("INSERT OR IGNORE INTO exact VALUES (?)", (digest,))
            if cursor.rowcount == 0:
                return "exact_duplicate"
        if not self.config.near or signature is None:
            return None
        keys = [(band, self._band_hash(signature, band)) for band in range(self.bands)]
        for band, band_hash in keys:
            row = cursor.execute(
                "SELECT document FROM bands WHERE band = ? AND hash = ?", (band, band_hash)
            ).fetchone()
            if row is not None:
                cursor.execute(
                    "INSERT INTO clusters VALUES (?, 1) ON CONFLICT (representative) "
                    "DO UPDATE SET duplicates = duplicates + 1",
                    (row[0],),
                )
                return "near_duplicate"
        cursor.executemany(
            "INSERT INTO bands VALUES (?, ?, ?)", [(b, h, document) for b, h in keys]
        )
        return None

    def near_duplicate_clusters(self) -> int:
        """Kept documents that near duplicates were dropped against."""
        return self.connection.execute("SELECT count(*) FROM clusters").fetchone()[0]

    def save(self, state: dict) -> None:
        """Commit the index together with the pipeline `state` it corresponds to."""
        self.connection.execute(
            "INSERT OR REPLACE INTO checkpoint VALUES (0, ?)", (json.dumps(state),)
        )
        self.connection.commit()

    def load(self) -> dict | None:
        row = self.connection.execute("SELECT state FROM checkpoint WHERE id = 0").fetchone()
        return json.loads(row[0]) if row else None

    def close(self) -> None:
        self.connection.close()

    def _band_hash(self, signature: np.ndarray, band: int) -> int:
        start = band * self.rows
        # SQLite integers are signed 64-bit.
        return xxhash.xxh64_intdigest(signature[start : start + self.rows].tobytes()) - (1 << 63)
