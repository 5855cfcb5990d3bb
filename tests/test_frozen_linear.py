"""The anchor's frozen linear layers: same results as nn.Linear, no weight storage kept for backward; each
anchor rank reads exactly its own slice of a tensor from a safetensors file."""
import pytest
import torch
from torch import nn

from calm_dist.distributed.frozen_linear import FrozenLinear, use_frozen_linear


def two_layers(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4, bias=False))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def saved_storages(model: nn.Module, x: torch.Tensor) -> set[int]:
    """data_ptrs of every tensor autograd saves during the forward."""
    saved = set()

    def pack(tensor):
        saved.add(tensor.untyped_storage().data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x).sum().backward()
    return saved


def test_frozen_linear_gives_nn_linear_outputs_and_input_gradients():
    plain, frozen = two_layers(), two_layers()
    assert use_frozen_linear(frozen) == 2 and all(isinstance(frozen[i], FrozenLinear) for i in (0, 2))
    x = torch.randn(3, 7, 6)
    x_plain, x_frozen = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_plain, out_frozen = plain(x_plain), frozen(x_frozen)
    assert torch.equal(out_plain, out_frozen)
    grad = torch.randn_like(out_plain)
    out_plain.backward(grad)
    out_frozen.backward(grad)
    assert torch.allclose(x_plain.grad, x_frozen.grad, atol=1e-6)


def test_trainable_weights_still_get_their_gradients():
    torch.manual_seed(0)
    plain, frozen = nn.Linear(4, 3), nn.Linear(4, 3)
    frozen.load_state_dict(plain.state_dict())
    use_frozen_linear(frozen)
    x = torch.randn(2, 5, 4, requires_grad=True)
    plain(x).square().sum().backward()
    plain_grads = [p.grad.clone() for p in plain.parameters()] + [x.grad.clone()]
    x.grad = None
    frozen(x).square().sum().backward()
    for expected, got in zip(plain_grads, [p.grad for p in frozen.parameters()] + [x.grad]):
        assert torch.allclose(expected, got, atol=1e-6)


def test_no_frozen_weight_storage_is_saved_for_backward():
    plain, frozen = two_layers(), two_layers()
    use_frozen_linear(frozen)
    x = torch.randn(3, 6, requires_grad=True)
    weights = {p.untyped_storage().data_ptr() for p in plain.parameters()}
    assert saved_storages(plain, x) & weights  # plain F.linear keeps the weights alive until backward
    weights = {p.untyped_storage().data_ptr() for p in frozen.parameters()}
    assert not saved_storages(frozen, x) & weights


@pytest.mark.parametrize("shape", [(7,), (5, 3), (4, 3, 2)])
def test_each_rank_reads_exactly_its_flat_range(tmp_path, shape):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from calm_dist.distributed.zero_anchor import _read_flat_range
    from calm_dist.model.vocab_pieces import PieceSource

    tensor = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    save_file({"t": tensor}, tmp_path / "w.safetensors")
    flat = tensor.reshape(-1)
    with safe_open(tmp_path / "w.safetensors", "pt") as handle:
        for ranks in (1, 2, 3, 4):
            size = -(-flat.numel() // ranks)
            for rank in range(ranks):
                start, end = rank * size, min((rank + 1) * size, flat.numel())
                if start < end:
                    assert torch.equal(_read_flat_range(handle, PieceSource("t"), start, end, shape), flat[start:end])
        with pytest.raises(ValueError, match="shape"):
            _read_flat_range(handle, PieceSource("t"), 0, 1, (99,))


def _gather_rank(rank: int, world: int, port: int, queue) -> None:
    import os

    import torch.distributed as dist

    from calm_dist.distributed.zero_anchor import chunked_gloo_all_gather

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    calls = []

    def original(**kwargs):
        calls.append(kwargs)
        return dist.all_gather_into_tensor(kwargs["output_tensor"], kwargs["input_tensor"])

    gather = chunked_gloo_all_gather(original, chunk_bytes=64)
    given = torch.arange(37, dtype=torch.float32) + 100 * rank
    out = torch.empty(37 * world)
    handle = gather(out, given, async_op=True)
    handle.wait()
    small = torch.empty(2 * world)
    gather(small, torch.full((2,), float(rank)))
    # plain lists: a tensor crosses a queue as a shared-memory handle, which is gone if this process exits
    # before the parent has read it
    queue.put((rank, out.tolist(), small.tolist(), len(calls)))
    dist.destroy_process_group()


def test_chunked_gloo_all_gather_equals_one_gather():
    import torch.multiprocessing as mp

    from benchmarks._common import free_port

    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    processes = [context.Process(target=_gather_rank, args=(rank, 2, port, queue)) for rank in range(2)]
    for process in processes:
        process.start()
    try:
        results = [queue.get(timeout=60) for _ in processes]
    finally:
        for process in processes:
            process.join(30)
            if process.is_alive():
                process.kill()
    expected = torch.cat([torch.arange(37, dtype=torch.float32) + 100 * rank for rank in range(2)])
    for rank, out, small, originals in results:
        assert out == expected.tolist()  # gathered in 64-byte pieces
        assert small == [0.0, 0.0, 1.0, 1.0] and originals == 1  # small: one gather
