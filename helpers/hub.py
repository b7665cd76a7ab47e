"""Sharing exports on the Hugging Face Hub, safely.

The token comes only from huggingface_hub's own lookup (Colab's secret HF_TOKEN, the HF_TOKEN variable) and is
never a parameter, a literal, printed or written. A push first assembles its plan (repositories, privacy,
files); a dry run stops there and the real push uploads exactly that plan.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from helpers.records import write_json

log = logging.getLogger(__name__)

# One repository per format, named as unsloth names its own uploads: the merged 16-bit model under
# hub_repo_id itself, the others beside it. A fixed name per format keeps later pushes from colliding.
REPO_SUFFIXES = {"merged_16bit": "", "lora": "-lora", "merged_4bit": "-bnb-4bit", "gguf": "-GGUF",
                 "gguf_lora": "-lora-GGUF"}
TOKEN_HELP = (
    "push_to_hub=True needs a Hugging Face token with write access, and none was found; nothing was written. "
    "On Colab: open Secrets (the key icon in the left bar), add a secret named HF_TOKEN holding a write token "
    "from https://huggingface.co/settings/tokens and allow this notebook to read it. Elsewhere: set the HF_TOKEN "
    "environment variable in the shell that starts Jupyter or papermill. The token is never a parameter; "
    "dry_run=True shows what would be pushed without one."
)


def hub_token() -> str | None:
    """The token huggingface_hub finds (Colab secret, HF_TOKEN, its token file), or None. Never log it."""
    from huggingface_hub import get_token

    return get_token()


def repo_for(hub_repo_id: str, export_format: str) -> str:
    """The Hub repository an export format is pushed to."""
    repo_id = hub_repo_id + REPO_SUFFIXES[export_format]
    if len(repo_id.split("/")[1]) > 96:
        raise ValueError(f"Hub repository name {repo_id!r} is longer than 96 characters; shorten hub_repo_id")
    return repo_id


def check_push_ready(config) -> None:
    """Before anything is written: a real push needs a token (a dry run does not) and valid repository names."""
    if not config.push_to_hub:
        return
    for export_format in config.formats:
        repo_for(config.hub_repo_id, export_format)
    if not config.dry_run and hub_token() is None:
        raise PermissionError(TOKEN_HELP)


def push_plan(config, manifest: dict[str, Any]) -> dict[str, Any]:
    """What a push uploads: per exported format its repository, privacy and files; formats unsloth refused here
    skipped. A requested format whose export failed (its reload check included) is refused, naming each one."""
    failed = {name: manifest["formats"][name].get("reason", "") for name in config.formats
              if manifest["formats"].get(name, {}).get("status") == "failed"}
    if failed:
        raise RuntimeError("push refused, nothing was uploaded: requested formats whose export failed: "
                           + "; ".join(f"{name} ({reason})" for name, reason in failed.items())
                           + ". Export them again, or leave them out of formats.")
    uploads, skipped = [], {}
    for name, entry in manifest["formats"].items():
        if name not in config.formats:
            continue
        if entry.get("status") != "ok":
            skipped[name] = entry.get("reason", entry.get("status"))
            continue
        folder = Path(config.run_dir) / entry["path"]
        on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        files = sorted(f["name"] for f in entry["files"])
        if on_disk != files:
            raise RuntimeError(f"{folder} no longer holds the files its manifest lists; export {name} again")
        uploads.append({"format": name, "repo_id": repo_for(config.hub_repo_id, name), "private": config.private,
                        "folder": str(folder), "files": files, "bytes": entry["total_bytes"]})
    return {"dry_run": config.dry_run, "token_found": hub_token() is not None, "uploads": uploads, "skipped": skipped}


def push_exports(config, manifest: dict[str, Any], api=None) -> dict[str, Any]:
    """Push the exported formats (dry_run: only plan); the plan is saved as export/push_plan.json either way.

    Every repository that already exists must have the requested privacy, checked before anything is uploaded.
    `api` stands in for huggingface_hub.HfApi (tests).
    """
    check_push_ready(config)
    plan = push_plan(config, manifest)
    plan_path = Path(config.run_dir) / "export" / "push_plan.json"
    write_json(plan_path, plan)
    if config.dry_run:
        return plan
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    api = api or HfApi(token=hub_token())
    for upload in plan["uploads"]:
        try:
            existing = api.repo_info(upload["repo_id"], repo_type="model")
        except RepositoryNotFoundError:
            continue
        if bool(existing.private) != upload["private"]:
            visibility = "private" if existing.private else "public"
            raise PermissionError(f"{upload['repo_id']} already exists and is {visibility}, but private="
                                  f"{upload['private']} was asked; nothing was uploaded. Change its visibility on "
                                  "the Hub or choose another hub_repo_id.")
    for upload in plan["uploads"]:
        api.create_repo(upload["repo_id"], private=upload["private"], repo_type="model", exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(Path(upload["folder"]) / name))
                      for name in upload["files"]]
        commit = api.create_commit(upload["repo_id"], operations=operations, repo_type="model",
                                   commit_message=f"Upload the {upload['format']} export (unsloth + trl LoRA run)")
        upload["url"] = getattr(commit, "commit_url", None) or f"https://huggingface.co/{upload['repo_id']}"
        log.info("pushed %s to %s", upload["format"], upload["repo_id"])
    plan["pushed"] = True
    write_json(plan_path, plan)
    return plan


def push_plan_markdown(plan: dict[str, Any]) -> str:
    """The push plan as a table: what goes (or went) where, public or private, with which files."""
    head = ("Dry run: nothing was uploaded; a token was " + ("found." if plan["token_found"] else "not found.")
            if plan["dry_run"] else "Pushed.")
    rows = ["| format | repository | private | files | size |", "|---|---|---|---|---|"]
    for u in plan["uploads"]:
        rows.append(f"| {u['format']} | {u.get('url') or u['repo_id']} | {u['private']} | "
                    f"{', '.join(u['files'])} | {u['bytes'] / 2**20:.1f} MiB |")
    skipped = "".join(f"\n\nNot pushed, {name}: {reason}" for name, reason in plan["skipped"].items())
    return f"{head}\n\n" + "\n".join(rows) + skipped
