"""Tiny random Hugging Face causal LMs of several architectures, for tests."""
from __future__ import annotations

import torch
import transformers

VOCAB = 48
PAD, BOS, EOS = 0, 1, 2
SPECIAL = dict(pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)


def _config(arch: str, hidden: int, layers: int, heads: int, vocab: int = VOCAB):
    if arch == "llama":
        return transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=heads,
                                        num_key_value_heads=heads, **SPECIAL)
    if arch == "qwen2":
        return transformers.Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=heads,
                                        num_key_value_heads=max(1, heads // 2), **SPECIAL)
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads,
                                       n_positions=64, **SPECIAL)
    if arch == "gpt_neox":
        return transformers.GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                          num_hidden_layers=layers, num_attention_heads=heads,
                                          max_position_embeddings=64, **SPECIAL)
    raise ValueError(arch)


def tiny_model(arch: str, hidden: int = 32, layers: int = 4, heads: int = 4, seed: int = 0, vocab: int = VOCAB):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(_config(arch, hidden, layers, heads, vocab)).eval()


# (anchor arch, augment arch): different hidden sizes, depths and head counts on the two sides.
PAIRS = [
    ("llama", "llama"),
    ("llama", "gpt2"),
    ("gpt2", "gpt_neox"),
    ("qwen2", "llama"),
    ("gpt_neox", "qwen2"),
]


def tiny_pair(anchor_arch: str, augment_arch: str, **compose_kwargs):
    import calm_dist

    anchor = tiny_model(anchor_arch, hidden=48, layers=3, heads=6, seed=1)
    augment = tiny_model(augment_arch, hidden=32, layers=4, heads=4, seed=2)
    if not compose_kwargs:
        compose_kwargs = {"connections": [(0, -1), (1, 0), (3, 2)]}
    return calm_dist.compose(anchor, augment, **compose_kwargs)


def randomise_bridges(model, std: float = 0.3, seed: int = 3) -> None:
    """Non-zero output projections, so the bridges actually change the anchor."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bridge in model.bridges:
            bridge.o_proj.weight.normal_(0, std, generator=generator)


def train_and_check_only_bridges_change(model, steps: int) -> None:
    """A few optimizer steps on random ids: exactly the bridges get gradients, every other parameter
    stays bit-identical and frozen, and the base models stay in eval mode."""
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not name.startswith("bridges.")}
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    model.train()
    for step in range(steps):
        ids = random_ids(2, 8, seed=step)
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
        assert with_grad == {name for name, _ in model.bridges.named_parameters(prefix="bridges")}
        optimizer.step()
    for name, parameter in model.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), name
            assert not parameter.requires_grad
    assert not model.anchor.training and not any(augment.training for augment in model.augments)
    assert model.bridges.training


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


ALPHABET = "ab "


def chunk_tokenizer(width: int, bos: bool):
    """A fast tokenizer over texts of ``ALPHABET`` that cuts them, left to right, into chunks of
    ``width`` characters (the last may be shorter), spaces included: chunks straddle word boundaries
    and, between two widths, each other's boundaries. Ids: PAD, BOS, EOS, then every chunk."""
    import itertools

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS}
    for length in range(1, width + 1):
        for chunk in itertools.product(ALPHABET, repeat=length):
            vocab["".join(chunk)] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(f".{{1,{width}}}"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>")
