"""The README's YAML snippets are configs the real loader accepts.

A new user copies them: the first `yaml` block is the full example and must validate on its
own; each later block adds to it, so each is merged (mappings key by key, anything else
replaced) into the example and the blocks before it, as a reader assembles them, and the
result must validate. Secrets are not resolved (`env:`/`file:`/`exec:` name the user's host);
the files the loader reads are made: the example's TLS files (a throwaway certificate and key)
and the router files a user trains (`*.erlm`: the shipped router, as `router train` would
write). A block whose first line is `# fragment` is not a config and is skipped.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgeroute import config as config_mod
from tests.readme_pages import ROOT, pages
from tests.tls_fixtures import self_signed

TLS_DIR = "/etc/edgeroute/"  # where the README's example keeps its CA bundle and client pair
SHIPPED_ROUTER = Path(config_mod.__file__).resolve().parent.parent / "models" / "router-gpt4-mixtral.erlm"


def yaml_blocks() -> list[tuple[str, str]]:
    """(page:line, text) of each fenced `yaml` block of the README and its guide pages, in order."""
    blocks: list[tuple[str, str]] = []
    for page in pages():
        lines = page.read_text().splitlines()
        i = 0
        while i < len(lines):
            if re.fullmatch(r"```yaml\s*", lines[i]):
                end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
                blocks.append((f"{page.relative_to(ROOT)}:{i + 2}", "\n".join(lines[i + 1 : end]) + "\n"))
                i = end
            i += 1
    return blocks


def merged(base: Any, extra: Any) -> Any:
    if isinstance(base, dict) and isinstance(extra, dict):
        out = dict(base)
        for key, value in extra.items():
            out[key] = merged(base[key], value) if key in base else value
        return out
    return extra


def validate(data: dict[str, Any], tmp_path: Path) -> None:
    text = yaml.safe_dump(data, sort_keys=False).replace(TLS_DIR, f"{tmp_path}/")
    cert, key = self_signed(tmp_path)
    for name in re.findall(re.escape(f"{tmp_path}/") + r"([\w.-]+)", text):
        (tmp_path / name).write_bytes((key if name.endswith(".key") else cert).read_bytes())
    for name in re.findall(r"\b([\w-]+\.erlm)\b", text):  # relative to the config file
        (tmp_path / name).write_bytes(SHIPPED_ROUTER.read_bytes())
    path = tmp_path / "edge.yaml"
    path.write_text(text)
    config_mod.load(path, check_secrets=False)


BLOCKS = [(line, text) for line, text in yaml_blocks() if not text.startswith("# fragment")]


def test_the_readme_has_a_full_example_and_snippets() -> None:
    assert len(BLOCKS) >= 10, "the README's yaml blocks were not found"
    first = yaml.safe_load(BLOCKS[0][1])
    assert {"providers", "deployments", "models"} <= set(first), "the first yaml block is not a full config"


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[where for where, _ in BLOCKS])
def test_each_snippet_validates_with_the_example(index: int, tmp_path: Path) -> None:
    data: Any = {}
    for _, text in BLOCKS[: index + 1]:
        data = merged(data, yaml.safe_load(text))
    where = BLOCKS[index][0]
    try:
        validate(data, tmp_path)
    except config_mod.ConfigError as e:
        pytest.fail(f"the yaml block at {where} does not validate:\n" + "\n".join(e.errors))


def test_a_snippet_that_names_an_unknown_deployment_fails(tmp_path: Path) -> None:
    """The check above can fail: a snippet naming what the example lacks is refused."""
    data = merged(yaml.safe_load(BLOCKS[0][1]), {"models": {"weak": {"deployments": ["mini"]}}})
    with pytest.raises(config_mod.ConfigError, match="unknown deployment 'mini'"):
        validate(data, tmp_path)
