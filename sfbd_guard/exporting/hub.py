"""`guard export --push REPO`: upload an export folder to the Hugging Face Hub with huggingface_hub.

The folder is checked against its export.json first, and only the files it lists (and export.json) are uploaded:
`allow_patterns` names each, so nothing else in the folder can leave."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from .check import checked_export
from .layout import RECORD


class HubApi(Protocol):
    """The part of `huggingface_hub.HfApi` a push uses (tests pass a fake: no network here)."""

    def create_repo(self, repo_id: str, *, repo_type: str | None = ..., private: bool | None = ...,
                    exist_ok: bool = ...) -> Any: ...

    def upload_folder(self, *, repo_id: str, folder_path: str | Path, repo_type: str | None = ...,
                      commit_message: str | None = ..., allow_patterns: list[str] | str | None = ...) -> Any: ...


def push_export(folder: Path, repo: str, *, api: HubApi | None = None, private: bool = True) -> str:
    """Upload `folder` to the model repository `repo` (created private unless `private` is False); the commit's URL."""
    record = checked_export(folder)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
    names = [RECORD, *(f.path for f in record.files)]
    info = api.upload_folder(repo_id=repo, folder_path=folder, repo_type="model", allow_patterns=names,
                             commit_message=f"sfbd_guard export of run {record.run} (weights {record.weights_sha256[:12]})")
    return str(getattr(info, "commit_url", info))
