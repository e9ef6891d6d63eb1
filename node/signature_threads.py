"""Many Ed25519 checks at once, spread over worker threads (cryptography releases the GIL while it verifies)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from ledger.crypto import PublicKeyCache

# Fewer checks than this run on the calling thread alone: handing work to a thread costs about as
# much as a check or two.
PARALLEL_CHECKS_MIN = 16


class SignatureThreads:
    """A node.certificates.SignaturesCheck using `threads` cores: the calling thread takes one
    share, at most threads - 1 workers the others. Bounded: a fixed pool, one share per worker."""

    def __init__(self, threads: int) -> None:
        self.threads = max(1, threads)
        self.keys = PublicKeyCache()
        self.executor = (
            ThreadPoolExecutor(max_workers=self.threads - 1, thread_name_prefix="signature-check") if self.threads > 1 else None
        )

    def _check_share(self, items: Sequence[tuple[bytes, bytes, bytes, bytes]]) -> list[bool]:
        return [self.keys.verify(*item) for item in items]

    def check(self, items: Sequence[tuple[bytes, bytes, bytes, bytes]]) -> list[bool]:
        if self.executor is None or len(items) < PARALLEL_CHECKS_MIN:
            return self._check_share(items)
        share = math.ceil(len(items) / self.threads)
        shares = [items[start : start + share] for start in range(0, len(items), share)]
        others = [self.executor.submit(self._check_share, part) for part in shares[1:]]
        results = self._check_share(shares[0])
        for future in others:
            results += future.result()
        return results

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True)
