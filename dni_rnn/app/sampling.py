"""Sampling from a trained run (`trained.py`): text from a language model, one episode of a
copy task with the model's answer.

    run = dni_rnn.load("runs/ptb-word-small-dni-T35-s1")
    for text in generate(run, "the market", tokens=50, seed=1):
        print(text, end="")

A language model reads `<eos>` and the prompt from the zero state, as a line starts in its
training stream, then samples one token at a time, the state carried. The text comes out
as the run's tokenizer writes it, a token at a time.
"""
from __future__ import annotations

import torch

from .tasks import build_task


def prompt_ids(codec, prompt):
    """The ids the model reads first: `<eos>` (a line starts), then the prompt.

    Args:
        codec: the run's `TextCodec`.
        prompt: text; a newline in it ends a line (`<eos>`).
    Returns:
        (ids, unknown): unknown lists the prompt's tokens the vocabulary lacks; they are
        read as `<unk>`, or left out where the vocabulary has none (characters).
    """
    tokens = codec.tokens(prompt)
    unknown = codec.unknown(tokens)
    if unknown and codec.vocab.unk is None:
        tokens = [t for t in tokens if t in codec.vocab]
    return [codec.vocab.eos] + codec.vocab.encode(tokens), unknown


def sample_ids(run, ids, tokens, temperature=1.0, top_k=0, seed=None):
    """Yield `tokens` ids sampled after reading `ids`.

    Args:
        run: a `Trained` language model.
        ids: the ids read first (at least one).
        tokens: how many to sample.
        temperature: divides the logits; 0 takes the most likely token.
        top_k: sample among the k most likely tokens only (0: all).
        seed: the same seed gives the same ids (None: torch's global generator).
    """
    # sampling draws on the CPU, so a seed gives the same ids on any device
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    x = torch.tensor(ids, device=run.device).view(-1, 1)  # (T, 1): one stream
    state = run.state(1)
    with torch.no_grad():
        for _ in range(tokens):
            logits, state = run.model(x, state)
            next_id = _pick(logits[-1, 0].float().cpu(), temperature, top_k, generator)
            yield next_id
            x = torch.tensor([[next_id]], device=run.device)


def _pick(logits, temperature, top_k, generator):
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def generate(run, prompt="", tokens=50, temperature=1.0, top_k=0, seed=None):
    """Yield the text of the prompt, as the model reads it (`prompt_ids`), then of `tokens`
    sampled tokens, piece by piece as the run's tokenizer writes them (`<eos>`: a newline).

    Args:
        run: a `Trained` language model.
        prompt: the text to continue ("": a line of its own).
        tokens, temperature, top_k, seed: as `sample_ids`.
    """
    codec = run.tokenizer
    ids, _ = prompt_ids(codec, prompt)
    eos, line, shown = codec.vocab.eos, [], ""

    def write(i):
        nonlocal line, shown
        if i == eos:
            line, shown = [], ""
            return "\n"
        line.append(codec.vocab.itos[i])
        text = codec.detokenize(line)  # the whole line again: sentencepiece joins pieces
        new, shown = text[len(shown):], text
        return new

    yield "".join(write(i) for i in ids[1:])
    for i in sample_ids(run, ids, tokens, temperature, top_k, seed):
        yield write(i)


def copy_episode(run, seed=None):
    """One episode of a copy-task run at its curriculum's length: the input, the target,
    the model's answer and the wrong bits.

    Returns:
        A list of text lines: one per time step (bits as 0/1, a repeat count as a number),
        then the wrong bits in all.
    """
    task = build_task(run.config)
    task.load_state_dict(run.task_state)
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    batch = task.episodes(1, task.length, generator)  # (L, 1, D) each
    with torch.no_grad():
        logits, _ = run.model(batch.inputs.to(run.device), run.state(1))
    answer = (logits.cpu() > 0).float()  # logit > 0: probability > 1/2
    wrong = (answer != batch.targets) & batch.mask.unsqueeze(-1)
    k = run.config.task.bits
    rows = [["t", "input", "target", "answer", "wrong"]]
    for t in range(batch.inputs.shape[0]):
        rows.append([str(t), _bits(batch.inputs[t, 0], k)])
        if batch.mask[t, 0]:  # an answer step
            rows[-1] += [_bits(batch.targets[t, 0], k), _bits(answer[t, 0], k),
                         str(int(wrong[t, 0].sum()))]
    widths = [max(len(r[i]) for r in rows if len(r) > i) for i in range(len(rows[0]))]
    kind, count = ("repeat copy", " and the repeat count") if task.repeat else ("copy", "")
    lines = [f"{kind}, N={task.length} (the curriculum's length; longest solved: "
             f"{task.solved}): {k}-bit patterns, then the delimiter{count} (input) or the end "
             "marker (target); time downwards"]
    lines += ["  ".join(f"{c:<{w}}" for c, w in zip(r, widths)).rstrip() for r in rows]
    counted = int(batch.mask.sum()) * batch.targets.shape[-1]
    lines.append(f"wrong bits: {int(wrong.sum())} of {counted} (step {run.step})")
    return lines


def _bits(v, k):
    """`10110010 1`: k pattern bits, then the other channels (a count as a number)."""
    rest = " ".join(f"{x:g}" for x in v[k:].tolist())
    return "".join(str(int(x)) for x in v[:k].tolist()) + " " + rest
