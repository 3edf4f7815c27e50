"""A first look at device "mlx": tensors, the zero-copy bridge, and a transformers model."""
import time

import mlx.core as mx
import torch

import torch_mlx


def main():
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3).to("mlx")
    print("tensor on mlx:", x.device, x.cpu().tolist())

    a = torch_mlx.to_mlx(x.t())  # an mx.array over the same bytes (a strided view)
    print("to_mlx(x.t()) ->", a.tolist(), "| same memory:",
          torch_mlx._C.array_data_address(a) == x.t().data_ptr())
    y = torch_mlx.from_mlx(mx.exp(a))  # MLX result back as a torch tensor, no copy
    print("from_mlx(mx.exp(a)) ->", [[round(v, 3) for v in row] for row in y.cpu().tolist()])

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        ref = model(ids).logits
        model.to("mlx")
        start = time.perf_counter()
        out = model(ids.to("mlx")).logits
        took = time.perf_counter() - start
    err = (out.cpu() - ref).abs().max().item()
    print(f"LlamaForCausalLM forward on mlx: logits {tuple(out.shape)}, "
          f"max |mlx - cpu| = {err:.2e}, {took * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
