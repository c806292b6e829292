"""The MoR / MoE-LoRA layer against the equation, written out naively."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from mor import MixtureLayer, MoELoRAAdapter, MoRAdapter, count_trainable_parameters, layer_parameter_count
from mor.layer import reusing_factors
from mor.quantized import linear_shape
from mor.routing import load_balancing_loss

D_IN, D_OUT, R, N = 24, 20, 4, 5
ATOL = 1e-5  # fp32, values of order 1


def naive_output(layer, x):
    """W x + sum_i G_i(x) D_i x, one expert at a time (the paper's equation, no tricks)."""
    out = layer.base_layer(x)
    adapter = layer.mor["default"]
    gates = adapter.router(x)  # (..., N)
    deltas = adapter.expert_deltas()  # (N, d_out, d_in)
    for i in range(adapter.num_experts):
        out = out + gates[..., i : i + 1] * (x @ deltas[i].T)
    return out


def naive_mor_delta(layer, i):
    """D_i = (alpha/r) diag(Omega_B[i]) B diag(Omega_A[i]) A, from the raw parameters."""
    return layer.scaling * torch.diag(layer.expert_scales_out[i]) @ layer.lora_B @ torch.diag(
        layer.expert_scales_in[i]) @ layer.lora_A


def randomise(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if not name.startswith("base_layer."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if "scales" in name else 0.0))
    return layer


def wrap(kind, base, **kw):
    """The peft tuner layer around ``base`` with one adapter, "default"."""
    cls = MoRAdapter if kind == "mor" else MoELoRAAdapter
    kw = {"r": R, "num_experts": N, "alpha": 8.0, **kw}
    return MixtureLayer(base, "default", cls(*linear_shape(base), **kw))


def make(kind, base, router="softmax", **kw):
    return randomise(wrap(kind, base, router=router, **kw))


@pytest.mark.parametrize("kind", ["mor", "moelora"])
@pytest.mark.parametrize("base_kind", ["linear", "conv1d"])
@pytest.mark.parametrize("router", ["softmax", "topk", "mean", "balanced"])
def test_efficient_forward_equals_naive_per_expert_formula(kind, base_kind, router):
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT) if base_kind == "linear" else Conv1D(D_OUT, D_IN)
    if base_kind == "conv1d":
        nn.init.normal_(base.weight)
    layer = make(kind, base, router=router, top_k=2).eval()
    x = torch.randn(3, 7, D_IN)
    torch.testing.assert_close(layer(x), naive_output(layer, x), atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("no_grad", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("router", ["softmax", "topk", "mean", "balanced"])
def test_inference_forward_equals_naive_per_expert_formula(no_grad, router):
    """Without gradients the layer takes its cached path ([W_g; A] x as one product, U cached)."""
    torch.manual_seed(0)
    layer = make("mor", nn.Linear(D_IN, D_OUT), router=router, top_k=2).eval()
    adapter = layer.mor["default"]
    x = torch.randn(3, 7, D_IN)
    expected = naive_output(layer, x)
    with no_grad():
        torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(adapter(x), expected - layer.base_layer(x), atol=ATOL, rtol=1e-5)  # (..., d_out)
        for one_token in (x[:1, :1], x[0, :1]):  # (1, 1, d_in) and (1, d_in): the decoding path
            torch.testing.assert_close(layer(one_token), expected[:1, :1].reshape(one_token.shape[:-1] + (D_OUT,)),
                                       atol=ATOL, rtol=1e-5)
            torch.testing.assert_close(adapter(one_token) + layer.base_layer(one_token), layer(one_token),
                                       atol=ATOL, rtol=1e-5)
        assert (adapter.token_independent_factors().router_and_down_t is None) == (router == "mean")


def test_factors_kept_inside_reusing_factors_follow_every_parameter_update():
    torch.manual_seed(0)
    layer = make("mor", nn.Linear(D_IN, D_OUT)).eval()
    adapter = layer.mor["default"]
    x = torch.randn(5, D_IN)
    with reusing_factors(layer):
        with torch.no_grad():
            layer(x)  # keeps U
            assert adapter._factors_cache is not None
        for name in ("lora_A", "lora_B", "expert_scales_in", "expert_scales_out", "router.weight"):
            with torch.no_grad():
                adapter.get_parameter(name).mul_(1.5)
                out = layer(x)
            torch.testing.assert_close(out, naive_output(layer, x), atol=ATOL, rtol=1e-5, msg=f"stale after {name}")
        layer.double()  # new storage (and a dtype where router and A are not stacked)
        with torch.no_grad():
            torch.testing.assert_close(layer(x.double()), naive_output(layer, x.double()), atol=ATOL, rtol=1e-5)
    assert adapter._factors_cache is None  # dropped at the end of the block


@pytest.mark.parametrize("scope", ["router", "global"])
def test_router_hooks_see_the_gates_on_the_inference_path(scope):
    """Routing profiles and the balance loss read the gates through forward hooks on the router:
    the inference path (one product for logits and A x) must still call it as a module."""
    torch.manual_seed(0)
    layer = make("mor", nn.Linear(D_IN, D_OUT)).eval()
    router = layer.mor["default"].router
    seen = []

    def hook(module, _inputs, gates):
        if module is router:
            seen.append(gates)

    handle = (router.register_forward_hook(hook) if scope == "router"
              else nn.modules.module.register_module_forward_hook(hook))
    x = torch.randn(2, 3, D_IN)
    try:
        with torch.inference_mode():
            layer(x)
    finally:
        handle.remove()
    assert len(seen) == 1
    torch.testing.assert_close(seen[0].reshape(6, N), router(x).reshape(6, N).detach(), atol=1e-6, rtol=1e-5)


def test_adapter_hooks_fire_on_the_inference_path():
    """The layer calls its adapter as a module on the inference path, so hooks on it fire."""
    torch.manual_seed(0)
    layer = make("mor", nn.Linear(D_IN, D_OUT)).eval()
    adapter = layer.mor["default"]
    calls = []
    handle = adapter.register_forward_pre_hook(lambda _module, args: calls.append(args[0].shape))
    x = torch.randn(2, 3, D_IN)
    with torch.inference_mode():
        hooked = layer(x)
        handle.remove()
        plain = layer(x)
    assert calls == [x.shape]
    torch.testing.assert_close(hooked, plain)


def test_pinned_routing_holds_on_the_inference_path():
    torch.manual_seed(0)
    layer = make("mor", nn.Linear(D_IN, D_OUT)).eval()
    adapter = layer.mor["default"]
    x = torch.randn(4, D_IN)
    g = torch.softmax(torch.randn(N), 0)
    with torch.inference_mode(), reusing_factors(layer):
        layer(x)  # keeps the factors with a learned router
        adapter.router.fixed = g
        pinned = layer(x)
    expected = layer.base_layer(x) + F.linear(x, adapter.merged_delta(g))
    torch.testing.assert_close(pinned, expected.detach(), atol=ATOL, rtol=1e-5)


def test_dropout_still_applies_in_training_without_gradients():
    torch.manual_seed(0)
    layer = make("mor", nn.Linear(D_IN, D_OUT), dropout=0.5).train()
    x = torch.randn(4, D_IN)
    torch.manual_seed(1)
    with_grad = layer(x)
    torch.manual_seed(1)
    with torch.no_grad():
        without = layer(x)
    torch.testing.assert_close(without, with_grad.detach(), atol=ATOL, rtol=1e-5)
    assert not torch.allclose(without, layer.eval()(x).detach(), atol=1e-3)


def test_expert_deltas_are_the_papers_rescaled_lora():
    layer = make("mor", nn.Linear(D_IN, D_OUT)).mor["default"]
    deltas = layer.expert_deltas()
    assert deltas.shape == (N, D_OUT, D_IN)
    for i in range(N):
        torch.testing.assert_close(deltas[i], naive_mor_delta(layer, i), atol=ATOL, rtol=1e-5)


def test_topk_router_keeps_k_experts_and_renormalises():
    layer = make("mor", nn.Linear(D_IN, D_OUT), router="topk", top_k=2)
    gates = layer.mor["default"].router(torch.randn(50, D_IN))
    assert ((gates > 0).sum(-1) == 2).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(50))


def test_router_weights_are_a_distribution_and_depend_on_input():
    layer = make("mor", nn.Linear(D_IN, D_OUT))
    gates = layer.mor["default"].router(torch.randn(4, 9, D_IN))
    assert gates.shape == (4, 9, N) and (gates >= 0).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(4, 9))
    assert gates.reshape(-1, N).std(dim=0).max() > 1e-3


def test_mean_router_is_uniform_and_has_no_parameters():
    adapter = MoRAdapter(D_IN, D_OUT, r=R, num_experts=N, alpha=8.0, router="mean")
    assert adapter.router.weight is None
    torch.testing.assert_close(adapter.router(torch.randn(3, D_IN)), torch.full((3, N), 1.0 / N))


@pytest.mark.parametrize("kind", ["mor", "moelora"])
def test_new_layer_equals_base_layer_exactly(kind):
    base = nn.Linear(D_IN, D_OUT)
    layer = wrap(kind, base).eval()
    x = torch.randn(5, D_IN)
    assert torch.equal(layer(x), base(x))


def test_single_expert_mor_with_unit_scales_is_lora_with_same_factors():
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT)
    lora_model = get_peft_model(nn.Sequential(base), LoraConfig(r=R, lora_alpha=8, target_modules=["0"],
                                                                 lora_dropout=0.0))
    lora_layer = lora_model.base_model.model[0]
    with torch.no_grad():
        lora_layer.lora_B["default"].weight.normal_()
    mor = MixtureLayer(lora_layer.base_layer, "default",
                       MoRAdapter(D_IN, D_OUT, r=R, num_experts=1, alpha=8.0, init="ones")).eval()
    adapter = mor.mor["default"]
    with torch.no_grad():
        adapter.lora_A.copy_(lora_layer.lora_A["default"].weight)
        adapter.lora_B.copy_(lora_layer.lora_B["default"].weight)
    assert torch.equal(adapter.expert_scales_in, torch.ones(1, R))
    assert torch.equal(adapter.expert_scales_out, torch.ones(1, D_OUT))
    x = torch.randn(6, D_IN)
    torch.testing.assert_close(mor(x), lora_model(x), atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("kind", ["mor", "moelora"])
def test_gradients_match_naive_formula(kind):
    layer = make(kind, nn.Linear(D_IN, D_OUT)).eval()
    x = torch.randn(4, 3, D_IN)
    target = torch.randn(4, 3, D_OUT)
    params = [p for n, p in layer.named_parameters() if not n.startswith("base_layer.")]
    fast = torch.autograd.grad(((layer(x) - target) ** 2).sum(), params)
    slow = torch.autograd.grad(((naive_output(layer, x) - target) ** 2).sum(), params)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert layer.base_layer.weight.requires_grad is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_runs_in_low_precision_close_to_fp32(dtype):
    torch.manual_seed(0)
    ref = make("mor", nn.Linear(D_IN, D_OUT)).eval()
    low = wrap("mor", nn.Linear(D_IN, D_OUT)).to(dtype).eval()
    low.load_state_dict({k: v.to(dtype) for k, v in ref.state_dict().items()})
    x = torch.randn(2, 5, D_IN)
    out = low(x.to(dtype))
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(out.float(), ref(x), atol=tol, rtol=tol)
    with torch.no_grad():  # the cached inference paths, many tokens and one
        torch.testing.assert_close(low(x.to(dtype)).float(), ref(x), atol=tol, rtol=tol)
        torch.testing.assert_close(low(x[:1, :1].to(dtype)).float(), ref(x[:1, :1]), atol=tol, rtol=tol)


def test_no_tokens_by_experts_by_dout_tensor_is_materialised():
    """The forward's largest activation is (tokens, d_out), never (tokens, N, d_out)."""
    layer = make("mor", nn.Linear(D_IN, D_OUT)).eval()
    x = torch.randn(64, D_IN)
    sizes = []
    # walk the autograd graph of the output and collect the size of every tensor it saved
    out = layer(x.requires_grad_())
    seen, stack = set(), [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        for attr in dir(fn):
            if attr.startswith("_saved_"):
                value = getattr(fn, attr)
                if isinstance(value, torch.Tensor):
                    sizes.append(value.numel())
        stack.extend(f for f, _ in fn.next_functions)
    assert max(sizes) < 64 * N * D_OUT


def test_merge_folds_fixed_routing_exactly():
    for base in (nn.Linear(D_IN, D_OUT), Conv1D(D_OUT, D_IN)):
        layer = make("mor", base).eval()
        g = torch.softmax(torch.randn(N), 0)
        x = torch.randn(8, D_IN)
        layer.mor["default"].router.fixed = g
        expected = layer(x)
        layer.merge()
        torch.testing.assert_close(layer.base_layer(x), expected, atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=1e-5)  # merged: the adapter is skipped


def test_merge_of_a_learned_router_without_fixed_routing_is_refused():
    with pytest.raises(ValueError, match="needs a fixed routing"):
        make("mor", nn.Linear(D_IN, D_OUT)).merge()


def test_parameter_count_closed_form_matches_layers():
    for kind in ("mor", "moelora"):
        for router in ("softmax", "mean"):
            layer = wrap(kind, nn.Linear(D_IN, D_OUT), router=router)
            actual = count_trainable_parameters(layer)
            assert actual == layer_parameter_count(kind, D_IN, D_OUT, R, N, router)


def test_load_balancing_loss_is_one_when_uniform_and_larger_when_collapsed():
    even = torch.eye(4).repeat(5, 1) * 1e-3 + 0.25  # every expert is some token's top choice
    assert load_balancing_loss(even).item() == pytest.approx(1.0, abs=1e-2)
    collapsed = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).repeat(20, 1)
    assert load_balancing_loss(collapsed).item() > 3.5
