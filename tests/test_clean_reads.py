"""The activation cache keeps only what plans read (Plan.clean_reads), and stays exact doing so.

The exactness reference is tests/oracle.py, which shares no code with the engine.
"""
from __future__ import annotations

import pytest
import torch

import krypton
from krypton.execute import materialize
from nets import NETS, rand_image
from oracle import occlusion_oracle


@pytest.mark.parametrize("name", sorted(set(NETS) - {"unknown"}))
def test_the_cache_keeps_fewer_activations_and_the_heatmap_stays_exact(net, name):
    model = net(name, torch.float64)
    image = rand_image(3, 23, 26, dtype=torch.float64, seed=3)
    explainer = krypton.Explainer(model)
    exp = explainer.explain(image, patch_size=5, stride=3)
    kept = explainer.materialized(image[None], needed=frozenset())[0]  # the request's own cached copy
    everything = materialize(explainer.capture, image[None])
    assert kept.kept is not None and kept.nbytes < everything.nbytes
    assert exp.memory["materialized_bytes"] == kept.nbytes
    computed = {n.name for n in explainer.capture.nodes if n.op in ("call_function", "call_module", "call_method")}
    assert {n.name for n in kept.values} & computed <= kept.kept
    ref = occlusion_oracle(model, image, 5, 3, 0.0, exp.label).heatmap
    assert (exp.heatmap - ref).abs().max().item() <= 1e-9


def test_a_cached_copy_that_lacks_what_a_plan_reads_is_a_miss_then_a_hit(net):
    model = net("branchy", torch.float64)
    image = rand_image(3, 21, 24, dtype=torch.float64, seed=4)
    explainer = krypton.Explainer(model)
    naive = explainer.explain(image, patch_size=4, stride=3, method="naive")  # keeps no activation
    assert explainer.materialized(image[None], needed=frozenset())[0].nbytes == 0
    first = explainer.explain(image, patch_size=4, stride=3)
    second = explainer.explain(image, patch_size=4, stride=3)
    assert (naive.cache, first.cache, second.cache) == ("miss", "miss", "hit")
    assert (first.heatmap - naive.heatmap).abs().max().item() <= 1e-9
    # every activation asked for (run_changes, Captum drop-ins): the pruned copy does not serve it
    assert explainer.materialized(image[None])[1] == "miss"
    assert explainer.materialized(image[None])[0].kept is None


def test_drilldown_stage_two_reuses_the_clean_pass_once_its_plans_are_known(net):
    model = net("strided", torch.float64)
    image = rand_image(3, 30, 30, dtype=torch.float64, seed=5)
    explainer = krypton.Explainer(model)
    options = dict(patch_size=6, stride=2, drilldown={"r": 0.3, "s1": 6})
    explainer.explain(image, **options)
    again = explainer.explain(rand_image(3, 30, 30, dtype=torch.float64, seed=6), **options)
    assert again.extra["drilldown"]["stage2_cache"] == "hit"
