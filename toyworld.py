"""The toy world: a synthetic web crawl and a synthetic problem set, so that every stage runs offline.

The paper mines 35.5M math pages from Common Crawl (§2.1; docs/paper.md §1). The toy crawl is a small
world with the same difficulties, each recorded in ground-truth labels so that data.py can report precision
and recall:

- math pages on dedicated domains (lessons, worked examples), and a separate seed set in the same style
  (the toy's OpenWebMath);
- math hidden in mostly non-math domains, in a forum style the seed set does not cover, under one URL path
  (e.g. talkboard.com/math/...): what iterative domain expansion is for;
- non-math pages of several kinds (news, recipes, sports, travel, forums), many with numbers in them, and
  everyday Python code (the arithmetic programs of program-of-thought are a separate source, the toy's GitHub);
- the same page under several URLs (http/https, www., tracking parameters), near-duplicate copies,
  pages leaking test problems, and junk (stubs, symbol soup, spam repetition).

The problems are GSM8K-like word problems: a start value and 1-3 operations, each solution written as
chain-of-thought (one `a op b = c` line per step, then `\\boxed{}`), as program-of-thought (Python that prints
the answer) and tool-integrated (the program, its ```output block, then `\\boxed{}`). STEPS and MAX_VALUE set
the difficulty.

    python data.py          # builds the toy world and the whole pipeline into out/toy/data
"""

import random
import re

# -----------------------------------------------------------------------------
# Word problems

NAMES = ["Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Iris", "Jack", "Kate", "Leo", "Mia",
         "Noah", "Olivia", "Paul", "Quinn", "Rosa", "Sam", "Tara", "Uma", "Victor", "Wendy", "Yusuf", "Zoe"]
ITEMS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "cookies", "stamps", "shells", "cards",
         "balloons", "candles", "buttons", "eggs", "flowers", "toys", "beads", "rocks", "cups", "hats"]
OPS = {  # op: story templates; {n} is the operand, {p} the pronoun, {o} its object form. Each sentence is short and
    # carries a number, so any 10 words of a question hold two random values: unrelated problems then share no
    # 10-gram, and decontamination (data.py) drops only real leaks.
    "+": ["{p} buys {n} more.", "{p} finds {n} more.", "{p} gets {n} more.", "A friend gives {o} {n} more."],
    "-": ["{p} gives away {n}.", "{p} loses {n}.", "{p} sells {n}.", "{p} uses {n}."],
    "*": ["{p} multiplies them by {n}.", "Then the count grows {n} times."],
    "/": ["{p} keeps one share in {n}.", "{p} divides them by {n}."],
}
SYMBOL = {"+": "+", "-": "-", "*": "*", "/": "/"}
# The difficulty: operations per problem, and the largest value any step reaches. With values up to 30 the SFT
# model never got a third of the arithmetic facts right in 16 samples, and GRPO gained +3 points; up to 20 it
# gets most facts right some of the time, which is what RL sharpens (README, Results).
STEPS, MAX_VALUE = (1, 3), 20
PAGE_STEPS, PAGE_MAX_VALUE = (2, 4), 40  # the web's worked examples are longer than the problem set's


def apply_op(a, op, b):
    return {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]


def make_problem(rng, steps=STEPS, max_value=MAX_VALUE):
    """One word problem with its answer, chain-of-thought and program-of-thought solutions.

    Every intermediate value stays in [0, max_value]; multiplication uses factors 2-5 and division only divides
    evenly, so every step is exact integer arithmetic that a small model can learn digit by digit."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    p, o = ("She", "her") if NAMES.index(name) % 2 == 0 else ("He", "him")
    n_steps = rng.randint(*steps)
    value = rng.randint(2, max_value)
    story, lines, code = [f"{name} has {value} {item}."], [f"{name} starts with {value} {item}."], [f"{item} = {value}"]
    for _ in range(n_steps):
        choices = []
        if value < max_value:
            choices.append(("+", rng.randint(1, max_value - value)))
        if value > 1:
            choices.append(("-", rng.randint(1, value - 1)))
        if 2 * value <= max_value:
            choices.append(("*", rng.randint(2, min(5, max_value // value))))
        divisors = [d for d in range(2, 6) if value % d == 0 and value // d >= 1]
        if divisors:
            choices.append(("/", rng.choice(divisors)))
        op, n = rng.choice(choices)
        new = apply_op(value, op, n)
        story.append(rng.choice(OPS[op]).format(p=p, o=o, n=n, x=item))
        lines.append(f"{value} {SYMBOL[op]} {n} = {new}")
        code.append(f"{item} = {item} {'//' if op == '/' else op} {n}")
        value = new
    question = " ".join(story) + f" How many {item} does {name} have?"
    cot = "\n".join(lines) + f"\nThe answer is \\boxed{{{value}}}."
    pot = "```python\n" + "\n".join(code) + f"\nprint({item})\n```"
    tool = f"Let me count with Python.\n{pot}\n```output\n{value}\n```\nThe answer is \\boxed{{{value}}}."
    return dict(question=question, answer=str(value), cot=cot, pot=pot, tool=tool)


def make_problems(n, seed=0, steps=STEPS, max_value=MAX_VALUE, exclude=()):
    """n distinct problems; none has a question in `exclude` (so train and test splits share no problem)."""
    rng, seen, out = random.Random(seed), set(exclude), []
    while len(out) < n:
        prob = make_problem(rng, steps, max_value)
        if prob["question"] not in seen:
            seen.add(prob["question"])
            out.append(prob)
    return out


# -----------------------------------------------------------------------------
# Pages

TOPICS = {  # non-math kinds: sentence templates, many with numbers in them; a page never repeats a sentence
    "news": ["The city council met on {d} {m} to discuss the new {thing}.", "Officials said {n} people attended.",
             "The mayor promised a decision before {m}.", "Residents raised concerns about traffic near the {thing}.",
             "A spokesperson declined to comment on the {thing}.", "The vote was postponed for the {k}th time.",
             "Local shops reported {n} visitors on opening day.", "The {thing} will cost about {n} thousand.",
             "Protesters gathered outside the {thing} on {d} {m}.", "A new report is expected in {m}."],
    "recipes": ["Preheat the oven to {t} degrees.", "Mix {n} grams of flour with {k} eggs.",
                "Add a pinch of salt and stir the {food} gently.", "Bake for {n} minutes until golden.",
                "Serve the {food} warm with fresh herbs.", "Let the dough rest for {k} hours.",
                "Chop {k} onions and fry them in butter.", "This {food} keeps for {k} days in the fridge.",
                "My grandmother made this {food} every {m}.", "Season to taste before serving."],
    "sports": ["The home team won {k} to {d} on {d} {m}.", "The striker scored twice in the second half.",
               "Fans filled the stadium to watch the {thing} final.", "The coach praised the defence after the game.",
               "It was their {k}th win of the season.", "The league table is tight with {n} games left.",
               "The captain missed {k} weeks with an injury.", "Tickets for the {m} derby sold out in {k} hours.",
               "The referee showed {k} yellow cards.", "{n} supporters travelled to the away game."],
    "travel": ["The old town is a short walk from the {thing}.", "We stayed {k} nights in a small guesthouse.",
               "The train ride took about {n} minutes.", "Do not miss the market on {d} {m}.",
               "The museum is closed on Mondays.", "Locals recommend the {food} at the harbour.",
               "A day pass for the buses costs {k} euros.", "The view from the {thing} is worth the climb.",
               "We visited in {m} and it rained for {k} days.", "Book the ferry at least {k} days ahead."],
    "forum": ["Posted by user{n}: has anyone tried the new {thing}?", "Reply: I bought one last {m}, works fine.",
              "Reply: mine broke after {k} weeks, would not recommend.", "Thread locked by moderator.",
              "Reply: try restarting it, that fixed it for me.", "Posted by user{k}: thanks everyone for the help.",
              "Reply from user{n}: check the settings menu first.", "Reply: same problem here since {m}.",
              "Posted by user{n}: where can I buy a cheap {thing}?", "Reply: the shop near the {thing} has them."],
}
FILL = dict(thing=["bridge", "library", "park", "stadium", "station", "phone", "bike", "camera", "festival"],
            food=["bread", "soup", "pie", "stew", "cake", "salad"],
            m=["January", "March", "May", "July", "September", "November"])


def _sentence(rng, template):
    return template.format(n=rng.randint(2, 500), k=rng.randint(2, 12), d=rng.randint(1, 28),
                           t=rng.choice([180, 200, 220]),
                           **{key: rng.choice(vals) for key, vals in FILL.items()})


def general_page(rng, kind):
    return "\n".join(_sentence(rng, t) for t in rng.sample(TOPICS[kind], rng.randint(5, 9)))


def lesson_page(rng, problems):
    """The seed style: lessons and worked examples, as on a math education site."""
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    parts = [rng.choice([f"Lesson: adding and subtracting numbers up to {max(a, b) + 10}.",
                         "Example: solving word problems step by step.", "Practice: multiplication and division.",
                         "Worked examples: arithmetic with small numbers."])]
    for prob in problems:
        parts.append(f"Problem: {prob['question']}\nSolution:\n{prob['cot']}")
    drills = [f"{x} {op} {y} = {apply_op(x, op, y)}" for x, op, y in
              ((rng.randint(1, 60), rng.choice("+-*"), rng.randint(1, 12)) for _ in range(rng.randint(4, 10)))]
    parts.append("Check your arithmetic:\n" + "\n".join(drills))
    parts.append(rng.choice(["Remember: addition and multiplication can be done in any order.",
                             "Tip: write one equation per step, then check each result.",
                             "Dividing evenly means there is no remainder."]))
    return "\n\n".join(parts)


def forum_math_page(rng, problems):
    """Math in a forum's words: what the seed set never shows, so the first classifier misses much of it."""
    prob = problems[0]
    steps = prob["cot"].split("\n")[1:-1]
    user, helper = rng.randint(2, 999), rng.randint(2, 999)
    # Some helpers write like a textbook: the first classifier, trained on textbook pages, catches those, which
    # is what lets domain expansion find the forum's math section (paper §2.1).
    textbook = rng.random() < 0.4
    return "\n".join([f"Posted by user{user}: homework help please. {prob['question']}",
                      f"Reply from user{helper}: " + ("Solution:" if textbook else "go one step at a time."), *steps,
                      f"Reply from user{helper}: " + (f"The answer is \\boxed{{{prob['answer']}}}." if textbook
                                                      else f"so the total is {prob['answer']}."),
                      rng.choice(["Reply: thanks, that makes sense now!", "Reply: I got the same number.",
                                  "Thread marked as solved."])])


SNIPPETS = ["{a} = [line.strip() for line in open('{f}.txt')]\nprint(', '.join(sorted({a})))",
            "import json\n{a} = json.load(open('{f}.json'))\nprint({a}.get('{b}', '{c}'))",
            "def {b}_{c}({a}):\n    return f'{{{a}}} is {c}'\n\nprint({b}_{c}('{f}'))",
            "{a} = {b}.lower().split()\nprint(max(set({a}), key={a}.count))",
            "for {a} in sorted(os.listdir('{f}')):\n    if {a}.endswith('.{c}'):\n        print({a})",
            "class {B}:\n    def __init__(self):\n        self.{a} = []\n"
            "    def add(self, {b}):\n        self.{a}.append({b})",
            "with open('{f}.log') as {b}:\n    {a} = [line for line in {b} if '{C}' in line]",
            "url = base + '/api/{a}?{b}=' + {c}\nresponse = session.get(url, timeout=timeout_{f})"]
IDENTS = ["users", "items", "rows", "names", "config", "data", "lines", "records", "tags", "files", "queue", "cache",
          "parser", "result", "buffer", "entries", "tokens", "events", "orders", "notes", "txt", "csv", "py", "md"]


def programming_page(rng):
    """Everyday programming with no arithmetic: the crawl's non-math code."""
    return rng.choice(["Python tips for beginners.", "Snippets I keep reusing.", "How to read files in Python."]) + \
        "\n\n" + "\n\n".join("```python\n" + s.format(**_idents(rng)) + "\n```"
                             for s in rng.sample(SNIPPETS, rng.randint(2, 4)))


def _idents(rng):
    a, b, c, f = rng.sample(IDENTS, 4)
    return dict(a=a, b=b, c=c, f=f + str(rng.randint(1, 99)), B=b.title(), C=c.upper())


def code_page(rng, problems):
    """Python programs that compute and print: the toy's GitHub, the source of program-of-thought skills."""
    blocks = [p["pot"] + f"\nOutput: {p['answer']}" for p in problems]
    return rng.choice(["Python snippets for everyday counting.", "Short scripts: variables and arithmetic.",
                       "Learn Python by computing small totals."]) + "\n\n" + "\n\n".join(blocks)


def junk_page(rng):
    kind = rng.choice(["stub", "symbols", "spam"])
    if kind == "stub":
        return rng.choice(["404 Not Found", "Loading...", "Please enable JavaScript.", "Access denied."])
    if kind == "symbols":
        return " ".join("".join(rng.choice("#$%&*@!~^|<>{}[]") for _ in range(rng.randint(3, 9))) for _ in range(60))
    return "\n".join(["BUY CHEAP WATCHES NOW click here best price"] * rng.randint(20, 40))


MATH_DOMAINS = ["mathlessons.org", "arith-academy.net", "numberhelp.edu", "mathpractice.com", "sumworks.org"]
SEED_DOMAINS = ["openmathweb.org", "mathexamples.net"]  # the seed set's own domains, never in the crawl
MIXED_DOMAINS = ["talkboard.com", "everythingforum.net", "askaround.org"]  # general forums with a /math/ section
GENERAL_DOMAINS = {"news": ["dailytimes.com", "citypost.net"], "recipes": ["homecooking.org", "tastyplates.com"],
                   "sports": ["scoreline.com", "matchday.net"], "travel": ["wanderguide.com", "tripnotes.org"],
                   "forum": MIXED_DOMAINS + ["chatterbox.net", "boardhub.org", "opentalk.com"]}
CODE_DOMAINS = ["pysnippets.dev", "codeexamples.io"]


def make_crawl(n_pages, test_problems, seed=0):
    """A synthetic crawl. Returns (pages, labels): pages are {"url", "text"} in crawl order; labels, keyed by
    url, say what each page really is: kind (lesson, forum_math, code, junk, or a general kind), math (bool),
    dup_of (the url of the page it copies, for URL and near duplicates), contaminated (leaks a test problem)."""
    rng = random.Random(seed)
    # Templated text repeats phrases ("then the count grows 2 times"), so a random problem can share a 10-gram
    # with a test problem by chance. The crawl uses none of those: only the planted leaks carry test text, and
    # the `contaminated` label means exactly what 10-gram decontamination (data.py) looks for.
    test_grams = set().union(*(_ngrams(p["question"]) | _ngrams(p["cot"]) for p in test_problems))
    pool = [p for p in make_problems(max(200, n_pages // 2), seed=seed + 1, steps=PAGE_STEPS, max_value=PAGE_MAX_VALUE,
                                     exclude={p["question"] for p in test_problems})
            if not (_ngrams(p["question"]) | _ngrams(p["cot"])) & test_grams]
    pages, labels = [], {}

    def add(url, text, kind, math, dup_of=None, contaminated=False):
        pages.append(dict(url=url, text=text))
        labels[url] = dict(kind=kind, math=math, dup_of=dup_of, contaminated=contaminated)

    for i in range(n_pages):
        r = rng.random()
        if r < 0.22:
            dom = rng.choice(MATH_DOMAINS)
            add(f"https://{dom}/lesson/{i}", lesson_page(rng, rng.sample(pool, rng.randint(1, 3))), "lesson", True)
        elif r < 0.32:
            dom = rng.choice(MIXED_DOMAINS)
            add(f"https://{dom}/math/thread/{i}", forum_math_page(rng, rng.sample(pool, 1)), "forum_math", True)
        elif r < 0.40:
            add(f"https://{rng.choice(CODE_DOMAINS)}/snippet/{i}", programming_page(rng), "code", False)
        elif r < 0.43:
            add(f"https://{rng.choice(list(GENERAL_DOMAINS['news']))}/page/{i}", junk_page(rng), "junk", False)
        else:
            kind = rng.choice(list(TOPICS))
            dom = rng.choice(GENERAL_DOMAINS[kind])
            section = "general/thread" if kind == "forum" else kind
            add(f"https://{dom}/{section}/{i}", general_page(rng, kind), kind, False)

    originals = list(pages)
    for _ in range(n_pages // 20):  # the same page at another spelling of its URL
        page = rng.choice(originals)
        url = page["url"]
        variant = rng.choice([url.replace("https://", "http://"), url.replace("https://", "https://www."),
                              url + "/", url + "?utm_source=newsletter", url + "#comments"])
        lab = labels[page["url"]]
        add(variant, page["text"], lab["kind"], lab["math"], dup_of=page["url"])
    for j in range(n_pages // 20):  # near-duplicates: mirrored copies with a banner and a word or two changed
        page = rng.choice(originals)
        words = page["text"].split(" ")
        for _ in range(rng.randint(0, 2) if len(words) >= 100 else 0):  # stays above Jaccard 0.8
            words[rng.randrange(len(words))] = rng.choice(["the", "a", "this", "that"])
        lab = labels[page["url"]]
        host = page["url"].split("/")[2]
        add(f"https://mirror{j % 7}.{host}/copy/{j}", " ".join(words) + "\nMirrored for offline reading.",
            lab["kind"], lab["math"], dup_of=page["url"])
    for j, prob in enumerate(rng.sample(test_problems, min(len(test_problems), max(1, n_pages // 100)))):
        dom = rng.choice(MATH_DOMAINS)  # leaked test problems, with their solutions
        add(f"https://{dom}/leak/{j}", f"Homework answers.\nProblem: {prob['question']}\nSolution:\n{prob['cot']}",
            "lesson", True, contaminated=True)
    order = list(range(len(pages)))
    rng.shuffle(order)
    return [pages[i] for i in order], labels


def _ngrams(text, n=10):
    ws = re.findall(r"\w+", text.lower())
    return {tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)}


def make_seed(n_pages, seed=0):
    """The seed positives (the paper's OpenWebMath): lesson-style pages on their own domains."""
    rng = random.Random(seed + 7)
    pool = make_problems(n_pages * 2, seed=seed + 8, steps=PAGE_STEPS, max_value=PAGE_MAX_VALUE)
    return [dict(url=f"https://{rng.choice(SEED_DOMAINS)}/page/{i}", text=lesson_page(rng, rng.sample(pool, 2)))
            for i in range(n_pages)]
