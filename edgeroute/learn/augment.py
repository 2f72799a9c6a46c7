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
* **task instructions** around a text of another class (translate it, summarise it,
  pull fields out of it, write a poem about it): the copy takes the instruction's class.
  What is asked decides, not what the quoted text is about; and the thin classes
  (translation, summarization, extraction) get examples in many framings.
* **multiple-choice framings** of questions (knowledge, math, reasoning) with
  placeholder options: exam harnesses list choices after the question, and the
  list's scaffolding ("choice:", "(B)", "Answer:") must not read as any class.

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

# Instruction -> class, around a text that is not itself the request. {x} is the text.
TASK_INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "translation": (
        "Translate the following text into French:\n\n{x}",
        "Translate this into German, keeping the formatting:\n{x}",
        'Please translate the passage below to Spanish.\n\n"""\n{x}\n"""',
        "{x}\n\nTranslate the above into Japanese.",
        "Render the following in idiomatic English:\n{x}",
        "Translate into Simplified Chinese. Output only the translation.\n\n{x}",
        "请把下面的内容翻译成英文：\n{x}",  # noqa: RUF001
        "Traduis ce texte en anglais :\n{x}",
    ),
    "summarization": (
        "Summarize the following text in three sentences:\n\n{x}",
        "TL;DR of the passage below, one paragraph.\n\n{x}",
        "{x}\n\nSummarize the above in a few bullet points.",
        "Give a one-line summary of this:\n{x}",
        "Condense the following into a short abstract of at most 50 words.\n\n{x}",
        "Write a brief summary of the text between the markers.\n<<<\n{x}\n>>>",
    ),
    "extraction": (
        "Extract every number mentioned in the text below and return them as a JSON list.\n\n{x}",
        "From the following text, list all the named entities (people, places, organisations) with their type.\n{x}",
        "{x}\n\nPull out the key facts above as a table with the columns field and value.",
        "Identify all dates, amounts and names in this passage and output them as JSON.\n\n{x}",
        "Return only the nouns that appear in the text below, comma-separated.\n{x}",
        "Tag each entity in the following sentence with its type (PER, ORG, LOC, MISC).\n{x}",
    ),
    "creative_writing": (
        "Write a short poem inspired by the following:\n\n{x}",
        "Turn the text below into a short story told by a child.\n\n{x}",
        "{x}\n\nNow write a limerick about the above.",
    ),
}
MC_FORMATS: tuple[str, ...] = (
    "{x}\n  choice: {a}\n  choice: {b}\n  choice: {c}\nA: ",
    "{x}\nA) {a}\nB) {b}\nC) {c}\nD) {d}\nAnswer:",
    "{x}\n(A) {a} (B) {b} (C) {c} (D) {d}",
    "Question: {x}\nOptions:\n- {a}\n- {b}\n- {c}\nAnswer:",
    "{x}\nChoices: {a}; {b}; {c}; {d}\nThe answer is",
)
# Class-neutral placeholder options: their words say nothing about the task.
MC_OPTIONS: tuple[str, ...] = (
    "Yes",
    "No",
    "Unknown",
    "None of the above",
    "True",
    "False",
    "the first one",
    "It depends",
    "all of them",
    "Paris",
    "red",
    "B and C",
    "never",
    "the second",
)
# Per class, so that each class gets about as many framed copies: the scaffolding
# must not become evidence of the class with the most questions (math).
MC_SHARE = {"knowledge_qa": 0.3, "math": 0.15, "reasoning": 0.8}

TASK_INSTRUCTION_SHARE = {"translation": 0.05, "summarization": 0.08, "extraction": 0.04, "creative_writing": 0.02}
# A text to be summarised must have some length; one to be translated any.
MIN_BODY_CHARS = {"summarization": 200, "extraction": 60}

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
        if _u(e.text, "mc") < MC_SHARE.get(e.label, 0.0):
            a, b, c, d = (_pick(MC_OPTIONS, e.text, f"o{k}") for k in range(4))
            text = _pick(MC_FORMATS, e.text, "mc#").format(x=e.text, a=a, b=b, c=c, d=d)
            out.append(Example(text, e.label, WRAPPED))
        if e.label != "chat":
            for label, share in TASK_INSTRUCTION_SHARE.items():
                if label != e.label and len(e.text) >= MIN_BODY_CHARS.get(label, 0) and _u(e.text, label) < share:
                    text = _pick(TASK_INSTRUCTIONS[label], e.text, label + "#t").format(x=e.text)
                    out.append(Example(text, label, WRAPPED))
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
