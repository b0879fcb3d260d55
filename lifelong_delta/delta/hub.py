"""Checkpoints named as users type them: a local folder or file, or a Hugging Face Hub id (``org/name[@revision]``).

A hub id resolves to its snapshot folder in the local Hugging Face cache (``HF_HUB_CACHE``/``HF_HOME``), and is
downloaded there first when a network is available and ``HF_HUB_OFFLINE`` is not set. Only what the commands read
is fetched: safetensors weights and their index, JSON configs and tokenizer files (no ``.bin``/``.h5`` copies of the
weights). The snapshot is an input like any other: outputs are checked against its path, and nothing is written
into the cache except by the download itself.

Standard library only at import; ``huggingface_hub`` is imported when a hub id is given.
"""

from __future__ import annotations

import os
import re

__all__ = ["WEIGHT_PATTERNS", "looks_like_hub_id", "resolve_checkpoint"]

#: Files fetched for a hub id: what the streaming commands and the calibration read.
WEIGHT_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "*.model",
    "*.txt",
    "*.tiktoken",
    "tokenizer*",
)

_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?")


def looks_like_hub_id(spec: str) -> bool:
    """Whether ``spec`` has the form of a hub model id, ``org/name`` or ``org/name@revision``."""
    return _HUB_ID.fullmatch(spec) is not None and not spec.endswith((".safetensors", ".json"))


def resolve_checkpoint(spec: str, *, option: str) -> str:
    """The local path of checkpoint ``spec``: ``spec`` itself when it exists, else the cached snapshot of a hub id.

    Args:
        spec: A local folder or ``.safetensors`` file, or a hub id ``org/name`` (optionally ``@revision``).
        option: The command-line option that gave it, for messages (``"--base"``).

    Raises:
        ValueError: one line naming ``option``: a missing local path, or a hub id that is neither cached nor
            downloadable (offline, unknown, gated, no network).
    """
    if os.path.exists(spec):
        return spec
    if not looks_like_hub_id(spec):
        raise ValueError(f"{option} {spec}: not found")
    match = _HUB_ID.fullmatch(spec)
    assert match is not None
    repo, revision = match["repo"], match["revision"]
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"not a local path, and hub model {repo}" + (f" at revision {revision}" if revision else "")
    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        return snapshot_download(
            repo, revision=revision, allow_patterns=list(WEIGHT_PATTERNS), local_files_only=offline
        )
    except LocalEntryNotFoundError:
        if offline:
            raise ValueError(
                f"{option} {spec}: {where} is not in the Hugging Face cache "
                f"({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE=1 forbids downloading it; unset "
                f"HF_HUB_OFFLINE, or download it where there is a network with `hf download {repo}`"
            ) from None
        raise ValueError(
            f"{option} {spec}: {where} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
            "and could not be downloaded (no connection to the Hub?)"
        ) from None
    except GatedRepoError:
        raise ValueError(
            f"{option} {spec}: {where} is gated; accept its terms on the Hub and log in with "
            "`hf auth login` (or set HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise ValueError(
            f"{option} {spec}: {where} does not exist on the Hub (or is private: log in with `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise ValueError(f"{option} {spec}: {where}: the Hub has no such revision") from None
    except (HfHubHTTPError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{option} {spec}: {where} could not be fetched: {reason}") from None
