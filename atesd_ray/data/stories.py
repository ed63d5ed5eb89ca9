"""The story templates of the synthetic word problems: each draws a story and writes one reasoning
step per paragraph, more at higher difficulty; ``synthetic.py`` checks and numbers what they write."""

from __future__ import annotations

import random
from collections.abc import Callable
from fractions import Fraction

NAMES = (
    "Mia", "Leo", "Ava", "Noah", "Zoe", "Omar", "Lily", "Ravi",
    "Emma", "Sam", "Nora", "Ken", "Ivy", "Ben", "Tara", "Hugo",
)  # fmt: skip
# (plural noun, lowest price, highest price) in dollars
ITEMS = (
    ("notebooks", 2, 6), ("pens", 1, 3), ("apples", 1, 2), ("books", 8, 15), ("mugs", 4, 9),
    ("candles", 3, 7), ("tickets", 5, 12), ("plants", 6, 14), ("pencils", 1, 2), ("scarves", 9, 16),
)  # fmt: skip

CLUBS = (
    ("walk to school", "do not walk"), ("play chess", "do not play chess"),
    ("take the bus", "do not take the bus"), ("like soccer", "do not like soccer"),
)  # fmt: skip

Story = tuple[str, list[str], Fraction]  # problem, reasoning paragraphs, answer


def fmt(x: Fraction | int) -> str:
    """``12`` or ``7/2``: the form used in references and answers."""
    x = Fraction(x)
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _shopping(rng: random.Random, level: int) -> Story:
    name = rng.choice(NAMES)
    goods = rng.sample(ITEMS, 3 if level == 3 else 2)
    qty = [rng.randint(2, 6) for _ in goods]
    price = [rng.randint(lo, hi) for _, lo, hi in goods]
    costs = [q * p for q, p in zip(qty, price, strict=True)]
    subtotal = sum(costs)
    coupon = rng.randint(2, 5) if level == 3 else 0
    total = subtotal - coupon
    bill = next(b for b in (20, 50, 100, 200) if b > total) if level >= 2 else 0

    bought = [f"{q} {g} at {p} dollars each" for (g, _, _), q, p in zip(goods, qty, price, strict=True)]
    problem = f"{name} buys {', '.join(bought[:-1])} and {bought[-1]}."
    if coupon:
        problem += f" A coupon takes {coupon} dollars off the total."
    if bill:
        problem += f" {name} pays with a {bill}-dollar bill. How much change does {name} get, in dollars?"
    else:
        problem += f" How many dollars does {name} spend?"

    steps = [
        f"The {g} cost {q} × {p} = {c} dollars."
        for (g, _, _), q, p, c in zip(goods, qty, price, costs, strict=True)
    ]
    steps.append(f"Together the items cost {' + '.join(map(str, costs))} = {subtotal} dollars.")
    if coupon:
        steps.append(f"The coupon lowers this to {subtotal} - {coupon} = {total} dollars.")
    if bill:
        steps.append(
            f"The change from the {bill}-dollar bill is {bill} - {total} = {_plural(bill - total, 'dollar')}."
        )
    answer = (bill - (sum(q * p for q, p in zip(qty, price, strict=True)) - coupon)) if bill else subtotal
    return problem, steps, Fraction(answer)


def _work(rng: random.Random, level: int) -> Story:
    if level == 1:
        r, s, t = rng.randint(3, 12), rng.randint(3, 12), rng.randint(4, 15)
        problem = (
            f"Two pumps fill a pool. One pumps {r} liters per minute and the other pumps {s} liters per "
            f"minute. How many liters do they pump together in {t} minutes?"
        )
        steps = [
            f"Together the pumps move {r} + {s} = {r + s} liters per minute.",
            f"In {t} minutes they pump {r + s} × {t} = {(r + s) * t} liters.",
        ]
        return problem, steps, Fraction(r * t + s * t)

    a_name, b_name = rng.sample(NAMES, 2)
    a, b = rng.sample(range(2, 13), 2)
    while Fraction(a * b, a + b).denominator > 9:  # keep answers simple fractions
        a, b = rng.sample(range(2, 13), 2)
    ra, rb = Fraction(1, a), Fraction(1, b)
    together = ra + rb
    intro = f"{a_name} can paint a fence in {a} hours. {b_name} can paint it in {b} hours."
    rates = [
        f"{a_name} paints {fmt(ra)} of the fence per hour.",
        f"{b_name} paints {fmt(rb)} of the fence per hour.",
    ]
    if level == 2:
        problem = f"{intro} How many hours do they need working together?"
        steps = [
            *rates,
            f"Together they paint {fmt(ra)} + {fmt(rb)} = {fmt(together)} of the fence per hour.",
            f"So the job takes 1 ÷ {fmt(together)} = {fmt(1 / together)} hours.",
        ]
        return problem, steps, Fraction(a * b, a + b)

    w = rng.randint(1, a - 1)
    done, rest = w * ra, 1 - w * ra
    problem = f"{intro} {a_name} works alone for {_plural(w, 'hour')}, then {b_name} joins. How many hours does the whole job take?"
    steps = [
        *rates,
        f"Working alone for {_plural(w, 'hour')}, {a_name} paints {w} × {fmt(ra)} = {fmt(done)} of the fence.",
        f"That leaves 1 - {fmt(done)} = {fmt(rest)} of the fence.",
        f"Together they paint {fmt(ra)} + {fmt(rb)} = {fmt(together)} of the fence per hour, so the rest "
        f"takes {fmt(rest)} ÷ {fmt(together)} = {fmt(rest / together)} hours.",
        f"The whole job takes {w} + {fmt(rest / together)} = {fmt(w + rest / together)} hours.",
    ]
    return problem, steps, w + Fraction(a - w, a) * Fraction(a * b, a + b)


def _ages(rng: random.Random, level: int) -> Story:
    kid = rng.choice(NAMES)
    if level == 1:
        sib = rng.choice([n for n in NAMES if n != kid])
        x, d, y = rng.randint(4, 15), rng.randint(2, 9), rng.randint(2, 12)
        problem = f"{kid} is {x} years old. {sib} is {d} years older than {kid}. How old will {sib} be in {y} years?"
        steps = [
            f"{sib} is {x} + {d} = {x + d} years old now.",
            f"In {y} years {sib} will be {x + d} + {y} = {x + d + y} years old.",
        ]
        return problem, steps, Fraction(x + y + d)
    if level == 2:
        x, k = rng.randint(4, 10), rng.randint(3, 5)
        later = x + rng.randint(3, 12)
        problem = (
            f"{kid} is {x} years old, and {kid}'s mother is {k} times as old. "
            f"How old will the mother be when {kid} is {later}?"
        )
        steps = [
            f"The mother is {k} × {x} = {k * x} years old now.",
            f"{kid} turns {later} in {later} - {x} = {later - x} years.",
            f"Then the mother will be {k * x} + {later - x} = {k * x + later - x} years old.",
        ]
        return problem, steps, Fraction(later + (k - 1) * x)

    son, k, y = rng.randint(4, 12), rng.randint(3, 5), rng.randint(2, 10)
    total = son * (1 + k)
    problem = (
        f"{kid}'s mother is {k} times as old as {kid}. Their ages add up to {total}. "
        f"How old will the mother be in {y} years?"
    )
    steps = [
        f"Count {kid}'s age as one share; the mother's age is then {k} shares.",
        f"Together that is 1 + {k} = {1 + k} shares.",
        f"One share is {total} ÷ {1 + k} = {son} years, so {kid} is {son}.",
        f"The mother is {k} × {son} = {k * son} years old.",
        f"In {y} years she will be {k * son} + {y} = {k * son + y} years old.",
    ]
    return problem, steps, Fraction(total * k, 1 + k) + y


def _geometry(rng: random.Random, level: int) -> Story:
    if level < 3:
        length, width = rng.randint(5, 30), rng.randint(3, 20)
        half, perimeter = length + width, 2 * (length + width)
        problem = f"A rectangular garden is {length} meters long and {width} meters wide."
        steps = [
            f"One length plus one width is {length} + {width} = {half} meters.",
            f"The perimeter is twice that: 2 × {half} = {perimeter} meters.",
        ]
        if level == 1:
            return f"{problem} What is its perimeter in meters?", steps, Fraction(perimeter)
        price = rng.randint(2, 9)
        problem += (
            f" Fencing costs {price} dollars per meter. How many dollars does it cost to fence the garden?"
        )
        steps.append(f"The fence costs {perimeter} × {price} = {perimeter * price} dollars.")
        return problem, steps, Fraction(2 * length * price + 2 * width * price)

    while True:
        length, width = rng.randint(6, 15), rng.randint(5, 12)
        side = rng.randint(2, min(length, width) - 2)
        bare = length * width - side * side
        sizes = [s for s in range(2, 11) if bare % s == 0 and bare // s >= 2]
        if sizes:
            break
    per_box, price = rng.choice(sizes), rng.randint(8, 30)
    boxes = bare // per_box
    problem = (
        f"A floor is {length} m by {width} m. A square rug {side} m on a side covers part of it. "
        f"Tiles for the rest come in boxes covering {per_box} square meters at {price} dollars a box. "
        f"How many dollars do the tiles cost?"
    )
    steps = [
        f"The floor has an area of {length} × {width} = {length * width} square meters.",
        f"The rug covers {side} × {side} = {side * side} square meters.",
        f"The bare floor is {length * width} - {side * side} = {bare} square meters.",
        f"That needs {bare} ÷ {per_box} = {boxes} boxes.",
        f"The boxes cost {boxes} × {price} = {boxes * price} dollars.",
    ]
    return problem, steps, Fraction((length * width - side**2) * price, per_box)


def _fractions(rng: random.Random, level: int) -> Story:
    fracs = (Fraction(1, 2), Fraction(1, 3), Fraction(2, 3), Fraction(1, 4), Fraction(3, 4), Fraction(2, 5))
    if level == 1:
        f = rng.choice(fracs)
        n = f.denominator * rng.randint(4, 12)
        do, dont = rng.choice(CLUBS)
        problem = f"A class has {n} students. {fmt(f)} of them {do}. How many students {dont}?"
        steps = [
            f"{fmt(f)} × {n} = {fmt(f * n)} students {do}.",
            f"So {n} - {fmt(f * n)} = {fmt(n - f * n)} students {dont}.",
        ]
        return problem, steps, (1 - f) * n

    phases = [
        ("sells", "in the morning", "The morning sales are"),
        ("sells", "of the rest in the afternoon", "The afternoon sales are"),
        ("gives a neighbor", "of what is left", "The neighbor gets"),
    ][: 2 if level == 2 else 3]
    chosen = [rng.choice(fracs) for _ in phases]
    scale = 1
    for f in chosen:
        scale *= f.denominator
    n = scale * rng.randint(1, max(1, 120 // scale))
    name = rng.choice(NAMES)
    actions = [f"{verb} {fmt(f)} {when}" for (verb, when, _), f in zip(phases, chosen, strict=True)]
    problem = f"A baker named {name} makes {n} rolls. {name} {', '.join(actions[:-1])} and {actions[-1]}. How many rolls are left?"
    steps, left = [], Fraction(n)
    for (_, _, label), f in zip(phases, chosen, strict=True):
        part = f * left
        steps.append(f"{label} {fmt(f)} × {fmt(left)} = {fmt(part)} rolls.")
        steps.append(f"That leaves {fmt(left)} - {fmt(part)} = {fmt(left - part)} rolls.")
        left -= part
    answer = Fraction(n)
    for f in chosen:
        answer *= 1 - f
    return problem, steps, answer


def _savings(rng: random.Random, level: int) -> Story:
    name = rng.choice(NAMES)
    if level < 3:
        s, w = rng.randint(3, 15), rng.randint(4, 12)
        gift = rng.randint(5, 30) if level == 2 else 0
        spend = rng.randint(5, s * w + gift - 1)
        problem = f"{name} saves {s} dollars a week for {w} weeks"
        problem += f", then gets {gift} dollars as a gift" if gift else ""
        problem += f". {name} spends {spend} dollars on a game. How many dollars are left?"
        steps = [f"{name} saves {s} × {w} = {s * w} dollars."]
        if gift:
            steps.append(f"With the gift that is {s * w} + {gift} = {s * w + gift} dollars.")
        steps.append(f"After the game {s * w + gift} - {spend} = {s * w + gift - spend} dollars are left.")
        return problem, steps, Fraction(s * w + gift - spend)

    while True:
        s1, w1, s2, w2 = rng.randint(3, 10), rng.randint(3, 8), rng.randint(5, 15), rng.randint(2, 6)
        total = s1 * w1 + s2 * w2
        if total % 2 == 0:
            break
    helmet = rng.randint(5, total // 2 - 1)
    problem = (
        f"{name} saves {s1} dollars a week for {w1} weeks, then {s2} dollars a week for {w2} weeks. "
        f"{name} spends half of the savings on a bike and {helmet} dollars on a helmet. How many dollars are left?"
    )
    steps = [
        f"First {name} saves {s1} × {w1} = {s1 * w1} dollars.",
        f"Then {name} saves {s2} × {w2} = {s2 * w2} dollars.",
        f"In all that is {s1 * w1} + {s2 * w2} = {total} dollars.",
        f"The bike costs 1/2 × {total} = {total // 2} dollars, leaving {total} - {total // 2} = {total // 2} dollars.",
        f"After the helmet {total // 2} - {helmet} = {total // 2 - helmet} dollars are left.",
    ]
    return problem, steps, Fraction(s1 * w1 + s2 * w2, 2) - helmet


def _travel(rng: random.Random, level: int) -> Story:
    legs = 3 if level == 3 else 2
    while True:
        speeds = [rng.choice(range(30, 95, 5)) for _ in range(legs)]
        hours = [rng.randint(2, 4) for _ in range(legs)]
        if Fraction(sum(v * h for v, h in zip(speeds, hours, strict=True)), sum(hours)).denominator <= 4:
            break
    dists = [v * h for v, h in zip(speeds, hours, strict=True)]
    parts = [f"{v} km per hour for {h} hours" for v, h in zip(speeds, hours, strict=True)]
    problem = f"A bus drives at {', then at '.join(parts)}."
    steps = [
        f"Leg {i + 1} covers {v} × {h} = {d} km."
        for i, (v, h, d) in enumerate(zip(speeds, hours, dists, strict=True))
    ]
    steps.append(f"The whole trip is {' + '.join(map(str, dists))} = {sum(dists)} km.")
    if level == 1:
        return f"{problem} How many km does it drive?", steps, Fraction(sum(dists))
    time = sum(hours)
    steps.append(f"It drives for {' + '.join(map(str, hours))} = {time} hours.")
    steps.append(
        f"Its average speed is {sum(dists)} ÷ {time} = {fmt(Fraction(sum(dists), time))} km per hour."
    )
    answer = Fraction(sum(v * h for v, h in zip(speeds, hours, strict=True)), sum(hours))
    return f"{problem} What is its average speed in km per hour?", steps, answer


def one_step(rng: random.Random, level: int) -> Story:
    """Level 0: one addition, subtraction or multiplication of numbers up to 20."""
    name = rng.choice(NAMES)
    item = rng.choice(ITEMS)[0]
    kind = rng.choice(("add", "sub", "mul"))
    if kind == "add":
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        problem = f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?"
        steps = [
            f"{name} starts with {a} {item}.",
            f"After buying {b} more, {name} has {a} + {b} = {a + b} {item}.",
        ]
        return problem, steps, Fraction(a + b)
    if kind == "sub":
        a = rng.randint(5, 20)
        b = rng.randint(1, a - 1)
        problem = f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?"
        steps = [
            f"{name} starts with {a} {item}.",
            f"After giving away {b}, {name} has {a} - {b} = {a - b} {item}.",
        ]
        return problem, steps, Fraction(a - b)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    problem = f"{name} buys {a} boxes with {b} {item} in each box. How many {item} does {name} buy?"
    steps = [f"Each box holds {b} {item}.", f"So {a} boxes hold {a} × {b} = {a * b} {item}."]
    return problem, steps, Fraction(a * b)


TEMPLATES: dict[str, Callable[[random.Random, int], Story]] = {
    "shopping": _shopping,
    "work": _work,
    "ages": _ages,
    "geometry": _geometry,
    "fractions": _fractions,
    "savings": _savings,
    "travel": _travel,
}
