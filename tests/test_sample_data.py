"""Tests for the bundled sample datasets / tokenizer and their generator."""

import ast
import json
import os
import re
import subprocess
import sys
from fractions import Fraction

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # allow plain `pytest` without installing the package
    sys.path.insert(0, REPO_ROOT)

from peft_ds import sample_data  # noqa: E402
from peft_ds.prompts import generate_prompt  # noqa: E402

ASSETS = os.path.join(REPO_ROOT, "peft_ds", "assets")
MATH = os.path.join(ASSETS, "math_sample.json")
COMMONSENSE = os.path.join(ASSETS, "commonsense_sample.json")
TOKENIZER = os.path.join(ASSETS, "tiny_tokenizer.model")
ASSET_FILES = ["math_sample.json", "commonsense_sample.json", "tiny_tokenizer.model"] + [
    f"eval/{name}/test.json" for name in sorted(os.listdir(os.path.join(ASSETS, "eval")))]
MAX_JSON_BYTES = 1_500_000

NUM = r"\d+(?:\.\d+)?"
EQUATION = re.compile(rf"({NUM}(?:\s*[-+*/]\s*{NUM})+)\s*=\s*({NUM})")
FINAL = re.compile(rf"The answer is ({NUM})\.$")
FINAL_LETTER = re.compile(r"The answer is ([A-E])\.$")
CHOICES = re.compile(
    rf" Answer Choices: \(A\) ({NUM}) \(B\) ({NUM}) \(C\) ({NUM}) \(D\) ({NUM}) \(E\) ({NUM})$"
)


def _evaluate(expr):
    """Independent exact evaluator for `a op b op c` (numbers and + - * / only)."""

    def ev(node):
        if isinstance(node, ast.BinOp):
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Add):
                return left + right
            if isinstance(node.op, ast.Sub):
                return left - right
            if isinstance(node.op, ast.Mult):
                return left * right
            if isinstance(node.op, ast.Div):
                return left / right
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return Fraction(str(node.value))
        raise AssertionError(f"unexpected expression {expr!r}")

    return ev(ast.parse(expr, mode="eval").body)


def _load(path):
    with open(path, "rb") as f:
        return json.loads(f.read().decode("utf-8"))


@pytest.fixture(scope="module")
def math_records():
    return _load(MATH)


@pytest.fixture(scope="module")
def commonsense_records():
    return _load(COMMONSENSE)


@pytest.fixture(scope="module")
def sp():
    spm = pytest.importorskip("sentencepiece")
    return spm.SentencePieceProcessor(model_file=TOKENIZER)


# --------------------------------------------------------------------------- #
# determinism / shipped assets
# --------------------------------------------------------------------------- #


def test_regenerated_assets_are_byte_identical(tmp_path):
    out = tmp_path / "assets"
    rc = sample_data.main(["--out-dir", str(out)])
    assert rc == 0
    for name in ASSET_FILES:
        with open(os.path.join(ASSETS, name), "rb") as f:
            shipped = f.read()
        with open(out / name, "rb") as f:
            fresh = f.read()
        assert fresh == shipped, f"{name} differs from a fresh regeneration"


def test_json_sizes():
    for path in (MATH, COMMONSENSE):
        assert 0 < os.path.getsize(path) < MAX_JSON_BYTES


def test_cli_help():
    res = subprocess.run([sys.executable, "-m", "peft_ds.sample_data", "--help"], cwd=REPO_ROOT,
                         capture_output=True, text=True, check=True)
    assert "--out-dir" in res.stdout and "--seed" in res.stdout


# --------------------------------------------------------------------------- #
# math
# --------------------------------------------------------------------------- #


def _last_number(text):
    return re.findall(NUM, text)[-1]


def _check_equations(output):
    """Every written `a op b = c` must hold; returns the results in order."""
    results = []
    for m in EQUATION.finditer(output):
        lhs, rhs = m.group(1), m.group(2)
        assert _evaluate(lhs) == Fraction(rhs), f"wrong arithmetic {lhs} = {rhs} in {output!r}"
        results.append(Fraction(rhs))
    assert results, f"no arithmetic written out in {output!r}"
    return results


def test_math_records(math_records):
    assert len(math_records) == 3000
    assert len({r["instruction"] for r in math_records}) == len(math_records)
    n_choice = 0
    for r in math_records:
        assert list(r) == ["instruction", "input", "output", "answer"]
        assert all(isinstance(v, str) for v in r.values())
        assert r["input"] == ""
        assert r["instruction"].strip() and r["output"].strip()
        results = _check_equations(r["output"])
        choices = CHOICES.search(r["instruction"])
        if choices:
            n_choice += 1
            m = FINAL_LETTER.search(r["output"])
            assert m, r["output"]
            assert r["answer"] == m.group(1)
            values = [Fraction(v) for v in choices.groups()]
            assert len(set(values)) == 5
            # the chosen option is the value the rationale computed last
            assert values["ABCDE".index(r["answer"])] == results[-1]
        else:
            assert "Answer Choices" not in r["instruction"]
            m = FINAL.search(r["output"])
            assert m, r["output"]
            final = m.group(1)
            # last number in the output == numeric answer
            assert _last_number(r["output"]) == final
            assert float(r["answer"]) == float(final)
            assert Fraction(final) == results[-1]
            # answer formatting: float repr, e.g. "42.0"; rationale: integers without decimals
            assert r["answer"] == repr(float(r["answer"]))
            if Fraction(final).denominator == 1:
                assert "." not in final and r["answer"] == f"{final}.0"
    assert 0.05 * len(math_records) <= n_choice <= 0.15 * len(math_records)


# --------------------------------------------------------------------------- #
# commonsense
# --------------------------------------------------------------------------- #

FORMATS = {
    "true/false": ["true", "false"],
    "solution1/solution2": ["solution1", "solution2"],
    "option1/option2": ["option1", "option2"],
    "answer1/answer2/answer3": ["answer1", "answer2", "answer3"],
    "answer1/answer2/answer3/answer4": ["answer1", "answer2", "answer3", "answer4"],
    "ending1/ending2/ending3/ending4": ["ending1", "ending2", "ending3", "ending4"],
}


def _option_text(instruction, label):
    """Text of e.g. `Answer2:` up to the next label / blank line."""
    cap = label[:-1].capitalize() + label[-1]
    m = re.search(rf"{cap}: (.*?)(?= [A-Z][a-z]+\d: |\n\n|$)", instruction)
    assert m, (label, instruction)
    return m.group(1)


def test_commonsense_records(commonsense_records):
    assert len(commonsense_records) == 1000
    seen_formats = set()
    for r in commonsense_records:
        assert list(r) == ["instruction", "input", "output", "answer"]
        assert r["input"] == ""
        m = re.search(r"\n\nAnswer format: (\S+)$", r["instruction"])
        assert m, r["instruction"]
        fmt = m.group(1)
        assert fmt in FORMATS, fmt
        seen_formats.add(fmt)
        assert r["answer"] in FORMATS[fmt]
        assert r["output"] == f"the correct answer is {r['answer']}"
        if fmt != "true/false":
            for label in FORMATS[fmt]:
                assert _option_text(r["instruction"], label)
    assert seen_formats == set(FORMATS)


def test_commonsense_numeric_facts_are_right(commonsense_records):
    n = 0
    for r in commonsense_records:
        ins = r["instruction"]
        m = re.search(r"question: is (\d+) greater than (\d+)\?", ins)
        if m:
            assert r["answer"] == ("true" if int(m.group(1)) > int(m.group(2)) else "false")
            n += 1
        if "Which number is the largest?" in ins:
            opts = [int(_option_text(ins, f"answer{i}")) for i in range(1, 5)]
            assert int(_option_text(ins, r["answer"])) == max(opts)
            n += 1
    assert n > 0


def test_commonsense_answers_balanced(commonsense_records):
    boolq = [r["answer"] for r in commonsense_records if r["answer"] in ("true", "false")]
    assert 0.3 < boolq.count("true") / len(boolq) < 0.7


# --------------------------------------------------------------------------- #
# tokenizer
# --------------------------------------------------------------------------- #


def test_tokenizer_special_ids(sp):
    assert sp.vocab_size() == 1024
    assert sp.unk_id() == 0 and sp.id_to_piece(0) == "<unk>"
    assert sp.bos_id() == 1 and sp.id_to_piece(1) == "<s>"
    assert sp.eos_id() == 2 and sp.id_to_piece(2) == "</s>"
    assert sp.pad_id() == -1
    assert sp.id_to_piece(3) == "<0x00>"  # byte fallback pieces follow the specials


def test_tokenizer_round_trips_prompts(sp, math_records, commonsense_records):
    records = math_records[:10] + commonsense_records[:9]
    records.append(dict(commonsense_records[0], input="some extra context"))
    assert len(records) == 20
    for rec in records:
        text = generate_prompt(rec)
        assert "\n" + " " * 16 + "### Instruction:\n" in text
        if not rec["input"]:
            assert "the request.  \n" in text
        ids = sp.encode(text)
        assert sp.unk_id() not in ids
        assert sp.decode(ids) == text
        assert sp.encode(text, add_bos=True, add_eos=True) == [1] + ids + [2]
