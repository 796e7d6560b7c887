"""train.compile without Ray: the decoder blocks through torch.compile give the step's loss and gradient.
Not in the unit tier: inductor compiles for a minute or more on two cores."""

import torch

from pipeline.config import TrainConfig
from pipeline.model.pretrained import load_model
from pipeline.training.objectives import PairObjective
from tests.helpers.micro_batches import pair_rows

CPU = torch.device("cpu")


def test_compiled_blocks_give_the_same_loss_and_gradient(tiny_model_dir):
    """train.compile (each decoder block through torch.compile; inductor's C++ kernels on CPU) changes
    the kernels, not the numbers, with the GPU-fast layout: packed rows and chunked log-probs."""
    from pipeline.model.pretrained import compile_decoder_layers

    train = TrainConfig(loss="dpo", chunked_logps=True, logps_chunk_size=5, packing=True)
    batch = pair_rows(4, seed=5)
    results = []
    for compiled in (False, True):
        model = load_model(str(tiny_model_dir))
        if compiled:
            compile_decoder_layers(model)
            assert all(block._compiled_call_impl is not None for block in model.get_decoder().h)  # GPT-2 blocks
        objective = PairObjective(train, pad_id=1, device=CPU, with_reference=True)
        shared, _ = objective.begin_step(model, [batch], world=1)
        loss_value, metrics = objective.micro_batch_loss(model, batch, shared, index=0)
        loss_value.backward()
        results.append((loss_value.detach(), metrics.sums, [p.grad.clone() for p in model.parameters()]))
    (l0, s0, g0), (l1, s1, g1) = results
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=0)
    torch.testing.assert_close(s1, s0, atol=1e-4, rtol=0)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
