"""A tokenizer for a synthetic checkpoint: a byte-level BPE at the preset's exact vocabulary size.

Trained with the `tokenizers` library (ByteLevel pre-tokenizer and decoder, the GPT-2 / GPT-NeoX
kind) on text every install has: the articles and summaries in tp_runtime/data/summaries.jsonl and,
where the interpreter ships it, CPython's `pydoc_data.topics`. Training takes about a second and is
deterministic for a given Python (pydoc_data's text changes between Python versions).

Every id in 0..vocab_size-1 decodes, so whatever a random model emits turns into text:
    - the config's special ids get their tokens: bos / eos (`<s>` / `</s>`, or one `<|endoftext|>`
      when bos == eos, as in GPT-NeoX), pad (`<pad>` unless it shares an id), plus `<|im_start|>` and
      `<|im_end|>` on the highest free ids for the chat template;
    - the learned tokens (the 256 byte symbols, then the merges) take the other ids in order;
    - a few hundred KB of text cannot reach a 92k vocabulary (it gives about 10k merges), so the ids left
      are filled with concatenations of two learned tokens. No merge produces them, so encoding never
      emits them, but each decodes to text like any other id.
The special tokens sit in the BPE vocabulary too (as GPT-NeoX's tokenizer.json has `<|endoftext|>`): the
`tokenizers` library gives an added token the model's id for it, else the next id past the model's.
The files: tokenizer.json, tokenizer_config.json (tokenizer_class PreTrainedTokenizerFast, a Jinja chat
template in the ChatML style), special_tokens_map.json; `AutoTokenizer.from_pretrained(dir)` loads them.
"""

import json
import os
import random

BYTE_SYMBOLS = 256
DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "summaries.jsonl")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def corpus() -> list[str]:
    """The training text, in a fixed order."""
    texts = []
    with open(DATA) as f:
        for line in f:
            row = json.loads(line)
            texts += [row[k] for k in sorted(row) if isinstance(row[k], str)]
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data; the bundled text alone still trains
        topics = {}
    return texts + [topics[k] for k in sorted(topics)]


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def special_tokens(cfg: dict) -> dict[int, str]:
    """id -> token of the config's bos / eos / pad ids and the two chat-template tokens."""
    vocab_size = cfg["vocab_size"]
    bos, eos, pad = (_ids(cfg.get(k)) for k in ("bos_token_id", "eos_token_id", "pad_token_id"))
    out = {}
    for i in pad:
        out[i] = "<pad>"
    for k, i in enumerate(eos):
        out[i] = "</s>" if k == 0 else f"<|eos_{k}|>"
    for i in bos:
        out[i] = "<|endoftext|>" if i in eos else "<s>"
    if eos and bos and bos[0] == eos[0]:
        out[eos[0]] = "<|endoftext|>"
    top = [i for i in range(vocab_size - 1, -1, -1) if i not in out]
    out[top[0]], out[top[1]] = IM_START, IM_END
    bad = [i for i in out if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"special token ids {bad} are outside the vocabulary of {vocab_size}")
    return out


def chat_template(bos_token: str | None) -> str:
    """ChatML turns, after the bos token when the model has one of its own."""
    start = "{{ bos_token }}" if bos_token else ""
    return (start + "{% for message in messages %}" + IM_START + "{{ message['role'] }}\n{{ message['content'] }}"
            + IM_END + "\n{% endfor %}{% if add_generation_prompt %}" + IM_START + "assistant\n{% endif %}")


def can_train(vocab_size: int, cfg: dict) -> bool:
    """A byte-level vocabulary needs its 256 byte symbols besides the special tokens."""
    return vocab_size >= BYTE_SYMBOLS + len(special_tokens(cfg))


def build_tokenizer(cfg: dict, seed: int = 0):
    """The trained `tokenizers.Tokenizer` with exactly cfg["vocab_size"] ids, and its special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    vocab_size = cfg["vocab_size"]
    specials = special_tokens(cfg)
    if not can_train(vocab_size, cfg):
        raise ValueError(f"a byte-level tokenizer needs at least {BYTE_SYMBOLS + len(specials)} ids; "
                         f"the vocabulary has {vocab_size}")
    learned_size = vocab_size - len(specials)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=learned_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)

    spec = json.loads(tok.to_str())
    learned = sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get)[:learned_size]
    clash = set(learned) & set(specials.values())
    if clash:  # the added-token table would take the learned token's id instead
        raise ValueError(f"the trained merges produced the special tokens {sorted(clash)}")
    parts, taken, rng = tuple(learned), set(learned) | set(specials.values()), random.Random(seed)
    while len(learned) < learned_size:  # fill: two learned tokens glued, unreachable by the merges
        word = rng.choice(parts) + rng.choice(parts)
        if word not in taken:
            taken.add(word)
            learned.append(word)
    free = (i for i in range(vocab_size) if i not in specials)
    vocab = dict(zip(learned, free, strict=False))
    vocab.update({t: i for i, t in specials.items()})  # in the model's vocabulary too, so the ids hold on load
    spec["model"]["vocab"] = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    spec["added_tokens"] = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for i, t in sorted(specials.items())]
    tok = Tokenizer.from_str(json.dumps(spec))
    bos = _ids(cfg.get("bos_token_id"))
    eos = _ids(cfg.get("eos_token_id"))
    if bos and bos[0] not in eos:  # Llama-style models start every sequence with bos
        b = specials[bos[0]]
        tok.post_processor = processors.TemplateProcessing(single=f"{b} $A", pair=f"{b} $A $B:1",
                                                           special_tokens=[(b, bos[0])])
    return tok, specials


def write_tokenizer(cfg: dict, output_dir: str, seed: int = 0) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json for the config's vocabulary."""
    tok, specials = build_tokenizer(cfg, seed)
    tok.save(os.path.join(output_dir, "tokenizer.json"))
    bos, eos, pad = (_ids(cfg.get(k)) for k in ("bos_token_id", "eos_token_id", "pad_token_id"))
    names = {"bos_token": specials[bos[0]] if bos else None, "eos_token": specials[eos[0]] if eos else None,
             "pad_token": specials[pad[0]] if pad else None}
    names = {k: v for k, v in names.items() if v is not None}
    extra = [t for t in specials.values() if t not in names.values()]
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for i, t in sorted(specials.items())}
    config = dict(names, tokenizer_class="PreTrainedTokenizerFast", added_tokens_decoder=added,
                  additional_special_tokens=extra, clean_up_tokenization_spaces=False,
                  model_max_length=cfg.get("max_position_embeddings", 2048),
                  add_bos_token=bool(bos) and bos[0] not in eos, add_eos_token=False,
                  chat_template=chat_template(names.get("bos_token") if bos and bos[0] not in eos else None))
    with open(os.path.join(output_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(output_dir, "special_tokens_map.json"), "w") as f:
        json.dump(dict(names, additional_special_tokens=extra), f, indent=2)
