"""A bank of varied instruction prompts for building real-model worlds (``make-world``).

Written for the project: templates crossed with subjects of the same kind (concepts, skills,
scenes, countries, sentences, arithmetic), so the prompts cover explanations, advice, creative
writing, facts, rewriting and short sums. :func:`instruction_prompts` returns them in a seeded
order, distinct and reproducible.
"""
from __future__ import annotations

import random

__all__ = ["instruction_prompts"]

_CONCEPTS = [
    "photosynthesis", "gravity", "the water cycle", "inflation", "a black hole",
    "machine learning", "the internet", "a vaccine", "democracy", "recycling", "a volcano",
    "an earthquake", "electricity", "the moon's phases", "a rainbow", "DNA", "the stock market",
    "climate change", "a computer virus", "compound interest", "evolution", "the immune system",
    "a solar eclipse", "plate tectonics", "a neural network", "supply and demand",
    "the greenhouse effect", "an atom", "friction", "a budget", "a password manager",
    "the French Revolution", "a hurricane", "magnetism", "sound waves", "a credit score",
    "the Pythagorean theorem", "a library", "a healthy diet", "the Roman Empire",
]
_CONCEPT_TEMPLATES = [
    "What is {}?", "Explain {} in one sentence.", "Explain {} to a ten-year-old.",
    "Why does {} matter?", "Give one interesting fact about {}.", "Describe {} briefly.",
]

_SKILLS = [
    "learning a new language", "saving money", "sleeping better", "cooking rice",
    "writing an essay", "training for a marathon", "studying for exams", "staying focused",
    "growing tomatoes", "making friends in a new city", "public speaking", "learning to code",
    "keeping a plant alive", "reading more books", "drinking more water", "taking good photos",
    "learning the guitar", "packing for a trip", "writing a cover letter", "cleaning a kitchen",
    "managing stress", "waking up early", "painting a room", "baking bread",
    "preparing for a job interview", "learning to swim", "organizing a desk",
    "planning a birthday party", "walking a dog", "memorizing a speech",
]
_SKILL_TEMPLATES = [
    "Give me two tips for {}.", "How can I get better at {}?",
    "What is a common mistake when {}?", "Suggest a first step for {}.",
]

_SCENES = [
    "the ocean", "autumn leaves", "a sleeping cat", "morning coffee", "a city at night",
    "snowy mountains", "a rainy day", "a quiet library", "the first day of spring", "a campfire",
    "a busy market", "a lighthouse", "an old bicycle", "a summer storm", "the desert at noon",
    "a garden in bloom", "a train journey", "a starry sky", "a river in the forest",
    "a grandmother's kitchen", "a football match", "an empty beach", "a winter morning",
    "a birthday cake", "a mountain lake", "a thunderstorm", "a crowded subway", "a sunflower field",
    "a paper boat", "a foggy harbor",
]
_SCENE_TEMPLATES = [
    "Write one sentence about {}.", "Write a short poem about {}.",
    "Give three words that describe {}.", "Write a haiku about {}.",
]

_COUNTRIES = [
    "France", "Japan", "Brazil", "Canada", "Egypt", "India", "Italy", "Kenya", "Mexico", "Norway",
    "Peru", "Spain", "Germany", "Australia", "China", "Greece", "Turkey", "Argentina", "Sweden",
    "Thailand", "Portugal", "Ireland", "Vietnam", "Morocco", "Chile", "Poland", "Nigeria",
    "South Korea", "New Zealand", "the Netherlands",
]
_COUNTRY_TEMPLATES = [
    "What is the capital of {}?", "What language is spoken in {}?",
    "Name a famous food from {}.",
]

_SENTENCES = [
    "me and him goes to the store yesterday", "the meeting have been moved to friday",
    "she dont like coffee in the morning", "give me the report now",
    "their going to the park after lunch", "I has finished my homework",
    "send me the file", "the cat sleep on the sofa all day", "we was late for the train",
    "tell me why the project is late", "the weather is nice today",
    "I would like a cup of tea", "where is the nearest station",
    "thank you for your help", "the book is on the table", "I am learning to cook",
    "can you open the window", "the children are playing outside",
    "my brother works at a hospital", "we are going on holiday next week",
]
_SENTENCE_TEMPLATES = [
    "Correct the grammar of this sentence: {}", "Rewrite this more politely: {}",
    "Translate into French: {}", "Make this sentence more formal: {}",
]


def _arithmetic(rng: random.Random, n: int) -> list[str]:
    out = set()
    while len(out) < n:
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        op = rng.choice(["plus", "times", "minus"])
        out.add(f"What is {a} {op} {b}?")
    return sorted(out)


def instruction_prompts(seed: int = 0) -> list[str]:
    """Every prompt of the bank (about 760, distinct), shuffled by ``seed``."""
    rng = random.Random(f"sande_fast.prompts:{seed}")
    groups = [(_CONCEPTS, _CONCEPT_TEMPLATES), (_SKILLS, _SKILL_TEMPLATES),
              (_SCENES, _SCENE_TEMPLATES), (_COUNTRIES, _COUNTRY_TEMPLATES),
              (_SENTENCES, _SENTENCE_TEMPLATES)]
    prompts = [t.format(s[0].upper() + s[1:] if t.startswith("{}") else s)
               for subjects, templates in groups for s in subjects for t in templates]
    prompts += _arithmetic(random.Random(f"sande_fast.prompts.sums:{seed}"), 60)
    prompts = sorted(set(prompts))
    rng.shuffle(prompts)
    return prompts
