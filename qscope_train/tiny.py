"""Offline fixtures: a generated text and chat corpus, a byte-level BPE tokenizer trained on them, and
tiny Qwen3 / Qwen3.5 models saved with save_pretrained (loaded back through from_pretrained).

tiny-qwen3 is pretrained for a few hundred steps on the text corpus, so that its residual stream and
next-token loss have structure; tiny-qwen3-chat is that model post-trained for a few more steps on
chat-formatted conversations (the pair the adaptation demo uses). The Qwen3.5 models keep random weights.
Nothing here touches the network; everything is deterministic for a given seed and thread count.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

FIXTURE_VERSION = 2
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
)
QWEN3_5_LINEAR = dict(
    linear_conv_kernel_dim=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
)

_WORDS = {
    "subj": "the cat|a small robot|my neighbour|the river|an old map|the teacher|a quiet engine|the baker|"
    "our team|the storm|a young fox|the library|every student|the captain|a red kite|the garden",
    "verb": "found|carried|painted|measured|ignored|repaired|followed|described|counted|opened|borrowed|watched",
    "obj": "a wooden box|the last train|seven letters|the bright lamp|a narrow bridge|the blue door|"
    "three apples|the secret plan|a paper boat|the winter coat|an empty jar|the long song",
    "place": "near the harbour|after lunch|in the morning|under the bridge|before the rain|at the market|"
    "behind the school|on the hill|during the festival|inside the tent",
    "adj": "quiet|bright|heavy|strange|gentle|rapid|careful|golden|tired|clever",
    "item": "apples|bread|candles|rope|salt|paper|tea|nails|soap|rice|honey|string",
}
_W = {key: value.split("|") for key, value in _WORDS.items()}


def _sentence(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        return f"{rng.choice(_W['subj']).capitalize()} {rng.choice(_W['verb'])} {rng.choice(_W['obj'])} {rng.choice(_W['place'])}."
    if kind == 1:
        a, b = rng.randrange(100), rng.randrange(100)
        op, val = rng.choice([("plus", a + b), ("minus", a - b), ("times", a * b)])
        return f"{a} {op} {b} is {val}."
    if kind == 2:
        items = ", ".join(rng.sample(_W["item"], rng.randrange(2, 6)))
        return f"Shopping list: {items}."
    if kind == 3:
        name = rng.choice(["add", "scale", "merge", "count", "clip"])
        return f"def {name}(x, y):\n    return x {rng.choice('+-*')} y * {rng.randrange(10)}\n"
    if kind == 4:
        return f"It was a {rng.choice(_W['adj'])} and {rng.choice(_W['adj'])} day, said {rng.choice(_W['subj'])}."
    return f"On day {rng.randrange(1, 29)} of month {rng.randrange(1, 13)}, {rng.choice(_W['subj'])} {rng.choice(_W['verb'])} {rng.choice(_W['obj'])}."


def generate_corpus(n_docs: int, seed: int = 0) -> Iterator[str]:
    """Deterministic synthetic documents of 3-12 sentences each."""
    rng = random.Random(seed)
    for _ in range(n_docs):
        yield " ".join(_sentence(rng) for _ in range(rng.randrange(3, 13)))


def generate_chats(n_chats: int, seed: int = 0) -> Iterator[list[dict]]:
    """Deterministic one- to three-turn conversations about the corpus's sentence kinds."""
    rng = random.Random(seed)
    for _ in range(n_chats):
        messages = []
        for _ in range(rng.randrange(1, 4)):
            kind = rng.randrange(4)
            if kind == 0:
                a, b = rng.randrange(100), rng.randrange(100)
                q, a_ = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
            elif kind == 1:
                items = ", ".join(rng.sample(_W["item"], rng.randrange(2, 5)))
                q, a_ = "What should I buy?", f"Shopping list: {items}."
            elif kind == 2:
                subj = rng.choice(_W["subj"])
                q = f"Tell me what {subj} did."
                a_ = f"{subj.capitalize()} {rng.choice(_W['verb'])} {rng.choice(_W['obj'])} {rng.choice(_W['place'])}."
            else:
                q, a_ = "Describe the day.", f"It was a {rng.choice(_W['adj'])} and {rng.choice(_W['adj'])} day."
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a_}]
        yield messages


def build_tokenizer(texts: list[str], vocab_size: int = 1024):
    """A byte-level BPE tokenizer with Qwen-style special tokens and a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _token_ids(tokenizer) -> dict:
    return dict(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def _packed_blocks(tokenizer, texts: list[str], context_len: int = 128):
    """Token ids of the texts joined by EOS, cut into (N, context_len) blocks."""
    import torch

    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    n = len(ids) // context_len
    return torch.tensor(ids[: n * context_len]).view(n, context_len)


def train_lm_(model, blocks, steps: int, lr: float, seed: int, batch: int = 16) -> float:
    """A few AdamW steps of next-token training on random blocks; returns the last loss."""
    import torch

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        for group in opt.param_groups:  # short warmup keeps the first steps of a random model stable
            group["lr"] = lr * min(1.0, (step + 1) / 20)
        ids = blocks[torch.randint(len(blocks), (batch,), generator=g)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return float(loss.detach())


def build_models(
    tokenizer, out: Path, texts: list[str], chats: list[list[dict]], seed: int = 0, train_steps: int = 150
) -> tuple[dict[str, Path], dict[str, float]]:
    """tiny-qwen3 (Qwen3ForCausalLM, pretrained on the text corpus), tiny-qwen3-chat (that model post-trained
    on chat conversations), tiny-qwen3_5 (hybrid linear/full attention, text only, random) and
    tiny-qwen3_5-vl (Qwen3_5ForConditionalGeneration with a one-block vision tower, random).
    Returns their paths and the last training loss of the two trained models."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from transformers.models.qwen3_5 import (
        Qwen3_5Config,
        Qwen3_5ForCausalLM,
        Qwen3_5ForConditionalGeneration,
        Qwen3_5TextConfig,
    )

    ids = _token_ids(tokenizer)
    text35 = dict(TINY_SHAPE, **QWEN3_5_LINEAR, **ids)
    vision = dict(
        depth=1,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        patch_size=4,
        num_position_embeddings=64,
    )
    builders = {
        "tiny-qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**TINY_SHAPE, **ids)),
        "tiny-qwen3_5": lambda: Qwen3_5ForCausalLM(Qwen3_5TextConfig(**text35)),
        "tiny-qwen3_5-vl": lambda: Qwen3_5ForConditionalGeneration(
            Qwen3_5Config(text_config=text35, vision_config=vision)
        ),
    }
    paths, losses = {}, {}
    for i, (name, build) in enumerate(builders.items()):
        torch.manual_seed(seed + i)
        model = build().eval()
        if name == "tiny-qwen3":
            losses[name] = train_lm_(model, _packed_blocks(tokenizer, texts), train_steps, 3e-3, seed)
            model.save_pretrained(out / name)
            tokenizer.save_pretrained(out / name)
            paths[name] = out / name
            rendered = [tokenizer.apply_chat_template(m, tokenize=False) for m in chats]
            chat_blocks = _packed_blocks(tokenizer, rendered)
            name = "tiny-qwen3-chat"
            losses[name] = train_lm_(model, chat_blocks, max(1, train_steps // 3), 1e-3, seed + 100)
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
        paths[name] = out / name
    return paths, losses


def build_fixtures(
    out: str | Path, n_docs: int = 12000, seed: int = 0, force: bool = False, train_steps: int = 150
) -> dict[str, Path]:
    """Write corpus.jsonl, chat.jsonl, the tokenizer and the tiny models under `out` (skipped if already built).

    The chat conversations that post-train tiny-qwen3-chat are drawn apart from those in chat.jsonl.
    """
    import torch

    out = Path(out)
    marker = out / "fixtures.json"
    names = ["tiny-qwen3", "tiny-qwen3-chat", "tiny-qwen3_5", "tiny-qwen3_5-vl"]
    paths = {name: out / name for name in names} | {"corpus": out / "corpus.jsonl", "chat": out / "chat.jsonl"}
    if not force and marker.is_file() and json.loads(marker.read_text()).get("version") == FIXTURE_VERSION:
        return paths
    out.mkdir(parents=True, exist_ok=True)
    texts = list(generate_corpus(n_docs, seed))
    chats = list(generate_chats(n_docs // 2, seed))
    with open(paths["corpus"], "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    with open(paths["chat"], "w") as f:
        for messages in chats:
            f.write(json.dumps({"messages": messages}) + "\n")
    tokenizer = build_tokenizer(texts + [m["content"] for c in chats for m in c])
    post_train_chats = list(generate_chats(n_docs // 2, seed + 1))
    with torch.random.fork_rng():
        _, losses = build_models(tokenizer, out, texts, post_train_chats, seed, train_steps)
    meta = {
        "version": FIXTURE_VERSION,
        "seed": seed,
        "n_docs": n_docs,
        "train_steps": train_steps,
        "final_loss": losses,
    }
    marker.write_text(json.dumps(meta) + "\n")
    return paths
