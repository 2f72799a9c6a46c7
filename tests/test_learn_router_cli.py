"""``edgeroute router train|eval`` as a user runs them: settings chosen by cross-validation,
the prompt-blind prior as a floor, baselines beside the router, bad input reported by line."""

from __future__ import annotations

import json
import random
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from edgeroute.cli import main

np = pytest.importorskip("numpy", reason="training needs numpy (pip install 'edgeroute[train]')")

FAST = ["--l2", "1e-3,1e-1", "--iters", "10,40", "--inner-folds", "2", "--outer-folds", "2"]


def write_outcomes(path: Path, n: int, *, seed: int, signal: bool, costs: tuple[float, float] = (0.01, 0.001)) -> Path:
    """Two models; with ``signal`` the small one fails on prompts that say "eigenvalue"."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            hard = rng.random() < 0.4
            p = f"question {i} about {'eigenvalue integrals' if hard else 'simple greetings'} {rng.randint(0, 999)}"
            big = float(rng.random() < 0.9)
            if signal:
                small = float(rng.random() < (0.15 if hard else 0.85))
            else:
                small = float(rng.random() < 0.6)
            f.write(json.dumps({"prompt": p, "model": "big", "score": big, "cost_usd": costs[0]}) + "\n")
            f.write(json.dumps({"prompt": p, "model": "small", "score": small, "cost_usd": costs[1]}) + "\n")
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    try:
        code = main(["router", *argv])
    except SystemExit as e:  # argparse and one-line load errors
        out = capsys.readouterr()
        return (e.code if isinstance(e.code, int) else 2), out.out + out.err + (
            "" if isinstance(e.code, int) else str(e.code)
        )
    out = capsys.readouterr()
    return code, out.out + out.err


def test_train_chooses_a_text_model_that_beats_the_prior_then_eval_prints_baselines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = write_outcomes(tmp_path / "train.jsonl", 240, seed=1, signal=True)
    test = write_outcomes(tmp_path / "test.jsonl", 120, seed=2, signal=True)
    model = tmp_path / "r.erlm"
    code, out = run(capsys, "train", "--outcomes", str(train), "--out", str(model), *FAST)
    assert code == 0, out
    assert "outer estimate" in out and "<- chosen" in out
    meta = json.loads(model.read_bytes()[8 : 8 + int.from_bytes(model.read_bytes()[4:8], "little")])["meta"]
    assert meta["selection"]["chosen"].startswith("linear"), meta
    assert meta["train"]["seed"] == 0 and meta["prior"]["big"] > meta["prior"]["small"]
    svg = tmp_path / "curves.svg"
    code, out = run(capsys, "eval", "--router", str(model), "--outcomes", str(test), "--plot", str(svg))
    assert code == 0, out
    rows = {line.split("  ")[0].strip(): line for line in out.splitlines()}
    for name in ("router", "prompt-blind prior (training means)", "random mixing (best/cheapest)",
                 "best single: big", "cheapest: small", "oracle (upper bound)"):  # fmt: skip
        assert any(k.startswith(name) for k in rows), (name, out)
    router_apgr = float(next(v for k, v in rows.items() if k == "router").split()[1])
    prior_apgr = float(next(v for k, v in rows.items() if k.startswith("prompt-blind")).split()[4])
    assert prior_apgr == pytest.approx(0.5)
    assert router_apgr > 0.6, out
    assert "$/1k req" in out and "cost/best" in out
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg") and any(el.tag.endswith("polyline") for el in root.iter())


def test_train_is_deterministic_for_a_seed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train = write_outcomes(tmp_path / "train.jsonl", 120, seed=3, signal=True)
    a, b = tmp_path / "a.erlm", tmp_path / "b.erlm"
    for out_path in (a, b):
        assert run(capsys, "train", "--outcomes", str(train), "--out", str(out_path), *FAST)[0] == 0
    assert a.read_bytes() == b.read_bytes()


def test_prompts_carrying_no_signal_ship_no_router_worse_than_the_prior(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgeroute.learn import router as R
    from edgeroute.learn import selection as S
    from edgeroute.learn import train as T

    data = R.Outcomes.load(write_outcomes(tmp_path / "noise.jsonl", 160, seed=4, signal=False))
    dense = T.length_matrix(data.prompts)
    space = S.SearchSpace(l2=(1e-5,), iters=(200,), inner_folds=2, outer_folds=2, seed=0)
    xs = S.featurize_sets(data.prompts, space.features)
    model, rep = S.nested(data, xs, dense, space, log=lambda _s: None)
    if rep.chosen.family == S.PRIOR:
        # the shipped file predicts each model's mean whatever the prompt
        pred = T.predict_matrix(model, xs["ngrams"], dense)
        assert np.allclose(pred, S.prior_means(data), atol=1e-9)
    else:
        assert rep.validation[rep.chosen.label()] >= rep.validation[S.PRIOR]
        assert np.mean(rep.outer_router) >= np.mean(rep.outer_prior)
    # and when the outer folds put the chosen model below the prior, the prior ships
    assert rep.fell_back == (rep.chosen.family == S.PRIOR and rep.validation[S.PRIOR] < max(rep.validation.values()))


def test_bad_rows_are_reported_with_their_line_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps({"prompt": "a", "model": "m", "score": 1.0, "cost_usd": 0.1}),
                '{"prompt": "b", "model": "m", "score": NaN}',
                json.dumps({"prompt": "c", "model": "m", "score": 1.5}),
                json.dumps({"prompt": "d", "score": 0.5}),
                "not json",
                json.dumps({"prompt": "e", "model": "m", "score": 0.5, "cost_usd": -1}),
            ]
        )
        + "\n"
    )
    code, out = run(capsys, "train", "--outcomes", str(path), "--out", str(tmp_path / "x.erlm"))
    assert code != 0
    for n, why in ((2, "score nan"), (3, "score 1.5"), (4, "'model'"), (5, "not JSON"), (6, "cost_usd")):
        assert f"line {n}: " in out and why in out, (n, out)
    assert "line 1:" not in out
    assert not (tmp_path / "x.erlm").exists()


def test_missing_or_foreign_router_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    test = write_outcomes(tmp_path / "t.jsonl", 10, seed=5, signal=True)
    code, out = run(capsys, "eval", "--router", str(tmp_path / "nope.erlm"), "--outcomes", str(test))
    assert code != 0 and out.strip().count("\n") == 0 and "not found" in out, out
    (tmp_path / "junk.erlm").write_bytes(b"GIF89a....")
    code, out = run(capsys, "eval", "--router", str(tmp_path / "junk.erlm"), "--outcomes", str(test))
    assert code != 0 and out.strip().count("\n") == 0 and "not a router model file" in out, out


def test_apgr_is_undefined_when_the_best_model_is_also_the_cheapest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = write_outcomes(tmp_path / "train.jsonl", 80, seed=6, signal=True, costs=(0.001, 0.01))
    model = tmp_path / "r.erlm"
    code, out = run(capsys, "train", "--outcomes", str(train), "--out", str(model), *FAST)
    assert code == 0, out
    assert "validation (quality" in out  # the criterion where there is nothing to trade
    code, out = run(capsys, "eval", "--router", str(model), "--outcomes", str(train))
    assert code == 0, out
    assert "APGR, CPT: undefined (the best model (big) is also the cheapest" in out
    router_row = next(line for line in out.splitlines() if line.startswith("router "))
    assert router_row.split()[1:4] == ["-", "-", "-"], router_row


@pytest.mark.parametrize("signal", ["group", "words"])
def test_the_inner_folds_choose_across_families_by_their_own_scores(signal: str) -> None:
    """`routellm_eval --nested --families`: with the outcome set by a group label the text does
    not show, the inner folds pick the group prior; set by words in the text, a text model."""
    import random

    from edgeroute.learn import routellm_eval as RE
    from edgeroute.learn import router as R
    from edgeroute.learn import selection as S
    from edgeroute.learn import train as T

    rng = random.Random(7)
    vocab = [f"w{i}" for i in range(40)]
    prompts, groups, rows = [], [], []
    for i in range(240):
        hard = i % 2 == 0
        words = rng.sample(vocab, 6) + (["integral", "proof"] if hard and signal == "words" else [])
        prompts.append(" ".join(words) + f" n{i}")
        groups.append("hard" if hard else "easy")
        rows.append([1.0, 0.0] if hard else [1.0, float(rng.random() < 0.9)])
    out = R.Outcomes(prompts, ["strong", "weak"], np.asarray(rows), [0.01, 0.001])
    sp = S.SearchSpace(l2=(3e-3,), iters=(25, 100), inner_folds=3)
    tr = list(range(200))
    xs = S.featurize_sets(prompts, sp.features)
    _, means = S.select(out, xs, T.length_matrix(prompts), tr, sp, "apgr")
    pick = RE._family_choice(out, prompts, groups if signal == "group" else ["all"] * len(prompts), tr, means, sp)
    if signal == "group":
        assert pick == RE.GROUP_PRIOR
    else:
        assert pick not in (S.PRIOR, RE.GROUP_PRIOR), pick


@pytest.mark.parametrize(("where", "wins"), [("middle of a long prompt", "words"), ("inside unique words", "ngrams")])
def test_the_inner_folds_choose_the_feature_set_by_their_own_scores(where: str, wins: str) -> None:
    """Set in the middle of a 2.4 KiB prompt, the outcome is visible to `words` (the first 4 KiB)
    and not to `ngrams` (1 KiB + 256 B); set by a fragment inside words each prompt spells
    differently, only `ngrams`' character 4-grams share it across prompts."""
    import random

    from edgeroute.learn import router as R
    from edgeroute.learn import selection as S
    from edgeroute.learn import train as T

    rng = random.Random(11)
    vocab = [f"w{i}" for i in range(60)]

    def filler(nbytes: int) -> str:
        return " ".join(rng.choice(vocab) for _ in range(nbytes // 4))

    def unique_word(mark: str) -> str:
        return "".join(rng.choice("abcdefghijklmnoprstuvwy") for _ in range(5)) + mark + str(rng.randint(0, 10**6))

    prompts, rows = [], []
    for i in range(240):
        hard = i % 2 == 0
        if where == "middle of a long prompt":
            text = filler(1200) + (" integral proof" * 10 + " " if hard else " ") + filler(1200)
        else:
            text = " ".join(unique_word("qzxv" if hard else "") for _ in range(8))
        prompts.append(text)
        rows.append([1.0, 0.0] if hard else [1.0, float(rng.random() < 0.9)])
    out = R.Outcomes(prompts, ["strong", "weak"], np.asarray(rows), [0.01, 0.001])
    sp = S.SearchSpace(l2=(1e-4,), iters=(100, 200), inner_folds=3, features=("ngrams", "words"))
    xs = S.featurize_sets(prompts, sp.features)
    chosen, means = S.select(out, xs, T.length_matrix(prompts), range(len(prompts)), sp, "apgr")
    assert chosen.family == S.LINEAR and chosen.features == wins, (chosen, means)
    best_of = {f: max(v for c, v in means.items() if c.features == f and c.family == S.LINEAR) for f in sp.features}
    assert best_of[wins] > best_of[next(f for f in sp.features if f != wins)] + 0.1, best_of


def test_a_router_on_its_own_feature_set_loads_in_the_core_and_predicts_as_python(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A `words` router does not share the task model's featurizer: the core featurizes the
    prompt twice (no fused pass) and must still predict what the Python reference does."""
    from edgeroute import _core
    from edgeroute.learn import selection as S
    from edgeroute.learn.model import LinearModel

    train = write_outcomes(tmp_path / "train.jsonl", 120, seed=3, signal=True)
    path = tmp_path / "words.erlm"
    code, out = run(capsys, "train", "--outcomes", str(train), "--out", str(path), "--features", "words", *FAST)
    assert code == 0, out
    assert "chose linear words" in out, out
    router = LinearModel.load(path)
    assert router.featurizer == S.FEATURE_SETS["words"] and router.meta["train"]["features"] == ["words"]
    models = Path(__file__).resolve().parents[1] / "edgeroute" / "models"
    spec = {
        "deployments": [{"name": "d", "provider": "openai", "model": "m"}],
        "models": [{"name": "m", "deployments": ["d"]}],
    }
    core = _core.Router(json.dumps(spec).encode(), (models / "task.erlm").read_bytes(), path.read_bytes())
    for prompt in ("question 7 about eigenvalue integrals 12", "question 8 about simple greetings 5", "x " * 3000):
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": prompt}]}).encode()
        got = dict(core.decide(body, explain=True).scores)
        want = router.predict_proba(prompt + "\n")  # the core reads the user text, a line each
        assert [got[m] for m in router.outputs] == pytest.approx(want, abs=1e-9), prompt[:40]
    code, out = run(capsys, "train", "--outcomes", str(train), "--out", str(path), "--features", "chars")
    assert code == 2 and "feature sets are a comma-separated list of ngrams, words" in out, out


def _diluted_signal(n: int, seed: int) -> tuple[list[str], list[list[float]]]:
    """The weak model fails where the prompt starts with "integral"; every prompt then carries
    5 to 600 tokens drawn from 12 filler words, so that counts over sqrt(n) dilute the
    signal by up to 10x with length while tf-idf (repeats saturate, the vector is
    normalised) keeps it about the same."""
    rng = random.Random(seed)
    filler = [f"f{i}" for i in range(12)]
    prompts, rows = [], []
    for i in range(n):
        hard = rng.random() < 0.5
        head = ("integral" if hard else rng.choice(["hello", "thanks"])) + f" n{i}"
        prompts.append(head + " " + " ".join(rng.choice(filler) for _ in range(rng.randint(5, 600))))
        rows.append([1.0, 0.0 if hard else float(rng.random() < 0.95)])
    return prompts, rows


def test_the_inner_folds_choose_tfidf_weighting_where_it_validates_better() -> None:
    """`words-tfidf` is chosen by the inner folds' own scores, like every other candidate,
    where the weighting helps: a signal word diluted by filler of varying length."""
    from edgeroute.learn import router as R
    from edgeroute.learn import selection as S
    from edgeroute.learn import train as T

    prompts, rows = _diluted_signal(240, seed=5)
    out = R.Outcomes(prompts, ["strong", "weak"], np.asarray(rows), [0.01, 0.001])
    sp = S.SearchSpace(l2=(1e-3,), iters=(50, 200), inner_folds=3, features=("words", "words-tfidf"))
    xs = S.featurize_sets(prompts, sp.features)
    chosen, means = S.select(out, xs, T.length_matrix(prompts), range(len(prompts)), sp, "apgr")
    assert chosen.family == S.LINEAR and chosen.features == "words-tfidf", (chosen, means)
    best_of = {f: max(v for c, v in means.items() if c.features == f and c.family == S.LINEAR) for f in sp.features}
    assert best_of["words-tfidf"] > best_of["words"] + 0.05, best_of
    # each fit's idf comes from its own training rows: prompts outside them change nothing
    x_fit, _, idf = S.design(xs, "words-tfidf", list(range(100)), list(range(100, 240)))
    counts = T.featurize_counts(prompts[:100], S.FEATURE_SETS["words-tfidf"])
    assert idf is not None and np.array_equal(idf, T.idf_of(counts))
    assert np.array_equal(x_fit.vals, T.tfidf_docs(counts, idf).vals)


@pytest.mark.parametrize(
    ("features", "log2", "min_df"), [("words-tfidf", 17, 0), ("words-tfidf-df2", 18, 2), ("ngrams-tfidf", 18, 2)]
)
def test_a_tfidf_router_file_loads_in_the_core_and_scores_as_python(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], features: str, log2: int, min_df: int
) -> None:
    """`router train --features words-tfidf` (and the sets with TF-IDF LR's vocabulary cut)
    writes a format 2 file with its idf table; the core scores prompts as the Python reference
    does (both the per-prompt spec and the numpy batch path), and `router eval` reads it. With
    the cut, a bucket in fewer than 2 training prompts has idf 0: words no training prompt had
    neither add to a prompt's score nor dilute it."""
    from edgeroute import _core
    from edgeroute.learn import router as R
    from edgeroute.learn import selection as S
    from edgeroute.learn import train as T
    from edgeroute.learn.features import bucket_ids
    from edgeroute.learn.model import FORMAT_TFIDF, LinearModel

    prompts, rows = _diluted_signal(160, seed=8)
    train = tmp_path / "train.jsonl"
    with train.open("w") as f:
        for p, (big, small) in zip(prompts, rows, strict=True):
            f.write(json.dumps({"prompt": p, "model": "big", "score": big, "cost_usd": 0.01}) + "\n")
            f.write(json.dumps({"prompt": p, "model": "small", "score": small, "cost_usd": 0.001}) + "\n")
    path = tmp_path / "tfidf.erlm"
    # one L2, weak enough that the toy signal moves the scores by more than 0.1 below
    args = ["--outcomes", str(train), "--out", str(path), "--features", features, *FAST, "--l2", "1e-3"]
    code, out = run(capsys, "train", *args)
    assert code == 0, out
    assert f"chose linear {features} " in out, out
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[4:8], "little")])
    assert header["format"] == FORMAT_TFIDF and header["weighting"] == "tfidf"
    router = LinearModel.load(path)
    assert router.featurizer == S.FEATURE_SETS[features] and len(router.idf) == 1 << log2
    assert max(router.idf) > 2.0 and (min(router.idf) >= 1.0 if not min_df else min(router.idf) == 0.0)
    # the stored idf is the whole training file's, zero exactly where fewer than min_df prompts had the bucket
    df = np.bincount(T.featurize_counts(prompts, router.featurizer).cols, minlength=1 << log2)
    assert np.array_equal(np.asarray(router.idf) == 0.0, df < min_df)
    assert LinearModel.from_bytes(router.to_bytes()).to_bytes() == raw
    models = Path(__file__).resolve().parents[1] / "edgeroute" / "models"
    spec = {
        "deployments": [{"name": "d", "provider": "openai", "model": "m"}],
        "models": [{"name": "m", "deployments": ["d"]}],
    }
    core = _core.Router(json.dumps(spec).encode(), (models / "task.erlm").read_bytes(), raw)
    probe = ["integral n5 f1 f1 f1 f2", "hello n9 " + "f3 " * 400, "thanks", "integral " * 50]
    batch = R.predict_scores(router, [p + "\n" for p in probe])
    small = []
    for prompt, row in zip(probe, batch, strict=True):
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": prompt}]}).encode()
        got = dict(core.decide(body, explain=True).scores)
        want = router.predict_proba(prompt + "\n")  # the core reads the user text, a line each
        assert [got[m] for m in router.outputs] == pytest.approx(want, abs=1e-9), prompt[:40]
        assert list(row) == pytest.approx(want, abs=1e-6), prompt[:40]
        small.append(got["small"])
    assert small[0] < small[1] - 0.1 and small[3] < small[2] - 0.1, small  # it learned the signal
    if min_df:  # unseen words change only the length inputs, not the text's part of the score
        plain = "integral n5 f1 "  # (the trailing space: " f1 " is a character 4-gram training saw)
        padded = plain + " ".join(f"zq{i}x" for i in range(40))
        hashed = [router.logits_from(bucket_ids(p, router.featurizer), [0.0, 0.0]) for p in (plain, padded)]
        no_cut = LinearModel.from_bytes(raw)
        no_cut.idf = [v or 5.0 for v in no_cut.idf]  # the same weights, unseen buckets at a high idf
        diluted = no_cut.logits_from(bucket_ids(padded, router.featurizer), [0.0, 0.0])
        assert hashed[1] == pytest.approx(hashed[0], abs=0.05) and abs(diluted[1] - hashed[0][1]) > 0.1
    test = tmp_path / "test.jsonl"
    test.write_text(train.read_text())
    code, out = run(capsys, "eval", "--router", str(path), "--outcomes", str(test))
    assert code == 0 and "router " in out, out


def test_parallel_fits_choose_and_score_exactly_as_one_process(tmp_path: Path) -> None:
    """`--jobs`: the inner fits spread over worker processes give the very scores one process does."""
    from edgeroute.learn import router as R
    from edgeroute.learn import selection as S
    from edgeroute.learn import train as T

    data = R.Outcomes.load(write_outcomes(tmp_path / "o.jsonl", 150, seed=9, signal=True))
    xs = S.featurize_sets(data.prompts, S.SearchSpace().features)
    dense = T.length_matrix(data.prompts)
    got = {}
    for jobs in (1, 2):
        sp = S.SearchSpace(l2=(1e-3, 1e-1), iters=(10, 40), inner_folds=2, jobs=jobs)
        got[jobs] = S.select(data, xs, dense, range(150), sp, "apgr")
    assert got[1] == got[2]
    assert len(got[1][1]) == 1 + len(sp.features) * 2 * 2  # the prior and every (features, L2, steps)
