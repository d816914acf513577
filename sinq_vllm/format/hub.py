"""Checkpoints named by a Hugging Face Hub id: fetch the files the front end reads.

vLLM's front end downloads only a Hub model's ``config.json`` before it picks a
quantization method, and the worker downloads the weights later. SINQ detection and the
front-end checks (docs/design.md §2) also need the sidecar meta and the safetensors index,
so they are fetched here with ``huggingface_hub.hf_hub_download``: into the cache the
weights go to (vLLM's ``--download-dir``), at the requested revision, with the user's
token, honouring ``HF_HUB_OFFLINE`` and ``HF_ENDPOINT`` like every other download.

A file the repository does not have at that revision is *absent* (the Hub said 404, or its
absence is cached). Anything else (a gated or private repository, an unknown revision, a
refused file, no network and no cached copy) is one :class:`SinqCheckpointError` saying
what to do, or, offline, *unknown*: a sidecar is never silently taken as missing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import SinqCheckpointError
from .names import INDEX_NAME, SIDECAR_NAME

CONFIG_NAME = "config.json"
#: the JSON files of a SINQ checkpoint that the front end reads (docs/format.md §2.1)
METADATA_FILES = (CONFIG_NAME, INDEX_NAME, SIDECAR_NAME)


def is_hub_id(model: str) -> bool:
    """True when ``model`` is no local path and is a valid Hub repository id (``org/name``)."""
    if not model or os.path.exists(model):
        return False
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(model)
    except HFValidationError:
        return False
    return True


@dataclass(frozen=True)
class HubFiles:
    """The outcome of :func:`fetch_metadata`: where the files are, and which the repo lacks."""

    repo_id: str
    revision: str | None
    cache_dir: str | None  # None: the Hugging Face cache
    token: bool | str | None  # None: huggingface_hub's own lookup (HF_TOKEN, `hf auth login`)
    folder: str | None  # the cache snapshot holding the fetched files (None: nothing fetched)
    present: frozenset[str]
    absent: frozenset[str]  # the repository has no such file at this revision
    unknown: frozenset[str]  # offline (or no network) and not in the cache: cannot tell

    @property
    def where(self) -> str:
        return f"{self.repo_id}" + (f" (revision {self.revision})" if self.revision else "")


def fetch_metadata(repo_id: str, revision: str | None = None, cache_dir: str | None = None,
                   files: tuple[str, ...] = METADATA_FILES, token: bool | str | None = None) -> HubFiles:
    """Download ``files`` of Hub repository ``repo_id`` (cached copies are reused; offline,
    only the cache is read). Raises :class:`SinqCheckpointError` for anything but "absent"."""
    from huggingface_hub import constants, hf_hub_download

    present, absent, unknown = {}, set(), set()
    for name in files:
        try:
            present[name] = hf_hub_download(repo_id, name, revision=revision, cache_dir=cache_dir, token=token)
        except Exception as e:  # noqa: BLE001 - every huggingface_hub failure is classified below
            outcome = _classify(e, repo_id, name, revision, cache_dir, constants.HF_HUB_OFFLINE)
            (absent if outcome == "absent" else unknown).add(name)
    folder = None
    if present:
        name, path = next(iter(present.items()))
        folder = os.path.dirname(path)
        if os.path.basename(path) != name:  # never: hf_hub_download keeps the repo's file name
            folder = None
    return HubFiles(repo_id, revision, cache_dir, token, folder, frozenset(present), frozenset(absent),
                    frozenset(unknown))


def repo_files(files: HubFiles) -> set[str] | None:
    """The file names of the repository at the revision (one listing request); None offline."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        return set(HfApi().list_repo_files(files.repo_id, revision=files.revision, token=files.token))
    except Exception as e:  # noqa: BLE001
        _classify(e, files.repo_id, "the file list", files.revision, files.cache_dir, False)
        return None  # no network: the worker's download reports it


def download_snapshot(repo_id: str, revision: str | None = None, cache_dir: str | None = None,
                      allow_patterns: list[str] | None = None) -> str:
    """``snapshot_download`` (for commands that need the weights too), errors as in :func:`fetch_metadata`."""
    from huggingface_hub import constants, snapshot_download

    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=allow_patterns)
    except Exception as e:  # noqa: BLE001
        _classify(e, repo_id, "the repository files", revision, cache_dir, constants.HF_HUB_OFFLINE)
        raise SinqCheckpointError(
            f"{repo_id}: some files are not in the local cache and HF_HUB_OFFLINE=1 forbids downloading them "
            f"({_one_line(e)}); run once with network access or `hf download {repo_id}`"
        ) from None


def _classify(e: Exception, repo_id: str, name: str, revision, cache_dir, offline: bool) -> str:
    """'absent' or 'unknown' for the outcomes a caller decides on; raises for the others."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    endpoint = _endpoint()
    login = "authenticate with `hf auth login` or the HF_TOKEN environment variable"
    if isinstance(e, RemoteEntryNotFoundError):
        return "absent"
    if isinstance(e, GatedRepoError):
        status = _status(e)
        why = ("you are authenticated but not on its list of approved users" if status == 403 else
               "downloading it needs an authenticated user who accepted its conditions")
        raise SinqCheckpointError(
            f"{repo_id} is a gated repository (HTTP {status}) and {why}: accept the conditions at "
            f"{endpoint}/{repo_id}, then {login}") from None
    if isinstance(e, RevisionNotFoundError):
        raise SinqCheckpointError(f"{repo_id} has no revision {revision!r} on {endpoint} (--revision takes a "
                                  "branch, a tag or a commit id)") from None
    if isinstance(e, RepositoryNotFoundError):
        raise SinqCheckpointError(
            f"{repo_id!r} is not a local folder and no repository {repo_id} was found on {endpoint} (HTTP "
            f"{_status(e)}); if it is private, {login}") from None
    if isinstance(e, LocalEntryNotFoundError):
        cause = e.__cause__
        if isinstance(cause, HfHubHTTPError) and _status(cause) not in (None, 429) and _status(cause) < 500:
            raise SinqCheckpointError(
                f"{where}: the Hub refused {name} (HTTP {_status(cause)}: {_server_message(cause)}); "
                f"check access to {endpoint}/{repo_id} ({login})") from None
        if offline:
            from huggingface_hub.file_download import _CACHED_NO_EXIST  # the cached record of a 404

            if try_to_load_from_cache(repo_id, name, cache_dir=cache_dir, revision=revision) is _CACHED_NO_EXIST:
                return "absent"
        return "unknown"
    if isinstance(e, HfHubHTTPError):
        raise SinqCheckpointError(f"{where}: downloading {name} failed (HTTP {_status(e)}: {_server_message(e)})") \
            from None
    if isinstance(e, OSError):
        raise SinqCheckpointError(f"{where}: downloading {name} failed: {_one_line(e)}") from None
    raise e


def _status(e) -> int | None:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


def _server_message(e) -> str:
    response = getattr(e, "response", None)
    message = response.headers.get("X-Error-Message") if response is not None else None
    return message or _one_line(e)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def shard_headers(files: HubFiles, shard: str) -> dict:
    """``{tensor: HeaderEntry}`` of one safetensors shard of a Hub checkpoint, without its data:
    the cached file's header when the weights are downloaded, else the header read from the
    Hub with HTTP range requests (``huggingface_hub.parse_safetensors_file_metadata``)."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache

    from .safetensors_io import HeaderEntry, read_header

    from huggingface_hub.errors import SafetensorsParsingError

    cached = try_to_load_from_cache(files.repo_id, shard, cache_dir=files.cache_dir, revision=files.revision)
    if isinstance(cached, str):
        return read_header(cached).entries
    if constants.HF_HUB_OFFLINE:
        raise SinqCheckpointError(f"{files.where}: shard {shard} is not in the local cache and HF_HUB_OFFLINE=1 "
                                  "forbids reading its header from the Hub")
    try:
        meta = HfApi().parse_safetensors_file_metadata(files.repo_id, shard, revision=files.revision,
                                                       token=files.token)
    except SafetensorsParsingError as e:
        raise SinqCheckpointError(f"{files.where}: {shard} is not a valid safetensors file: {_one_line(e)}") from None
    except Exception as e:  # noqa: BLE001
        if _classify(e, files.repo_id, shard, files.revision, files.cache_dir, False) == "absent":
            raise SinqCheckpointError(f"{files.where}: the index lists shard {shard}, but the repository has no such "
                                      "file (renamed or not uploaded?)") from None
        raise SinqCheckpointError(f"{files.where}: cannot read the safetensors header of {shard}: {_one_line(e)}") \
            from None
    return {name: HeaderEntry(t.dtype, tuple(t.shape), *t.data_offsets) for name, t in meta.tensors.items()}
