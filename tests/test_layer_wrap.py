"""Wrapping Linear subclasses that are not plain float Linears: quantised bases.

``LMoELinear`` calls its base layer, never re-implements it, so a quantised Linear (bitsandbytes, GPTQ,
...) keeps its own kernel; the experts are created in float32 when the base weight is not a float tensor.
``FakeInt8Linear`` stands in for such a layer on the CPU: an ``nn.Linear`` subclass whose ``weight`` is an
int8 tensor with a per-row scale in a buffer, dequantised in its own ``forward``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmoe import LMoEConfig, LMoELinear, LMoEModel, get_lmoe_model

CONFIG = LMoEConfig(num_experts=3, rank=2, alpha=4.0, target_modules=["up", "down"])


class FakeInt8Linear(nn.Linear):
    """int8 weight (a frozen Parameter, as bitsandbytes' Int8Params) + float32 per-row scale (a buffer)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        w = self.weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True) / 127  # (out, 1)
        del self.weight
        self.weight = nn.Parameter(torch.round(w / scale).to(torch.int8), requires_grad=False)
        self.register_buffer("scale", scale)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return F.linear(x, (self.weight.float() * self.scale).to(x.dtype), self.bias)


class Block(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.up = FakeInt8Linear(d, 2 * d)
        self.down = FakeInt8Linear(2 * d, d)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _model(seed: int = 0):
    torch.manual_seed(seed)
    block = Block()
    return block, get_lmoe_model(block, CONFIG)


def _reference_delta(layer: LMoELinear, x: torch.Tensor) -> torch.Tensor:
    """``s * sum_i g_i B_i A_i x`` with a loop over experts (independent of the layer's fused maths)."""
    flat = x.reshape(-1, layer.in_features).double()
    gates = (flat @ layer.router.weight.double().t()).softmax(-1)  # (T, N)
    A, B = layer.lora_A.double(), layer.lora_B.double()  # (N, r, d_in), (N, d_out, r)
    delta = sum(gates[:, i:i + 1] * (flat @ A[i].t() @ B[i].t()) for i in range(layer.num_experts))
    return (layer.scaling * delta).view(*x.shape[:-1], layer.out_features)


def test_subclass_is_wrapped_and_experts_are_float32():
    block, model = _model()
    for name in ("up", "down"):
        layer = getattr(block, name)
        assert isinstance(layer, LMoELinear) and type(layer.base_layer) is FakeInt8Linear
        assert layer.base_layer.weight.dtype == torch.int8 and not layer.base_layer.weight.requires_grad
        assert layer.lora_A.dtype == layer.lora_B.dtype == layer.router.weight.dtype == torch.float32
        assert layer.lora_A.requires_grad and layer.lora_B.requires_grad and layer.router.weight.requires_grad
    assert sorted(model.lmoe_layers()) == ["down", "up"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"base_model.{m}.{k}" for m in ("up", "down") for k in ("lora_A", "lora_B", "router.weight")}


@torch.no_grad()
def test_forward_is_the_subclass_forward_plus_the_adapter():
    block, model = _model()
    x = torch.randn(2, 5, 8)
    base_up = block.up.base_layer
    want_base = base_up(x)  # the subclass's own output (counts one call)
    assert base_up.calls == 1

    # B = 0 at init: exactly the subclass's output, through the whole model too.
    assert torch.equal(block.up(x), want_base)
    assert base_up.calls == 2
    with model.disable_adapter():
        plain = model(x)
    assert torch.equal(model(x), plain)

    for layer in model.lmoe_layers().values():
        layer.lora_B.normal_(std=0.1)
    calls = base_up.calls
    got = block.up(x)
    assert base_up.calls == calls + 1  # the base forward ran once, and was not re-implemented
    want = want_base.double() + _reference_delta(block.up, x)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # The same with autograd on (the fused training path).
    with torch.enable_grad():
        torch.testing.assert_close(block.up(x).double(), want, rtol=1e-5, atol=1e-6)


def test_backward_trains_the_adapter_only():
    block, model = _model()
    int8 = {n: b.base_layer.weight.clone() for n, b in model.lmoe_layers().items()}
    bias = {n: b.base_layer.bias.clone() for n, b in model.lmoe_layers().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, target = torch.randn(16, 8), torch.randn(16, 8)
    losses = []
    for _ in range(20):
        loss = F.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, layer in model.lmoe_layers().items():
        assert layer.lora_B.abs().max() > 0  # moved from 0
        assert torch.equal(layer.base_layer.weight, int8[name]) and layer.base_layer.weight.grad is None
        assert torch.equal(layer.base_layer.bias, bias[name]) and layer.base_layer.bias.grad is None


def test_save_and_load_on_a_quantised_base(tmp_path):
    block, model = _model()
    with torch.no_grad():
        for layer in model.lmoe_layers().values():
            layer.lora_B.normal_(std=0.1)
    x = torch.randn(3, 8)
    with torch.no_grad():
        want = model(x)
    model.save_pretrained(tmp_path)
    _, fresh = _model()
    loaded = LMoEModel.from_pretrained(fresh.unload(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), want)


def test_bitsandbytes_linear_is_wrapped():
    """A real bitsandbytes 8-bit / 4-bit Linear (both nn.Linear subclasses). Not installed here."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (quantised bases are covered "
                                                      "on the CPU by FakeInt8Linear above)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    for make in (lambda: bnb.nn.Linear8bitLt(16, 32, has_fp16_weights=False, threshold=6.0),
                 lambda: bnb.nn.Linear4bit(16, 32, compute_dtype=torch.float32)):
        holder = nn.Sequential()
        holder.add_module("up", make())
        try:
            holder = holder.to(device)  # quantises the weights
        except (RuntimeError, NotImplementedError) as e:  # a bitsandbytes build without this device
            pytest.skip(f"bitsandbytes cannot quantise on {device}: {e}")
        base = holder.up
        assert isinstance(base, nn.Linear) and not base.weight.dtype.is_floating_point
        x = torch.randn(4, 16, device=device)
        with torch.no_grad():
            want = base(x)
        model = get_lmoe_model(holder, LMoEConfig(num_experts=2, rank=2, target_modules=["up"]))
        layer = holder.up
        assert isinstance(layer, LMoELinear) and layer.base_layer is base
        assert layer.lora_A.dtype == torch.float32 and layer.lora_A.device.type == device
        with torch.no_grad():
            assert torch.equal(model(x), want)  # B = 0
        model(x).float().pow(2).mean().backward()
        assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().max() > 0
