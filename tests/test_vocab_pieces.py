"""The anchor's vocabulary matrices split into row pieces compute what the whole matrices compute."""
import pytest
import torch
import transformers

from calm_dist.model.vocab_pieces import PiecewiseEmbedding, PiecewiseLinear, piece_bounds, split_vocab_matrices


def tiny_llama(tied: bool, vocab: int = 50) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(config).eval()


def split_copy(model: transformers.LlamaForCausalLM, rows: int):
    """``model`` with its vocabulary matrices split, every piece filled from the whole model's state dict."""
    state = model.state_dict()
    split = tiny_llama(model.config.tie_word_embeddings, model.config.vocab_size)
    sources = split_vocab_matrices(split, rows)
    with torch.no_grad():
        for name, parameter in split.named_parameters():
            source = sources.get(name)
            if source is None:
                parameter.copy_(state[name])
            else:
                parameter.copy_(state[source.name][source.start_row: source.start_row + source.rows])
    return split, sources


def test_piece_bounds_cover_every_row_once():
    assert piece_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert piece_bounds(8, 8) == [(0, 8)]
    with pytest.raises(ValueError, match="> 0"):
        piece_bounds(8, 0)


@pytest.mark.parametrize("tied", [False, True])
def test_split_model_gives_the_whole_models_logits_and_input_gradients(tied):
    whole = tiny_llama(tied)
    split, sources = split_copy(whole, rows=12)  # 50 rows: pieces of 12, 12, 12, 12, 2
    assert isinstance(split.get_input_embeddings(), PiecewiseEmbedding)
    assert isinstance(split.get_output_embeddings(), PiecewiseLinear)
    assert len(split.get_output_embeddings().pieces) == 5
    assert [piece.num_embeddings for piece in split.get_input_embeddings().pieces] == [12, 12, 12, 12, 2]
    ids = torch.tensor([[0, 11, 12, 13, 24, 47, 48, 49]])  # the first and last row of pieces
    assert torch.equal(split.get_input_embeddings()(ids), whole.get_input_embeddings()(ids))
    hidden = torch.randn(1, 8, 16)
    hidden_whole, hidden_split = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    logits_whole, logits_split = whole.lm_head(hidden_whole), split.lm_head(hidden_split)
    assert torch.allclose(logits_split, logits_whole, atol=1e-6)
    grad = torch.randn_like(logits_whole)
    logits_whole.backward(grad)
    logits_split.backward(grad)
    assert torch.allclose(hidden_split.grad, hidden_whole.grad, atol=1e-5)
    assert torch.allclose(split(ids).logits, whole(ids).logits, atol=1e-5)
    if tied:  # the head's pieces are the embedding's pieces; the sources name the stored embedding only
        assert all(linear.weight is table.weight for linear, table in
                   zip(split.lm_head.pieces, split.get_input_embeddings().pieces))
        assert {source.name for source in sources.values()} == {"model.embed_tokens.weight"}
    else:
        assert {source.name for source in sources.values()} == {"model.embed_tokens.weight", "lm_head.weight"}


def test_matrices_no_longer_than_a_piece_and_subclasses_stay_whole():
    model = tiny_llama(False)
    assert split_vocab_matrices(model, rows_per_piece=50) == {}
    assert type(model.lm_head) is torch.nn.Linear and type(model.get_input_embeddings()) is torch.nn.Embedding

    class Scaled(torch.nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 2.0

    scaled = tiny_llama(True)
    scaled.set_input_embeddings(Scaled(50, 16))
    scaled.lm_head.weight = scaled.get_input_embeddings().weight
    assert split_vocab_matrices(scaled, rows_per_piece=12) == {}  # a tied head goes with its embedding
    assert type(scaled.get_input_embeddings()) is Scaled and type(scaled.lm_head) is torch.nn.Linear


def _load_rank(rank: int, world: int, model_dir: str) -> dict:
    import deepspeed
    import torch.distributed as dist

    from calm_dist.config import load_config
    from calm_dist.distributed.zero_anchor import deepspeed_config, init_deepspeed, load_partitioned

    dist.init_process_group("gloo")
    init_deepspeed("gloo")
    broadcasts = []
    original = dist.broadcast
    dist.broadcast = lambda *args, **kwargs: broadcasts.append(1) or original(*args, **kwargs)
    config = load_config(None, ["deepspeed.param_persistence_threshold=0"])
    anchor = load_partitioned(model_dir, deepspeed_config(config.deepspeed, config.train, 1), vocab_piece_rows=12)
    dist.broadcast = original
    with deepspeed.zero.GatheredParameters(list(anchor.parameters())):
        return {"embedding": torch.cat([piece.weight.detach().clone() for piece in anchor.get_input_embeddings().pieces]),
                "head": torch.cat([piece.weight.detach().clone() for piece in anchor.get_output_embeddings().pieces]),
                "norm": anchor.model.norm.weight.detach().clone(), "broadcasts": len(broadcasts)}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tied", [False, True])
def test_each_anchor_rank_loads_its_pieces_from_the_checkpoint_without_broadcasting(tmp_path, tied):
    """Two ZeRO-3 ranks load a saved model with its vocabulary matrices in pieces of 12 rows: gathered, the
    pieces are the saved matrices; zero.Init broadcasts no initial values (the checkpoint overwrites them)."""
    from tests.dist_helpers import spawn

    whole = tiny_llama(tied)
    with torch.no_grad():
        whole.model.norm.weight.uniform_()
    whole.save_pretrained(tmp_path / "model")
    for rank, result in enumerate(spawn(_load_rank, 2, (str(tmp_path / "model"),), tmp_path / "ranks")):
        assert result["embedding"].equal(whole.get_input_embeddings().weight.detach()), rank
        assert result["head"].equal(whole.lm_head.weight.detach()), rank
        assert result["norm"].equal(whole.model.norm.weight.detach()), rank
        assert result["broadcasts"] == 0, rank


def test_auto_pieces_are_a_decoder_layers_largest_weight_and_bf16_keeps_whole_matrices():
    from calm_dist.distributed.zero_anchor import auto_vocab_piece_rows

    model = tiny_llama(False)  # largest decoder weight: 16 x 32 (MLP), rows of 16
    assert auto_vocab_piece_rows(model) == 32
    assert auto_vocab_piece_rows(model, low_precision=True) == 0


def test_a_parameter_outside_the_plain_partition_layout_is_filled_with_its_rows_only(tmp_path):
    """The fallback of partitioned loading (gather, copy, re-partition; e.g. ZeRO++'s secondary partitions):
    a piece gets exactly its rows of the stored tensor, a whole parameter the whole tensor."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from calm_dist.distributed.zero_anchor import _fill_partition
    from calm_dist.model.vocab_pieces import PieceSource

    stored = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    save_file({"table": stored}, str(tmp_path / "model.safetensors"))
    piece, whole = torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(10, 4))
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        _fill_partition(piece, handle, PieceSource("table", 5, 3, 10))
        _fill_partition(whole, handle, PieceSource("table"))
    assert piece.detach().equal(stored[5:8])
    assert whole.detach().equal(stored)
