"""The archive's settings, checked together: `[archive]` of the config plus the credentials of the environment."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import Config, ConfigError


@dataclass(frozen=True)
class ArchiveSettings:
    endpoint_url: str
    bucket: str
    prefix: str  # "" or ending with "/"
    region: str
    access_key_id: str = field(repr=False)
    secret_access_key: str = field(repr=False)
    session_token: str = field(repr=False)
    upload_after: float  # seconds after a request's ending
    keep_local: float | None  # seconds local copies stay once verified; None = forever
    expire_objects: bool
    max_uploads: int
    part_size: int
    retry_min: float
    retry_max: float
    timeout: float  # connect / silence limit of one store request

    @classmethod
    def from_config(cls, config: Config, where: str = "config") -> ArchiveSettings:
        """The settings of an enabled archive; ConfigError naming what is missing (never a secret's value)."""
        missing = [
            name
            for name, value in (
                ("[archive] endpoint_url", config.archive_endpoint_url),
                ("[archive] bucket", config.archive_bucket),
                ("AWS_ACCESS_KEY_ID in the environment", config.archive_access_key_id),
                ("AWS_SECRET_ACCESS_KEY in the environment", config.archive_secret_access_key),
            )
            if not value
        ]
        if missing:
            raise ConfigError(f"{where}: [archive] is enabled but lacks " + ", ".join(missing))
        if config.archive_retry_max_seconds < config.archive_retry_min_seconds:
            raise ConfigError(f"{where}: [archive] retry_max_seconds must be at least retry_min_seconds")
        keep = config.archive_keep_local_hours
        prefix = config.archive_prefix.strip("/")
        return cls(
            endpoint_url=config.archive_endpoint_url.rstrip("/"),
            bucket=config.archive_bucket,
            prefix=prefix + "/" if prefix else "",
            region=config.archive_region or "us-east-1",
            access_key_id=config.archive_access_key_id,
            secret_access_key=config.archive_secret_access_key,
            session_token=config.archive_session_token,
            upload_after=config.archive_upload_after_seconds,
            keep_local=None if keep == "forever" else float(keep) * 3600,
            expire_objects=config.archive_expire_objects,
            max_uploads=config.archive_max_concurrent_uploads,
            part_size=config.archive_part_size_bytes,
            retry_min=config.archive_retry_min_seconds,
            retry_max=config.archive_retry_max_seconds,
            timeout=config.archive_request_timeout_seconds,
        )

    def key(self, rel: str) -> str:
        """The object key of a path relative to the data directory."""
        return self.prefix + rel
