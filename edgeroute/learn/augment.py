"""Wrapper augmentation for the task classifier: what is asked, not how a harness frames it.

Evaluation harnesses and chat templates put an instruction around the request ("Please
read the following question and ...", ``Question: ... Answer:``, ``[INST] ... [/INST]``).
A classifier trained on bare prompts learns those words as evidence of some class and
lets a wrapper move a prediction. Training on copies of the examples inside such
wrappers, each with its own label, teaches it that they carry no class.

Two kinds of wrapper, written for this purpose:

* **generic** ones, class-neutral: a copy keeps the example's label;
* **code instructions** ("Generate an executable Python function ...", "Write a program
  ... reading standard input"), put around code examples *and* around math word problems
  full of numbers, where the result is a programming request (label ``code``): the
  instruction must outweigh the numbers.

:data:`DEV_WRAPPERS` are never trained on; :func:`wrapper_robustness` measures how much
unseen wrappers move the predictions (the development check for this module).
Deterministic: every choice is a hash of the example's text.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

from edgeroute.learn.data import Example

WRAPPED = "wrapped"  # source of an augmented copy

GENERIC_WRAPPERS: tuple[str, ...] = (
    "Please read the following question and answer it.\n\n{x}",
    "Please read the following question carefully and provide your answer.\n{x}",
    "Question: {x}\nAnswer:",
    "Q: {x}\nA:",
    "{x}\n\nAnswer:",
    "### Instruction:\n{x}\n\n### Response:",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{x}\n\n### Response:",
    "<|user|>\n{x}\n<|assistant|>",
    "[INST] {x} [/INST]",
    "Human: {x}\n\nAssistant:",
    "You are a helpful assistant. {x}",
    "Task: {x}\nResponse:",
    "Input: {x}\nOutput:",
    "{x}\nThink carefully before you answer, and give your final answer on the last line.",
    'Read the following and respond.\n"""\n{x}\n"""',
    "Answer the following. Your response should end with 'The answer is X'.\n\n{x}",
)

# Held out of training: the development check of robustness to wrappers never seen.
DEV_WRAPPERS: tuple[str, ...] = (
    "USER: {x}\nASSISTANT:",
    "Here is a request from a user:\n\n{x}\n\nPlease respond helpfully.",
    "You are an expert. Respond to the request below.\n\n{x}",
    "{x}\nPlease answer concisely.",
    "Consider the following carefully.\n\n{x}\n\nYour answer:",
)

CODE_INSTRUCTIONS: tuple[str, ...] = (
    "Generate an executable Python function generated from the given prompt. The function should take stdin as "
    "input and print the output. Simply call the function after the definition.\n{x}",
    "Generate an executable Python function generated from the given prompt. Return the function body without "
    "invoking it at the final solution.\n{x}",
    "You will be given a question (problem specification) and will generate a correct Python program that matches "
    "the specification and passes all tests.\n\nQuestion: {x}",
    "Write a program to solve the following problem. Read the input from standard input and write the answer to "
    "standard output.\n\n{x}",
    "Write a Python function that computes the answer to this problem, with a docstring and two test cases:\n{x}",
    "Implement a solution in C++ for the problem below. Mind the time limit.\n\n{x}",
)

# The share of examples of each kind that get a wrapped copy.
GENERIC_SHARE = 0.35
CODE_SHARE = 0.6
NUMERIC_TO_CODE_SHARE = 0.25
NUMERIC_SOURCES = frozenset({"gsm8k", "mmlu", "vllm_sr", "seed", "seed_chat", "mt_bench"})


def _u(text: str, salt: str) -> float:
    """A uniform number in [0, 1) from the text: the augmentation is deterministic."""
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=salt.encode()).digest()
    return int.from_bytes(h, "little") / 2**64


def _pick(options: Sequence[str], text: str, salt: str) -> str:
    return options[int(_u(text, salt + "#") * len(options))]


def wrapped(examples: Sequence[Example]) -> list[Example]:
    """The augmented copies of ``examples`` (the originals are not included)."""
    out: list[Example] = []
    for e in examples:
        if e.label != "chat" and _u(e.text, "generic") < GENERIC_SHARE:
            out.append(Example(_pick(GENERIC_WRAPPERS, e.text, "g").format(x=e.text), e.label, WRAPPED))
        if e.label == "code" and _u(e.text, "code") < CODE_SHARE:
            out.append(Example(_pick(CODE_INSTRUCTIONS, e.text, "c").format(x=e.text), "code", WRAPPED))
        if (
            e.label == "math"
            and e.source in NUMERIC_SOURCES
            and sum(ch.isdigit() for ch in e.text) >= 3
            and _u(e.text, "numeric") < NUMERIC_TO_CODE_SHARE
        ):
            out.append(Example(_pick(CODE_INSTRUCTIONS, e.text, "n").format(x=e.text), "code", WRAPPED))
    return out


def wrapper_robustness(predict: Callable[[list[str]], list[str]], examples: Sequence[Example]) -> dict[str, float]:
    """Accuracy on ``examples`` bare and inside each :data:`DEV_WRAPPERS` (never trained on).

    ``predict`` maps a list of texts to a list of labels. ``flip`` is the share of
    predictions a wrapper changed, averaged over the wrappers: 0 means wrappers are ignored.
    """
    fn = predict
    bare = fn([e.text for e in examples])
    truth = [e.label for e in examples]
    acc = sum(t == p for t, p in zip(truth, bare, strict=True)) / len(truth)
    flips: list[float] = []
    accs: list[float] = []
    for w in DEV_WRAPPERS:
        pred = fn([w.format(x=e.text) for e in examples])
        accs.append(sum(t == p for t, p in zip(truth, pred, strict=True)) / len(truth))
        flips.append(sum(a != b for a, b in zip(bare, pred, strict=True)) / len(truth))
    return {"bare_accuracy": acc, "wrapped_accuracy": sum(accs) / len(accs), "flip": sum(flips) / len(flips)}
