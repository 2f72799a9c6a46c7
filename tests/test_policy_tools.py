"""`edgeroute router calibrate` and `edgeroute router replay` on a small outcome log."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from tests.test_selection import STRONG_OUT as STRONG
from tests.test_selection import WEAK_OUT as WEAK
from tests.test_selection import config as selection_config

PROMPTS = [
    ("hi there, how are you?", 1.0, 1.0),
    ("thanks a lot!", 1.0, 1.0),
    ("What is the capital of France?", 1.0, 1.0),
    ("Write a haiku about rain.", 1.0, 1.0),
    ("A train leaves at 3pm going 60 mph; another at 4pm going 80 mph. When does the second catch up?", 1.0, 0.0),
    ("Prove that the square root of 2 is irrational.", 1.0, 0.0),
    ("Solve for x: 3x^2 - 12x + 9 = 0, and explain each step.", 1.0, 0.0),
    ("Implement a lock-free queue in C++ with memory orderings explained.", 1.0, 0.0),
]


def outcomes(tmp_path: Path) -> Path:
    path = tmp_path / "outcomes.jsonl"
    with path.open("w") as f:
        for text, strong, weak in PROMPTS:
            f.write(json.dumps({"prompt": text, "model": STRONG, "score": strong, "cost_usd": 0.01}) + "\n")
            f.write(json.dumps({"prompt": text, "model": WEAK, "score": weak, "cost_usd": 0.001}) + "\n")
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeroute", "router", *args], capture_output=True, text=True)


def test_calibrate_to_a_strong_share(tmp_path: Path) -> None:
    r = run(
        "calibrate", "--outcomes", str(outcomes(tmp_path)), "--strong", STRONG, "--weak", WEAK, "--strong-share", "0.5"
    )
    assert r.returncode == 0, r.stderr
    assert "strong share 50.0%" in r.stdout
    r = run(
        "calibrate", "--outcomes", str(outcomes(tmp_path)), "--strong", STRONG, "--weak", WEAK, "--keep-quality", "1.0"
    )
    assert r.returncode == 0, r.stderr
    assert "(100.0% of strong)" in r.stdout


def test_replay_prints_cost_and_quality(tmp_path: Path) -> None:
    cfg = selection_config("http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1", threshold=0.0)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = run("replay", "--config", str(path), "--outcomes", str(outcomes(tmp_path)))
    assert r.returncode == 0, r.stderr
    # Threshold 0: everything goes to the weak model, at the weak model's logged quality and cost.
    assert "replayed 8 prompts" in r.stdout
    total = next(line for line in r.stdout.splitlines() if line.startswith("policy total"))
    assert total.split()[-2:] == ["0.5000", "0.008000"]
    assert "always gpt-4-1106-preview" in r.stdout
