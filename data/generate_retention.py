"""Write the retention probe: ``python data/generate_retention.py [--out DIR]`` (default: this folder).

The probe (``retention/probe.jsonl``, scored by ``molf.lab.retention``) asks what the pretrained model
knew before fine-tuning: general-knowledge items of kinds that no shipped task trains (CANDIDATES
below: opposites, irregular plurals and past tenses, young and sounds of animals, authors, inventors
and artists, landmarks, myths, idioms, nursery rhymes and stories, workplaces, everyday objects, ...).
Nothing in it touches the tasks' subjects: no fact subject or answer (countries, their cities,
languages, currencies, continents) appears in a prompt or an answer, no answer is one of mcq2's
category words, and no item asks for a chemical symbol, a unit conversion or arithmetic (mcq); the
generator asserts all three against ``data/generate.py``'s lists.

Each candidate gets four distractors of the same kind: its own list when it has one, else drawn from
the other answers of its kind (minus the answers it names as also right), in an order fixed by
``random.Random(f"{SEED}-{id}")``. Every distractor's first SmolLM2 token differs from the target's and
from the other distractors' (asserted). A candidate is kept when the pretrained SmolLM2-135M-Instruct
(``molf.lab.models.load("smollm2-135m")``, float32 on the CPU) gives the target's first token a
next-token log-probability at least MIN_MARGIN above the best distractor's (the margin keeps the
selection stable against rounding and keeps out items the model only guesses), at most MAX_PER_KIND
per kind (the first in candidate order), so that no kind dominates the score and scoring stays cheap.
The file holds the kept rows in candidate order; rerunning the script rewrites it identically. Its
output (candidates, answered correctly, kept, per kind) is quoted in docs/tasks.md.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20260507  # data/generate.py's
N_DISTRACTORS = 4
MIN_MARGIN = 1.0  # nats: the target's first token at least e times as likely as the best distractor's
MAX_PER_KIND = 15  # the first this many kept candidates of each kind, so that no kind dominates the score
BATCH_SIZE = 16

# kind -> candidates. A candidate is (prompt, target) or (prompt, target, extra): ``extra`` a list gives
# the candidate's own distractors (the first N_DISTRACTORS usable ones), a set names answers of the kind
# that are also right for this prompt and so are never its distractors. Answers carry no leading space.
CANDIDATES: dict[str, list[tuple]] = {
    "opposite": [(f"The opposite of {a} is", b, *extra) for a, b, *extra in [
        ("hot", "cold"), ("big", "small", {"short", "low", "narrow", "thin"}), ("up", "down"),
        ("fast", "slow"), ("happy", "sad"), ("wet", "dry"), ("hard", "soft", {"easy"}), ("high", "low"),
        ("rich", "poor"), ("strong", "weak"), ("early", "late"), ("full", "empty"),
        ("thick", "thin"), ("heavy", "light"), ("loud", "quiet", {"soft"}), ("left", "right"),
        ("day", "night"), ("true", "false"), ("love", "hate"), ("push", "pull"), ("buy", "sell"),
        ("above", "below"), ("north", "south"), ("east", "west"), ("inside", "outside"),
        ("before", "after"), ("friend", "enemy"), ("question", "answer"), ("alive", "dead"),
        ("clean", "dirty"), ("easy", "difficult", {"hard"}), ("cheap", "expensive"),
        ("long", "short"), ("wide", "narrow"), ("deep", "shallow"), ("first", "last"),
        ("always", "never"), ("entrance", "exit"), ("increase", "decrease"), ("maximum", "minimum"),
        ("victory", "defeat"), ("success", "failure"), ("include", "exclude"), ("import", "export"),
        ("ancient", "modern"), ("polite", "rude"), ("rough", "smooth"), ("tall", "short", {"small", "low"}),
        ("asleep", "awake"), ("present", "absent"), ("positive", "negative"),
        ("vertical", "horizontal"), ("dark", "light"), ("begin", "end"), ("sharp", "dull"),
    ]],
    "plural": [(f"The plural of {a} is", b) for a, b in [
        ("mouse", "mice"), ("child", "children"), ("man", "men"), ("woman", "women"), ("tooth", "teeth"),
        ("foot", "feet"), ("goose", "geese"), ("person", "people"), ("ox", "oxen"), ("cactus", "cacti"),
        ("knife", "knives"), ("leaf", "leaves"), ("wolf", "wolves"), ("baby", "babies"), ("box", "boxes"),
        ("city", "cities"), ("half", "halves"), ("life", "lives"), ("wife", "wives"),
        ("church", "churches"), ("story", "stories"), ("dish", "dishes"), ("glass", "glasses"),
        ("fungus", "fungi"), ("crisis", "crises"), ("phenomenon", "phenomena"), ("criterion", "criteria"),
        ("louse", "lice"), ("shelf", "shelves"), ("thief", "thieves"), ("hero", "heroes"),
        ("tomato", "tomatoes"), ("party", "parties"), ("lady", "ladies"), ("bush", "bushes"),
    ]],
    "past": [(f"The past tense of {a} is", b) for a, b in [
        ("go", "went"), ("eat", "ate"), ("run", "ran"), ("swim", "swam"), ("write", "wrote"),
        ("take", "took"), ("give", "gave"), ("buy", "bought"), ("think", "thought"), ("catch", "caught"),
        ("teach", "taught"), ("bring", "brought"), ("fly", "flew"), ("drink", "drank"), ("sing", "sang"),
        ("begin", "began"), ("break", "broke"), ("choose", "chose"), ("drive", "drove"), ("fall", "fell"),
        ("forget", "forgot"), ("speak", "spoke"), ("steal", "stole"), ("wear", "wore"),
        ("freeze", "froze"), ("ring", "rang"), ("sleep", "slept"), ("sit", "sat"), ("stand", "stood"),
        ("tell", "told"), ("find", "found"), ("feel", "felt"), ("leave", "left"), ("seek", "sought"),
        ("fight", "fought"), ("ride", "rode"), ("grow", "grew"), ("throw", "threw"), ("know", "knew"),
        ("draw", "drew"), ("blow", "blew"), ("shake", "shook"), ("bite", "bit"), ("hide", "hid"),
        ("lose", "lost"), ("build", "built"), ("send", "sent"), ("spend", "spent"), ("keep", "kept"),
        ("meet", "met"), ("hold", "held"), ("pay", "paid"), ("say", "said"), ("make", "made"),
        ("come", "came"), ("get", "got"),
    ]],
    "degree": [
        ("The comparative of good is", "better"), ("The superlative of good is", "best"),
        ("The comparative of bad is", "worse"), ("The superlative of bad is", "worst"),
        ("The comparative of little is", "less"), ("The superlative of little is", "least"),
        ("The comparative of much is", "more"), ("The superlative of many is", "most"),
    ],
    "young": [
        ("A baby dog is called a", "puppy"), ("A baby cat is called a", "kitten"),
        ("A baby cow is called a", "calf"), ("A baby sheep is called a", "lamb"),
        ("A baby horse is called a", "foal", {"colt", "pony"}), ("A baby duck is called a", "duckling"),
        ("A baby goose is called a", "gosling"), ("A baby frog is called a", "tadpole"),
        ("A baby kangaroo is called a", "joey"), ("A baby bear is called a", "cub"),
        ("A baby swan is called a", "cygnet"), ("A baby deer is called a", "fawn"),
        ("A baby goat is called a", "kid"), ("A baby pig is called a", "piglet"),
        ("A baby owl is called an", "owlet"), ("A baby eagle is called an", "eaglet"),
        ("A baby chicken is called a", "chick"), ("A baby seal is called a", "pup", {"puppy"}),
        ("A young butterfly is called a", "caterpillar", {"larva"}), ("A baby lion is called a", "cub"),
    ],
    "sound": [(f"The sound {a} makes is called a", b, *extra) for a, b, *extra in [
        ("a dog", "bark", {"woof", "growl"}), ("a lion", "roar", {"growl"}), ("a horse", "neigh"),
        ("a snake", "hiss"), ("a bee", "buzz"), ("a wolf", "howl", {"growl"}), ("a cat", "meow", {"purr", "hiss"}),
        ("a duck", "quack"), ("a cow", "moo"), ("an owl", "hoot"), ("a frog", "croak"),
        ("a mouse", "squeak"), ("a donkey", "bray"), ("a sheep", "bleat"), ("a crow", "caw"),
        ("a pig", "oink", {"grunt"}), ("a bird", "chirp", {"tweet", "caw"}),
    ]],
    "home": [
        ("A bird lives in a", "nest"), ("Bees live in a", "hive"), ("A spider lives in a", "web"),
        ("A horse is kept in a", "stable", {"barn"}), ("A dog sleeps in a", "kennel"),
        ("Chickens are kept in a", "coop", {"barn"}), ("A rabbit lives in a", "burrow", {"den", "hole"}),
        ("A beaver builds a", "dam", {"lodge"}), ("A snail carries its", "shell"),
        ("A king lives in a", "palace", {"castle"}), ("A monk lives in a", "monastery"),
        ("A prisoner is locked in a", "cell"), ("Fish live in", "water"),
        ("An Inuit house made of snow is called an", "igloo"),
    ],
    "time": [
        ("There are seven days in a", "week"), ("There are twelve months in a", "year"),
        ("There are sixty minutes in an", "hour"), ("There are sixty seconds in a", "minute"),
        ("There are twenty-four hours in a", "day"), ("One hundred years is a", "century"),
        ("Ten years is a", "decade"), ("A thousand years is a", "millennium"),
    ],
    "nature": [
        ("The largest ocean on Earth is the", "Pacific", ["Atlantic", "Indian", "Arctic", "Southern"]),
        ("The longest river in the world is the", "Nile", ["Mississippi", "Thames", "Danube", "Rhine", "Volga"]),
        ("The tallest mountain in the world is Mount", "Everest", ["Kilimanjaro", "Fuji", "Olympus", "Rainier"]),
        ("The largest hot desert in the world is the", "Sahara", ["Gobi", "Kalahari", "Mojave", "Atacama"]),
        ("The Earth orbits the", "Sun", ["Moon", "stars", "galaxy", "comet"]),
        ("Plants make their food through", "photosynthesis", ["respiration", "digestion", "evaporation",
                                                              "fermentation"]),
        ("The force that pulls objects toward the ground is called", "gravity",
         ["friction", "magnetism", "electricity", "inertia"]),
        ("The hardest natural substance is", "diamond", ["glass", "granite", "quartz", "marble", "wood"]),
        ("The natural satellite of the Earth is the", "Moon", ["Sun", "comet", "star", "asteroid"]),
        ("Frozen water is called", "ice", ["steam", "vapor", "fog", "dew", "mud"]),
        ("The largest animal in the world is the blue", "whale", ["shark", "dolphin", "seal", "octopus"]),
        ("The fastest land animal is the", "cheetah", ["ostrich", "antelope", "greyhound", "jaguar"]),
        ("The largest bird in the world is the", "ostrich", ["eagle", "penguin", "swan", "parrot"]),
        ("The organ that pumps blood through the body is the", "heart", ["brain", "skin", "bladder", "spleen"]),
        ("The largest organ of the human body is the", "skin", ["heart", "brain", "spleen", "bladder"]),
        ("We see with our", "eyes", ["ears", "tongue", "hands", "teeth"]),
        ("We hear with our", "ears", ["eyes", "tongue", "hands", "feet"]),
        ("We taste with our", "tongue", ["eyes", "ears", "hands", "feet"]),
        ("The study of living things is called", "biology", ["geology", "astronomy", "chemistry", "physics"]),
        ("The study of the stars and planets is called", "astronomy", ["geology", "biology", "botany", "zoology"]),
        ("The study of rocks is called", "geology", ["biology", "astronomy", "botany", "zoology"]),
        ("The study of plants is called", "botany", ["zoology", "geology", "astronomy", "physics"]),
        ("The study of animals is called", "zoology", ["botany", "geology", "astronomy", "physics"]),
        ("The study of the mind is called", "psychology", ["geology", "astronomy", "botany", "zoology"]),
        ("A rainbow has seven", "colors", ["legs", "wheels", "sides", "rooms"]),
        ("The center of an atom is called the", "nucleus", ["electron", "molecule", "orbit", "shell"]),
        ("Spiders have eight", "legs", ["wings", "arms", "heads", "tails"]),
        ("Insects have six", "legs", ["wings", "arms", "heads", "tails"]),
        ("A triangle has three", "sides", ["wheels", "legs", "wings", "floors"]),
        ("Water boils at one hundred degrees", "Celsius", ["Fahrenheit", "Kelvin", "Rankine", "Réaumur"]),
        ("Honey is made by", "bees", ["ants", "spiders", "butterflies", "beetles"]),
        ("Glass is made from", "sand", ["clay", "wood", "paper", "wool"]),
        ("Paper is made from", "wood", ["sand", "clay", "glass", "stone"]),
        ("Bread is made from", "flour", ["sand", "clay", "wood", "stone"]),
        ("The Sun rises in the", "east", ["west", "north", "south", "middle"]),
        ("The Sun sets in the", "west", ["east", "north", "south", "middle"]),
        ("The gas that humans need to breathe is", "oxygen", ["helium", "smoke", "steam", "neon"]),
        ("A caterpillar turns into a", "butterfly", ["frog", "spider", "snake", "bird"]),
        ("A tadpole grows into a", "frog", ["butterfly", "fish", "snake", "bird"]),
    ],
    "landmark": [(f"{a} is in the city of", b, *extra) for a, b, *extra in [
        ("The Statue of Liberty", "New York"), ("Big Ben", "London"),
        ("The Golden Gate Bridge", "San Francisco"), ("The Taj Mahal", "Agra"), ("The Parthenon", "Athens"),
        ("Hollywood", "Los Angeles"), ("The Space Needle", "Seattle"), ("The Burj Khalifa", "Dubai"),
        ("The Petronas Towers", "Kuala Lumpur"), ("The White House", "Washington"),
        ("The Anne Frank House", "Amsterdam"), ("The Willis Tower", "Chicago"), ("Times Square", "New York"),
        ("Buckingham Palace", "London"), ("Tower Bridge", "London"), ("The Acropolis", "Athens"),
        ("The Liberty Bell", "Philadelphia"), ("The Gateway Arch", "St. Louis"), ("The Alamo", "San Antonio"),
        ("The Little Mermaid statue", "Copenhagen"), ("The Atomium", "Brussels"), ("The Uffizi Gallery", "Florence"),
        ("The Charles Bridge", "Prague"), ("Schönbrunn Palace", "Vienna"), ("Central Park", "New York"),
        ("The Grand Canal", "Venice"), ("Table Mountain", "Cape Town"), ("The Empire State Building", "New York"),
        ("Westminster Abbey", "London"), ("The Lincoln Memorial", "Washington"),
    ]],
    "author": [(f"{a} was written by", b) for a, b in [
        ("Romeo and Juliet", "William Shakespeare"), ("Hamlet", "William Shakespeare"),
        ("Macbeth", "William Shakespeare"), ("Oliver Twist", "Charles Dickens"),
        ("A Christmas Carol", "Charles Dickens"), ("Great Expectations", "Charles Dickens"),
        ("Pride and Prejudice", "Jane Austen"), ("Sense and Sensibility", "Jane Austen"),
        ("Nineteen Eighty-Four", "George Orwell"), ("Animal Farm", "George Orwell"),
        ("The Adventures of Tom Sawyer", "Mark Twain"), ("Adventures of Huckleberry Finn", "Mark Twain"),
        ("War and Peace", "Leo Tolstoy"), ("Anna Karenina", "Leo Tolstoy"),
        ("Harry Potter and the Philosopher's Stone", "J.K. Rowling"), ("The Hobbit", "J.R.R. Tolkien"),
        ("The Lord of the Rings", "J.R.R. Tolkien"), ("Frankenstein", "Mary Shelley"),
        ("Dracula", "Bram Stoker"), ("Moby-Dick", "Herman Melville"), ("The Odyssey", "Homer"),
        ("The Iliad", "Homer"), ("Don Quixote", "Miguel de Cervantes"),
        ("The Old Man and the Sea", "Ernest Hemingway"), ("The Great Gatsby", "F. Scott Fitzgerald"),
        ("A Study in Scarlet", "Arthur Conan Doyle"), ("On the Origin of Species", "Charles Darwin"),
        ("A Brief History of Time", "Stephen Hawking"), ("The Raven", "Edgar Allan Poe"),
        ("Alice's Adventures in Wonderland", "Lewis Carroll"), ("Crime and Punishment", "Fyodor Dostoevsky"),
        ("The Divine Comedy", "Dante Alighieri"), ("Les Misérables", "Victor Hugo"),
        ("The Cat in the Hat", "Dr. Seuss"), ("The Jungle Book", "Rudyard Kipling"),
        ("Treasure Island", "Robert Louis Stevenson"), ("Gulliver's Travels", "Jonathan Swift"),
        ("Robinson Crusoe", "Daniel Defoe"), ("Jane Eyre", "Charlotte Brontë"),
        ("Wuthering Heights", "Emily Brontë"), ("To Kill a Mockingbird", "Harper Lee"),
        ("The Catcher in the Rye", "J.D. Salinger"), ("Of Mice and Men", "John Steinbeck"),
        ("Brave New World", "Aldous Huxley"), ("The Communist Manifesto", "Karl Marx"),
        ("The Time Machine", "H.G. Wells"), ("Charlie and the Chocolate Factory", "Roald Dahl"),
        ("The Canterbury Tales", "Geoffrey Chaucer"), ("Paradise Lost", "John Milton"),
        ("The Little Prince", "Antoine de Saint-Exupéry"),
    ]],
    "creator": [
        ("The Mona Lisa was painted by", "Leonardo da Vinci"), ("The Starry Night was painted by", "Vincent van Gogh"),
        ("Guernica was painted by", "Pablo Picasso"), ("The Scream was painted by", "Edvard Munch"),
        ("The ceiling of the Sistine Chapel was painted by", "Michelangelo"),
        ("The Last Supper was painted by", "Leonardo da Vinci"),
        ("The Persistence of Memory was painted by", "Salvador Dalí"),
        ("Girl with a Pearl Earring was painted by", "Johannes Vermeer"),
        ("Water Lilies was painted by", "Claude Monet"),
        ("The telephone was invented by", "Alexander Graham Bell"),
        ("The light bulb was invented by", "Thomas Edison"),
        ("The theory of relativity was developed by", "Albert Einstein"),
        ("The laws of motion were formulated by", "Isaac Newton"),
        ("Penicillin was discovered by", "Alexander Fleming"),
        ("The printing press was invented by", "Johannes Gutenberg"),
        ("The World Wide Web was invented by", "Tim Berners-Lee"),
        ("Dynamite was invented by", "Alfred Nobel"),
        ("The theory of evolution by natural selection was proposed by", "Charles Darwin"),
        ("Radium and polonium were discovered by", "Marie Curie"),
        ("The Moonlight Sonata was composed by", "Ludwig van Beethoven"),
        ("The Magic Flute was composed by", "Wolfgang Amadeus Mozart"),
        ("The Four Seasons was composed by", "Antonio Vivaldi"),
        ("Swan Lake was composed by", "Pyotr Ilyich Tchaikovsky"),
        ("The Brandenburg Concertos were composed by", "Johann Sebastian Bach"),
        ("The first person to walk on the Moon was", "Neil Armstrong"),
        ("The first person to travel into space was", "Yuri Gagarin"),
        ("Microsoft was founded by", "Bill Gates"), ("Facebook was founded by", "Mark Zuckerberg"),
        ("Mickey Mouse was created by", "Walt Disney"), ("The Sherlock Holmes stories were written by",
                                                        "Arthur Conan Doyle"),
        ("Psychoanalysis was founded by", "Sigmund Freud"), ("The polio vaccine was developed by", "Jonas Salk"),
    ],
    "myth": [
        ("The king of the Greek gods is", "Zeus"), ("The Greek goddess of wisdom is", "Athena"),
        ("The Norse god of thunder is", "Thor"), ("The Greek god of the sea is", "Poseidon"),
        ("The hero who cut off the head of Medusa was", "Perseus"), ("The winged horse of Greek myth is", "Pegasus"),
        ("The Greek goddess of love is", "Aphrodite"), ("The Greek god of the underworld is", "Hades"),
        ("The Roman god of love is", "Cupid"), ("The Greek hero whose only weak spot was his heel was", "Achilles"),
        ("The hero of Homer's Odyssey is", "Odysseus"), ("The Norse god of mischief is", "Loki"),
        ("The jackal-headed Egyptian god of the dead is", "Anubis"), ("The chief god of Norse mythology is", "Odin"),
        ("The monster of Crete that was half man and half bull was the", "Minotaur"),
        ("The three-headed dog that guards the underworld is", "Cerberus"),
        ("The Titan who stole fire from the gods and gave it to humans was", "Prometheus"),
        ("The Greek hero famous for his twelve labours is", "Hercules"),
        ("The Greek god of wine is", "Dionysus"), ("The messenger of the Greek gods is", "Hermes"),
    ],
    "idiom": [
        ("Actions speak louder than", "words"), ("The early bird catches the", "worm"),
        ("An apple a day keeps the doctor", "away"), ("Better late than", "never"),
        ("Don't count your chickens before they", "hatch"), ("A picture is worth a thousand", "words"),
        ("All that glitters is not", "gold"), ("Every cloud has a silver", "lining"),
        ("The pen is mightier than the", "sword"), ("Two heads are better than", "one"),
        ("Practice makes", "perfect"), ("Honesty is the best", "policy", {"medicine"}),
        ("Where there's smoke, there's", "fire"), ("Laughter is the best", "medicine", {"policy"}),
        ("Out of sight, out of", "mind"), ("Beauty is in the eye of the", "beholder"),
        ("Knowledge is", "power", {"free", "golden", "bliss", "blind", "believing"}),
        ("The grass is always greener on the other", "side"),
        ("Birds of a feather flock", "together"), ("Don't put all your eggs in one", "basket"),
        ("Look before you", "leap"), ("Strike while the iron is", "hot"),
        ("Don't judge a book by its", "cover"), ("Easy come, easy", "go"),
        ("Absence makes the heart grow", "fonder"), ("Fortune favors the", "bold", {"brave"}),
        ("Great minds think", "alike"), ("Ignorance is", "bliss", {"free", "golden", "power", "blind", "believing"}),
        ("Let sleeping dogs", "lie"), ("Necessity is the mother of", "invention"), ("No pain, no", "gain"),
        ("Slow and steady wins the", "race"), ("The squeaky wheel gets the", "grease"),
        ("Kill two birds with one", "stone"), ("Once in a blue", "moon"),
        ("Time flies when you're having", "fun"), ("A penny for your", "thoughts"),
        ("The ball is in your", "court"), ("It takes two to", "tango"), ("Hit the nail on the", "head"),
        ("Let the cat out of the", "bag"), ("Barking up the wrong", "tree"), ("A blessing in", "disguise"),
        ("Burn the midnight", "oil"), ("Speak of the", "devil"), ("It's a piece of", "cake"),
        ("Spill the", "beans"), ("It costs an arm and a", "leg"),
        ("The apple doesn't fall far from the", "tree"), ("You can't teach an old dog new", "tricks"),
        ("Haste makes", "waste"), ("Money doesn't grow on", "trees"), ("A friend in need is a friend", "indeed"),
        ("Every dog has its", "day"), ("Still waters run", "deep"), ("The more, the", "merrier"),
        ("Silence is", "golden", {"free", "bliss", "power", "blind", "believing"}),
        ("Love is", "blind", {"free", "golden", "bliss", "power", "believing"}),
        ("Seeing is", "believing", {"free", "golden", "bliss", "power", "blind"}),
        ("Variety is the spice of", "life"), ("Blood is thicker than", "water"),
        ("Beggars can't be", "choosers"), ("Too many cooks spoil the", "broth"),
        ("Where there's a will, there's a", "way"), ("Don't bite the hand that", "feeds"),
        ("The best things in life are", "free", {"golden", "bliss", "power", "blind", "believing"}),
        ("Lightning never strikes the same place", "twice"), ("Old habits die", "hard"),
        ("Misery loves", "company"), ("Better safe than", "sorry"),
    ],
    "story": [
        ("Twinkle, twinkle, little", "star"), ("Humpty Dumpty sat on a", "wall"),
        ("Jack and Jill went up the", "hill"), ("Mary had a little", "lamb"), ("Old MacDonald had a", "farm"),
        ("Hickory, dickory,", "dock"), ("Row, row, row your", "boat"), ("Little Red Riding", "Hood"),
        ("Snow White and the Seven", "Dwarfs"),
        ("Cinderella lost her glass", "slipper"), ("Winnie the", "Pooh"), ("Hansel and", "Gretel"),
        ("Beauty and the", "Beast"), ("Alice in", "Wonderland"), ("The Wizard of", "Oz"),
        ("Jack and the", "Beanstalk"), ("Ali Baba and the Forty", "Thieves"), ("Aladdin and the magic", "lamp"),
        ("Little Miss Muffet sat on a", "tuffet"), ("London Bridge is falling", "down"),
        ("The itsy bitsy spider climbed up the water", "spout"),
        ("Pinocchio's nose grew whenever he told a", "lie"), ("Puss in", "Boots"),
        ("Robin Hood lived in Sherwood", "Forest"), ("Superman comes from the planet", "Krypton"),
        ("Spider-Man's real name is Peter", "Parker"), ("Batman's real name is Bruce", "Wayne"),
        ("Superman's real name is Clark", "Kent"), ("Harry Potter's best friends are Ron and", "Hermione"),
        ("Sherlock Holmes's loyal friend is Doctor", "Watson"), ("Luke Skywalker's father is Darth", "Vader"),
        ("Mickey Mouse's girlfriend is", "Minnie"), ("In The Lord of the Rings, Frodo carries the One", "Ring"),
        ("Romeo's beloved is", "Juliet"), ("Peter Pan's fairy friend is Tinker", "Bell"),
        ("Peter Pan's enemy is Captain", "Hook"), ("The Tin Man wanted a", "heart", {"brain"}),
        ("The Scarecrow wanted a", "brain", {"heart"}), ("Batman's sidekick is", "Robin"),
        ("The Ugly", "Duckling"), ("Sleeping", "Beauty"),
    ],
    "workplace": [(f"{a} works in a", b, *extra) for a, b, *extra in [
        ("A doctor", "hospital", {"clinic"}), ("A teacher", "school", {"classroom"}),
        ("A chef", "kitchen", {"restaurant"}), ("A librarian", "library"),
        ("A scientist", "laboratory"), ("A banker", "bank"), ("A pharmacist", "pharmacy"),
        ("A miner", "mine"), ("A judge", "courtroom"), ("A waiter", "restaurant", {"kitchen", "cafe"}),
        ("A priest", "church"), ("A zookeeper", "zoo"), ("A sailor", "ship"),
    ]],
    "trade": [
        ("A barber cuts", "hair"), ("A fisherman catches", "fish"), ("A tailor makes", "clothes"),
        ("A beekeeper keeps", "bees"), ("A florist sells", "flowers"), ("A jeweler sells", "jewelry"),
        ("A butcher sells", "meat"), ("A locksmith makes", "keys"), ("A shoemaker makes", "shoes"),
        ("A mailman delivers", "letters", {"mail", "packages"}), ("A librarian lends", "books"),
        ("An optician sells", "glasses", {"lenses"}),
    ],
    "object": [(f"You {a}", b, *extra) for a, b, *extra in [
        ("eat soup with a", "spoon"), ("cut paper with", "scissors"), ("sweep the floor with a", "broom"),
        ("brush your teeth with a", "toothbrush"), ("unlock a door with a", "key"),
        ("dry yourself with a", "towel"), ("see your reflection in a", "mirror"),
        ("write on a blackboard with", "chalk"), ("take photos with a", "camera"),
        ("tell the time with a", "clock", {"watch"}), ("keep food cold in a", "refrigerator", {"fridge", "freezer"}),
        ("boil water in a", "kettle", {"pot", "pan"}), ("comb your hair with a", "comb", {"brush"}),
        ("wash your hands with", "soap", {"water"}), ("sew with a needle and", "thread"),
        ("send a letter in an", "envelope"), ("look at the stars through a", "telescope"),
        ("look at tiny germs through a", "microscope"), ("keep dry in the rain with an", "umbrella"),
        ("measure length with a", "ruler"), ("bake a cake in an", "oven"),
        ("eat steak with a knife and", "fork"), ("erase pencil marks with an", "eraser"),
        ("play tennis with a", "racket"), ("cross a river on a", "bridge", {"boat", "ferry"}),
    ]],
}


def _first_token(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"{text!r} tokenizes to nothing")
    return ids[0]


def build_candidates(tokenizer) -> list[dict]:
    """Every candidate as a probe row (id, kind, prompt, target, distractors), in CANDIDATES order."""
    rows = []
    for kind, items in CANDIDATES.items():
        pool = sorted({item[1] for item in items})
        for index, (prompt, target, *extra) in enumerate(items):
            identifier = f"{kind}-{index:03d}"
            own = extra[0] if extra and isinstance(extra[0], list) else None
            also_right = extra[0] if extra and isinstance(extra[0], set) else set()
            if own is not None:
                options = list(own)
            else:
                options = [a for a in pool if a != target and a not in also_right]
                random.Random(f"{SEED}-{identifier}").shuffle(options)
            taken = {_first_token(tokenizer, " " + target)}
            distractors = []
            for option in options:
                token = _first_token(tokenizer, " " + option)
                if token not in taken and len(distractors) < N_DISTRACTORS:
                    taken.add(token)
                    distractors.append(" " + option)
            assert len(distractors) == N_DISTRACTORS, (identifier, target, distractors)
            rows.append({"id": identifier, "kind": kind, "prompt": prompt, "target": " " + target,
                         "distractors": distractors})
    return rows


def check_no_task_overlap(rows: list[dict]) -> None:
    """Assert that no row touches a shipped task's subject (see the module docstring)."""
    sys.path.insert(0, str(HERE))
    import generate  # data/generate.py: the tasks' frozen lists

    fact_names = {n for by_answer in generate.KNOWN_FACTS.values() for a, subjects in by_answer.items()
                  for n in [a, *subjects]} | {a for answers in generate.FACT_ANSWERS.values() for a in answers}
    fact_names = {n.removeprefix("the ") for n in fact_names}
    mcq2_words = {w.lower() for words in generate.MCQ2_CATEGORIES.values() for w in words}
    for row in rows:
        answers = [row["target"], *row["distractors"]]
        for text in [row["prompt"], *answers]:
            hits = [n for n in fact_names if re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", text)]
            assert not hits, (row["id"], text, hits)
            assert not re.search(r"\d", text) and "symbol" not in text, (row["id"], text)
        for text in answers:  # an answer is not an mcq2 word, nor its plural
            word = text.strip().lower()
            assert word not in mcq2_words and word.removesuffix("s") not in mcq2_words, (row["id"], text)


def select(model, tokenizer, rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(kept rows, per-item records): per kind, the first MAX_PER_KIND rows (in CANDIDATES order) whose
    target beats every distractor by at least MIN_MARGIN nats."""
    from molf.lab import retention

    _, items = retention.evaluate(model, tokenizer, rows, batch_size=BATCH_SIZE, return_items=True)
    assert [i["id"] for i in items] == [r["id"] for r in rows]
    kept, per_kind = [], Counter()
    for row, item in zip(rows, items):
        if item["margin"] >= MIN_MARGIN and per_kind[row["kind"]] < MAX_PER_KIND:
            per_kind[row["kind"]] += 1
            kept.append(row)
    return kept, items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE,
                        help="folder to write retention/probe.jsonl into (default: this script's folder)")
    args = parser.parse_args()
    sys.path.append(str(HERE.parent))  # a checkout without `pip install -e .`
    from molf.lab import models

    model, tokenizer = models.load("smollm2-135m")
    rows = build_candidates(tokenizer)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids))
    check_no_task_overlap(rows)
    kept, items = select(model, tokenizer, rows)
    path = args.out / "retention" / "probe.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in kept:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    total, kept_by_kind = Counter(r["kind"] for r in rows), Counter(r["kind"] for r in kept)
    right = Counter(r["kind"] for r, i in zip(rows, items) if i["correct"])
    sure = Counter(r["kind"] for r, i in zip(rows, items) if i["margin"] >= MIN_MARGIN)
    print(f"{path}: kept {len(kept)} of {len(rows)} candidates ({sum(right.values())} answered correctly, "
          f"{sum(sure.values())} by at least {MIN_MARGIN} nats, at most {MAX_PER_KIND} per kind)")
    for kind in CANDIDATES:
        print(f"  {kind}: kept {kept_by_kind[kind]}, {sure[kind]} by the margin, {right[kind]} correct, "
              f"of {total[kind]}")


if __name__ == "__main__":
    main()
