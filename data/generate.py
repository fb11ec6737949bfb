"""Write the shipped task data: ``python data/generate.py [--out DIR]`` (default: this folder).

Small task families stand in for the paper's hub datasets, in the same row schemas, so that
``molf.lab.tasks`` serves both. Standard library only; every random choice comes from
``random.Random(SEED + offset)`` (one generator per task), rows are written in a fixed order with a
fixed JSON layout, so rerunning the script reproduces every file byte for byte.

sql   text-to-SQL in the schema of ``gretelai/synthetic_text_to_sql`` (``id``, ``domain``,
      ``sql_complexity``, ``sql_prompt``, ``sql_context``, ``sql``). Seven schemas (employees,
      products, students, flights, patients, movies, vessels), each row with its own small random
      table contents; thirteen query shapes (filters, COUNT, aggregates, GROUP BY, ORDER BY/LIMIT,
      JOIN). Every question text is distinct; shapes are drawn round-robin so that rare shapes are not
      swamped. Asserted here: every context runs in sqlite, every gold query runs on its own context
      and returns a non-empty, non-NULL result (COUNT > 0), and ORDER BY ... LIMIT answers have no ties
      at the cut. 1000 train / 100 validation / 100 test.
sql2  sql's thirteen question shapes on schemas a split never shares: sql's seven schemas and nine more
      (SQL2_EXTRA_DOMAINS). Train draws from ten schemas, validation from two (farms, restaurants) and
      test from four (vessels, hotels, power plants, animals; SQL2_SPLIT_DOMAINS), so no table, column
      or category value of a held-out schema is ever trained on (only the generic column ``name`` and
      people's names recur): a model has to read the schema in the prompt and map the question's
      words onto it. On sql, where every test question's template and schema are trained, FFT and
      LoRA both reach 100% execution accuracy; sql2 asks for the transfer that sql cannot measure.
      Distinct questions within each split; every shape in every split; the same checks on contexts
      and gold queries as sql. 1000 train / 100 validation / 400 test.
fact  counterfactual knowledge injection in the schema of CounterFact (``case_id``,
      ``requested_rewrite`` {``prompt`` with ``{}`` for the subject, ``relation_id``, ``subject``,
      ``target_true`` {``str``}, ``target_new`` {``str``}}, ``paraphrase_prompts``,
      ``neighborhood_prompts``). Four relations (official language P37, continent P30, currency P38,
      country of a city P17). KNOWN_FACTS lists only facts SmolLM2-135M-Instruct already knows: on
      the relation's rewrite prompt, the true answer's first token scored highest among the first tokens
      of all the relation's answers (checked once with the model; the list is frozen here). For each
      answer, two known subjects are held back as neighbours and never rewritten (so training on all
      rewrites at once cannot touch them); every other known subject becomes a record whose
      ``target_new`` is another answer of the relation with a different first word. The rewrite prompt
      is the relation's first template, the two paraphrases its other two templates.
      Knowledge injection trains on the facts it then tests: ``train`` holds every record,
      ``test`` the records with ``case_id % 5 == 0`` and ``validation`` those with
      ``case_id % 10 == 1``; both are subsets of ``train`` on purpose.
mcq   four-option questions in the schema of MedMCQA (``id``, ``question``, ``opa``..``opd``, ``cop``
      0..3, ``choice_type``, ``exp``, ``subject_name``, ``topic_name``) from domains whose answers are
      computed, not recalled from a source: drug dose by body weight, infusion rates, unit
      conversions, arithmetic and chemical symbols. Distinct question texts; in every split the
      correct option sits equally often at A, B, C and D. 1000 train / 100 validation / 100 test.
mcq2  four-option questions in the same schema (plus ``category``, ``cue``, ``group`` and ``quadruple``)
      that a small model can answer from what it already knows: "Which of these is the same kind of
      thing as oak?" with one common word from each of the four neighbouring categories of a group
      (MCQ2_GROUPS: fruit, vegetable, grain, herb or spice; mammal, bird, fish, insect; ...; 24
      categories, no word in two), so every distractor is a near miss and the category is never named:
      the model has to place the cue and the options itself. Questions come in quadruples: the same
      four words, each one the answer once (with a cue of its category), so any rule that looks only
      at the options (longest, shortest, alphabetical, most often right in train, ...) is right exactly
      once per quadruple; the correct option sits equally often at A, B, C and D in every split. Each
      category's words are cut into disjoint train / validation / test pools, answers and cues alike,
      so no test word is trained on. 800 train / 100 validation / 200 test.
"""
from __future__ import annotations

import argparse
import json
import random
import sqlite3
from pathlib import Path

SEED = 20260507
SPLIT_SIZES = {"train": 1000, "validation": 100, "test": 100}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def split_in_order(rows: list[dict]) -> dict[str, list[dict]]:
    """Cut an already shuffled list into the three splits of SPLIT_SIZES, in order."""
    splits, start = {}, 0
    for name, size in SPLIT_SIZES.items():
        splits[name] = rows[start:start + size]
        start += size
    assert start == len(rows), (start, len(rows))
    return splits


# --------------------------------------------------------------------------------------------- sql

FIRST_NAMES = ["Alice", "Bob", "Carla", "David", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jamal",
               "Kofi", "Lena", "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara"]
LAST_NAMES = ["Smith", "Garcia", "Chen", "Okafor", "Novak", "Silva", "Kim", "Haddad", "Brown", "Rossi"]

TITLE_WORDS = (["Silent", "Golden", "Hidden", "Last", "Broken", "Crimson", "Distant", "Frozen"],
               ["River", "Empire", "Garden", "Signal", "Harbor", "Summer", "Machine", "Echo"])
SHIP_WORDS = (["Northern", "Ocean", "Blue", "Star", "Sea", "Iron", "Pacific", "Coral"],
              ["Spirit", "Voyager", "Pearl", "Falcon", "Trader", "Breeze", "Dawn", "Titan"])
PRODUCT_WORDS = (["Deluxe", "Classic", "Mini", "Smart", "Eco", "Pro", "Retro", "Ultra"],
                 ["Kite", "Lamp", "Blender", "Racket", "Speaker", "Planter", "Puzzle", "Notebook"])

# One schema per domain. name: the identifying text column; name_parts (optional): the two word lists
# a row's name is drawn from (else a person's name); group: a category column; nums: two numeric
# columns (column, words, low, high, step); lookup: the second table of JOIN questions, which maps
# each group value to an attribute.
SQL_DOMAINS = [
    {"domain": "human resources", "table": "employees", "entity": "employees", "singular": "employee",
     "name": ("name", "names", "name", "people"),
     "group": ("department", ["Sales", "Marketing", "Engineering", "Finance", "Legal", "Support"]),
     "in_group": "in the '{}' department", "per_group": "in each department",
     "nums": [("salary", "salary", 30000, 150000, 500), ("age", "age", 21, 65, 1)],
     "lookup": ("departments", "city", ["Boston", "Chicago", "Denver", "Seattle"],
                "whose department is based in '{}'")},
    {"domain": "retail", "table": "products", "entity": "products", "singular": "product",
     "name": ("name", "names", "name", "products"), "name_parts": PRODUCT_WORDS,
     "group": ("category", ["Toys", "Books", "Garden", "Kitchen", "Sports", "Music"]),
     "in_group": "in the '{}' category", "per_group": "in each category",
     "nums": [("price", "price", 2, 400, 0.25), ("stock", "stock level", 0, 600, 1)],
     "lookup": ("category_managers", "manager", ["Ava Lopez", "Ben Carter", "Chloe Wong", "Dan Meyer"],
                "whose category is managed by '{}'")},
    {"domain": "education", "table": "students", "entity": "students", "singular": "student",
     "name": ("name", "names", "name", "people"),
     "group": ("major", ["Physics", "History", "Biology", "Economics", "Art", "Chemistry"]),
     "in_group": "majoring in '{}'", "per_group": "for each major",
     "nums": [("gpa", "GPA", 2.0, 4.0, 0.01), ("credits", "number of credits", 10, 180, 1)],
     "lookup": ("majors", "faculty", ["Science", "Humanities", "Social Sciences", "Fine Arts"],
                "whose major belongs to the '{}' faculty")},
    {"domain": "aviation", "table": "flights", "entity": "flights", "singular": "flight",
     "name": ("flight_code", "flight codes", "flight code", "codes"),
     "group": ("airline", ["Delta", "Lufthansa", "Emirates", "Qantas", "Air Canada", "KLM"]),
     "in_group": "operated by '{}'", "per_group": "for each airline",
     "nums": [("distance", "distance", 200, 9000, 10), ("passengers", "passenger count", 40, 400, 1)],
     "lookup": ("airlines", "alliance", ["SkyTeam", "Star Alliance", "Oneworld", "Independent"],
                "whose airline belongs to the '{}' alliance")},
    {"domain": "healthcare", "table": "patients", "entity": "patients", "singular": "patient",
     "name": ("name", "names", "name", "people"),
     "group": ("ward", ["Cardiology", "Oncology", "Pediatrics", "Neurology", "Orthopedics", "Maternity"]),
     "in_group": "in the '{}' ward", "per_group": "in each ward",
     "nums": [("age", "age", 1, 95, 1), ("stay_days", "length of stay", 1, 60, 1)],
     "lookup": ("wards", "building", ["North", "South", "East", "West"],
                "whose ward is in the '{}' building")},
    {"domain": "entertainment", "table": "movies", "entity": "movies", "singular": "movie",
     "name": ("title", "titles", "title", "films"), "name_parts": TITLE_WORDS,
     "group": ("studio", ["Pixar", "Ghibli", "Warner", "Lionsgate", "A24", "Gaumont"]),
     "in_group": "produced by '{}'", "per_group": "for each studio",
     "nums": [("runtime", "runtime", 70, 200, 1), ("budget", "budget", 1, 300, 1)],
     "lookup": ("studios", "country", ["USA", "Japan", "France", "Canada"],
                "whose studio is based in '{}'")},
    {"domain": "maritime", "table": "vessels", "entity": "vessels", "singular": "vessel",
     "name": ("name", "names", "name", "ships"), "name_parts": SHIP_WORDS,
     "group": ("home_port", ["Rotterdam", "Singapore", "Hamburg", "Busan", "Santos", "Durban"]),
     "in_group": "registered in the port of '{}'", "per_group": "for each home port",
     "nums": [("tonnage", "tonnage", 500, 90000, 100), ("max_speed", "maximum speed", 8, 35, 0.5)],
     "lookup": ("ports", "region", ["Europe", "Asia", "Americas", "Africa"],
                "whose home port is in the '{}' region")},
]
# sql2's nine further schemas (same keys as SQL_DOMAINS).
SQL2_EXTRA_DOMAINS = [
    {"domain": "library", "table": "books", "entity": "books", "singular": "book",
     "name": ("title", "titles", "title", "books"), "name_parts": TITLE_WORDS,
     "group": ("genre", ["Mystery", "Fantasy", "Romance", "Poetry", "Biography", "Travel"]),
     "in_group": "in the '{}' genre", "per_group": "for each genre",
     "nums": [("pages", "page count", 80, 900, 1), ("year", "publication year", 1900, 2024, 1)],
     "lookup": ("genres", "shelf", ["Shelf A", "Shelf B", "Shelf C", "Shelf D"],
                "whose genre is kept on '{}'")},
    {"domain": "sports", "table": "players", "entity": "players", "singular": "player",
     "name": ("name", "names", "name", "people"),
     "group": ("team", ["Lions", "Tigers", "Eagles", "Sharks", "Wolves", "Bears"]),
     "in_group": "playing for the '{}'", "per_group": "for each team",
     "nums": [("goals", "number of goals", 0, 60, 1), ("matches", "number of matches", 1, 80, 1)],
     "lookup": ("teams", "league", ["North League", "South League", "East League", "West League"],
                "whose team plays in the '{}'")},
    {"domain": "automotive", "table": "cars", "entity": "cars", "singular": "car",
     "name": ("model", "models", "model", "cars"),
     "name_parts": (["Swift", "Urban", "Falcon", "Nova", "Terra", "Volt", "Astra", "Zen"],
                    ["GT", "LX", "Sport", "One", "EV", "Cross", "Plus", "X"]),
     "group": ("maker", ["Toyota", "Ford", "Honda", "Volvo", "Fiat", "Kia"]),
     "in_group": "made by '{}'", "per_group": "for each maker",
     "nums": [("horsepower", "horsepower", 60, 600, 5), ("price", "price", 8000, 120000, 500)],
     "lookup": ("makers", "dealer", ["Metro Motors", "City Cars", "Auto Hub", "Drive Inn"],
                "whose maker is sold by '{}'")},
    {"domain": "agriculture", "table": "farms", "entity": "farms", "singular": "farm",
     "name": ("farm_name", "farm names", "farm name", "farms"),
     "name_parts": (["Green", "Sunny", "Old", "Red", "Willow", "Maple", "Stone", "Hill"],
                    ["Acres", "Farm", "Fields", "Ranch", "Meadow", "Valley", "Creek", "Orchard"]),
     "group": ("crop", ["Wheat", "Rice", "Maize", "Barley", "Soy", "Cotton"]),
     "in_group": "growing '{}'", "per_group": "for each crop",
     "nums": [("area", "area", 5, 900, 5), ("yield_tons", "yield in tons", 10, 5000, 10)],
     "lookup": ("crops", "season", ["Spring", "Summer", "Autumn", "Winter"], "whose crop is sown in '{}'")},
    {"domain": "hospitality", "table": "hotels", "entity": "hotels", "singular": "hotel",
     "name": ("name", "names", "name", "hotels"),
     "name_parts": (["Grand", "Royal", "Park", "Plaza", "City", "Garden", "Palace", "Harbor"],
                    ["Hotel", "Inn", "Suites", "Lodge", "Resort", "House", "Residence", "Stay"]),
     "group": ("location", ["Paris", "Rome", "Lisbon", "Vienna", "Prague", "Madrid"]),
     "in_group": "located in '{}'", "per_group": "for each location",
     "nums": [("rooms", "number of rooms", 10, 500, 1), ("rating", "rating", 1.0, 5.0, 0.1)],
     "lookup": ("locations", "zone", ["Zone 1", "Zone 2", "Zone 3", "Zone 4"], "whose location is in '{}'")},
    {"domain": "music", "table": "albums", "entity": "albums", "singular": "album",
     "name": ("title", "titles", "title", "albums"),
     "name_parts": (["Midnight", "Electric", "Velvet", "Neon", "Wild", "Lonely", "Paper", "Glass"],
                    ["Hearts", "Dreams", "Roads", "Lights", "Waves", "Stories", "Skies", "Rooms"]),
     "group": ("label", ["Motown", "Atlantic", "Capitol", "Sub Pop", "Island", "Rough Trade"]),
     "in_group": "released on the '{}' label", "per_group": "for each label",
     "nums": [("tracks", "number of tracks", 6, 24, 1), ("length_min", "length in minutes", 25, 90, 1)],
     "lookup": ("labels", "owner", ["Universal", "Sony", "Warner Music", "Independent"],
                "whose label is owned by '{}'")},
    {"domain": "restaurants", "table": "restaurants", "entity": "restaurants", "singular": "restaurant",
     "name": ("name", "names", "name", "restaurants"),
     "name_parts": (["Blue", "Golden", "Little", "Olive", "Spice", "Rustic", "Lucky", "Corner"],
                    ["Bistro", "Kitchen", "Table", "Grill", "Diner", "Cafe", "Tavern", "Terrace"]),
     "group": ("cuisine", ["Italian", "Thai", "Mexican", "Indian", "Greek", "Korean"]),
     "in_group": "serving '{}' food", "per_group": "for each cuisine",
     "nums": [("seats", "number of seats", 12, 250, 1), ("menu_items", "number of menu items", 10, 120, 1)],
     "lookup": ("cuisines", "spice_level", ["Mild", "Medium", "Hot", "Very Hot"], "whose cuisine is rated '{}'")},
    {"domain": "energy", "table": "power_plants", "entity": "power plants", "singular": "power plant",
     "name": ("plant_code", "plant codes", "plant code", "plants"),
     "name_parts": (["Upper", "Lower", "Central", "Coastal", "Ridge", "Delta", "Summit", "Prairie"],
                    ["Station", "Plant", "Works", "Facility", "Unit", "Hub", "Array", "Park"]),
     "group": ("fuel", ["Solar", "Wind", "Hydro", "Coal", "Gas", "Nuclear"]),
     "in_group": "running on '{}'", "per_group": "for each fuel",
     "nums": [("capacity_mw", "capacity in megawatts", 5, 2000, 5), ("staff", "number of staff", 5, 900, 1)],
     "lookup": ("fuels", "grid_operator", ["GridCo", "PowerNet", "VoltLine", "EnerLink"],
                "whose fuel is dispatched by '{}'")},
    {"domain": "zoo", "table": "animals", "entity": "animals", "singular": "animal",
     "name": ("name", "names", "name", "animals"),
     "name_parts": (["Happy", "Big", "Tiny", "Old", "Swift", "Brave", "Sleepy", "Shy"],
                    ["Leo", "Max", "Kiki", "Bubbles", "Rocky", "Daisy", "Ziggy", "Coco"]),
     "group": ("species", ["Lion", "Zebra", "Panda", "Giraffe", "Otter", "Penguin"]),
     "in_group": "of the species '{}'", "per_group": "for each species",
     "nums": [("weight_kg", "weight in kilograms", 1, 900, 1), ("age_years", "age in years", 1, 40, 1)],
     "lookup": ("species_info", "habitat", ["Savanna", "Forest", "Ocean", "Mountains"],
                "whose species lives in the '{}' habitat")},
]
SQL2_DOMAINS = SQL_DOMAINS + SQL2_EXTRA_DOMAINS
# sql2 holds whole schemas out: no table, column or value of a validation or test schema is trained on.
SQL2_SPLIT_DOMAINS = {
    "validation": {"agriculture", "restaurants"},
    "test": {"maritime", "hospitality", "energy", "zoo"},
}
SQL2_SPLIT_DOMAINS["train"] = {d["domain"] for d in SQL2_DOMAINS} - set().union(*SQL2_SPLIT_DOMAINS.values())
SQL2_SPLIT_SIZES = {"train": 1000, "validation": 100, "test": 400}
AGGREGATES = [("AVG", "average"), ("SUM", "total"), ("MAX", "highest"), ("MIN", "lowest")]
SQL_SHAPES = ["select_eq", "select_two_columns", "select_threshold", "count_eq", "count_threshold",
              "aggregate_eq", "group_count", "group_aggregate", "group_top", "order_limit",
              "join_select", "join_count", "join_aggregate"]


def threshold_values(low, high, step) -> list:
    """Eight round thresholds spread over a column's range."""
    values = []
    for i in range(1, 9):
        value = low + (high - low) * i / 9
        value = round(value / step) * step
        values.append(int(value) if float(value).is_integer() else round(value, 2))
    return values


def sql_literal(value) -> str:
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(value)


def sql_question_specs(domain: dict) -> list[dict]:
    """Every (shape, parameters) question of one domain, with its text and gold SQL."""
    t, d = domain["table"], domain
    name_col, name_words, name_word, _ = d["name"]
    group_col, group_values = d["group"]
    lookup_table, attribute, attribute_values, lookup_phrase = d["lookup"]
    join = f"{t} JOIN {lookup_table} ON {t}.{group_col} = {lookup_table}.{group_col}"
    specs = []

    def add(shape, question, sql, **tie_check):
        specs.append({"shape": shape, "question": question, "sql": sql, **tie_check})

    for v in group_values:
        where = f"WHERE {group_col} = {sql_literal(v)}"
        in_group = d["in_group"].format(v)
        add("select_eq", f"List the {name_words} of {d['entity']} {in_group}.",
            f"SELECT {name_col} FROM {t} {where};")
        add("count_eq", f"How many {d['entity']} are {in_group}?", f"SELECT COUNT(*) FROM {t} {where};",
            group=v)
        for col, words, *_ in d["nums"]:
            add("select_two_columns", f"Show the {name_word} and {words} of every {d['singular']} {in_group}.",
                f"SELECT {name_col}, {col} FROM {t} {where};")
            for fn, fn_words in AGGREGATES:
                add("aggregate_eq", f"What is the {fn_words} {words} of {d['entity']} {in_group}?",
                    f"SELECT {fn}({col}) FROM {t} {where};")
    add("group_count", f"How many {d['entity']} are there {d['per_group']}?",
        f"SELECT {group_col}, COUNT(*) FROM {t} GROUP BY {group_col};")
    group_word = group_col.replace("_", " ")
    for col, words, low, high, step in d["nums"]:
        for x in threshold_values(low, high, step):
            for op, op_words in ((">", "greater than"), ("<", "less than")):
                add("select_threshold", f"Which {d['entity']} have a {words} {op_words} {x}? List their {name_words}.",
                    f"SELECT {name_col} FROM {t} WHERE {col} {op} {x};")
            add("count_threshold", f"How many {d['entity']} have a {words} of at least {x}?",
                f"SELECT COUNT(*) FROM {t} WHERE {col} >= {x};")
        for fn, fn_words in AGGREGATES:
            add("group_aggregate", f"What is the {fn_words} {words} {d['per_group']}?",
                f"SELECT {group_col}, {fn}({col}) FROM {t} GROUP BY {group_col};")
        for order, order_words in (("DESC", "highest"), ("ASC", "lowest")):
            for fn, fn_words in AGGREGATES[:2]:
                add("group_top", f"Which {group_word} has the {order_words} {fn_words} {words}?",
                    f"SELECT {group_col} FROM {t} GROUP BY {group_col} ORDER BY {fn}({col}) {order} LIMIT 1;",
                    ranking=f"SELECT {fn}({col}) FROM {t} GROUP BY {group_col} ORDER BY {fn}({col}) {order};",
                    limit=1)
            for k in range(1, 5):
                if k == 1:
                    question = f"What is the {name_word} of the {d['singular']} with the {order_words} {words}?"
                else:
                    question = f"List the {name_words} of the {k} {d['entity']} with the {order_words} {words}."
                add("order_limit", question, f"SELECT {name_col} FROM {t} ORDER BY {col} {order} LIMIT {k};",
                    ranking=f"SELECT {col} FROM {t} ORDER BY {col} {order};", limit=k)
    for a in attribute_values:
        where = f"WHERE {lookup_table}.{attribute} = {sql_literal(a)}"
        phrase = lookup_phrase.format(a)
        add("join_select", f"List the {name_words} of {d['entity']} {phrase}.",
            f"SELECT {t}.{name_col} FROM {join} {where};")
        add("join_count", f"Count the {d['entity']} {phrase}.", f"SELECT COUNT(*) FROM {join} {where};",
            attribute=a)
        for col, words, *_ in d["nums"]:
            for fn, fn_words in AGGREGATES[:2]:
                add("join_aggregate", f"What is the {fn_words} {words} of {d['entity']} {phrase}?",
                    f"SELECT {fn}({t}.{col}) FROM {join} {where};")
    return specs


def random_name(rng: random.Random, domain: dict) -> str:
    if domain["table"] == "flights":
        return rng.choice(["DL", "LH", "EK", "QF", "AC", "KL"]) + str(rng.randrange(100, 1000))
    if "name_parts" in domain:
        first, second = domain["name_parts"]
        return f"{rng.choice(first)} {rng.choice(second)}"
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


def random_number(rng: random.Random, low, high, step):
    """A multiple of ``step`` in [low, high]; an int when ``step`` is whole, else rounded to 2 places."""
    value = low + rng.randrange(round((high - low) / step) + 1) * step
    return int(value) if step >= 1 else round(value, 2)


def random_context(rng: random.Random, domain: dict, with_lookup: bool) -> str:
    """CREATE TABLE + INSERT statements for 3 to 5 random rows with distinct names (3 when a JOIN
    question also needs the lookup table, to keep prompts short)."""
    t = domain["table"]
    name_col = domain["name"][0]
    group_col, group_values = domain["group"]
    n = 3 if with_lookup else rng.randint(3, 5)
    names = []
    while len(names) < n:
        name = random_name(rng, domain)
        if name not in names:
            names.append(name)
    columns = [(col, [random_number(rng, low, high, step) for _ in range(n)])
               for col, _, low, high, step in domain["nums"]]
    groups = [rng.choice(group_values) for _ in range(n)]
    num_types = ["INT" if step >= 1 else "REAL" for *_, step in domain["nums"]]
    create = (f"CREATE TABLE {t} (id INT, {name_col} TEXT, {group_col} TEXT, "
              + ", ".join(f"{col} {typ}" for (col, _), typ in zip(columns, num_types)) + ");")
    column_list = ", ".join(["id", name_col, group_col] + [col for col, _ in columns])
    values = ", ".join(
        "(" + ", ".join([str(i + 1), sql_literal(names[i]), sql_literal(groups[i])]
                        + [sql_literal(vals[i]) for _, vals in columns]) + ")" for i in range(n))
    statements = [create, f"INSERT INTO {t} ({column_list}) VALUES {values};"]
    if with_lookup:
        lookup_table, attribute, attribute_values, _ = domain["lookup"]
        present = sorted(set(groups), key=group_values.index)
        pairs = ", ".join(f"({sql_literal(g)}, {sql_literal(rng.choice(attribute_values))})" for g in present)
        statements += [f"CREATE TABLE {lookup_table} ({group_col} TEXT, {attribute} TEXT);",
                       f"INSERT INTO {lookup_table} ({group_col}, {attribute}) VALUES {pairs};"]
    return " ".join(statements)


def run_sql(context: str, query: str) -> list[tuple]:
    connection = sqlite3.connect(":memory:")
    try:
        connection.executescript(context)
        return connection.execute(query).fetchall()
    finally:
        connection.close()


def gold_result_is_usable(spec: dict, context: str) -> bool:
    """Non-empty, no NULL, COUNT > 0, and no tie at an ORDER BY ... LIMIT k cut."""
    rows = run_sql(context, spec["sql"])
    if not rows or any(value is None for row in rows for value in row):
        return False
    if spec["sql"].startswith("SELECT COUNT(*)") and rows[0][0] == 0:
        return False
    if "ranking" in spec:  # the ordering key of every candidate row, best first
        ranked, k = run_sql(context, spec["ranking"]), spec["limit"]
        if len(ranked) < k or (len(ranked) > k and ranked[k - 1] == ranked[k]):
            return False
    return True


def sql_rows(rng: random.Random, domains: list[dict], total: int, first_id: int = 1) -> list[dict]:
    """``total`` rows of distinct questions from ``domains``, ids counting up from ``first_id``: the query
    shapes take turns so that rare shapes are not swamped; each row gets its own random tables."""
    pools = {shape: [] for shape in SQL_SHAPES}
    for domain in domains:
        for spec in sql_question_specs(domain):
            pools[spec["shape"]].append({**spec, "domain_spec": domain})
    for shape in SQL_SHAPES:
        rng.shuffle(pools[shape])
    chosen, seen = [], set()
    while len(chosen) < total:
        progressed = False
        for shape in SQL_SHAPES:
            if pools[shape] and len(chosen) < total:
                spec = pools[shape].pop()
                assert spec["question"] not in seen, spec["question"]
                seen.add(spec["question"])
                chosen.append(spec)
                progressed = True
        assert progressed, f"only {len(chosen)} distinct SQL questions, {total} needed"
    rng.shuffle(chosen)
    rows = []
    for index, spec in enumerate(chosen):
        domain = spec["domain_spec"]
        for _ in range(200):
            context = random_context(rng, domain, with_lookup=spec["shape"].startswith("join"))
            if gold_result_is_usable(spec, context):
                break
        else:
            raise AssertionError(f"no usable context for {spec['sql']}")
        rows.append({"id": first_id + index, "domain": domain["domain"], "sql_complexity": spec["shape"],
                     "sql_prompt": spec["question"], "sql_context": context, "sql": spec["sql"]})
    return rows


def generate_sql(rng: random.Random) -> dict[str, list[dict]]:
    return split_in_order(sql_rows(rng, SQL_DOMAINS, sum(SPLIT_SIZES.values())))


def generate_sql2(rng: random.Random) -> dict[str, list[dict]]:
    """sql's questions on unseen schemas: each split draws from its own domains (SQL2_SPLIT_DOMAINS)."""
    out, next_id = {}, 1
    for split, size in SQL2_SPLIT_SIZES.items():
        domains = [d for d in SQL2_DOMAINS if d["domain"] in SQL2_SPLIT_DOMAINS[split]]
        out[split] = sql_rows(rng, domains, size, first_id=next_id)
        next_id += size
    return out


# -------------------------------------------------------------------------------------------- fact

# relation id -> (rewrite template, two paraphrase templates). "{}" stands for the subject.
FACT_TEMPLATES = {
    "P37": ["The official language of {} is", "In {}, the official language is", "{}'s official language is"],
    "P30": ["{} is located in the continent of", "{} is a country in", "The continent where {} lies is"],
    "P38": ["The currency of {} is the", "The official currency of {} is the", "In {}, people pay with the"],
    "P17": ["{} is a city in", "The city of {} is located in", "{} is a large city in the country of"],
}
# Every answer of a relation (also those with too few known subjects: they still serve as target_new).
FACT_ANSWERS = {
    "P37": ["Spanish", "French", "English", "Portuguese", "German", "Arabic", "Russian", "Dutch",
            "Italian", "Chinese"],
    "P30": ["Europe", "Asia", "Africa", "South America", "North America", "Oceania"],
    "P38": ["euro", "rupee", "peso", "dollar", "pound", "franc", "dinar", "riyal", "yen", "won", "ruble"],
    "P17": ["France", "Germany", "Italy", "Spain", "Japan", "China", "India", "Canada", "Australia",
            "Brazil", "Russia", "England", "Egypt", "Turkey", "Mexico", "Poland", "Argentina", "Pakistan"],
}
# Facts SmolLM2-135M-Instruct knows (see the module docstring); answers with fewer than three known
# subjects are left out, since each record needs two other subjects with the same answer as neighbours.
KNOWN_FACTS = {
    "P37": {
        "Spanish": ["Spain", "Mexico", "Argentina", "Colombia", "Peru", "Chile", "Venezuela", "Cuba",
                    "Ecuador", "Bolivia", "Uruguay", "Guatemala", "Honduras", "Paraguay", "Costa Rica",
                    "Panama", "Nicaragua", "El Salvador", "the Dominican Republic"],
        "French": ["France", "Senegal", "Mali", "Monaco", "Niger", "Burkina Faso", "Gabon", "Togo"],
        "English": ["the United Kingdom", "Australia", "New Zealand", "Jamaica", "Nigeria", "Ghana",
                    "Liberia", "Zambia", "Uganda", "Barbados"],
        "Portuguese": ["Brazil", "Portugal", "Angola", "Mozambique", "Guinea-Bissau"],
        "German": ["Germany", "Austria", "Liechtenstein"],
        "Arabic": ["Egypt", "Saudi Arabia", "Iraq", "Syria", "Jordan", "Libya", "Yemen", "Oman", "Kuwait",
                   "Qatar", "Bahrain", "Sudan", "Lebanon", "Tunisia", "Algeria"],
        "Russian": ["Russia", "Belarus", "Kazakhstan", "Kyrgyzstan"],
        "Italian": ["Italy", "San Marino", "Vatican City"],
    },
    "P30": {
        "Europe": ["France", "Germany", "Italy", "Spain", "Poland", "Sweden", "Norway", "Greece", "Portugal",
                   "the Netherlands", "Belgium", "Austria", "Switzerland", "Ireland", "Denmark", "Finland",
                   "Hungary", "Romania", "Ukraine", "Croatia", "Bulgaria", "Serbia", "Iceland", "Czechia"],
        "Asia": ["Thailand", "South Korea", "Mongolia", "the Philippines", "Bangladesh", "Sri Lanka",
                 "Afghanistan", "Myanmar", "Bhutan"],
        "Africa": ["Nigeria", "Kenya", "Ethiopia", "Ghana", "Tanzania", "Uganda", "Angola", "Mozambique",
                   "Zimbabwe", "Zambia", "Cameroon", "Sudan", "Mali", "Somalia", "Rwanda", "Botswana",
                   "Namibia", "Madagascar"],
        "South America": ["Argentina", "Venezuela", "Ecuador", "Paraguay"],
    },
    "P38": {
        "euro": ["Germany", "France", "Italy", "Portugal", "the Netherlands", "Belgium", "Austria", "Ireland",
                 "Finland", "Greece", "Slovakia", "Estonia", "Latvia", "Lithuania", "Croatia"],
        "rupee": ["India", "Pakistan", "Nepal", "Sri Lanka", "Mauritius"],
        "peso": ["Mexico", "Argentina", "Chile", "Colombia", "Cuba", "the Philippines"],
        "dollar": ["the United States", "Canada", "Australia", "New Zealand", "Singapore", "Jamaica", "Fiji",
                   "Namibia", "Zimbabwe"],
    },
    "P17": {
        "France": ["Paris", "Lyon", "Marseille", "Toulouse", "Nice", "Bordeaux", "Lille", "Strasbourg"],
        "Germany": ["Berlin", "Munich", "Hamburg", "Frankfurt", "Cologne", "Stuttgart", "Dresden", "Leipzig",
                    "Düsseldorf"],
        "Italy": ["Rome", "Bologna", "Palermo", "Genoa"],
        "Spain": ["Madrid", "Barcelona", "Valencia", "Bilbao", "Málaga", "Granada", "Zaragoza"],
        "Japan": ["Tokyo", "Osaka", "Kyoto", "Yokohama", "Nagoya", "Sapporo", "Kobe", "Hiroshima", "Fukuoka"],
        "China": ["Beijing", "Shanghai", "Shenzhen", "Guangzhou", "Chengdu", "Wuhan", "Nanjing", "Tianjin"],
        "India": ["Mumbai", "Delhi", "Bangalore", "Kolkata", "Chennai", "Pune", "Jaipur", "Ahmedabad"],
        "Canada": ["Toronto", "Vancouver", "Calgary", "Ottawa", "Edmonton", "Winnipeg"],
        "Australia": ["Sydney", "Melbourne", "Brisbane", "Canberra"],
        "Brazil": ["Rio de Janeiro", "São Paulo", "Brasília"],
        "Russia": ["Moscow", "Saint Petersburg", "Novosibirsk", "Vladivostok"],
        "England": ["Manchester", "Liverpool", "Birmingham", "Bristol"],
        "Turkey": ["Istanbul", "Ankara", "Izmir", "Antalya", "Bursa"],
        "Mexico": ["Cancún", "Tijuana", "Puebla"],
        "Poland": ["Warsaw", "Kraków", "Gdańsk", "Wrocław", "Poznań"],
    },
}
NEIGHBOURS_PER_ANSWER = 2


def fill_subject(template: str, subject: str) -> str:
    """Put the subject into a template; a sentence starts with a capital ("the Netherlands is" -> "The ...")."""
    text = template.replace("{}", subject)
    return text[:1].upper() + text[1:]


def fact_split(case_id: int, split: str) -> bool:
    """The knowledge-injection split rule: train is everything; test and validation are subsets."""
    return {"train": True, "test": case_id % 5 == 0, "validation": case_id % 10 == 1}[split]


def generate_fact(rng: random.Random) -> dict[str, list[dict]]:
    records = []
    for relation, by_answer in KNOWN_FACTS.items():
        rewrite_template, *paraphrase_templates = FACT_TEMPLATES[relation]
        for answer, subjects in by_answer.items():
            neighbours = rng.sample(subjects, NEIGHBOURS_PER_ANSWER)
            new_choices = [a for a in FACT_ANSWERS[relation] if a.split()[0] != answer.split()[0]]
            for subject in subjects:
                if subject in neighbours:
                    continue
                records.append({
                    "requested_rewrite": {
                        "prompt": rewrite_template, "relation_id": relation, "subject": subject,
                        "target_true": {"str": answer}, "target_new": {"str": rng.choice(new_choices)}},
                    "paraphrase_prompts": [fill_subject(t, subject) for t in paraphrase_templates],
                    "neighborhood_prompts": [fill_subject(rewrite_template, n) for n in neighbours],
                })
    rng.shuffle(records)
    records = [{"case_id": i, **record} for i, record in enumerate(records)]
    return {split: [r for r in records if fact_split(r["case_id"], split)]
            for split in ("train", "validation", "test")}


# --------------------------------------------------------------------------------------------- mcq

DRUGS = ["amoxicillin", "paracetamol", "ibuprofen", "gentamicin", "vancomycin", "ceftriaxone",
         "metronidazole", "acyclovir", "phenytoin", "cefazolin"]
FLUIDS = ["normal saline", "Ringer's lactate", "5% dextrose", "plasma", "albumin solution"]
# (unit asked for, unit given, factor: how many of the first in one of the second)
CONVERSIONS = [("milligrams", "grams", 1000), ("grams", "kilograms", 1000), ("millilitres", "litres", 1000),
               ("micrograms", "milligrams", 1000), ("centimetres", "metres", 100),
               ("millimetres", "centimetres", 10), ("minutes", "hours", 60), ("hours", "days", 24),
               ("seconds", "minutes", 60), ("millilitres", "decilitres", 100)]
CONVERSION_AMOUNTS = [0.2, 0.25, 0.4, 0.5, 0.75, 1.2, 1.5, 1.8, 2, 2.5, 3, 3.5, 4, 4.5, 5, 6, 7.5, 8, 9,
                      12, 15, 24, 36]
ELEMENTS = [("hydrogen", "H"), ("helium", "He"), ("lithium", "Li"), ("carbon", "C"), ("nitrogen", "N"),
            ("oxygen", "O"), ("fluorine", "F"), ("neon", "Ne"), ("sodium", "Na"), ("magnesium", "Mg"),
            ("aluminium", "Al"), ("silicon", "Si"), ("phosphorus", "P"), ("sulfur", "S"), ("chlorine", "Cl"),
            ("argon", "Ar"), ("potassium", "K"), ("calcium", "Ca"), ("iron", "Fe"), ("copper", "Cu"),
            ("zinc", "Zn"), ("silver", "Ag"), ("tin", "Sn"), ("iodine", "I"), ("gold", "Au"),
            ("mercury", "Hg"), ("lead", "Pb"), ("tungsten", "W"), ("nickel", "Ni"), ("cobalt", "Co"),
            ("manganese", "Mn"), ("chromium", "Cr"), ("bromine", "Br"), ("platinum", "Pt"),
            ("uranium", "U"), ("barium", "Ba"), ("selenium", "Se"), ("arsenic", "As"), ("boron", "B"),
            ("titanium", "Ti")]


def number(x: float) -> str:
    """A number as people write it: no trailing zeros, no exponent."""
    text = f"{x:.4f}".rstrip("0").rstrip(".")
    return text if text != "-0" else "0"


def distinct_distractors(answer: float, candidates: list[float], rng: random.Random) -> list[float]:
    pool = sorted({round(c, 4) for c in candidates if c > 0 and round(c, 4) != round(answer, 4)})
    assert len(pool) >= 3, (answer, candidates)
    return rng.sample(pool, 3)


def dose_questions(rng: random.Random) -> list[dict]:
    questions = []
    for weight in range(40, 125, 5):
        for per_kg in [0.5, 1, 2, 2.5, 3, 4, 5, 7.5, 10, 15, 20]:
            drug = rng.choice(DRUGS)
            total = weight * per_kg
            wrong = distinct_distractors(total, [total * 10, total / 10, weight + per_kg, total * 2,
                                                 total / 2, total + weight], rng)
            questions.append({
                "question": f"A patient weighing {weight} kg is prescribed {drug} at {number(per_kg)} mg/kg. "
                            f"What is the total dose?",
                "answer": f"{number(total)} mg", "wrong": [f"{number(w)} mg" for w in wrong],
                "exp": f"{weight} kg x {number(per_kg)} mg/kg = {number(total)} mg.",
                "subject_name": "Pharmacology", "topic_name": "Dose calculation"})
    return questions


def infusion_questions(rng: random.Random) -> list[dict]:
    questions = []
    for hours in [2, 3, 4, 5, 6, 8, 10, 12, 16, 24]:
        for rate in range(25, 275, 10):
            volume = rate * hours
            fluid = rng.choice(FLUIDS)
            wrong = distinct_distractors(rate, [rate + 10, rate - 10, rate + 20, rate * 2, volume], rng)
            questions.append({
                "question": f"{volume} mL of {fluid} is to be infused over {hours} hours. "
                            f"What is the infusion rate?",
                "answer": f"{number(rate)} mL/hour", "wrong": [f"{number(w)} mL/hour" for w in wrong],
                "exp": f"{volume} mL / {hours} hours = {rate} mL/hour.",
                "subject_name": "Pharmacology", "topic_name": "Infusion rate"})
    return questions


def conversion_questions(rng: random.Random) -> list[dict]:
    questions = []
    for small, large, factor in CONVERSIONS:
        for amount in CONVERSION_AMOUNTS:
            answer = amount * factor
            wrong = distinct_distractors(answer, [answer * 10, answer / 10, answer * 100, answer / 100,
                                                  amount * (60 if factor != 60 else 100)], rng)
            questions.append({
                "question": f"How many {small} are there in {number(amount)} {large}?",
                "answer": number(answer), "wrong": [number(w) for w in wrong],
                "exp": f"One {large[:-1]} is {factor} {small}, so {number(amount)} x {factor} = {number(answer)}.",
                "subject_name": "Physiology", "topic_name": "Unit conversion"})
    return questions


def arithmetic_questions(rng: random.Random) -> list[dict]:
    questions = []
    pairs = sorted({(rng.randint(12, 99), rng.randint(12, 99)) for _ in range(600)})
    for a, b in pairs:
        if rng.random() < 0.5:
            expression, answer = f"{a} + {b}", a + b
            candidates = [answer + 10, answer - 10, answer + 1, answer - 1, answer + 11]
        else:
            expression, answer = f"{a} x {b}", a * b
            candidates = [answer + a, answer - a, answer + b, answer - b, answer + 10, answer - 10]
        questions.append({"question": f"What is {expression}?", "answer": str(answer),
                          "wrong": [number(w) for w in distinct_distractors(answer, candidates, rng)],
                          "exp": f"{expression} = {answer}.",
                          "subject_name": "Biostatistics", "topic_name": "Arithmetic"})
    return questions


def element_questions(rng: random.Random) -> list[dict]:
    questions = []
    for name, symbol in ELEMENTS:
        others = [e for e in ELEMENTS if e[0] != name]
        picked = rng.sample(others, 3)
        questions.append({"question": f"What is the chemical symbol of {name}?", "answer": symbol,
                          "wrong": [s for _, s in picked], "exp": f"The symbol of {name} is {symbol}.",
                          "subject_name": "Biochemistry", "topic_name": "Chemical symbols"})
        picked = rng.sample(others, 3)
        questions.append({"question": f"Which element has the chemical symbol {symbol}?", "answer": name,
                          "wrong": [n for n, _ in picked], "exp": f"{symbol} is the symbol of {name}.",
                          "subject_name": "Biochemistry", "topic_name": "Chemical symbols"})
    return questions


def generate_mcq(rng: random.Random) -> dict[str, list[dict]]:
    questions = (dose_questions(rng) + infusion_questions(rng) + conversion_questions(rng)
                 + arithmetic_questions(rng) + element_questions(rng))
    texts = [q["question"] for q in questions]
    assert len(set(texts)) == len(texts), "duplicate MCQ question"
    rng.shuffle(questions)
    total = sum(SPLIT_SIZES.values())
    assert len(questions) >= total, (len(questions), total)
    splits = split_in_order(questions[:total])
    out, serial = {}, 0
    for split, items in splits.items():
        positions = [i % 4 for i in range(len(items))]  # every letter equally often in every split
        rng.shuffle(positions)
        rows = []
        for item, correct in zip(items, positions):
            options = list(item["wrong"])
            rng.shuffle(options)
            options.insert(correct, item["answer"])
            assert len(set(options)) == 4, options
            serial += 1
            rows.append({"id": f"mcq-{serial:04d}", "question": item["question"],
                         "opa": options[0], "opb": options[1], "opc": options[2], "opd": options[3],
                         "cop": correct, "choice_type": "single", "exp": item["exp"],
                         "subject_name": item["subject_name"], "topic_name": item["topic_name"]})
        out[split] = rows
    return out


# -------------------------------------------------------------------------------------------- mcq2

# Four neighbouring categories a group: a question's options are one word from each category of its
# group, so the distractors are near misses (a grain or a herb beside the fruit), not unrelated words.
# No word belongs to two categories or contains a category's name ("walnut", "goldfish", "ladybird",
# "stool" are left out), none is an answer of a retention-probe candidate (data/generate_retention.py:
# no "eagle", "spoon", "Nile"), and every word is common enough that the pretrained model has seen it.
MCQ2_GROUPS = {
    "food": {
        "a fruit": ["apple", "banana", "pear", "grape", "mango", "cherry", "strawberry", "peach", "plum",
                    "pineapple", "watermelon", "lemon", "apricot", "papaya", "raspberry", "blueberry"],
        "a vegetable": ["carrot", "potato", "onion", "cabbage", "broccoli", "spinach", "lettuce", "celery",
                        "cauliflower", "turnip", "radish", "leek", "asparagus", "beetroot", "parsnip", "kale"],
        "a grain": ["wheat", "rice", "barley", "oats", "rye", "maize", "millet", "quinoa", "sorghum", "spelt"],
        "a herb or spice": ["cinnamon", "nutmeg", "cumin", "paprika", "turmeric", "saffron", "cardamom",
                            "oregano", "basil", "thyme", "rosemary", "parsley", "coriander", "dill"],
    },
    "animals": {
        "a mammal": ["dog", "cat", "horse", "cow", "sheep", "goat", "rabbit", "elephant", "lion", "tiger",
                     "giraffe", "zebra", "monkey", "bear", "wolf", "fox", "deer", "camel", "kangaroo",
                     "squirrel"],
        "a bird": ["sparrow", "owl", "pigeon", "crow", "duck", "flamingo", "hawk", "peacock", "seagull",
                   "pelican", "heron", "stork", "magpie", "woodpecker", "falcon", "vulture"],
        "a fish": ["salmon", "trout", "tuna", "cod", "plaice", "carp", "herring", "sardine", "mackerel",
                   "haddock", "pike", "eel", "anchovy", "halibut"],
        "an insect": ["hornet", "wasp", "moth", "mosquito", "grasshopper", "cockroach", "dragonfly",
                      "termite", "flea", "cicada", "locust", "aphid", "earwig"],
    },
    "materials": {
        "a metal": ["iron", "copper", "zinc", "aluminium", "nickel", "titanium", "platinum", "cobalt",
                    "magnesium", "chromium", "tungsten", "tin"],
        "a gemstone": ["turquoise", "ruby", "emerald", "sapphire", "opal", "topaz", "amethyst", "garnet",
                       "jade", "onyx", "aquamarine"],
        "a fabric": ["cotton", "chiffon", "silk", "linen", "denim", "velvet", "nylon", "polyester", "satin",
                     "cashmere", "tweed", "corduroy"],
        "a tree": ["oak", "pine", "maple", "birch", "willow", "elm", "cedar", "beech", "spruce", "poplar",
                   "yew", "cypress", "redwood"],
    },
    "places": {
        "a country": ["Germany", "Japan", "Brazil", "Canada", "Egypt", "Kenya", "India", "Mexico", "Peru",
                      "Norway", "Sweden", "Italy", "Spain", "Chile", "China", "Poland", "Greece", "Argentina",
                      "Portugal"],
        "a city": ["Tokyo", "Berlin", "Madrid", "Moscow", "Cairo", "Toronto", "Mumbai", "Dublin", "Lisbon",
                   "Stockholm", "Warsaw", "Osaka", "Melbourne", "Barcelona", "Munich", "Shanghai"],
        "a river": ["Amazon", "Seine", "Volga", "Ganges", "Yangtze", "Mekong", "Zambezi", "Euphrates",
                    "Tigris", "Loire", "Indus", "Orinoco", "Elbe"],
        "a mountain range": ["Alps", "Andes", "Himalayas", "Rockies", "Pyrenees", "Urals", "Appalachians",
                             "Carpathians", "Caucasus"],
    },
    "household": {
        "a piece of furniture": ["chair", "table", "sofa", "bed", "wardrobe", "desk", "bookcase", "dresser",
                                 "bench", "cupboard", "armchair"],
        "a tool": ["hammer", "mallet", "saw", "wrench", "drill", "chisel", "pliers", "spanner", "axe",
                   "shovel", "rake", "spade"],
        "a kitchen utensil": ["skewer", "funnel", "ladle", "whisk", "spatula", "colander", "sieve", "grater",
                              "tongs", "corkscrew", "peeler", "rolling pin"],
        "a piece of clothing": ["shirt", "trousers", "jacket", "sweater", "skirt", "dress", "sock", "scarf",
                                "coat", "glove", "blouse", "jeans", "hoodie", "pyjamas"],
    },
    "pastimes": {
        "a sport": ["football", "tennis", "basketball", "golf", "hockey", "rugby", "volleyball", "baseball",
                    "swimming", "boxing", "skiing", "badminton", "wrestling", "archery", "judo"],
        "a board or card game": ["chess", "poker", "checkers", "backgammon", "Monopoly", "Scrabble",
                                 "dominoes", "solitaire", "blackjack", "mahjong"],
        "a dance": ["waltz", "jive", "salsa", "ballet", "foxtrot", "samba", "flamenco", "polka", "rumba",
                    "quickstep", "minuet", "mambo"],
        "a musical instrument": ["piano", "guitar", "violin", "flute", "trumpet", "drum", "cello", "harp",
                                 "saxophone", "clarinet", "trombone", "accordion", "banjo", "harmonica", "tuba"],
    },
}
MCQ2_CATEGORIES = {c: words for group in MCQ2_GROUPS.values() for c, words in group.items()}
MCQ2_SPLIT_SIZES = {"train": 800, "validation": 100, "test": 200}  # multiples of 4: whole quadruples
MCQ2_POOL_SHARES = {"validation": 0.2, "test": 0.3}  # of each category's words (at least 2: a cue and an
# answer); the rest trains


def mcq2_word_pools(rng: random.Random) -> dict[str, dict[str, list[str]]]:
    """Each category's words cut into disjoint train / validation / test pools (at least two each)."""
    pools = {split: {} for split in MCQ2_SPLIT_SIZES}
    for category, words in MCQ2_CATEGORIES.items():
        words = list(words)
        rng.shuffle(words)
        n_val = max(2, round(MCQ2_POOL_SHARES["validation"] * len(words)))
        n_test = max(2, round(MCQ2_POOL_SHARES["test"] * len(words)))
        pools["validation"][category] = words[:n_val]
        pools["test"][category] = words[n_val:n_val + n_test]
        pools["train"][category] = words[n_val + n_test:]
    return pools


def mcq2_cue(rng: random.Random, candidates: list[str], answer: str, words: tuple) -> str:
    """A cue for ``answer`` among ``candidates`` (its category's other words in the split). Words of one
    category tend to be alike in length, so "the option closest in length to the cue" would beat
    chance; the cue is drawn so that this rule finds the answer about one time in four."""
    def closest(cue):
        gaps = {w: abs(len(w) - len(cue)) for w in words}
        return gaps[answer] <= min(g for w, g in gaps.items() if w != answer)
    hit, miss = [c for c in candidates if closest(c)], [c for c in candidates if not closest(c)]
    preferred = hit if rng.random() < 0.25 else miss
    return rng.choice(preferred or candidates)


def generate_mcq2(rng: random.Random) -> dict[str, list[dict]]:
    every = [w for words in MCQ2_CATEGORIES.values() for w in words]
    assert len(set(every)) == len(every), "a word in two categories"
    names = [c.split(" ", 1)[1] for c in MCQ2_CATEGORIES]
    assert not [w for w in every for n in names if n in w.lower()], "a word containing a category's name"
    pools = mcq2_word_pools(rng)
    out, serial = {}, 0
    for split, size in MCQ2_SPLIT_SIZES.items():
        quadruples, seen = [], set()
        groups = sorted(MCQ2_GROUPS)
        rng.shuffle(groups)
        while len(quadruples) < size // 4:
            group = groups[len(quadruples) % len(groups)]  # the groups take turns: as even as the size allows
            categories = rng.sample(sorted(MCQ2_GROUPS[group]), 4)
            words = tuple(rng.choice(pools[split][c]) for c in categories)
            if frozenset(words) in seen:
                continue
            cues = tuple(mcq2_cue(rng, [w for w in pools[split][c] if w != words[k]], words[k], words)
                         for k, c in enumerate(categories))
            seen.add(frozenset(words))
            quadruples.append((len(quadruples), group, categories, words, cues))
        items = [(q, group, categories[k], words[k], cues[k], words)
                 for q, group, categories, words, cues in quadruples for k in range(4)]
        rng.shuffle(items)
        positions = [i % 4 for i in range(len(items))]  # every letter equally often in every split
        rng.shuffle(positions)
        rows = []
        for (quadruple, group, category, answer, cue, words), correct in zip(items, positions):
            options = [w for w in words if w != answer]
            rng.shuffle(options)
            options.insert(correct, answer)
            serial += 1
            rows.append({"id": f"mcq2-{serial:04d}", "question": f"Which of these is the same kind of thing as {cue}?",
                         "opa": options[0], "opb": options[1], "opc": options[2], "opd": options[3],
                         "cop": correct, "choice_type": "single", "category": category.split(" ", 1)[1],
                         "cue": cue, "group": group, "quadruple": f"{split}-{quadruple:03d}"})
        out[split] = rows
    return out


# -------------------------------------------------------------------------------------------- main

GENERATORS = {"sql": (generate_sql, 1), "fact": (generate_fact, 2), "mcq": (generate_mcq, 3),
              "mcq2": (generate_mcq2, 4), "sql2": (generate_sql2, 5)}


def generate(out_dir: Path) -> list[Path]:
    """Write data/<task>/<split>.jsonl for every task under ``out_dir``; return the paths written."""
    written = []
    for task, (make, offset) in GENERATORS.items():
        for split, rows in make(random.Random(SEED + offset)).items():
            path = Path(out_dir) / task / f"{split}.jsonl"
            write_jsonl(path, rows)
            written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="folder to write <task>/<split>.jsonl into (default: this script's folder)")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path)


if __name__ == "__main__":
    main()
