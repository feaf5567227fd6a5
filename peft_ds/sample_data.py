"""Deterministic generator for the small bundled sample datasets and tokenizer.

Produces, in ``peft_ds/assets/`` by default:

* ``math_sample.json`` -- arithmetic word problems in the LLM-Adapters *Math10K*
  record format ``{"instruction", "input", "output", "answer"}``.  Most are
  GSM8K-style (rationale with the arithmetic written out, ending in
  ``"The answer is N."``, ``answer`` like ``"42.0"``); about 10% are AQuA-style
  multiple choice (``"Answer Choices: (A) .. (E) .."``, answer is the letter).
* ``commonsense_sample.json`` -- simple synthetic questions in the
  *Commonsense170K* formats (boolq, piqa, siqa, hellaswag, winogrande, ARC, OBQA).
* ``tiny_tokenizer.model`` -- a 1024-piece SentencePiece BPE model with LLaMA
  conventions (unk=0, bos=1, eos=2, no pad, byte fallback, identity
  normalisation, split digits, whitespace kept verbatim), trained on both sample
  files rendered through :func:`peft_ds.prompts.generate_prompt`.
* ``tiny_tokenizer.json`` -- a 1024-token byte-level BPE in the Hugging Face
  ``tokenizers`` format, as LLaMA-3 and Qwen2 ship theirs (``tokenizer.json``, no
  ``tokenizer.model``): LLaMA-3's pre-tokenizer pattern, ids 0-2 ``<|pad|>``,
  ``<|begin_of_text|>`` (put before every text) and ``<|end_of_text|>``, trained
  on the same prompts.

Everything is a pure function of ``--seed``; re-running produces byte-identical
files.  Every arithmetic statement ``a op b ... = c`` written in a rationale is
evaluated exactly (with :class:`fractions.Fraction`) when it is produced and
again over the finished text, and each template's final answer is cross-checked
against an independent direct computation.

Usage::

    python -m peft_ds.sample_data [--out-dir DIR] [--seed 0]
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import math
import operator
import os
import random
import re
from fractions import Fraction
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from peft_ds.prompts import generate_prompt

DEFAULT_OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
MATH_FILE = "math_sample.json"
COMMONSENSE_FILE = "commonsense_sample.json"
TOKENIZER_FILE = "tiny_tokenizer.model"
TOKENIZER_JSON_FILE = "tiny_tokenizer.json"

DEFAULT_SEED = 0
DEFAULT_N_MATH = 3000
DEFAULT_N_COMMONSENSE = 1000
DEFAULT_VOCAB_SIZE = 1024
AQUA_FRACTION = 0.1

Record = Dict[str, str]

# --------------------------------------------------------------------------- #
# exact arithmetic helpers
# --------------------------------------------------------------------------- #

_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}

_NUM = r"\d+(?:\.\d+)?"
# "a op b [op c ...] = r" as written in rationales (operators: + - * /).
EQUATION_RE = re.compile(rf"({_NUM}(?:\s*[-+*/]\s*{_NUM})+)\s*=\s*({_NUM})")
NUMBER_RE = re.compile(_NUM)


def calc(expr: str) -> Fraction:
    """Exactly evaluate an arithmetic expression of numbers, + - * / and parentheses."""

    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return Fraction(str(node.value))
        raise ValueError(f"unsupported expression: {expr!r}")

    return ev(ast.parse(expr, mode="eval"))


def fmt(x) -> str:
    """Format a number the way rationales do: integers without decimals."""
    x = Fraction(x)
    if x.denominator == 1:
        return str(x.numerator)
    return repr(float(x))


def answer_str(x) -> str:
    """Math10K ``answer`` field: float repr, e.g. ``"42.0"``."""
    return repr(float(Fraction(x)))


def eq(expr: str) -> Tuple[str, Fraction]:
    """Return (``"expr = value"``, value) for an arithmetic expression."""
    value = calc(expr)
    return f"{expr} = {fmt(value)}", value


def check_equations(text: str) -> int:
    """Re-evaluate every ``a op b = c`` in ``text``; raise if any is wrong. Returns count."""
    n = 0
    for m in EQUATION_RE.finditer(text):
        lhs, rhs = m.group(1), m.group(2)
        if calc(lhs) != Fraction(rhs):
            raise AssertionError(f"wrong arithmetic {lhs} = {rhs} in {text!r}")
        n += 1
    return n


# --------------------------------------------------------------------------- #
# math word problems (Math10K / GSM8K style)
# --------------------------------------------------------------------------- #

NAMES = [
    "Alice", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jack",
    "Kofi", "Lena", "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara",
    "Umar", "Vera", "Wei", "Yara", "Zoe",
]
# (singular, plural, min price, max price) in whole dollars
SHOP_ITEMS = [
    ("notebook", "notebooks", 2, 9), ("pen", "pens", 1, 4), ("book", "books", 8, 25),
    ("shirt", "shirts", 10, 30), ("toy car", "toy cars", 3, 12), ("mug", "mugs", 4, 11),
    ("candle", "candles", 2, 8), ("ticket", "tickets", 5, 20), ("plant", "plants", 6, 15),
    ("sandwich", "sandwiches", 3, 9),
]
COUNT_ITEMS = [
    ("apple", "apples"), ("marble", "marbles"), ("sticker", "stickers"), ("cookie", "cookies"),
    ("stamp", "stamps"), ("card", "cards"), ("pencil", "pencils"), ("seashell", "seashells"),
    ("balloon", "balloons"), ("cupcake", "cupcakes"),
]
CONTAINERS = ["box", "bag", "jar", "basket", "crate"]
VEHICLES = [("car", 40, 90), ("bus", 30, 70), ("train", 60, 120), ("bike", 10, 25), ("truck", 35, 80)]


class MathProblem:
    """Accumulates rationale lines; every equation goes through :func:`eq`."""

    def __init__(self) -> None:
        self.lines: List[str] = []

    def step(self, template: str, expr: str) -> Fraction:
        """``template`` contains ``{}`` where ``"expr = value"`` is inserted."""
        text, value = eq(expr)
        self.lines.append(template.format(text))
        return value

    def say(self, line: str) -> None:
        self.lines.append(line)

    def finish(self, question: str, value: Fraction, expected) -> Record:
        # independent direct computation must agree with the written rationale
        if Fraction(value) != Fraction(expected):
            raise AssertionError(f"template mismatch {value} != {expected}: {question}")
        output = "\n".join(self.lines + [f"The answer is {fmt(value)}."])
        return {"instruction": question, "input": "", "output": output, "answer": answer_str(value)}


def _two_names(rng: random.Random) -> Tuple[str, str]:
    a, b = rng.sample(NAMES, 2)
    return a, b


def t_shopping_change(rng: random.Random) -> Record:
    name = rng.choice(NAMES)
    sing, plur, lo, hi = rng.choice(SHOP_ITEMS)
    n, p = rng.randint(2, 9), rng.randint(lo, hi)
    bill = next(b for b in (10, 20, 50, 100, 200, 500) if b > n * p)
    q = (f"{name} buys {n} {plur} that cost {p} dollars each. {name} pays with a "
         f"{bill}-dollar bill. How much change does {name} get back?")
    m = MathProblem()
    cost = m.step(f"The {plur} cost {{}} dollars in total.", f"{n} * {p}")
    change = m.step("So the change is {} dollars.", f"{bill} - {fmt(cost)}")
    return m.finish(q, change, bill - n * p)


def t_shopping_two_items(rng: random.Random) -> Record:
    name = rng.choice(NAMES)
    (s1, p1n, lo1, hi1), (s2, p2n, lo2, hi2) = rng.sample(SHOP_ITEMS, 2)
    a, pa = rng.randint(2, 6), rng.randint(lo1, hi1)
    b, pb = rng.randint(2, 6), rng.randint(lo2, hi2)
    q = (f"At the market, {name} buys {a} {p1n} for {pa} dollars each and {b} {p2n} for "
         f"{pb} dollars each. How much does {name} spend in total?")
    m = MathProblem()
    c1 = m.step(f"The {p1n} cost {{}} dollars.", f"{a} * {pa}")
    c2 = m.step(f"The {p2n} cost {{}} dollars.", f"{b} * {pb}")
    total = m.step(f"In total, {name} spends {{}} dollars.", f"{fmt(c1)} + {fmt(c2)}")
    return m.finish(q, total, a * pa + b * pb)


def t_ages(rng: random.Random) -> Record:
    a, b = _two_names(rng)
    age_b, diff, years = rng.randint(4, 40), rng.randint(2, 15), rng.randint(2, 12)
    q = (f"{a} is {diff} years older than {b}. {b} is {age_b} years old now. "
         f"How old will {a} be in {years} years?")
    m = MathProblem()
    age_a = m.step(f"{a} is {{}} years old now.", f"{age_b} + {diff}")
    later = m.step(f"In {years} years, {a} will be {{}} years old.", f"{fmt(age_a)} + {years}")
    return m.finish(q, later, age_b + diff + years)


def t_ages_ratio(rng: random.Random) -> Record:
    a, b = _two_names(rng)
    age_b, k, years = rng.randint(3, 12), rng.randint(2, 4), rng.randint(1, 9)
    times = {2: "twice", 3: "three times", 4: "four times"}[k]
    q = (f"{a} is {times} as old as {b}. If {b} is {age_b} years old, what will be the sum "
         f"of their ages in {years} years?")
    m = MathProblem()
    age_a = m.step(f"{a} is {{}} years old.", f"{k} * {age_b}")
    now = m.step("Their ages now add up to {}.", f"{fmt(age_a)} + {age_b}")
    later = m.step(f"In {years} years each of them is {years} years older, so the sum will be {{}}.",
                   f"{fmt(now)} + {years} + {years}")
    return m.finish(q, later, k * age_b + age_b + 2 * years)


def t_distance(rng: random.Random) -> Record:
    veh, lo, hi = rng.choice(VEHICLES)
    speed, hours = rng.randint(lo, hi), rng.randint(2, 8)
    q = (f"A {veh} travels at {speed} kilometers per hour for {hours} hours. "
         f"How many kilometers does it travel?")
    m = MathProblem()
    dist = m.step("Distance is speed times time, so the distance is {} kilometers.", f"{speed} * {hours}")
    return m.finish(q, dist, speed * hours)


def t_round_trip(rng: random.Random) -> Record:
    name = rng.choice(NAMES)
    one_way, days = rng.randint(3, 30), rng.randint(3, 7)
    q = (f"{name} lives {one_way} kilometers from work and drives there and back every workday. "
         f"How many kilometers does {name} drive in {days} workdays?")
    m = MathProblem()
    per_day = m.step("Each day the round trip is {} kilometers.", f"{one_way} * 2")
    total = m.step(f"In {days} days, {name} drives {{}} kilometers.", f"{fmt(per_day)} * {days}")
    return m.finish(q, total, one_way * 2 * days)


def t_sharing(rng: random.Random) -> Record:
    name = rng.choice(NAMES)
    sing, plur = rng.choice(COUNT_ITEMS)
    friends, each = rng.randint(2, 8), rng.randint(2, 15)
    total = friends * each
    q = (f"{name} has {total} {plur} and shares them equally among {friends} friends. "
         f"How many {plur} does each friend get?")
    m = MathProblem()
    share = m.step("Each friend gets {} " + plur + ".", f"{total} / {friends}")
    return m.finish(q, share, total // friends)


def t_sharing_keep(rng: random.Random) -> Record:
    name = rng.choice(NAMES)
    sing, plur = rng.choice(COUNT_ITEMS)
    keep, friends, each = rng.randint(2, 12), rng.randint(2, 6), rng.randint(3, 12)
    total = keep + friends * each
    q = (f"{name} has {total} {plur}. {name} keeps {keep} and divides the rest equally among "
         f"{friends} friends. How many {plur} does each friend get?")
    m = MathProblem()
    rest = m.step(f"After keeping {keep}, there are {{}} {plur} left.", f"{total} - {keep}")
    share = m.step(f"Each friend gets {{}} {plur}.", f"{fmt(rest)} / {friends}")
    return m.finish(q, share, (total - keep) // friends)


def t_discount(rng: random.Random) -> Record:
    name = rng.choice(NAMES)
    sing, plur, _, _ = rng.choice(SHOP_ITEMS)
    pct = rng.choice([10, 20, 25, 30, 40, 50, 60, 75])
    unit = 100 // math.gcd(pct, 100)  # price multiple of this makes the discount whole
    price = unit * rng.randint(max(1, 20 // unit), max(2, 300 // unit))
    q = (f"A {sing} normally costs {price} dollars. It is on sale for {pct}% off. "
         f"How much does {name} pay for the {sing}?")
    m = MathProblem()
    off = m.step("The discount is {} dollars.", f"{price} * {pct} / 100")
    pay = m.step(f"{name} pays {{}} dollars.", f"{price} - {fmt(off)}")
    return m.finish(q, pay, price * (100 - pct) // 100)


def t_percent_of_group(rng: random.Random) -> Record:
    pct = rng.choice([10, 20, 25, 40, 50, 60, 75, 80])
    unit = 100 // math.gcd(pct, 100)
    total = unit * rng.randint(max(1, 20 // unit), max(2, 400 // unit))
    group, yes_txt, no_txt = rng.choice([
        ("students in a school", "walk to school", "do not walk to school"),
        ("people at a concert", "bought a T-shirt", "did not buy a T-shirt"),
        ("trees in a park", "are oaks", "are not oaks"),
        ("cars in a parking lot", "are red", "are not red"),
        ("books in a library", "are novels", "are not novels"),
    ])
    q = f"There are {total} {group}. {pct}% of them {yes_txt}. How many of them {no_txt}?"
    m = MathProblem()
    yes = m.step(f"{pct}% of {total} is {{}}.", f"{total} * {pct} / 100")
    no = m.step(f"So {{}} of them {no_txt}.", f"{total} - {fmt(yes)}")
    return m.finish(q, no, total - total * pct // 100)


def t_savings(rng: random.Random) -> Record:
    name = rng.choice(NAMES)
    per_week, weeks = rng.randint(3, 25), rng.randint(3, 12)
    spend = rng.randint(1, per_week * weeks - 1)
    gift = rng.randint(5, 50)
    q = (f"{name} saves {per_week} dollars every week for {weeks} weeks. Then {name} spends "
         f"{spend} dollars on a game and gets {gift} dollars as a birthday gift. "
         f"How much money does {name} have now?")
    m = MathProblem()
    saved = m.step(f"{name} saves {{}} dollars.", f"{per_week} * {weeks}")
    after = m.step("After buying the game, {} dollars are left.", f"{fmt(saved)} - {spend}")
    final = m.step(f"With the gift, {name} has {{}} dollars.", f"{fmt(after)} + {gift}")
    return m.finish(q, final, per_week * weeks - spend + gift)


def t_boxes(rng: random.Random) -> Record:
    name = rng.choice(NAMES)
    sing, plur = rng.choice(COUNT_ITEMS)
    cont = rng.choice(CONTAINERS)
    nb, per = rng.randint(2, 12), rng.randint(4, 24)
    give = rng.randint(1, nb * per - 1)
    cont_pl = cont + ("es" if cont.endswith("x") else "s")
    q = (f"{name} has {nb} {cont_pl} with {per} {plur} in each {cont}. {name} gives away "
         f"{give} {plur}. How many {plur} does {name} have left?")
    m = MathProblem()
    total = m.step(f"{name} starts with {{}} {plur}.", f"{nb} * {per}")
    left = m.step(f"After giving some away, {name} has {{}} {plur} left.", f"{fmt(total)} - {give}")
    return m.finish(q, left, nb * per - give)


def t_fence(rng: random.Random) -> Record:
    name = rng.choice(NAMES)
    length, width, cost = rng.randint(4, 30), rng.randint(3, 20), rng.randint(2, 12)
    q = (f"{name}'s rectangular garden is {length} meters long and {width} meters wide. "
         f"Fencing costs {cost} dollars per meter. How much does it cost to fence the whole garden?")
    m = MathProblem()
    half = m.step("Length plus width is {} meters.", f"{length} + {width}")
    perim = m.step("The perimeter is {} meters.", f"2 * {fmt(half)}")
    total = m.step("The fence costs {} dollars.", f"{fmt(perim)} * {cost}")
    return m.finish(q, total, 2 * (length + width) * cost)


def t_area_tiles(rng: random.Random) -> Record:
    length, width = rng.randint(3, 15), rng.randint(2, 12)
    per_box = rng.choice([2, 3, 4, 5, 6])
    # make the area a multiple of per_box
    while (length * width) % per_box:
        length += 1
    q = (f"A floor is {length} meters long and {width} meters wide. One box of tiles covers "
         f"{per_box} square meters. How many boxes are needed to cover the floor?")
    m = MathProblem()
    area = m.step("The area is {} square meters.", f"{length} * {width}")
    boxes = m.step("The number of boxes is {}.", f"{fmt(area)} / {per_box}")
    return m.finish(q, boxes, length * width // per_box)


def t_wages(rng: random.Random) -> Record:
    name = rng.choice(NAMES)
    hours, days, rate = rng.randint(2, 9), rng.randint(2, 6), rng.randint(8, 30)
    q = (f"{name} works {hours} hours a day for {days} days and earns {rate} dollars per hour. "
         f"How much does {name} earn?")
    m = MathProblem()
    total_h = m.step(f"{name} works {{}} hours.", f"{hours} * {days}")
    pay = m.step(f"{name} earns {{}} dollars.", f"{fmt(total_h)} * {rate}")
    return m.finish(q, pay, hours * days * rate)


def t_recipe(rng: random.Random) -> Record:
    name = rng.choice(NAMES)
    cups, batch, mult = rng.randint(2, 5), rng.choice([6, 8, 10, 12, 20, 24]), rng.randint(2, 6)
    want = batch * mult
    q = (f"A recipe uses {cups} cups of flour to make {batch} muffins. {name} wants to make "
         f"{want} muffins. How many cups of flour does {name} need?")
    m = MathProblem()
    batches = m.step(f"{name} needs to make {{}} batches.", f"{want} / {batch}")
    flour = m.step("That needs {} cups of flour.", f"{fmt(batches)} * {cups}")
    return m.finish(q, flour, cups * want // batch)


def t_collection(rng: random.Random) -> Record:
    name = rng.choice(NAMES)
    sing, plur = rng.choice(COUNT_ITEMS)
    start, per_month, months = rng.randint(5, 80), rng.randint(2, 15), rng.randint(2, 12)
    q = (f"{name} has {start} {plur}. Every month {name} collects {per_month} more. "
         f"How many {plur} will {name} have after {months} months?")
    m = MathProblem()
    new = m.step(f"{name} collects {{}} new {plur}.", f"{per_month} * {months}")
    total = m.step(f"{name} will have {{}} {plur}.", f"{start} + {fmt(new)}")
    return m.finish(q, total, start + per_month * months)


def t_reading(rng: random.Random) -> Record:
    name = rng.choice(NAMES)
    per_day, days = rng.randint(5, 40), rng.randint(2, 10)
    pages = per_day * days + rng.randint(10, 200)
    q = (f"A book has {pages} pages. {name} reads {per_day} pages every day. "
         f"How many pages are left after {days} days?")
    m = MathProblem()
    read = m.step(f"{name} reads {{}} pages.", f"{per_day} * {days}")
    left = m.step("There are {} pages left.", f"{pages} - {fmt(read)}")
    return m.finish(q, left, pages - per_day * days)


def t_tickets(rng: random.Random) -> Record:
    adults, kids = rng.randint(1, 6), rng.randint(1, 8)
    pa, pk = rng.randint(8, 25), rng.randint(3, 12)
    q = (f"Tickets for a museum cost {pa} dollars for adults and {pk} dollars for children. "
         f"A group of {adults} adults and {kids} children visits. How much do they pay?")
    m = MathProblem()
    ca = m.step("Adult tickets cost {} dollars.", f"{adults} * {pa}")
    ck = m.step("Child tickets cost {} dollars.", f"{kids} * {pk}")
    total = m.step("Together they pay {} dollars.", f"{fmt(ca)} + {fmt(ck)}")
    return m.finish(q, total, adults * pa + kids * pk)


def t_average(rng: random.Random) -> Record:
    name = rng.choice(NAMES)
    n = rng.choice([3, 4, 5])
    scores = [rng.randint(55, 100) for _ in range(n - 1)]
    avg_target = rng.randint(60, 95)
    last = avg_target * n - sum(scores)
    while not 40 <= last <= 100:  # keep scores plausible
        scores = [rng.randint(55, 100) for _ in range(n - 1)]
        last = avg_target * n - sum(scores)
    scores.append(last)
    listed = ", ".join(str(s) for s in scores[:-1]) + f" and {scores[-1]}"
    q = f"{name} scored {listed} on {n} tests. What is {name}'s average score?"
    m = MathProblem()
    total = m.step("The total score is {}.", " + ".join(str(s) for s in scores))
    avg = m.step("The average is {}.", f"{fmt(total)} / {n}")
    return m.finish(q, avg, Fraction(sum(scores), n))


GSM_TEMPLATES: List[Callable[[random.Random], Record]] = [
    t_shopping_change, t_shopping_two_items, t_ages, t_ages_ratio, t_distance, t_round_trip,
    t_sharing, t_sharing_keep, t_discount, t_percent_of_group, t_savings, t_boxes, t_fence,
    t_area_tiles, t_wages, t_recipe, t_collection, t_reading, t_tickets, t_average,
]


# ---- AQuA-style multiple choice ------------------------------------------- #

LETTERS = "ABCDE"


def _choices(rng: random.Random, correct: int, spread: int) -> Tuple[List[int], str]:
    """Five distinct positive integers including ``correct``, sorted ascending.

    The correct letter is drawn uniformly (as far as ``correct`` leaves room for
    smaller positive distractors) so the answers are not biased towards (C).
    """
    spread = max(spread, 5)
    k = min(rng.randrange(5), correct - 1)  # number of options below the answer
    below = rng.sample(range(max(1, correct - spread), correct), k)
    above = rng.sample(range(correct + 1, correct + spread + 1), 4 - k)
    ordered = sorted(below + [correct] + above)
    return ordered, LETTERS[ordered.index(correct)]


def _aqua_finish(m: MathProblem, question: str, value: Fraction, expected, spread: int,
                 rng: random.Random) -> Record:
    if Fraction(value) != Fraction(expected) or Fraction(value).denominator != 1:
        raise AssertionError(f"AQuA template mismatch {value} != {expected}: {question}")
    opts, letter = _choices(rng, int(value), spread)
    choices = " ".join(f"({L}) {o}" for L, o in zip(LETTERS, opts))
    instruction = f"{question} Answer Choices: {choices}"
    output = "\n".join(m.lines + [f"The answer is {letter}."])
    return {"instruction": instruction, "input": "", "output": output, "answer": letter}


def a_train(rng: random.Random) -> Record:
    speed, minutes = rng.choice([36, 54, 72, 90, 108, 126, 144]), rng.choice([5, 10, 15, 20, 30, 40])
    q = (f"A train runs at a speed of {speed} km/hr. How many meters does it cover in "
         f"{minutes} minutes?")
    m = MathProblem()
    mpm = m.step("Speed in meters per minute = {}.", f"{speed} * 1000 / 60")
    dist = m.step(f"Distance in {minutes} minutes = {{}} meters.", f"{fmt(mpm)} * {minutes}")
    return _aqua_finish(m, q, dist, speed * 1000 * minutes // 60, max(50, int(dist) // 5), rng)


def a_percent(rng: random.Random) -> Record:
    pct = rng.choice([5, 12, 15, 20, 25, 35, 45, 60, 80, 120, 150])
    unit = 100 // math.gcd(pct, 100)
    n = unit * rng.randint(max(1, 40 // unit), max(2, 800 // unit))
    q = f"What is {pct}% of {n}?"
    m = MathProblem()
    v = m.step(f"{pct}% of {n} = {{}}.", f"{n} * {pct} / 100")
    return _aqua_finish(m, q, v, n * pct // 100, max(5, int(v) // 4), rng)


def a_consecutive(rng: random.Random) -> Record:
    x = rng.randint(3, 90)
    s = 3 * x + 3
    q = f"The sum of three consecutive integers is {s}. What is the largest of them?"
    m = MathProblem()
    m.say("Let the integers be x, x + 1 and x + 2, so 3x + 3 = " + str(s) + ".")
    three_x = m.step("Then 3x = {}.", f"{s} - 3")
    xv = m.step("So x = {}.", f"{fmt(three_x)} / 3")
    largest = m.step("The largest integer is {}.", f"{fmt(xv)} + 2")
    return _aqua_finish(m, q, largest, x + 2, 4, rng)


def a_profit(rng: random.Random) -> Record:
    pct = rng.choice([10, 20, 25, 40, 50])
    unit = 100 // math.gcd(pct, 100)
    cost = unit * rng.randint(max(1, 50 // unit), max(2, 1000 // unit))
    q = (f"A shopkeeper buys an article for Rs. {cost} and sells it at a profit of {pct}%. "
         f"What is the selling price in rupees?")
    m = MathProblem()
    profit = m.step("Profit = {}.", f"{cost} * {pct} / 100")
    sp = m.step("Selling price = {}.", f"{cost} + {fmt(profit)}")
    return _aqua_finish(m, q, sp, cost * (100 + pct) // 100, max(10, int(profit)), rng)


def a_average_removed(rng: random.Random) -> Record:
    new_avg = rng.randint(10, 60)
    removed = rng.randint(5, 80)
    total = 4 * new_avg + removed
    while total % 5:
        removed += 1
        total = 4 * new_avg + removed
    avg5 = total // 5
    q = (f"The average of 5 numbers is {avg5}. If the number {removed} is removed, "
         f"what is the average of the remaining numbers?")
    m = MathProblem()
    t5 = m.step("Sum of the 5 numbers = {}.", f"5 * {avg5}")
    t4 = m.step("Sum of the remaining 4 numbers = {}.", f"{fmt(t5)} - {removed}")
    avg4 = m.step("Average of the remaining numbers = {}.", f"{fmt(t4)} / 4")
    return _aqua_finish(m, q, avg4, new_avg, 6, rng)


def a_work(rng: random.Random) -> Record:
    # pairs (a, b) whose combined time a*b/(a+b) is a whole number of days
    a, b = rng.choice([(6, 3), (12, 6), (10, 15), (20, 30), (4, 12), (12, 24), (30, 15),
                       (6, 12), (20, 5), (36, 12), (10, 40), (8, 24), (18, 9), (60, 20)])
    p, r = _two_names(rng)
    q = (f"{p} can finish a job in {a} days and {r} can finish it in {b} days. "
         f"In how many days can they finish it working together?")
    m = MathProblem()
    prod = m.step("Product of the times = {}.", f"{a} * {b}")
    tot = m.step("Sum of the times = {}.", f"{a} + {b}")
    days = m.step("Time together = {} days.", f"{fmt(prod)} / {fmt(tot)}")
    return _aqua_finish(m, q, days, Fraction(a * b, a + b), 4, rng)


AQUA_TEMPLATES: List[Callable[[random.Random], Record]] = [
    a_train, a_percent, a_consecutive, a_profit, a_average_removed, a_work,
]


def generate_math(n: int = DEFAULT_N_MATH, seed: int = DEFAULT_SEED) -> List[Record]:
    """``n`` unique Math10K-format records (about 10% AQuA-style multiple choice)."""
    rng = random.Random(seed)
    records: List[Record] = []
    seen = set()
    while len(records) < n:
        if rng.random() < AQUA_FRACTION:
            rec = rng.choice(AQUA_TEMPLATES)(rng)
        else:
            rec = rng.choice(GSM_TEMPLATES)(rng)
        if rec["instruction"] in seen:
            continue
        check_equations(rec["output"])
        seen.add(rec["instruction"])
        records.append(rec)
    return records


# --------------------------------------------------------------------------- #
# commonsense (Commonsense170K formats)
# --------------------------------------------------------------------------- #

# strictly increasing typical weight
BY_WEIGHT = ["a feather", "a paper clip", "a pencil", "an apple", "a brick", "a bicycle",
             "a horse", "a car", "an elephant", "a blue whale"]
# strictly increasing typical size (for "bigger"/"smaller")
BY_SIZE = ["an ant", "a coin", "a mouse", "a shoe", "a cat", "a chair", "a car", "a house",
           "a mountain", "the Moon"]
# tool -> purpose (each purpose is served only by its tool within this list)
TOOLS = [
    ("scissors", "cut paper"), ("a pencil", "write on paper"), ("a spoon", "eat soup"),
    ("a shovel", "dig a hole in the garden"), ("a hammer", "drive a nail into wood"),
    ("a flashlight", "see in the dark"), ("a clock", "tell the time"),
    ("an umbrella", "stay dry in the rain"), ("a key", "open a locked door"),
    ("a kettle", "boil water"), ("a broom", "sweep the floor"), ("a ladder", "reach a high shelf"),
    ("a thermometer", "measure temperature"), ("a toothbrush", "clean your teeth"),
]
ANIMAL_CLASS = {
    "dog": "mammal", "whale": "mammal", "bat": "mammal", "dolphin": "mammal", "cow": "mammal",
    "eagle": "bird", "penguin": "bird", "owl": "bird", "ostrich": "bird",
    "shark": "fish", "salmon": "fish", "tuna": "fish",
    "frog": "amphibian", "salamander": "amphibian",
    "snake": "reptile", "crocodile": "reptile", "lizard": "reptile", "turtle": "reptile",
}
CLASSES = ["mammal", "bird", "fish", "amphibian", "reptile"]
FLYERS = ["an eagle", "a bat", "a sparrow", "a pigeon", "a bee", "a butterfly"]
NON_FLYERS = ["a dog", "a horse", "a goldfish", "a snail", "a cow", "a turtle", "a rabbit", "a frog"]
STATES = {"ice": "solid", "a rock": "solid", "steam": "gas", "water": "liquid", "milk": "liquid",
          "air": "gas", "a wooden table": "solid", "orange juice": "liquid", "oxygen": "gas"}
PIQA = [
    ("To cool down a hot drink quickly, you can", "add a few ice cubes to it.",
     "put it in a warm oven."),
    ("To keep bread fresh for longer, you should", "store it in a closed bag.",
     "leave it open in the sun."),
    ("To dry wet hands, you can", "wipe them with a clean towel.", "dip them in a bowl of water."),
    ("To make a room darker during the day, you can", "close the curtains.",
     "turn on all the lights."),
    ("To find a word's meaning, you can", "look it up in a dictionary.",
     "count the letters in it."),
    ("To stop a door from slamming in the wind, you can", "put a doorstop in front of it.",
     "open every window in the house."),
    ("To water a plant, you should", "pour water into its soil.", "paint its leaves green."),
    ("To warm up cold hands, you can", "rub them together.", "hold a handful of snow."),
    ("To remove a stain from a shirt, you can", "wash it with soap and water.",
     "rub it with mud."),
    ("To see something very small, you can", "use a magnifying glass.", "close your eyes."),
    ("To carry many books at once, you can", "put them in a backpack.",
     "balance them on one finger."),
    ("To wake up on time, you can", "set an alarm clock.", "stay up all night watching TV."),
]
HELLASWAG = [
    ("A woman pours cereal into a bowl. She",
     "adds milk and eats it with a spoon.",
     ["throws the bowl into the swimming pool.", "starts to mow the bowl like a lawn.",
      "puts the cereal box on her head and sings."]),
    ("A man is standing at the sink with a toothbrush. He",
     "squeezes toothpaste onto the brush and brushes his teeth.",
     ["plants the toothbrush in the garden.", "drives the sink to the store.",
      "folds the toothbrush into a paper plane."]),
    ("A boy kicks a soccer ball toward the goal. The goalkeeper",
     "jumps and tries to catch the ball.",
     ["starts baking a cake on the field.", "reads a newspaper in the bathtub.",
      "paints the goal posts purple while sleeping."]),
    ("A girl puts on her helmet and gets on her bike. She",
     "starts pedaling down the street.",
     ["eats the helmet for lunch.", "swims across the bike.", "plugs the bike into the wall."]),
    ("A chef chops onions on a cutting board. He",
     "puts the chopped onions into a hot pan.",
     ["wears the cutting board as a hat.", "mails the onions to the moon.",
      "sings to the knife until it melts."]),
    ("It starts to rain while a woman is walking. She",
     "opens her umbrella.",
     ["takes off her shoes and climbs a cloud.", "turns the rain off with a remote control.",
      "starts ironing the sidewalk."]),
    ("A man finishes painting a wall. He",
     "cleans his brushes and closes the paint can.",
     ["eats the paint brush.", "paints the air until it turns blue.",
      "uses the wall as a boat."]),
    ("A child blows out the candles on a birthday cake. The guests",
     "clap and cut the cake.",
     ["light the cake on fire again and leave.", "start digging a tunnel under the table.",
      "put the cake in the washing machine."]),
]
WINO_PAIRS = [  # (bigger thing, smaller container)
    ("trophy", "suitcase"), ("couch", "doorway"), ("watermelon", "lunchbox"), ("ball", "cup"),
    ("bed", "elevator"), ("piano", "car"), ("pumpkin", "backpack"), ("tree", "pot"),
]


def _multi(rng: random.Random, question: str, correct: str, wrong: Sequence[str], n_opts: int,
           label: str, header: str) -> Record:
    """``"<header>: <q>\n\nLabel1: .. Label2: ..\n\nAnswer format: label1/label2/.."``."""
    opts = [correct] + rng.sample(list(wrong), n_opts - 1)
    rng.shuffle(opts)
    k = opts.index(correct) + 1
    cap = label.capitalize()
    body = " ".join(f"{cap}{i}: {o}" for i, o in enumerate(opts, 1))
    fmt_ = "/".join(f"{label}{i}" for i in range(1, n_opts + 1))
    instruction = f"{header}: {question}\n\n{body}\n\nAnswer format: {fmt_}"
    ans = f"{label}{k}"
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {ans}",
            "answer": ans}


def c_boolq(rng: random.Random) -> Record:
    kind = rng.randrange(3)
    if kind == 0:
        animal = rng.choice(sorted(ANIMAL_CLASS))
        cls = ANIMAL_CLASS[animal] if rng.random() < 0.5 else rng.choice(CLASSES)
        art = "an" if cls[0] in "aeiou" else "a"
        art_a = "an" if animal[0] in "aeiou" else "a"
        q = f"is {art_a} {animal} {art} {cls}?"
        truth = ANIMAL_CLASS[animal] == cls
    elif kind == 1:
        i, j = rng.sample(range(len(BY_WEIGHT)), 2)
        q = f"is {BY_WEIGHT[i]} heavier than {BY_WEIGHT[j]}?"
        truth = i > j
    else:
        a, b = rng.sample(range(1, 100), 2)
        q = f"is {a} greater than {b}?"
        truth = a > b
    ans = "true" if truth else "false"
    instruction = (f"Please answer the following question with true or false, question: {q}"
                   f"\n\nAnswer format: true/false")
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {ans}",
            "answer": ans}


def c_piqa(rng: random.Random) -> Record:
    goal, good, bad = rng.choice(PIQA)
    sols = [good, bad]
    rng.shuffle(sols)
    k = sols.index(good) + 1
    instruction = (f"Please choose the correct solution to the question: {goal}\n\n"
                   f"Solution1: {sols[0]}\n\nSolution2: {sols[1]}\n\n"
                   f"Answer format: solution1/solution2")
    ans = f"solution{k}"
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {ans}",
            "answer": ans}


def c_siqa(rng: random.Random) -> Record:
    """Three-option questions (social_i_qa layout)."""
    kind = rng.randrange(3)
    if kind == 0:
        idx = sorted(rng.sample(range(len(BY_WEIGHT)), 3))
        q = "Which of these is the heaviest?"
        correct, wrong = BY_WEIGHT[idx[-1]], [BY_WEIGHT[i] for i in idx[:-1]]
    elif kind == 1:
        tool, purpose = rng.choice(TOOLS)
        q = f"What do you use to {purpose}?"
        correct, wrong = tool, [t for t, _ in TOOLS if t != tool]
    else:
        idx = sorted(rng.sample(range(len(BY_SIZE)), 3))
        q = "Which of these is the smallest?"
        correct, wrong = BY_SIZE[idx[0]], [BY_SIZE[i] for i in idx[1:]]
    return _multi(rng, q, correct, wrong, 3, "answer",
                  "Please choose the correct answer to the question")


def c_arc(rng: random.Random) -> Record:
    """Four-option science questions (ARC / OpenBookQA layout)."""
    kind = rng.randrange(4)
    if kind == 0:
        q = "Which of these animals can fly?"
        correct, wrong = rng.choice(FLYERS), NON_FLYERS
    elif kind == 1:
        thing = rng.choice(sorted(STATES))
        q = f"In everyday conditions, what state of matter is {thing}?"
        correct = STATES[thing]
        wrong = [s for s in ("solid", "liquid", "gas", "plasma") if s != correct]
    elif kind == 2:
        animal = rng.choice(sorted(ANIMAL_CLASS))
        art = "an" if animal[0] in "aeiou" else "a"
        q = f"To which group of animals does {art} {animal} belong?"
        correct = ANIMAL_CLASS[animal]
        wrong = [c for c in CLASSES if c != correct]
    else:
        nums = rng.sample(range(1, 1000), 4)
        q = "Which number is the largest?"
        correct, wrong = str(max(nums)), [str(x) for x in nums if x != max(nums)]
    return _multi(rng, q, correct, wrong, 4, "answer",
                  "Please choose the correct answer to the question")


def c_hellaswag(rng: random.Random) -> Record:
    ctx, good, bad = rng.choice(HELLASWAG)
    return _multi(rng, ctx, good, bad, 4, "ending",
                  "Please choose the correct ending to complete the given sentence")


def c_winogrande(rng: random.Random) -> Record:
    if rng.random() < 0.5:
        big, small = rng.choice(WINO_PAIRS)
        which = rng.choice(["big", "small"])
        sent = f"The {big} does not fit in the {small} because the _ is too {which}."
        correct = big if which == "big" else small
        pair = [big, small]
    else:
        a, b = _two_names(rng)
        sent = f"{a} is much taller than {b}, so _ can reach the top shelf without a ladder."
        correct, pair = a, [a, b]
    rng.shuffle(pair)
    k = pair.index(correct) + 1
    instruction = ("Please choose the correct answer to fill in the blank to complete the given "
                   f"sentence: {sent}\n\nOption1: {pair[0]}\n\nOption2: {pair[1]}\n\n"
                   "Answer format: option1/option2")
    ans = f"option{k}"
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {ans}",
            "answer": ans}


COMMONSENSE_TASKS: List[Tuple[Callable[[random.Random], Record], int]] = [
    (c_boolq, 2), (c_piqa, 2), (c_siqa, 2), (c_hellaswag, 1), (c_winogrande, 2), (c_arc, 2),
]


def generate_commonsense(n: int = DEFAULT_N_COMMONSENSE, seed: int = DEFAULT_SEED) -> List[Record]:
    """``n`` Commonsense170K-format records (duplicates allowed: the fact lists are small)."""
    rng = random.Random(seed)
    funcs = [f for f, _ in COMMONSENSE_TASKS]
    weights = [w for _, w in COMMONSENSE_TASKS]
    return [rng.choices(funcs, weights)[0](rng) for _ in range(n)]


# --------------------------------------------------------------------------- #
# tokenizer
# --------------------------------------------------------------------------- #


def render_prompts(records: Iterable[Record]) -> List[str]:
    return [generate_prompt(r) for r in records]


def train_tokenizer(texts: Sequence[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> bytes:
    """Train a LLaMA-style SentencePiece BPE model on ``texts``; returns the model bytes.

    SentencePiece treats each input line as a sentence, so each prompt is fed line
    by line (newlines are byte-fallback tokens at encode time, as in LLaMA).
    Training input is passed through an iterator and the model is written to memory,
    so no (random) temp-file path ends up in the serialized ``trainer_spec``.
    """
    import sentencepiece as spm

    lines = [line for t in texts for line in t.split("\n") if line]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        num_threads=1,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        max_sentence_length=1 << 16,
        minloglevel=2,
    )
    return buf.getvalue()


# LLaMA-3's pre-tokenizer split (its tokenizer.json): contractions, words, up to 3 digits, punctuation runs,
# newlines, spaces; each piece then mapped to byte-level symbols.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# ids 0, 1, 2: pad, bos, eos (LLaMA's unk/bos/eos positions, so the presets' special ids hold for both tokenizers)
BPE_SPECIAL_TOKENS = ("<|pad|>", "<|begin_of_text|>", "<|end_of_text|>")


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> bytes:
    """Train a LLaMA-3-style byte-level BPE with Hugging Face ``tokenizers`` on ``texts``; returns the
    ``tokenizer.json`` bytes, the same on every run (the shipped file is regenerated byte for byte)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(BPE_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    bos = BPE_SPECIAL_TOKENS[1]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, 1)])
    return tok.to_str().encode("utf-8")


# --------------------------------------------------------------------------- #
# driver
# --------------------------------------------------------------------------- #


def dump_json(records: List[Record]) -> bytes:
    return (json.dumps(records, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


EVAL_DIR = "eval"
EVAL_PER_SET = 6
# Commonsense test sets by their "Answer format" line (ARC and OBQA share answer1..4; SIQA answer1..3).
_EVAL_FORMATS = {"boolq": "true/false", "piqa": "solution1/solution2", "social_i_qa": "answer1/answer2/answer3",
                 "hellaswag": "ending1/ending2/ending3/ending4", "winogrande": "option1/option2",
                 "ARC-Challenge": "answer1/answer2/answer3/answer4", "ARC-Easy": "answer1/answer2/answer3/answer4",
                 "openbookqa": "answer1/answer2/answer3/answer4"}
_EVAL_MATH = ("gsm8k", "SVAMP", "mawps", "AddSub", "MultiArith", "SingleEq")


def eval_fixtures(math_recs: List[Record], cs_recs: List[Record]) -> Dict[str, List[Record]]:
    """Tiny test sets in the LLM-Adapters layout (`<name>/test.json`), EVAL_PER_SET records each,
    taken from the end of the samples: numeric math problems, AQuA-style choices, and each
    commonsense format. Prompts of different lengths, for the batching tests."""
    numeric = [r for r in reversed(math_recs) if "Answer Choices" not in r["instruction"]]
    letters = [r for r in reversed(math_recs) if "Answer Choices" in r["instruction"]]
    sets = {name: numeric[k * EVAL_PER_SET:(k + 1) * EVAL_PER_SET] for k, name in enumerate(_EVAL_MATH)}
    sets["AQuA"] = letters[:EVAL_PER_SET]
    used = {}
    for name, answer_format in _EVAL_FORMATS.items():
        matching = [r for r in reversed(cs_recs) if r["instruction"].endswith("Answer format: " + answer_format)]
        skip = used.get(answer_format, 0)
        sets[name] = matching[skip:skip + EVAL_PER_SET]
        used[answer_format] = skip + EVAL_PER_SET
    return sets


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def generate_all(out_dir: str = DEFAULT_OUT_DIR, seed: int = DEFAULT_SEED,
                 n_math: int = DEFAULT_N_MATH, n_commonsense: int = DEFAULT_N_COMMONSENSE,
                 vocab_size: int = DEFAULT_VOCAB_SIZE, tokenizer: bool = True) -> Dict[str, str]:
    """Write all sample assets into ``out_dir``; returns {name: path}."""
    os.makedirs(out_dir, exist_ok=True)
    math_recs = generate_math(n_math, seed)
    cs_recs = generate_commonsense(n_commonsense, seed)
    paths = {
        "math": os.path.join(out_dir, MATH_FILE),
        "commonsense": os.path.join(out_dir, COMMONSENSE_FILE),
    }
    _write(paths["math"], dump_json(math_recs))
    _write(paths["commonsense"], dump_json(cs_recs))
    for name, records in eval_fixtures(math_recs, cs_recs).items():
        paths[f"eval/{name}"] = os.path.join(out_dir, EVAL_DIR, name, "test.json")
        os.makedirs(os.path.dirname(paths[f"eval/{name}"]), exist_ok=True)
        _write(paths[f"eval/{name}"], dump_json(records))
    if tokenizer:
        prompts = render_prompts(math_recs + cs_recs)
        paths["tokenizer"] = os.path.join(out_dir, TOKENIZER_FILE)
        _write(paths["tokenizer"], train_tokenizer(prompts, vocab_size))
        paths["tokenizer_json"] = os.path.join(out_dir, TOKENIZER_JSON_FILE)
        _write(paths["tokenizer_json"], train_bpe_tokenizer(prompts, vocab_size))
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m peft_ds.sample_data",
        description="Deterministically generate the bundled sample datasets (Math10K-style "
                    "math, Commonsense170K-style QA) and two tiny tokenizers trained on them: a "
                    "LLaMA-style SentencePiece model and a LLaMA-3-style byte-level BPE (tokenizer.json).")
    p.add_argument("--out-dir", default=DEFAULT_OUT_DIR,
                   help="output directory (default: the package's assets/ directory)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed (default: 0)")
    p.add_argument("--n-math", type=int, default=DEFAULT_N_MATH,
                   help=f"number of math records (default: {DEFAULT_N_MATH})")
    p.add_argument("--n-commonsense", type=int, default=DEFAULT_N_COMMONSENSE,
                   help=f"number of commonsense records (default: {DEFAULT_N_COMMONSENSE})")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                   help=f"tokenizer vocabulary size (default: {DEFAULT_VOCAB_SIZE})")
    p.add_argument("--no-tokenizer", action="store_true", help="skip training the tokenizers")
    args = p.parse_args(argv)
    paths = generate_all(args.out_dir, args.seed, args.n_math, args.n_commonsense,
                         args.vocab_size, tokenizer=not args.no_tokenizer)
    for name, path in paths.items():
        print(f"{name}: {path} ({os.path.getsize(path)} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
