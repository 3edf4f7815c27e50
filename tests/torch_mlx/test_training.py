"""Training on "mlx" follows the CPU: the same model, data and AdamW steps give the same losses
(within 1e-4 relative) -- forward, autograd's backward formulas on "mlx", and the optimizer.

Each model is trained from the same initial weights (a deep copy) on the same batches. The
losses must also fall, so a run in which nothing trains cannot pass by matching a frozen CPU run.
AdamW runs both ways torch offers: the default (the foreach kernels on an accelerator such as
"mlx") and the per-parameter loop (foreach=False).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

STEPS = 6
RTOL = 1e-4


def _train(model, batches, loss_of, device, foreach, clip=None):
    model = copy.deepcopy(model).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05,
                                  foreach=foreach)
    losses = []
    for step in range(STEPS):
        batch = [t.to(device) for t in batches[step % len(batches)]]
        loss = loss_of(model, *batch)
        optimizer.zero_grad()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=foreach)
        optimizer.step()
        losses.append(loss.item())
    if device == "mlx":
        state = next(iter(optimizer.state.values()))
        assert state["exp_avg"].device.type == "mlx"  # the optimizer really ran on the device
    return losses


def _assert_trains_like_cpu(model, batches, loss_of, foreach, clip=None):
    cpu = _train(model, batches, loss_of, "cpu", foreach, clip)
    mlx = _train(model, batches, loss_of, "mlx", foreach, clip)
    torch.testing.assert_close(torch.tensor(mlx), torch.tensor(cpu), rtol=RTOL, atol=0,
                               msg=lambda m: f"losses mlx {mlx} vs cpu {cpu}\n{m}")
    assert mlx[-1] < mlx[0], f"the loss did not fall: {mlx}"


@pytest.mark.parametrize("foreach", [None, False], ids=["default", "for-loop"])
def test_mlp_with_adamw(foreach):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.Tanh(),
                          nn.Linear(64, 5))
    batches = [(torch.randn(16, 20), torch.randint(0, 5, (16,))) for _ in range(3)]
    _assert_trains_like_cpu(model, batches, lambda m, x, y: F.cross_entropy(m(x), y), foreach)


@pytest.mark.parametrize("foreach", [None, False], ids=["default", "for-loop"])
def test_transformer_encoder_layer_with_adamw_and_clipping(foreach):
    torch.manual_seed(0)
    model = nn.ModuleDict({
        "embed": nn.Embedding(64, 32),
        "layer": nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0,
                                            batch_first=True),
        "head": nn.Linear(32, 64),
    })

    def loss_of(m, tokens):
        hidden = m["layer"](m["embed"](tokens[:, :-1]), is_causal=True,
                            src_mask=nn.Transformer.generate_square_subsequent_mask(
                                tokens.shape[1] - 1, device=tokens.device))
        logits = m["head"](hidden)
        return F.cross_entropy(logits.reshape(-1, 64), tokens[:, 1:].reshape(-1))

    batches = [(torch.randint(0, 64, (4, 10)),) for _ in range(3)]
    _assert_trains_like_cpu(model, batches, loss_of, foreach, clip=1.0)


def test_tiny_llama_with_adamw():
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    batches = [(torch.randint(0, 128, (2, 12)),) for _ in range(3)]
    _assert_trains_like_cpu(model, batches, lambda m, ids: m(input_ids=ids, labels=ids).loss,
                            foreach=None)
