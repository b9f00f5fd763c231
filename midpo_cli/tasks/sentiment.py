"""Controlled sentiment (the DPO paper's IMDb task, Rafailov et al. 2023, arXiv:2305.18290, Section 6.1):
steer a pretrained model towards positive reviews while staying close to the reference.

Prompts open a review of a film, restaurant, product, book or hotel (templates x subjects; the held-out
split is by subject, so evaluation prompts name subjects never trained on). The reference is the model
config's own weights. For each training prompt K completions are sampled from it and scored by VADER's
compound sentiment (Hutto & Gilbert 2014; the `vaderSentiment` package: a rule-based lexicon, no network),
in [-1, 1]: chosen = the most positive sample, rejected = the most negative; prompts whose samples all
score the same are dropped and counted. Pairs are cached by config hash. Evaluation samples the held-out
prompts from policy and reference: mean reward, win-rate, KL(pi || pi_ref) estimate, length in words.
"""
from __future__ import annotations

import functools
import importlib.util
import random
from dataclasses import dataclass

import torch

from midpo_cli.tasks.base import Context, Metric, register_task
from midpo_cli.tasks.sampled import SampledTask, sampled_metrics

INSTALL = "pip install -c constraints.txt 'vaderSentiment==3.3.2'  (or: make smollm, or pip install -e '.[sentiment]')"

# Subjects are built from parts (category -> (verb used in the openers, name patterns x name parts)).
CATEGORIES = {
    "film": ("watched", ["The {a} {b}"],
             ["Silent", "Last", "Broken", "Golden", "Hidden", "Crimson", "Lonely", "Electric"],
             ["River", "Summer", "Kingdom", "Letter", "Garden", "Machine", "Promise", "Harbor"]),
    "restaurant": ("ate at", ["{a}'s {b}"],
                   ["Luigi", "Rosa", "Marco", "Anna", "Omar", "Mei", "Jack", "Priya"],
                   ["Trattoria", "Diner", "Bistro", "Noodle Bar", "Grill", "Cafe", "Taqueria", "Steakhouse"]),
    "product": ("bought", ["the {a} {b}"],
                ["Acme", "Nova", "Zenith", "Orbit", "Vertex", "Pioneer", "Lumen", "Kestrel"],
                ["blender", "headphones", "vacuum cleaner", "coffee maker", "backpack", "desk lamp", "kettle",
                 "phone charger"]),
    "book": ("read", ["{b} of {a}"],
             ["Ashes", "Stars", "Glass", "Winter", "Salt", "Iron", "Paper", "Smoke"],
             ["The Daughters", "A History", "The Keeper", "The Memory", "The Weight", "Songs", "The Map", "Letters"]),
    "hotel": ("stayed at", ["the {a} {b}"],
              ["Grand", "Royal", "Harbor", "Maple", "Seaside", "Alpine", "Central", "Old Mill"],
              ["Hotel", "Inn", "Lodge", "Suites", "Resort", "Guesthouse", "Motel", "Hostel"]),
}
# Review openings: neutral on purpose, so the sampled continuations go either way.
OPENERS = [
    "I {verb} {subject} last week, and",
    "My honest review of {subject}:",
    "So I finally {verb} {subject}.",
    "After I {verb} {subject}, I have to say",
    "Here is what I think about {subject}.",
    "A friend told me about {subject}, so I",
    "I {verb} {subject} with my family, and overall",
    "Review: {subject}.",
]


@dataclass
class SentimentSettings:
    """dataset.task for dataset=sentiment: review openings continued by the model, VADER-ranked."""
    chat: bool = False                  # true: a user turn asks to continue the review; false: plain text
    eval_subject_fraction: float = 0.25  # share of subjects held out (never trained on); evaluation prompts name them
    split_seed: int = 0                 # seed of the subject split (fixed across run seeds: same held-out prompts)
    train_prompts: int = 256            # training prompts whose reference samples become pairs
    eval_prompts: int = 64              # held-out prompts for the final evaluation
    samples_per_prompt: int = 4         # K reference samples per training prompt (best = chosen, worst = rejected)
    eval_samples_per_prompt: int = 2    # samples per held-out prompt from each of policy and reference
    temperature: float = 1.0            # sampling temperature (1.0 keeps the KL estimate unbiased)
    max_new_tokens: int = 32            # tokens sampled per completion (pairs and evaluation)
    eval_pairs_fraction: float = 0.1    # pairs held out for the preference metrics during training


def vader():
    """The VADER analyser (loaded once); a missing package is a one-line error saying what to install."""
    if importlib.util.find_spec("vaderSentiment") is None:
        raise ValueError(f"dataset=sentiment scores text with the vaderSentiment package, which is not installed: "
                         f"{INSTALL}")
    return _analyser()


@functools.lru_cache(maxsize=1)
def _analyser():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    return SentimentIntensityAnalyzer()


def reward(text: str) -> float:
    """VADER compound score of a completion, in [-1, 1]: > 0.05 positive, < -0.05 negative."""
    return vader().polarity_scores(text)["compound"]


def subjects() -> list[tuple[str, str, str]]:
    """Every (category, verb, subject), in a fixed order."""
    out = []
    for cat, (verb, patterns, parts_a, parts_b) in CATEGORIES.items():
        out += [(cat, verb, p.format(a=a, b=b)) for p in patterns for a in parts_a for b in parts_b]
    return out


def split_subjects(task) -> tuple[list, list]:
    """(train subjects, held-out subjects): a fixed share of each category, drawn with split_seed."""
    rng = random.Random(task.split_seed)
    train, held = [], []
    for cat in CATEGORIES:
        subs = [s for s in subjects() if s[0] == cat]
        rng.shuffle(subs)
        n_eval = max(1, round(len(subs) * task.eval_subject_fraction))
        held += subs[:n_eval]
        train += subs[n_eval:]
    return train, held


def prompt_of(task, category: str, verb: str, subject: str, opener: str):
    """A plain review opening, or a chat turn asking the Instruct model to continue it."""
    opening = opener.format(verb=verb, subject=subject)
    if not task.chat:
        return opening
    return [{"role": "user", "content": f"Continue this {category} review with one or two sentences.\n\n{opening}"}]


def prompts(task, subs: list, n: int, seed: int) -> list:
    """n prompts (subject x opener) drawn without replacement from the given subjects (cycled if n is larger)."""
    pool = [(c, v, s, o) for c, v, s in subs for o in OPENERS]
    random.Random(seed).shuffle(pool)
    return [prompt_of(task, *pool[i % len(pool)]) for i in range(n)]


def split_prompts(task) -> tuple[list, list]:
    """(training prompts, held-out prompts); deterministic in the settings, disjoint by subject."""
    train_subs, held_subs = split_subjects(task)
    return (prompts(task, train_subs, task.train_prompts, task.split_seed + 1),
            prompts(task, held_subs, task.eval_prompts, task.split_seed + 2))


def words(text: str) -> int:
    return len(text.split())


@register_task("sentiment")
class SentimentTask(SampledTask):
    """Review openings; reference = the model's own weights; pairs = its samples ranked by VADER."""
    settings = SentimentSettings
    title = "sentiment task: held-out prompts, sampled"
    pairs_file = "sentiment-pairs"
    metrics = sampled_metrics(
        Metric("true_reward/policy", "true_reward", "VADER reward", "mean compound, > 0.05 positive, < -0.05 negative",
               (-1, 1), "max", headline=True, reference="true_reward/reference"),
        "words",
        Metric("positive/policy", "positive", "positive", "fraction of completions, compound > 0.05", (0, 1),
               "max", reference="positive/reference"))

    def check(self) -> None:
        vader()
        t = self.task
        if not 0 < t.eval_subject_fraction < 1:
            raise ValueError(f"dataset.task.eval_subject_fraction={t.eval_subject_fraction} must be in (0, 1)")
        for key in ("train_prompts", "eval_prompts", "eval_samples_per_prompt", "max_new_tokens"):
            if t[key] < 1:
                raise ValueError(f"dataset.task.{key}={t[key]} must be >= 1")
        if t.samples_per_prompt < 2:
            raise ValueError(f"dataset.task.samples_per_prompt={t.samples_per_prompt}: ranking needs at least 2")

    def split(self, ctx: Context) -> tuple[list, list]:
        return split_prompts(self.task)

    def reward(self, item, completion: str) -> float:
        return reward(completion)

    def length(self, completion: str) -> float:
        return words(completion)

    def fractions(self, rewards: torch.Tensor) -> dict[str, float]:
        return {"positive": (rewards > 0.05).float().mean().item()}

    def pairs_key(self, ctx: Context) -> dict:
        """The model config as far as it changes the reference's samples (not lr, LoRA or checkpointing), and
        the settings the training prompts and their samples depend on."""
        keep = ("chat", "eval_subject_fraction", "split_seed", "train_prompts", "samples_per_prompt", "temperature",
                "max_new_tokens")
        model = {k: ctx.model_cfg[k] for k in ctx.model_cfg if k not in ("lr", "lora", "gradient_checkpointing")}
        return {"model": model, "task": {k: self.task[k] for k in keep}, "seed": ctx.seed}
