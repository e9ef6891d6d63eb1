"""NEW-VIEW computation (PBFT's rule for which pre-prepares a new view starts with), pure."""

from __future__ import annotations

from collections.abc import Iterable

from ledger.messages import Batch, PreparedCertificate, ViewChange

# PBFT's null request: one constant batch, whatever view assigns it. A NEW-VIEW may re-propose a
# null batch first assigned several views earlier (a replica prepared it, others did not), so its
# content must be recognisable from its digest alone; a per-view null batch would leave every
# replica asking peers for content nobody keeps. An honest primary never proposes an empty batch,
# so this digest means "no requests" and nothing else.
NULL_BATCH = Batch(0, 0, 0, ())


def new_view_assignments(view_changes: Iterable[ViewChange]) -> tuple[int, list[tuple[int, bytes]]]:
    """PBFT's rule for the pre-prepares of a NEW-VIEW, recomputed identically by every backup.

    Start after the highest stable checkpoint among the view-changes. For each later sequence
    number, re-propose the digest prepared in the highest view; fill gaps with the null batch.
    Returns (that checkpoint's sequence, [(sequence, digest), ...]).
    """
    view_changes = list(view_changes)
    low = max((view_change.checkpoint_sequence for view_change in view_changes), default=0)
    chosen: dict[int, PreparedCertificate] = {}
    for view_change in view_changes:
        for certificate in view_change.prepared:
            if certificate.sequence <= low:
                continue
            best = chosen.get(certificate.sequence)
            if best is None or certificate.view > best.view:
                chosen[certificate.sequence] = certificate
    high = max(chosen, default=low)
    empty = NULL_BATCH.digest
    return low, [(sequence, chosen[sequence].digest if sequence in chosen else empty) for sequence in range(low + 1, high + 1)]
