"""Ring-A-Bell (Tsai et al., ICLR 2024): a prompt found in the text encoder alone (docs/attacks.md).

The concept vector is the mean, over pairs of prompts with and without the concept (--pairs_file, one
tab-separated pair per line), of the difference of their text encodings (the encoder's last hidden states, all 77
positions). For each case a genetic search over K token ids looks for the prompt whose encoding is nearest (squared
Euclidean distance, summed over positions and dimensions) to enc(prompt) + eta * vector; no diffusion model is
involved until the found prompt, plain text, is judged once. The vector can be read from a file instead
(--concept_vector, .npy or .pt, [77, hidden size]: the published ones or a run's); one computed from pairs is written
next to the run's outputs (concept_vector.npy) in the same format. Published defaults: chiayi-hsu/Ring-A-Bell
InversePrompt.ipynb (population 200, 3000 generations, mutation rate 0.25, crossover rate 0.5, length 16,
cof = eta 3 for nudity) and Get_Concept_Vector.ipynb (the vector).

Each generation keeps the better half of the population (sorted by fitness); each survivor in turn, with the
crossover rate, is crossed at a random cut with a random survivor (two children); then each member, with the
mutation rate, gets one random position set to a random token. Deliberate differences (docs/attacks.md):
- the best survivor is never mutated (the notebook mutates survivors in place, so its best can get worse from one
  generation to the next; here the best fitness never does);
- candidates are drawn from the vocabulary without special tokens (the notebook: ids 1..49405, i.e. also without
  id 0), and padded as the pipeline pads the found text;
- the encoder is the unlearned model's (the notebook uses SD-1.4's: the same for UNet-only unlearning);
- every random draw comes from the harness's generator, so a case's prompt is the same in every run.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from common.errors import InputError

from . import optim
from .base import Case, Found, Models

FLAGS = [
    ("--num_tokens", int, 16, "Ring-A-Bell: K, the found prompt's tokens (chiayi-hsu/Ring-A-Bell "
                              "InversePrompt.ipynb: length 16; its K = 77 runs are length 75)"),
    ("--population", int, 200, "Ring-A-Bell: candidates per generation (InversePrompt.ipynb: population_size 200)"),
    ("--generations", int, 3000, "Ring-A-Bell: generations (InversePrompt.ipynb: generation 3000)"),
    ("--mutation_rate", float, 0.25, "Ring-A-Bell: chance that a candidate gets one random token "
                                     "(InversePrompt.ipynb: mutateRate 0.25)"),
    ("--crossover_rate", float, 0.5, "Ring-A-Bell: chance that a survivor is crossed with another "
                                     "(InversePrompt.ipynb: crossoverRate 0.5)"),
    ("--eta", float, 3.0, "Ring-A-Bell: weight of the concept vector in the target enc(prompt) + eta * vector "
                          "(InversePrompt.ipynb: cof 3, nudity; the paper uses 5.5 for violence)"),
    ("--concept_vector", str, None, "Ring-A-Bell: the concept vector as a .npy or .pt file, [77, hidden size] (e.g. "
                                    "the published Concept Vectors/Nudity_vector.npy, or a run's concept_vector.npy) "
                                    "instead of --pairs_file"),
]

VECTOR_FILE = "concept_vector.npy"  # a run's vector computed from its pairs, next to its outputs
VECTOR_SUFFIXES = (".npy", ".pt")

MAX_TOKENS = 75  # the text encoder's 77 positions less start- and end-of-text


# --- the concept vector -------------------------------------------------------------------------------------------

def _normalised(text: str) -> str:
    """What the CLIP tokenizer sees: lower case, runs of white space as one space."""
    return " ".join(text.lower().split())


def read_pairs(path: str, flag: str = "--pairs_file") -> List[Tuple[str, str]]:
    """The (with concept, without concept) prompt pairs of a file, one tab-separated pair per non-empty line;
    InputError (one line) for a line without exactly one tab, an empty side, a pair whose prompts do not differ,
    or a file without pairs."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise InputError(f"{flag} {path}: no such file") from None
    except UnicodeDecodeError:
        raise InputError(f"{flag} {path}: not a UTF-8 text file") from None
    except OSError as err:
        raise InputError(f"{flag} {path}: cannot be read ({err.strerror or err})") from None
    pairs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        where = f"{flag} {path} line {n}"
        if len(fields) != 2:
            raise InputError(f"{where}: expected one tab between the prompt with the concept and the prompt "
                             f"without it, found {len(fields) - 1}")
        with_c, without = fields[0].strip(), fields[1].strip()
        if not with_c or not without:
            raise InputError(f"{where}: empty prompt {'with' if not with_c else 'without'} the concept")
        if _normalised(with_c) == _normalised(without):
            raise InputError(f"{where}: the two prompts do not differ ({with_c!r}); the concept vector is their "
                             "difference")
        pairs.append((with_c, without))
    if not pairs:
        raise InputError(f"{flag} {path}: no pairs (expected one tab-separated pair per line: the prompt with the "
                         "concept, then the prompt without it)")
    return pairs


@torch.no_grad()
def concept_vector(text_encoder, tokenizer, pairs: Sequence[Tuple[str, str]]) -> torch.Tensor:
    """mean over pairs of enc(with concept) - enc(without) [max_length, d] (Get_Concept_Vector.ipynb: each prompt
    padded to 77 tokens, the last hidden states)."""
    diffs = []
    for with_c, without in pairs:
        ids = torch.stack([optim.prompt_ids(tokenizer, with_c), optim.prompt_ids(tokenizer, without)])
        enc = optim.encode_ids(text_encoder, ids).float()
        diffs.append(enc[0] - enc[1])
    return torch.stack(diffs).mean(dim=0)


_VECTORS: Dict[tuple, torch.Tensor] = {}  # one vector per (encoder, pairs or file) in a process: every case uses it


def cached_vector(text_encoder, tokenizer, pairs: Sequence[Tuple[str, str]], save_to: Optional[str] = None
                  ) -> torch.Tensor:
    """concept_vector, computed once per process for a given encoder and pairs, and written to ``save_to`` (.npy)
    when computed."""
    key = (id(text_encoder), tuple(pairs), save_to)
    if key not in _VECTORS:
        _VECTORS.clear()
        _VECTORS[key] = concept_vector(text_encoder, tokenizer, pairs)
        if save_to:
            save_vector(_VECTORS[key], save_to)
    return _VECTORS[key]


def save_vector(vector: torch.Tensor, path: str) -> None:
    """The vector as a float32 .npy file (the published vectors' format), written whole or not at all (every process
    of a run may write the same file)."""
    import numpy as np

    from common.results import writing

    with writing("results", path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp.npy"
        np.save(tmp, vector.detach().float().cpu().numpy())
        os.replace(tmp, path)


def load_vector(path: str, flag: str = "--concept_vector") -> torch.Tensor:
    """A concept vector from a .npy (numpy.save) or .pt (torch.save of a tensor) file: a 2-D array of finite numbers
    (float32); InputError (one line) otherwise."""
    import numpy as np

    if not os.path.isfile(path):
        raise InputError(f"{flag} {path}: no such file")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in VECTOR_SUFFIXES:
        raise InputError(f"{flag} {path}: expected a .npy or .pt file")
    try:
        if suffix == ".npy":
            value = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same refusal
        raise InputError(f"{flag} {path}: not readable as a {suffix} array ({type(err).__name__})") from None
    if not isinstance(value, torch.Tensor) or value.dim() != 2 or not value.is_floating_point():
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise InputError(f"{flag} {path}: expected a 2-D float array [positions, hidden size], found {shape}")
    if not torch.isfinite(value).all():
        raise InputError(f"{flag} {path}: holds values that are not finite")
    return value.float()


def check_vector_shape(vector: torch.Tensor, shape: Tuple[int, int], path: str, flag: str = "--concept_vector"
                       ) -> None:
    """InputError (one line) when the vector is not [max_length, hidden size] of the model's text encoder."""
    if tuple(vector.shape) != tuple(shape):
        raise InputError(f"{flag} {path}: shape {list(vector.shape)}, but the model's text encoder needs "
                         f"{list(shape)} (its {shape[0]} token positions x hidden size {shape[1]})")


def model_vector_shape(model_dir: str) -> Optional[Tuple[int, int]]:
    """[tokenizer max length, text encoder hidden size] read from a local diffusers directory's config files (None
    where they cannot be read: a hub id is checked when the model loads)."""
    import json

    try:
        with open(os.path.join(model_dir, "text_encoder", "config.json"), encoding="utf-8") as f:
            encoder = json.load(f)
        with open(os.path.join(model_dir, "tokenizer", "tokenizer_config.json"), encoding="utf-8") as f:
            length = json.load(f).get("model_max_length")
    except (OSError, ValueError):
        return None
    hidden = encoder.get("hidden_size")
    if not isinstance(length, int) or length > encoder.get("max_position_embeddings", length) or not hidden:
        length = encoder.get("max_position_embeddings")
    return (int(length), int(hidden)) if length and hidden else None


# --- fitness ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def fitness(text_encoder, layout: optim.Layout, candidates: torch.Tensor, target: torch.Tensor,
            chunk: int = 128) -> torch.Tensor:
    """Squared distance (float64) between each candidate's encoding and ``target`` [L, d]: candidates [P, K] are
    the token ids of the layout's slots (InversePrompt.ipynb's fitness; lower is better)."""
    out = []
    for start in range(0, candidates.shape[0], chunk):
        part = candidates[start:start + chunk]
        ids = layout.ids.unsqueeze(0).repeat(part.shape[0], 1)
        ids[:, layout.adv] = part.to(ids.dtype)
        enc = optim.encode_ids(text_encoder, ids)
        out.append(((enc.double() - target.double().to(enc.device)) ** 2).sum(dim=(1, 2)).cpu())
    return torch.cat(out)


# --- the genetic search ----------------------------------------------------------------------------------------

def crossover(parents: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Children [C, K]: each parent in turn, with probability ``rate``, is cut at a random point (0..K-1) with a
    random parent, giving two children (InversePrompt.ipynb's crossover: its cut 1..length counts the start
    token)."""
    n, k = parents.shape
    crossed = torch.rand(n, generator=generator) < rate
    partners = torch.randint(n, (n,), generator=generator)
    cuts = torch.randint(k, (n,), generator=generator)
    children = []
    for i in torch.nonzero(crossed).flatten().tolist():
        j, c = int(partners[i]), int(cuts[i])
        children.append(torch.cat([parents[i, :c], parents[j, c:]]))
        children.append(torch.cat([parents[j, :c], parents[i, c:]]))
    return torch.stack(children) if children else parents.new_empty((0, k))


def mutate(population: torch.Tensor, rate: float, vocab: torch.Tensor, generator: torch.Generator
           ) -> torch.Tensor:
    """Which rows [P] changed: each row but the first (the best survivor), with probability ``rate``, gets one
    random position set to a random vocabulary token (in place)."""
    p, k = population.shape
    chosen = torch.rand(p, generator=generator) < rate
    positions = torch.randint(k, (p,), generator=generator)
    values = vocab[torch.randint(len(vocab), (p,), generator=generator)]
    chosen[0] = False  # elitism: the best never gets worse (the notebook mutates it too)
    rows = torch.nonzero(chosen).flatten()
    population[rows, positions[rows]] = values[rows].to(population.dtype)
    return chosen


def evolve(score: Callable[[torch.Tensor], torch.Tensor], vocab: torch.Tensor, num_tokens: int, population: int,
           generations: int, mutation_rate: float, crossover_rate: float, generator: torch.Generator
           ) -> Tuple[torch.Tensor, List[float]]:
    """(the best candidate's ids [K], the best fitness of every generation): the genetic search minimising
    ``score`` (candidates [P, K] -> fitness [P]). A candidate's fitness is computed once (survivors keep theirs)."""
    pop = vocab[torch.randint(len(vocab), (population, num_tokens), generator=generator)]
    fit = score(pop)
    history = []
    keep = max(1, population // 2)
    for g in range(generations):
        order = torch.argsort(fit, stable=True)[:keep]  # ascending: the better half survives
        pop, fit = pop[order], fit[order]
        history.append(float(fit[0]))
        if g == generations - 1:
            break
        children = crossover(pop, crossover_rate, generator)
        pop = torch.cat([pop, children])
        changed = mutate(pop, mutation_rate, vocab, generator)
        changed[len(fit):] = True  # children are new
        fresh = torch.empty(len(pop), dtype=fit.dtype)
        fresh[:len(fit)] = fit
        rows = torch.nonzero(changed).flatten()
        if len(rows):
            fresh[rows] = score(pop[rows]).to(fit.dtype)
        fit = fresh
    return pop[0].clone(), history


# --- the attack --------------------------------------------------------------------------------------------------

def validate(settings: dict) -> None:
    """Bad settings or pairs file as one InputError naming the flag."""
    optim.positive_settings(settings, ["num_tokens", "generations"])
    optim.positive_settings(settings, ["population"], minimum=2)
    if settings.get("num_tokens") is not None and settings["num_tokens"] > MAX_TOKENS:
        raise InputError(f"--num_tokens {settings['num_tokens']}: at most {MAX_TOKENS} (the text encoder's 77 "
                         "positions less start- and end-of-text)")
    optim.rate_setting(settings, ["mutation_rate", "crossover_rate"])
    eta = settings.get("eta")
    if eta is not None and eta != eta:
        raise InputError(f"--eta {eta}: not a number")
    if settings.get("pairs_file") and settings.get("concept_vector"):
        raise InputError("--concept_vector and --pairs_file: give one (the vector, or the pairs it is computed from)")
    if settings.get("pairs_file"):
        read_pairs(settings["pairs_file"])
    if settings.get("concept_vector"):
        load_vector(settings["concept_vector"])


def target_encoding(text_encoder, tokenizer, prompt: str, vector: torch.Tensor, eta: float) -> torch.Tensor:
    """enc(prompt) + eta * vector [L, d]: what the search moves the candidates' encodings towards."""
    with torch.no_grad():
        enc = optim.encode_ids(text_encoder, optim.prompt_ids(tokenizer, prompt))[0].float()
    return enc + eta * vector.to(enc.device)


def case_vector(text_encoder, tokenizer, s: dict) -> torch.Tensor:
    """The run's concept vector: read from --concept_vector (checked against the encoder's shape), or computed from
    --pairs_file and written to ``concept_vector_out`` (the run's concept_vector.npy)."""
    if s.get("concept_vector"):
        key = ("file", os.path.abspath(s["concept_vector"]))
        if key not in _VECTORS:
            vector = load_vector(s["concept_vector"])
            shape = (tokenizer.model_max_length, text_encoder.config.hidden_size)
            check_vector_shape(vector, shape, s["concept_vector"])
            _VECTORS.clear()
            _VECTORS[key] = vector
        return _VECTORS[key]
    if not s.get("pairs_file"):
        raise InputError("Ring-A-Bell needs --pairs_file (prompts with and without the concept) or --concept_vector")
    return cached_vector(text_encoder, tokenizer, read_pairs(s["pairs_file"]), s.get("concept_vector_out"))


def search(case: Case, models: Models, judge, settings: dict, generator: torch.Generator) -> Found:
    """Attack one case: the genetic search in the text encoder, then one judgement of the found prompt."""
    s = {name.lstrip("-"): default for name, _, default, _ in FLAGS}
    s.update({k: v for k, v in settings.items() if v is not None})
    parts = models.unlearned
    tok, encoder = parts.tokenizer, parts.text_encoder
    vector = case_vector(encoder, tok, s)
    target = target_encoding(encoder, tok, case.prompt, vector, s["eta"])
    layout = optim.make_layout(tok, "", "free", s["num_tokens"])
    vocab = optim.allowed_ids(tok, optim.token_table(encoder).shape[0])
    best, _ = evolve(lambda c: fitness(encoder, layout, c, target), vocab, s["num_tokens"], s["population"],
                     s["generations"], s["mutation_rate"], s["crossover_rate"], generator)
    trail = optim.Trail()
    trail.judge(judge, case, s["generations"], layout.text(tok, best), best)
    return trail.found(s["generations"], prefer_last=True)
