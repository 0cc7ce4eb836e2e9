"""Prompts for a real instruction-tuned parent (SmolLM2-135M-Instruct): checkable held-out questions and the
training prompts of the self-distillation corpus, written here so that nothing is downloaded.

Every item (a country, an element, an arithmetic pair, a code task, ...) belongs to exactly one split, chosen by
a hash of its key: "train" (the corpus prompts the parent answers to make the conversion data), "dev" (held-out
prompts to look at while building a recipe) and "final" (held-out prompts for the reported number, looked at
once). So no held-out question, nor its answer, is ever in the conversion corpus.

A checkable prompt (`CheckedPrompt`) carries how its answer is judged (`check`):
- "contains": one of `answers` appears in the answer as a whole word (case-insensitive);
- "symbol": one of `answers` appears as a whole word, case-sensitive (chemical symbols: "Au", not "au");
- "number": the first integer in the answer that is not a number of the question equals `answers[0]`
  ("2 * 12 = 24, so 2 times 12 is 24." and "The sum is 68." pass; echoing the operands is skipped, and a wrong
  result stated before the right one fails);
- "yesno": the answer starts with `answers[0]` ("yes" / "no") and has at most 4 words (format following);
- "python": the answer's code (a fenced block, else the whole answer) defines the function and passes the
  `answers` asserts, run in a fresh interpreter with a time limit (`run_python_check`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

SPLITS = ("train", "dev", "final")
CHECKS = ("contains", "symbol", "number", "yesno", "python")


def split_of(key: str) -> str:
    """The split of an item: 50% train, 25% dev, 25% final, by a hash of its key (stable across runs)."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % 4
    return "train" if h < 2 else ("dev" if h == 2 else "final")


# ---------------------------------------------------------------------------------------------------------------
# Items. Facts a 135M instruction model mostly knows; the answers are ground truth, not the model's.

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Russia": "Moscow", "Canada": "Ottawa",
    "Australia": "Canberra", "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Mexico": "Mexico City",
    "Egypt": "Cairo", "Kenya": "Nairobi", "Nigeria": "Abuja", "South Africa": "Pretoria", "Greece": "Athens",
    "Turkey": "Ankara", "Sweden": "Stockholm", "Norway": "Oslo", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Poland": "Warsaw", "Austria": "Vienna", "Switzerland": "Bern", "Belgium": "Brussels",
    "the Netherlands": "Amsterdam", "Ireland": "Dublin", "the United Kingdom": "London", "Scotland": "Edinburgh",
    "Iceland": "Reykjavik", "Hungary": "Budapest", "the Czech Republic": "Prague", "Romania": "Bucharest",
    "Bulgaria": "Sofia", "Ukraine": "Kyiv", "Thailand": "Bangkok", "Vietnam": "Hanoi", "South Korea": "Seoul",
    "North Korea": "Pyongyang", "Indonesia": "Jakarta", "the Philippines": "Manila", "Malaysia": "Kuala Lumpur",
    "Pakistan": "Islamabad", "Bangladesh": "Dhaka", "Iran": "Tehran", "Iraq": "Baghdad", "Israel": "Jerusalem",
    "Saudi Arabia": "Riyadh", "Syria": "Damascus", "Lebanon": "Beirut", "Jordan": "Amman", "Afghanistan": "Kabul",
    "Peru": "Lima", "Chile": "Santiago", "Colombia": "Bogota", "Venezuela": "Caracas", "Cuba": "Havana",
    "Ethiopia": "Addis Ababa", "Morocco": "Rabat", "Algeria": "Algiers", "Tunisia": "Tunis", "Ghana": "Accra",
    "New Zealand": "Wellington", "the United States": "Washington", "Nepal": "Kathmandu", "Mongolia": "Ulaanbaatar",
    "Croatia": "Zagreb", "Serbia": "Belgrade", "Slovakia": "Bratislava", "Latvia": "Riga", "Lithuania": "Vilnius",
    "Estonia": "Tallinn", "Qatar": "Doha", "Uganda": "Kampala", "Senegal": "Dakar", "Sri Lanka": "Colombo",
}
ELEMENTS = {
    "gold": "Au", "silver": "Ag", "iron": "Fe", "copper": "Cu", "oxygen": "O", "hydrogen": "H", "carbon": "C",
    "nitrogen": "N", "sodium": "Na", "potassium": "K", "helium": "He", "neon": "Ne", "calcium": "Ca",
    "magnesium": "Mg", "lead": "Pb", "tin": "Sn", "mercury": "Hg", "zinc": "Zn", "sulfur": "S", "chlorine": "Cl",
    "uranium": "U", "aluminium": "Al", "silicon": "Si", "phosphorus": "P", "lithium": "Li", "nickel": "Ni",
    "platinum": "Pt", "iodine": "I", "fluorine": "F", "argon": "Ar",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad", "light": "dark", "old": "new",
    "open": "closed", "early": "late", "strong": "weak", "rich": "poor", "hard": "soft", "full": "empty",
    "high": "low", "wet": "dry", "long": "short", "thick": "thin", "loud": "quiet", "clean": "dirty",
    "inside": "outside", "left": "right", "true": "false", "win": "lose", "buy": "sell", "day": "night",
    "north": "south", "east": "west", "love": "hate", "begin": "end", "push": "pull", "heavy": "light",
    "cheap": "expensive", "near": "far", "first": "last", "alive": "dead", "top": "bottom", "sweet": "sour",
    "young": "old", "good": "bad", "wide": "narrow", "deep": "shallow", "brave": "cowardly", "enter": "exit",
    "question": "answer", "friend": "enemy", "accept": "reject", "increase": "decrease", "maximum": "minimum",
}
# (question, "yes" | "no"): common knowledge, for format following
YESNO = [
    ("Is the sun a star?", "yes"), ("Is water wet?", "yes"), ("Can fish breathe underwater?", "yes"),
    ("Is the Earth flat?", "no"), ("Do cats bark?", "no"), ("Is ice cold?", "yes"), ("Is fire cold?", "no"),
    ("Do birds have feathers?", "yes"), ("Is the moon made of cheese?", "no"), ("Can humans fly without help?", "no"),
    ("Is Paris in France?", "yes"), ("Is Tokyo in China?", "no"), ("Is 7 an odd number?", "yes"),
    ("Is 10 an odd number?", "no"), ("Do spiders have eight legs?", "yes"), ("Do snakes have legs?", "no"),
    ("Is the Pacific an ocean?", "yes"), ("Is a tomato a vegetable in botany?", "no"), ("Is gold a metal?", "yes"),
    ("Is a whale a fish?", "no"), ("Do plants need sunlight?", "yes"), ("Is the sky green on a clear day?", "no"),
    ("Is Python a programming language?", "yes"), ("Is HTML a programming language for databases?", "no"),
    ("Does a week have seven days?", "yes"), ("Does a year have 400 days?", "no"), ("Is snow white?", "yes"),
    ("Are bananas blue?", "no"), ("Is Mount Everest the tallest mountain on Earth?", "yes"),
    ("Is the Sahara a desert?", "yes"), ("Is Antarctica hot?", "no"), ("Do cows give milk?", "yes"),
    ("Can a car run without fuel or power?", "no"), ("Is 2 a prime number?", "yes"), ("Is 9 a prime number?", "no"),
    ("Is the heart an organ?", "yes"), ("Do humans have three arms?", "no"), ("Is London in England?", "yes"),
    ("Is the Nile a river?", "yes"), ("Is a square round?", "no"), ("Are diamonds hard?", "yes"),
    ("Does the sun rise in the west?", "no"), ("Is milk usually white?", "yes"), ("Can penguins fly?", "no"),
    ("Is a triangle a shape with three sides?", "yes"), ("Is Mars a planet?", "yes"), ("Is the sun a planet?", "no"),
    ("Do bees make honey?", "yes"), ("Is coffee a fruit juice?", "no"), ("Is English a language?", "yes"),
]
PLURALS = {
    "child": "children", "mouse": "mice", "foot": "feet", "tooth": "teeth", "man": "men", "woman": "women",
    "goose": "geese", "person": "people", "cat": "cats", "box": "boxes", "city": "cities", "leaf": "leaves",
    "knife": "knives", "wolf": "wolves", "baby": "babies", "bus": "buses", "dog": "dogs", "book": "books",
    "tomato": "tomatoes", "potato": "potatoes", "hero": "heroes", "ox": "oxen", "cactus": "cacti", "wife": "wives",
    "half": "halves", "church": "churches", "dish": "dishes", "story": "stories", "party": "parties",
    "glass": "glasses", "fox": "foxes", "day": "days", "toy": "toys", "apple": "apples", "house": "houses",
    "car": "cars", "bird": "birds", "tree": "trees", "class": "classes", "lady": "ladies",
}
# (question, integer answer): counts everyone knows
COUNTS = [
    ("How many days are in a week?", 7), ("How many legs does a spider have?", 8), ("How many legs does a dog have?", 4),
    ("How many months are in a year?", 12), ("How many hours are in a day?", 24), ("How many minutes are in an hour?", 60),
    ("How many seconds are in a minute?", 60), ("How many sides does a triangle have?", 3),
    ("How many sides does a square have?", 4), ("How many sides does a hexagon have?", 6),
    ("How many sides does an octagon have?", 8), ("How many continents are there on Earth?", 7),
    ("How many legs does an insect have?", 6), ("How many wheels does a bicycle have?", 2),
    ("How many wheels does a tricycle have?", 3), ("How many days are in a leap year?", 366),
    ("How many days are in a normal year?", 365), ("How many players are on a soccer team on the field?", 11),
    ("How many cents are in a dollar?", 100), ("How many centimeters are in a meter?", 100),
    ("How many grams are in a kilogram?", 1000), ("How many meters are in a kilometer?", 1000),
    ("How many letters are in the English alphabet?", 26), ("How many planets are in the solar system?", 8),
    ("How many eyes does a human have?", 2), ("How many fingers are on one human hand?", 5),
    ("How many strings does a standard guitar have?", 6), ("How many days are in February in a leap year?", 29),
    ("How many weeks are in a year?", 52), ("How many years are in a century?", 100),
    ("How many years are in a decade?", 10), ("How many items are in a dozen?", 12),
    ("How many legs does a bird have?", 2), ("How many hearts does a human have?", 1),
    ("How many colors are in a rainbow?", 7), ("How many sides does a pentagon have?", 5),
]
# (function name, signature, what it does, asserts): short code the model writes and we run
CODE_TASKS = [
    ("add", "a, b", "returns the sum of a and b", ["add(2, 3) == 5", "add(-1, 1) == 0"]),
    ("multiply", "a, b", "returns the product of a and b", ["multiply(3, 4) == 12", "multiply(0, 9) == 0"]),
    ("subtract", "a, b", "returns a minus b", ["subtract(5, 3) == 2", "subtract(1, 4) == -3"]),
    ("square", "x", "returns x squared", ["square(3) == 9", "square(-2) == 4"]),
    ("cube", "x", "returns x cubed", ["cube(2) == 8", "cube(-1) == -1"]),
    ("is_even", "n", "returns True if n is even and False otherwise", ["is_even(4) is True", "is_even(7) is False"]),
    ("is_odd", "n", "returns True if n is odd and False otherwise", ["is_odd(3) is True", "is_odd(8) is False"]),
    ("reverse_string", "s", "returns the string s reversed", ["reverse_string('abc') == 'cba'",
                                                               "reverse_string('') == ''"]),
    ("max_of_list", "lst", "returns the largest number in the list lst", ["max_of_list([1, 5, 3]) == 5",
                                                                          "max_of_list([-2, -7]) == -2"]),
    ("min_of_list", "lst", "returns the smallest number in the list lst", ["min_of_list([4, 2, 8]) == 2",
                                                                           "min_of_list([-1, 3]) == -1"]),
    ("sum_list", "lst", "returns the sum of the numbers in the list lst", ["sum_list([1, 2, 3]) == 6",
                                                                           "sum_list([]) == 0"]),
    ("factorial", "n", "returns the factorial of n", ["factorial(5) == 120", "factorial(0) == 1"]),
    ("fibonacci", "n", "returns the n-th Fibonacci number, with fibonacci(0) == 0 and fibonacci(1) == 1",
     ["fibonacci(10) == 55", "fibonacci(1) == 1"]),
    ("count_vowels", "s", "returns the number of vowels in the string s", ["count_vowels('hello') == 2",
                                                                            "count_vowels('xyz') == 0"]),
    ("to_upper", "s", "returns the string s in upper case", ["to_upper('abc') == 'ABC'"]),
    ("to_lower", "s", "returns the string s in lower case", ["to_lower('AbC') == 'abc'"]),
    ("average", "lst", "returns the average of the numbers in the list lst", ["average([1, 2, 3]) == 2",
                                                                              "average([4]) == 4"]),
    ("is_palindrome", "s", "returns True if the string s reads the same backwards", ["is_palindrome('racecar')",
                                                                                      "not is_palindrome('abc')"]),
    ("string_length", "s", "returns the number of characters in the string s", ["string_length('hello') == 5"]),
    ("first_element", "lst", "returns the first element of the list lst", ["first_element([7, 8]) == 7"]),
    ("last_element", "lst", "returns the last element of the list lst", ["last_element([7, 8]) == 8"]),
    ("absolute", "x", "returns the absolute value of x", ["absolute(-3) == 3", "absolute(2) == 2"]),
    ("celsius_to_fahrenheit", "c", "converts a temperature c in Celsius to Fahrenheit",
     ["celsius_to_fahrenheit(0) == 32", "celsius_to_fahrenheit(100) == 212"]),
    ("count_words", "s", "returns the number of words in the string s", ["count_words('a b c') == 3"]),
    ("remove_duplicates", "lst", "returns a list of the unique elements of lst, in sorted order",
     ["remove_duplicates([3, 1, 3, 2]) == [1, 2, 3]"]),
    ("sort_list", "lst", "returns the list lst sorted in ascending order", ["sort_list([3, 1, 2]) == [1, 2, 3]"]),
    ("power", "base, exp", "returns base raised to the power exp", ["power(2, 10) == 1024", "power(5, 0) == 1"]),
    ("is_positive", "x", "returns True if x is greater than zero", ["is_positive(3) is True",
                                                                      "is_positive(-2) is False"]),
    ("double", "x", "returns x multiplied by two", ["double(4) == 8"]),
    ("halve", "x", "returns x divided by two", ["halve(8) == 4"]),
    ("greet", "name", "returns the string 'Hello, ' followed by name", ["greet('Bob') == 'Hello, Bob'"]),
    ("area_of_rectangle", "width, height", "returns the area of a rectangle",
     ["area_of_rectangle(3, 4) == 12"]),
    ("perimeter_of_square", "side", "returns the perimeter of a square", ["perimeter_of_square(5) == 20"]),
    ("count_char", "s, c", "returns how many times the character c occurs in the string s",
     ["count_char('banana', 'a') == 3"]),
    ("is_empty", "lst", "returns True if the list lst is empty", ["is_empty([]) is True", "is_empty([1]) is False"]),
    ("list_length", "lst", "returns the number of elements in the list lst", ["list_length([1, 2, 3]) == 3"]),
    ("max_of_two", "a, b", "returns the larger of a and b", ["max_of_two(3, 9) == 9", "max_of_two(5, 2) == 5"]),
    ("min_of_two", "a, b", "returns the smaller of a and b", ["min_of_two(3, 9) == 3"]),
    ("is_divisible", "a, b", "returns True if a is divisible by b", ["is_divisible(10, 5) is True",
                                                                       "is_divisible(7, 2) is False"]),
    ("join_words", "words", "joins the list of strings words with spaces", ["join_words(['a', 'b']) == 'a b'"]),
]

# Train-only material: open-ended prompts (no check) that widen the corpus beyond the checkable families.
TOPICS = [
    "photosynthesis", "gravity", "the water cycle", "electricity", "volcanoes", "the internet", "democracy",
    "climate change", "the human heart", "DNA", "black holes", "the Roman Empire", "machine learning",
    "recycling", "earthquakes", "the immune system", "solar energy", "rainbows", "the moon", "bees", "tides",
    "inflation", "vaccines", "the printing press", "magnets", "sound waves", "the stock market", "clouds",
    "fractions", "prime numbers", "a database", "a compiler", "an operating system", "encryption", "friction",
    "evaporation", "the Renaissance", "the Olympic Games", "coral reefs", "rain forests", "deserts", "glaciers",
    "the brain", "sleep", "exercise", "healthy eating", "time zones", "the seasons", "a budget", "taxes",
    "a library", "a museum", "chess", "music", "painting", "poetry", "friendship", "teamwork", "honesty",
    "a hash table", "recursion", "a linked list", "binary numbers", "an algorithm", "version control",
    "unit testing", "a web browser", "email", "a spreadsheet", "batteries", "airplanes", "bicycles", "trains",
]
CATEGORIES = [
    "fruits", "vegetables", "colors", "animals that live in the ocean", "birds", "musical instruments", "sports",
    "countries in Europe", "programming languages", "planets", "flowers", "trees", "kitchen tools", "vehicles",
    "jobs", "board games", "mammals", "insects", "metals", "languages", "rivers", "desserts", "school subjects",
    "shapes", "weather types", "emotions", "furniture", "clothes", "drinks", "hobbies",
]
SENTENCES = [
    "The cat sleeps on the mat.", "I walk to school every day.", "She writes a letter to her friend.",
    "We eat dinner at seven.", "They play football in the park.", "He reads a book before bed.",
    "The sun shines over the hills.", "My brother fixes the old car.", "The children sing a song.",
    "The river flows to the sea.", "I drink coffee in the morning.", "The bird builds a nest.",
    "Our team wins the game.", "The teacher explains the lesson.", "The wind blows through the trees.",
]
OPEN_TEMPLATES = [
    "Explain {topic} in two or three sentences.", "What is {topic}?", "Give a short, simple definition of {topic}.",
    "Write a short paragraph about {topic}.", "Why is {topic} important?", "Describe {topic} to a child.",
    "Write a haiku about {topic}.", "List two facts about {topic}.",
]


def _arith_items(n: int, seed: int) -> list[tuple[str, int, int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        op = rng.choice("+-*")
        if op == "*":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
        else:
            a, b = rng.randint(1, 60), rng.randint(1, 60)
            if op == "-" and b > a:
                a, b = b, a
        out.append((op, a, b))
    return out


def _arith_value(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else (a - b if op == "-" else a * b)


_ARITH_WORDS = {"+": "plus", "-": "minus", "*": "times"}


# ---------------------------------------------------------------------------------------------------------------
# Checkable held-out prompts

@dataclass(frozen=True)
class CheckedPrompt:
    """One held-out question with the rule that judges its answer. `prompt` is the user message (the chat
    template is applied by the evaluator); `answer` the reference shown in reports."""

    task: str  # family: one of FAMILIES
    prompt: str
    answer: str
    check: str  # one of CHECKS
    answers: tuple[str, ...] = field(default_factory=tuple)

    def is_correct(self, text: str) -> bool:
        return check_answer(self.check, self.answers, text, self.prompt)

    def as_json(self) -> dict:
        return asdict(self) | {"answers": list(self.answers)}


def _word_in(word: str, text: str, *, case: bool) -> bool:
    flags = 0 if case else re.IGNORECASE
    return re.search(r"(?<![\w])" + re.escape(word) + r"(?![\w])", text, flags) is not None


def _ints(text: str) -> list[int]:
    """The integers written in `text` ("1,000" is one thousand; a sign counts only right before the digits)."""
    return [int(m.replace(",", "")) for m in re.findall(r"-?\d+(?:,\d{3})*(?!\d)", text)]


def _first_new_int(text: str, prompt: str) -> int | None:
    given = {abs(n) for n in _ints(prompt)}
    return next((n for n in _ints(text) if abs(n) not in given), None)


def extract_code(text: str) -> str:
    """The code of an answer: the first fenced block (```python ... ``` or ``` ... ```), else the whole text."""
    m = re.search(r"```[a-zA-Z0-9_+-]*\n(.*?)(```|$)", text, re.DOTALL)
    return m.group(1) if m else text


def run_python_check(code: str, asserts: tuple[str, ...], timeout: float = 5.0) -> bool:
    """Run `code` then `asserts` in a fresh Python (isolated mode, empty environment, a temporary working folder)
    with a time limit; True when it exits 0. The model's code is untrusted text: it never runs in this process."""
    src = code + "\n\n" + "\n".join(f"assert {a}" for a in asserts) + "\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "check.py"
        path.write_text(src)
        try:
            r = subprocess.run([sys.executable, "-I", "-S", str(path)], cwd=tmp, capture_output=True, timeout=timeout,
                               env={"PATH": os.environ.get("PATH", "")}, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return False
    return r.returncode == 0


def check_answer(check: str, answers: tuple[str, ...] | list[str], text: str, prompt: str = "") -> bool:
    """Judge `text` (the assistant's answer, template markers removed) to `prompt` by rule `check` (see the module
    docstring)."""
    if check == "contains":
        return any(_word_in(a, text, case=False) for a in answers)
    if check == "symbol":
        return any(_word_in(a, text, case=True) for a in answers)
    if check == "number":
        return _first_new_int(text, prompt) == int(answers[0])
    if check == "yesno":
        words = re.findall(r"[A-Za-z']+", text)
        return bool(words) and words[0].lower() == answers[0] and len(words) <= 4
    if check == "python":
        return run_python_check(extract_code(text), tuple(answers))
    raise ValueError(f"unknown check {check!r}; allowed: {', '.join(CHECKS)}")


def _capital_prompts(split: str) -> list[CheckedPrompt]:
    out = []
    for country, city in CAPITALS.items():
        if split_of("capital:" + country) == split:
            alts = (city, "Washington, D.C.") if city == "Washington" else (city,)
            alts += ("Kiev",) if city == "Kyiv" else ()
            alts += ("Brasília",) if city == "Brasilia" else ()
            alts += ("Bogotá",) if city == "Bogota" else ()
            out.append(CheckedPrompt("capital", f"What is the capital of {country}?", city, "contains", alts))
    return out


def _element_prompts(split: str) -> list[CheckedPrompt]:
    return [CheckedPrompt("element", f"What is the chemical symbol for {name}?", sym, "symbol", (sym,))
            for name, sym in ELEMENTS.items() if split_of("element:" + name) == split]


def _opposite_prompts(split: str) -> list[CheckedPrompt]:
    return [CheckedPrompt("opposite", f"What is the opposite of the word \"{w}\"?", o, "contains", (o,))
            for w, o in OPPOSITES.items() if split_of("opposite:" + w) == split]


def _yesno_prompts(split: str) -> list[CheckedPrompt]:
    return [CheckedPrompt("yesno", f"Answer with only yes or no. {q}", a, "yesno", (a,))
            for q, a in YESNO if split_of("yesno:" + q) == split]


def _arith_prompts(split: str, n: int = 600) -> list[CheckedPrompt]:
    out, seen = [], set()
    for op, a, b in _arith_items(n, seed=7):
        key = f"arith:{a}{op}{b}"
        if key in seen or split_of(key) != split:
            continue
        seen.add(key)
        v = _arith_value(op, a, b)
        out.append(CheckedPrompt("arithmetic", f"What is {a} {_ARITH_WORDS[op]} {b}?", str(v), "number", (str(v),)))
    return out


def _plural_prompts(split: str) -> list[CheckedPrompt]:
    return [CheckedPrompt("plural", f"What is the plural of the word \"{w}\"?", p, "contains", (p,))
            for w, p in PLURALS.items() if split_of("plural:" + w) == split]


def _count_prompts(split: str) -> list[CheckedPrompt]:
    return [CheckedPrompt("count", q, str(n), "number", (str(n),))
            for q, n in COUNTS if split_of("count:" + q) == split]


def _code_prompts(split: str) -> list[CheckedPrompt]:
    return [CheckedPrompt("code", f"Write a Python function `{name}({sig})` that {what}. Reply with only the code.",
                          f"def {name}({sig}): ...", "python", tuple(asserts))
            for name, sig, what, asserts in CODE_TASKS if split_of("code:" + name) == split]


FAMILIES = ("capital", "element", "arithmetic", "count", "opposite", "plural", "yesno", "code")


def checked_prompts(split: str, *, arithmetic: int = 60) -> list[CheckedPrompt]:
    """The checkable prompts of a held-out split ("dev" or "final"), family by family in a fixed order; at most
    `arithmetic` arithmetic questions (the other families are as long as their item lists allow)."""
    if split not in ("dev", "final"):
        raise ValueError(f"checked prompts exist for the held-out splits dev and final, not {split!r}")
    return (_capital_prompts(split) + _element_prompts(split) + _arith_prompts(split)[:arithmetic]
            + _count_prompts(split) + _opposite_prompts(split) + _plural_prompts(split) + _yesno_prompts(split)
            + _code_prompts(split))


def corpus_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` user prompts for the self-distillation corpus, all from the "train" split: the checkable families'
    train items (phrased several ways) plus open-ended prompts (explain, list, rewrite, haiku, ...). Deterministic
    in (n, seed); the list cycles with new phrasings once the items run out."""
    rng = random.Random(seed)
    pool: list[str] = []
    # (items, split key prefix, phrasings of a train item): the checkable families, each item asked two ways
    asked = [
        (CAPITALS, "capital", ("What is the capital of {}?", "Tell me about the capital city of {}.")),
        (ELEMENTS, "element", ("What is the chemical symbol for {}?", "What is {} used for?")),
        (OPPOSITES, "opposite", ('What is the opposite of the word "{}"?', 'Use the word "{}" in a sentence.')),
        (PLURALS, "plural", ('What is the plural of the word "{}"?', 'Write a sentence with the word "{}".')),
        ([q for q, _ in COUNTS], "count", ("{}", "{} Explain briefly.")),
        ([q for q, _ in YESNO], "yesno", ("Answer with only yes or no. {}", "{}")),
    ]
    for items, key, phrasings in asked:
        pool += [p.format(item) for item in items if split_of(f"{key}:{item}") == "train" for p in phrasings]
    for op, a, b in _arith_items(3000, seed=11):
        if split_of(f"arith:{a}{op}{b}") == "train":
            pool.append(rng.choice([f"What is {a} {_ARITH_WORDS[op]} {b}?", f"Calculate {a} {op} {b}.",
                                    f"Compute {a} {op} {b} and explain the steps."]))
    for name, sig, what, _ in CODE_TASKS:
        if split_of("code:" + name) == "train":
            pool += [f"Write a Python function `{name}({sig})` that {what}. Reply with only the code.",
                     f"Write a Python function that {what}, with a docstring."]
    for topic in TOPICS:
        pool += [t.format(topic=topic) for t in OPEN_TEMPLATES]
    for cat in CATEGORIES:
        pool += [f"List three {cat}.", f"Name five {cat}, separated by commas.", f"What are some common {cat}?"]
    for s in SENTENCES:
        pool += [f"Rewrite this sentence in the past tense: {s}", f"Translate into simple words: {s}",
                 f"Make this sentence longer and more descriptive: {s}"]
    rng.shuffle(pool)
    return [pool[i % len(pool)] for i in range(n)]


def write_checked_prompts(path: str | Path, prompts: list[CheckedPrompt]) -> None:
    from ..atomic import write_text

    write_text(path, "".join(json.dumps(p.as_json()) + "\n" for p in prompts))


def read_checked_prompts(path: str | Path) -> list[CheckedPrompt]:
    """A jsonl file of checkable prompts (fields task, prompt, answer, check, answers); one line per error."""
    from .documents import DataError

    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(d, dict):
            raise DataError(f"{where}: expected a JSON object")
        for key in ("task", "prompt", "check"):
            if not isinstance(d.get(key), str) or not d[key].strip():
                raise DataError(f"{where}: field {key!r} must be a non-empty string")
        if d["check"] not in CHECKS:
            raise DataError(f"{where}: field 'check' is {d['check']!r}; allowed: {', '.join(CHECKS)}")
        answers = d.get("answers")
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise DataError(f"{where}: field 'answers' must be a non-empty list of strings")
        out.append(CheckedPrompt(d["task"], d["prompt"], str(d.get("answer", answers[0])), d["check"], tuple(answers)))
    if not out:
        raise DataError(f"{path}: no prompts")
    return out
