"""Route masks at the model forward / generate, the original-stream switch, and the SCALE-Route policy."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from helpers_upscale import ATOL, base_model, greedy, logits, max_diff, token_ids, train_steps, upscaled

import scale_kernels as sk
from scale_kernels.models import UpscaleConfig, set_activation_checkpointing, upscale_config_of
from scale_kernels.route import prepare_route_mask


@pytest.fixture(scope="module")
def base():
    return base_model("llama")


@pytest.fixture(scope="module")
def trained(base):
    """A Route model whose W12 blocks have been trained (so the two paths differ)."""
    model = upscaled(base, "route")
    train_steps(model, steps=3, scale_route=True)
    return model


def _zero_w12_copy(model):
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in clone.named_parameters():
            if name.endswith("weight_12") and not name.startswith("lm_head"):
                p.zero_()
    return clone


def test_route_zero_is_the_preservation_path_and_route_one_the_default(trained):
    ids = token_ids()
    adapt, preserve = logits(trained, ids, scale_route=True), logits(trained, ids, scale_route=False)
    assert max_diff(adapt, logits(trained, ids)) <= ATOL  # no mask = route 1
    assert max_diff(preserve, logits(_zero_w12_copy(trained), ids)) <= ATOL
    assert max_diff(adapt, preserve) > 1e-3


def test_mask_applies_per_token_in_every_layer(trained):
    ids = token_ids()
    mask = torch.ones(ids.shape, dtype=torch.bool)
    mask[:, 0] = False  # token 0 preserved; causal attention: position 0 sees only itself
    mixed = logits(trained, ids, scale_route=mask)
    assert max_diff(mixed[:, 0], logits(trained, ids, scale_route=False)[:, 0]) <= ATOL
    assert max_diff(mixed[:, 0], logits(trained, ids, scale_route=True)[:, 0]) > 1e-4
    gate = logits(trained, ids, scale_route=mask.float())  # float gate == bool mask
    assert max_diff(gate, mixed) <= ATOL


def test_mask_forms_are_equivalent(trained):
    ids = token_ids()
    full = logits(trained, ids, scale_route=torch.zeros(ids.shape, dtype=torch.bool))
    assert max_diff(logits(trained, ids, scale_route=0.0), full) <= ATOL
    assert max_diff(logits(trained, ids, scale_route=torch.zeros(2, dtype=torch.bool)), full) <= ATOL
    assert max_diff(logits(trained, ids, scale_route=torch.tensor(False)), full) <= ATOL


def test_mask_is_cleared_by_the_next_forward(trained):
    ids = token_ids()
    logits(trained, ids, scale_route=False)
    assert max_diff(logits(trained, ids), logits(trained, ids, scale_route=True)) <= ATOL


@pytest.mark.parametrize("route", [False, True])
def test_generate_with_constant_and_full_length_route_matches_uncached_greedy(trained, route):
    ids = token_ids(batch=1, seq=5)
    out = greedy(trained, ids, new=4, scale_route=route)
    seq = ids
    for _ in range(4):  # no cache: recompute the whole prefix each step
        nxt = logits(trained, seq, scale_route=route)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)
    full = torch.full((1, 9), route, dtype=torch.bool)  # prompt + new tokens: sliced at the cache position
    assert torch.equal(greedy(trained, ids, new=4, scale_route=full), seq)


def test_generate_slices_a_varying_full_length_route_at_the_cache_position(trained):
    ids = token_ids(batch=1, seq=5)
    full = torch.tensor([[True, False, True, True, False, True, False, True, False]])  # prompt + 4 new tokens
    out = greedy(trained, ids, new=4, scale_route=full, return_dict_in_generate=True, output_logits=True)
    for step, step_logits in enumerate(out.logits):  # uncached: the prefix's own slice of the mask
        prefix = out.sequences[:, : 5 + step]
        expected = logits(trained, prefix, scale_route=full[:, : prefix.shape[1]])[:, -1]
        assert max_diff(step_logits, expected) <= ATOL, step


def test_generate_still_rejects_unknown_model_kwargs(trained):
    with pytest.raises(ValueError, match=r"not used by the model: \['scale_rout'\]"):
        greedy(trained, token_ids(batch=1), new=1, scale_rout=True)


def test_a_deep_copied_or_pickled_model_keeps_its_route(trained):
    ids = token_ids(batch=1, seq=5)
    ref_logits, ref_tokens = logits(trained, ids, scale_route=False), greedy(trained, ids, new=3, scale_route=False)
    assert not torch.equal(ref_tokens, greedy(trained, ids, new=3, scale_route=True))
    for clone in (copy.deepcopy(trained), pickle.loads(pickle.dumps(trained))):
        assert torch.equal(logits(clone, ids, scale_route=False), ref_logits)
        assert torch.equal(greedy(clone, ids, new=3, scale_route=False), ref_tokens)


def test_route_mask_errors(base, trained):
    ids = token_ids()
    with pytest.raises(ValueError, match=r"scale_route must have shape \(\), \(2,\) or \(2, seq >= 7\)"):
        trained(ids, scale_route=torch.ones(3, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="scale_route has 5 positions"):
        trained(ids, scale_route=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool mask or a float gate"):
        trained(ids, scale_route=torch.ones(2, 7, dtype=torch.long))
    with pytest.raises(TypeError, match="scale_route must be a bool, a float or a tensor"):
        trained(ids, scale_route="yes")
    with pytest.raises(ValueError, match="must be finite"):
        prepare_route_mask(float("nan"), 2, 7, 0, torch.device("cpu"))
    preserve = upscaled(base, "preserve")
    with pytest.raises(ValueError, match="nothing to route .mode='preserve' without gate_head"):
        preserve(ids, scale_route=True)
    with pytest.raises(TypeError, match="gate_head must be a bool"):
        upscaled(base, "route", gate_head=1)
    with pytest.raises(ValueError, match="gate_head=True gates the LM head's W_head_up, which needs extra_hidden"):
        upscaled(base, "route", extra_hidden=0, gate_head=True)


# ---------------------------------------------------------------------- the gated head
@pytest.mark.parametrize("mode", ["route", "preserve"])
def test_gated_head_makes_route_zero_exactly_the_base_model_after_training(base, mode):
    """Route 0 of a gated model is the base model, head included, after W_head_up has trained; the same
    model ungated keeps W_head_up on its preservation path, so it is not (mutation check of the gate)."""
    ids = token_ids()
    gated = upscaled(base, mode, gate_head=True)
    train_steps(gated, steps=3, scale_route=True)
    head_up = gated.lm_head.weight_12
    assert head_up.abs().max() > 1e-3  # W_head_up has trained
    assert max_diff(logits(gated, ids, scale_route=False), logits(base, ids)) <= ATOL
    assert max_diff(logits(gated, ids, scale_route=True), logits(base, ids)) > 1e-3
    gated.lm_head.routable = False  # what an ungated head computes with the same weights
    assert max_diff(logits(gated, ids, scale_route=False), logits(base, ids)) > 1e-3


def test_gated_head_exposes_the_model_route_through_w12_and_route(base):
    """The fused LM head + loss reads ``(W_head_up, route)`` from ``_w12_and_route(None)``."""
    ids = token_ids()
    gated, ungated = upscaled(base, "route", gate_head=True), upscaled(base, "route")
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    for model in (gated, ungated):
        model(ids, scale_route=mask)  # sets the model-level mask
    w, route = gated.lm_head._w12_and_route(None)
    assert w is gated.lm_head.weight_12 and route is not None and torch.equal(route, mask)
    assert ungated.lm_head._w12_and_route(None)[1] is None
    assert "gated by the route" in repr(gated.lm_head) and "ungated" in repr(ungated.lm_head)


def test_gated_head_round_trips_through_the_expansion_checkpoint(base, tmp_path):
    model = upscaled(base, "preserve", gate_head=True)
    train_steps(model, steps=2, scale_route=True)
    sk.save_expansion(model, tmp_path)
    loaded = sk.load_expansion(copy.deepcopy(base), tmp_path)
    assert loaded.lm_head.routable and upscale_config_of(loaded).gate_head
    ids = token_ids()
    for route in (False, True):
        assert max_diff(logits(loaded, ids, scale_route=route), logits(model, ids, scale_route=route)) <= ATOL
    record = upscale_config_of(model).to_dict()
    del record["gate_head"]  # a record written before the option existed
    assert UpscaleConfig.from_dict(record).gate_head is False


def test_original_stream_is_exactly_base_and_restores(base, trained):
    ids = token_ids()
    with sk.original_stream(trained):
        assert max_diff(logits(trained, ids, scale_route=True), logits(base, ids)) <= ATOL
    assert max_diff(logits(trained, ids), logits(base, ids)) > 1e-3
    with pytest.raises(ValueError, match="not an upscaled model"), sk.original_stream(base):
        pass


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_gradient_checkpointing_recomputation_sees_the_mask(trained):
    ids = token_ids()
    mask = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    grads = []
    for checkpointing in (False, True):
        model = copy.deepcopy(trained).train()
        if checkpointing:
            set_activation_checkpointing(model, use_reentrant=True)
        model(ids, labels=ids, scale_route=mask).loss.backward()
        grads.append(model.model.layers[0].mlp.down_proj.weight_12.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_policy_rule_on_logits():
    policy = sk.RoutePolicy()
    assert policy.tau == 0.5
    a = torch.tensor([[10.0, 0.0, 0.0], [10.0, 0.0, 0.0]])
    b = torch.tensor([[10.0, 0.0, 0.0], [0.0, 10.0, 0.0]])
    sim = policy.similarity(a, b)
    assert sim[0] == pytest.approx(1.0) and sim[1] < 0.01
    assert policy.route_from_logits(a, b).tolist() == [False, True]  # similar -> preserve (False)
    assert sk.RoutePolicy(tau=-1.0).route_from_logits(a, b).tolist() == [False, False]
    with pytest.raises(ValueError, match="same shape"):
        policy.similarity(a, b[:1])
    with pytest.raises(ValueError, match="tau must be a finite float"):
        sk.RoutePolicy(tau=float("inf"))
    assert sk.RoutePolicy(inverted=True).route_from_logits(a, b).tolist() == [True, False]
    with pytest.raises(TypeError, match="inverted must be a bool"):
        sk.RoutePolicy(inverted="yes")


def test_policy_select_picks_rows_and_passes_gradients_to_the_chosen_path_only():
    preserve = torch.tensor([[10.0, 0.0, 0.0], [10.0, 0.0, 0.0]], requires_grad=True)
    adapt = torch.tensor([[9.0, 0.0, 0.0], [0.0, 10.0, 0.0]], requires_grad=True)
    out, route = sk.RoutePolicy().select(preserve, adapt)
    assert route.tolist() == [False, True] and not route.requires_grad
    assert torch.equal(out[0], preserve[0]) and torch.equal(out[1], adapt[1])
    out.sum().backward()
    assert preserve.grad[:, 0].tolist() == [1.0, 0.0] and adapt.grad[:, 0].tolist() == [0.0, 1.0]


def test_policy_mask_on_fresh_model_is_all_preserve(base):
    model = upscaled(base, "route")
    mask = sk.RoutePolicy()(model, token_ids())
    assert mask.shape == (2, 7) and mask.dtype == torch.bool and not mask.any()


def test_policy_mask_matches_manual_rule_and_trains_without_grad(trained):
    ids = token_ids()
    sim = sk.RoutePolicy.similarity(logits(trained, ids, scale_route=False), logits(trained, ids, scale_route=True))
    tau = sim.median().item()  # a threshold that splits this model's tokens
    mask = sk.RoutePolicy(tau=tau).compute_route(trained, ids)
    assert torch.equal(mask, sim < tau)
    assert mask.any() and not mask.all()  # the threshold splits this model's tokens
    assert not mask.requires_grad
    model = trained
    model.train()
    loss = model(ids, labels=ids, scale_route=mask).loss
    loss.backward()
    w12 = model.model.layers[0].mlp.down_proj.weight_12
    assert w12.grad is not None and w12.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    model.eval()


def test_policy_generate_on_fresh_model_equals_base_greedy(base):
    model = upscaled(base, "route")
    ids = token_ids(batch=2, seq=5)
    seqs, route = sk.RoutePolicy().generate(model, ids, max_new_tokens=4)
    expected = torch.cat([greedy(base, ids[b : b + 1], new=4) for b in range(2)])
    assert torch.equal(seqs, expected) and route.shape == (2, 8) and not route.any()


def test_policy_generate_keeps_the_chosen_path_in_the_cache(trained):
    ids = token_ids(batch=1, seq=5)
    sim = sk.RoutePolicy.similarity(logits(trained, ids, scale_route=False), logits(trained, ids, scale_route=True))
    policy = sk.RoutePolicy(tau=sim.median().item())
    seqs, route = policy.generate(trained, ids, max_new_tokens=5)
    assert route.any() and not route.all()
    # teacher-forced forward with the recorded route reproduces every greedy choice
    out = logits(trained, seqs[:, :-1], scale_route=route)
    assert torch.equal(out[:, 4:].argmax(-1), seqs[:, 5:])
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        policy.generate(trained, ids, max_new_tokens=0)
