"""Opening the kit on Colab: the bootstrap cell every notebook starts with, the notebook metadata that asks Colab for
a T4, and the README's "Open in Colab" badges, all from the kit's URL (helpers/data/kit.json, set by publishing).

    python -m helpers.colab https://github.com/OWNER/NAME   # publish under that URL: kit.json, notebooks, badges
    python -m helpers.colab                                  # rewrite notebooks and badges from kit.json
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from helpers.paths import KIT_FILE, NOTEBOOKS, README, kit_repo

KIT_DIR = "/content/lora-kit"  # where the bootstrap cell clones the kit on Colab
BADGES_START, BADGES_END = "<!-- colab-badges: made by `python -m helpers.colab` -->", "<!-- /colab-badges -->"
# What unsloth's notebooks carry so that Colab opens them on a GPU runtime with a T4.
COLAB_METADATA = {"accelerator": "GPU", "colab": {"gpuType": "T4", "provenance": []}}

# The cell after the parameters cell in every notebook: plain Python (no ! or % magics), so it fails loudly.
BOOTSTRAP_CELL = f'''\
# Colab: clone the kit and install its packages, once per runtime (elsewhere, or when done already, nothing).
import os, subprocess, sys
if "COLAB_" in "".join(os.environ) and not os.path.isdir("helpers"):
    if not kit_repo: raise SystemExit("kit_repo is empty: set it in the parameters cell to this kit's git URL")
    os.path.isdir("{KIT_DIR}") or subprocess.run(["git", "clone", "-q", "--depth", "1", kit_repo, "{KIT_DIR}"], check=True)
    os.chdir("{KIT_DIR}"); sys.path.insert(0, "{KIT_DIR}"); import helpers.install; helpers.install.install_on_colab()'''


def github_path(repo_url: str) -> str | None:
    """'OWNER/NAME' of a GitHub URL (https or ssh, with or without .git), else None."""
    match = re.fullmatch(r"(?:https://github\.com/|git@github\.com:)([\w.-]+/[\w.-]+?)(?:\.git)?/?", repo_url.strip())
    return match.group(1) if match else None


def colab_url(repo_url: str, notebook: str, branch: str = "main") -> str | None:
    """The link that opens notebooks/<notebook> from GitHub in Colab, or None for a URL that is not GitHub's."""
    path = github_path(repo_url)
    return f"https://colab.research.google.com/github/{path}/blob/{branch}/notebooks/{notebook}" if path else None


def notebook_names() -> list[str]:
    """The kit's notebooks, end-to-end first (the one to open on Colab), then the numbered stages."""
    names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    return sorted(names, key=lambda name: not name.startswith("colab_"))


def badges_markdown(repo_url: str) -> str:
    """The README's badge block: one "Open in Colab" badge per notebook, or what to run when no URL is set."""
    if not github_path(repo_url):
        body = ("No GitHub URL is set for the kit yet, so there are no Colab links: once it is published, run "
                "`make publish REPO_URL=https://github.com/OWNER/NAME` to write them here and into every notebook.")
    else:
        badge = "https://colab.research.google.com/assets/colab-badge.svg"
        body = "\n".join(f"- [![Open In Colab]({badge})]({colab_url(repo_url, name)}) `{name}`"
                         for name in notebook_names())
    return f"{BADGES_START}\n{body}\n{BADGES_END}"


def sync_notebook(path: Path, repo_url: str) -> None:
    """Give one notebook the Colab metadata, the bootstrap cell right after its parameters cell, and
    `kit_repo` = repo_url as its parameter's default."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nb.metadata.update(COLAB_METADATA)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    params = nb.cells[index]
    params.source = re.sub(r'^kit_repo: str = ".*?"(  #)', lambda m: f"kit_repo: str = {json.dumps(repo_url)}{m[1]}",
                           params.source, flags=re.M)
    following = nb.cells[index + 1]
    if following.cell_type == "code" and "kit_repo" in following.source:  # the bootstrap cell, any version
        following.source = BOOTSTRAP_CELL
    else:
        cell = nbformat.v4.new_code_cell(BOOTSTRAP_CELL)
        cell.id = f"{params.id}-bootstrap"
        nb.cells.insert(index + 1, cell)
    nbformat.write(nb, path)


def publish(repo_url: str | None = None) -> str:
    """Set the kit's URL (default: the one set already) in helpers/data/kit.json, every notebook and the README
    badges."""
    repo_url = kit_repo() if repo_url is None else repo_url.strip()
    if repo_url and not github_path(repo_url):
        raise ValueError(f"repo_url {repo_url!r} is not a GitHub repository URL; expected "
                         "https://github.com/OWNER/NAME (Colab opens notebooks from GitHub)")
    KIT_FILE.write_text(json.dumps({"kit_repo": repo_url}, indent=2) + "\n", encoding="utf-8")
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        sync_notebook(path, repo_url)
    readme = README.read_text()
    start, end = readme.index(BADGES_START), readme.index(BADGES_END) + len(BADGES_END)
    README.write_text(readme[:start] + badges_markdown(repo_url) + readme[end:])
    return repo_url


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("repo_url", nargs="?", help="the kit's GitHub URL (default: the one in helpers/data/kit.json)")
    args = parser.parse_args(argv)
    try:
        url = publish(args.repo_url)
    except ValueError as error:
        parser.error(str(error))
    print(f"kit_repo = {url or '(not set)'}: notebooks and README badges rewritten")


if __name__ == "__main__":
    main()
