"""The archive tier: ended requests uploaded to an S3-compatible bucket, verified, then served from it.

Off unless `[archive] enabled`. A storage-level layer: it imports `config`, `paths` and `store` only.

The API (one `Archiver` per relay process, made and started at start-up, stopped at shutdown):

    archiver = Archiver(config, data_dir=None)   # ConfigError when [archive] or the credentials are incomplete
    await archiver.start()                      # resumes the uploads left pending by a restart or a kill -9
    await archiver.ended(request_path)          # a request's ending is durable: archive it (returns once
                                                # that is recorded on disk; the upload itself comes later)
    archiver.backlog() -> Backlog               # pending, pending_bytes, oldest_pending_seconds, failing,
                                                # failures, integrity_failures, archived, archived_bytes,
                                                # local_removed, last_error (`.as_dict()` for /metrics)
    await archiver.open(rel, start=0, end=None) -> ArchivedRange
                                                # bytes [start, end) of an archived file, for serving when the
                                                # local file is gone: `.size` (the whole file's), then
                                                # `async for chunk in it` (verified as they come); one ranged GET
    await archiver.read(rel, start=0, end=None) -> bytes      # the same, whole
    await archiver.expire(cutoff) -> int        # the janitor: archived requests created before `cutoff`
                                                # (epoch seconds) leave the bucket (or a bucket rule does it)
    await archiver.forget(request_path)         # a request deleted on purpose: its objects and records go
    await archiver.stop()

`rel` is the file's URL path without the leading `/` (`RequestPath.rel(ext)`). Reads raise `NotArchived`
(a `FileNotFoundError`: answer 404), `ValueError` (a range outside the file: 416), `StoreError` (the
store failed or timed out: 503) or `IntegrityError` (the store served other bytes than were archived: 502;
raised before any wrong byte is given out, also from within the iteration).

Objects: `<prefix><rel>` for each of a request's files, and `<prefix><base>.manifest.json` (sizes and
SHA-256 of each file and of each 256 KiB block of it), written last: any node can serve any archived
file. Local state: `<data_dir>/archive/` (see `state.py`). Modules: `settings` (the config, checked),
`client` (the store, through obstore), `manifest` (hashes), `state` (the queue and records on disk),
`archiver` (the workers), `reader` (verified reads). Why obstore: see docs/development.md.
"""

from .archiver import Archiver, Backlog
from .client import ArchiveError, IntegrityError, NotArchived, StoreError
from .reader import ArchivedRange
from .settings import ArchiveSettings

__all__ = [
    "ArchiveError",
    "ArchiveSettings",
    "ArchivedRange",
    "Archiver",
    "Backlog",
    "IntegrityError",
    "NotArchived",
    "StoreError",
]
